// Where the spam filter keeps its counts: DSPAM's MySQL schema (mysql_objects-4.1.sql,
// virtual_users.sql) on InnoDB in the account store's database, plus mailha's
// (user, message) ledger. Deltas are applied in one transaction per message: the
// ledger row is locked and checked first (a delta computed from a stale ledger is
// refused with LedgerConflict, so a message is never learned twice), token counts
// change with INSERT ... ON DUPLICATE KEY UPDATE increments (decrements clamp at
// zero: only a token purged in between makes that differ from the plain sum).
// Token statistics are read in batches of 500. `purge` is DSPAM's purge-4.1.sql
// (hapaxes 30 days, single hits 15 days, unused 90 days except TOE/TUM/NOTRAIN users,
// TUM tokens under 50 hits after 90 days, signatures 14 days) in bounded batches.
// Every commit that changes a user's token counts or learned totals (spam_learned,
// innocent_learned: what the probabilities divide by) also adds one to their learn
// generation (mailha_spam_generation; a purge and an import add one for everyone), so
// a process that caches them (token-cache.ts) knows when its copy is stale. The other
// statistics (classified, misclassified counts) change at nearly every delivery and are
// not part of it.
// A MemorySpamStore with the same interface serves the unit tests.
import type { Connection } from "mysql2/promise";
import { DATABASE } from "../accounts.ts";
import { LEARNED_COLUMNS, STAT_COLUMNS, ZERO_TOTALS, type Learned, type StatColumn, type Totals, type TrainingMode } from "./classify.ts";
import type { LedgerEntry, SpamDelta } from "./training.ts";

export interface TokenCounts {
  readonly spam_hits: number;
  readonly innocent_hits: number;
}

export interface StoredSignature {
  readonly id: string;
  readonly tokens: readonly { readonly token: string; readonly frequency: number }[];
  readonly createdOn: string;
}

/** What the filter needs of its store (MariaDB in production, memory in tests). */
export interface SpamStore {
  /** The uid of USERNAME in dspam_virtual_uids (made on first use). */
  uidFor(username: string): Promise<number>;
  /** What the probabilities divide by: the user's spam and innocent learned (dspam_stats). */
  learned(uid: number): Promise<Learned>;
  /** Counts of TOKENS (absent ones are not in the map). */
  tokenCounts(uid: number, tokens: readonly string[]): Promise<Map<string, TokenCounts>>;
  signature(uid: number, id: string): Promise<StoredSignature | null>;
  ledger(uid: number, key: string): Promise<LedgerEntry | null>;
  /** The user's dspam_preferences merged over uid 0's (the defaults). */
  preferences(uid: number): Promise<Record<string, string>>;
  /** Applies each delta in a transaction of its own (see the module header). */
  apply(deltas: readonly SpamDelta[], opts?: ApplyOptions): Promise<void>;
}

export interface ApplyOptions {
  /** Skip the ledger check (the split-brain merge re-bases deltas itself). */
  readonly trustLedger?: boolean;
}

/** A delta computed from a ledger entry that has changed since: compute it again. */
export class LedgerConflict extends Error {
  constructor(
    readonly uid: number,
    readonly key: string,
  ) {
    super(`spam ledger entry (${uid}, ${key}) changed since the delta was computed`);
  }
}

const canon = (v: unknown): string => JSON.stringify(v ?? null);

// ---- the schema -----------------------------------------------------------------

/** DSPAM's MySQL objects on InnoDB (its MyISAM tables would not survive a crash), and the ledger. */
export const SPAM_SCHEMA: readonly string[] = [
  `CREATE TABLE IF NOT EXISTS dspam_token_data (
    uid INT UNSIGNED NOT NULL,
    token BIGINT UNSIGNED NOT NULL,
    spam_hits BIGINT UNSIGNED NOT NULL,
    innocent_hits BIGINT UNSIGNED NOT NULL,
    last_hit DATE NOT NULL,
    PRIMARY KEY (uid, token)
  ) ENGINE=InnoDB DEFAULT CHARSET=latin1 COLLATE=latin1_general_ci`,
  `CREATE TABLE IF NOT EXISTS dspam_signature_data (
    uid INT UNSIGNED NOT NULL,
    signature CHAR(32) COLLATE latin1_general_ci NOT NULL,
    data LONGBLOB NOT NULL,
    length INT UNSIGNED NOT NULL,
    created_on DATE NOT NULL,
    UNIQUE KEY id_signature_data_01 (uid, signature),
    KEY id_signature_data_02 (created_on)
  ) ENGINE=InnoDB DEFAULT CHARSET=latin1 COLLATE=latin1_general_ci`,
  `CREATE TABLE IF NOT EXISTS dspam_stats (
    uid INT UNSIGNED PRIMARY KEY,
    spam_learned BIGINT UNSIGNED NOT NULL,
    innocent_learned BIGINT UNSIGNED NOT NULL,
    spam_misclassified BIGINT UNSIGNED NOT NULL,
    innocent_misclassified BIGINT UNSIGNED NOT NULL,
    spam_corpusfed BIGINT UNSIGNED NOT NULL,
    innocent_corpusfed BIGINT UNSIGNED NOT NULL,
    spam_classified BIGINT UNSIGNED NOT NULL,
    innocent_classified BIGINT UNSIGNED NOT NULL
  ) ENGINE=InnoDB DEFAULT CHARSET=latin1 COLLATE=latin1_general_ci`,
  `CREATE TABLE IF NOT EXISTS dspam_preferences (
    uid INT UNSIGNED NOT NULL,
    preference VARCHAR(32) COLLATE latin1_general_ci NOT NULL,
    value VARCHAR(64) COLLATE latin1_general_ci NOT NULL,
    UNIQUE KEY id_preferences_01 (uid, preference)
  ) ENGINE=InnoDB DEFAULT CHARSET=latin1 COLLATE=latin1_general_ci`,
  `CREATE TABLE IF NOT EXISTS dspam_virtual_uids (
    uid INT UNSIGNED NOT NULL PRIMARY KEY AUTO_INCREMENT,
    username VARCHAR(128),
    UNIQUE KEY id_virtual_uids_01 (username)
  ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4`,
  // A user's learn generation: one more at every commit that changes their token
  // counts or learned totals (and for everyone at a purge or an import), so a process
  // that caches them (token-cache.ts) knows when its copy is stale.
  `CREATE TABLE IF NOT EXISTS mailha_spam_generation (
    uid INT UNSIGNED NOT NULL PRIMARY KEY,
    gen BIGINT UNSIGNED NOT NULL
  ) ENGINE=InnoDB`,
  `CREATE TABLE IF NOT EXISTS mailha_spam_ledger (
    uid INT UNSIGNED NOT NULL,
    msgkey VARCHAR(64) CHARACTER SET ascii NOT NULL,
    entry LONGTEXT CHARACTER SET utf8mb4 NOT NULL,
    updated_on DATE NOT NULL,
    PRIMARY KEY (uid, msgkey),
    KEY id_spam_ledger_02 (updated_on)
  ) ENGINE=InnoDB`,
];

