// The delivery journal: concurrent appends are group-committed, one line per delivered
// file in order; the new/ directories handed in are synced in the same round, and a
// directory that cannot be synced fails that delivery (and only that one). Every entry
// has an hlc stamp that never goes backwards, also across a restart with the clock set
// back; the backup MX's queue id is recorded where a message came with one.
import { test } from "node:test";
import assert from "node:assert/strict";
import { appendFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DirSyncError, Journal } from "../../services/smtp/journal.ts";
import { compareHlc, HLC_DRIFT_MAX_MS, isHlc, parseHlc } from "../../common/hlc.ts";

const dir = mkdtempSync(join(tmpdir(), "mailha-journal-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

const entry = (file: string) => ({ mailbox: "alice@mailha.test", file, sha256: "0".repeat(64), size: 10 });

test("concurrent appends all become durable lines, in order, with the directories synced", async () => {
  const j = new Journal(dir, "a");
  const newDir = join(dir, "Maildir", "new");
  mkdirSync(newDir, { recursive: true });
  await Promise.all(Array.from({ length: 50 }, (_, i) => j.append([entry(`f${i}`)], [newDir])));
  await j.close();
  const lines = readFileSync(join(dir, "journal", "deliveries-a.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as { id: string; file: string });
  assert.deepEqual(lines.map((l) => l.file), Array.from({ length: 50 }, (_, i) => `f${i}`));
  assert.equal(new Set(lines.map((l) => l.id)).size, 50, "ids are unique");
});

test("a directory that cannot be synced fails only the deliveries into it", async () => {
  const j = new Journal(dir, "b");
  const good = join(dir, "good", "new");
  mkdirSync(good, { recursive: true });
  const results = await Promise.allSettled([j.append([entry("ok")], [good]), j.append([entry("lost")], [join(dir, "missing", "new")])]);
  assert.equal(results[0]!.status, "fulfilled");
  assert.equal(results[1]!.status, "rejected");
  assert.ok((results[1] as PromiseRejectedResult).reason instanceof DirSyncError);
  await j.close();
  await assert.rejects(j.append([entry("late")], [good]), (err: unknown) => err instanceof DirSyncError && /closed/.test((err as Error).message), "a delivery after close fails");
});

const lines = (node: string) =>
  readFileSync(join(dir, "journal", `deliveries-${node}.jsonl`), "utf8").trim().split("\n").map((l) => JSON.parse(l) as { hlc: string; file: string; peerQueueId?: string });

test("every entry carries an hlc stamp of this node, strictly increasing in file order", async () => {
  const j = new Journal(dir, "c");
  await Promise.all(Array.from({ length: 30 }, (_, i) => j.append([entry(`h${i}`), entry(`h${i}b`)])));
  await j.close();
  const stamps = lines("c").map((l) => l.hlc);
  assert.equal(stamps.length, 60);
  for (const s of stamps) assert.ok(isHlc(s) && parseHlc(s).node === "c", `a stamp of node c: ${s}`);
  for (let i = 1; i < stamps.length; i++) assert.ok(compareHlc(stamps[i - 1]!, stamps[i]!) < 0, `stamp ${i} (${stamps[i]}) after ${stamps[i - 1]}`);
});

test("after a restart with the wall clock set back, stamps still move past the file's last one", async () => {
  const t = Date.now();
  const ahead = new Journal(dir, "d", () => t + 30_000); // this process's clock ran 30 s fast
  await ahead.append([entry("before restart")]);
  await ahead.close();
  // A torn line at the end (a crash in the middle of a write) is passed over.
  appendFileSync(join(dir, "journal", "deliveries-d.jsonl"), '{"id":"d:1:9","hlc":"99');
  const j = new Journal(dir, "d", () => t);
  assert.equal(j.clockWarning, null);
  await j.append([entry("after restart")]);
  await j.close();
  const all = readFileSync(join(dir, "journal", "deliveries-d.jsonl"), "utf8").split("\n");
  assert.equal(all[1], '{"id":"d:1:9","hlc":"99', "the torn line was ended, not glued to the next entry");
  const [before, after] = all.filter((l) => l.includes('"file"')).map((l) => JSON.parse(l) as { hlc: string });
  assert.ok(compareHlc(before!.hlc, after!.hlc) < 0, `${after!.hlc} sorts after ${before!.hlc}`);
  assert.ok(parseHlc(after!.hlc).wallMs >= t + 30_000, "the wall part carries on from the observed stamp");
});

test("a last stamp beyond the allowed drift (the clock was set back): reported, and new stamps still sort after it", async () => {
  const t = Date.now();
  const far = new Journal(dir, "e", () => t + HLC_DRIFT_MAX_MS + 60_000);
  await far.append([entry("from the future")]);
  await far.close();
  const j = new Journal(dir, "e", () => t);
  assert.match(j.clockWarning ?? "", /ahead of the wall clock .*continue after it/);
  await j.append([entry("after the clock was set back")]);
  await j.close();
  const [before, after] = lines("e").map((l) => (l as unknown as { hlc: string }).hlc);
  assert.ok(compareHlc(before!, after!) < 0, `${after} must sort after ${before}`);
});

test("the backup MX's queue id is recorded with each copy it came with, and only there", async () => {
  const j = new Journal(dir, "f");
  await j.append([{ ...entry("q1"), peerQueueId: "1767000000000-0123456789ab" }, { ...entry("q2"), mailbox: "bob@mailha.test", peerQueueId: "1767000000000-0123456789ab" }]);
  await j.append([entry("plain")]);
  await j.close();
  assert.deepEqual(lines("f").map((l) => [l.file, l.peerQueueId]), [["q1", "1767000000000-0123456789ab"], ["q2", "1767000000000-0123456789ab"], ["plain", undefined]]);
  assert.ok(!readFileSync(join(dir, "journal", "deliveries-f.jsonl"), "utf8").split("\n")[2]!.includes("peerQueueId"));
});
