// File-system workloads for benchmarks: Maildir-style deliveries (write 4 KiB into
// tmp/, fsync, rename into new/, optionally fsync new/) and a sequential write with
// fsync. Each returns a rate; they run in this process against any mounted directory.
import { closeSync, fsyncSync, mkdirSync, openSync, renameSync, rmSync, writeSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { join } from "node:path";

export function deliveries(dir: string, count: number, dirFsync: boolean): number {
  const root = join(dir, `maildir-${process.pid}-${Date.now()}`);
  for (const d of ["tmp", "new", "cur"]) mkdirSync(join(root, d), { recursive: true });
  const body = randomBytes(4096);
  const newDir = openSync(join(root, "new"), "r");
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < count; i++) {
    const name = `${Date.now()}.${process.pid}_${i}.bench`;
    const tmp = join(root, "tmp", name);
    const fd = openSync(tmp, "w");
    writeSync(fd, body);
    fsyncSync(fd);
    closeSync(fd);
    renameSync(tmp, join(root, "new", name));
    if (dirFsync) fsyncSync(newDir);
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  closeSync(newDir);
  rmSync(root, { recursive: true, force: true });
  return count / seconds;
}

export function sequential(dir: string, bytes: number): number {
  const f = join(dir, `seq-${process.pid}-${Date.now()}`);
  const chunk = randomBytes(1024 * 1024);
  const t0 = process.hrtime.bigint();
  const fd = openSync(f, "w");
  for (let done = 0; done < bytes; done += chunk.length) writeSync(fd, chunk);
  fsyncSync(fd);
  closeSync(fd);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  rmSync(f, { force: true });
  return bytes / seconds / (1024 * 1024);
}
