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
// before), one query for everyone who asked meanwhile.
//
// Bounds: at most maxEntries tokens over all users (least recently used users dropped
// first; a user alone over the bound is not cached beyond it); a shared read asks for
// at most GENERATION_READ_MAX users, the rest wait for the next.
import { LEARNED_COLUMNS, type Learned } from "./classify.ts";
import type { CommittedChange, MariadbSpamStore, SpamStore, TokenCounts } from "./store.ts";

export const TOKEN_CACHE_ENTRIES_MAX = 300_000;

/** A token MariaDB does not have (distinct from a row whose counts are zero, as tokenCounts tells them apart). */
const ABSENT: TokenCounts = Object.freeze({ spam_hits: 0, innocent_hits: 0 });

interface UserCopy {
  gen: number;
  readonly counts: Map<string, TokenCounts>;
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
}

/** Where a user's generation is read: the store itself, or reads shared between callers. */
export interface GenerationSource {
  generation(uid: number): Promise<number>;
}

/** Users one shared generation read asks for, at most. */
export const GENERATION_READ_MAX = 500;

/**
 * Generation reads shared between concurrent callers: whoever asks while no read runs
 * starts one; whoever asks while one runs waits for the next, which starts after the
 * running one ends (so every caller's answer was read after it asked). READ returns
 * the generations of the users given (0 for one without).
 */
export class GenerationReads implements GenerationSource {
  private waiting = new Map<number, { resolve: (g: number) => void; reject: (e: unknown) => void }[]>();
  private running = false;
  /** Queries made (each answered everyone waiting for it). */
  reads = 0;

  constructor(private readonly read: (uids: readonly number[]) => Promise<Map<number, number>>) {}

  generation(uid: number): Promise<number> {
    return new Promise((resolve, reject) => {
      let l = this.waiting.get(uid);
      if (!l) this.waiting.set(uid, (l = []));
      l.push({ resolve, reject });
      if (!this.running) void this.next();
    });
  }

  private async next(): Promise<void> {
    this.running = true;
    try {
      while (this.waiting.size) {
        const uids = [...this.waiting.keys()].slice(0, GENERATION_READ_MAX);
        const asked = uids.map((u) => [u, this.waiting.get(u)!] as const);
        for (const u of uids) this.waiting.delete(u);
        this.reads++;
        try {
          const gens = await this.read(uids);
          for (const [u, l] of asked) for (const w of l) w.resolve(gens.get(u) ?? 0);
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
  readonly stats: TokenCacheStats = { hits: 0, misses: 0, stale: 0, forwarded: 0, totalsHits: 0, entries: 0 };

  /** Own commits under way (between ownCommitStarted and ownCommitEnded). */
  private ownInFlight = 0;

  constructor(readonly maxEntries = TOKEN_CACHE_ENTRIES_MAX) {}

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
    for (const t of tokens) {
      const c = copy?.counts.get(t);
      if (c === undefined) misses.push(t);
      else if (c !== ABSENT) out.set(t, c);
    }
    this.stats.hits += tokens.length - misses.length;
    this.stats.misses += misses.length;
    if (!misses.length) return out;
    const { counts: got, gen: at } = await store.tokenCountsAt(uid, misses);
    for (const [t, c] of got) out.set(t, c);
    // What was read is exactly the counts at generation AT: kept if the copy is there.
    this.keep(uid, at, misses, got);
    return out;
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
    if (!copy) copy = { gen, counts: new Map(), ahead: new Map() };
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
    this.entries -= copy.counts.size;
    this.users.delete(uid);
    this.stats.entries = this.entries;
  }
}
