// Reference exports for the volume benchmark: the least that any engine behind
// fuse-native + loop must do, measured on the same machine as the real one.
//   export DIR IMAGE SIZE            FUSE file DIR/volume; a write is a pwrite into IMAGE,
//                                    a flush an fdatasync ("passthrough").
//   export DIR IMAGE SIZE PORT       the same, and every write is also shipped to a peer
//                                    on 127.0.0.1:PORT; a flush returns once both images
//                                    are fdatasynced ("minimal protocol C": no metadata,
//                                    bitmap, activity log or generation identifiers).
//   peer IMAGE SIZE                  the peer: listens on a free loopback port (printed),
//                                    writes what it gets, fdatasyncs on a barrier, acks.
// Prints "ready" (the peer: "port N") on stdout once serving; stops on SIGTERM.
// Frames: type (1 data, 2 barrier) u8, offset u64le, length u32le, then the data.
import { fdatasyncSync, ftruncateSync, openSync, readSync, writeSync } from "node:fs";
import { createConnection, createServer, type Socket } from "node:net";
import { FuseExport } from "../../replication/fuse-export.ts";
import { allocateFully } from "../../replication/store.ts";

const HEADER = 13;
const DATA = 1;
const BARRIER = 2;
const PENDING_ACKS_MAX = 1024;

function frame(type: number, offset: number, data?: Buffer): Buffer[] {
  const h = Buffer.alloc(HEADER);
  h[0] = type;
  h.writeBigUInt64LE(BigInt(offset), 1);
  h.writeUInt32LE(data ? data.length : 0, 9);
  return data ? [h, data] : [h];
}

function openImage(path: string, size: number): number {
  const fd = openSync(path, "w+", 0o600);
  ftruncateSync(fd, size);
  allocateFully(fd, size, path); // as the engine's image (volume.allocation: full)
  fdatasyncSync(fd);
  return fd;
}

function writeAll(fd: number, buf: Buffer, start: number, length: number, pos: number): void {
  for (let done = 0; done < length; ) done += writeSync(fd, buf, start + done, length - done, pos + done);
}

function peer(image: string, size: number): void {
  const fd = openImage(image, size);
  const server = createServer((s) => {
    s.setNoDelay(true);
    s.on("error", () => s.destroy()); // the exporter went away: nothing to answer
    let buf: Buffer = Buffer.alloc(0);
    s.on("data", (d: Buffer) => {
      buf = buf.length ? Buffer.concat([buf, d]) : d;
      while (buf.length >= HEADER) {
        const len = buf.readUInt32LE(9);
        if (buf.length < HEADER + len) break;
        if (buf[0] === DATA) writeAll(fd, buf, HEADER, len, Number(buf.readBigUInt64LE(1)));
        else {
          fdatasyncSync(fd);
          s.write(Buffer.from([BARRIER]));
        }
        buf = buf.subarray(HEADER + len);
      }
    });
  });
  server.listen(0, "127.0.0.1", () => {
    const a = server.address();
    process.stdout.write(`port ${typeof a === "object" && a ? a.port : 0}\n`);
  });
  process.on("SIGTERM", () => process.exit(0));
}

async function exporter(dir: string, image: string, size: number, port: number | null): Promise<void> {
  const fd = openImage(image, size);
  let sock: Socket | null = null;
  const acks: (() => void)[] = [];
  let queued: Buffer[] = [];
  let scheduled = false;
  const sendQueued = () => {
    if (!sock || queued.length === 0) return;
    sock.cork();
    for (const b of queued) sock.write(b);
    sock.uncork();
    queued = [];
  };
  if (port !== null) {
    const s = createConnection({ host: "127.0.0.1", port });
    s.setNoDelay(true);
    await new Promise<void>((resolve, reject) => {
      s.once("connect", resolve);
      s.once("error", reject);
    });
    s.on("data", (d: Buffer) => {
      for (let i = 0; i < d.length; i++) acks.shift()?.();
    });
    s.on("close", () => process.exit(1));
    sock = s;
  }
  const fuse = new FuseExport(dir, {
    sizeBytes: size,
    readInto: (buf, len, pos) => {
      let done = 0;
      while (done < len) {
        const n = readSync(fd, buf, done, len - done, pos + done);
        if (n === 0) {
          buf.fill(0, done, len);
          break;
        }
        done += n;
      }
      return len;
    },
    write: async (offset, data) => {
      writeAll(fd, data, 0, data.length, offset);
      if (sock) {
        // As the engine does: answered first, shipped at the end of the event-loop turn.
        queued.push(...frame(DATA, offset, data));
        if (!scheduled) {
          scheduled = true;
          setImmediate(() => {
            scheduled = false;
            sendQueued();
          });
        }
      }
      return null;
    },
    flush: async () => {
      if (!sock) {
        fdatasyncSync(fd);
        return null;
      }
      if (acks.length >= PENDING_ACKS_MAX) return "EIO: too many barriers in flight";
      sendQueued();
      const acked = new Promise<void>((resolve) => acks.push(resolve));
      for (const b of frame(BARRIER, 0)) sock.write(b);
      fdatasyncSync(fd); // the peer syncs meanwhile
      await acked;
      return null;
    },
  }, "reference");
  await fuse.mount();
  process.stdout.write("ready\n");
  process.on("SIGTERM", () => {
    void fuse.unmount().then(() => process.exit(0));
  });
}

const [mode, ...args] = process.argv.slice(2);
if (mode === "peer") peer(args[0]!, Number(args[1]));
else if (mode === "export") await exporter(args[0]!, args[1]!, Number(args[2]), args[3] ? Number(args[3]) : null);
else {
  process.stderr.write("usage: reference-export.ts export DIR IMAGE SIZE [PORT] | peer IMAGE SIZE\n");
  process.exit(2);
}
