// The token cache against a real MariaDB (a private mariadbd): what it returns is
// always what MariaDB holds, through its own commits (forwarded, no token read), other
// processes' commits (read afresh), decrements clamped at zero, a purge, and its bound;
// the users' learned totals the same way; generation reads shared between callers; and a
// seeded random schedule of concurrent reads and both kinds of commits compares every
// read with MariaDB's own (the seed is printed on a failure).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import type { Connection } from "mysql2/promise";
import { startScratchMariadb, type ScratchMariadb } from "../fixtures/spam/mariadb.ts";
import { MariadbSpamStore, migrateSpam } from "../../services/spam/store.ts";
import { GenerationReads, TokenCache } from "../../services/spam/token-cache.ts";
import type { StatColumn } from "../../services/spam/classify.ts";
import type { SpamDelta } from "../../services/spam/training.ts";
import { rng } from "../sim/volume-sim.ts";

const DB = "cachetest";
let db: ScratchMariadb;
const conns: Connection[] = [];
const connect = async (): Promise<Connection> => {
  const c = await db.connect(DB);
  conns.push(c);
  return c;
};

before(async () => {
  db = await startScratchMariadb();
  const c = await db.connect();
  conns.push(c);
  await migrateSpam(c, DB);
});
after(async () => {
  for (const c of conns) await c.end().catch(() => undefined);
  await db?.stop();
});

let keys = 0;
const learn = (uid: number, tokens: [string, number, number][], batchable = true, stats: Partial<Record<StatColumn, number>> = {}): SpamDelta => ({
  kind: "spam-delta",
  v: 1,
  uid,
  key: `k${++keys}`,
  rule: "test",
  source: "corpus",
  day: "2026-12-03",
  tokens: tokens.map(([token, spamDelta, innocentDelta]) => ({ uid, token, spamDelta, innocentDelta })),
  stats,
  ledger: { before: null, after: batchable ? { key: `k${keys}`, verdict: null, atClassification: null, applied: { cls: "spam", except: [], stats: {} } } : null },
});
const plain = (m: Map<string, { spam_hits: number; innocent_hits: number }>) => Object.fromEntries([...m].sort(([a], [b]) => (a < b ? -1 : 1)));

