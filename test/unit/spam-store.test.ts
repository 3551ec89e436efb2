// The spam store against a real MariaDB (a private mariadbd in a temp dir, killed and
// removed afterwards even when a test fails): DSPAM's schema, deltas applied and read
// back, a stale delta refused, exact counts after classify and retrain through the
// filter, DSPAM's purge rules, and the import of a small DSPAM mysqldump.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Connection } from "mysql2/promise";
import { startScratchMariadb, type ScratchMariadb } from "../fixtures/spam/mariadb.ts";
import { compareTokens, decodeSignature, LedgerConflict, MariadbSpamStore, migrateSpam, tokenLiteral } from "../../services/spam/store.ts";
import { DumpError, ImportConflict, importDspamDump } from "../../services/spam/dump.ts";
import { applyDeltas, classifyMessage, DEFAULT_PREFS, readPreferences, retrain } from "../../services/spam/filter.ts";
import type { SpamDelta } from "../../services/spam/training.ts";
import { ROOT } from "../helpers/cli.ts";

let db: ScratchMariadb;
let conn: Connection;
let store: MariadbSpamStore;

before(async () => {
  db = await startScratchMariadb();
  conn = await db.connect();
  await migrateSpam(conn, "spamtest");
  store = new MariadbSpamStore(conn, "spamtest");
});
after(async () => {
  await conn?.end().catch(() => undefined);
  await db?.stop();
});

const delta = (over: Partial<SpamDelta>): SpamDelta => ({ kind: "spam-delta", v: 1, uid: 7, key: "k1", rule: "test", source: "corpus", day: "2026-05-16", tokens: [], stats: {}, ledger: { before: null, after: null }, ...over });
const entry = (cls: "spam" | "innocent") => ({ key: "k1", verdict: null, atClassification: null, applied: { cls, except: [], stats: {} } });

test("deltas go in as increments, big tokens intact, decrements clamp at zero; a stale ledger is refused", async () => {
  const big = "18446744073709551615";
  await store.apply([delta({ tokens: [{ uid: 7, token: big, spamDelta: 2, innocentDelta: 0 }, { uid: 7, token: "5", spamDelta: 0, innocentDelta: 1 }], stats: { spam_learned: 1, spam_corpusfed: 1 }, ledger: { before: null, after: entry("spam") } })]);
  let c = await store.tokenCounts(7, [big, "5", "6"]);
  assert.deepEqual(c.get(big), { spam_hits: 2, innocent_hits: 0 });
  assert.deepEqual(c.get("5"), { spam_hits: 0, innocent_hits: 1 });
  assert.equal(c.has("6"), false);
  await assert.rejects(store.apply([delta({ tokens: [{ uid: 7, token: "5", spamDelta: 1, innocentDelta: 0 }] })]), LedgerConflict);
  c = await store.tokenCounts(7, ["5"]);
  assert.deepEqual(c.get("5"), { spam_hits: 0, innocent_hits: 1 }, "a refused delta changes nothing");
  await store.apply([delta({ tokens: [{ uid: 7, token: big, spamDelta: -1, innocentDelta: 1 }, { uid: 7, token: "5", spamDelta: 0, innocentDelta: -3 }], stats: { spam_learned: -1, innocent_learned: 1 }, ledger: { before: entry("spam"), after: entry("innocent") } })]);
  c = await store.tokenCounts(7, [big, "5"]);
  assert.deepEqual(c.get(big), { spam_hits: 1, innocent_hits: 1 });
  assert.deepEqual(c.get("5"), { spam_hits: 0, innocent_hits: 0 });
  const t = await store.totals(7);
  assert.equal(t.spam_learned, 0);
  assert.equal(t.innocent_learned, 1);
  assert.equal(t.spam_corpusfed, 1);
  assert.deepEqual(await store.ledger(7, "k1"), entry("innocent"));
});

