// Delivery into Maildir, all or nothing: the message is streamed in (checked on the
// way: no NUL, no bare LF, no line over 998 characters, size), held in memory or spilled
// into tmp/ of the first mailbox, optionally planned per mailbox (the spam filter: fields
// to add, a folder such as Junk), written as one file per distinct plan, fsynced,
// hard-linked into tmp/ of every other mailbox of the plan, renamed into new/, and each
// new/ directory is fsynced. Only then does the caller answer 250. On any failure the
// tmp files are removed and nothing is left in new/ (a failure of the caller's durable
// step after the renames, the delivery journal, takes the copies out of new/ again).
// Files belong to the mail uid.
import { createHash } from "node:crypto";
import { chownSync, closeSync, createReadStream, existsSync, fchownSync, linkSync, mkdirSync, openSync, readSync, renameSync, unlinkSync, writeSync } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import { hostname } from "node:os";
import { dirname, join } from "node:path";
import { Readable } from "node:stream";
import { fsyncAsync, fsyncPath } from "../../common/fsutil.ts";
import { GroupSync } from "../../common/groupsync.ts";
import { QUARANTINE_DIR } from "../journal/maildir.ts";

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

/** One mailbox's copy: its file in new/ (of INBOX or a folder) and what it holds. */
export interface Copy {
  readonly file: string;
  readonly sha256: string;
  readonly size: number;
  /** Bytes of fields a plan added (inserted after the delivery's own HEADERS); 0 for none. */
  readonly added: number;
}

export interface Delivered {
  /** Per mailbox, in the order given. */
  readonly files: string[];
  readonly copies: Copy[];
  /** The first copy's. */
  readonly sha256: string;
  readonly size: number;
}

/**
 * What a planner (the spam filter) decided for one mailbox: FIELDS (whole header lines,
 * CRLF-terminated, or "") inserted after the delivery's own trace fields, and FOLDER,
 * the Maildir++ folder directory (`.Junk`), "" for INBOX, or QUARANTINE_DIR (the spam
 * quarantine beside the Maildir, services/spam/quarantine.ts).
 */
export interface MailboxPlan {
  readonly fields: string;
  readonly folder: string;
}

/**
 * Plans every mailbox of a delivery from HEAD (the trace fields and the message, at most
 * PLAN_HEAD_MAX bytes; WHOLE when that is all of it), one plan per mailbox in order. It
 * is the planner's duty to answer in bounded time and never to reject: a failure of the
 * filter must not fail the delivery.
 */
export type Planner = (head: Buffer, whole: boolean) => Promise<readonly MailboxPlan[]>;

