// `mailha reconcile [--dry-run]`: after a split brain, merge the changes the victim
// made (read from its preserved copy) into the survivor, the node that kept serving.
// The survivor is the active node (or --node); the copy is the peer's newest one that
// is not reconciled yet (or --copy). Run where both are reachable: the survivor's data
// directory, sockets and IMAP port, and the copy's folder (in the lab, on the host).
import { Command, Option } from "commander";
import { loadConfig, nodeById, peerOf, type MailhaConfig } from "../../common/config.ts";
import { UsageError } from "../../common/errors.ts";
import { nodePaths, nodeStateDir } from "../../common/paths.ts";
import { nodeStatus } from "../../cluster/client.ts";
import { listPreserved, markReconciled, volumeContext } from "../../replication/client.ts";
import { dovecotPaths } from "../../services/dovecot.ts";
import { mariadbPaths } from "../../services/mariadb.ts";
import { redisPaths } from "../../services/redis.ts";
import { formatReport, readReconcileState, reconcile } from "../../reconcile/run.ts";
import { createOutput } from "./output.ts";

interface Opts {
  config: string;
  node?: string;
  copy?: string;
  dryRun?: boolean;
  json?: boolean;
}

async function activeNode(c: MailhaConfig): Promise<string> {
  for (const n of c.nodes) {
    const s = await nodeStatus(c, n.id, 2000).catch(() => null);
    if (s?.state === "active") return n.id;
  }
  throw new UsageError("no node is active: the survivor must serve while it is reconciled (or say --node)");
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
      const c = loadConfig(o.config);
      const out = createOutput(!!o.json);
      const survivor = o.node ?? (await activeNode(c));
      const me = nodeById(c, survivor);
      const peer = peerOf(c, survivor);
      const victimVol = volumeContext(c, peer.id);
      let copy = o.copy;
      if (!copy) {
        const open = (await listPreserved(victimVol)).filter((p) => !p.reconciledAtMs);
        if (open.length === 0) {
          out.result({ copy: null, says: "nothing to reconcile" }, () => `node ${peer.id} has no preserved copy that is not reconciled: nothing to do`);
          return;
        }
        copy = open[open.length - 1]!.path;
      }
      const np = nodePaths(nodeStateDir(c, survivor));
      const r = await reconcile({
        copy,
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
      if (!r.dryRun && complete) {
        try {
          await markReconciled(victimVol, copy);
        } catch (err) {
          // A copy given by path may lie outside the peer's list (moved by hand): nothing to mark.
          if (!o.copy) throw err;
        }
      }
      out.result({ ...r, plan: o.json ? r.plan : undefined, complete }, () => formatReport(r));
      if (!complete && !r.dryRun) process.exitCode = 1;
    });
}

export interface ReconcilePending {
  /** Preserved copies not reconciled yet, per node whose volume answers here. */
  readonly copies: { readonly node: string; readonly path: string }[];
  /** A run in progress, or one that left operations not applied. */
  readonly runs: { readonly node: string; readonly status: string; readonly applied: number; readonly total: number }[];
}

/** What `failback` refuses on and `mailha status` shows: reconciliation not done yet. */
export async function reconcilePending(c: MailhaConfig): Promise<ReconcilePending> {
  const copies: ReconcilePending["copies"][number][] = [];
  const runs: ReconcilePending["runs"][number][] = [];
  for (const n of c.nodes) {
    const list = await listPreserved(volumeContext(c, n.id)).catch(() => []);
    for (const p of list) if (!p.reconciledAtMs) copies.push({ node: n.id, path: p.path });
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
  return { copies, runs };
}

export function describePending(p: ReconcilePending): string[] {
  const out: string[] = [];
  for (const r of p.runs) out.push(`reconcile on ${r.node}: ${r.status} (${r.applied} of ${r.total} applied)${r.status === "running" || r.status === "planning" ? "" : "; run: mailha reconcile"}`);
  for (const x of p.copies) out.push(`split-brain copy of ${x.node} not reconciled: ${x.path}; run: mailha reconcile (or look first: mailha reconcile --dry-run)`);
  return out;
}
