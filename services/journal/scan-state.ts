// What the Maildir scanner last journaled, kept on the volume under
// `<data>/journal/scan/<domain>/<local>/`: `user.json` (the folders with their GUIDs,
// the subscriptions) and one `m<dir>.json` per folder (each message's flag letters,
// UID, inode and size; the directories' mtimes at that scan; the keywords). A state is
// written only after the journal entries of the changes it reflects are durable, so a
// crash in between makes the next scan journal those changes again, never lose them.
// A folder's state is a snapshot (`m<dir>.json`, atomic: temp file, fsync, rename,
// fsync of the directory) and a log of what changed since (`m<dir>.log`, one fsynced
// JSON line a round with the messages set and removed, tagged with the snapshot's
// generation: lines of an older snapshot are ignored, a torn last line too). So a busy
// folder costs a round a few lines, not its whole list, on the replicated volume; the
// snapshot is written again once the log outgrows it (at least LOG_BYTES_MIN).
// Bound: an LRU of parsed mailbox states of at most CACHE_MESSAGES_MAX messages.
import { existsSync, mkdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { open, rename } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fsyncPathAsync } from "../../common/fsutil.ts";

export const CACHE_MESSAGES_MAX = 200_000;
export const LOG_BYTES_MIN = 64 * 1024;

/** letters (sorted flag letters), uid (null: not in dovecot-uidlist yet), inode, size. */
export type MsgState = [letters: string, uid: number | null, ino: number, size: number];

export interface MailboxState {
  readonly v: 1;
  /** The snapshot generation the state was read from or last written as. */
  gen?: number;
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

interface Delta {
  readonly gen: number;
  readonly set: [string, ...MsgState][];
  readonly del: string[];
  readonly meta: Omit<MailboxState, "msgs" | "gen">;
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

  private logFile(userRel: string, dir: string): string {
    return join(this.userDir(userRel), `m${dir}.log`);
  }

  /** The state of one folder (its snapshot and log), or null when it has none. */
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
    const st: MailboxState = { ...raw, gen: raw.gen ?? 0, msgs };
    let log = "";
    try {
      log = readFileSync(this.logFile(userRel, dir), "utf8");
    } catch {
      log = "";
    }
    for (const line of log.split("\n")) {
      let d: Delta;
      try {
        d = JSON.parse(line) as Delta;
      } catch {
        continue; // a torn last line: that round is scanned again
      }
      if (d.gen !== st.gen) continue;
      for (const [key, ...m] of d.set) st.msgs.set(key, m);
      for (const key of d.del) st.msgs.delete(key);
      Object.assign(st, d.meta);
    }
    this.remember(k, st);
    return st;
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

  /**
   * Saves S as the folder's state: a log line with what differs from the state saved
   * last (when that is known and the log is small), else a new snapshot.
   */
  async saveMailbox(userRel: string, dir: string, s: MailboxState): Promise<void> {
    const k = `${userRel}\0${dir}`;
    const prev = this.cache.get(k);
    const logPath = this.logFile(userRel, dir);
    let logBytes = 0;
    let snapBytes = 0;
    try {
      logBytes = statSync(logPath).size;
    } catch {
      logBytes = -1;
    }
    try {
      snapBytes = statSync(this.mailboxFile(userRel, dir)).size;
    } catch {
      snapBytes = -1;
    }
    if (prev && prev.gen !== undefined && snapBytes >= 0 && logBytes < Math.max(LOG_BYTES_MIN, snapBytes)) {
      const set: [string, ...MsgState][] = [];
      const del: string[] = [];
      for (const [key, m] of s.msgs) {
        const p = prev.msgs.get(key);
        if (!p || p[0] !== m[0] || p[1] !== m[1] || p[2] !== m[2] || p[3] !== m[3]) set.push([key, ...m]);
      }
      for (const key of prev.msgs.keys()) if (!s.msgs.has(key)) del.push(key);
      const { msgs: _m, gen: _g, ...meta } = s;
      const d: Delta = { gen: prev.gen, set, del, meta };
      const fh = await open(logPath, "a", 0o600);
      try {
        // A line of its own even after a torn one (a blank line is passed over).
        await fh.writeFile("\n" + JSON.stringify(d) + "\n");
        await fh.sync();
      } finally {
        await fh.close();
      }
      if (logBytes < 0) await fsyncPathAsync(dirname(logPath));
      s.gen = prev.gen;
      this.remember(k, s);
      return;
    }
    const { msgs, ...rest } = s;
    const list: [string, ...MsgState][] = [];
    for (const [key, m] of msgs) list.push([key, ...m]);
    // A new generation: the old log's lines no longer apply (removed after, for space).
    const gen = Math.max(Date.now(), (prev?.gen ?? 0) + 1, (rest.gen ?? 0) + 1);
    await writeDurable(this.mailboxFile(userRel, dir), JSON.stringify({ ...rest, gen, msgs: list }));
    rmSync(logPath, { force: true });
    s.gen = gen;
    this.remember(k, s);
  }

  removeMailbox(userRel: string, dir: string): void {
    rmSync(this.mailboxFile(userRel, dir), { force: true });
    rmSync(this.logFile(userRel, dir), { force: true });
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