test("classify then retrain through the filter: the counts are exactly one net class in MariaDB", async () => {
  const uid = await store.uidFor("bob@mailha.test");
  assert.equal(await store.uidFor("bob@mailha.test"), uid);
  const prefs = { ...DEFAULT_PREFS, training_mode: "teft" as const };
  const msg = Buffer.from("From: x@spam.example\r\nSubject: cheap pills now\r\n\r\nbuy cheap pills now, limited offer\r\n");
  const c = await classifyMessage(store, uid, msg, prefs);
  await applyDeltas(store, c.deltas);
  const tokens = c.deltas[0]!.signature!.tokens.map((t) => t.token);
  assert.ok(tokens.length > 20);
  const sig = await store.signature(uid, c.signatureId!);
  assert.deepEqual(sig!.tokens.map((t) => t.token), tokens);
  for (let i = 0; i < 5; i++) {
    await applyDeltas(store, await retrain(store, uid, c.signatureId!, "spam", "error", prefs));
    await applyDeltas(store, await retrain(store, uid, c.signatureId!, "innocent", "error", prefs));
  }
  await applyDeltas(store, await retrain(store, uid, c.signatureId!, "spam", "error", prefs));
  const counts = await store.tokenCounts(uid, tokens);
  for (const t of tokens) assert.deepEqual(counts.get(t), { spam_hits: 1, innocent_hits: 0 }, `token ${t}`);
  const totals = await store.totals(uid);
  assert.equal(totals.spam_learned, 1);
  assert.equal(totals.innocent_learned, 0);
  assert.equal(totals.spam_misclassified, 1);
});

test("purge follows DSPAM's purge-4.1.sql, on any connection (no default database needed)", async () => {
  await conn.query("DELETE FROM spamtest.dspam_token_data WHERE uid = 9");
  await conn.query(`INSERT INTO spamtest.dspam_token_data VALUES
    (9, 1, 1, 1, '2026-01-01'), (9, 2, 1, 1, '2026-05-10'), (9, 3, 1, 0, '2026-04-20'), (9, 4, 0, 1, '2026-04-20'),
    (9, 5, 20, 20, '2026-01-01'), (9, 6, 20, 20, '2026-05-01'), (9, 7, 1, 0, '2026-05-10')`);
  await conn.query("INSERT INTO spamtest.dspam_preferences VALUES (9, 'trainingMode', 'TEFT')");
  await conn.query("INSERT INTO spamtest.dspam_signature_data VALUES (9, 'old', '', 0, '2026-04-01'), (9, 'new', '', 0, '2026-05-10')");
  // On a connection without a default database (the store names every table in full).
  const bare = await db.connect();
  const n = await new MariadbSpamStore(bare, "spamtest").purge("2026-05-16").finally(() => bare.end());
  const [rows] = await conn.query("SELECT CAST(token AS CHAR) AS t FROM spamtest.dspam_token_data WHERE uid = 9 ORDER BY token");
  // 1: hapax older than 30 days; 3, 4: a single hit older than 15 days; 5: unused 90 days (TEFT user)
  assert.deepEqual((rows as { t: string }[]).map((r) => r.t), ["2", "6", "7"]);
  assert.equal(n.hapaxes, 1);
  assert.equal(n.singleSpam + n.singleInnocent, 2);
  assert.equal(n.unused, 1);
  const [sigs] = await conn.query("SELECT signature FROM spamtest.dspam_signature_data WHERE uid = 9");
  assert.deepEqual((sigs as { signature: string }[]).map((r) => r.signature), ["new"]);
});