test("reads come from memory once read, own commits move the copy forward, anyone else's make it read afresh", async () => {
  const cache = new TokenCache();
  const reader = new MariadbSpamStore(await connect(), DB);
  const own = new MariadbSpamStore(await connect(), DB, (ch) => cache.committed(ch));
  const other = new MariadbSpamStore(await connect(), DB);
  const uid = 11;
  const toks = ["1", "2", "3", "18446744073709551615"];
  await other.apply([learn(uid, [["1", 2, 0], ["2", 0, 1]])]);
  assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks)), plain(await reader.tokenCounts(uid, toks)));
  const m0 = cache.stats.misses;
  assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks)), { "1": { spam_hits: 2, innocent_hits: 0 }, "2": { spam_hits: 0, innocent_hits: 1 } });
  assert.equal(cache.stats.misses, m0, "the second read costs no token read");

  // Own commits: in a batch and one by one, with a decrement below zero (clamped as MariaDB clamps).
  await own.applyBatch([learn(uid, [["1", 1, 0], ["3", 1, 0]]), learn(uid, [["3", 0, 2]])]);
  await own.apply([learn(uid, [["2", 0, -5], ["18446744073709551615", 4, 0]], false)]);
  assert.equal(cache.stats.forwarded, 2);
  const afterOwn = await cache.tokenCounts(reader, uid, toks);
  assert.equal(cache.stats.misses, m0, "own commits need no token read");
  assert.deepEqual(plain(afterOwn), plain(await reader.tokenCounts(uid, toks)));
  assert.deepEqual(plain(afterOwn), { "1": { spam_hits: 3, innocent_hits: 0 }, "18446744073709551615": { spam_hits: 4, innocent_hits: 0 }, "2": { spam_hits: 0, innocent_hits: 0 }, "3": { spam_hits: 1, innocent_hits: 2 } });

  // Two own commits heard of in the other order (two learning connections): both taken, in order.
  const heard: Parameters<TokenCache["committed"]>[0][] = [];
  const late = new MariadbSpamStore(await connect(), DB, (ch) => heard.push(ch));
  await late.apply([learn(uid, [["1", 1, 0]])]);
  await late.apply([learn(uid, [["1", 0, 3]])]);
  const fwd0 = cache.stats.forwarded;
  for (const ch of heard.reverse()) cache.committed(ch);
  assert.equal(cache.stats.forwarded, fwd0 + 2);
  assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks)), plain(await reader.tokenCounts(uid, toks)));
  assert.equal(cache.stats.misses, m0, "no token read");

  // Another process commits while an own commit is under way: the copy behind is not used.
  cache.ownCommitStarted();
  await other.apply([learn(uid, [["1", 7, 0]])]);
  assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks)), plain(await reader.tokenCounts(uid, toks)), "a copy behind is not used while an own commit runs");
  cache.ownCommitEnded();

  // A read that began before an own commit and ends after the copy took it: its values are older than the copy, not kept.
  const fresh = "424242";
  const g = await reader.generation(uid);
  const before = await reader.tokenCountsAt(uid, [fresh]);
  assert.equal(before.gen, g);
  await cache.tokenCounts(reader, uid, toks); // the copy at g
  await own.apply([learn(uid, [[fresh, 2, 0]])]);
  const slow = { tokenCountsAt: async () => before } as unknown as MariadbSpamStore;
  assert.deepEqual(plain(await cache.tokenCounts(slow, uid, [fresh], g + 1)), {}, "what the slow read saw");
  assert.deepEqual(plain(await cache.tokenCounts(reader, uid, [fresh])), { [fresh]: { spam_hits: 2, innocent_hits: 0 } }, "the slow read's older value was not kept");

  // Another process's commit: the copy is stale and read again.
  const stale0 = cache.stats.stale;
  await other.apply([learn(uid, [["3", 5, 0]])]);
  assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks)), plain(await reader.tokenCounts(uid, toks)));
  assert.equal(cache.stats.stale, stale0 + 1);

  // A purge deletes tokens under everyone's copy: read again.
  await (await connect()).query(`UPDATE ${DB}.dspam_token_data SET last_hit = '2020-01-01' WHERE uid = ${uid} AND token = 2`);
  await other.apply([learn(uid, [["2", 1, 0]])]);
  await cache.tokenCounts(reader, uid, toks);
  await (await connect()).query(`UPDATE ${DB}.dspam_token_data SET last_hit = '2020-01-01' WHERE uid = ${uid} AND token = 2`);
  const purged = await other.purge("2026-12-03");
  assert.ok(purged.hapaxes + purged.singleSpam >= 1, "the purge deleted token 2");
  const afterPurge = await cache.tokenCounts(reader, uid, toks);
  assert.equal(afterPurge.has("2"), false);
  assert.deepEqual(plain(afterPurge), plain(await reader.tokenCounts(uid, toks)));
});