/** Creates the spam tables in the account store's database (idempotent). */
export async function migrateSpam(db: Connection, database = DATABASE): Promise<void> {
  await db.query(`CREATE DATABASE IF NOT EXISTS \`${database}\` CHARACTER SET utf8mb4`);
  await db.query(`USE \`${database}\``);
  for (const s of SPAM_SCHEMA) await db.query(s);
}

// ---- helpers --------------------------------------------------------------------

const U64_MAX = "18446744073709551615";
/** A token hash as an SQL numeric literal (never quoted: a string would compare as a double). */
export function tokenLiteral(t: string): string {
  // Twenty digits compare as numbers do when compared as strings.
  if (!/^[0-9]{1,20}$/.test(t) || (t.length === 20 && t > U64_MAX)) throw new Error(`not an unsigned 64-bit token: ${JSON.stringify(t).slice(0, 40)}`);
  return t;
}
const intLiteral = (n: number): string => {
  if (!Number.isSafeInteger(n)) throw new Error(`not an integer: ${n}`);
  return String(n);
};
const dayLiteral = (d: string): string => {
  if (!/^\d{4}-\d{2}-\d{2}$/.test(d)) throw new Error(`not a day: ${d}`);
  return `'${d}'`;
};

/** DSPAM's signature blob: per token a struct { u64 token; u16 frequency } padded to 16 bytes (x86-64). */
export function encodeSignature(tokens: readonly { token: string; frequency: number }[]): Buffer {
  const b = Buffer.alloc(tokens.length * 16);
  tokens.forEach((t, i) => {
    b.writeBigUInt64LE(BigInt(tokenLiteral(t.token)), i * 16);
    b.writeUInt16LE(Math.min(0xffff, Math.max(0, t.frequency)), i * 16 + 8);
  });
  return b;
}

export function decodeSignature(data: Buffer): { token: string; frequency: number }[] {
  const out: { token: string; frequency: number }[] = [];
  for (let off = 0; off + 16 <= data.length; off += 16) out.push({ token: data.readBigUInt64LE(off).toString(), frequency: data.readUInt16LE(off + 8) });
  return out;
}

/**
 * A list of token literals for `token IN (...)`. Each is CAST: a literal above 2^63 is a
 * DECIMAL to MariaDB, and a list mixing them makes it scan the user's whole index
 * instead of looking each token up. 500 per list keeps it under
 * in_predicate_conversion_threshold (1000).
 */
const inList = (tokens: readonly string[]): string => tokens.map((t) => `CAST(${tokenLiteral(t)} AS UNSIGNED)`).join(",");
const BATCH_READ = 500;
const APPLY_ATTEMPTS = 4;
/** DSPAM's preference names -> mailha's. */
const PREF_NAMES: Record<string, string> = { trainingMode: "training_mode", spamAction: "spam_action", algorithm: "algorithms" };
const ER_DUP_ENTRY = 1062;
const ER_LOCK_WAIT_TIMEOUT = 1205;
const ER_LOCK_DEADLOCK = 1213;
/**
 * Two decimal token strings in numeric order, without BigInt (sorting a delivery's
 * tokens by BigInt was the filter's largest cost): leading zeros off, then the shorter
 * number is the smaller, and numbers of one length compare as strings.
 */
export function compareTokens(a: string, b: string): number {
  const x = a.length > 1 && a[0] === "0" ? a.replace(/^0+(?=.)/, "") : a;
  const y = b.length > 1 && b[0] === "0" ? b.replace(/^0+(?=.)/, "") : b;
  if (x.length !== y.length) return x.length - y.length;
  return x < y ? -1 : x > y ? 1 : 0;
}
const byToken = (a: { token: string }, b: { token: string }): number => compareTokens(a.token, b.token);
const BATCH_WRITE = 500;

// ---- MariaDB --------------------------------------------------------------------

