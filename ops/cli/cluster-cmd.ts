// Cluster commands: `mailha node run|start|stop`, `mailha witness run`, `mailha status
// [--watch]`, and the operator's moves: standby, online, takeover, switchover, failback.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { Command, Option } from "commander";
import { loadConfig, type MailhaConfig } from "../../common/config.ts";
import { daemonRecordProblem, findRunningDaemon, startDaemon, stopDaemon, isAlive, type DaemonRecord } from "../../common/daemon.ts";
import { DamagedStateFileError, readJsonState, writeFileDurable } from "../../common/fsutil.ts";
import { EXIT_FAILURE, UsageError } from "../../common/errors.ts";
import { runUntilSignalled } from "../../common/lifecycle.ts";
import { sleep } from "../../common/exec.ts";
import { nodeStateDir } from "../../common/paths.ts";
import { localNodes, nodeCommand, nodeSpec, nodeStatus, witnessReadyFile, type NodeStatusView } from "../../cluster/client.ts";
import { resolveNode } from "../../replication/client.ts";
import { describePending, reconcilePending, type ReconcilePending } from "./reconcile-cmd.ts";
import { createOutput, formatBytes, table, type Output } from "./output.ts";

const configOpt = (def: string) => new Option("-c, --config <file>", "cluster configuration file").default(def);
const nodeOpt = () => new Option("-n, --node <id>", "the node (default: the node whose address is local)");
const jsonOpt = () => new Option("--json", "print the result as JSON");

function recordFile(c: MailhaConfig, id: string): string {
  return join(nodeStateDir(c, id), "run", "node-daemon.json");
}

/** The node daemon's record; a damaged one is rebuilt from the daemon found running with this node's arguments (or dropped). */
function readNodeRecord(c: MailhaConfig, id: string): DaemonRecord | null {
  try {
    return readJsonState<DaemonRecord>(recordFile(c, id), daemonRecordProblem, "rebuilt from the running node daemon");
  } catch (err) {
    if (!(err instanceof DamagedStateFileError)) throw err;
    const found = findRunningDaemon(nodeSpec(c, id));
    process.stderr.write(`mailha: warning: ${err.file} was damaged (${err.problem}); ${found ? `the node daemon runs as pid ${found.pid}` : "no node daemon of this node runs"}\n`);
    return found;
  }
}

export function nodeCommandGroup(defaultConfig: string): Command {
  const node = new Command("node").description("the node daemon: heartbeats, quorum, fencing, the resource group");
  node
    .command("run")
    .description("run the node daemon in the foreground")
    .addOption(configOpt(defaultConfig))
    .addOption(nodeOpt())
    .action(async (o: { config: string; node?: string }) => {
      const c = loadConfig(o.config);
      const { runNode } = await import("../../cluster/node.ts");
      await runNode({ config: c, nodeId: resolveNode(c, o.node) });
    });
  node
    .command("start")
    .description("start the node daemon in the background (its own session; in the lab, in the node's namespace)")
    .addOption(configOpt(defaultConfig))
    .addOption(nodeOpt())
    .addOption(jsonOpt())
    .action(async (o: { config: string; node?: string; json?: boolean }) => {
      const c = loadConfig(o.config);
      const id = resolveNode(c, o.node);
      const rec = await startDaemon(nodeSpec(c, id));
      mkdirSync(dirname(recordFile(c, id)), { recursive: true });
      writeFileDurable(recordFile(c, id), JSON.stringify(rec));
      createOutput(!!o.json).result({ pid: rec.pid }, () => `node daemon of ${id} started (pid ${rec.pid})`);
    });
  node
    .command("stop")
    .description("stop the node daemon: the group is stopped first if it runs here")
    .addOption(configOpt(defaultConfig))
    .addOption(nodeOpt())
    .addOption(jsonOpt())
    .action(async (o: { config: string; node?: string; json?: boolean }) => {
      const c = loadConfig(o.config);
      const id = resolveNode(c, o.node);
      const rec = readNodeRecord(c, id);
      const outcome = rec && isAlive(rec) ? await stopDaemon(rec) : "absent";
      createOutput(!!o.json).result({ outcome }, () => `node daemon of ${id}: ${outcome}`);
    });
  return node;
}