test("learned totals: read once, moved forward by own commits (clamped at zero), read afresh after anyone else's; classified counts alone move nothing", async () => {
  const cache = new TokenCache();
  const reader = new MariadbSpamStore(await connect(), DB);
  const own = new MariadbSpamStore(await connect(), DB, (ch) => cache.committed(ch));
  const other = new MariadbSpamStore(await connect(), DB);
  const uid = 41;
  await other.apply([learn(uid, [["7", 1, 0]], true, { spam_learned: 3, innocent_classified: 2 })]);
  assert.deepEqual(await cache.learned(reader, uid), await reader.learned(uid));
  assert.equal((await cache.learned(reader, uid)).spam_learned, 3);
  assert.equal(cache.stats.totalsHits, 1, "the second read is the copy's");
  // Own commits of learned totals alone (no token changes) move the generation and the copy.
  await own.applyBatch([learn(uid, [], true, { innocent_classified: 1, innocent_learned: 2 }), learn(uid, [["7", 0, 1]], true, { innocent_learned: 1 })]);
  await own.apply([learn(uid, [], false, { spam_learned: -5, spam_classified: 1 })]);
  const t = await cache.learned(reader, uid);
  assert.equal(cache.stats.totalsHits, 2, "own commits need no read");
  assert.deepEqual(t, await reader.learned(uid));
  assert.deepEqual(t, { spam_learned: 0, innocent_learned: 3 }, "clamped at zero as MariaDB clamps");
  // Another process's classified counts: the generation stays, the copy is still right.
  const g = await reader.generation(uid);
  await other.apply([learn(uid, [], false, { innocent_classified: 4, spam_misclassified: 1 })]);
  assert.equal(await reader.generation(uid), g, "classified counts alone do not move the generation");
  assert.deepEqual(await cache.learned(reader, uid), await reader.learned(uid));
  assert.equal(cache.stats.totalsHits, 3);
  // Another process's learned totals alone: the copy is stale.
  await other.apply([learn(uid, [], false, { innocent_learned: 4 })]);
  const t2 = await cache.learned(reader, uid);
  assert.equal(cache.stats.totalsHits, 3, "read afresh");
  assert.deepEqual(t2, { spam_learned: 0, innocent_learned: 7 });
  assert.deepEqual(t2, await reader.learned(uid));
});

test("generation reads are shared: one query for everyone waiting, and each caller's answer was read after it asked", async () => {
  const reader = new MariadbSpamStore(await connect(), DB);
  const other = new MariadbSpamStore(await connect(), DB);
  const asked: number[][] = [];
  let release: () => void = () => undefined;
  let gate = Promise.resolve();
  const reads = new GenerationReads(async (uids) => {
    asked.push([...uids]);
    await gate;
    return reader.generations(uids);
  });
  const uid = 51;
  const g0 = await reader.generation(uid);
  // The first read is held; meanwhile a commit lands and more callers ask.
  gate = new Promise((r) => (release = r));
  const first = reads.generation(uid);
  await new Promise((r) => setImmediate(r));
  await other.apply([learn(uid, [["9", 1, 0]])]);
  const later = [reads.generation(uid), reads.generation(uid), reads.generation(52)];
  release();
  const [a, b, c, d] = await Promise.all([first, ...later]);
  assert.ok(a! >= g0);
  assert.equal(b, g0 + 1, "asked after the commit: a read that started after it");
  assert.equal(c, g0 + 1);
  assert.equal(d, await reader.generation(52));
  assert.deepEqual(asked, [[51], [51, 52]], "two queries for four callers, the second for everyone who waited");
  // A failed read fails everyone waiting for it, and the next read runs.
  const failing = new GenerationReads(async (uids) => {
    if (uids.includes(99)) throw new Error("gone");
    return reader.generations(uids);
  });
  await assert.rejects(failing.generation(99), /gone/);
  assert.equal(await failing.generation(uid), g0 + 1);
});

