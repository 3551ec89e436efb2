// The token counts a process has read, kept in memory between classifications, exact:
// each user's copy is tagged with the learn generation it was read at
// (mailha_spam_generation, one more at every commit that changes that user's counts,
// store.ts). A classification reads the generation first and uses the copy only at it;
// the tokens the copy lacks are read with the generation in one statement (one read
// view), and kept only if the copy is at that generation, so a copy holds the counts of
// exactly one generation. What the process itself commits moves its copy forward (the
// same increments, clamped at zero as MariaDB clamps); a commit by anyone else (the
// spam worker's retraining, `mailha spam train`, the split-brain merge, a purge, an
// import) makes the next classification read the user's counts afresh (a copy behind
// while an own commit is under way is only passed over: that commit's report is about to
// move it). A token the
// store does not have is kept as absent (most of a message's tokens), so a message of
// known words costs no token reads at all. A user's learned totals (spam_learned,
// innocent_learned: what the probabilities divide by) are kept the same way: every
// commit that changes them moves the generation too.
//
// `GenerationReads` shares generation reads between concurrent classifications: a caller
// is answered by a read that started after it asked (so it sees every commit made
// before), one query for everyone who asked meanwhile; or, with a freshness bound (SMTP
// uses GENERATION_FRESH_MS), by a read that started at most that long before it asked,
// moved forward by own commits: another process's commit is then seen within the bound,
// and the counts used are still exactly those of the generation answered.
//
// A user who gets mail (SET_AFTER_READS reads of missing tokens at one copy) gets a
// token set too (TokenSet: every token they have, as a Bloom filter, read once with the
// generation and grown by own commits): a token it lacks is not in MariaDB, so the
// tokens a message alone has (its Message-ID, Date, Received ids) cost no read.
//
// Bounds: at most maxEntries tokens over all users (least recently used users dropped
// first; a user alone over the bound is not cached beyond it); a shared read asks for
// at most GENERATION_READ_MAX users, the rest wait for the next.
import { LEARNED_COLUMNS, type Learned } from "./classify.ts";
import type { CommittedChange, MariadbSpamStore, SpamStore, TokenCounts } from "./store.ts";

export const TOKEN_CACHE_ENTRIES_MAX = 300_000;

/** A token MariaDB does not have (distinct from a row whose counts are zero, as tokenCounts tells them apart). */
const ABSENT: TokenCounts = Object.freeze({ spam_hits: 0, innocent_hits: 0 });

/**
 * A superset of a user's token rows (a Bloom filter of their hashes): a token it does
 * not have is not in MariaDB, so a classification need not read it. Built from one read
 * of every token of the user at the copy's generation, grown by own commits; it goes
 * with its copy (anyone else's commit drops both). False positives only cost a read.
 */
export class TokenSet {
  private readonly bits: Uint32Array;
  private readonly mask: number;
  size = 0;

  constructor(capacity: number) {
    let m = 1024;
    while (m < capacity * SET_BITS_PER_TOKEN && m < 2 ** 31) m *= 2;
    this.bits = new Uint32Array(m / 32);
    this.mask = m - 1;
  }

  get capacityBits(): number {
    return this.mask + 1;
  }

  /** TOKEN is an unsigned 64-bit hash in decimal: its digits are uniform, two groups of 9 give two hashes. */
  private probe(token: string, f: (bit: number) => boolean): boolean {
    const n = token.length;
    const h1 = Number(token.slice(Math.max(0, n - 9))) || 0;
    const h2 = (Number(token.slice(Math.max(0, n - 18), Math.max(0, n - 9))) || 7) * 2 + 1;
    for (let i = 0; i < SET_HASHES; i++) if (!f((h1 + i * h2) % (this.mask + 1))) return false;
    return true;
  }

  add(token: string): void {
    this.probe(token, (b) => ((this.bits[b >>> 5]! |= 1 << (b & 31)), true));
    this.size++;
  }

