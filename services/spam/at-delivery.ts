// The spam filter in SMTP's delivery path (services/smtp/delivery.ts's DeliveryFilter):
// the message is tokenized once, each mailbox's user classified with their own tokens
// and preferences, and each gets its X-DSPAM-* fields and its folder (Junk for spam when
// the user's spam_action is junk, the quarantine beside the Maildir when it is quarantine). What a classification learned is journaled
// (`journal`: the change journal's `spam-delta`, in this process's own segments, beside
// the delivery journal's round, before the 250) and applied after it, in the background
// (`learn`: at most LEARN_INFLIGHT_MAX at once, what the deliveries waiting meanwhile
// learned in one transaction). Bounded: a pool of POOL_SIZE connections (at most QUEUE_MAX deliveries
// waiting for one), every plan within TIMEOUT_MS in all; past it, or on any error, the
// mailbox is delivered unclassified (X-DSPAM-Result Innocent and an X-DSPAM-Reason),
// never refused, never delayed longer, never lost. Token counts are read through one
// TokenCache (exact: tagged with each user's learn generation; this process's own
// commits move it forward); a user's uid is kept, their preferences while their
// generation stays (a preference change moves it). Generations are read for all
// classifications waiting at once in one query (GenerationReads, its own connection),
// and a read under GENERATION_FRESH_MS old answers without one.
// A classification that learns nothing (TOE past the warm-up, sure) writes nothing of
// its own (an unrecorded signature, filter.ts): its count is added up here and journaled
// and applied as one delta per user every COUNTS_FLUSH_MS. Counters for the metrics page.
import mysql from "mysql2/promise";
import type { Logger } from "pino";
import { DATABASE } from "../accounts.ts";
import { JUNK_DIR, QUARANTINE_DIR } from "../journal/maildir.ts";
import { sqlLogin } from "../mariadb.ts";
import type { DeliveryFilter, FilterPlan } from "../smtp/delivery.ts";
import { applyDeltas, classifyMessage, readPreferences, type SpamAction, type SpamPrefs } from "./filter.ts";
import { ChangeJournal } from "../journal/changes.ts";
import { journalSpamDeltasOf } from "./journal.ts";
import { MariadbSpamStore, type CommittedChange } from "./store.ts";
import { GenerationReads, TokenCache } from "./token-cache.ts";
import { DEFAULT_LIMITS, tokenize } from "./tokenize.ts";
import { dayOf, type SpamDelta } from "./training.ts";
import type { StatColumn } from "./classify.ts";

const POOL_SIZE = 4;
const QUEUE_MAX = 500;
const LEARN_INFLIGHT_MAX = 128;
const LEARN_POOL_SIZE = 2;
/**
 * A generation read this recent (ms) answers a classification without a query: what
 * another process commits (the spam worker's retraining from a user's move, `mailha
 * spam train`, a preference change, the merge) is used within this bound; this
 * process's own learning at once. Without it every message waited for a query.
 */
export const GENERATION_FRESH_MS = 200;
/** Users whose uid and preferences are kept, at most. */
const IDS_MAX = 10_000;
/** Deliveries whose learning one transaction applies at most. */
const LEARN_BATCH_MAX = 64;
/** Classifications that learned nothing: their counts are journaled and applied together this often... */
const COUNTS_FLUSH_MS = 1000;
/** ...or once this many are waiting. */
const COUNTS_PENDING_MAX = 1000;
export const COUNTED_RULE = "classified counts of classifications that learned nothing, added up (SMTP)";

/** One delivery's learning, waiting for a connection. */
interface Learning {
  readonly deltas: readonly SpamDelta[];
  readonly session: string | undefined;
  readonly done: () => void;
}
/** The Maildir++ folder of spam (Dovecot's `Junk`, special-use \Junk, services/dovecot.ts). */
export const JUNK_FOLDER = JUNK_DIR;

export interface AtDeliveryOptions {
  readonly socket: string;
  /** The volume's data directory and this node: where the change journal is (the SMTP process writes its own segments). */
  readonly dataDir: string;
  readonly node: string;
  readonly timeoutMs: number;
  readonly log: Logger;
  readonly database?: string;
}

