// What the Maildir scanner last journaled, kept on the volume under
// `<data>/journal/scan/<domain>/<local>/`: `user.json` (the folders with their GUIDs,
// the subscriptions) and one `m<dir>.json` per folder (each message's flag letters,
// UID, inode and size; the directories' mtimes at that scan; the keywords). A state is
// written only after the journal entries of the changes it reflects are durable, so a
// crash in between makes the next scan journal those changes again, never lose them.
// Writes are atomic (temp file, fsync, rename, fsync of the directory).
// Bound: an LRU of parsed mailbox states of at most CACHE_MESSAGES_MAX messages.
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync } from "node:fs";
import { open, rename } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fsyncPathAsync } from "../../common/fsutil.ts";

export const CACHE_MESSAGES_MAX = 200_000;

/** letters (sorted flag letters), uid (null: not in dovecot-uidlist yet), inode, size. */
export type MsgState = [letters: string, uid: number | null, ino: number, size: number];

export interface MailboxState {
  readonly v: 1;
  guid: string | null;
  uidvalidity: number | null;
  /** mtimes (ns, as strings) of cur/ and new/ and "mtime:size" of dovecot-uidlist at the scan. */
  mt: { cur: string; new: string; uidlist: string };
  scannedAtMs: number;
  keywords: string[];
  msgs: Map<string, MsgState>;
}

export interface UserState {
  readonly v: 1;
  folders: Record<string, { guid: string | null; name: string }>;
  subs: string[];
  /** mtime (ns) of the subscriptions file at the scan. */
  subsMt: string;
}

/** Atomic and durable: temp, fsync, rename, fsync of the directory. */
export async function writeDurable(file: string, text: string): Promise<void> {
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  const tmp = `${file}.tmp-${process.pid}`;
  const fh = await open(tmp, "w", 0o600);
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, file);
  await fsyncPathAsync(dirname(file));
}

export function emptyMailboxState(): MailboxState {
  return { v: 1, guid: null, uidvalidity: null, mt: { cur: "", new: "", uidlist: "" }, scannedAtMs: 0, keywords: [], msgs: new Map() };
}

export class ScanStore {
  private readonly cache = new Map<string, MailboxState>();
  private cachedMessages = 0;

  constructor(readonly dir: string) {}

  /** Whether a scan ever completed a baseline here (else the first scan journals nothing). */
  get baselineDone(): boolean {
    return existsSync(join(this.dir, "baseline"));
  }

  async markBaseline(): Promise<void> {
    await writeDurable(join(this.dir, "baseline"), `${new Date().toISOString()}\n`);
  }

  userDir(userRel: string): string {
    return join(this.dir, ...userRel.split("/"));
  }

  private mailboxFile(userRel: string, dir: string): string {
    return join(this.userDir(userRel), `m${dir}.json`);
  }

  loadUser(userRel: string): UserState | null {
    try {
      const u = JSON.parse(readFileSync(join(this.userDir(userRel), "user.json"), "utf8")) as UserState;
      return u.v === 1 ? u : null;
    } catch {
      return null;
    }
  }

  async saveUser(userRel: string, u: UserState): Promise<void> {
    await writeDurable(join(this.userDir(userRel), "user.json"), JSON.stringify(u));
  }

  /** The state of one folder, or null when it has none. */
  loadMailbox(userRel: string, dir: string): MailboxState | null {
    const k = `${userRel}\0${dir}`;
    const hit = this.cache.get(k);
    if (hit) {
      this.cache.delete(k);
      this.cache.set(k, hit);
      return hit;
    }
    let raw: Omit<MailboxState, "msgs"> & { msgs: [string, ...MsgState][] };
    try {
      raw = JSON.parse(readFileSync(this.mailboxFile(userRel, dir), "utf8")) as typeof raw;
    } catch {
      return null;
    }
    if (raw.v !== 1) return null;
    const msgs = new Map<string, MsgState>();
    for (const [key, ...m] of raw.msgs) msgs.set(key, m);
    const s: MailboxState = { ...raw, msgs };
    this.remember(k, s);
    return s;
  }

  private remember(k: string, s: MailboxState): void {
    const old = this.cache.get(k);
    if (old) {
      this.cache.delete(k);
      this.cachedMessages -= old.msgs.size;
    }
    this.cache.set(k, s);
    this.cachedMessages += s.msgs.size;
    for (const [ok, os] of this.cache) {
      if (this.cachedMessages <= CACHE_MESSAGES_MAX || ok === k) break;
      this.cache.delete(ok);
      this.cachedMessages -= os.msgs.size;
    }
  }

  async saveMailbox(userRel: string, dir: string, s: MailboxState): Promise<void> {
    const { msgs, ...rest } = s;
    const list: [string, ...MsgState][] = [];
    for (const [key, m] of msgs) list.push([key, ...m]);
    await writeDurable(this.mailboxFile(userRel, dir), JSON.stringify({ ...rest, msgs: list }));
    this.remember(`${userRel}\0${dir}`, s);
  }

  /** A folder renamed: its state goes with it (before the new state is saved over it). */
  renameMailbox(userRel: string, from: string, to: string): void {
    const f = this.mailboxFile(userRel, from);
    if (existsSync(f)) renameSync(f, this.mailboxFile(userRel, to));
    this.forget(userRel, from);
  }

  removeMailbox(userRel: string, dir: string): void {
    rmSync(this.mailboxFile(userRel, dir), { force: true });
    this.forget(userRel, dir);
  }

  removeUser(userRel: string): void {
    rmSync(this.userDir(userRel), { recursive: true, force: true });
    for (const k of [...this.cache.keys()]) if (k.startsWith(`${userRel}\0`)) this.forget(userRel, k.slice(userRel.length + 1));
  }

  private forget(userRel: string, dir: string): void {
    const k = `${userRel}\0${dir}`;
    const s = this.cache.get(k);
    if (s) {
      this.cache.delete(k);
      this.cachedMessages -= s.msgs.size;
    }
  }

  get cacheMessages(): number {
    return this.cachedMessages;
  }
}