/** A user's token and statistics changes that one commit made, and the learn generation it brought them to. */
export interface CommittedChange {
  readonly uid: number;
  readonly gen: number;
  readonly tokens: readonly { readonly token: string; readonly spamDelta: number; readonly innocentDelta: number }[];
  /** What the commit added to the user's dspam_stats columns (each clamped at zero, as MariaDB applied it). */
  readonly stats: Readonly<Partial<Record<StatColumn, number>>>;
}

export class MariadbSpamStore implements SpamStore {
  /**
   * DB must be a connection of its own (transactions): `connectMariadb(socket, DATABASE)`.
   * COMMITTED, when given, hears of every commit that changed token counts (the token
   * cache of the same process keeps itself current with it).
   */
  constructor(
    readonly db: Connection,
    readonly database = DATABASE,
    private readonly committed?: (changes: readonly CommittedChange[]) => void,
  ) {}

  /** The user's learn generation (0 before anything was learned). */
  async generation(uid: number): Promise<number> {
    const [rows] = await this.db.query(`SELECT gen FROM ${this.t("mailha_spam_generation")} WHERE uid = ?`, [uid]);
    const r = (rows as { gen: number | string }[])[0];
    return r ? Number(r.gen) : 0;
  }

  /** The learn generations of UIDS in one query (0 for a user without one). */
  async generations(uids: readonly number[]): Promise<Map<number, number>> {
    const out = new Map<number, number>(uids.map((u) => [u, 0]));
    if (!uids.length) return out;
    const [rows] = await this.db.query(`SELECT uid, gen FROM ${this.t("mailha_spam_generation")} WHERE uid IN (${[...new Set(uids)].map(intLiteral).join(",")})`);
    for (const r of rows as { uid: number; gen: number | string }[]) out.set(Number(r.uid), Number(r.gen));
    return out;
  }

  /** Inside a learning transaction: one more generation for each of UIDS (in uid order), and the new values. */
  private async bumpGenerations(uids: readonly number[]): Promise<Map<number, number>> {
    const sorted = [...new Set(uids)].sort((a, b) => a - b);
    const out = new Map<number, number>();
    if (!sorted.length) return out;
    const gens = this.t("mailha_spam_generation");
    await this.db.query(`INSERT INTO ${gens} (uid, gen) VALUES ${sorted.map((u) => `(${intLiteral(u)}, 1)`).join(",")} ON DUPLICATE KEY UPDATE gen = gen + 1`);
    // A locking read (the rows are this transaction's already: it holds their locks):
    // the values as it left them, whatever snapshot an earlier plain read took.
    const [rows] = await this.db.query(`SELECT uid, gen FROM ${gens} WHERE uid IN (${sorted.map(intLiteral).join(",")}) FOR UPDATE`);
    for (const r of rows as { uid: number; gen: number | string }[]) out.set(Number(r.uid), Number(r.gen));
    return out;
  }

  private t(name: string): string {
    return `\`${this.database}\`.${name}`;
  }

  async uidFor(username: string): Promise<number> {
    // A known user is a read only (every delivery asks): no write, no commit to wait for.
    const [known] = await this.db.query(`SELECT uid FROM ${this.t("dspam_virtual_uids")} WHERE username = ?`, [username]);
    const k = (known as { uid: number }[])[0];
    if (k) return k.uid;
    await this.db.query(`INSERT IGNORE INTO ${this.t("dspam_virtual_uids")} (username) VALUES (?)`, [username]);
    const [rows] = await this.db.query(`SELECT uid FROM ${this.t("dspam_virtual_uids")} WHERE username = ?`, [username]);
    const r = (rows as { uid: number }[])[0];
    if (!r) throw new Error(`no dspam uid for ${username}`);
    return r.uid;
  }

  async totals(uid: number): Promise<Totals> {
    const [rows] = await this.db.query(`SELECT ${STAT_COLUMNS.join(", ")} FROM ${this.t("dspam_stats")} WHERE uid = ?`, [uid]);
    const r = (rows as Record<StatColumn, number | string>[])[0];
    if (!r) return { ...ZERO_TOTALS };
    const out = { ...ZERO_TOTALS };
    for (const c of STAT_COLUMNS) out[c] = Number(r[c]);
    return out;
  }

  async learned(uid: number): Promise<Learned> {
    const [rows] = await this.db.query(`SELECT spam_learned, innocent_learned FROM ${this.t("dspam_stats")} WHERE uid = ?`, [uid]);
    const r = (rows as Record<string, number | string>[])[0];
    return { spam_learned: Number(r?.spam_learned ?? 0), innocent_learned: Number(r?.innocent_learned ?? 0) };
  }

  /**
   * Counts of TOKENS and the user's learn generation in ONE statement (one read view):
   * the counts are exactly those at that generation. Absent tokens are not in the map.
   */
  /** Every token UID has (null when more than MAX) and their generation, in one statement (one read view). */
  async tokenSetAt(uid: number, max: number): Promise<{ tokens: string[] | null; gen: number }> {
    const u = intLiteral(uid);
    const [rows] = await this.db.query({
      sql: `SELECT 'gen' AS token, gen FROM ${this.t("mailha_spam_generation")} WHERE uid = ${u} UNION ALL (SELECT CAST(token AS CHAR), 0 FROM ${this.t("dspam_token_data")} WHERE uid = ${u} LIMIT ${intLiteral(max + 1)})`,
      rowsAsArray: true,
    });
    const tokens: string[] = [];
    let gen = 0;
    for (const [t, g] of rows as [string, number | string][]) {
      if (t === "gen") gen = Number(g);
      else tokens.push(t);
    }
    return { tokens: tokens.length > max ? null : tokens, gen };
  }