/** How much of a message a planner sees (the tokenizer's own cap). */
export const PLAN_HEAD_MAX = 4 * 1024 * 1024;
/** A message up to this size is held in memory until its files are written; a bigger one spills into tmp/. */
export const SPILL_BYTES = 1024 * 1024;
const COPY_CHUNK = 1024 * 1024;

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
export async function copyChecked(stream: Readable, fd: number | FileHandle | Spool, headers: string, sizeMax: number): Promise<{ size: number; sha256: string }> {
  const write = async (b: Buffer) => {
    if (typeof fd === "number") writeAll(fd, b);
    else await fd.write(b);
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

function writeAll(fd: number, b: Buffer): void {
  let off = 0;
  while (off < b.length) off += writeSync(fd, b, off, b.length - off);
}

/**
 * Where a message goes while it streams in: memory up to SPILL_BYTES, then a file in
 * tmp/ (PATH, never fsynced: it is a source for the copies, or becomes one and is
 * fsynced then).
 */
export class Spool {
  private chunks: Buffer[] = [];
  private fd: number | null = null;
  bytes = 0;

  constructor(readonly path: string) {}

  get spilled(): boolean {
    return this.fd !== null;
  }

  write(b: Buffer): void {
    if (this.fd === null && this.bytes + b.length <= SPILL_BYTES) {
      this.chunks.push(b);
      this.bytes += b.length;
      return;
    }
    if (this.fd === null) {
      this.fd = openSync(this.path, "wx+", 0o600);
      writeAll(this.fd, Buffer.concat(this.chunks));
      this.chunks = [];
    }
    writeAll(this.fd, b);
    this.bytes += b.length;
  }

  /** The whole message (not spilled). */
  memory(): Buffer {
    return Buffer.concat(this.chunks);
  }

  /** The first MAX bytes. */
  head(max: number): Buffer {
    if (this.fd === null) return this.memory().subarray(0, max);
    return readAt(this.fd, 0, Math.min(max, this.bytes));
  }

  /** The spilled file's descriptor (spilled only). */
  get file(): number {
    if (this.fd === null) throw new Error("spool: not spilled");
    return this.fd;
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }
}

function readAt(fd: number, pos: number, len: number): Buffer {
  const buf = Buffer.alloc(len);
  let got = 0;
  while (got < len) {
    const n = readSync(fd, buf, got, len - got, pos + got);
    if (n === 0) break;
    got += n;
  }
  return buf.subarray(0, got);
}

/**
 * COPY as it was before a plan added its fields (inserted after the delivery's own
 * HEADERSBYTES), from byte FROM: what goes on to other domains, without the filter's verdict.
 */
export function withoutAdded(copy: Copy, headersBytes: number, from = 0): Readable {
  if (!copy.added) return createReadStream(copy.file, { start: from });
  const parts = [
    ...(from < headersBytes ? [{ start: from, end: headersBytes - 1 }] : []),
    { start: Math.max(from, headersBytes) + copy.added },
  ];
  return Readable.from(
    (async function* () {
      for (const p of parts) yield* createReadStream(copy.file, p);
    })(),
  );
}

/**
 * A Maildir++ folder directory of MD (`.Junk`), made like the Maildir itself when missing
 * (Dovecot takes it as it finds it); or, for QUARANTINE_DIR, the quarantine beside MD
 * (no Dovecot folder: no maildirfolder marker).
 */
export function folderOf(o: Pick<DeliveryOptions, "uid" | "gid">, md: string, folder: string): string {
  if (!folder) return md;
  if (folder === QUARANTINE_DIR) {
    const q = join(dirname(md), QUARANTINE_DIR);
    if (!existsSync(join(q, "tmp"))) {
      for (const d of [q, join(q, "new"), join(q, "tmp")]) {
        if (!existsSync(d)) {
          mkdirSync(d, { mode: 0o700 });
          chownSync(d, o.uid, o.gid);
        }
      }
      fsyncPath(q);
      fsyncPath(dirname(md));
    }
    return q;
  }
  if (!/^\.[A-Za-z0-9&,_-][A-Za-z0-9&,._-]{0,199}$/.test(folder)) throw new Error(`not a Maildir++ folder: ${folder}`);
  const dir = join(md, folder);
  if (!existsSync(join(dir, "tmp"))) {
    for (const d of [dir, join(dir, "cur"), join(dir, "new"), join(dir, "tmp")]) {
      if (!existsSync(d)) {
        mkdirSync(d, { mode: 0o700 });
        chownSync(d, o.uid, o.gid);
      }
    }
    const marker = join(dir, "maildirfolder");
    if (!existsSync(marker)) {
      closeSync(openSync(marker, "a", 0o600));
      chownSync(marker, o.uid, o.gid);
    }
    fsyncPath(dir);
    fsyncPath(md);
  }
  return dir;
}

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
 * in one round); the delivery fails if it rejects. PLAN, when given, is asked once the
 * message is in (checked) and decides each mailbox's added fields and folder: mailboxes
 * with the same fields share one file (hard links), others get a file of their own.
 * The message is held in memory up to SPILL_BYTES (bigger ones spill into tmp/ of the
 * first mailbox); each file is written, fsynced, linked and renamed into new/, so
 * nothing is in new/ until every copy is on disk. Only the fsyncs wait in the thread
 * pool: the other steps (open, write into the page cache, chown, link, rename) are short
 * and run inline, so a delivery under load does not queue behind the event loop once
 * per step.
 */
export async function deliver(stream: Readable, mailboxes: readonly string[], o: DeliveryOptions, alongside?: (d: Delivered, newDirs: readonly string[]) => Promise<void>, plan?: Planner): Promise<Delivered> {
  if (mailboxes.length === 0) throw new RejectError(554, "5.1.1 No valid recipients");
  const dirs = mailboxes.map((m) => maildirOf(o, m));
  const base = `${Math.floor(Date.now() / 1000)}.M${process.hrtime.bigint() % 1000000n}P${process.pid}Q${++counter}.${HOST}`;
  const spool = new Spool(join(dirs[0]!, "tmp", `${base}.in`));
  // Every file made in tmp/: removed at the end unless renamed into new/.
  const tmpFiles = new Set<string>();
  const fds: number[] = [];
  try {
    let checked: { size: number; sha256: string };
    try {
      checked = await copyChecked(stream, spool, o.headers, o.sizeMax);
    } finally {
      if (spool.spilled) tmpFiles.add(spool.path);
    }
    const plans = plan ? await plan(spool.head(PLAN_HEAD_MAX), !spool.spilled) : null;
    const headLen = Buffer.byteLength(o.headers);
    // Mailboxes with the same added fields share one file.
    const groups = new Map<string, number[]>();
    for (let i = 0; i < mailboxes.length; i++) {
      const f = plans?.[i]?.fields ?? "";
      const g = groups.get(f);
      if (g) g.push(i);
      else groups.set(f, [i]);
    }
    const made: { path: string; size: number; sha256: string; added: number; members: number[] }[] = [];
    let gi = 0;
    for (const [fields, members] of groups) {
      const extra = Buffer.from(fields);
      if (!extra.length && spool.spilled) {
        // The spilled file is this copy as it is.
        made.push({ path: spool.path, size: checked.size, sha256: checked.sha256, added: 0, members });
        fds.push(spool.file);
        continue;
      }
      const path = join(dirs[0]!, "tmp", `${base}.${gi++}`);
      const fd = openSync(path, "wx", 0o600);
      tmpFiles.add(path);
      fds.push(fd);
      if (!extra.length) {
        writeAll(fd, spool.memory());
        made.push({ path, size: checked.size, sha256: checked.sha256, added: 0, members });
        continue;
      }
      const hash = createHash("sha256");
      const put = (b: Buffer) => {
        writeAll(fd, b);
        hash.update(b);
      };
      if (!spool.spilled) {
        const m = spool.memory();
        put(m.subarray(0, headLen));
        put(extra);
        put(m.subarray(headLen));
      } else {
        put(readAt(spool.file, 0, headLen));
        put(extra);
        for (let pos = headLen; pos < checked.size; ) {
          const b = readAt(spool.file, pos, Math.min(COPY_CHUNK, checked.size - pos));
          if (!b.length) throw new Error(`the spooled message ${spool.path} ended at ${pos} of ${checked.size} bytes`);
          put(b);
          pos += b.length;
        }
      }
      made.push({ path, size: checked.size + extra.length, sha256: hash.digest("hex"), added: extra.length, members });
    }
    // Concurrent deliveries' fsyncs share the file system's journal commits.
    for (const fd of fds) fchownSync(fd, o.uid, o.gid);
    await Promise.all(fds.map((fd) => fsyncAsync(fd)));
    const copies: Copy[] = new Array(mailboxes.length);
    const files: string[] = new Array(mailboxes.length);
    const newDirs: string[] = [];
    const renamed: string[] = [];
    try {
      for (const [k, m] of made.entries()) {
        // The group's file goes to its first mailbox, links to it to the others; every
        // link is made in tmp/ before any rename, so a failure leaves nothing half done.
        const srcs = m.members.map((i, j) => {
          if (j === 0) return m.path;
          const t = join(dirs[i]!, "tmp", `${base}.${k}.${j}`);
          linkSync(m.path, t);
          tmpFiles.add(t);
          return t;
        });
        for (const [j, i] of m.members.entries()) {
          const newDir = join(folderOf(o, dirs[i]!, plans?.[i]?.folder ?? ""), "new");
          const dest = join(newDir, `${base},S=${m.size}`);
          renameSync(srcs[j]!, dest);
          tmpFiles.delete(srcs[j]!);
          renamed.push(dest);
          newDirs.push(newDir);
          files[i] = dest;
          copies[i] = { file: dest, sha256: m.sha256, size: m.size, added: m.added };
        }
      }
    } catch (err) {
      undo(renamed, newDirs);
      throw err;
    }
    const delivered: Delivered = { files, copies, sha256: copies[0]!.sha256, size: copies[0]!.size };
    const uniqueDirs = [...new Set(newDirs)];
    // With ALONGSIDE (the delivery journal), the new/ directories are fsynced in its
    // round, together with its own fsync; without, here.
    try {
      if (alongside) await alongside(delivered, uniqueDirs);
      else await Promise.all(uniqueDirs.map((d) => dirSync.sync(d)));
    } catch (err) {
      // Not durable: taken back out of new/ (the client is refused and sends it again).
      undo(renamed, uniqueDirs);
      throw err;
    }
    return delivered;
  } finally {
    for (const fd of fds) {
      if (fd === (spool.spilled ? spool.file : -1)) continue;
      try {
        closeSync(fd);
      } catch {
        // already closed
      }
    }
    spool.close();
    for (const t of tmpFiles) {
      try {
        unlinkSync(t);
      } catch {
        // gone already
      }
    }
  }
}
