// Delivery into Maildir, all or nothing: the message is streamed into tmp/ of the first
// mailbox (checked on the way: no NUL, no bare LF, no line over 998 characters, size),
// fsynced, hard-linked into tmp/ of every other mailbox, renamed into new/, and each
// new/ directory is fsynced. Only then does the caller answer 250. On any failure the
// tmp files are removed and nothing is left in new/ (a failure of the caller's durable
// step after the renames, the delivery journal, takes the copies out of new/ again).
// Files belong to the mail uid.
import { createHash } from "node:crypto";
import { chownSync, closeSync, existsSync, fchownSync, linkSync, mkdirSync, openSync, renameSync, unlinkSync, writeSync } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { fsyncAsync, fsyncPath } from "../../common/fsutil.ts";
import { GroupSync } from "../../common/groupsync.ts";

export const LINE_MAX = 998;

export class RejectError extends Error {
  constructor(readonly responseCode: number, message: string) {
    super(message);
  }
}

export interface DeliveryOptions {
  readonly mailRoot: string;
  readonly uid: number;
  readonly gid: number;
  /** Prepended verbatim (Return-Path, Received). */
  readonly headers: string;
  readonly sizeMax: number;
}

export interface Delivered {
  readonly files: string[];
  readonly sha256: string;
  readonly size: number;
}

let counter = 0;
const HOST = hostname().replace(/[/:]/g, "_");

/** <mailRoot>/<domain>/<local>/Maildir, created with cur/new/tmp owned by the mail uid. */
export function maildirOf(o: Pick<DeliveryOptions, "mailRoot" | "uid" | "gid">, address: string): string {
  const at = address.lastIndexOf("@");
  const local = address.slice(0, at);
  const domain = address.slice(at + 1);
  if (!/^[a-z0-9._+-]+$/.test(local) || !/^[a-z0-9.-]+$/.test(domain)) throw new RejectError(550, `5.1.3 Bad mailbox name ${address}`);
  const home = join(o.mailRoot, domain, local);
  const md = join(home, "Maildir");
  if (!existsSync(join(md, "tmp"))) {
    for (const d of [join(o.mailRoot, domain), home, md, join(md, "cur"), join(md, "new"), join(md, "tmp")]) {
      if (!existsSync(d)) {
        mkdirSync(d, { mode: 0o700 });
        chownSync(d, o.uid, o.gid);
      }
    }
    fsyncPath(join(o.mailRoot, domain));
    fsyncPath(home);
    fsyncPath(md);
  }
  return md;
}

/**
 * Copies the message stream into FD after HEADERS, checking it on the way: no NUL, no
 * bare LF, no line over 998 characters, not over SIZEMAX (the client's bytes: HEADERS
 * and the fields a submission adds do not count). A bad message is drained and refused
 * with the reply the client gets.
 */
export async function copyChecked(stream: Readable, fd: number | FileHandle, headers: string, sizeMax: number): Promise<{ size: number; sha256: string }> {
  const write = async (b: Buffer) => {
    if (typeof fd === "number") {
      let off = 0;
      while (off < b.length) off += writeSync(fd, b, off, b.length - off);
    } else await fd.write(b);
  };
  const hash = createHash("sha256");
  const head = Buffer.from(headers);
  await write(head);
  hash.update(head);
  let size = head.length;
  let lineLen = 0;
  let prev = 0x0a;
  let problem: RejectError | null = null;
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    if (problem) continue; // drain the rest, keep nothing
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (b === 0) {
        problem = new RejectError(554, "5.6.0 Message contains NUL bytes");
        break;
      }
      if (b === 0x0a) {
        if (prev !== 0x0d) {
          problem = new RejectError(554, "5.6.0 Message contains a bare LF (lines must end with CRLF)");
          break;
        }
        lineLen = 0;
      } else if (b !== 0x0d) {
        if (++lineLen > LINE_MAX) {
          problem = new RejectError(554, `5.6.0 Message contains a line longer than ${LINE_MAX} characters`);
          break;
        }
      }
      prev = b;
    }
    if (problem) continue;
    size += chunk.length;
    // The limit is the client's: neither HEADERS nor fields a submission adds count.
    if (size - head.length - ((stream as Readable & { addedBytes?: number }).addedBytes ?? 0) > sizeMax) {
      problem = new RejectError(552, `5.3.4 Message too big (the limit is ${sizeMax} bytes)`);
      continue;
    }
    await write(chunk);
    hash.update(chunk);
  }
  if ((stream as Readable & { sizeExceeded?: boolean }).sizeExceeded) problem = new RejectError(552, `5.3.4 Message too big (the limit is ${sizeMax} bytes)`);
  if (problem) throw problem;
  return { size, sha256: hash.digest("hex") };
}

