// One failover trial: wait for a healthy cluster, start the clients (SMTP sender, IMAP
// sessions, a POP3 reader), inject the fault on the active node after a while, keep
// the traffic going, undo the fault and bring every node back, wait for the volume to
// be in sync and the backup MX spools to drain, then count what the users would:
// acknowledged messages found by their unique id (none may be lost or there twice),
// \Seen flags the server acknowledged and then forgot, UIDVALIDITY and the UIDs of
// older messages (which must not change), the outage each protocol saw, and
// detection and takeover from the cluster event logs.
import { randomBytes } from "node:crypto";
import type { MailhaConfig } from "../../common/config.ts";
import { sleep } from "../../common/exec.ts";
import { nodeCommand } from "../../cluster/client.ts";
import { labFault } from "../lab/faults.ts";
import { clusterEvents, clusterView, healthy, type ClusterEvent } from "./cluster-view.ts";
import { faultPlan, splitAcks, type FaultOptions, type FaultStepRecord, type ReconcileSummary } from "./faults.ts";
import { imapSnapshot } from "./snapshot.ts";
import { longest, outages, Recorder, type OpRecord, type Window } from "./record.ts";
import { finder } from "./resolve.ts";
import { ImapWatcher, Pop3Reader, SmtpSender, type Mailbox, type WorkloadContext } from "./workloads.ts";

export interface TrialOptions {
  readonly config: MailhaConfig;
  readonly configFile: string;
  readonly fault: string;
  readonly faultOptions: FaultOptions;
  readonly faultAfterMs: number;
  readonly durationMs: number;
  readonly smtpEveryMs: number;
  readonly imapSessions: number;
  /** Pause between an IMAP session's rounds (NOOP, fetch new, flag) and between POP3 sessions. */
  readonly imapEveryMs?: number;
  readonly pop3EveryMs?: number;
  readonly imap: Mailbox;
  /** The POP3 reader's mailbox (its mail is deleted); null: no POP3 workload. */
  readonly pop3: Mailbox | null;
  readonly dnsServer: string | null;
  readonly progress?: (p: TrialProgress) => void;
  readonly say?: (line: string) => void;
}

export interface TrialProgress {
  readonly phase: "traffic" | "recovering" | "checking";
  readonly elapsedMs: number;
  readonly durationMs: number;
  readonly sent: number;
  readonly acked: number;
  readonly imap: { ops: number; failures: number };
  readonly pop3: { ops: number; failures: number };
  readonly fault: string | null;
}

export interface ProtoFigures {
  readonly ops: number;
  readonly failures: number;
  readonly outageMs: number;
  readonly outages: readonly Window[];
}

export interface TrialResult {
  readonly fault: string;
  readonly description: string;
  readonly target: string | null;
  readonly faultDetail: string | null;
  readonly startedAt: number;
  readonly faultAt: number | null;
  readonly trafficEndAt: number;
  readonly detectionMs: number | null;
  readonly takeoverMs: number | null;
  readonly activeAfter: string | null;
  readonly smtp: ProtoFigures & { sent: number; acked: number; found: number; lost: string[]; duplicated: string[] };
  readonly imap: ProtoFigures & { flagsSet: number; flagsLost: number; uidValidityStable: boolean; oldUidsStable: boolean };
  readonly pop3: (ProtoFigures & { acked: number; retrieved: number; lost: string[]; duplicated: string[] }) | null;
  /** split-brain only: the two sides, what each acknowledged while apart, the steps and the reconcile. */
  readonly splitBrain?: { readonly old: string | null; readonly new: string | null; readonly ackedByOld: number; readonly ackedByNew: number; readonly steps: readonly FaultStepRecord[]; readonly reconcile: ReconcileSummary | null } | null;
  readonly healthyAfter: boolean;
  readonly notes: string[];
  readonly ok: boolean;
  readonly timeline: { readonly ops: readonly OpRecord[]; readonly events: readonly ClusterEvent[]; readonly initialStates: Readonly<Record<string, string>> };
}

const HEALTHY_WAIT_MS = 180_000;
const DRAIN_WAIT_MS = 30_000;

async function waitHealthy(c: MailhaConfig, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (healthy(await clusterView(c))) return true;
    await sleep(500);
  }
  return false;
}

async function activeNode(c: MailhaConfig): Promise<string | null> {
  return (await clusterView(c)).find((n) => n.state === "active")?.id ?? null;
}

/** Detection: the first sign of trouble a node logged after the fault; takeover: service back. */
function timings(fault: string, faultAt: number, events: readonly ClusterEvent[], service: string): { detectionMs: number | null; takeoverMs: number | null } {
  const after = events.filter((e) => e.time >= faultAt);
  const planned = fault === "switchover" || fault === "failback";
  const detect = planned
    ? undefined
    : after.find((e) => (e.type === "peer" && e.state === "dead") || e.type === "monitor-failed" || (e.type === "link" && e.state === "down") || e.type === "self-fence" || e.type === "quorum-lost");
  const back =
    fault === "kill-service"
      ? after.find((e) => e.type === "resource" && e.resource === service && e.state === "running")
      : fault === "cut-replication"
        ? undefined
        : after.find((e) => e.type === "state" && e.state === "active");
  return { detectionMs: detect ? detect.time - faultAt : null, takeoverMs: back ? back.time - faultAt : null };
}