export interface AtDeliveryCounters {
  spam_classified_total: number;
  innocent_classified_total: number;
  spam_filed_in_junk_total: number;
  spam_quarantined_total: number;
  unclassified_total: number;
  timeouts_total: number;
  errors_total: number;
  learn_errors_total: number;
  /** Transactions that applied several deliveries' learning at once. */
  learn_batches_total: number;
  classify_ms_total: number;
  /** The token cache (token-cache.ts): token counts served from memory, read from MariaDB, copies found stale, tokens held. */
  token_cache_hits_total: number;
  token_cache_misses_total: number;
  token_cache_stale_total: number;
  token_cache_entries: number;
  /** Learned totals served from the cache; generation queries (each answers every classification waiting). */
  token_cache_totals_hits_total: number;
  generation_reads_total: number;
  /** Classifications answered by a generation read under GENERATION_FRESH_MS old (no query). */
  generation_fresh_total: number;
  /** Classifications that learned nothing (no signature, no ledger row: counted apart), and the deltas that added them up. */
  counted_apart_total: number;
  count_flushes_total: number;
  /** Tokens not read because the user's token set lacks them (token-cache.ts); token sets built. */
  token_set_skips_total: number;
  token_sets_built_total: number;
}

/** The folder spam goes to for ACTION: junk files it in Junk; tag only adds the fields; quarantine holds it outside the Maildir (quarantine.ts). */
export function folderFor(result: "spam" | "innocent", action: SpamAction): string {
  if (result !== "spam") return "";
  const table: Record<SpamAction, string> = { junk: JUNK_FOLDER, tag: "", quarantine: QUARANTINE_DIR };
  return table[action];
}

/** Header lines of FIELDS (values are the filter's own: no CR or LF can be in them). */
export function fieldLines(fields: Record<string, string>): string {
  return Object.entries(fields)
    .map(([k, v]) => `${k}: ${v.replace(/[\r\n]+/g, " ")}\r\n`)
    .join("");
}

const unclassified = (reason: string): FilterPlan => ({ fields: fieldLines({ "X-DSPAM-Result": "Innocent", "X-DSPAM-Reason": reason }), folder: "" });

class Timeout extends Error {}

function within<T>(p: Promise<T>, ms: number): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, reject) => (t = setTimeout(() => reject(new Timeout(`over ${ms} ms`)), ms)))]).finally(() => clearTimeout(t));
}

export class SpamAtDelivery implements DeliveryFilter {
  private readonly pool: mysql.Pool;
  /** The writes have their own connections: a commit that blocks never starves the classifications' reads. */
  private readonly learnPool: mysql.Pool;
  /** The generation reads' own connection: a classification holds one of `pool` while it waits for a read. */
  private readonly genPool: mysql.Pool;
  private readonly gens: GenerationReads;
  private readonly changes: ChangeJournal;
  private readonly learning = new Set<Promise<void>>();
  private readonly waiting: Learning[] = [];
  private runners = 0;
  readonly counters: AtDeliveryCounters = { spam_classified_total: 0, innocent_classified_total: 0, spam_filed_in_junk_total: 0, spam_quarantined_total: 0, unclassified_total: 0, timeouts_total: 0, errors_total: 0, learn_errors_total: 0, learn_batches_total: 0, classify_ms_total: 0, token_cache_hits_total: 0, token_cache_misses_total: 0, token_cache_stale_total: 0, token_cache_entries: 0, token_cache_totals_hits_total: 0, generation_reads_total: 0, generation_fresh_total: 0, counted_apart_total: 0, count_flushes_total: 0, token_set_skips_total: 0, token_sets_built_total: 0 };
  /** The counts this process read, kept exact by the learn generation (one cache for all connections). */
  private readonly cache = new TokenCache();
  private readonly uids = new Map<string, number>();
  private readonly prefs = new Map<number, { gen: number; prefs: SpamPrefs }>();
  /** The counts of classifications that learned nothing, per uid, not yet journaled. */
  private counts = new Map<number, { user: string; stats: Partial<Record<StatColumn, number>> }>();
  private countsPending = 0;
  private countsTimer: NodeJS.Timeout | null = null;
  private countsSeq = 0;
  private readonly countsEpoch = Date.now();

