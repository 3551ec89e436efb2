// `mailha deploy upgrade`: a new package onto a running cluster without taking mail
// down: the passive node first (package, config and secrets as deploy would write them,
// its unit restarted, waited for until it is passive and in sync again), then a
// switchover to it, then the other node the same way, then the witness (a restart of a
// few seconds, well inside its lease). Each step waits, bounded, for the cluster to be
// healthy before the next; a step that fails stops the upgrade with the cluster serving
// from the node that runs, and says where it stopped (running it again continues: a
// node already at the new version is left alone).
import { existsSync } from "node:fs";
import { loadConfig } from "../../common/config.ts";
import { shellQuote, sshRun } from "./ssh.ts";
import { describeAction, planHost, type Action } from "./plan.ts";
import { act, clusterHealthy, nodeHealth, packageVersion, readFacts, REMOTE_CONFIG, servers, type DeployOptions, type NodeHealth, type Server } from "./run.ts";

const POLL_MS = 3000;

export interface UpgradeResult {
  readonly version: string;
  readonly steps: string[];
  readonly healthy: boolean;
  readonly active: string | null;
  readonly error?: string;
  readonly next: string[];
}

async function waitHealthy(nodes: readonly Server[], ms: number, want: (h: readonly (NodeHealth | null)[]) => boolean, progress: DeployOptions["progress"], what: string): Promise<(NodeHealth | null)[]> {
  const deadline = Date.now() + ms;
  let last = "";
  for (;;) {
    const h = await Promise.all(nodes.map((s) => nodeHealth(s)));
    const line = h.map((x, i) => (x ? `${x.node} ${x.state} ${x.volume}` : `${nodes[i]!.name} not answering`)).join("; ");
    if (line !== last) progress("cluster", { waiting_for: what, status: line });
    last = line;
    if (want(h)) return h;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${Math.round(ms / 1000)} s (${line})`);
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

export async function upgrade(o: DeployOptions): Promise<UpgradeResult> {
  const c = loadConfig(o.configFile);
  if (!existsSync(o.packageFile)) throw new Error(`${o.packageFile}: no such package (build it with npm run package, or say --package FILE)`);
  const version = packageVersion(o.packageFile);
  const all = servers(c, o, version);
  const nodes = all.filter((s) => s.role === "node");
  const witness = all.find((s) => s.role === "witness");
  const steps: string[] = [];
  const timeout = o.healthTimeoutMs ?? 600_000;
  const healthy = (h: readonly (NodeHealth | null)[]) => clusterHealthy(h);
  let active: string | null = null;
  try {
    const start = await waitHealthy(nodes, 30_000, healthy, o.progress, "a healthy cluster to start from");
    active = start.find((h) => h?.state === "active")!.node;
    // The passive node first, then (after a switchover) the other.
    const order = [nodes.find((s) => s.name !== active)!, nodes.find((s) => s.name === active)!];
    for (const [i, s] of order.entries()) {
      const f = await readFacts(c, s);
      const plan = planHost({ ...s.desired, volume: undefined }, f);
      const errors = plan.problems.filter((p) => p.severity === "error" && !/port/.test(p.message));
      if (errors.length) throw new Error(`${s.name}: ${errors.map((e) => e.message).join("; ")}`);
      const changes = plan.actions.filter((a): a is Action => a.kind === "install-package" || a.kind === "write-file");
      if (i === 1) {
        // The group moves to the node upgraded first; this one is passive then.
        if (changes.length) {
          o.progress("switchover", { from: s.name });
          const r = await sshRun(s.target, `mailha switchover --config ${REMOTE_CONFIG} --node ${shellQuote(s.name)} --no-wait --json`, { timeoutMs: 60_000 });
          if (r.code !== 0) throw new Error(`${s.name}: switchover refused: ${(r.stderr || r.stdout).trim()}`);
          const after = await waitHealthy(nodes, timeout, (h) => healthy(h) && h.find((x) => x?.node === s.name)?.state === "passive", o.progress, `the switchover away from ${s.name}`);
          active = after.find((h) => h?.state === "active")!.node;
          steps.push(`switchover: ${active} is active`);
        }
      }
      if (!changes.length) {
        steps.push(`${s.name}: at ${version} already`);
        continue;
      }
      for (const a of changes) {
        o.progress("change", { host: s.name, action: describeAction(a) });
        await act(c, o, s, a);
        steps.push(`${s.name}: ${describeAction(a)}`);
      }
      o.progress("restart", { host: s.name, unit: s.desired.unit });
      const r = await sshRun(s.target, `systemctl restart ${shellQuote(s.desired.unit)} 2>&1`, { timeoutMs: 120_000 });
      if (r.code !== 0) throw new Error(`${s.name}: restarting ${s.desired.unit} failed: ${r.stdout.trim()}`);
      steps.push(`${s.name}: ${s.desired.unit} restarted`);
      await waitHealthy(nodes, timeout, (h) => healthy(h) && h.find((x) => x?.node === s.name)?.state === "passive", o.progress, `${s.name} passive and in sync again`);
    }
    if (witness) {
      const f = await readFacts(c, witness);
      const plan = planHost(witness.desired, f);
      const changes = plan.actions.filter((a) => a.kind === "install-package" || a.kind === "write-file");
      for (const a of changes) {
        await act(c, o, witness, a);
        steps.push(`witness: ${describeAction(a)}`);
      }
      if (changes.length) {
        const r = await sshRun(witness.target, `systemctl restart ${shellQuote(witness.desired.unit)} 2>&1`, { timeoutMs: 60_000 });
        if (r.code !== 0) throw new Error(`witness: restarting failed: ${r.stdout.trim()}`);
        steps.push("witness: restarted");
      }
    }
    const end = await waitHealthy(nodes, timeout, healthy, o.progress, "a healthy cluster at the end");
    active = end.find((h) => h?.state === "active")?.node ?? active;
    const next = active !== c.cluster.preferred_node ? [`${active} is active; \`mailha failback\` moves the group back to ${c.cluster.preferred_node} when you want`] : [];
    return { version, steps, healthy: true, active, next };
  } catch (err) {
    return { version, steps, healthy: false, active, error: (err as Error).message, next: ["the upgrade stopped here; the cluster serves from the node that runs. Fix what the error says and run mailha deploy upgrade again (nodes at the new version are left alone)"] };
  }
}
