// Preserved copies of a diverged side: the copy holds exactly the image, metadata,
// bitmap and activity log; all-zero chunks stay holes; a full disk fails cleanly and
// leaves nothing behind; a half-made copy from a crash is removed at start; only a
// copy inside the preserved folder can be removed.
import { describe, test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { NoSpaceError, preserveCopy, removeCopy, removePartialCopies } from "../../replication/preserve.ts";

const MiB = 1024 * 1024;
const base = mkdtempSync(join(tmpdir(), "mailha-preserve-"));
after(() => rmSync(base, { recursive: true, force: true }));

function volumeAt(dir: string, sizeBytes: number, dataAt: number[]): { image: string; meta: string; bitmap: string; al: string } {
  mkdirSync(dir, { recursive: true });
  const f = { image: join(dir, "image"), meta: join(dir, "meta.json"), bitmap: join(dir, "bitmap"), al: join(dir, "activity-log") };
  writeFileSync(f.image, Buffer.alloc(0));
  execFileSync("truncate", ["-s", String(sizeBytes), f.image]);
  const fd = Buffer.alloc(4096, 0x5a);
  for (const off of dataAt) execFileSync("dd", [`of=${f.image}`, "bs=4096", `seek=${off / 4096}`, "count=1", "conv=notrunc", "status=none"], { input: fd });
  writeFileSync(f.meta, JSON.stringify({ nodeId: "a", gi: { current: "c1" } }));
  writeFileSync(f.bitmap, Buffer.from([1, 2, 3]));
  writeFileSync(f.al, Buffer.alloc(4096, 7));
  return f;
}

describe("preserved copies", { skip: process.getuid?.() !== 0 ? "needs root (tmpfs)" : false }, () => {
  test("the copy is byte for byte the image, with its metadata, bitmap and activity log; zero chunks stay holes", async () => {
    const src = volumeAt(join(base, "v1"), 64 * MiB, [0, 5 * MiB, 63 * MiB]);
    const preserved = join(base, "v1", "preserved");
    const seen: number[] = [];
    const r = await preserveCopy(src, preserved, "split brain, preserve policy", Date.UTC(2026, 11, 1, 12), (p) => seen.push(p.doneBytes));
    assert.equal(r.path, join(preserved, "2026-12-01T12-00-00-000Z"));
    assert.ok(readFileSync(join(r.path, "image")).equals(readFileSync(src.image)), "the copied image differs from the original");
    for (const [from, name] of [[src.meta, "meta.json"], [src.bitmap, "bitmap"], [src.al, "activity-log"]] as const) {
      assert.ok(readFileSync(join(r.path, name)).equals(readFileSync(from)), `${name} differs`);
    }
    assert.equal(readFileSync(join(r.path, "REASON"), "utf8"), "split brain, preserve policy\n");
    // tmpfs has no reflinks here: a sparse copy, three 1 MiB chunks written.
    if (r.method === "copy") {
      assert.ok(statSync(join(r.path, "image")).blocks * 512 <= 4 * MiB, `the copy takes ${statSync(join(r.path, "image")).blocks * 512} bytes: zero chunks were written`);
      assert.equal(seen.at(-1), 64 * MiB, "progress reaches the image size");
      assert.ok(seen.length >= 64, "progress is reported as the copy goes");
    }
    assert.deepEqual(readdirSync(preserved), ["2026-12-01T12-00-00-000Z"], "no partial directory is left");
  });

  test("not enough room: a clear error naming the folder, and nothing left behind", async (t) => {
    const mnt = join(base, "small");
    mkdirSync(mnt);
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=80m", "tmpfs", mnt]);
    t.after(() => execFileSync("umount", [mnt]));
    // 48 MiB of data in the image; the copy may not eat into the 64 MiB reserve.
    const src = volumeAt(join(base, "v2"), 48 * MiB, Array.from({ length: 48 }, (_, i) => i * MiB));
    const preserved = join(mnt, "preserved");
    await assert.rejects(preserveCopy(src, preserved, "split brain", Date.now(), () => {}), (err: Error) => {
      assert.ok(err instanceof NoSpaceError, `expected a NoSpaceError, got ${err.name}: ${err.message}`);
      assert.match(err.message, new RegExp(`not enough free space in ${preserved}`));
      return true;
    });
    assert.deepEqual(readdirSync(preserved), [], "the partial copy was removed");
  });

  test("a half-made copy from a crash is removed at start; complete copies stay", () => {
    const preserved = join(base, "v3", "preserved");
    mkdirSync(join(preserved, "2026-12-01T10-00-00-000Z"), { recursive: true });
    mkdirSync(join(preserved, "2026-12-01T11-00-00-000Z.partial"), { recursive: true });
    assert.deepEqual(removePartialCopies(preserved), ["2026-12-01T11-00-00-000Z.partial"]);
    assert.deepEqual(readdirSync(preserved), ["2026-12-01T10-00-00-000Z"]);
  });

  test("only a copy inside the preserved folder can be removed", async () => {
    const preserved = join(base, "v4", "preserved");
    mkdirSync(join(preserved, "x"), { recursive: true });
    await assert.rejects(removeCopy(preserved, join(base, "v4")), /refusing to remove/);
    await assert.rejects(removeCopy(preserved, join(preserved, "x", "..", "..")), /refusing to remove/);
    await removeCopy(preserved, join(preserved, "x"));
    assert.equal(existsSync(join(preserved, "x")), false);
  });
});