  async tokenCountsAt(uid: number, tokens: readonly string[]): Promise<{ counts: Map<string, TokenCounts>; gen: number }> {
    const u = intLiteral(uid);
    const parts = [`SELECT 'gen' AS token, gen AS spam_hits, 0 AS innocent_hits FROM ${this.t("mailha_spam_generation")} WHERE uid = ${u}`];
    for (let i = 0; i < tokens.length; i += BATCH_READ) {
      parts.push(`SELECT CAST(token AS CHAR), spam_hits, innocent_hits FROM ${this.t("dspam_token_data")} WHERE uid = ${u} AND token IN (${inList(tokens.slice(i, i + BATCH_READ))})`);
    }
    const [rows] = await this.db.query(parts.join(" UNION ALL "));
    const counts = new Map<string, TokenCounts>();
    let gen = 0;
    for (const r of rows as { token: string; spam_hits: number | string; innocent_hits: number | string }[]) {
      if (r.token === "gen") gen = Number(r.spam_hits);
      else counts.set(r.token, { spam_hits: Number(r.spam_hits), innocent_hits: Number(r.innocent_hits) });
    }
    return { counts, gen };
  }

  /** The learned totals and the learn generation in one statement (as tokenCountsAt). */
  async learnedAt(uid: number): Promise<{ learned: Learned; gen: number }> {
    const u = intLiteral(uid);
    const [rows] = await this.db.query(
      `SELECT (SELECT gen FROM ${this.t("mailha_spam_generation")} WHERE uid = ${u}) AS gen, (SELECT spam_learned FROM ${this.t("dspam_stats")} WHERE uid = ${u}) AS s, (SELECT innocent_learned FROM ${this.t("dspam_stats")} WHERE uid = ${u}) AS i`,
    );
    const r = (rows as { gen: number | string | null; s: number | string | null; i: number | string | null }[])[0];
    return { learned: { spam_learned: Number(r?.s ?? 0), innocent_learned: Number(r?.i ?? 0) }, gen: Number(r?.gen ?? 0) };
  }

  async tokenCounts(uid: number, tokens: readonly string[]): Promise<Map<string, TokenCounts>> {
    const out = new Map<string, TokenCounts>();
    for (let i = 0; i < tokens.length; i += BATCH_READ) {
      const list = inList(tokens.slice(i, i + BATCH_READ));
      const [rows] = await this.db.query(`SELECT CAST(token AS CHAR) AS token, spam_hits, innocent_hits FROM ${this.t("dspam_token_data")} WHERE uid = ${intLiteral(uid)} AND token IN (${list})`);
      for (const r of rows as { token: string; spam_hits: number | string; innocent_hits: number | string }[]) out.set(r.token, { spam_hits: Number(r.spam_hits), innocent_hits: Number(r.innocent_hits) });
    }
    return out;
  }

  async signature(uid: number, id: string): Promise<StoredSignature | null> {
    const [rows] = await this.db.query(`SELECT data, DATE_FORMAT(created_on, '%Y-%m-%d') AS created_on FROM ${this.t("dspam_signature_data")} WHERE uid = ? AND signature = ?`, [uid, id]);
    const r = (rows as { data: Buffer; created_on: string }[])[0];
    return r ? { id, tokens: decodeSignature(r.data), createdOn: r.created_on } : null;
  }

  async ledger(uid: number, key: string): Promise<LedgerEntry | null> {
    const [rows] = await this.db.query(`SELECT entry FROM ${this.t("mailha_spam_ledger")} WHERE uid = ? AND msgkey = ?`, [uid, key]);
    const r = (rows as { entry: string }[])[0];
    return r ? (JSON.parse(r.entry) as LedgerEntry) : null;
  }

  async preferences(uid: number): Promise<Record<string, string>> {
    const [rows] = await this.db.query(`SELECT uid, preference, value FROM ${this.t("dspam_preferences")} WHERE uid IN (0, ?) ORDER BY uid`, [uid]);
    const out: Record<string, string> = {};
    // DSPAM's names are mailha's (trainingMode is training_mode): a user's row of either name overrides uid 0's of either.
    for (const r of rows as { preference: string; value: string }[]) out[PREF_NAMES[r.preference] ?? r.preference] = String(r.value);
    return out;
  }

  async setPreference(uid: number, preference: string, value: string): Promise<void> {
    await this.db.query(`INSERT INTO ${this.t("dspam_preferences")} (uid, preference, value) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE value = VALUES(value)`, [uid, preference, value]);
  }

  async apply(deltas: readonly SpamDelta[], opts: ApplyOptions = {}): Promise<void> {
    for (const d of deltas) {
      // Concurrent deliveries to one user touch the same tokens: a deadlock or a lock
      // wait timeout is retried (the transaction was rolled back whole).
      for (let attempt = 1; ; attempt++) {
        await this.db.beginTransaction();
        try {
          const gen = await this.applyOne(d, opts);
          await this.db.commit();
          if (gen !== null) this.committed?.([{ uid: d.uid, gen, tokens: d.tokens, stats: d.stats }]);
          break;
        } catch (e) {
          await this.db.rollback().catch(() => undefined);
          const code = (e as { errno?: number }).errno;
          if ((code !== ER_LOCK_DEADLOCK && code !== ER_LOCK_WAIT_TIMEOUT) || attempt >= APPLY_ATTEMPTS) throw e;
          await new Promise((r) => setTimeout(r, 5 + Math.floor(Math.random() * 20 * attempt)));
        }
      }
    }
  }

