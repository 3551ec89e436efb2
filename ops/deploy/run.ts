// `mailha deploy`: brings both nodes and the witness to what mailha.yaml says, over SSH.
// Order: every server's facts first and their preflight problems (an error anywhere:
// nothing is changed anywhere); then the witness (package, config, its key, unit), so
// the nodes find their tie-breaker; then both nodes at once (package, config, secrets,
// the node's env file, the volume); then their units, the preferred node first; then it
// waits (bounded) until both report a healthy cluster, showing the initial sync, and
// prints what DNS needs. Every step is planned from facts (plan.ts), so a second run on
// servers that are right changes nothing, and --dry-run prints the same plan and stops.
// A failure on one node does not stop the other: it is started and serves, and the
// result says what failed and that running deploy again continues from there.
// Secrets travel on the SSH channel's stdin, never on a command line.
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { posix } from "node:path";
import { execFileSync } from "node:child_process";
import { parseDocument } from "yaml";
import { loadConfig, type MailhaConfig } from "../../common/config.ts";
import { nodeStateDir } from "../../common/paths.ts";
import { enginePaths } from "../../replication/client.ts";
import { renderDns } from "../../dns/apply.ts";
import { factsScript, parseFacts, type FactsQuery, type HostFacts } from "./facts.ts";
import { describeAction, planHost, type Action, type Desired, type HostPlan, type HostRole } from "./plan.ts";
import { scpTo, shellQuote, sshRun, type SshTarget } from "./ssh.ts";

export const REMOTE_CONFIG = "/etc/mailha/mailha.yaml";
export const NODE_ENV = "/etc/mailha/node.env";
export const NODE_UNIT = "mailha-node.service";
export const WITNESS_UNIT = "mailha-witness.service";
/** What a node's services bind: SMTP, submission, IMAP(S), POP3(S), heartbeats, the volume, metrics, the peer channel. */
export const NODE_PORTS = (c: MailhaConfig): number[] => [25, 465, 587, 110, 143, 993, 995, c.heartbeat.port, c.volume.port, c.manager.metrics_port, c.manager.peer_port];
const HEALTH_POLL_MS = 3000;

export interface DeployOptions {
  readonly configFile: string;
  readonly packageFile: string;
  readonly sshUser: string;
  readonly sshConfig?: string;
  /** ssh host per server name (node id or "witness"), instead of its address in the config. */
  readonly hosts?: Readonly<Record<string, string>>;
  readonly dryRun: boolean;
  readonly healthTimeoutMs?: number;
  readonly progress: (step: string, detail?: Record<string, unknown>) => void;
}

export interface HostOutcome {
  readonly name: string;
  readonly role: HostRole;
  readonly host: string;
  readonly problems: HostPlan["problems"];
  readonly planned: string[];
  readonly done: string[];
  readonly error?: string;
}

export interface DeployResult {
  readonly dryRun: boolean;
  readonly hosts: HostOutcome[];
  /** Preflight found an error: nothing was changed. */
  readonly refused: boolean;
  readonly healthy: boolean;
  readonly changes: number;
  readonly status?: unknown;
  readonly dns: { readonly updates: boolean; readonly records?: string };
  readonly next: string[];
}

interface LocalFile {
  readonly path: string;
  readonly content: Buffer;
  readonly mode: number;
  /** Who owns it there (root when absent): the witness runs as the package's `mailha` user and reads its secrets as that user. */
  readonly owner?: string;
}