  has(token: string): boolean {
    return this.probe(token, (b) => (this.bits[b >>> 5]! & (1 << (b & 31))) !== 0);
  }
}

const SET_BITS_PER_TOKEN = 10;
const SET_HASHES = 7;
/** A user with more tokens than this gets no token set (reads stay per message). */
export const SET_TOKENS_MAX = 1_000_000;
/** Token sets over all users hold at most this many tokens (about 1.25 bytes each); least recently used users' go first. */
export const SET_TOKENS_TOTAL = 4_000_000;
/** Reads of missing tokens at one copy before its user's token set is built (a user who gets mail). */
export const SET_AFTER_READS = 16;

export interface TokenCacheOptions {
  readonly setAfter?: number;
  readonly setTokensMax?: number;
  readonly setTokensTotal?: number;
}

interface UserCopy {
  gen: number;
  readonly counts: Map<string, TokenCounts>;
  /** Every token the user has at `gen` (a superset), once built. */
  set?: TokenSet;
  /** Reads of missing tokens at this copy (the set is built after SET_AFTER_READS). */
  missReads: number;
  /** The user had too many tokens for a set at this copy's generation. */
  noSet?: boolean;
  /** The user's learned totals at `gen`, once read. */
  learned?: Learned;
  /** Own commits heard of before the one that precedes them (two learning connections finish in any order), by generation. */
  readonly ahead: Map<number, CommittedChange>;
}

/** Own commits held for a copy waiting for an earlier one, at most. */
const AHEAD_MAX = 16;

export interface TokenCacheStats {
  hits: number;
  misses: number;
  /** Copies dropped because another process changed the user's counts. */
  stale: number;
  /** Own commits applied to a copy. */
  forwarded: number;
  /** Learned totals served from a copy. */
  totalsHits: number;
  entries: number;
  /** Tokens not read because the user's token set does not have them; token sets built. */
  setSkips: number;
  setsBuilt: number;
}

/** Where a user's generation is read: the store itself, or reads shared between callers. */
export interface GenerationSource {
  generation(uid: number): Promise<number>;
}

/** Users one shared generation read asks for, at most. */
export const GENERATION_READ_MAX = 500;

export interface GenerationReadsOptions {
  /** A read this recent (ms since it started) answers without a query (0: every caller waits for a read after it asked). */
  readonly freshMs?: number;
  readonly now?: () => number;
  /** Users whose last read is kept for freshMs, at most. */
  readonly knownMax?: number;
}

/**
 * Generation reads shared between concurrent callers: whoever asks while no read runs
 * starts one; whoever asks while one runs waits for the next, which starts after the
 * running one ends (so every caller's answer was read after it asked). READ returns
 * the generations of the users given (0 for one without). With freshMs, a caller is
 * answered at once by a read that started at most freshMs before it asked (a bounded
 * staleness: what others committed is seen within freshMs), moved forward by this
 * process's own commits (`committed`, as the token cache is), so its copies stay usable.
 */
export class GenerationReads implements GenerationSource {
  private waiting = new Map<number, { resolve: (g: number) => void; reject: (e: unknown) => void }[]>();
  private running = false;
  /** Each user's last generation read (or moved forward by own commits) and when that read started. */
  private readonly known = new Map<number, { gen: number; at: number }>();
  private readonly freshMs: number;
  private readonly now: () => number;
  private readonly knownMax: number;
  /** Queries made (each answered everyone waiting for it). */
  reads = 0;
  /** Callers answered by a read under freshMs old, without a query. */
  served = 0;

  constructor(
    private readonly read: (uids: readonly number[]) => Promise<Map<number, number>>,
    o: GenerationReadsOptions = {},
  ) {
    this.freshMs = o.freshMs ?? 0;
    this.now = o.now ?? Date.now;
    this.knownMax = o.knownMax ?? 10_000;
  }

