// One reconciliation, end to end: mount the victim's preserved copy read-only, read
// both sides (reconcile/sides.ts), plan the merge (reconcile/rules.ts), and unless it is
// a dry run, put the plan's operations into the BullMQ `reconcile` queue on the
// survivor's Redis (job id = operation id) and let a worker apply them in order through
// Dovecot and the account store (reconcile/apply.ts), with progress; then write the
// report and, when everything applied, mark the copy reconciled.
//
// Re-running is safe and is how an interrupted run finishes: the plan is made again
// from both sides' current state, so what was applied is not planned again; every
// operation is idempotent besides. The queue holds one run's operations: a run starts
// by emptying it (no worker of an earlier run is alive then: the run holds the lock
// file `<survivor run>/reconcile.lock`).
// Bounds: one worker, one job at a time (the order matters); a job is tried
// JOB_ATTEMPTS times; the wait for the queue has a deadline per job.
import { mkdirSync, openSync, closeSync, readFileSync, rmSync, statSync, unlinkSync, writeFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { Queue, Worker, type Job } from "bullmq";
import { writeFileDurable } from "../common/fsutil.ts";
import { reconcileStateFile, type ReconcileState } from "./state.ts";
import type { Connection } from "mysql2/promise";
import { callPeer, type PeerEnds } from "../common/peer-rpc.ts";
import { mountPreservedCopy, unmountStale, type PreservedView } from "../replication/filesystem.ts";
import type { JournalEntry } from "../services/journal/changes.ts";
import { connectMariadb } from "../services/mariadb.ts";
import { redisConnection } from "../services/redis.ts";
import { closeAccountJournals } from "../services/journal/accounts.ts";
import { Applier, type ApplyOutcome } from "./apply.ts";
import type { Operation, Plan, Report } from "./model.ts";
import { merge, NO_KINDS, registerKind } from "./rules.ts";
import { SPAM_KIND, spamHandler } from "./spam.ts";
import { quarantineHandler } from "./quarantine.ts";
import { QUARANTINE_KIND } from "../services/spam/quarantine.ts";
import "../services/spam/journal.ts"; // registers the spam-delta journal kind
import { FILE_BYTES_MAX, fromWire, type VictimSide } from "./export.ts";
import { readAccounts, readEntries, readMail, sinceSplit, toEvents, unifyStandIns, victimAccounts, type MailRead } from "./sides.ts";

export const QUEUE = "reconcile";
/** The journal kinds merged beside mail and accounts. */
const KINDS = registerKind(registerKind(NO_KINDS, SPAM_KIND, spamHandler), QUARANTINE_KIND, quarantineHandler);
const JOB_ATTEMPTS = 3;
const JOB_DEADLINE_MS = 120_000;
/** The victim mounts and hashes its whole copy before it answers. */
const OPEN_DEADLINE_MS = 30 * 60_000;
const SIDE_BYTES_MAX = 256 * 1024 * 1024;

/**
 * Where the victim's preserved copy is read: mounted on this host (`localCopy`, when
 * its folder is here), or on the victim itself over the peer channel (`peerCopy`:
 * reconcile/export.ts answers there).
 */
export interface VictimSource {
  readonly copy: string;
  read(progress: (step: string, detail: Record<string, unknown>) => void): Promise<{ mail: MailRead; entries: JournalEntry[] }>;
  file(f: string): Promise<{ body: Buffer; mtime: Date }>;
  /** Done with the copy; RECONCILED: every change in it is merged (mark it so). */
  close(reconciled: boolean): Promise<void>;
}

/** The copy's folder is on this host: mount it under RUNDIR and read it here. */
export function localCopy(copy: string, runDir: string, markReconciled: () => Promise<void>): VictimSource {
  const mnt = join(runDir, "reconcile-view");
  let view: PreservedView | null = null;
  return {
    copy,
    async read(progress) {
      mkdirSync(mnt, { recursive: true });
      // An earlier run killed mid-way left its view mounted (the lock says it is dead).
      if (await unmountStale(mnt)) progress("unmounted the view an interrupted run left", { mountpoint: mnt });
      progress("mounting the preserved copy", { copy });
      view = await mountPreservedCopy(copy, mnt);
      progress("reading the victim's copy", {});
      return { mail: await readMail(view.mountpoint), entries: await readEntries(view.mountpoint) };
    },
    async file(f) {
      return { body: readFileSync(f), mtime: statSync(f).mtime };
    },
    async close(reconciled) {
      await view?.close().catch(() => {});
      view = null;
      rmSync(mnt, { recursive: true, force: true });
      if (reconciled) await markReconciled();
    },
  };
}

/** The copy lies on the victim: it mounts and reads it there and sends what the merge needs. */
export function peerCopy(ends: PeerEnds & { host: string; port: number }, copy: string): VictimSource {
  return {
    copy,
    async read(progress) {
      progress("reading the victim's copy on the victim", { node: ends.peer, copy });
      const a = await callPeer(ends, "victim-open", { copy }, { timeoutMs: OPEN_DEADLINE_MS, maxBytes: SIDE_BYTES_MAX });
      const side = a.result as VictimSide;
      if (!side || typeof side !== "object" || side.copy !== copy || !Array.isArray(side.entries) || typeof side.mail !== "object" || typeof side.files !== "object") {
        throw new Error(`node ${ends.peer} answered victim-open with something that is not a copy's side`);
      }
      return { mail: fromWire(side), entries: side.entries };
    },
    async file(f) {
      const a = await callPeer(ends, "victim-file", { copy, file: f }, { timeoutMs: 60_000, maxBytes: FILE_BYTES_MAX });
      const mtimeMs = (a.result as { mtimeMs?: unknown } | null)?.mtimeMs;
      return { body: a.body ?? Buffer.alloc(0), mtime: new Date(typeof mtimeMs === "number" ? mtimeMs : Date.now()) };
    },
    async close(reconciled) {
      await callPeer(ends, "victim-close", { copy, reconciled }, { timeoutMs: 120_000 });
    },
  };
}

export interface ReconcileOptions {
  /** The victim's preserved copy, and where it is read. */
  readonly victim: VictimSource;
  /** The survivor: its data directory (the mounted volume), run directory, sockets, IMAP. */
  readonly survivor: {
    readonly node: string;
    readonly data: string;
    readonly run: string;
    readonly mariadbSocket: string;
    readonly redisSocket: string;
    readonly dovecotConf: string;
    readonly imapHost: string;
    readonly imapPort: number;
  };
  /** Where mail of users deleted on the survivor goes (a folder `Recovered/<address>`). */
  readonly postmaster: string;
  readonly dryRun: boolean;
  readonly onProgress?: (step: string, detail: Record<string, unknown>) => void;
}

export interface OpResult {
  readonly id: string;
  readonly op: Operation["op"];
  readonly done: boolean;
  readonly says?: string;
}

export interface ReconcileResult {
  readonly copy: string;
  readonly dryRun: boolean;
  readonly events: { readonly victim: number; readonly survivor: number; readonly common: number };
  readonly plan: Plan;
  readonly applied: number;
  readonly notApplied: readonly OpResult[];
  readonly seconds: number;
  readonly reportFile: string | null;
}

export { readReconcileState, reconcileStateFile, type ReconcileState } from "./state.ts";

function writeState(runDir: string, s: Omit<ReconcileState, "at" | "pid">): void {
  writeFileDurable(reconcileStateFile(runDir), JSON.stringify({ ...s, at: new Date().toISOString(), pid: process.pid }), 0o644);
}

function takeLock(runDir: string): () => void {
  const f = join(runDir, "reconcile.lock");
  if (existsSync(f)) {
    const pid = Number(readFileSync(f, "utf8").trim());
    let alive = false;
    try {
      process.kill(pid, 0);
      alive = pid !== process.pid;
    } catch {
      alive = false;
    }
    if (alive) throw new Error(`a reconcile runs already (pid ${pid})`);
    unlinkSync(f);
  }
  const fd = openSync(f, "wx", 0o644);
  writeFileSync(fd, `${process.pid}\n`);
  closeSync(fd);
  return () => rmSync(f, { force: true });
}

export async function reconcile(o: ReconcileOptions): Promise<ReconcileResult> {
  const t0 = Date.now();
  const progress = o.onProgress ?? (() => {});
  const s = o.survivor;
  const copy = o.victim.copy;
  const release = takeLock(s.run);
  let complete = false;
  let db: Connection | null = null;
  try {
    db = await connectMariadb(s.mariadbSocket);
    if (!o.dryRun) writeState(s.run, { status: "planning", copy, total: 0, applied: 0 });
    const { mail: vMail, entries: vEntries } = await o.victim.read(progress);
    progress("reading the survivor", {});
    const sMail = await readMail(s.data);
    const sEntries = await readEntries(s.data);
    const split = sinceSplit(vEntries, sEntries);
    const standIns = unifyStandIns(vMail, sMail);
    const sAccounts = await readAccounts(db);
    const survivorState = { mail: sMail.mail, accounts: sAccounts };
    const victimEvents = toEvents(split.victim, { mail: vMail.mail, accounts: sAccounts }, standIns);
    const victimState = { mail: vMail.mail, accounts: victimAccounts(sAccounts, victimEvents) };
    const survivorEvents = toEvents(split.survivor, survivorState, standIns);
    progress("planning", { victimEvents: victimEvents.length, survivorEvents: survivorEvents.length, messages: vMail.messages + sMail.messages });
    const plan = merge({ survivor: survivorState, victim: victimState, victimEvents, survivorEvents }, { lostFound: { user: o.postmaster }, kinds: KINDS });
    const events = { victim: victimEvents.length, survivor: survivorEvents.length, common: split.common };
    if (o.dryRun) return { copy, dryRun: true, events, plan, applied: 0, notApplied: [], seconds: (Date.now() - t0) / 1000, reportFile: null };

    writeState(s.run, { status: "running", copy, total: plan.ops.length, applied: 0 });
    const results = await runQueue(plan.ops, {
      redisSocket: s.redisSocket,
      applier: new Applier({ survivorData: s.data, imap: { host: s.imapHost, port: s.imapPort, masterPassword: readFileSync(join(s.data, "etc", "dovecot-master.secret"), "utf8").trim() }, dovecotConf: s.dovecotConf, db, victimFiles: vMail.files, victimFile: (f) => o.victim.file(f), standIns }),
      onDone: (n) => {
        progress("applying", { done: n, of: plan.ops.length, percent: plan.ops.length ? Math.floor((100 * n) / plan.ops.length) : 100 });
        if (n % 100 === 0) writeState(s.run, { status: "running", copy, total: plan.ops.length, applied: n });
      },
    });
    const notApplied = results.filter((r) => !r.done);
    const applied = results.length - notApplied.length;
    complete = plan.report.complete && notApplied.length === 0;
    writeState(s.run, { status: complete ? "done" : "incomplete", copy, total: plan.ops.length, applied });
    const result: ReconcileResult = { copy, dryRun: false, events, plan, applied, notApplied, seconds: (Date.now() - t0) / 1000, reportFile: join(s.data, "reconcile", `report-${new Date(t0).toISOString().replace(/[:.]/g, "-")}.json`) };
    mkdirSync(join(s.data, "reconcile"), { recursive: true, mode: 0o700 });
    writeFileDurable(result.reportFile!, JSON.stringify({ ...result, complete, plan: { report: plan.report, ops: plan.ops.length } }, null, 2));
    return result;
  } finally {
    await db?.end().catch(() => {});
    await closeAccountJournals().catch(() => {});
    // The copy is marked reconciled only after a complete run (the report is written).
    await o.victim.close(complete && !o.dryRun).catch((err: Error) => progress("could not close the victim's copy", { error: err.message }));
    release();
  }
}

interface QueueOptions {
  readonly redisSocket: string;
  readonly applier: Applier;
  readonly onDone: (n: number) => void;
}

/** The plan's operations through the `reconcile` queue, one at a time, in order. */
async function runQueue(ops: readonly Operation[], o: QueueOptions): Promise<OpResult[]> {
  const connection = redisConnection(o.redisSocket);
  const queue = new Queue(QUEUE, { connection });
  const results = new Map<string, OpResult>();
  let worker: Worker | null = null;
  try {
    // No worker of an earlier run is alive (the lock): what it left is planned anew.
    await queue.obliterate({ force: true });
    if (ops.length === 0) return [];
    let n = 0;
    let finished!: () => void;
    const allDone = new Promise<void>((r) => (finished = r));
    const record = (r: OpResult) => {
      if (results.has(r.id)) return;
      results.set(r.id, r);
      o.onDone(++n);
      if (n === ops.length) finished();
    };
    worker = new Worker(
      QUEUE,
      async (job: Job<Operation>) => {
        try {
          const r: ApplyOutcome = await o.applier.apply(job.data);
          return r;
        } catch (err) {
          // imapflow says "Command failed"; the server's words are in responseText.
          const e = err as Error & { responseText?: string };
          throw new Error(e.responseText ? `${e.message}: ${e.responseText}` : e.message);
        }
      },
      { connection, concurrency: 1, lockDuration: 30_000, autorun: true },
    );
    worker.on("completed", (job, r: ApplyOutcome) => record({ id: job.id!, op: (job.data as Operation).op, done: r.done, ...(r.says ? { says: r.says } : {}) }));
    worker.on("failed", (job, err) => {
      if (job && job.attemptsMade >= JOB_ATTEMPTS) record({ id: job.id!, op: (job.data as Operation).op, done: false, says: err.message });
    });
    for (let i = 0; i < ops.length; i += 500) {
      await queue.addBulk(ops.slice(i, i + 500).map((op) => ({ name: op.op, data: op, opts: { jobId: op.id, attempts: JOB_ATTEMPTS, backoff: { type: "fixed", delay: 500 }, removeOnComplete: false, removeOnFail: false } })));
    }
    let last = -1;
    for (;;) {
      const t = new Promise<"tick">((r) => setTimeout(() => r("tick"), JOB_DEADLINE_MS));
      const w = await Promise.race([allDone.then(() => "done" as const), t]);
      if (w === "done") break;
      if (n === last) throw new Error(`reconcile: no operation finished within ${JOB_DEADLINE_MS / 1000} s (${n} of ${ops.length} done); run it again`);
      last = n;
    }
    return ops.map((op) => results.get(op.id)!);
  } finally {
    await worker?.close().catch(() => {});
    await o.applier.close();
    await queue.close();
  }
}

/** The report in words, for the operator. */
export function formatReport(r: ReconcileResult): string {
  const rep: Report = r.plan.report;
  const lines = [
    `${r.dryRun ? "plan (dry run)" : "reconcile"} from ${r.copy}`,
    `  events since the split: victim ${r.events.victim}, survivor ${r.events.survivor} (${r.events.common} shared before it)`,
    `  operations: ${Object.entries(rep.ops).map(([k, v]) => `${k} ${v}`).join(", ") || "none"}`,
  ];
  for (const [user, boxes] of Object.entries(rep.mailboxes)) for (const [box, ops] of Object.entries(boxes)) lines.push(`    ${user} ${box}: ${Object.entries(ops).map(([k, v]) => `${k} ${v}`).join(", ")}`);
  for (const e of rep.entries) lines.push(`  ${e.outcome}: ${e.says} [${e.rule}]${e.user ? ` ${e.user}` : ""}${e.mailbox ? ` ${e.mailbox}` : ""}${e.key ? ` ${e.key}` : ""}${e.row ? ` ${e.table}/${e.row}` : ""}`);
  if (!r.dryRun) {
    lines.push(`  applied ${r.applied} of ${r.plan.ops.length} in ${r.seconds.toFixed(1)} s`);
    for (const x of r.notApplied) lines.push(`  not applied: ${x.op} ${x.id}: ${x.says ?? ""}`);
    if (r.reportFile) lines.push(`  report: ${r.reportFile}`);
  }
  if (!rep.complete) lines.push("  the plan is incomplete (see stranded entries): look before relying on it");
  return lines.join("\n");
}