test("with a freshness bound, a read under it answers without a query; own commits move it forward; another's commit is seen once the read is older", async () => {
  const cache = new TokenCache();
  const reader = new MariadbSpamStore(await connect(), DB);
  const other = new MariadbSpamStore(await connect(), DB);
  let now = 1_000;
  let queries = 0;
  const reads = new GenerationReads(
    async (uids) => {
      queries++;
      return reader.generations(uids);
    },
    { freshMs: 200, now: () => now },
  );
  const own = new MariadbSpamStore(await connect(), DB, (ch) => (cache.committed(ch), reads.committed(ch)));
  const uid = 61;
  const toks = ["61001", "61002", "61003"];
  await other.apply([learn(uid, [["61001", 1, 0]])]);
  const g0 = await reads.generation(uid);
  assert.equal(queries, 1);
  assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks, undefined, reads)), plain(await reader.tokenCounts(uid, toks)));
  // Another process commits: within the bound the read before it still answers.
  await other.apply([learn(uid, [["61002", 0, 1]])]);
  now += 150;
  assert.equal(await reads.generation(uid), g0, "under 200 ms old: no query, the generation read then");
  assert.equal(queries, 1);
  const stale = plain(await cache.tokenCounts(reader, uid, toks, undefined, reads));
  assert.deepEqual(stale, { "61001": { spam_hits: 1, innocent_hits: 0 } }, "the counts of exactly that generation, from memory");
  now += 100;
  assert.equal(await reads.generation(uid), g0 + 1, "older than the bound: read again");
  assert.equal(queries, 2);
  assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks, undefined, reads)), plain(await reader.tokenCounts(uid, toks)));
  // An own commit moves the kept generation with the copy: still no query, and exact.
  await own.apply([learn(uid, [["61003", 2, 0]])]);
  now += 50;
  assert.equal(await reads.generation(uid), g0 + 2, "moved forward by the own commit");
  assert.equal(queries, 2);
  const hits = cache.stats.hits;
  assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks, undefined, reads)), plain(await reader.tokenCounts(uid, toks)));
  assert.equal(cache.stats.hits, hits + 3, "all three from the forwarded copy");
  // An own commit whose generation is not the next (another's came between): forgotten, read again.
  await other.apply([learn(uid, [["61001", 1, 0]])]);
  await own.apply([learn(uid, [["61002", 1, 0]])]);
  now += 10;
  assert.equal(await reads.generation(uid), await reader.generation(uid));
  assert.equal(queries, 3);
  assert.ok(reads.served >= 2);
});

test("the cache holds at most its bound of tokens and still returns MariaDB's counts", async () => {
  const cache = new TokenCache(50);
  const reader = new MariadbSpamStore(await connect(), DB);
  const other = new MariadbSpamStore(await connect(), DB);
  for (const uid of [21, 22, 23]) {
    const toks = Array.from({ length: 40 }, (_, i) => String(uid * 1000 + i));
    await other.apply([learn(uid, toks.slice(0, 20).map((t) => [t, 1, 0]))]);
    assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks)), plain(await reader.tokenCounts(uid, toks)));
    assert.ok(cache.stats.entries <= 50, `at most 50 held (${cache.stats.entries})`);
  }
  const big = Array.from({ length: 120 }, (_, i) => String(900_000 + i));
  assert.deepEqual(plain(await cache.tokenCounts(reader, 24, big)), plain(await reader.tokenCounts(24, big)));
  assert.ok(cache.stats.entries <= 50);
});