export function witnessCommand(defaultConfig: string): Command {
  const w = new Command("witness").description("the tie-breaker for two nodes, run on a third host");
  w.command("run")
    .description("grant the witness lease to at most one node at a time (UDP, authenticated with the heartbeat key)")
    .addOption(configOpt(defaultConfig))
    .action(async (o: { config: string }) => {
      const c = loadConfig(o.config);
      if (!c.quorum.witness) throw new UsageError(`${c.file} has no quorum.witness`);
      const key = Buffer.from(readFileSync(c.heartbeat.key_file, "utf8").trim());
      const { runWitness } = await import("../../cluster/witness.ts");
      const server = await runWitness({
        host: c.quorum.witness.address,
        port: c.quorum.witness.port,
        key,
        cluster: c.cluster.name,
        leaseMs: c.quorum.witness.lease_ms,
        nodes: c.nodes.map((n) => n.id),
        onEvent: (ev) => process.stdout.write(JSON.stringify({ time: new Date().toISOString(), role: "witness", ...ev }) + "\n"),
      });
      const ready = witnessReadyFile(c);
      mkdirSync(dirname(ready), { recursive: true });
      writeFileSync(ready, `${process.pid}\n`);
      process.stdout.write(JSON.stringify({ time: new Date().toISOString(), role: "witness", type: "listening", address: c.quorum.witness.address, port: c.quorum.witness.port }) + "\n");
      await runUntilSignalled(() => server.close());
    });
  return w;
}

function describe(s: NodeStatusView): string[] {
  const links = Object.entries(s.links).map(([l, x]) => `${l} ${x}`).join(", ");
  const v = s.volume ? `${s.volume.role} ${s.volume.connection} ${s.volume.disk}/${s.volume.peer.disk}${s.volume.outOfSyncBytes ? ` (${formatBytes(s.volume.outOfSyncBytes)} out of sync)` : ""}` : "?";
  const running = Object.entries(s.resources).filter(([, x]) => x !== "stopped");
  const res = running.length ? running.map(([r, x]) => (x === "running" ? r : `${r}:${x}`)).join(" ") : "-";
  return [s.node, s.state, s.peer.state, links, s.quorum ? "yes" : "NO", v, res];
}

async function gather(c: MailhaConfig, only?: string): Promise<{ nodes: (NodeStatusView | { node: string; error: string })[] }> {
  const ids = only ? [only] : localNodes(c);
  if (ids.length === 0) throw new Error(`no node daemon answers here (no control socket under ${nodeStateDir(c, c.nodes[0]!.id)}); is \`mailha node start\` running?`);
  const nodes = await Promise.all(ids.map((id) => nodeStatus(c, id).catch((err: Error) => ({ node: id, error: err.message }))));
  return { nodes };
}

function render(c: MailhaConfig, st: { nodes: (NodeStatusView | { node: string; error: string })[]; pending?: ReconcilePending }): string {
  const rows: string[][] = [["node", "state", "peer", "links", "quorum", "volume (role conn disk/peer)", "resources"]];
  const extra: string[] = [];
  for (const n of st.nodes) {
    if ("error" in n) {
      rows.push([n.node, "UNREACHABLE", "", "", "", "", n.error]);
      continue;
    }
    rows.push(describe(n));
    // A node that waits for the operator says why, and what clears it.
    if (n.state === "failed" || n.state === "stop-failed" || n.state === "standby")
      extra.push(`${n.node}: ${n.state}${n.stateReason ? `: ${n.stateReason}` : ""} (clear with: mailha online --node ${n.node})`);
    const h = n.heartbeats;
    extra.push(`${n.node}: heartbeats accepted ${h.accepted}, dropped: forged ${h.forged}, foreign ${h.foreign}, replayed ${h.replayed}, stale ${h.stale}${n.witness ? `; witness lease ${n.witness.held ? `held (${n.witness.expiresInMs} ms left)` : "not held"}` : ""}${n.ping ? `; ping targets ${n.ping.ok ? "reachable" : "UNREACHABLE"}` : ""}`);
  }
  if (st.pending) extra.push(...describePending(st.pending));
  return [`cluster ${c.cluster.name} (preferred node ${c.cluster.preferred_node}, auto_failback ${c.cluster.auto_failback ? "on" : "off"})`, table(rows), ...extra].join("\n");
}

export function statusCommand(defaultConfig: string): Command {
  return new Command("status")
    .description("both nodes, links, quorum, roles, the volume and each resource")
    .addOption(configOpt(defaultConfig))
    .addOption(new Option("-n, --node <id>", "ask only this node"))
    .option("--watch", "refresh every second until interrupted")
    .addOption(jsonOpt())
    .action(async (o: { config: string; node?: string; watch?: boolean; json?: boolean }) => {
      const c = loadConfig(o.config);
      const out = createOutput(!!o.json);
      for (;;) {
        // Both ask the same daemons: at once, not one after the other.
        const [nodes, pending] = await Promise.all([gather(c, o.node), reconcilePending(c)]);
        const st = { ...nodes, pending };
        if (o.watch && !o.json) process.stdout.write("\x1b[2J\x1b[H");
        if (o.json && o.watch) process.stdout.write(JSON.stringify({ time: new Date().toISOString(), ...st }) + "\n");
        else out.result(st, () => render(c, st));
        if (!o.watch) {
          if (st.nodes.some((n) => "error" in n)) process.exitCode = EXIT_FAILURE;
          return;
        }
        await sleep(1000);
      }
    });
}

