// The change journal: appends become durable lines with increasing stamps, concurrent
// appends share commits, segments rotate at their bound, only registered kinds with
// well-formed payloads are written, the reader merges every node's segments and SMTP's
// delivery files in HLC order (a torn last line is no problem), and prune removes only
// whole segments older than the watermark, never a live writer's open one.
import { test } from "node:test";
import assert from "node:assert/strict";
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { z } from "zod";
import { compareHlc, formatHlc } from "../../common/hlc.ts";
import { ChangeJournal, pruneJournal, registerKind, type JournalEntry } from "../../services/journal/changes.ts";
import { readJournal } from "../../services/journal/read.ts";
import "../../services/journal/kinds.ts";

const root = mkdtempSync(join(tmpdir(), "mailha-changes-"));
test.after(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const fresh = () => {
  const d = join(root, `d${++n}`);
  mkdirSync(d);
  return d;
};
const sub = (name: string) => ({ user: "alice@mailha.test", name });
const all = async (dataDir: string, o: Parameters<typeof readJournal>[1] = {}) => {
  const out: JournalEntry[] = [];
  for await (const e of readJournal(dataDir, o)) out.push(e);
  return out;
};
const lines = (f: string) => readFileSync(f, "utf8").trim().split("\n").map((l) => JSON.parse(l) as JournalEntry);

test("an append resolves with its durable line: id node:epoch:seq, increasing stamps, the payload", async () => {
  const d = fresh();
  const j = new ChangeJournal(d, "a");
  const e1 = await j.append("subscribe", sub("Sent"));
  const e2 = await j.append("unsubscribe", sub("Sent"));
  await j.close();
  assert.equal(e1.id, `a:${e1.epoch}:1`);
  assert.equal(e2.seq, 2);
  assert.ok(compareHlc(e1.hlc, e2.hlc) < 0, "stamps increase");
  const files = readdirSync(join(d, "journal")).filter((f) => f.endsWith(".jsonl"));
  assert.deepEqual(files, [`changes-a-${e1.epoch}-0.jsonl`]);
  assert.deepEqual(lines(join(d, "journal", files[0]!)), [e1, e2]);
  assert.ok(!readdirSync(join(d, "journal")).some((f) => f.endsWith(".writer")), "close removes the writer record");
});

test("concurrent appends are group-committed: every one durable, in order, in few commits", async () => {
  const d = fresh();
  const j = new ChangeJournal(d, "a");
  const got = await Promise.all(Array.from({ length: 200 }, (_, i) => j.append("subscribe", sub(`F${i}`))));
  await j.close();
  const written = lines(j.currentSegment?.path ?? join(d, "journal", readdirSync(join(d, "journal")).find((f) => f.endsWith(".jsonl"))!));
  assert.deepEqual(written.map((e) => e.name), got.map((e) => e.name));
  assert.deepEqual(written.map((e) => e.seq), Array.from({ length: 200 }, (_, i) => i + 1));
  for (let i = 1; i < written.length; i++) assert.ok(compareHlc(written[i - 1]!.hlc, written[i]!.hlc) < 0);
});

test("a change stamped at a past time keeps it when that is after the last stamp, else goes just after it", async () => {
  let now = 1_800_000_000_000;
  const j = new ChangeJournal(fresh(), "a", { now: () => now });
  const a = await j.append("subscribe", sub("A"), now - 5000);
  assert.equal(a.hlc, formatHlc({ wallMs: now - 5000, counter: 0, node: "a" }));
  const b = await j.append("subscribe", sub("B"), now - 9000);
  assert.equal(b.hlc, formatHlc({ wallMs: now - 5000, counter: 1, node: "a" }), "never before an earlier stamp");
  now += 10;
  const c = await j.append("subscribe", sub("C"));
  assert.equal(c.hlc, formatHlc({ wallMs: now, counter: 0, node: "a" }));
  const d = await j.append("subscribe", sub("D"), now + 60_000);
  assert.ok(compareHlc(d.hlc, formatHlc({ wallMs: now, counter: 99_999, node: "a" })) <= 0, "never after now");
  await j.close();
});

test("segments rotate at their size bound; a new journal's stamps follow the last ones on the volume", async () => {
  const d = fresh();
  const j = new ChangeJournal(d, "a", { segmentBytesMax: 1000 });
  for (let i = 0; i < 30; i++) await j.append("subscribe", sub(`Folder-${i}`));
  await j.close();
  const segs = readdirSync(join(d, "journal")).filter((f) => f.startsWith("changes-") && f.endsWith(".jsonl"));
  assert.ok(segs.length >= 3, `rotated into ${segs.length} segments`);
  let count = 0;
  for (const s of segs) {
    const size = readFileSync(join(d, "journal", s)).length;
    assert.ok(size <= 1000, `${s} is ${size} bytes`);
    count += lines(join(d, "journal", s)).length;
  }
  assert.equal(count, 30);
  // A clock that is behind (a restart after a step back): the stamps still follow.
  const last = (await all(d)).at(-1)!;
  const k = new ChangeJournal(d, "a", { now: () => Date.now() - 30_000 });
  const e = await k.append("subscribe", sub("after restart"));
  await k.close();
  assert.ok(compareHlc(e.hlc, last.hlc) > 0, "after the last stamp on the volume");
  assert.notEqual(e.epoch, last.epoch);
});

test("only registered kinds with well-formed payloads are written; a new kind is one registration", async () => {
  const d = fresh();
  const j = new ChangeJournal(d, "a");
  await assert.rejects(j.append("spam-tokens", { user: "x" }), /unknown kind "spam-tokens"/);
  await assert.rejects(j.append("subscribe", { user: "alice@mailha.test" }), /malformed subscribe payload: name/);
  await assert.rejects(j.append("subscribe", { ...sub("X"), extra: 1 }), /malformed subscribe payload/);
  await assert.rejects(j.append("subscribe", { ...sub("X"), hlc: "x" }), /may not set "hlc"/);
  await assert.rejects(j.append("account", { table: "users", key: "a@b", columns: { password: { plain: "x" } } }), /malformed account payload/);
  assert.throws(() => registerKind("Bad Kind", z.object({})), /bad kind name/);
  registerKind("spam-tokens", z.strictObject({ user: z.string(), deltas: z.record(z.string(), z.number()) }));
  const e = await j.append("spam-tokens", { user: "alice@mailha.test", deltas: { viagra: 3 } });
  await j.close();
  assert.equal(e.kind, "spam-tokens");
  assert.deepEqual((await all(d)).map((x) => x.kind), ["spam-tokens"], "nothing malformed reached the file");
});

test("the reader merges both nodes' segments and SMTP's delivery files in HLC order", async () => {
  const d = fresh();
  let now = 1_800_000_000_000;
  const a = new ChangeJournal(d, "a", { now: () => now });
  const b = new ChangeJournal(d, "b", { now: () => now });
  const expected: string[] = [];
  for (let i = 0; i < 20; i++) {
    now += 7;
    const w = i % 3 === 0 ? b : a;
    expected.push((await w.append("subscribe", sub(`N${i}`))).hlc);
  }
  await Promise.all([a.close(), b.close()]);
  // SMTP's file: one line stamped, older lines without hlc (derived from ts).
  const dl = (i: number, ms: number, hlc?: string) =>
    JSON.stringify({ id: `a:1:${i}`, node: "a", epoch: 1, ...(hlc ? { hlc } : {}), ts: new Date(ms).toISOString(), kind: "delivery", mailbox: "alice@mailha.test", file: `mailha.test/alice/Maildir/new/m${i}`, sha256: "0".repeat(64), size: 1 }) + "\n";
  writeFileSync(join(d, "journal", "deliveries-a.jsonl"), dl(1, 1_800_000_000_010) + dl(2, 1_800_000_000_010) + dl(3, 1_800_000_000_100, formatHlc({ wallMs: 1_800_000_000_100, counter: 3, node: "a" })));
  const got = await all(d);
  assert.equal(got.length, 23);
  for (let i = 1; i < got.length; i++) assert.ok(compareHlc(got[i - 1]!.hlc, got[i]!.hlc) <= 0, `entry ${i} (${got[i]!.hlc}) is not before ${got[i - 1]!.hlc}`);
  const deliveries = got.filter((e) => e.kind === "delivery");
  assert.deepEqual(deliveries.map((e) => e.hlc), [formatHlc({ wallMs: 1_800_000_000_010, counter: 0, node: "a" }), formatHlc({ wallMs: 1_800_000_000_010, counter: 1, node: "a" }), formatHlc({ wallMs: 1_800_000_000_100, counter: 3, node: "a" })]);
  assert.deepEqual(deliveries.map((e) => e.seq), [1, 2, 3], "seq from the id");
  assert.deepEqual(got.filter((e) => e.kind === "subscribe").map((e) => e.hlc), expected);
  // Filters.
  const since = expected[9]!;
  assert.deepEqual((await all(d, { since, kinds: ["subscribe"] })).map((e) => e.hlc), expected.slice(10));
  assert.ok((await all(d, { nodes: ["b"] })).every((e) => e.node === "b"));
});

test("a torn last line (a crash in the middle of an append) is passed over; a bad line in the middle is reported", async () => {
  const d = fresh();
  const j = new ChangeJournal(d, "a");
  await j.append("subscribe", sub("one"));
  await j.append("subscribe", sub("two"));
  const seg = j.currentSegment!.path;
  await j.close();
  appendFileSync(seg, '{"id":"a:1:3","node":"a","ki');
  const problems: string[] = [];
  assert.deepEqual((await all(d, { onProblem: (p) => problems.push(p.problem) })).map((e) => e.name), ["one", "two"]);
  assert.deepEqual(problems, ["torn"]);
  // ext4 after a crash can leave zeros past the last commit.
  writeFileSync(seg, readFileSync(seg, "utf8").replace(/\{"id":"a:1:3".*$/, "") + "\0".repeat(40));
  assert.equal((await all(d)).length, 2);
  // A malformed line followed by good ones.
  const text = readFileSync(seg, "utf8").replace(/\0+$/, "");
  const [l1, l2] = text.trim().split("\n");
  writeFileSync(seg, `${l1}\nnot json\n${l2}\n`);
  problems.length = 0;
  assert.equal((await all(d, { onProblem: (p) => problems.push(p.problem) })).length, 2);
  assert.deepEqual(problems, ["malformed"]);
});

test("many short-lived writers' segments are read without holding them all open", async () => {
  const d = fresh();
  let now = 1_800_000_000_000;
  for (let i = 0; i < 400; i++) {
    now += 3;
    const j = new ChangeJournal(d, "a", { now: () => now });
    await j.append("account", { table: "users", key: `u${i}@mailha.test`, columns: { active: 1 } });
    await j.close();
  }
  const got = await all(d);
  assert.equal(got.length, 400);
  assert.deepEqual(got.map((e) => e.key), Array.from({ length: 400 }, (_, i) => `u${i}@mailha.test`));
});

test("prune removes whole segments older than the watermark, never a newer one or a live writer's open segment", async () => {
  const d = fresh();
  let now = 1_800_000_000_000;
  const old = new ChangeJournal(d, "a", { now: () => now, segmentBytesMax: 600 });
  for (let i = 0; i < 12; i++) {
    now += 10;
    await old.append("subscribe", sub(`old-${i}`));
  }
  await old.close();
  now += 1000;
  const watermark = formatHlc({ wallMs: now, counter: 0, node: "a" });
  // A live writer whose only segment is entirely older than the watermark.
  const live = new ChangeJournal(d, "b", { now: () => now - 500 });
  await live.append("subscribe", sub("live-old"));
  now += 1000;
  const newer = new ChangeJournal(d, "a", { now: () => now });
  await newer.append("subscribe", sub("new"));
  await newer.close();
  // A crashed writer: its record stays, its process is gone.
  const crashed = join(d, "journal", "changes-a-42.writer");
  writeFileSync(crashed, JSON.stringify({ pid: 999_999_999, startTicks: "1", boot: "x" }));
  writeFileSync(join(d, "journal", "changes-a-42-0.jsonl"), "");

  const before = readdirSync(join(d, "journal")).filter((f) => f.endsWith(".jsonl")).length;
  const r = pruneJournal(d, watermark);
  assert.ok(r.removed.length >= 3, `removed ${r.removed.join(", ")}`);
  assert.ok(r.removed.includes("changes-a-42-0.jsonl"), "the crashed writer's empty segment goes");
  assert.ok(!existsSync(crashed), "and its writer record");
  assert.equal(r.kept, before - 1 - r.removed.length + 1);
  const left = (await all(d)).map((e) => e.name);
  assert.deepEqual(left, ["live-old", "new"], "the live writer's segment and the newer one stay");
  // The live writer keeps appending to its (kept) segment.
  now += 1000;
  await live.append("subscribe", sub("live-new"));
  await live.close();
  assert.deepEqual((await all(d)).map((e) => e.name), ["live-old", "new", "live-new"]);
  assert.throws(() => pruneJournal(d, "yesterday"), /malformed stamp/);
});