test("a DSPAM mysqldump loads: tokens, stats, preferences, users, signatures; twice gives the same; a broken one names its line", async () => {
  const file = join(ROOT, "test/fixtures/spam/dspam-dump.sql");
  const first = await importDspamDump(conn, file, "spamtest");
  assert.equal(first.rows.dspam_token_data, 5);
  await assert.rejects(importDspamDump(conn, file, "spamtest"), ImportConflict, "users with learned data are not imported over");
  await importDspamDump(conn, file, "spamtest", { replace: true });
  // DSPAM's users are mailha's by address (uids 1 and 2 are other tests' users here).
  const alice = await store.uidFor("alice@example.org");
  const obrien = await store.uidFor("o'brien@example.org");
  assert.notEqual(alice, obrien, `DSPAM's uids 1 and 2 became mailha's ${alice} and ${obrien}`);
  const c = await store.tokenCounts(alice, ["7859961779775314061", "6035123792567599104", "18446744073709551615"]);
  assert.deepEqual(c.get("7859961779775314061"), { spam_hits: 42, innocent_hits: 0 });
  assert.deepEqual(c.get("18446744073709551615"), { spam_hits: 1, innocent_hits: 0 });
  const t = await store.totals(alice);
  assert.equal(t.spam_learned, 250);
  assert.equal(t.innocent_classified, 40);
  const prefs = await readPreferences(store, alice);
  assert.equal(prefs.training_mode, "toe");
  assert.equal(prefs.spam_action, "quarantine");
  assert.equal((await readPreferences(store, obrien)).training_mode, "teft", "uid 0's preferences are the defaults");
  const sig = await store.signature(alice, "1,4f4fa3b5123456789");
  assert.equal(sig!.tokens.length, 2);
  assert.equal(sig!.tokens[0]!.frequency, 1);
  assert.deepEqual(decodeSignature(Buffer.alloc(16)), [{ token: "0", frequency: 0 }]);
  await assert.rejects(importDspamDump(conn, join(ROOT, "test/fixtures/spam/bad-dump.sql"), "spamtest"), (e: unknown) => e instanceof DumpError && e.line === 3);
});

test("concurrent deliveries to one user, each on its own connection, all apply (no deadlock lost), and the counts are their sum", async () => {
  const N = 24;
  const conns = await Promise.all(Array.from({ length: 8 }, () => db.connect()));
  try {
    const uid = 99;
    const shared = Array.from({ length: 300 }, (_, i) => String(1000 + i * 7919));
    const deltas = Array.from({ length: N }, (_, k) =>
      delta({ uid, key: `sig-${k}`, source: "classification", tokens: [...shared].sort(() => (k % 2 ? 1 : -1)).map((token) => ({ uid, token, spamDelta: 0, innocentDelta: 1 })), stats: { innocent_learned: 1 }, ledger: { before: null, after: { ...entry("innocent"), key: `sig-${k}` } } }),
    );
    // Every connection applies its share at once.
    await Promise.all(conns.map((c, i) => (async () => {
      const s = new MariadbSpamStore(c, "spamtest");
      for (let k = i; k < N; k += conns.length) await s.apply([deltas[k]!]);
    })()));
    const counts = await store.tokenCounts(uid, shared);
    assert.ok(shared.every((t) => counts.get(t)?.innocent_hits === N), "every token counted once per delivery");
    assert.equal((await store.totals(uid)).innocent_learned, N);
  } finally {
    await Promise.all(conns.map((c) => c.end().catch(() => undefined)));
  }
});