  /**
   * Many new-key deltas (what deliveries learned) in ONE transaction: one commit, so one
   * log flush on the replicated volume instead of one a message (group commit). Their
   * token increments are summed per (uid, token) and written in (uid, token) order, so
   * two batches lock in the same order and do not deadlock on each other. Only deltas
   * that make a new ledger key and only add: anything else goes through `apply`. A key
   * that exists already fails the whole batch with LedgerConflict (rolled back): the
   * caller applies its deltas one by one then.
   */
  async applyBatch(deltas: readonly SpamDelta[]): Promise<void> {
    const batchable = (d: SpamDelta) => d.ledger.before === null && d.ledger.after !== null && d.tokens.every((t) => t.spamDelta >= 0 && t.innocentDelta >= 0) && Object.values(d.stats).every((v) => (v ?? 0) >= 0);
    if (deltas.length <= 1 || !deltas.every(batchable)) return this.apply(deltas);
    const keys = new Set(deltas.map((d) => `${d.uid}\u0000${d.key}`));
    if (keys.size !== deltas.length) throw new LedgerConflict(deltas[0]!.uid, deltas[0]!.key);
    const tokens = new Map<string, { uid: number; token: string; spam: number; innocent: number; day: string }>();
    const stats = new Map<number, Partial<Record<StatColumn, number>>>();
    for (const d of deltas) {
      for (const t of d.tokens) {
        if (t.spamDelta === 0 && t.innocentDelta === 0) continue;
        const k = `${d.uid}:${t.token}`;
        const r = tokens.get(k) ?? { uid: d.uid, token: t.token, spam: 0, innocent: 0, day: d.day };
        r.spam += t.spamDelta;
        r.innocent += t.innocentDelta;
        if (d.day > r.day) r.day = d.day;
        tokens.set(k, r);
      }
      const s = stats.get(d.uid) ?? {};
      for (const [c, v] of Object.entries(d.stats) as [StatColumn, number][]) {
        if (!STAT_COLUMNS.includes(c)) throw new Error(`unknown stats column ${c}`);
        s[c] = (s[c] ?? 0) + v;
      }
      stats.set(d.uid, s);
    }
    const inc = [...tokens.values()].sort((a, b) => a.uid - b.uid || byToken(a, b));
    const ledgers = [...deltas].sort((a, b) => a.uid - b.uid || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    for (let attempt = 1; ; attempt++) {
      await this.db.beginTransaction();
      try {
        for (let i = 0; i < ledgers.length; i += BATCH_WRITE) {
          const part = ledgers.slice(i, i + BATCH_WRITE);
          try {
            await this.db.query(
              `INSERT INTO ${this.t("mailha_spam_ledger")} (uid, msgkey, entry, updated_on) VALUES ${part.map((d) => `(?, ?, ?, ${dayLiteral(d.day)})`).join(",")}`,
              part.flatMap((d) => [d.uid, d.key, canon(d.ledger.after)]),
            );
          } catch (e) {
            if ((e as { errno?: number }).errno === ER_DUP_ENTRY) throw new LedgerConflict(part[0]!.uid, part[0]!.key);
            throw e;
          }
        }
        for (let i = 0; i < inc.length; i += BATCH_WRITE) {
          const values = inc
            .slice(i, i + BATCH_WRITE)
            .map((t) => `(${intLiteral(t.uid)},${tokenLiteral(t.token)},${intLiteral(t.spam)},${intLiteral(t.innocent)},${dayLiteral(t.day)})`)
            .join(",");
          await this.db.query(
            `INSERT INTO ${this.t("dspam_token_data")} (uid, token, spam_hits, innocent_hits, last_hit) VALUES ${values}
             ON DUPLICATE KEY UPDATE spam_hits = spam_hits + VALUES(spam_hits), innocent_hits = innocent_hits + VALUES(innocent_hits), last_hit = GREATEST(last_hit, VALUES(last_hit))`,
          );
        }
        for (const [uid, s] of [...stats].sort((a, b) => a[0] - b[0])) {
          const cols = Object.entries(s).filter(([, v]) => v !== 0) as [StatColumn, number][];
          if (!cols.length) continue;
          await this.db.query(`INSERT IGNORE INTO ${this.t("dspam_stats")} (uid, ${STAT_COLUMNS.join(", ")}) VALUES (${intLiteral(uid)}${",0".repeat(STAT_COLUMNS.length)})`);
          await this.db.query(`UPDATE ${this.t("dspam_stats")} SET ${cols.map(([c, v]) => `${c} = ${c} + ${intLiteral(v)}`).join(", ")} WHERE uid = ${intLiteral(uid)}`);
        }
        const statsChanged = [...stats].filter(([, st]) => LEARNED_COLUMNS.some((c) => (st[c] ?? 0) !== 0)).map(([uid]) => uid);
        const gens = await this.bumpGenerations([...inc.map((t) => t.uid), ...statsChanged]);
        const sigs = ledgers.filter((d) => d.signature);
        for (let i = 0; i < sigs.length; i += 100) {
          const part = sigs.slice(i, i + 100).map((d) => ({ d, blob: encodeSignature(d.signature!.tokens) }));
          await this.db.query(
            `INSERT INTO ${this.t("dspam_signature_data")} (uid, signature, data, length, created_on) VALUES ${part.map(({ d }) => `(?, ?, ?, ?, ${dayLiteral(d.day)})`).join(",")}
             ON DUPLICATE KEY UPDATE data = VALUES(data), length = VALUES(length), created_on = VALUES(created_on)`,
            part.flatMap(({ d, blob }) => [d.uid, d.signature!.id, blob, blob.length]),
          );
        }
        await this.db.commit();
        if (gens.size && this.committed) {
          const byUid = new Map<number, CommittedChange["tokens"][number][]>([...gens.keys()].map((uid) => [uid, []]));
          for (const t of inc) byUid.get(t.uid)!.push({ token: t.token, spamDelta: t.spam, innocentDelta: t.innocent });
          this.committed([...byUid].map(([uid, tokens]) => ({ uid, gen: gens.get(uid)!, tokens, stats: stats.get(uid) ?? {} })));
        }
        return;
      } catch (e) {
        await this.db.rollback().catch(() => undefined);
        const code = (e as { errno?: number }).errno;
        if ((code !== ER_LOCK_DEADLOCK && code !== ER_LOCK_WAIT_TIMEOUT) || attempt >= APPLY_ATTEMPTS) throw e;
        await new Promise((r) => setTimeout(r, 5 + Math.floor(Math.random() * 20 * attempt)));
      }
    }
  }

  /** One delta inside the caller's transaction; the user's new learn generation when token counts or learned totals changed, else null. */
  private async applyOne(d: SpamDelta, opts: ApplyOptions): Promise<number | null> {
    const uid = intLiteral(d.uid);
    const day = dayLiteral(d.day);
    let current: { entry: string } | undefined;
    let ledgerDone = false;
    if (!opts.trustLedger && d.ledger.before === null) {
      // A new key (a classification's signature, a first training): the ledger row is
      // made first, by a plain INSERT, so that two deliveries never hold gap locks on
      // the same range (SELECT ... FOR UPDATE of a missing row takes one) and deadlock on
      // their inserts; a row that exists already is a conflict.
      if (d.ledger.after !== null) {
        try {
          await this.db.query(`INSERT INTO ${this.t("mailha_spam_ledger")} (uid, msgkey, entry, updated_on) VALUES (?, ?, ?, ${day})`, [d.uid, d.key, canon(d.ledger.after)]);
        } catch (e) {
          if ((e as { errno?: number }).errno === ER_DUP_ENTRY) throw new LedgerConflict(d.uid, d.key);
          throw e;
        }
        ledgerDone = true;
      } else {
        const [lrows] = await this.db.query(`SELECT entry FROM ${this.t("mailha_spam_ledger")} WHERE uid = ? AND msgkey = ?`, [d.uid, d.key]);
        if ((lrows as unknown[]).length) throw new LedgerConflict(d.uid, d.key);
        ledgerDone = true;
      }
    } else {
      const [lrows] = await this.db.query(`SELECT entry FROM ${this.t("mailha_spam_ledger")} WHERE uid = ? AND msgkey = ? FOR UPDATE`, [d.uid, d.key]);
      current = (lrows as { entry: string }[])[0];
      if (!opts.trustLedger && canon(current ? JSON.parse(current.entry) : null) !== canon(d.ledger.before)) throw new LedgerConflict(d.uid, d.key);
    }

    // Increments: one upsert per batch.
    // In the index's order, so that transactions on one user's tokens lock them in the same order.
    const inc = d.tokens.filter((t) => t.spamDelta > 0 || t.innocentDelta > 0).sort(byToken);
    for (let i = 0; i < inc.length; i += BATCH_WRITE) {
      const values = inc
        .slice(i, i + BATCH_WRITE)
        .map((t) => `(${uid},${tokenLiteral(t.token)},${intLiteral(Math.max(0, t.spamDelta))},${intLiteral(Math.max(0, t.innocentDelta))},${day})`)
        .join(",");
      await this.db.query(
        `INSERT INTO ${this.t("dspam_token_data")} (uid, token, spam_hits, innocent_hits, last_hit) VALUES ${values}
         ON DUPLICATE KEY UPDATE spam_hits = spam_hits + VALUES(spam_hits), innocent_hits = innocent_hits + VALUES(innocent_hits), last_hit = GREATEST(last_hit, VALUES(last_hit))`,
      );
    }
    // Decrements: grouped by amount, clamped at zero.
    const groups = new Map<string, string[]>();
    for (const t of d.tokens) {
      const s = Math.max(0, -t.spamDelta);
      const n = Math.max(0, -t.innocentDelta);
      if (s === 0 && n === 0) continue;
      const k = `${s},${n}`;
      let g = groups.get(k);
      if (!g) groups.set(k, (g = []));
      g.push(t.token);
    }
    for (const [k, list] of groups) {
      list.sort(compareTokens);
      const [s, n] = k.split(",").map(Number) as [number, number];
      for (let i = 0; i < list.length; i += BATCH_WRITE) {
        await this.db.query(
          `UPDATE ${this.t("dspam_token_data")} SET spam_hits = GREATEST(CAST(spam_hits AS SIGNED) - ${s}, 0), innocent_hits = GREATEST(CAST(innocent_hits AS SIGNED) - ${n}, 0)
           WHERE uid = ${uid} AND token IN (${inList(list.slice(i, i + BATCH_WRITE))})`,
        );
      }
    }
    const cols = Object.entries(d.stats).filter(([, v]) => v !== 0) as [StatColumn, number][];
    if (cols.length) {
      for (const [c] of cols) if (!STAT_COLUMNS.includes(c)) throw new Error(`unknown stats column ${c}`);
      await this.db.query(`INSERT IGNORE INTO ${this.t("dspam_stats")} (uid, ${STAT_COLUMNS.join(", ")}) VALUES (${uid}${",0".repeat(STAT_COLUMNS.length)})`);
      await this.db.query(`UPDATE ${this.t("dspam_stats")} SET ${cols.map(([c, v]) => `${c} = GREATEST(CAST(${c} AS SIGNED) + (${intLiteral(v)}), 0)`).join(", ")} WHERE uid = ${uid}`);
    }
    const changed = cols.some(([c]) => (LEARNED_COLUMNS as readonly string[]).includes(c)) || d.tokens.some((t) => t.spamDelta !== 0 || t.innocentDelta !== 0);
    const gen = changed ? (await this.bumpGenerations([d.uid])).get(d.uid)! : null;
    if (d.signature) {
      const blob = encodeSignature(d.signature.tokens);
      await this.db.query(
        `INSERT INTO ${this.t("dspam_signature_data")} (uid, signature, data, length, created_on) VALUES (?, ?, ?, ?, ${day})
         ON DUPLICATE KEY UPDATE data = VALUES(data), length = VALUES(length), created_on = VALUES(created_on)`,
        [d.uid, d.signature.id, blob, blob.length],
      );
    }
    if (ledgerDone) return gen;
    if (d.ledger.after === null) {
      if (current) await this.db.query(`DELETE FROM ${this.t("mailha_spam_ledger")} WHERE uid = ? AND msgkey = ?`, [d.uid, d.key]);
    } else if (canon(d.ledger.after) !== canon(current ? JSON.parse(current.entry) : null)) {
      await this.db.query(
        `INSERT INTO ${this.t("mailha_spam_ledger")} (uid, msgkey, entry, updated_on) VALUES (?, ?, ?, ${day}) ON DUPLICATE KEY UPDATE entry = VALUES(entry), updated_on = VALUES(updated_on)`,
        [d.uid, d.key, canon(d.ledger.after)],
      );
    }
    return gen;
  }

  /** After counts or defaults changed outside a delta (a purge, an import, uid 0's preferences): one more generation for every user. */
  async bumpAllGenerations(): Promise<void> {
    const gens = this.t("mailha_spam_generation");
    await this.db.query(`UPDATE ${gens} SET gen = gen + 1`);
    await this.db.query(`INSERT IGNORE INTO ${gens} (uid, gen) SELECT DISTINCT uid, 1 FROM ${this.t("dspam_token_data")}`);
    await this.db.query(`INSERT IGNORE INTO ${gens} (uid, gen) SELECT uid, 1 FROM ${this.t("dspam_virtual_uids")}`);
  }

  /** After UID's preferences changed (uid 0: everyone's defaults): their generation moves, so cached preferences are read again. */
  async preferencesChanged(uid: number): Promise<void> {
    if (uid === 0) await this.bumpAllGenerations();
    else await this.bumpGenerations([uid]);
  }

  /**
   * DSPAM's purge (purge-4.1.sql) as of TODAY (YYYY-MM-DD), in batches of BATCH rows,
   * at most BATCHES_MAX batches per rule. DEFAULT_MODE is the training mode of users
   * without a `trainingMode` preference (DSPAM's @TrainingMode; mailha's default is toe).
   */
  async purge(today: string, defaultMode: TrainingMode = "toe", batch = 10_000, batchesMax = 10_000): Promise<PurgeCounts> {
    const td = dayLiteral(today);
    const mode = `COALESCE((SELECT p.value FROM ${this.t("dspam_preferences")} p WHERE p.preference IN ('trainingMode', 'training_mode') AND p.uid = t.uid ORDER BY p.preference = 'training_mode' DESC LIMIT 1),
                           (SELECT d.value FROM ${this.t("dspam_preferences")} d WHERE d.preference IN ('trainingMode', 'training_mode') AND d.uid = 0 ORDER BY d.preference = 'training_mode' DESC LIMIT 1), '${defaultMode.toUpperCase()}')`;
    const tokens = this.t("dspam_token_data");
    // The multi-table DELETEs name their target table in full, without an alias: MariaDB
    // resolves a DELETE target alias in the default database ("No database selected"
    // on a connection without one).
    const rules: [keyof PurgeCounts, string][] = [
      ["hapaxes", `DELETE FROM ${tokens} WHERE last_hit < DATE_SUB(${td}, INTERVAL ${PURGE_DAYS.hapaxes} DAY) AND 2 * innocent_hits + spam_hits < 5 LIMIT ${batch}`],
      ["singleSpam", `DELETE FROM ${tokens} WHERE last_hit < DATE_SUB(${td}, INTERVAL ${PURGE_DAYS.hits1} DAY) AND innocent_hits = 0 AND spam_hits = 1 LIMIT ${batch}`],
      ["singleInnocent", `DELETE FROM ${tokens} WHERE last_hit < DATE_SUB(${td}, INTERVAL ${PURGE_DAYS.hits1} DAY) AND innocent_hits = 1 AND spam_hits = 0 LIMIT ${batch}`],
      [
        "unused",
        `DELETE ${tokens} FROM ${tokens} JOIN (SELECT uid, token FROM ${tokens} t WHERE last_hit < DATE_SUB(${td}, INTERVAL ${PURGE_DAYS.unused} DAY)
           AND UPPER(${mode}) NOT IN ('TOE', 'TUM', 'NOTRAIN') LIMIT ${batch}) x USING (uid, token)`,
      ],
      [
        "tumUnused",
        `DELETE ${tokens} FROM ${tokens} JOIN (SELECT uid, token FROM ${tokens} t WHERE last_hit < DATE_SUB(${td}, INTERVAL ${PURGE_DAYS.unused} DAY)
           AND innocent_hits + spam_hits < 50 AND UPPER(${mode}) = 'TUM' LIMIT ${batch}) x USING (uid, token)`,
      ],
      ["signatures", `DELETE FROM ${this.t("dspam_signature_data")} WHERE created_on < DATE_SUB(${td}, INTERVAL ${PURGE_DAYS.signatures} DAY) LIMIT ${batch}`],
      ["ledger", `DELETE FROM ${this.t("mailha_spam_ledger")} WHERE updated_on < DATE_SUB(${td}, INTERVAL ${PURGE_DAYS.ledger} DAY) LIMIT ${batch}`],
    ];
    const counts: PurgeCounts = { hapaxes: 0, singleSpam: 0, singleInnocent: 0, unused: 0, tumUnused: 0, signatures: 0, ledger: 0 };
    for (const [name, sql] of rules) {
      for (let i = 0; i < batchesMax; i++) {
        const [res] = await this.db.query(sql);
        const n = (res as { affectedRows: number }).affectedRows;
        counts[name] += n;
        if (n < batch) break;
      }
    }
    if (counts.hapaxes + counts.singleSpam + counts.singleInnocent + counts.unused + counts.tumUnused > 0) await this.bumpAllGenerations();
    return counts;
  }
}

/** DSPAM's dspam.conf Purge* defaults; the ledger outlives signatures as long as unused tokens. */
export const PURGE_DAYS = { signatures: 14, unused: 90, hapaxes: 30, hits1: 15, ledger: 90 } as const;

export interface PurgeCounts {
  hapaxes: number;
  singleSpam: number;
  singleInnocent: number;
  unused: number;
  tumUnused: number;
  signatures: number;
  ledger: number;
}

// ---- memory (tests) ---------------------------------------------------------------

/** The same store in memory: the counts as plain maps (tests, benchmarks of the maths). */
export class MemorySpamStore implements SpamStore {
  readonly tokens = new Map<string, { spam_hits: number; innocent_hits: number; last_hit: string }>();
  readonly stats = new Map<number, Totals>();
  readonly signatures = new Map<string, StoredSignature>();
  readonly ledgers = new Map<string, LedgerEntry>();
  readonly prefs = new Map<number, Record<string, string>>();
  private readonly users = new Map<string, number>();

