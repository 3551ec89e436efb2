// A volume's files on the local disk: a fully allocated image really holds its blocks
// (zeros) and reports progress; a sparse one holds none; a create that runs out of
// space says so, names the setting, and leaves nothing behind; an existing volume is
// never overwritten.
import { test, describe, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createVolume, volumeFiles } from "../../replication/store.ts";

const base = mkdtempSync(join(tmpdir(), "mailha-store-"));
after(() => rmSync(base, { recursive: true, force: true }));

const MiB = 1024 * 1024;
const opts = (allocation: "full" | "sparse", sizeBytes = 16 * MiB) => ({ nodeId: "a", sizeBytes, primary: true, newId: () => "0123456789abcdef", allocation });

describe("volume files", () => {
  test("full: every block of the image is allocated and zero; progress reaches the size", () => {
    const dir = join(base, "full");
    const seen: number[] = [];
    createVolume(dir, { ...opts("full", 20 * MiB), onProgress: (done, total) => { assert.equal(total, 20 * MiB); seen.push(done); } });
    const st = statSync(volumeFiles(dir).image);
    assert.equal(st.size, 20 * MiB);
    assert.ok(st.blocks * 512 >= 20 * MiB, `only ${st.blocks * 512} bytes allocated`);
    assert.equal(seen.at(-1), 20 * MiB);
    assert.ok(readFileSync(volumeFiles(dir).image).every((b) => b === 0));
  });

  test("sparse: the image has its size and (almost) no blocks", () => {
    const dir = join(base, "sparse");
    createVolume(dir, opts("sparse"));
    const st = statSync(volumeFiles(dir).image);
    assert.equal(st.size, 16 * MiB);
    assert.ok(st.blocks * 512 < MiB, `${st.blocks * 512} bytes allocated`);
  });

  test("an existing volume is not overwritten", () => {
    assert.throws(() => createVolume(join(base, "sparse"), opts("full")), /already exists/);
  });

  test("out of space: a clear error naming volume.allocation, and no half-made volume", (t) => {
    const mnt = join(base, "small");
    mkdirSync(mnt);
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt]);
    t.after(() => execFileSync("umount", [mnt]));
    const dir = join(mnt, "vol");
    assert.throws(() => createVolume(dir, opts("full", 32 * MiB)), /not enough space for a fully allocated volume .*volume\.allocation: sparse/);
    assert.equal(existsSync(volumeFiles(dir).image), false);
    assert.deepEqual(readdirSync(dir), []);
    // The same size fits sparse (nothing is written yet), and a retry is possible.
    createVolume(dir, opts("sparse", 32 * MiB));
    assert.ok(existsSync(volumeFiles(dir).meta));
  });
});