  constructor(private readonly o: AtDeliveryOptions) {
    this.changes = new ChangeJournal(o.dataDir, o.node);
    this.pool = this.newPool(POOL_SIZE);
    this.learnPool = this.newPool(LEARN_POOL_SIZE);
    this.genPool = this.newPool(1);
    this.gens = new GenerationReads(
      async (uids) => {
        const conn = await this.genPool.getConnection();
        try {
          return await new MariadbSpamStore(conn, this.o.database ?? DATABASE).generations(uids);
        } finally {
          conn.release();
        }
      },
      { freshMs: GENERATION_FRESH_MS },
    );
  }

  private newPool(size: number): mysql.Pool {
    const pool = mysql.createPool({ ...sqlLogin(this.o.socket, "smtp"), database: this.o.database ?? DATABASE, connectionLimit: size, queueLimit: QUEUE_MAX, connectTimeout: 3000 });
    // A pool connection the server closed is replaced; the error must not end the process.
    pool.on("connection", (c) => (c as unknown as { on(e: string, f: (err: Error) => void): void }).on("error", (err) => this.o.log.warn({ err }, "spam filter: a database connection failed")));
    return pool;
  }

  async plan(head: Buffer, whole: boolean, mailboxes: readonly string[], session?: string): Promise<FilterPlan[]> {
    const t0 = Date.now();
    const deadline = t0 + this.o.timeoutMs;
    try {
      return await within(this.planAll(head, whole, mailboxes, deadline), this.o.timeoutMs);
    } catch (err) {
      const timeout = err instanceof Timeout;
      if (timeout) this.counters.timeouts_total++;
      else this.counters.errors_total++;
      this.counters.unclassified_total += mailboxes.length;
      this.o.log.warn({ err, session, mailboxes: mailboxes.length }, timeout ? "spam filter: no verdict within the time bound; delivered unclassified" : "spam filter failed; delivered unclassified");
      return mailboxes.map(() => unclassified(timeout ? "filter-timeout" : "filter-error"));
    } finally {
      this.counters.classify_ms_total += Date.now() - t0;
      const cs = this.cache.stats;
      this.counters.token_cache_hits_total = cs.hits;
      this.counters.token_cache_misses_total = cs.misses;
      this.counters.token_cache_stale_total = cs.stale;
      this.counters.token_cache_entries = cs.entries;
      this.counters.token_cache_totals_hits_total = cs.totalsHits;
      this.counters.generation_reads_total = this.gens.reads;
      this.counters.generation_fresh_total = this.gens.served;
      this.counters.token_set_skips_total = cs.setSkips;
      this.counters.token_sets_built_total = cs.setsBuilt;
    }
  }

  private async planAll(head: Buffer, whole: boolean, mailboxes: readonly string[], deadline: number): Promise<FilterPlan[]> {
    const limits = { ...DEFAULT_LIMITS, time_budget_ms: Math.max(1, Math.min(DEFAULT_LIMITS.time_budget_ms, deadline - Date.now())) };
    const tokenized = await tokenize(head, limits);
    // The head is all the filter reads of a message over PLAN_HEAD_MAX.
    if (!whole && !tokenized.reasons.includes("input-truncated")) tokenized.reasons.push("input-truncated");
    return Promise.all(
      mailboxes.map(async (user): Promise<FilterPlan> => {
        const conn = await this.pool.getConnection();
        try {
          const store = new MariadbSpamStore(conn, this.o.database ?? DATABASE);
          const uid = await this.uidOf(store, user);
          const gen = await this.gens.generation(uid);
          const prefs = await this.prefsOf(store, uid, gen);
          const c = await classifyMessage(this.cache.over(store, { uid, gen }, this.gens), uid, head, prefs, { tokenized, countsApart: true });
          if (c.result === "spam") this.counters.spam_classified_total++;
          else this.counters.innocent_classified_total++;
          const folder = folderFor(c.result, prefs.spam_action);
          if (folder === JUNK_FOLDER) this.counters.spam_filed_in_junk_total++;
          else if (folder === QUARANTINE_DIR) this.counters.spam_quarantined_total++;
          return { fields: fieldLines(c.headers), folder, ...(c.deltas.length || c.counted ? { spam: { user, deltas: c.deltas, ...(c.counted ? { counted: { uid, stats: c.counted } } : {}) } } : {}) };
        } finally {
          conn.release();
        }
      }),
    );
  }