  async uidFor(username: string): Promise<number> {
    let u = this.users.get(username);
    if (u === undefined) this.users.set(username, (u = this.users.size + 1));
    return u;
  }
  async totals(uid: number): Promise<Totals> {
    return { ...(this.stats.get(uid) ?? ZERO_TOTALS) };
  }
  async learned(uid: number): Promise<Learned> {
    const t = this.stats.get(uid) ?? ZERO_TOTALS;
    return { spam_learned: t.spam_learned, innocent_learned: t.innocent_learned };
  }
  async tokenCounts(uid: number, tokens: readonly string[]): Promise<Map<string, TokenCounts>> {
    const out = new Map<string, TokenCounts>();
    for (const t of tokens) {
      const r = this.tokens.get(`${uid}:${t}`);
      if (r) out.set(t, { spam_hits: r.spam_hits, innocent_hits: r.innocent_hits });
    }
    return out;
  }
  async signature(uid: number, id: string): Promise<StoredSignature | null> {
    return this.signatures.get(`${uid}:${id}`) ?? null;
  }
  async ledger(uid: number, key: string): Promise<LedgerEntry | null> {
    return this.ledgers.get(`${uid}:${key}`) ?? null;
  }
  async preferences(uid: number): Promise<Record<string, string>> {
    return { ...(this.prefs.get(0) ?? {}), ...(this.prefs.get(uid) ?? {}) };
  }
  async apply(deltas: readonly SpamDelta[], opts: ApplyOptions = {}): Promise<void> {
    for (const d of deltas) {
      const lk = `${d.uid}:${d.key}`;
      if (!opts.trustLedger && canon(this.ledgers.get(lk)) !== canon(d.ledger.before)) throw new LedgerConflict(d.uid, d.key);
      for (const t of d.tokens) {
        const k = `${d.uid}:${t.token}`;
        const old = this.tokens.get(k);
        if (!old && t.spamDelta <= 0 && t.innocentDelta <= 0) continue;
        const r = old ?? { spam_hits: 0, innocent_hits: 0, last_hit: d.day };
        r.spam_hits = Math.max(0, r.spam_hits + t.spamDelta);
        r.innocent_hits = Math.max(0, r.innocent_hits + t.innocentDelta);
        if (t.spamDelta > 0 || t.innocentDelta > 0) r.last_hit = r.last_hit > d.day ? r.last_hit : d.day;
        this.tokens.set(k, r);
      }
      const s = this.stats.get(d.uid) ?? { ...ZERO_TOTALS };
      for (const [c, v] of Object.entries(d.stats) as [StatColumn, number][]) s[c] = Math.max(0, s[c] + v);
      this.stats.set(d.uid, s);
      if (d.signature) this.signatures.set(`${d.uid}:${d.signature.id}`, { id: d.signature.id, tokens: d.signature.tokens, createdOn: d.day });
      if (d.ledger.after === null) this.ledgers.delete(lk);
      else this.ledgers.set(lk, d.ledger.after);
    }
  }
}