/** How long a move waits for the node that takes the group to be active. */
const MOVE_WAIT_MS = 120_000;
const MOVE_POLL_MS = 200;

/**
 * TARGET's cluster state: from its own daemon when it runs on this machine (the lab),
 * else as the local node last heard it in the peer's heartbeats.
 */
async function stateOf(c: MailhaConfig, target: string): Promise<string> {
  const local = localNodes(c);
  if (local.includes(target)) return (await nodeStatus(c, target).catch(() => null))?.state ?? "not answering";
  for (const id of local) {
    const n = await nodeStatus(c, id).catch(() => null);
    if (n?.peer.node === target) return n.peer.summary?.state ?? `unknown (peer ${n.peer.state})`;
  }
  return "not answering";
}

/**
 * Waits until TARGET is active; resolves with the seconds it took. Fails at once when
 * TARGET reports `failed`, and after MOVE_WAIT_MS with its last state.
 */
async function waitActive(c: MailhaConfig, target: string, out: Output): Promise<number> {
  const t0 = Date.now();
  let last = "unknown";
  while (Date.now() - t0 < MOVE_WAIT_MS) {
    const state = await stateOf(c, target);
    if (state !== last) out.progress("waiting", { node: target, state });
    last = state;
    if (state === "active") return (Date.now() - t0) / 1000;
    if (state === "failed") throw new Error(`${target} failed to start the group; see \`mailha status\` and its cluster events`);
    await sleep(MOVE_POLL_MS);
  }
  throw new Error(`${target} is not active after ${MOVE_WAIT_MS / 1000} s (state ${last}); see \`mailha status\``);
}

/** standby, online, takeover, switchover, failback. */
export function moveCommands(defaultConfig: string): Command[] {
  const mk = (name: string, desc: string, where: "given" | "active") => {
    const cmd = new Command(name).description(desc).addOption(configOpt(defaultConfig)).addOption(nodeOpt()).addOption(jsonOpt());
    if (name === "takeover") cmd.option("--force", "take over even without quorum (you know the peer is down)");
    // These move the group: the command returns once the node that takes it is active.
    const moves = name === "takeover" || name === "switchover" || name === "failback";
    if (moves) cmd.option("--no-wait", "return once the command is accepted, without waiting for the group to run");
    return cmd.action(async (o: { config: string; node?: string; json?: boolean; force?: boolean; wait?: boolean }) => {
      const c = loadConfig(o.config);
      const out = createOutput(!!o.json);
      let id: string;
      if (where === "active" && !o.node) {
        const st = await gather(c);
        const active = st.nodes.find((n) => !("error" in n) && n.state === "active");
        if (!active) throw new Error("no active node answers here; say --node");
        id = active.node;
      } else id = resolveNode(c, o.node);
      if (name === "failback") {
        // A failback would serve the preferred node's data before the victim's changes are merged.
        const pending = describePending(await reconcilePending(c));
        if (pending.length) throw new Error(`failback refused while a reconcile is pending or running:\n  ${pending.join("\n  ")}`);
      }
      const r = await nodeCommand(c, id, name, !!o.force);
      if (!moves || o.wait === false) return out.result({ node: id, ...(r as object) }, () => `${name} on ${id}: done (${JSON.stringify(r)})`);
      // takeover: this node takes the group; switchover, failback: the active node hands it over.
      const target = name === "takeover" ? id : c.nodes.find((n) => n.id !== id)!.id;
      const seconds = await waitActive(c, target, out);
      out.result({ node: id, ...(r as object), active: target, seconds }, () => `${name} on ${id}: done; ${target} is active after ${seconds.toFixed(1)} s`);
    });
  };
  return [
    mk("standby", "stop the group on this node (it moves to the peer) and do not take it back until `online`", "given"),
    mk("online", "leave standby or a failed state; a node after a failed stop stops its services again first", "given"),
    mk("takeover", "make this node active: agreed with the peer if it is up, else only with quorum (or --force)", "given"),
    mk("switchover", "planned move: the active node stops its group (reverse order) and demotes; the peer promotes and starts", "active"),
    mk("failback", "a switchover back to the preferred node; refused until the volume is in sync", "active"),
  ];
}
