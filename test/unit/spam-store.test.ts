// The spam store against a real MariaDB (a private mariadbd in a temp dir, killed and
// removed afterwards even when a test fails): DSPAM's schema, deltas applied and read
// back, a stale delta refused, exact counts after classify and retrain through the
// filter, DSPAM's purge rules, and the import of a small DSPAM mysqldump.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Connection } from "mysql2/promise";
import { startScratchMariadb, type ScratchMariadb } from "../fixtures/spam/mariadb.ts";
import { decodeSignature, LedgerConflict, MariadbSpamStore, migrateSpam } from "../../services/spam/store.ts";
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

test("purge follows DSPAM's purge-4.1.sql", async () => {
  await conn.query("DELETE FROM spamtest.dspam_token_data WHERE uid = 9");
  await conn.query(`INSERT INTO spamtest.dspam_token_data VALUES
    (9, 1, 1, 1, '2026-01-01'), (9, 2, 1, 1, '2026-05-10'), (9, 3, 1, 0, '2026-04-20'), (9, 4, 0, 1, '2026-04-20'),
    (9, 5, 20, 20, '2026-01-01'), (9, 6, 20, 20, '2026-05-01'), (9, 7, 1, 0, '2026-05-10')`);
  await conn.query("INSERT INTO spamtest.dspam_preferences VALUES (9, 'trainingMode', 'TEFT')");
  await conn.query("INSERT INTO spamtest.dspam_signature_data VALUES (9, 'old', '', 0, '2026-04-01'), (9, 'new', '', 0, '2026-05-10')");
  const n = await store.purge("2026-05-16");
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
