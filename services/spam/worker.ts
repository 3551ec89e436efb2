// The spam worker daemon (`mailha spam worker`, the node daemon's `spam` resource on
// the active node, started after the journal): (a) the feedback loop
// (feedback-loop.ts) every FEEDBACK_EVERY_MS while `spam.enabled` and
// `spam.learn_from_moves`, so a user's move into or out of Junk is learned within a
// few seconds; (b) DSPAM's purge as a repeatable BullMQ job (queue `spam-purge`, job
// scheduler `spam-purge-nightly`, `pattern: spam.purge_cron`) on the node's Redis,
// whose worker runs here, one job at a time, each under the purge lock (purge.ts);
// (c) on the same queue, the quarantine's notices to its users (quarantine-digest.ts;
// job scheduler `spam-quarantine-digest`, `pattern: spam.quarantine_digest_cron`, none
// when it is `off`), and (d) users' own release requests (`release` jobs SMTP adds:
// release.ts).
// It logs in to MariaDB as its own account (`mailha_spam`), journals every delta it
// applies (its own change segment on the volume, open while it runs: it stops before
// the file system), writes its status for the resource monitor
// (`<run>/spam-worker.json`, every tick) and its counters for /metrics
// (`<state>/stats/spam.json`). Failures: a round that fails drops the database
// connection and is tried again after a growing pause (at most BACKOFF_MAX_MS); after
// FAILURES_MAX failed ticks in a row the process exits and the resource restarts it.
// The Redis schedule lives on the volume: after a failover the other node's worker
// takes over the same schedule (upserting it again changes nothing).
import { Queue, Worker, type Job } from "bullmq";
import type { Connection } from "mysql2/promise";
import type { Logger } from "pino";
import type { MailhaConfig } from "../../common/config.ts";
import type { NodePaths } from "../../common/paths.ts";
import type { ChangeJournal } from "../journal/changes.ts";
import { DATABASE } from "../accounts.ts";
import { connectMariadbAs, mariadbPaths } from "../mariadb.ts";
import { redisConnection, redisPaths } from "../redis.ts";
import { publishStats } from "../stats.ts";
import { cursorFile } from "./feedback-cursor.ts";
import { FeedbackLoop, type RoundResult } from "./feedback-loop.ts";
import { journalSpamDeltas, spamJournalFor } from "./journal.ts";
import { purgeLocked, type PurgeOutcome } from "./purge.ts";
import { sendDigests, type DigestSent } from "./quarantine-digest.ts";
import { releaseAndRetrain, RELEASE_JOB, RELEASE_KEYS_MAX, SPAM_WORKER_QUEUE, type Released } from "./release.ts";
import { MariadbSpamStore, type SpamStore } from "./store.ts";
import { spamWorkerStatusFile, writeSpamWorkerStatus, type DigestStatus, type PurgeStatus, type SpamWorkerStatus } from "./worker-status.ts";

export const PURGE_QUEUE = SPAM_WORKER_QUEUE;
export const PURGE_SCHEDULER = "spam-purge-nightly";
export const DIGEST_SCHEDULER = "spam-quarantine-digest";
/** The quarantine notices' job (quarantine-digest.ts). */
export const DIGEST_JOB = "digest";
export const FEEDBACK_EVERY_MS = 1000;
/** Rounds run back to back in one tick while there is more to read. */
const ROUNDS_PER_TICK_MAX = 20;
const BACKOFF_MAX_MS = 30_000;
const FAILURES_MAX = 60;
const PURGE_LOCK_MS = 60_000;
const PURGE_JOBS_KEPT = 30;

/** The database side: one connection, made again after a failure; the journal found through it once. */
class Backend {
  private db: Connection | null = null;
  store: MariadbSpamStore | null = null;
  journal: ChangeJournal | null = null;

  constructor(private readonly socket: string) {}