  generation(uid: number): Promise<number> {
    const k = this.freshMs > 0 ? this.known.get(uid) : undefined;
    if (k && this.now() - k.at <= this.freshMs) {
      this.served++;
      return Promise.resolve(k.gen);
    }
    return new Promise((resolve, reject) => {
      let l = this.waiting.get(uid);
      if (!l) this.waiting.set(uid, (l = []));
      l.push({ resolve, reject });
      if (!this.running) void this.next();
    });
  }

  /** This process's own commits: a kept generation just before one moves to it; one further behind is dropped (read again). */
  committed(changes: readonly CommittedChange[]): void {
    for (const ch of changes) {
      const k = this.known.get(ch.uid);
      if (!k || ch.gen <= k.gen) continue;
      if (ch.gen === k.gen + 1) k.gen = ch.gen;
      else this.known.delete(ch.uid);
    }
  }

  private remember(uid: number, gen: number, at: number): void {
    const k = this.known.get(uid);
    // An own commit may have moved it past what the read saw: generations only grow.
    this.known.delete(uid);
    this.known.set(uid, { gen: Math.max(gen, k?.gen ?? 0), at });
    if (this.known.size > this.knownMax) this.known.delete(this.known.keys().next().value!);
  }

  private async next(): Promise<void> {
    this.running = true;
    try {
      while (this.waiting.size) {
        const uids = [...this.waiting.keys()].slice(0, GENERATION_READ_MAX);
        const asked = uids.map((u) => [u, this.waiting.get(u)!] as const);
        for (const u of uids) this.waiting.delete(u);
        this.reads++;
        const at = this.now();
        try {
          const gens = await this.read(uids);
          for (const [u, l] of asked) {
            const g = gens.get(u) ?? 0;
            if (this.freshMs > 0) this.remember(u, g, at);
            for (const w of l) w.resolve(g);
          }
        } catch (err) {
          for (const [, l] of asked) for (const w of l) w.reject(err);
        }
      }
    } finally {
      this.running = false;
    }
  }
}

export class TokenCache {
  private readonly users = new Map<number, UserCopy>();
  private entries = 0;
  readonly stats: TokenCacheStats = { hits: 0, misses: 0, stale: 0, forwarded: 0, totalsHits: 0, entries: 0, setSkips: 0, setsBuilt: 0 };

  /** Own commits under way (between ownCommitStarted and ownCommitEnded). */
  private ownInFlight = 0;
  /** Tokens the token sets hold, over all users. */
  private setTokens = 0;
  private readonly setAfter: number;
  private readonly setTokensMax: number;
  private readonly setTokensTotal: number;

  constructor(
    readonly maxEntries = TOKEN_CACHE_ENTRIES_MAX,
    o: TokenCacheOptions = {},
  ) {
    this.setAfter = o.setAfter ?? SET_AFTER_READS;
    this.setTokensMax = o.setTokensMax ?? SET_TOKENS_MAX;
    this.setTokensTotal = o.setTokensTotal ?? SET_TOKENS_TOTAL;
  }

  /** An own commit is about to run: its report (committed) comes before ownCommitEnded. */
  ownCommitStarted(): void {
    this.ownInFlight++;
  }

  ownCommitEnded(): void {
    this.ownInFlight = Math.max(0, this.ownInFlight - 1);
  }

