// A node's volume on its local disk: the backing image (fully allocated or sparse),
// the metadata (JSON, replaced atomically), the out-of-sync bitmap (only changed 4 KiB
// pages are rewritten) and the activity log (one 4 KiB record). Every save is durable
// (fdatasync) before it returns. Calls are synchronous: the engine is single-threaded
// and the protocol core relies on their order.
import {
  closeSync, existsSync, fdatasyncSync, fstatSync, fsyncSync, ftruncateSync, mkdirSync, openSync, readFileSync, readSync, statSync, unlinkSync, writeSync,
} from "node:fs";
import { join } from "node:path";
import type { VolumeAllocation } from "../common/config.ts";
import { writeFileDurable } from "../common/fsutil.ts";
import { Bitmap } from "./bitmap.ts";
import { Latency } from "./latency.ts";
import type { Store } from "./machine.ts";
import { BLOCK_SIZE, EMPTY_GI, type Meta } from "./types.ts";

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

function encodeAL(extents: readonly number[]): Buffer {
  const b = Buffer.alloc(AL_RECORD_BYTES);
  const max = AL_RECORD_BYTES / 4 - 2;
  if (extents.length > max) throw new Error(`activity log holds at most ${max} extents`);
  b.writeUInt32LE(AL_MAGIC, 0);
  b.writeUInt32LE(extents.length, 4);
  extents.forEach((e, i) => b.writeUInt32LE(e, 8 + i * 4));
  return b;
}

function decodeAL(b: Buffer): number[] {
  if (b.length < 8 || b.readUInt32LE(0) !== AL_MAGIC) throw new Error("activity log is damaged");
  const n = b.readUInt32LE(4);
  return Array.from({ length: n }, (_, i) => b.readUInt32LE(8 + i * 4));
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
    if (statSync(this.files.image).size !== meta.sizeBytes) throw new Error(`image ${this.files.image} is not ${meta.sizeBytes} bytes long`);
    this.imageFd = openSync(this.files.image, "r+");
    this.bitmapFd = openSync(this.files.bitmap, "r+");
    this.alFd = openSync(this.files.al, "r+");
    this.persisted = new Uint8Array(readFileSync(this.files.bitmap));
  }

  loadMeta(): Meta {
    return JSON.parse(readFileSync(this.files.meta, "utf8")) as Meta;
  }

  loadBitmap(): Bitmap {
    return new Bitmap(Math.ceil(this.sizeBytes / BLOCK_SIZE), new Uint8Array(this.persisted));
  }

  loadAL(): number[] {
    return decodeAL(readFileSync(this.files.al));
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