  /** This process's learning committed: the token cache and the kept preferences move to the new generations. */
  private committed(changes: readonly CommittedChange[]): void {
    this.cache.committed(changes);
    this.gens.committed(changes);
    for (const ch of changes) {
      const p = this.prefs.get(ch.uid);
      if (p && p.gen === ch.gen - 1) p.gen = ch.gen;
    }
  }

  /** A user's DSPAM uid (never changes once made: kept, at most IDS_MAX). */
  private async uidOf(store: MariadbSpamStore, user: string): Promise<number> {
    const known = this.uids.get(user);
    if (known !== undefined) return known;
    const uid = await store.uidFor(user);
    if (this.uids.size >= IDS_MAX) this.uids.delete(this.uids.keys().next().value!);
    this.uids.set(user, uid);
    return uid;
  }

  /**
   * A user's preferences, kept while their learn generation is GEN (`mailha spam prefs`
   * moves it, store.ts `preferencesChanged`; so does any learning, which only costs a read).
   */
  private async prefsOf(store: MariadbSpamStore, uid: number, gen: number): Promise<SpamPrefs> {
    const known = this.prefs.get(uid);
    if (known && known.gen === gen) return known.prefs;
    const prefs = await readPreferences(store, uid);
    // Kept only if nothing changed them while they were read.
    if ((await this.gens.generation(uid)) === gen) {
      this.prefs.delete(uid);
      if (this.prefs.size >= IDS_MAX) this.prefs.delete(this.prefs.keys().next().value!);
      this.prefs.set(uid, { gen, prefs });
    }
    return prefs;
  }

  async journal(plans: readonly FilterPlan[]): Promise<void> {
    await journalSpamDeltasOf(this.changes, plans.flatMap((p) => (p.spam ? (p.spam.deltas as SpamDelta[]).map((delta) => ({ user: p.spam!.user, delta })) : [])));
  }

  async learn(plans: readonly FilterPlan[], session?: string): Promise<void> {
    for (const p of plans) if (p.spam?.counted) this.count(p.spam.user, p.spam.counted as { uid: number; stats: Partial<Record<StatColumn, number>> });
    const deltas = plans.flatMap((p) => (p.spam?.deltas ?? []) as SpamDelta[]);
    if (!deltas.length) return;
    // Journaled already, so the 250 does not wait for it: a MariaDB that blocks (its
    // volume waiting on a cut replication link) must not hold the reply, or the client
    // gives up and sends the message again. A failure loses this node's count of it,
    // never mail. At most LEARN_INFLIGHT_MAX wait or run at once; past that a delivery
    // waits for its own (backpressure).
    const p = new Promise<void>((done) => this.waiting.push({ deltas, session, done }));
    this.learning.add(p);
    void p.finally(() => this.learning.delete(p));
    this.pump();
    if (this.learning.size > LEARN_INFLIGHT_MAX) await p;
  }

  /**
   * Adds a delivered classification's count (one that learned nothing, so it has no
   * signature or ledger row of its own) to USER's pending sum; the sums are journaled
   * and applied as one delta per user every COUNTS_FLUSH_MS, or at COUNTS_PENDING_MAX.
   * Known gap: the counts of the last second before a crash are not counted (statistics,
   * never mail; what was never journaled was never applied either, so both sides of a
   * split brain still sum exactly).
   */
  private count(user: string, c: { uid: number; stats: Partial<Record<StatColumn, number>> }): void {
    const have = this.counts.get(c.uid) ?? { user, stats: {} };
    for (const [k, v] of Object.entries(c.stats) as [StatColumn, number][]) have.stats[k] = (have.stats[k] ?? 0) + v;
    this.counts.set(c.uid, have);
    this.counters.counted_apart_total++;
    if (++this.countsPending >= COUNTS_PENDING_MAX) void this.flushCounts();
    else if (!this.countsTimer) {
      this.countsTimer = setTimeout(() => void this.flushCounts(), COUNTS_FLUSH_MS);
      this.countsTimer.unref();
    }
  }