  /**
   * Counts of TOKENS for UID through STORE: the user's generation (GENS, or KNOWN when
   * the caller read it just before), the copy if it is at that generation, and the
   * tokens it lacks with the generation in one statement: they are kept when the copy
   * is at that generation (no commit came between, or only own ones it has taken).
   * Absent tokens are not in the map (as SpamStore.tokenCounts).
   */
  async tokenCounts(store: MariadbSpamStore, uid: number, tokens: readonly string[], known?: number, gens: GenerationSource = store): Promise<Map<string, TokenCounts>> {
    const gen = known ?? (await gens.generation(uid));
    const copy = this.copyAt(uid, gen);
    const out = new Map<string, TokenCounts>();
    const misses: string[] = [];
    let skipped = 0;
    for (const t of tokens) {
      const c = copy?.counts.get(t);
      if (c !== undefined) {
        if (c !== ABSENT) out.set(t, c);
      } else if (copy?.set && !copy.set.has(t)) skipped++;
      else misses.push(t);
    }
    this.stats.hits += tokens.length - misses.length - skipped;
    this.stats.setSkips += skipped;
    this.stats.misses += misses.length;
    if (!misses.length) return out;
    const { counts: got, gen: at } = await store.tokenCountsAt(uid, misses);
    for (const [t, c] of got) out.set(t, c);
    // What was read is exactly the counts at generation AT: kept if the copy is there.
    const kept = this.keep(uid, at, misses, got);
    if (kept && !kept.set && !kept.noSet && ++kept.missReads >= this.setAfter) await this.buildSet(store, uid, kept);
    return out;
  }

  /**
   * Reads every token UID has, with the generation (one statement), into a token set
   * for COPY, if the copy is still at that generation when the read ends (own commits
   * moved it on: built again later) and the user has at most setTokensMax tokens.
   */
  private async buildSet(store: MariadbSpamStore, uid: number, copy: UserCopy): Promise<void> {
    copy.missReads = 0;
    const { tokens, gen } = await store.tokenSetAt(uid, this.setTokensMax);
    if (this.users.get(uid) !== copy || copy.gen !== gen || copy.set) return;
    if (tokens === null) {
      copy.noSet = true;
      return;
    }
    // Room for what own commits add to it before its user's copy goes.
    const set = new TokenSet(tokens.length + Math.max(10_000, tokens.length >> 1));
    for (const t of tokens) set.add(t);
    for (const [u, c] of this.users) {
      if (this.setTokens + tokens.length <= this.setTokensTotal) break;
      if (u !== uid && c.set) this.dropSet(c);
    }
    if (this.setTokens + tokens.length > this.setTokensTotal) return;
    copy.set = set;
    this.setTokens += set.size;
    this.stats.setsBuilt++;
  }

  private dropSet(c: UserCopy): void {
    if (!c.set) return;
    this.setTokens -= c.set.size;
    delete c.set;
  }

  /** UID's learned totals through STORE, kept as the token counts are (GEN: the generation, when just read). */
  async learned(store: MariadbSpamStore, uid: number, known?: number, gens: GenerationSource = store): Promise<Learned> {
    const gen = known ?? (await gens.generation(uid));
    const copy = this.copyAt(uid, gen);
    if (copy?.learned) {
      this.stats.totalsHits++;
      return { ...copy.learned };
    }
    const { learned, gen: at } = await store.learnedAt(uid);
    const c = this.keep(uid, at, [], new Map());
    if (c) c.learned = { ...learned };
    return learned;
  }

  /** UID's copy if it is at GEN; an older one is dropped (stale). */
  private copyAt(uid: number, gen: number): UserCopy | undefined {
    const copy = this.users.get(uid);
    // Behind while an own commit is under way: most likely that commit, not yet heard of
    // (it moves the copy when it reports); not used for this read, not dropped either.
    if (copy && copy.gen < gen && this.ownInFlight > 0) return undefined;
    if (copy && copy.gen < gen) {
      this.drop(uid);
      this.stats.stale++;
      return undefined;
    }
    // Newer: read before an own commit the copy has taken already; this read is MariaDB's alone, and the copy stays.
    return copy && copy.gen === gen ? copy : undefined;
  }