test("a user's token set: built after enough reads, the tokens it lacks are not read, own commits grow it, anyone else's drops it; every read is MariaDB's", async () => {
  const cache = new TokenCache(100_000, { setAfter: 2 });
  const reader = new MariadbSpamStore(await connect(), DB);
  const own = new MariadbSpamStore(await connect(), DB, (ch) => cache.committed(ch));
  const other = new MariadbSpamStore(await connect(), DB);
  const uid = 41;
  const known = Array.from({ length: 500 }, (_, i) => String(4_100_000_000 + i * 7919));
  await other.apply([learn(uid, known.map((t) => [t, 1, 0]))]);
  const check = async (toks: string[], what: string) => assert.deepEqual(plain(await cache.tokenCounts(reader, uid, toks)), plain(await reader.tokenCounts(uid, toks)), what);
  const fresh = (n: number, base: number) => Array.from({ length: n }, (_, i) => String(base + i * 104729));
  await check([...known.slice(0, 50), ...fresh(20, 1e15)], "first read");
  await check(fresh(20, 2e15), "second read: builds the set");
  assert.equal(cache.stats.setsBuilt, 1);
  let misses = cache.stats.misses;
  await check(fresh(200, 3e15), "a message of new tokens");
  assert.ok(cache.stats.misses - misses <= 20, `the set answers for new tokens (${cache.stats.misses - misses} of 200 read: its false positives)`);
  assert.ok(cache.stats.setSkips >= 180);
  // Own commits add tokens: the set has them, so they are read and counted.
  const added = fresh(30, 4e15);
  cache.ownCommitStarted();
  await own.apply([learn(uid, added.map((t) => [t, 2, 1]))]).finally(() => cache.ownCommitEnded());
  await check([...added, ...known.slice(100, 150)], "after an own commit: what it added is there");
  // Anyone else's commit: the copy and its set go; a token they added is read.
  const theirs = fresh(10, 5e15);
  await other.apply([learn(uid, theirs.map((t) => [t, 0, 3]))]);
  misses = cache.stats.misses;
  await check([...theirs, ...fresh(50, 6e15)], "after another's commit: read afresh");
  assert.ok(cache.stats.misses - misses >= 60, "everything was read again (no set)");
  assert.equal(cache.stats.setsBuilt, 1);
  await check(fresh(20, 7e15), "builds it again");
  assert.equal(cache.stats.setsBuilt, 2);
  await check([...theirs, ...added, ...fresh(100, 8e15)], "the new set has everyone's tokens");
  // A set read at a generation the copy has left meanwhile (an own commit reported during
  // the read) is not used: it lacks that commit's tokens.
  const racing = new TokenCache(100_000, { setAfter: 1 });
  const ownR = new MariadbSpamStore(await connect(), DB, (ch) => racing.committed(ch));
  const late = fresh(10, 9.5e15);
  const slow = Object.create(reader) as MariadbSpamStore;
  slow.tokenSetAt = async (u, max) => {
    const r = await reader.tokenSetAt(u, max);
    racing.ownCommitStarted();
    await ownR.apply([learn(uid, late.map((t) => [t, 1, 1]))]).finally(() => racing.ownCommitEnded());
    return r;
  };
  await racing.tokenCounts(slow, uid, fresh(5, 9.6e15));
  assert.equal(racing.stats.setsBuilt, 0, "the set read before the commit is not kept");
  assert.deepEqual(plain(await racing.tokenCounts(reader, uid, late)), plain(await reader.tokenCounts(uid, late)), "the commit's tokens are read");
  // A user over the bound gets none.
  const small = new TokenCache(100_000, { setAfter: 1, setTokensMax: 100 });
  await small.tokenCounts(reader, uid, fresh(5, 9e15));
  await small.tokenCounts(reader, uid, fresh(5, 9.1e15));
  assert.equal(small.stats.setsBuilt, 0, "more tokens than setTokensMax: no set");
});

