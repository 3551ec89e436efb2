// `mailha reconcile [--dry-run]`: after a split brain, merge the changes the victim
// made (read from its preserved copy) into the survivor, the node that kept serving.
// The survivor is the active node (or --node); the copy is the peer's newest one that
// is not reconciled yet, read on the peer over the peer channel (or --copy: a folder on
// this host, read here). Runs on the survivor (its data directory, sockets and IMAP
// port); the node daemon runs it by itself after a heal unless reconcile.auto is off.
import { existsSync } from "node:fs";
import { Command, Option } from "commander";
import { loadConfig, nodeById, peerOf, type MailhaConfig } from "../../common/config.ts";
import { UsageError } from "../../common/errors.ts";
import { nodePaths, nodeStateDir } from "../../common/paths.ts";
import { activeLocalNode, nodeStatus } from "../../cluster/client.ts";
import { listPreserved, markReconciled, volumeContext } from "../../replication/client.ts";
import { readReconcileState } from "../../reconcile/state.ts";
import type { VictimSource } from "../../reconcile/run.ts";
import { callPeer, peerEnds } from "../../common/peer-rpc.ts";
import { createOutput } from "./output.ts";

interface Opts {
  config: string;
  node?: string;
  copy?: string;
  dryRun?: boolean;
  json?: boolean;
}

async function activeNode(c: MailhaConfig): Promise<string> {
  const id = await activeLocalNode(c);
  if (!id) throw new UsageError("no node is active: the survivor must serve while it is reconciled (or say --node)");
  return id;
}

export function reconcileCommand(defaultConfig: string): Command {
  return new Command("reconcile")
    .description("merge the split-brain victim's changes (its preserved copy) into the node that kept serving, through Dovecot; --dry-run prints the plan")
    .addOption(new Option("-c, --config <file>", "cluster configuration file").default(defaultConfig))
    .option("-n, --node <id>", "the survivor (default: the active node)")
    .option("--copy <path>", "the preserved copy to merge (default: the peer's newest one not reconciled)")
    .option("--dry-run", "print the plan (counts per kind and mailbox, every conflict and its rule) and change nothing")
    .option("--json", "print the result as JSON")
    .action(async (o: Opts) => {
      // The merge machinery (BullMQ, IMAP, MariaDB) is loaded only here: `mailha status` imports this module too.
      const [{ formatReport, localCopy, peerCopy, reconcile }, { dovecotPaths }, { mariadbPaths }, { redisPaths }] = await Promise.all([
        import("../../reconcile/run.ts"),
        import("../../services/dovecot.ts"),
        import("../../services/mariadb.ts"),
        import("../../services/redis.ts"),
      ]);
      const c = loadConfig(o.config);
      const out = createOutput(!!o.json);
      const survivor = o.node ?? (await activeNode(c));
      const me = nodeById(c, survivor);
      const peer = peerOf(c, survivor);
      const victimVol = volumeContext(c, peer.id);
      const ends = peerEnds(c, survivor);
      let victim: VictimSource;
      const np = nodePaths(nodeStateDir(c, survivor));
      if (o.copy) {
        // A folder on this host (the lab, or a copy brought here by hand): read it here.
        const copy = o.copy;
        if (!existsSync(copy)) throw new UsageError(`${copy}: no such folder on this host (without --copy the copy is read on node ${peer.id} itself)`);
        victim = localCopy(copy, np.run, async () => {
          // A copy given by path may lie outside the peer's list (moved by hand): nothing to mark.
          await markReconciled(victimVol, copy).catch(() => {});
        });
      } else {
        // The copy lies on the victim's disk: it is read there, over the peer channel.
        const open = (((await callPeer(ends, "preserved-list", {}, { timeoutMs: 10_000 })).result as { path: string }[] | null) ?? []).filter((p) => typeof p?.path === "string");
        if (open.length === 0) {
          out.result({ copy: null, says: "nothing to reconcile" }, () => `node ${peer.id} has no preserved copy that is not reconciled: nothing to do`);
          return;
        }
        victim = peerCopy(ends, open[open.length - 1]!.path);
      }
      const r = await reconcile({
        victim,
        survivor: {
          node: survivor,
          data: np.data,
          run: np.run,
          mariadbSocket: mariadbPaths(np).socket,
          redisSocket: redisPaths(np).socket,
          dovecotConf: dovecotPaths(np).conf,
          imapHost: me.service_address,
          imapPort: 143,
        },
        postmaster: `postmaster@${c.mail.domains[0]}`,
        dryRun: !!o.dryRun,
        onProgress: (step, detail) => out.progress(step, detail),
      });
      const complete = r.plan.report.complete && r.notApplied.length === 0;
      out.result({ ...r, plan: o.json ? r.plan : undefined, complete }, () => formatReport(r));
      if (!complete && !r.dryRun) process.exitCode = 1;
    });
}