  async ensure(): Promise<void> {
    if (!this.db) {
      const db = await connectMariadbAs(this.socket, "spam", DATABASE);
      db.on("error", () => this.drop());
      this.db = db;
      this.store = new MariadbSpamStore(db);
    }
    if (!this.journal) {
      this.journal = await spamJournalFor(this.db);
      if (!this.journal) throw new Error("the change journal has no node marker beside MariaDB's socket yet (the journal resource writes it): nothing is learned before it can be journaled");
    }
  }

  drop(): void {
    const db = this.db;
    this.db = null;
    this.store = null;
    void db?.end().catch(() => undefined);
  }

  async close(): Promise<void> {
    await this.journal?.close().catch(() => undefined);
    this.journal = null;
    const db = this.db;
    this.db = null;
    await db?.end().catch(() => undefined);
  }
}

/** A SpamStore that always uses the backend's current connection. */
function storeOf(b: Backend): SpamStore {
  const s = (): MariadbSpamStore => {
    if (!b.store) throw new Error("no database connection");
    return b.store;
  };
  return {
    uidFor: (u) => s().uidFor(u),
    learned: (uid) => s().learned(uid),
    tokenCounts: (uid, t) => s().tokenCounts(uid, t),
    signature: (uid, id) => s().signature(uid, id),
    ledger: (uid, k) => s().ledger(uid, k),
    preferences: (uid) => s().preferences(uid),
    apply: (d, o) => s().apply(d, o),
  };
}

export interface SpamWorkerOptions {
  readonly config: MailhaConfig;
  readonly nodeId: string;
  readonly paths: NodePaths;
  readonly mailRoot: string;
  readonly log: Logger;
}

export interface SpamWorker {
  close(): Promise<void>;
}

