// Preserved copies: before a side that diverged (split brain, unrelated data) becomes
// a resync target, its image, metadata, bitmap and activity log are copied aside, for
// the reconciler to mount read-only. The copy is made in `<name>.partial`, every file
// and directory fsynced, then renamed into place and the parent fsynced: a copy that
// exists under its final name is complete and durable; a crash leaves only a
// `.partial` directory, removed at the next start.
//
// The image is cloned (reflink) where the host's file system can (btrfs, XFS:
// instant, blocks shared until written); elsewhere it is copied in 1 MiB chunks,
// all-zero chunks skipped (sparse), with progress. The copy stops, removes what it
// wrote and fails with a message naming the directory when free space would fall
// below the reserve (max(64 MiB, 1% of the file system)): the caller keeps the side
// StandAlone, never overwrites it uncopied.
import { constants, existsSync, mkdirSync, readdirSync, rmSync, statfsSync } from "node:fs";
import { copyFile, open, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { fsyncPathAsync } from "../common/fsutil.ts";

const CHUNK_BYTES = 1024 * 1024;
const RESERVE_MIN_BYTES = 64 * 1024 * 1024;
/** Check free space every this many written bytes (statfs is cheap, not free). */
const SPACE_CHECK_BYTES = 16 * 1024 * 1024;
const PARTIAL = ".partial";

export interface PreserveSource {
  readonly image: string;
  readonly meta: string;
  readonly bitmap: string;
  readonly al: string;
}

export interface PreserveProgress {
  readonly doneBytes: number;
  readonly totalBytes: number;
  readonly method: "reflink" | "copy";
}

export interface PreserveResult {
  readonly path: string;
  readonly method: "reflink" | "copy";
  /** Bytes the copy occupies on disk (what `drop` frees, for a plain copy). */
  readonly diskBytes: number;
}

export class NoSpaceError extends Error {}

function reserveBytes(dir: string): { free: number; reserve: number } {
  const s = statfsSync(dir);
  return { free: s.bavail * s.bsize, reserve: Math.max(RESERVE_MIN_BYTES, Math.floor((s.blocks * s.bsize) / 100)) };
}

function isZero(b: Buffer, len: number): boolean {
  let i = 0;
  for (; i + 8 <= len; i += 8) if (b.readBigUInt64LE(i) !== 0n) return false;
  for (; i < len; i++) if (b[i] !== 0) return false;
  return true;
}

async function cloneImage(src: string, dest: string): Promise<boolean> {
  try {
    await copyFile(src, dest, constants.COPYFILE_FICLONE_FORCE);
    return true;
  } catch {
    await rm(dest, { force: true });
    return false;
  }
}

async function sparseCopy(src: string, dest: string, onProgress: (p: PreserveProgress) => void): Promise<void> {
  const dir = dirname(dest);
  const size = (await stat(src)).size;
  const inp = await open(src, "r");
  const out = await open(dest, "wx", 0o600);
  try {
    const buf = Buffer.allocUnsafe(CHUNK_BYTES);
    let sinceCheck = SPACE_CHECK_BYTES;
    for (let off = 0; off < size; ) {
      const { bytesRead } = await inp.read(buf, 0, Math.min(CHUNK_BYTES, size - off), off);
      if (bytesRead === 0) throw new Error(`the image ${src} ended at ${off} of ${size} bytes while being copied`);
      if (!isZero(buf, bytesRead)) {
        if (sinceCheck >= SPACE_CHECK_BYTES) {
          const { free, reserve } = reserveBytes(dir);
          if (free - CHUNK_BYTES < reserve) throw new NoSpaceError(`not enough free space in ${dir} for a copy of the volume: ${Math.floor(free / 1048576)} MiB free, ${Math.floor(reserve / 1048576)} MiB kept in reserve, the copy reached ${Math.floor(off / 1048576)} of ${Math.floor(size / 1048576)} MiB`);
          sinceCheck = 0;
        }
        await out.write(buf, 0, bytesRead, off);
        sinceCheck += bytesRead;
      }
      off += bytesRead;
      onProgress({ doneBytes: off, totalBytes: size, method: "copy" });
    }
    await out.truncate(size);
    await out.sync();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOSPC") throw new NoSpaceError(`not enough free space in ${dir} for a copy of the volume (ENOSPC)`);
    throw err;
  } finally {
    await inp.close();
    await out.close();
  }
}

/**
 * Copies SRC into `<preservedDir>/<stamp>`; resolves once the copy is complete and
 * durable. On any failure the partial copy is removed and the error says why.
 */
export async function preserveCopy(src: PreserveSource, preservedDir: string, reason: string, nowMs: number, onProgress: (p: PreserveProgress) => void): Promise<PreserveResult> {
  const stamp = new Date(nowMs).toISOString().replace(/[:.]/g, "-");
  const final = join(preservedDir, stamp);
  const tmp = final + PARTIAL;
  mkdirSync(preservedDir, { recursive: true, mode: 0o700 });
  if (existsSync(final)) throw new Error(`${final} exists already`);
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { mode: 0o700 });
  try {
    const imageDest = join(tmp, "image");
    const size = (await stat(src.image)).size;
    let method: "reflink" | "copy" = "reflink";
    if (await cloneImage(src.image, imageDest)) {
      await fsyncPathAsync(imageDest);
      onProgress({ doneBytes: size, totalBytes: size, method });
    } else {
      method = "copy";
      await sparseCopy(src.image, imageDest, onProgress);
    }
    for (const [from, name] of [[src.meta, "meta.json"], [src.bitmap, "bitmap"], [src.al, "activity-log"]] as const) {
      if (!existsSync(from)) continue;
      await writeFile(join(tmp, name), await readFile(from), { mode: 0o600 });
      await fsyncPathAsync(join(tmp, name));
    }
    await writeFile(join(tmp, "REASON"), `${reason}\n`, { mode: 0o600 });
    await fsyncPathAsync(join(tmp, "REASON"));
    await fsyncPathAsync(tmp);
    await rename(tmp, final);
    await fsyncPathAsync(preservedDir);
    const diskBytes = (await stat(join(final, "image"))).blocks * 512;
    return { path: final, method, diskBytes };
  } catch (err) {
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
    throw err;
  }
}

/** Removes copies a crash left half made (only `.partial` directories). */
export function removePartialCopies(preservedDir: string): string[] {
  if (!existsSync(preservedDir)) return [];
  const removed: string[] = [];
  for (const name of readdirSync(preservedDir)) {
    if (!name.endsWith(PARTIAL)) continue;
    rmSync(join(preservedDir, name), { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}

/** Removes a dropped copy's directory; only a direct child of PRESERVEDDIR. */
export async function removeCopy(preservedDir: string, path: string): Promise<void> {
  if (dirname(path) !== preservedDir || basename(path).startsWith(".") || basename(path) === "") throw new Error(`refusing to remove ${path}: not a copy in ${preservedDir}`);
  await rm(path, { recursive: true, force: true });
  await fsyncPathAsync(preservedDir).catch(() => {});
}