export interface ReconcilePending {
  /** Preserved copies not reconciled yet: on volumes that answer here, and as the active node heard from its peer. */
  readonly copies: { readonly node: string; readonly path: string }[];
  /** A run in progress, or one that left operations not applied. */
  readonly runs: { readonly node: string; readonly status: string; readonly applied: number; readonly total: number }[];
  /** Per node whose daemon answers: automatic reconcile on, and what it waits for the operator on. */
  readonly auto: { readonly node: string; readonly enabled: boolean; readonly waiting: { copy: string; says: string } | null }[];
}

interface NodeReconcileView {
  readonly auto?: boolean;
  readonly waiting?: { copy: string; says: string } | null;
  readonly peerCopies?: string[] | null;
}

/** What `failback` refuses on and `mailha status` shows: reconciliation not done yet. */
export async function reconcilePending(c: MailhaConfig): Promise<ReconcilePending> {
  const copies: ReconcilePending["copies"][number][] = [];
  const runs: ReconcilePending["runs"][number][] = [];
  const auto: ReconcilePending["auto"][number][] = [];
  const seen = new Set<string>();
  const addCopy = (node: string, path: string) => {
    if (seen.has(path)) return;
    seen.add(path);
    copies.push({ node, path });
  };
  const reconciled = new Set<string>();
  for (const n of c.nodes) {
    const list = await listPreserved(volumeContext(c, n.id)).catch(() => []);
    for (const p of list) if (!p.reconciledAtMs) addCopy(n.id, p.path);
    for (const p of list) if (p.reconciledAtMs) reconciled.add(p.path);
    const st = readReconcileState(nodePaths(nodeStateDir(c, n.id)).run);
    if (st && st.status !== "done") {
      let alive = st.status === "incomplete";
      try {
        process.kill(st.pid, 0);
        alive = true;
      } catch {
        // the run is gone: planning/running left behind means interrupted
      }
      runs.push({ node: n.id, status: alive ? st.status : "interrupted", applied: st.applied, total: st.total });
    }
  }
  for (const n of c.nodes) {
    const r = ((await nodeStatus(c, n.id, 2000).catch(() => null)) as { reconcile?: NodeReconcileView } | null)?.reconcile;
    if (!r) continue;
    auto.push({ node: n.id, enabled: r.auto === true, waiting: r.waiting ?? null });
    // What the node last heard from its peer, unless the copy's own record (here) says merged.
    for (const p of r.peerCopies ?? []) if (!reconciled.has(p)) addCopy(peerOf(c, n.id).id, p);
  }
  return { copies, runs, auto };
}

export function describePending(p: ReconcilePending): string[] {
  const out: string[] = [];
  for (const r of p.runs) out.push(`reconcile on ${r.node}: ${r.status} (${r.applied} of ${r.total} applied)${r.status === "running" || r.status === "planning" ? "" : "; run: mailha reconcile"}`);
  for (const x of p.copies) {
    const waits = p.auto.find((a) => a.waiting?.copy === x.path);
    const merger = p.auto.find((a) => a.node !== x.node && a.enabled);
    const off = p.auto.find((a) => a.node !== x.node && !a.enabled);
    if (waits) out.push(`split-brain copy of ${x.node} not reconciled: ${x.path}; ${waits.waiting!.says}`);
    else if (off) out.push(`split-brain copy of ${x.node} not reconciled: ${x.path}; reconcile.auto is off: look with \`mailha reconcile --dry-run\`, then run \`mailha reconcile\``);
    else if (merger) out.push(`split-brain copy of ${x.node} not reconciled yet: ${x.path}; the active node merges it by itself (reconcile.auto)`);
    else out.push(`split-brain copy of ${x.node} not reconciled: ${x.path}; run: mailha reconcile (or look first: mailha reconcile --dry-run)`);
  }
  return out;
}