export async function runTrial(o: TrialOptions): Promise<TrialResult> {
  const c = o.config;
  const say = o.say ?? (() => {});
  const notes: string[] = [];
  const plan = faultPlan(c, o.configFile, o.fault, o.faultOptions, (line) => say(`split-brain: ${line}`));
  if (!(await waitHealthy(c, 60_000))) throw new Error("the cluster is not healthy (one active node, both up, volume in sync): a trial needs a healthy start; see mailha status");
  if (o.fault === "failback") {
    const active = await activeNode(c);
    if (active === c.cluster.preferred_node) {
      say(`failback needs the group away from ${active}: switching over first`);
      await nodeCommand(c, active, "switchover");
      if (!(await waitHealthy(c, 120_000))) throw new Error("the preparatory switchover did not end in a healthy cluster");
    }
  }
  const find = finder(c, o.dnsServer);
  const before = await imapSnapshot(find, o.imap);
  const rec = new Recorder();
  let stop = false;
  const ctx: WorkloadContext = { rec, find, stopped: () => stop, run: randomBytes(4).toString("hex") };
  const recipients = o.pop3 ? [o.imap.address, o.pop3.address] : [o.imap.address];
  const sender = new SmtpSender(ctx, { everyMs: o.smtpEveryMs, recipients, pop3Share: 3 });
  const watchers = Array.from({ length: o.imapSessions }, (_, i) => new ImapWatcher(ctx, { ...o.imap, port: i % 2 === 0 ? 143 : 993, pollMs: o.imapEveryMs ?? 300 }));
  const reader = o.pop3 ? new Pop3Reader(ctx, { ...o.pop3, pauseMs: o.pop3EveryMs ?? 500 }) : null;
  const initialStates = Object.fromEntries((await clusterView(c)).map((n) => [n.id, n.state ?? "down"]));
  const startedAt = Date.now();
  let phase: TrialProgress["phase"] = "traffic";
  let faultLabel: string | null = null;
  const tick = () =>
    o.progress?.({ phase, elapsedMs: Date.now() - startedAt, durationMs: o.durationMs, sent: sender.sent.length, acked: sender.acked.size, imap: rec.count("imap"), pop3: rec.count("pop3"), fault: faultLabel });
  const ticker = setInterval(tick, 500);
  const loops = [sender.run(), ...watchers.map((w) => w.run()), ...(reader ? [reader.run()] : [])];

  let target: string | null = null;
  let faultAt: number | null = null;
  let faultDetail: string | null = null;
  try {
    await sleep(o.faultAfterMs);
    target = await activeNode(c);
    if (o.fault !== "none") {
      if (!target) notes.push("no active node when the fault was due: not injected");
      else {
        say(`injecting ${o.fault} on node ${target}`);
        faultAt = Date.now();
        faultLabel = `${o.fault} on ${target}`;
        try {
          faultDetail = await plan.inject(target);
        } catch (err) {
          notes.push(`the fault could not be injected: ${(err as Error).message}`);
        }
      }
    }
    await sleep(Math.max(0, o.durationMs - (Date.now() - startedAt)));
  } finally {
    stop = true;
    await Promise.all(loops);
  }
  const trafficEndAt = Date.now();

  // Recovery: undo the fault, bring back any node that is down (killed by the fault,
  // or fenced by its peer), let the volume resync and the backup MX spools drain.
  phase = "recovering";
  await plan.recover().catch((err: Error) => notes.push(`recover: ${err.message}`));
  if (c.lab) {
    for (const n of await clusterView(c)) {
      if (n.state !== null) continue;
      say(`node ${n.id} is down: booting it`);
      notes.push(`node ${n.id} was down after the fault and was booted`);
      await labFault(o.configFile, "boot-node", [n.id]).catch((err: Error) => notes.push(`boot-node ${n.id}: ${err.message}`));
    }
  }
  // A node that gave the group up after repeated failures (or refused a takeover)
  // waits in `failed` for the operator's cleanup: do it, as the operator would.
  for (let i = 0; i < 30; i++) {
    const failed = (await clusterView(c)).filter((n) => n.state === "failed");
    if (failed.length === 0) break;
    for (const n of failed) {
      say(`node ${n.id} is failed: mailha online`);
      if (!notes.some((x) => x.startsWith(`node ${n.id} was failed`))) notes.push(`node ${n.id} was failed after the fault; cleared with \`mailha online\``);
      await nodeCommand(c, n.id, "online", false, 10_000).catch(() => {});
    }
    await sleep(1000);
  }
  say("waiting for the cluster to be healthy again");
  const healthyAfter = await waitHealthy(c, HEALTHY_WAIT_MS);
  if (!healthyAfter) notes.push(`the cluster was not healthy ${HEALTHY_WAIT_MS / 1000} s after the fault was undone`);

  phase = "checking";
  const imapAcked = [...sender.acked].filter(([, to]) => to === o.imap.address).map(([id]) => id);
  let after = await imapSnapshot(find, o.imap);
  for (const deadline = Date.now() + DRAIN_WAIT_MS; imapAcked.some((id) => !after.ids.has(id)) && Date.now() < deadline; ) {
    await sleep(1000);
    after = await imapSnapshot(find, o.imap);
  }
  if (reader && !(await reader.drain())) notes.push("the POP3 mailbox could not be emptied after the trial");
  clearInterval(ticker);
  tick();

  const lost = imapAcked.filter((id) => !after.ids.has(id));
  const duplicated = [...after.ids].filter(([id, uids]) => id.startsWith(ctx.run) && uids.length > 1).map(([id]) => id);
  // This trial's messages are followed by their id (after a split brain a UID may name
  // another message on the other side, and the merge gives the victim's new mail new
  // UIDs); the mailbox's older messages by their UID, which must not change.
  const flaggedIds = new Set(watchers.flatMap((w) => [...w.flaggedIds]).filter((id) => id.startsWith(`${ctx.run}-`)));
  const flaggedOld = new Set(watchers.flatMap((w) => [...w.flagged]).filter((u) => before.uids.has(u)));
  const flagsLost =
    [...flaggedIds].filter((id) => after.ids.has(id) && !after.ids.get(id)!.some((u) => after.seen.has(u))).length + [...flaggedOld].filter((u) => after.uids.has(u) && !after.seen.has(u)).length;
  const oldUidsStable = [...before.uids].every((u) => after.uids.has(u));
  const uidValidityStable = before.uidValidity === after.uidValidity && watchers.every((w) => w.uidValidityChanges === 0);
  const events = clusterEvents(c, startedAt - 1000);
  const t = faultAt ? timings(o.fault, faultAt, events, o.faultOptions.service) : { detectionMs: null, takeoverMs: null };
  const fig = (p: "smtp" | "imap" | "pop3"): ProtoFigures => {
    const ws = outages(rec.ops, p, trafficEndAt);
    return { ...rec.count(p), outageMs: longest(ws), outages: ws };
  };
  let pop3: TrialResult["pop3"] = null;
  if (reader && o.pop3) {
    const popAcked = [...sender.acked].filter(([, to]) => to === o.pop3!.address).map(([id]) => id);
    pop3 = {
      ...fig("pop3"),
      acked: popAcked.length,
      retrieved: popAcked.filter((id) => reader.retrieved.has(id)).length,
      lost: popAcked.filter((id) => !reader.retrieved.has(id)),
      duplicated: [...reader.retrieved].filter(([, uidls]) => uidls.size > 1).map(([id]) => id),
    };
  }
  const smtp = { ...fig("smtp"), sent: sender.sent.length, acked: sender.acked.size, found: imapAcked.length - lost.length + (pop3?.retrieved ?? 0), lost: [...lost, ...(pop3?.lost ?? [])], duplicated: [...duplicated, ...(pop3?.duplicated ?? [])] };
  // Nothing acknowledged may be there twice either (a client that resends after a lost 250 makes one).
  if (smtp.duplicated.length) notes.push(`${smtp.duplicated.length} acknowledged message(s) are there twice: ${smtp.duplicated.slice(0, 5).join(", ")}`);
  const imap = { ...fig("imap"), flagsSet: flaggedIds.size + flaggedOld.size, flagsLost, uidValidityStable, oldUidsStable };
  let splitBrain: NonNullable<TrialResult["splitBrain"]> | null = null;
  if (plan.splitBrain) {
    const sb = plan.splitBrain;
    const addr = (id: string | null) => c.nodes.find((n) => n.id === id)?.service_address ?? "";
    const acks = splitAcks(sb.log, sender.ackedBy.values(), addr(sb.old), addr(sb.new));
    splitBrain = { old: sb.old, new: sb.new, ackedByOld: acks.byOld, ackedByNew: acks.byNew, steps: [...sb.log], reconcile: sb.reconcile };
    const regressions = watchers.reduce((n, w) => n + w.uidNextRegressions, 0);
    if (regressions) notes.push(`IMAP sessions saw UIDNEXT go back ${regressions} time(s) after the forced takeover (the survivor gave out again UIDs the victim had given) and looked at the whole mailbox again`);
    if (!sb.reconcile) notes.push("the split brain was not reconciled (a step failed before `mailha reconcile`)");
  }
  if (rec.dropped) notes.push(`${rec.dropped} client records beyond the bound were counted but not kept`);
  return {
    fault: o.fault,
    description: plan.description,
    target,
    faultDetail,
    startedAt,
    faultAt,
    trafficEndAt,
    ...t,
    activeAfter: await activeNode(c),
    smtp,
    imap,
    pop3,
    splitBrain,
    healthyAfter,
    notes,
    ok: smtp.lost.length === 0 && smtp.duplicated.length === 0 && uidValidityStable && oldUidsStable && healthyAfter && (!splitBrain || !!splitBrain.reconcile?.complete),
    timeline: { ops: rec.ops, events, initialStates },
  };
}
