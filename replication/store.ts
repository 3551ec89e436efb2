// A node's volume on its local disk: the backing image (fully allocated or sparse),
// the metadata (JSON, replaced atomically), the out-of-sync bitmap (only changed 4 KiB
// pages are rewritten) and the activity log (one 4 KiB record). Every save is durable
// (fdatasync) before it returns. Calls are synchronous: the engine is single-threaded
// and the protocol core relies on their order. Reading any of them checks it: a
// damaged file stops the engine with a message naming it and what to do
// (DamagedStateFileError), never a parser's stack trace.
import {
  closeSync, existsSync, fdatasyncSync, fstatSync, fsyncSync, ftruncateSync, mkdirSync, openSync, readFileSync, readSync, statSync, unlinkSync, writeSync,
} from "node:fs";
import { dirname, join } from "node:path";
import type { VolumeAllocation } from "../common/config.ts";
import { DamagedStateFileError, firstProblem, isObject, readJsonState, writeFileDurable } from "../common/fsutil.ts";
import { Bitmap } from "./bitmap.ts";
import { Latency } from "./latency.ts";
import type { Store } from "./machine.ts";
import { BLOCK_SIZE, EMPTY_GI, EXTENT_BYTES, type Meta } from "./types.ts";

export interface VolumeFiles {
  readonly dir: string;
  readonly image: string;
  readonly meta: string;
  readonly bitmap: string;
  readonly al: string;
  readonly preserved: string;
}

export function volumeFiles(dir: string): VolumeFiles {
  return { dir, image: join(dir, "image"), meta: join(dir, "meta.json"), bitmap: join(dir, "bitmap"), al: join(dir, "activity-log"), preserved: join(dir, "preserved") };
}

const PAGE = 4096;
const AL_RECORD_BYTES = 4096;
const AL_MAGIC = 0x6d68616c; // "mhal"

export interface CreateOptions {
  readonly nodeId: string;
  readonly sizeBytes: number;
  /** This side holds the data from the start (`volume create --primary`). */
  readonly primary: boolean;
  readonly newId: () => string;
  /**
   * How the image gets its blocks. "full": zeros are written over the whole image now,
   * as a disk partition is all there from the start: the host cannot run out of space
   * under the volume later, and a flush never waits for the host file system to
   * record a block's allocation. "sparse": blocks are allocated on first write (quick
   * to create, uses only what was written).
   */
  readonly allocation: VolumeAllocation;
  /** Called while a "full" image is written (about once per 256 MiB, and at the end). */
  readonly onProgress?: (writtenBytes: number, totalBytes: number) => void;
}

const ZERO_CHUNK = 4 * 1024 * 1024;
const PROGRESS_EVERY = 256 * 1024 * 1024;

/** Writes zeros over the whole image (a bounded loop: size / 4 MiB chunks); the caller fsyncs. */
export function allocateFully(fd: number, size: number, image: string, onProgress?: CreateOptions["onProgress"]): void {
  const zeros = Buffer.alloc(ZERO_CHUNK);
  let lastReport = 0;
  for (let off = 0; off < size; ) {
    const n = Math.min(ZERO_CHUNK, size - off);
    try {
      const w = writeSync(fd, zeros, 0, n, off);
      if (w <= 0) throw new Error(`writing zeros into ${image} made no progress at ${off}`);
      off += w;
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (e.code === "ENOSPC")
        throw new Error(`not enough space for a fully allocated volume of ${size} bytes at ${image} (wrote ${off}); free space there, or set volume.allocation: sparse`);
      throw err;
    }
    if (onProgress && (off - lastReport >= PROGRESS_EVERY || off === size)) {
      lastReport = off;
      onProgress(off, size);
    }
  }
}