/** Starts the worker (see the module header); resolves once the loop and the purge worker run. */
export async function runSpamWorker(o: SpamWorkerOptions): Promise<SpamWorker> {
  const { config: c, paths, log } = o;
  const socket = mariadbPaths(paths).socket;
  const statusFile = spamWorkerStatusFile(paths.run);
  const backend = new Backend(socket);
  const enabled = c.spam.enabled && c.spam.learn_from_moves;
  const loop = new FeedbackLoop({
    dataDir: paths.data,
    mailRoot: o.mailRoot,
    runDir: paths.run,
    cursorFile: cursorFile(paths.data),
    store: storeOf(backend),
    journal: async (user, deltas) => {
      if (!backend.journal) throw new Error("no change journal");
      await journalSpamDeltas(backend.journal, user, deltas);
    },
    log,
  });
  let last: RoundResult["t"] | "not-run" = "not-run";
  let lastError: string | undefined;
  let purge: PurgeStatus = { pattern: c.spam.purge_cron, scheduled: false };
  const purgeStats = { runs: 0, skipped: 0, failed: 0, last_end_s: 0, last_ms: 0, last_deleted: 0 } as Record<string, number>;
  let digest: DigestStatus = { pattern: c.spam.quarantine_digest_cron, scheduled: false };
  const status = (): SpamWorkerStatus => ({ at: new Date().toISOString(), pid: process.pid, feedback: { enabled, last, ...(lastError ? { error: lastError } : {}), counts: loop.counts }, purge, digest });
  const stopStats = publishStats(paths, "spam", () => {
    const out: Record<string, number> = { feedback_enabled: enabled ? 1 : 0, purge_scheduled: purge.scheduled ? 1 : 0 };
    for (const [k, v] of Object.entries(loop.counts)) out[`feedback_${k}`] = v;
    for (const [k, v] of Object.entries(purgeStats)) out[`purge_${k}`] = v;
    return out;
  });

  // ---- (a) the feedback loop ----
  let stopping = false;
  let failures = 0;
  let timer: NodeJS.Timeout | null = null;
  let ticking: Promise<void> = Promise.resolve();
  const tick = async (): Promise<void> => {
    if (enabled) {
      try {
        for (let i = 0; i < ROUNDS_PER_TICK_MAX && !stopping; i++) {
          await backend.ensure();
          const r = await loop.round();
          last = r.t;
          writeSpamWorkerStatus(statusFile, status()); // after every round: the monitor sees a long catch-up is alive
          if (r.t === "failed") throw new Error(r.error);
          if (r.t !== "done" || !r.more) break;
        }
        failures = 0;
        lastError = undefined;
      } catch (err) {
        failures++;
        lastError = (err as Error).message;
        backend.drop();
        log.error({ err, failures }, "spam feedback: round failed; trying again");
        if (failures >= FAILURES_MAX) {
          log.fatal({ failures }, "spam feedback: too many failed rounds in a row; exiting (the resource restarts the worker)");
          writeSpamWorkerStatus(statusFile, status());
          process.exit(1);
        }
      }
    }
    writeSpamWorkerStatus(statusFile, status());
  };
  const schedule = () => {
    if (stopping) return;
    const delay = failures === 0 ? FEEDBACK_EVERY_MS : Math.min(BACKOFF_MAX_MS, FEEDBACK_EVERY_MS * 2 ** Math.min(failures, 10));
    timer = setTimeout(() => {
      ticking = tick().finally(schedule);
    }, delay);
  };
  if (!enabled) log.info({ enabled: c.spam.enabled, learn_from_moves: c.spam.learn_from_moves }, "spam feedback: off (spam.enabled and spam.learn_from_moves must both be true)");

  // ---- (b) the purge, a repeatable BullMQ job ----
  const connection = redisConnection(redisPaths(paths).socket);
  const queue = new Queue(PURGE_QUEUE, { connection });
  queue.on("error", (err) => log.warn({ err }, "spam purge: queue"));
  const worker = new Worker(
    PURGE_QUEUE,
    async (job: Job) => {
      if (job.name === RELEASE_JOB) {
        // A user's own release request (SMTP took it: release.ts), with their retraining.
        const { user, keys } = job.data as { user: string; keys: string[] };
        const db = await connectMariadbAs(socket, "spam", DATABASE);
        try {
          const journal = await spamJournalFor(db);
          if (!journal) throw new Error("the change journal is not ready: not released (the job is tried again)");
          try {
            const r = await releaseAndRetrain(new MariadbSpamStore(db), { mailRoot: o.mailRoot, journal }, user, keys.slice(0, RELEASE_KEYS_MAX), true);
            log.info({ job: job.id, user, released: r.map((x) => x.key) }, "spam quarantine: released at the user's request");
            return r;
          } finally {
            await journal.close();
          }
        } finally {
          await db.end().catch(() => undefined);
        }
      }
      if (job.name === DIGEST_JOB) {
        await job.updateProgress({ step: "sending" });
        return sendDigests({ mailRoot: o.mailRoot, dataDir: paths.data, uid: c.mail.mail_uid, gid: c.mail.mail_gid, quarantineDays: c.spam.quarantine_days });
      }
      const db = await connectMariadbAs(socket, "spam", DATABASE);
      try {
        log.info({ job: job.id, name: job.name }, "spam purge: started");
        await job.updateProgress({ step: "purging" });
        // Its own journal (an epoch of its own): every expired quarantine message is journaled first.
        const journal = await spamJournalFor(db);
        if (!journal) log.warn("spam purge: the change journal is not ready: held spam is not expired this time");
        const r = await purgeLocked(db, journal ? { quarantine: { target: { mailRoot: o.mailRoot, journal }, days: c.spam.quarantine_days } } : {}).finally(() => journal?.close());
        await job.updateProgress({ step: "done" });
        return r;
      } finally {
        await db.end().catch(() => undefined);
      }
    },
    { connection, concurrency: 1, lockDuration: PURGE_LOCK_MS, autorun: true },
  );
  worker.on("error", (err) => log.warn({ err }, "spam purge: worker"));
  worker.on("completed", (job, out: PurgeOutcome | DigestSent[] | Released[]) => {
    if (job.name === RELEASE_JOB) return;
    if (job.name === DIGEST_JOB) {
      const sent = out as DigestSent[];
      const listed = sent.reduce((n, d) => n + d.listed, 0);
      digest = { ...digest, last: { at: new Date().toISOString(), job: String(job.id), notices: sent.filter((d) => d.file).length, listed } };
      log.info({ job: job.id, notices: digest.last!.notices, listed }, "spam quarantine: notices sent");
      writeSpamWorkerStatus(statusFile, status());
      return;
    }
    const r = out as PurgeOutcome;
    purge = { ...purge, last: { at: new Date().toISOString(), job: String(job.id), outcome: r } };
    if (r.ran) {
      purgeStats.runs!++;
      purgeStats.last_end_s = Math.floor(Date.now() / 1000);
      purgeStats.last_ms = r.ms;
      purgeStats.last_deleted = r.deleted;
      for (const [k, v] of Object.entries(r.counts)) purgeStats[`last_${k.replace(/[A-Z]/g, (x) => `_${x.toLowerCase()}`)}`] = v;
      log.info({ job: job.id, day: r.day, counts: r.counts, deleted: r.deleted, ms: r.ms }, "spam purge: done");
    } else {
      purgeStats.skipped!++;
      log.warn({ job: job.id, why: r.why }, "spam purge: skipped");
    }
    writeSpamWorkerStatus(statusFile, status());
  });
  worker.on("failed", (job, err) => {
    if (job?.name === RELEASE_JOB) return void log.error({ job: job.id, err, user: (job.data as { user?: string }).user }, "spam quarantine: a user's release request failed");
    if (job?.name === DIGEST_JOB) {
      digest = { ...digest, error: err.message };
      log.error({ job: job.id, err }, "spam quarantine: the notices failed");
      writeSpamWorkerStatus(statusFile, status());
      return;
    }
    purgeStats.failed!++;
    purge = { ...purge, last: { at: new Date().toISOString(), job: String(job?.id), outcome: { ran: false, why: "failed", error: err.message } } };
    log.error({ job: job?.id, err }, "spam purge: failed");
    writeSpamWorkerStatus(statusFile, status());
  });
  // A pattern cron-parser refuses leaves that job unscheduled: the rest still runs; the status says why.
  const scheduleJob = async (id: string, pattern: string, name: string, what: string): Promise<{ scheduled: boolean; error?: string }> => {
    try {
      if (pattern === "off") {
        await queue.removeJobScheduler(id);
        return { scheduled: false };
      }
      await queue.upsertJobScheduler(id, { pattern }, { name, data: {}, opts: { attempts: 2, backoff: { type: "fixed", delay: 60_000 }, removeOnComplete: { count: PURGE_JOBS_KEPT }, removeOnFail: { count: PURGE_JOBS_KEPT } } });
      const s = await queue.getJobScheduler(id);
      log.info({ pattern, next: s?.next ? new Date(s.next).toISOString() : null }, `${what}: scheduled`);
      return { scheduled: true };
    } catch (err) {
      log.error({ err, pattern }, `${what}: not scheduled`);
      return { scheduled: false, error: (err as Error).message };
    }
  };
  purge = { ...purge, ...(await scheduleJob(PURGE_SCHEDULER, c.spam.purge_cron, "purge", "spam purge")) };
  digest = { ...digest, ...(await scheduleJob(DIGEST_SCHEDULER, c.spam.quarantine_digest_cron, DIGEST_JOB, "spam quarantine notices")) };
  writeSpamWorkerStatus(statusFile, status());
  schedule();

  return {
    async close() {
      stopping = true;
      if (timer) clearTimeout(timer);
      await ticking.catch(() => undefined);
      await worker.close().catch(() => undefined);
      await queue.close().catch(() => undefined);
      stopStats();
      await backend.close();
      log.info({ counts: loop.counts }, "spam worker: stopped");
    },
  };
}