const dirSync = new GroupSync();

/** Removes FILES from new/ after a failed durable step; the directories synced as far as they can be. */
function undo(files: readonly string[], newDirs: readonly string[]): void {
  for (const f of files) {
    try {
      unlinkSync(f);
    } catch {
      // gone already
    }
  }
  for (const d of new Set(newDirs)) {
    try {
      fsyncPath(d);
    } catch {
      // the directory is what failed: nothing more to do here
    }
  }
}

/**
 * Streams the message in, checks it, and delivers it to every mailbox, durably.
 * ALONGSIDE, when given, is the caller's own durable step after the renames and must
 * also make the new/ directories it is handed durable (the delivery journal does both
 * in one round); the delivery fails if it rejects. Only the fsyncs wait in the thread
 * pool: the other steps (open, write into the page cache, chown, link, rename) are
 * short and run inline, so a delivery under load does not queue behind the event loop
 * once per step.
 */
export async function deliver(stream: Readable, mailboxes: readonly string[], o: DeliveryOptions, alongside?: (d: Delivered, newDirs: readonly string[]) => Promise<void>): Promise<Delivered> {
  if (mailboxes.length === 0) throw new RejectError(554, "5.1.1 No valid recipients");
  const dirs = mailboxes.map((m) => maildirOf(o, m));
  const base = `${Math.floor(Date.now() / 1000)}.M${process.hrtime.bigint() % 1000000n}P${process.pid}Q${++counter}.${HOST}`;
  const first = join(dirs[0]!, "tmp", base);
  const fd = openSync(first, "wx", 0o600);
  const tmpFiles = [first];
  let closed = false;
  try {
    const { size, sha256 } = await copyChecked(stream, fd, o.headers, o.sizeMax);
    fchownSync(fd, o.uid, o.gid);
    // Concurrent deliveries' fsyncs share the file system's journal commits.
    await fsyncAsync(fd);
    closeSync(fd);
    closed = true;
    for (const d of dirs.slice(1)) {
      const t = join(d, "tmp", base);
      linkSync(first, t);
      tmpFiles.push(t);
    }
    const name = `${base},S=${size}`;
    const files: string[] = [];
    for (const [i, d] of dirs.entries()) {
      const dest = join(d, "new", name);
      renameSync(tmpFiles[i]!, dest);
      files.push(dest);
    }
    tmpFiles.length = 0;
    const delivered = { files, sha256, size };
    const newDirs = dirs.map((d) => join(d, "new"));
    // With ALONGSIDE (the delivery journal), the new/ directories are fsynced in its
    // round, together with its own fsync; without, here.
    try {
      if (alongside) await alongside(delivered, newDirs);
      else await Promise.all(newDirs.map((d) => dirSync.sync(d)));
    } catch (err) {
      // Not durable: taken back out of new/ (the client is refused and sends it again).
      undo(files, newDirs);
      throw err;
    }
    return delivered;
  } finally {
    if (!closed) {
      try {
        closeSync(fd);
      } catch {
        // already closed
      }
    }
    for (const t of tmpFiles) {
      try {
        unlinkSync(t);
      } catch {
        // gone already
      }
    }
  }
}