/** Makes a new volume in DIR; refuses to overwrite one. */
export function createVolume(dir: string, o: CreateOptions): Meta {
  const f = volumeFiles(dir);
  if (existsSync(f.meta)) throw new Error(`a volume already exists in ${dir} (remove it first if you really mean to start over)`);
  if (o.sizeBytes % BLOCK_SIZE !== 0) throw new Error(`volume size must be a multiple of ${BLOCK_SIZE}`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const img = openSync(f.image, "w", 0o600);
  let made = false;
  try {
    ftruncateSync(img, o.sizeBytes); // sparse so far: no blocks allocated
    if (o.allocation === "full") allocateFully(img, o.sizeBytes, f.image, o.onProgress);
    fsyncSync(img);
    made = true;
  } finally {
    closeSync(img);
    if (!made) unlinkSync(f.image); // no half-made image left behind
  }
  writeFileDurable(f.bitmap, Buffer.alloc(Math.ceil(o.sizeBytes / BLOCK_SIZE / 8)));
  writeFileDurable(f.al, encodeAL([]));
  const meta: Meta = {
    version: 1,
    nodeId: o.nodeId,
    sizeBytes: o.sizeBytes,
    blockSize: BLOCK_SIZE,
    gi: o.primary ? { ...EMPTY_GI, current: o.newId() } : EMPTY_GI,
    disk: o.primary ? "uptodate" : "inconsistent",
    role: "secondary",
    primarySinceMs: null,
    fresh: true,
    cleanShutdown: true,
    crashedPrimary: false,
    peerOutdated: false,
    preserved: [],
  };
  writeFileDurable(f.meta, JSON.stringify(meta, null, 2));
  return meta;
}

const DISKS = new Set(["uptodate", "consistent", "outdated", "inconsistent", "diskless"]);
const GEN_ID = /^([0-9a-f]{16})?$/;

function giProblem(gi: unknown, what: string): string | null {
  if (!isObject(gi)) return `${what} is missing`;
  const h = gi.history;
  return firstProblem(
    typeof gi.current === "string" && GEN_ID.test(gi.current) ? null : `${what}.current is not a generation id`,
    typeof gi.bitmap === "string" && GEN_ID.test(gi.bitmap) ? null : `${what}.bitmap is not a generation id`,
    Array.isArray(h) && h.length === 2 && h.every((x) => typeof x === "string" && GEN_ID.test(x)) ? null : `${what}.history is not two generation ids`,
  );
}

/** What is wrong with parsed volume metadata (null: nothing). */
export function metaProblem(v: unknown): string | null {
  if (!isObject(v)) return "not an object";
  const size = v.sizeBytes;
  return firstProblem(
    v.version === 1 ? null : `version ${JSON.stringify(v.version)}, not 1`,
    typeof v.nodeId === "string" && v.nodeId !== "" ? null : "no nodeId",
    v.blockSize === BLOCK_SIZE ? null : `blockSize is not ${BLOCK_SIZE}`,
    Number.isSafeInteger(size) && (size as number) > 0 && (size as number) % BLOCK_SIZE === 0 ? null : "sizeBytes is not a positive multiple of the block size",
    giProblem(v.gi, "gi"),
    typeof v.disk === "string" && DISKS.has(v.disk) ? null : `disk ${JSON.stringify(v.disk)} is not a disk state`,
    v.role === "primary" || v.role === "secondary" ? null : `role ${JSON.stringify(v.role)} is not primary or secondary`,
    v.primarySinceMs === null || typeof v.primarySinceMs === "number" ? null : "primarySinceMs is not a number or null",
    ...(["fresh", "cleanShutdown", "crashedPrimary", "peerOutdated"] as const).map((k) => (typeof v[k] === "boolean" ? null : `${k} is not true or false`)),
    Array.isArray(v.preserved) && v.preserved.every((p) => isObject(p) && typeof p.path === "string" && typeof p.atMs === "number" && giProblem(p.gi, "gi") === null)
      ? null
      : "preserved is not a list of copies",
  );
}

/** What to do about a damaged volume file: the data on this node cannot be trusted as it is. */
function volumeRemedy(dir: string): string {
  return (
    "the volume engine will not start on it. If the peer holds the data, make this node a full sync target: " +
    `stop it, move ${dir} aside, run \`mailha volume create\` (without --primary) and start it again. ` +
    "Otherwise restore the file from a backup (a preserved copy under volume/preserved/ holds an older generation)"
  );
}

/** Reads and checks a volume's metadata file (throws DamagedStateFileError when it is damaged). */
export function loadMetaFile(file: string): Meta {
  const m = readJsonState<Meta>(file, metaProblem, volumeRemedy(dirname(file)));
  if (!m) throw new Error(`no volume metadata at ${file}: run \`mailha volume create\` first`);
  return m;
}

function encodeAL(extents: readonly number[]): Buffer {
  const b = Buffer.alloc(AL_RECORD_BYTES);
  const max = AL_RECORD_BYTES / 4 - 2;
  if (extents.length > max) throw new Error(`activity log holds at most ${max} extents`);
  b.writeUInt32LE(AL_MAGIC, 0);
  b.writeUInt32LE(extents.length, 4);
  extents.forEach((e, i) => b.writeUInt32LE(e, 8 + i * 4));
  return b;
}

/** What to do about a damaged activity log: the engine rebuilds it (see the engine's start). */
export const AL_REBUILT = "rewritten empty at start; after an unclean stop as primary every block is marked out of sync first (a full resync)";

function decodeAL(file: string, b: Buffer, extentsMax: number): number[] {
  const damaged = (problem: string) => new DamagedStateFileError(file, problem, AL_REBUILT);
  if (b.length !== AL_RECORD_BYTES) throw damaged(`${b.length} bytes, not ${AL_RECORD_BYTES}`);
  if (b.readUInt32LE(0) !== AL_MAGIC) throw damaged("no activity-log record in it (wrong magic)");
  const n = b.readUInt32LE(4);
  if (n > AL_RECORD_BYTES / 4 - 2) throw damaged(`it claims ${n} extents, more than a record holds`);
  const extents = Array.from({ length: n }, (_, i) => b.readUInt32LE(8 + i * 4));
  const bad = extents.find((e) => e >= extentsMax);
  if (bad !== undefined) throw damaged(`extent ${bad} lies beyond the volume's ${extentsMax} extents`);
  return extents;
}

export class FileStore implements Store {
  readonly files: VolumeFiles;
  readonly sizeBytes: number;
  private readonly imageFd: number;
  private readonly bitmapFd: number;
  private readonly alFd: number;
  private persisted: Uint8Array;
  /** How long the image's fdatasync takes (a flush here, a barrier on the peer). */
  readonly syncLatency = new Latency();

  /** Bytes of the image that hold blocks on this node's disk (a sparse image: fewer than its size). */
  allocatedBytes(): number {
    return fstatSync(this.imageFd).blocks * 512;
  }

  constructor(dir: string) {
    this.files = volumeFiles(dir);
    if (!existsSync(this.files.meta)) throw new Error(`no volume in ${dir}: run \`mailha volume create\` first`);
    const meta = this.loadMeta();
    this.sizeBytes = meta.sizeBytes;
    const missing = [this.files.image, this.files.bitmap, this.files.al].find((f) => !existsSync(f));
    if (missing) throw new DamagedStateFileError(missing, "missing", volumeRemedy(dir));
    const imageBytes = statSync(this.files.image).size;
    if (imageBytes !== meta.sizeBytes) throw new DamagedStateFileError(this.files.image, `${imageBytes} bytes long, the metadata says ${meta.sizeBytes}`, volumeRemedy(dir));
    const bitmapBytes = statSync(this.files.bitmap).size;
    const bitmapWant = Math.ceil(meta.sizeBytes / BLOCK_SIZE / 8);
    if (bitmapBytes !== bitmapWant) throw new DamagedStateFileError(this.files.bitmap, `${bitmapBytes} bytes long, not ${bitmapWant}`, volumeRemedy(dir));
    this.imageFd = openSync(this.files.image, "r+");
    this.bitmapFd = openSync(this.files.bitmap, "r+");
    this.alFd = openSync(this.files.al, "r+");
    this.persisted = new Uint8Array(readFileSync(this.files.bitmap));
  }

  loadMeta(): Meta {
    return loadMetaFile(this.files.meta);
  }

  loadBitmap(): Bitmap {
    return new Bitmap(Math.ceil(this.sizeBytes / BLOCK_SIZE), new Uint8Array(this.persisted));
  }

  /** The logged extents; throws DamagedStateFileError when the record is damaged (a torn write). */
  loadAL(): number[] {
    return decodeAL(this.files.al, readFileSync(this.files.al), Math.ceil(this.sizeBytes / EXTENT_BYTES));
  }

  read(offset: number, length: number): Buffer {
    const buf = Buffer.allocUnsafe(length);
    this.readInto(buf, length, offset);
    return buf;
  }

  /** Reads into a caller's buffer (the FUSE read path), filling to `length`. */
  readInto(buf: Buffer, length: number, offset: number): number {
    let done = 0;
    while (done < length) {
      const n = readSync(this.imageFd, buf, done, length - done, offset + done);
      if (n === 0) {
        buf.fill(0, done, length);
        break;
      }
      done += n;
    }
    return length;
  }

  write(offset: number, data: Buffer): void {
    let done = 0;
    while (done < data.length) done += writeSync(this.imageFd, data, done, data.length - done, offset + done);
  }

  sync(): void {
    const t0 = process.hrtime.bigint();
    fdatasyncSync(this.imageFd);
    this.syncLatency.since(t0);
  }

  saveMeta(meta: Meta): void {
    writeFileDurable(this.files.meta, JSON.stringify(meta, null, 2));
  }

  /** Rewrites only the 4 KiB pages that changed since the last save. */
  saveBitmap(bitmap: Bitmap): void {
    const cur = bitmap.bytes;
    let wrote = false;
    for (let off = 0; off < cur.length; off += PAGE) {
      const end = Math.min(off + PAGE, cur.length);
      let same = true;
      for (let i = off; i < end; i++) {
        if (cur[i] !== this.persisted[i]) {
          same = false;
          break;
        }
      }
      if (same) continue;
      writeSync(this.bitmapFd, cur, off, end - off, off);
      this.persisted.set(cur.subarray(off, end), off);
      wrote = true;
    }
    if (wrote) fdatasyncSync(this.bitmapFd);
  }

  saveAL(extents: readonly number[]): void {
    writeSync(this.alFd, encodeAL(extents), 0, AL_RECORD_BYTES, 0);
    fdatasyncSync(this.alFd);
  }

  close(): void {
    for (const fd of [this.imageFd, this.bitmapFd, this.alFd]) {
      try {
        closeSync(fd);
      } catch {
        // already closed
      }
    }
  }
}