  /** Journals the pending counts (one delta per user, a ledger key of their own), then applies them with the learning. */
  private async flushCounts(): Promise<void> {
    if (this.countsTimer) clearTimeout(this.countsTimer);
    this.countsTimer = null;
    if (!this.counts.size) return;
    const counts = this.counts;
    this.counts = new Map();
    this.countsPending = 0;
    const key = `counted:${this.o.node}:${this.countsEpoch}:${++this.countsSeq}`;
    const day = dayOf(new Date());
    const list = [...counts].map(([uid, { user, stats }]) => {
      const applied = { cls: null, except: [], stats };
      const delta: SpamDelta = { kind: "spam-delta", v: 1, uid, key, rule: COUNTED_RULE, source: "classification", day, tokens: [], stats, ledger: { before: null, after: { key, verdict: null, atClassification: null, applied } } };
      return { user, delta };
    });
    try {
      await journalSpamDeltasOf(this.changes, list);
    } catch (err) {
      this.counters.learn_errors_total++;
      this.o.log.warn({ err, users: list.length }, "spam filter: classified counts could not be journaled; not applied");
      return;
    }
    this.counters.count_flushes_total++;
    const p = new Promise<void>((done) => this.waiting.push({ deltas: list.map((x) => x.delta), session: undefined, done }));
    this.learning.add(p);
    void p.finally(() => this.learning.delete(p));
    this.pump();
    await p;
  }

  /** Starts a batch on every free learning connection. */
  private pump(): void {
    while (this.runners < LEARN_POOL_SIZE && this.waiting.length) {
      const batch = this.waiting.splice(0, LEARN_BATCH_MAX);
      this.runners++;
      void this.applyBatch(batch).finally(() => {
        this.runners--;
        this.pump();
      });
    }
  }

  /**
   * What the deliveries waiting since the last commit learned, in one transaction (one
   * commit, so one flush on the replicated volume for all of them). If the batch
   * fails, each delivery's deltas are applied on their own, so one bad delta costs only
   * its own count.
   */
  private async applyBatch(batch: readonly Learning[]): Promise<void> {
    const failed = (b: Learning, err: unknown) => {
      this.counters.learn_errors_total++;
      this.o.log.warn({ err, session: b.session }, "spam filter: what a delivery learned was journaled but not applied here");
    };
    try {
      const conn = await this.learnPool.getConnection();
      try {
        const store = new MariadbSpamStore(conn, this.o.database ?? DATABASE, (changes) => this.committed(changes));
        this.cache.ownCommitStarted();
        try {
          await store.applyBatch(batch.flatMap((b) => b.deltas));
          this.counters.learn_batches_total++;
        } catch (err) {
          if (batch.length === 1) throw err;
          for (const b of batch) await applyDeltas(store, b.deltas).catch((e: unknown) => failed(b, e));
        } finally {
          this.cache.ownCommitEnded();
        }
      } finally {
        conn.release();
      }
    } catch (err) {
      for (const b of batch) failed(b, err);
    } finally {
      for (const b of batch) b.done();
    }
  }

  /** Waits (at most MS) for the learning in progress, then closes. */
  async close(ms = 2000): Promise<void> {
    const counted = this.flushCounts();
    await Promise.race([Promise.allSettled([counted, ...this.learning]), new Promise((r) => setTimeout(r, ms))]);
    await Promise.all([this.pool.end().catch(() => undefined), this.learnPool.end().catch(() => undefined), this.genPool.end().catch(() => undefined), this.changes.close().catch(() => undefined)]);
  }
}
