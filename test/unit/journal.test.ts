// The delivery journal: concurrent appends are group-committed, one line per delivered
// file in order; the new/ directories handed in are synced in the same round, and a
// directory that cannot be synced fails that delivery (and only that one).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DirSyncError, Journal } from "../../services/smtp/journal.ts";

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