export interface Server {
  readonly name: string;
  readonly role: HostRole;
  readonly target: SshTarget;
  readonly files: LocalFile[];
  readonly desired: Desired;
  facts?: HostFacts;
  plan?: HostPlan;
  done: string[];
  error?: string;
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** The package's version (dpkg-deb), e.g. 0.1.0-1. */
export function packageVersion(file: string): string {
  return execFileSync("dpkg-deb", ["-f", file, "Version"], { encoding: "utf8" }).trim();
}

/** Where each secret lives on the servers: the path as the config file writes it, a relative one under the config's folder there. */
function remoteSecretPaths(configFile: string): Map<string, string> {
  const doc = parseDocument(readFileSync(configFile, "utf8")).toJS() as Record<string, Record<string, unknown>>;
  const raw = (section: string, key: string) => (typeof doc?.[section]?.[key] === "string" ? (doc[section]![key] as string) : null);
  const out = new Map<string, string>();
  for (const [section, key] of [["heartbeat", "key_file"], ["volume", "secret_file"], ["dns", "tsig_key_file"]] as const) {
    const r = raw(section, key);
    if (r) out.set(`${section}.${key}`, posix.isAbsolute(r) ? r : posix.join(posix.dirname(REMOTE_CONFIG), r));
  }
  return out;
}

export function servers(c: MailhaConfig, o: DeployOptions, pkgVersion: string): Server[] {
  const remote = remoteSecretPaths(o.configFile);
  const config: LocalFile = { path: REMOTE_CONFIG, content: readFileSync(o.configFile), mode: 0o644 };
  const secret = (key: string, local: string | undefined): LocalFile[] => (local && remote.get(key) ? [{ path: remote.get(key)!, content: readFileSync(local), mode: 0o600 }] : []);
  const target = (name: string, address: string): SshTarget => ({ host: o.hosts?.[name] ?? address, user: o.sshUser, ...(o.sshConfig ? { configFile: o.sshConfig } : {}) });
  const desired = (role: HostRole, name: string, files: LocalFile[], extra: Partial<Desired>): Desired => ({ role, name, pkgVersion, files: files.map((f) => ({ path: f.path, sha256: sha(f.content), mode: f.mode })), unit: role === "node" ? NODE_UNIT : WITNESS_UNIT, ports: [], ...extra });
  const out: Server[] = [];
  if (c.quorum.witness) {
    // The witness loads the whole config, which checks every secret file it names (owned by whoever runs it: mailha).
    const files = [config, ...[...secret("heartbeat.key_file", c.heartbeat.key_file), ...secret("volume.secret_file", c.volume.secret_file), ...secret("dns.tsig_key_file", c.dns.tsig_key_file)].map((f) => ({ ...f, owner: "mailha" }))];
    out.push({ name: "witness", role: "witness", target: target("witness", c.quorum.witness.address), files, desired: desired("witness", "witness", files, { ports: [c.quorum.witness.port] }), done: [] });
  }
  for (const n of c.nodes) {
    const files = [
      config,
      { path: NODE_ENV, content: Buffer.from(`# Written by mailha deploy: which node of ${REMOTE_CONFIG} this server is.\nMAILHA_NODE=${n.id}\nMAILHA_CONFIG=${REMOTE_CONFIG}\n`), mode: 0o644 },
      ...secret("heartbeat.key_file", c.heartbeat.key_file),
      ...secret("volume.secret_file", c.volume.secret_file),
      ...secret("dns.tsig_key_file", c.dns.tsig_key_file),
    ];
    out.push({
      name: n.id,
      role: "node",
      target: target(n.id, n.service_address),
      files,
      desired: desired("node", n.id, files, { ports: NODE_PORTS(c), volume: { sizeBytes: c.volume.size, preferred: n.id === c.cluster.preferred_node, peerHasVolume: false } }),
      done: [],
    });
  }
  return out;
}

function factsQuery(c: MailhaConfig, s: Server): FactsQuery {
  const stateDir = s.role === "node" ? nodeStateDir(c, s.name) : c.paths.state_dir;
  return { stateDir, volumeMeta: posix.join(enginePaths(stateDir).volumeDir, "meta.json"), files: s.files.map((f) => f.path), units: [s.desired.unit] };
}

export async function readFacts(c: MailhaConfig, s: Server): Promise<{ facts: HostFacts; localMidMs: number; rttMs: number }> {
  const q = factsQuery(c, s);
  const t0 = Date.now();
  const r = await sshRun(s.target, factsScript(q), { timeoutMs: 60_000 });
  const t1 = Date.now();
  if (r.code !== 0) throw new Error(`cannot reach ${s.target.user}@${s.target.host} over ssh (exit ${r.code}): ${r.stderr.trim().split("\n").pop() ?? ""}`);
  return { facts: parseFacts(r.stdout, q), localMidMs: (t0 + t1) / 2, rttMs: t1 - t0 };
}

/** Runs one action on S; throws with what the server said. */
export async function act(c: MailhaConfig, o: DeployOptions, s: Server, a: Action): Promise<void> {
  const must = async (script: string, what: string, input?: Buffer, timeoutMs?: number) => {
    const r = await sshRun(s.target, script, { ...(input ? { input } : {}), ...(timeoutMs ? { timeoutMs } : {}) });
    if (r.code !== 0) throw new Error(`${s.name}: ${what} failed (exit ${r.code}): ${(r.stderr || r.stdout).trim().split("\n").slice(-5).join(" | ")}`);
    return r;
  };
  switch (a.kind) {
    case "install-package": {
      const remote = "/var/tmp/mailha-deploy.deb";
      const cp = await scpTo(s.target, o.packageFile, remote);
      if (cp.code !== 0) throw new Error(`${s.name}: copying the package failed: ${cp.stderr.trim()}`);
      await must(`set -e; export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q -o Dpkg::Options::=--force-confold ${remote} >/var/tmp/mailha-deploy-apt.log 2>&1 || { tail -20 /var/tmp/mailha-deploy-apt.log >&2; exit 1; }; rm -f ${remote}`, "installing the package", undefined, 900_000);
      return;
    }
    case "write-file": {
      const f = s.files.find((x) => x.path === a.path)!;
      const dir = posix.dirname(f.path);
      const tmp = `${f.path}.deploy-tmp`;
      // Through stdin; made under umask 077, then given its mode, then renamed in place.
      // An owner's file: its folder lets the owner's group in (root's, mode 0750).
      const own = f.owner ? `chown ${shellQuote(f.owner)}: ${shellQuote(tmp)}; chgrp ${shellQuote(f.owner)} ${shellQuote(dir)}; chmod 0750 ${shellQuote(dir)}; ` : "";
      await must(`set -e; umask 077; mkdir -p ${shellQuote(dir)}; cat > ${shellQuote(tmp)}; chmod ${f.mode.toString(8)} ${shellQuote(tmp)}; ${own}sync ${shellQuote(tmp)}; mv -f ${shellQuote(tmp)} ${shellQuote(f.path)}`, `writing ${f.path}`, f.content);
      return;
    }
    case "create-volume":
      await must(`set -e; mailha volume create --config ${REMOTE_CONFIG} --node ${shellQuote(s.name)}${a.primary ? " --primary" : ""} --json 2>/dev/null >/dev/null`, "creating the volume", undefined, 3_600_000);
      return;
    case "enable-unit":
      await must(`systemctl enable ${shellQuote(a.unit)} 2>&1`, `enabling ${a.unit}`);
      return;
    case "start-unit":
      await must(`systemctl start ${shellQuote(a.unit)} 2>&1`, `starting ${a.unit}`);
      return;
  }
}

async function runActions(c: MailhaConfig, o: DeployOptions, s: Server, kinds: readonly Action["kind"][]): Promise<void> {
  if (s.error) return;
  for (const a of s.plan!.actions.filter((x) => kinds.includes(x.kind))) {
    o.progress("change", { host: s.name, action: describeAction(a) });
    try {
      await act(c, o, s, a);
      s.done.push(describeAction(a));
    } catch (err) {
      s.error = (err as Error).message;
      o.progress("failed", { host: s.name, error: s.error });
      return;
    }
  }
}

export interface NodeHealth {
  readonly node: string;
  readonly state: string;
  readonly inSync: boolean;
  readonly quorum: boolean;
  readonly volume: string;
  readonly outOfSyncBytes: number;
}

export async function nodeHealth(s: Server): Promise<NodeHealth | null> {
  const r = await sshRun(s.target, `mailha status --config ${REMOTE_CONFIG} --node ${shellQuote(s.name)} --json 2>/dev/null`, { timeoutMs: 30_000 });
  try {
    const st = JSON.parse(r.stdout) as { nodes: { node: string; state?: string; volumeInSync?: boolean; quorum?: boolean; volume?: { connection: string; disk: string; outOfSyncBytes: number; peer: { disk: string } } | null; error?: string }[] };
    const n = st.nodes.find((x) => x.node === s.name);
    if (!n || n.error || !n.state) return null;
    return { node: s.name, state: n.state, inSync: !!n.volumeInSync, quorum: !!n.quorum, volume: n.volume ? `${n.volume.connection} ${n.volume.disk}/${n.volume.peer.disk}` : "?", outOfSyncBytes: n.volume?.outOfSyncBytes ?? 0 };
  } catch {
    return null;
  }
}

/** Healthy: one node active, the other passive, the volume in sync on both. */
export function clusterHealthy(h: readonly (NodeHealth | null)[]): boolean {
  if (h.length !== 2 || h.some((x) => !x)) return false;
  const states = h.map((x) => x!.state).sort();
  return states[0] === "active" && states[1] === "passive" && h.every((x) => x!.inSync);
}

export async function deploy(o: DeployOptions): Promise<DeployResult> {
  const c = loadConfig(o.configFile);
  if (!existsSync(o.packageFile)) throw new Error(`${o.packageFile}: no such package (build it with npm run package, or say --package FILE)`);
  const version = packageVersion(o.packageFile);
  const all = servers(c, o, version);

  // ---- facts and preflight, everywhere, before anything changes ----
  o.progress("preflight", { hosts: all.map((s) => `${s.name}=${s.target.host}`) });
  const observed = await Promise.all(all.map((s) => readFacts(c, s).then((x) => ({ s, x }), (err: Error) => ({ s, err }))));
  const nodes = all.filter((s) => s.role === "node");
  for (const r of observed) {
    if ("err" in r) {
      r.s.error = r.err.message;
      r.s.plan = { problems: [{ severity: "error", message: r.err.message }], actions: [], restartNeeded: false };
      continue;
    }
    r.s.facts = r.x.facts;
  }
  for (const r of observed) {
    if ("err" in r) continue;
    const s = r.s;
    const peer = nodes.find((p) => p !== s);
    const desired: Desired = s.desired.volume ? { ...s.desired, volume: { ...s.desired.volume, peerHasVolume: !!peer?.facts?.volumeCreated } } : s.desired;
    s.plan = planHost(desired, r.x);
  }
  const outcome = (): HostOutcome[] =>
    all.map((s) => ({ name: s.name, role: s.role, host: s.target.host, problems: s.plan?.problems ?? [], planned: (s.plan?.actions ?? []).map(describeAction), done: s.done, ...(s.error ? { error: s.error } : {}) }));
  const dns = { updates: c.dns.updates, ...(c.dns.updates ? {} : { records: renderDns(c).zoneFragment }) };
  const errors = all.flatMap((s) => (s.plan?.problems ?? []).filter((p) => p.severity === "error").map((p) => `${s.name}: ${p.message}`));
  if (errors.length) {
    return { dryRun: o.dryRun, hosts: outcome(), refused: true, healthy: false, changes: 0, dns, next: ["fix what preflight found (nothing was changed), then run mailha deploy again", ...errors] };
  }
  const planned = all.reduce((n, s) => n + s.plan!.actions.length, 0);
  if (o.dryRun) return { dryRun: true, hosts: outcome(), refused: false, healthy: false, changes: planned, dns, next: planned ? ["run without --dry-run to make these changes"] : ["nothing to change"] };

  // ---- the witness first: the nodes' tie-breaker must be there when they start ----
  const witness = all.find((s) => s.role === "witness");
  if (witness) await runActions(c, o, witness, ["install-package", "write-file", "enable-unit", "start-unit"]);
  // ---- both nodes at once: package, files, volume ----
  await Promise.all(nodes.map((s) => runActions(c, o, s, ["install-package", "write-file", "create-volume", "enable-unit"])));
  // ---- the units, the preferred node first ----
  const ordered = [...nodes].sort((x, y) => Number(y.name === c.cluster.preferred_node) - Number(x.name === c.cluster.preferred_node));
  for (const s of ordered) await runActions(c, o, s, ["start-unit"]);

  // ---- wait for a healthy cluster, showing the initial sync ----
  const deadline = Date.now() + (o.healthTimeoutMs ?? 600_000);
  let healthy = false;
  let last = "";
  let status: (NodeHealth | null)[] = [];
  for (let i = 0; Date.now() < deadline; i++) {
    status = await Promise.all(nodes.map((s) => (s.error ? Promise.resolve(null) : nodeHealth(s))));
    healthy = clusterHealthy(status);
    const line = status.map((h, k) => (h ? `${h.node} ${h.state} ${h.volume}${h.outOfSyncBytes ? ` (${(h.outOfSyncBytes / 1024 ** 2).toFixed(0)} MiB to sync)` : ""}` : `${nodes[k]!.name} not answering`)).join("; ");
    if (line !== last) o.progress("cluster", { status: line });
    last = line;
    if (healthy || nodes.some((s) => s.error)) {
      // With one node failed, the other serving alone is the best there is: wait until it is active.
      if (healthy || status.some((h) => h?.state === "active")) break;
    }
    await new Promise((r) => setTimeout(r, HEALTH_POLL_MS));
  }
  const changes = all.reduce((n, s) => n + s.done.length, 0);
  const failed = all.filter((s) => s.error);
  const next: string[] = [];
  for (const s of failed) next.push(`${s.name} failed: ${s.error}; fix it and run mailha deploy again (it continues from what is there)`);
  if (!healthy && !failed.length) next.push(`the cluster was not healthy within ${Math.round((o.healthTimeoutMs ?? 600_000) / 1000)} s: look at \`mailha status\` and \`journalctl -u ${NODE_UNIT}\` on the nodes`);
  if (healthy) next.push(c.dns.updates ? `DNS: the active node keeps the records on ${c.dns.server} (check them with mailha dns check)` : "DNS: put these records into the zone (mailha dns render prints them again)");
  if (all.some((s) => s.plan?.restartNeeded)) next.push("a running node keeps its old package or config until it restarts: mailha deploy upgrade restarts them one at a time, with a switchover");
  return { dryRun: false, hosts: outcome(), refused: false, healthy, changes, status, dns, next };
}
