// The primary's export: one file, `volume`, in a FUSE mount, whose reads come from the
// local image and whose writes and fsyncs go through the protocol core. Mounted with
// big_writes and max_write=128 KiB. It must never touch the file system it serves, and
// it never waits on anything but the local disk and the peer.
import { mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(import.meta.url);

/* The parts of fuse-native used here (it ships no types). */
type Cb = (...args: unknown[]) => void;
interface FuseInstance {
  mount(cb: (err: Error | null) => void): void;
  unmount(cb: (err: Error | null) => void): void;
}
interface FuseClass {
  new (mnt: string, ops: Record<string, unknown>, opts: Record<string, unknown>): FuseInstance;
  unmount(mnt: string, cb: (err: Error | null) => void): void;
  readonly EIO: number;
  readonly ENOENT: number;
  readonly EPERM: number;
  readonly EROFS: number;
  readonly ENOSPC: number;
}

export const FILE_NAME = "volume";

export interface ExportIO {
  readonly sizeBytes: number;
  readInto(buf: Buffer, length: number, offset: number): number;
  /** Resolves to null on success or an error text; the core answers when safe. */
  write(offset: number, data: Buffer): Promise<string | null>;
  flush(): Promise<string | null>;
}

export class FuseExport {
  private fuse: FuseInstance | null = null;
  private opens = 0;
  readonly mountpoint: string;

  constructor(dir: string, private readonly io: ExportIO, private readonly name: string) {
    this.mountpoint = dir;
  }

  get file(): string {
    return join(this.mountpoint, FILE_NAME);
  }

  /** Open handles on the exported file (a loop device holds one). */
  get busy(): boolean {
    return this.opens > 0;
  }

  get mounted(): boolean {
    return this.fuse !== null;
  }

  async mount(): Promise<void> {
    if (this.fuse) return;
    const Fuse = require("fuse-native") as FuseClass;
    mkdirSync(this.mountpoint, { recursive: true });
    // A previous engine that was killed leaves a dead mount behind.
    await new Promise<void>((r) => Fuse.unmount(this.mountpoint, () => r()));
    const now = new Date();
    const fileStat = () => ({ mtime: now, atime: now, ctime: now, size: this.io.sizeBytes, mode: 0o100600, uid: 0, gid: 0, nlink: 1, blocks: Math.ceil(this.io.sizeBytes / 512), blksize: 4096 });
    const dirStat = () => ({ mtime: now, atime: now, ctime: now, size: 4096, mode: 0o40700, uid: 0, gid: 0, nlink: 2 });
    const ops = {
      readdir: (path: string, cb: Cb) => (path === "/" ? cb(0, [FILE_NAME]) : cb(Fuse.ENOENT)),
      getattr: (path: string, cb: Cb) => (path === "/" ? cb(0, dirStat()) : path === `/${FILE_NAME}` ? cb(0, fileStat()) : cb(Fuse.ENOENT)),
      fgetattr: (path: string, _fd: number, cb: Cb) => (path === "/" ? cb(0, dirStat()) : cb(0, fileStat())),
      open: (path: string, _flags: number, cb: Cb) => {
        if (path !== `/${FILE_NAME}`) return cb(Fuse.ENOENT);
        this.opens++;
        cb(0, 42);
      },
      release: (_path: string, _fd: number, cb: Cb) => {
        this.opens = Math.max(0, this.opens - 1);
        cb(0);
      },
      read: (_path: string, _fd: number, buf: Buffer, len: number, pos: number, cb: Cb) => {
        const n = Math.max(0, Math.min(len, this.io.sizeBytes - pos));
        if (n === 0) return cb(0);
        try {
          cb(this.io.readInto(buf, n, pos));
        } catch {
          cb(Fuse.EIO);
        }
      },
      write: (_path: string, _fd: number, buf: Buffer, len: number, pos: number, cb: Cb) => {
        if (pos + len > this.io.sizeBytes) return cb(Fuse.ENOSPC);
        // Copy: fuse-native reuses its buffer once we answer, the peer may not have it yet.
        this.io.write(pos, Buffer.from(buf.subarray(0, len))).then((err) => cb(err ? (err.startsWith("EROFS") ? Fuse.EROFS : Fuse.EIO) : len));
      },
      fsync: (_path: string, _fd: number, _datasync: boolean, cb: Cb) => {
        this.io.flush().then((err) => cb(err ? Fuse.EIO : 0));
      },
      flush: (_path: string, _fd: number, cb: Cb) => cb(0),
      truncate: (_path: string, size: number, cb: Cb) => cb(size === this.io.sizeBytes ? 0 : Fuse.EPERM),
      ftruncate: (_path: string, _fd: number, size: number, cb: Cb) => cb(size === this.io.sizeBytes ? 0 : Fuse.EPERM),
      statfs: (_path: string, cb: Cb) => cb(0, { bsize: 4096, frsize: 4096, blocks: this.io.sizeBytes / 4096, bfree: 0, bavail: 0, files: 1, ffree: 0, favail: 0, fsid: 0, flag: 0, namemax: 255 }),
    };
    // fuse-native has no switches for big_writes/max_write; its fsname option is passed
    // through verbatim, so they ride along there. timeout:false: the engine bounds its
    // own waits (a flush ends when the peer answers or is declared lost).
    const fuse = new Fuse(this.mountpoint, ops, { timeout: false, fsname: `mailha-${this.name},big_writes,max_write=131072`, maxRead: 131072 });
    await new Promise<void>((resolve, reject) => fuse.mount((err) => (err ? reject(err) : resolve())));
    this.fuse = fuse;
  }

  async unmount(): Promise<void> {
    const f = this.fuse;
    if (!f) return;
    this.fuse = null;
    await new Promise<void>((resolve) => f.unmount(() => resolve()));
  }
}