test("a batch of deliveries' learning in one transaction: the counts, stats, ledger rows and signatures are those of applying each alone; two batches at once do not deadlock; a key already learned fails the whole batch and changes nothing", async () => {
  const mk = (uid: number, k: number, tokens: string[], cls: "spam" | "innocent") =>
    delta({
      uid,
      key: `b-${uid}-${k}`,
      source: "classification",
      day: k % 2 ? "2026-05-17" : "2026-05-16",
      tokens: tokens.map((token) => ({ uid, token, spamDelta: cls === "spam" ? 1 : 0, innocentDelta: cls === "innocent" ? 1 : 0 })),
      stats: cls === "spam" ? { spam_learned: 1, spam_classified: 1 } : { innocent_learned: 1, innocent_classified: 1 },
      ledger: { before: null, after: { ...entry(cls), key: `b-${uid}-${k}` } },
      signature: { id: `b-${uid}-${k}`, tokens: tokens.map((token) => ({ token, frequency: 1 })) },
    });
  const shared = Array.from({ length: 200 }, (_, i) => String(5000 + i * 104729));
  const batches = [0, 1].map((b) => Array.from({ length: 20 }, (_, i) => mk(i % 2 ? 201 : 202, b * 100 + i, shared.slice(i * 5, i * 5 + 120), i % 3 ? "innocent" : "spam")));
  const conns = await Promise.all([db.connect(), db.connect()]);
  try {
    await Promise.all(batches.map((b, i) => new MariadbSpamStore(conns[i]!, "spamtest").applyBatch(b)));
  } finally {
    await Promise.all(conns.map((c) => c.end().catch(() => undefined)));
  }
  const all = batches.flat();
  for (const uid of [201, 202]) {
    const mine = all.filter((d) => d.uid === uid);
    const want = new Map<string, { spam_hits: number; innocent_hits: number }>();
    for (const d of mine) for (const t of d.tokens) {
      const w = want.get(t.token) ?? { spam_hits: 0, innocent_hits: 0 };
      w.spam_hits += t.spamDelta;
      w.innocent_hits += t.innocentDelta;
      want.set(t.token, w);
    }
    const got = await store.tokenCounts(uid, shared);
    assert.deepEqual(new Map([...got].sort()), new Map([...want].sort()), `uid ${uid}: the sums of every delta`);
    const t = await store.totals(uid);
    assert.equal(t.spam_learned, mine.filter((d) => d.stats.spam_learned).length);
    assert.equal(t.innocent_learned, mine.filter((d) => d.stats.innocent_learned).length);
    for (const d of mine) {
      assert.deepEqual(await store.ledger(uid, d.key), d.ledger.after, `ledger ${d.key}`);
      assert.deepEqual((await store.signature(uid, d.key))?.tokens.map((x) => x.token), d.signature!.tokens.map((x) => x.token));
    }
  }
  // A key learned already: nothing of the batch goes in.
  const before = await store.tokenCounts(201, shared);
  const totals = await store.totals(201);
  await assert.rejects(store.applyBatch([mk(201, 900, shared.slice(0, 10), "spam"), mk(201, 1, shared.slice(0, 10), "spam")]), LedgerConflict);
  assert.deepEqual(await store.tokenCounts(201, shared), before);
  assert.deepEqual(await store.totals(201), totals);
  assert.equal(await store.ledger(201, "b-201-900"), null);
});

test("tokens sort in numeric order without BigInt, and a token over 2^64-1 is refused (seeded)", () => {
  let x = 0x9e3779b97f4a7c15n;
  const next = () => (x = (x * 6364136223846793005n + 1442695040888963407n) & 0xffffffffffffffffn);
  const tokens = ["0", "00", "007", "7", "18446744073709551615", "9999999999999999999", "10000000000000000000"];
  for (let i = 0; i < 2000; i++) tokens.push((next() >> BigInt(Number(next() % 64n))).toString());
  const want = [...tokens].sort((a, b) => (BigInt(a) < BigInt(b) ? -1 : BigInt(a) > BigInt(b) ? 1 : 0));
  assert.deepEqual([...tokens].sort(compareTokens).map((t) => BigInt(t)), want.map((t) => BigInt(t)));
  assert.equal(tokenLiteral("18446744073709551615"), "18446744073709551615");
  assert.throws(() => tokenLiteral("18446744073709551616"), /unsigned 64-bit/);
  assert.throws(() => tokenLiteral("99999999999999999999"), /unsigned 64-bit/);
  assert.throws(() => tokenLiteral("1e5"), /unsigned 64-bit/);
});