for (const [sets, fresh] of [[false, false], [true, false], [true, true]] as const)
test(`seeded random schedules${sets ? " with token sets" : ""}${fresh ? " and generation reads under a freshness bound" : ""}: every read through the cache equals MariaDB's${fresh ? " once the bound has passed" : ""}, with concurrent own and other commits`, async () => {
  const seed = Number(process.env.SEED ?? 20261203);
  const rnd = rng(seed);
  const cache = new TokenCache(400, sets ? { setAfter: 1 } : { setAfter: Infinity });
  // A clock the schedule moves: reads in a round may be up to FRESH ms old; the quiet read comes after it.
  const FRESH = 200;
  let now = 0;
  const gensOf = (truth: MariadbSpamStore) => (process.env.NOSHARE ? undefined : new GenerationReads((u) => truth.generations(u), fresh ? { freshMs: FRESH, now: () => now } : {}));
  let gensRef: GenerationReads | undefined;
  const readers = [new MariadbSpamStore(await connect(), DB), new MariadbSpamStore(await connect(), DB)];
  // A transaction needs its connection to itself (a second BEGIN on it commits the first
  // half done): each of a round's concurrent commits has its own, as a pool gives them.
  const owns: MariadbSpamStore[] = [];
  const others: MariadbSpamStore[] = [];
  for (let i = 0; i < 3; i++) {
    owns.push(new MariadbSpamStore(await connect(), DB, (ch) => (cache.committed(ch), gensRef?.committed(ch))));
    others.push(new MariadbSpamStore(await connect(), DB));
  }
  const truth = new MariadbSpamStore(await connect(), DB);
  const uids = [31, 32];
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  const someTokens = () => Array.from({ length: 1 + Math.floor(rnd() * 30) }, () => String(1 + Math.floor(rnd() * 120)));
  const someStats = (mayDecrement: boolean): Partial<Record<StatColumn, number>> => (rnd() < 0.5 ? { spam_learned: Math.floor(rnd() * 2) - (mayDecrement && rnd() < 0.3 ? 3 : 0), innocent_learned: Math.floor(rnd() * 2), innocent_classified: 1 } : {});
  const change = (uid: number, mayDecrement: boolean) =>
    learn(uid, rnd() < 0.15 ? [] : [...new Set(someTokens())].map((t) => [t, Math.floor(rnd() * 3) - (mayDecrement && rnd() < 0.3 ? 2 : 0), Math.floor(rnd() * 2)]), !mayDecrement, someStats(mayDecrement));
  const gens = gensOf(truth);
  gensRef = gens;
  try {
    for (let round = 0; round < 40; round++) {
      const uid = pick(uids);
      now += Math.floor(rnd() * 150);
      // Commits in flight while reads run; afterwards a quiet read must equal MariaDB's.
      const work: Promise<unknown>[] = [];
      for (let i = 0; i < 3; i++) {
        const r = rnd();
        // Own commits as SMTP makes them: marked under way, so a copy behind waits for their reports.
        const own = (p: () => Promise<void>) => (cache.ownCommitStarted(), p().finally(() => cache.ownCommitEnded()));
        if (r < 0.3) work.push(own(() => owns[i]!.applyBatch([change(uid, false), change(uid, false)])));
        else if (r < 0.55) work.push(own(() => owns[i]!.apply([change(uid, true)])));
        else if (r < 0.7) work.push(others[i]!.apply([change(uid, true)]));
        else if (r < 0.85) work.push(cache.tokenCounts(pick(readers), uid, someTokens(), undefined, gens));
        else work.push(cache.learned(pick(readers), uid, undefined, gens));
      }
      await Promise.all(work);
      now += fresh ? FRESH + 1 : 0;
      // And tokens nobody learned (a message's own: its Message-ID, its Date).
      const toks = someTokens().concat(someTokens(), Array.from({ length: 5 }, () => String(1000 + Math.floor(rnd() * 1e9))));
      const got = plain(await cache.tokenCounts(pick(readers), uid, toks, undefined, rnd() < 0.5 ? gens : undefined));
      assert.deepEqual(got, plain(await truth.tokenCounts(uid, toks)), `round ${round}`);
      assert.deepEqual(await cache.learned(pick(readers), uid, undefined, gens), await truth.learned(uid), `round ${round}: learned totals`);
    }
    assert.ok(cache.stats.forwarded > 0 && cache.stats.hits > 0 && cache.stats.totalsHits > 0, "the schedule used the copies");
    if (fresh && gens) assert.ok(gens.served > 0, `the schedule used fresh generation reads (${gens.served} served, ${gens.reads} queries)`);
    if (sets) assert.ok(cache.stats.setsBuilt > 0 && cache.stats.setSkips > 0, `the schedule used token sets (${cache.stats.setsBuilt} built, ${cache.stats.setSkips} skipped)`);
  } catch (e) {
    console.error(`token cache schedule failed with SEED=${seed}`);
    throw e;
  }
});