  /**
   * What this process committed: a copy at the generation before moves forward (one
   * heard of early waits, at most AHEAD_MAX, for those before it); a copy whose gap is
   * another process's commit is found stale at its next read.
   */
  committed(changes: readonly CommittedChange[]): void {
    for (const ch of changes) {
      const copy = this.users.get(ch.uid);
      if (!copy || ch.gen <= copy.gen) continue;
      if (ch.gen > copy.gen + 1) {
        // An earlier commit (own, still being reported, or another process's) comes first.
        if (copy.ahead.size >= AHEAD_MAX) {
          this.drop(ch.uid);
          this.stats.stale++;
        } else copy.ahead.set(ch.gen, ch);
        continue;
      }
      this.forward(copy, ch);
      for (let next = copy.ahead.get(copy.gen + 1); next; next = copy.ahead.get(copy.gen + 1)) {
        copy.ahead.delete(next.gen);
        this.forward(copy, next);
      }
    }
  }

  /** CH applied to COPY (at CH's generation - 1), as MariaDB applied it. */
  private forward(copy: UserCopy, ch: CommittedChange): void {
    for (const t of ch.tokens) {
      // An increment makes the row: the set must have it (a superset stays one).
      if (copy.set && (t.spamDelta > 0 || t.innocentDelta > 0) && !copy.set.has(t.token)) {
        copy.set.add(t.token);
        this.setTokens++;
      }
      const c = copy.counts.get(t.token);
      if (c === undefined) continue;
      // MariaDB: an increment makes the row (a decrement alone does not); each column clamps at zero.
      if (c === ABSENT && t.spamDelta <= 0 && t.innocentDelta <= 0) continue;
      copy.counts.set(t.token, { spam_hits: Math.max(0, c.spam_hits + t.spamDelta), innocent_hits: Math.max(0, c.innocent_hits + t.innocentDelta) });
    }
    if (copy.learned) for (const col of LEARNED_COLUMNS) copy.learned[col] = Math.max(0, copy.learned[col] + (ch.stats[col] ?? 0));
    copy.gen = ch.gen;
    this.stats.forwarded++;
  }

  /**
   * A SpamStore that reads token counts and statistics through this cache and everything
   * else from STORE (GEN: the generation, when just read; GENS: where to read it).
   */
  over(store: MariadbSpamStore, gen?: { uid: number; gen: number }, gens: GenerationSource = store): SpamStore {
    const known = (uid: number) => (gen?.uid === uid ? gen.gen : undefined);
    return {
      uidFor: (u) => store.uidFor(u),
      learned: (uid) => this.learned(store, uid, known(uid), gens),
      tokenCounts: (uid, tokens) => this.tokenCounts(store, uid, tokens, known(uid), gens),
      signature: (uid, id) => store.signature(uid, id),
      ledger: (uid, key) => store.ledger(uid, key),
      preferences: (uid) => store.preferences(uid),
      apply: (deltas, opts) => store.apply(deltas, opts),
    };
  }

  private keep(uid: number, gen: number, misses: readonly string[], got: Map<string, TokenCounts>): UserCopy | undefined {
    let copy = this.users.get(uid);
    // Moved on meanwhile (an own commit forwarded it): what was read is older than the copy.
    if (copy && copy.gen !== gen) return undefined;
    if (!copy) copy = { gen, counts: new Map(), ahead: new Map(), missReads: 0 };
    // Most recently used last.
    this.users.delete(uid);
    this.users.set(uid, copy);
    for (const [u] of this.users) {
      if (this.entries + misses.length <= this.maxEntries || u === uid) break;
      this.drop(u);
    }
    for (const t of misses) {
      if (this.entries >= this.maxEntries) break;
      if (!copy.counts.has(t)) this.entries++;
      copy.counts.set(t, got.get(t) ?? ABSENT);
    }
    this.stats.entries = this.entries;
    return copy;
  }

  private drop(uid: number): void {
    const copy = this.users.get(uid);
    if (!copy) return;
    this.dropSet(copy);
    this.entries -= copy.counts.size;
    this.users.delete(uid);
    this.stats.entries = this.entries;
  }
}