test("a TOE classification that learns nothing is counted apart (no signature, no ledger row); its retrains from the delivered message do what a recorded one's do", async () => {
  const prefs = { ...DEFAULT_PREFS, training_mode: "toe" as const };
  const msg = Buffer.from("From: x@spam.example\r\nSubject: cheap pills now\r\n\r\nbuy cheap pills now, limited offer, cheap pills\r\n");
  // Two users past TOE's warm-up, the same counts: one classified as SMTP does now, one recorded.
  const setUp = async (user: string) => {
    const uid = await store.uidFor(user);
    await store.apply([delta({ uid, key: `warm-${user}`, stats: { spam_learned: 150, innocent_learned: 150 }, ledger: { before: null, after: { ...entry("spam"), key: `warm-${user}`, applied: { cls: null, except: [], stats: { spam_learned: 150, innocent_learned: 150 } } } } })]);
    return uid;
  };
  const [a, r] = [await setUp("apart@mailha.test"), await setUp("recorded@mailha.test")];
  const ca = await classifyMessage(store, a, msg, prefs, { countsApart: true });
  const cr = await classifyMessage(store, r, msg, prefs);
  assert.equal(ca.result, cr.result);
  assert.deepEqual(ca.deltas, [], "nothing to write for it");
  assert.deepEqual(ca.counted, { [`${ca.result}_classified`]: 1 }, "its count, for the caller to add up");
  assert.match(ca.signatureId!, new RegExp(`^${a}\\.${ca.result === "spam" ? "s" : "i"}[0-9a-f]+$`), "an unrecorded signature names its verdict");
  assert.ok(ca.signatureId!.length <= 32);
  assert.equal(cr.deltas.length, 1, "a recorded one has its delta");
  await applyDeltas(store, cr.deltas);
  assert.equal(await store.signature(a, ca.signatureId!), null);
  assert.equal(await store.ledger(a, ca.signatureId!), null);
  // What the mailbox holds: the fields, then the message (retraining finds the signature there).
  const delivered = (c: typeof ca) => Buffer.concat([Buffer.from(Object.entries(c.headers).map(([k, v]) => `${k}: ${v}\r\n`).join("")), msg]);
  const other = ca.result === "spam" ? "innocent" : "spam";
  const step = async (cls: "spam" | "innocent") => {
    const da = await retrain(store, a, delivered(ca), cls, "error", prefs);
    const dr = await retrain(store, r, delivered(cr), cls, "error", prefs);
    await applyDeltas(store, da);
    await applyDeltas(store, dr);
    return { da, dr };
  };
  const tokensOf = (ds: SpamDelta[]) => ds.flatMap((d) => d.tokens.map((t) => [t.token, t.spamDelta, t.innocentDelta].join(":"))).sort();
  const statsOf = (ds: SpamDelta[]) => ds.map((d) => d.stats);
  // The verdict again: nothing, for both.
  let s = await step(ca.result);
  assert.deepEqual([s.da, s.dr], [[], []], "a retrain to the verdict changes nothing");
  // The other class: the right class learned, the error counted; the same for both.
  s = await step(other);
  assert.ok(tokensOf(s.da).length > 10);
  assert.deepEqual(tokensOf(s.da), tokensOf(s.dr), "the same tokens learned");
  assert.deepEqual(statsOf(s.da), [{ [`${other}_learned`]: 1, [`${other}_misclassified`]: 1 }]);
  assert.deepEqual(statsOf(s.da), statsOf(s.dr));
  // Back and forth: one net class each time, the same for both.
  for (const cls of [ca.result, other, ca.result] as const) {
    s = await step(cls);
    assert.deepEqual(tokensOf(s.da), tokensOf(s.dr), `back to ${cls}: the same`);
  }
  const [ta, tr] = [await store.totals(a), await store.totals(r)];
  for (const k of ["spam_learned", "innocent_learned", "spam_misclassified", "innocent_misclassified"] as const) assert.equal(ta[k], tr[k], k);
  assert.equal(ta[`${ca.result}_classified`], 0, "the apart count is the caller's to add");
  assert.equal(tr[`${cr.result}_classified`], 1);
  const counts = await store.tokenCounts(a, cr.deltas[0]!.signature!.tokens.map((t) => t.token));
  assert.ok([...counts.values()].every((c) => c.spam_hits === 0 && c.innocent_hits === 0), "back at the verdict: nothing learned");
});
