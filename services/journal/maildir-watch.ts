// The Dovecot change source (`mailha journal watch`, the last resource of the group on
// the active node): journals what Dovecot changes for IMAP and POP3 clients by watching
// the Maildir tree with inotify (fs.watch, one watch a directory: the mail root, each
// domain, each user's Maildir, each folder's cur/ and new/) and scanning what a watch
// reports, debounced (scanner.ts does the comparing and the journaling).
//
// No change is missed across a restart, a failover or a crash: the Maildir is the
// truth and the scan state on the volume says what was journaled, so the catch-up at
// every start compares every folder whose directories moved since its state (mtimes
// in ns; a folder scanned within RACY_MS of its last change is scanned again), and the
// same sweep runs every SWEEP_INTERVAL_MS against what inotify may have dropped (an
// overflow, which Node does not report; a watch refused at the watch limit). The very
// first start on a tree takes what is there as it is (a baseline: nothing journaled).
// Latency: a change is journaled about DEBOUNCE_MS after inotify reports it (up to
// ROUND_INTERVAL_MIN_MS under sustained change, more for a watcher at its CPU bound); a message
// SMTP delivered is left alone (SMTP journals it) and one that looks like a delivery
// whose journal line is not there yet waits DELIVERY_GRACE_MS, and a hard link whose
// original is still in its folder COPY_GRACE_MS (an IMAP MOVE half done is one move).
//
// Bounds: at most WATCHES_MAX inotify watches (the rest of the tree relies on the
// sweep); a round scans at most USERS_PER_ROUND users (USER_CONCURRENCY at a time), the
// rest wait for the next; rounds start at most every ROUND_INTERVAL_MIN_MS, and the
// watcher's CPU is held to DUTY_MAX of one core (a round that cost T of CPU is followed
// by a pause of T * (1 - DUTY_MAX) / DUTY_MAX, never more than ROUND_DELAY_MAX_MS); memory: the dirty set (users x folders), the watches,
// the scan-state LRU (scan-state.ts) and one round's folder states. A user whose scan
// fails is tried again every round (never given up: giving up would lose changes) and
// counted in the status file.
import { mkdirSync, readFileSync, watch, type FSWatcher } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import { writeDurable } from "./scan-state.ts";
import type { ChangeJournal } from "./changes.ts";
import { DeliveryIndex, deliveryIndexFile } from "./deliveries.ts";
import { folderPath, listFolders } from "./maildir.ts";
import { ScanStore } from "./scan-state.ts";
import { folderMoved, isDir, listUsers, rootMoved, safeReaddir, scanUser, userRef, type ScanContext, type UserRef } from "./scanner.ts";

export const DEBOUNCE_MS = 100;
export const SWEEP_INTERVAL_MS = 30_000;
export const USERS_PER_ROUND = 64;
export const USER_CONCURRENCY = 4;
export const DUTY_MAX = 0.1;
/** Under sustained change, rounds start at most this often (each one then takes more changes). */
export const ROUND_INTERVAL_MIN_MS = 500;
export const ROUND_DELAY_MAX_MS = 5000;
const FINAL_ROUNDS_MAX = 20;
const FINAL_MS_MAX = 5000;
const STATUS_INTERVAL_MS = 5000;
/** A user directory without its Maildir yet is looked at again this often, this many times. */
const DISCOVER_RETRY_MS = 200;
const DISCOVER_TRIES = 25;

/** The status file `journal watch` keeps in the node's run directory (readiness, monitor, operators). */
export function watchStatusFile(runDir: string): string {
  return join(runDir, "journal-watch.json");
}

/** The status a watcher last wrote, or null. */
export function readWatchStatus(file: string): (WatchStats & { pid: number; at: string }) | null {
  try {
    return JSON.parse(readFileSync(file, "utf8")) as WatchStats & { pid: number; at: string };
  } catch {
    return null;
  }
}

function defaultWatchesMax(): number {
  try {
    return Math.max(64, Math.min(50_000, Math.floor(Number(readFileSync("/proc/sys/fs/inotify/max_user_watches", "utf8")) / 2)));
  } catch {
    return 8192;
  }
}

export interface WatchOptions {
  readonly dataDir: string;
  readonly journal: ChangeJournal;
  readonly log: Logger;
  /** Where the status file goes (the node's run directory); none when absent. */
  readonly statusFile?: string;
  readonly debounceMs?: number;
  readonly sweepIntervalMs?: number;
  readonly watchesMax?: number;
  /** Off: no inotify at all (the sweep alone; tests, measurements). */
  readonly inotify?: boolean;
  /** Called after a round scanned a user, before its folder watches are synced (tests change the Maildir in that window). */
  readonly onScanned?: (user: string) => void;
}

interface DirtyUser {
  readonly user: UserRef;
  readonly folders: Set<string>;
  root: boolean;
  all: boolean;
  /** Only: compare the folder list and subscriptions with the state (the cheap look). */
  check?: boolean;
}

type WatchKind = "mailroot" | "domain" | "userroot" | "folder";

export interface WatchStats {
  rounds: number;
  changes: number;
  scans: number;
  watches: number;
  dirtyUsers: number;
  failingUsers: number;
  catchUp: "running" | "done";
  lastRoundAt: string | null;
  roundCpuMsMax: number;
  watchLimitReached: boolean;
}

export class MaildirWatcher {
  readonly mailRoot: string;
  private readonly store: ScanStore;
  private readonly deliveries: DeliveryIndex;
  private readonly ctx: ScanContext;
  private readonly dirty = new Map<string, DirtyUser>();
  private readonly watches = new Map<string, { w: FSWatcher; kind: WatchKind }>();
  private readonly failing = new Set<string>();
  private readonly retries = new Map<string, { user: UserRef; dir: string; atMs: number }>();
  private timer: NodeJS.Timeout | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private sweepTimer: NodeJS.Timeout | null = null;
  private statusTimer: NodeJS.Timeout | null = null;
  private running: Promise<void> | null = null;
  private closed = false;
  private readonly debounceMs: number;
  private readonly watchesMax: number;
  readonly stats: WatchStats = { rounds: 0, changes: 0, scans: 0, watches: 0, dirtyUsers: 0, failingUsers: 0, catchUp: "running", lastRoundAt: null, roundCpuMsMax: 0, watchLimitReached: false };

  constructor(private readonly o: WatchOptions) {
    this.mailRoot = join(o.dataDir, "mail");
    const scanDir = join(o.journal.dir, "scan");
    mkdirSync(scanDir, { recursive: true, mode: 0o700 });
    this.store = new ScanStore(scanDir);
    this.deliveries = new DeliveryIndex(o.journal.dir, deliveryIndexFile(scanDir));
    this.ctx = { mailRoot: this.mailRoot, store: this.store, journal: o.journal, deliveries: this.deliveries, log: o.log, pairs: new Map() };
    this.debounceMs = o.debounceMs ?? DEBOUNCE_MS;
    this.watchesMax = o.watchesMax ?? defaultWatchesMax();
  }

  /**
   * Sets the watches and catches up: a baseline on a tree never scanned, else every
   * folder whose directories moved since its state. Resolves once the catch-up is
   * journaled; the watches were set before, so nothing that happens meanwhile is lost.
   */
  async start(): Promise<void> {
    const t0 = Date.now();
    this.writeStatus();
    this.statusTimer = setInterval(() => this.writeStatus(), STATUS_INTERVAL_MS);
    this.statusTimer.unref();
    // A domain directory that comes or goes; then each domain for its users.
    this.watchDir(this.mailRoot, "mailroot", (file) => file && this.discoverDomain(file));
    for (const d of safeReaddir(this.mailRoot)) this.discoverDomain(d, false);
    const users = listUsers(this.mailRoot);
    if (!this.store.baselineDone) {
      this.deliveries.skipToEnd();
      for (const u of users) {
        this.watchUser(u);
        for (const dir of listFolders(u.maildir)) this.watchFolder(u, dir);
        const r = await scanUser(this.ctx, u, "all", true, true);
        this.syncFolderWatches(u, r.folders);
      }
      await this.deliveries.save();
      await this.store.markBaseline();
      this.o.log.info({ users: users.length, ms: Date.now() - t0 }, "journal: baseline of the Maildir tree taken (nothing journaled)");
    } else {
      await this.sweep(users);
      await this.drain(Number.POSITIVE_INFINITY);
      this.o.log.info({ users: users.length, changes: this.stats.changes, ms: Date.now() - t0 }, "journal: catch-up scan done");
    }
    this.stats.catchUp = "done";
    if (this.dirty.size) this.schedule(this.debounceMs);
    if (!this.closed) {
      this.sweepTimer = setInterval(() => void this.sweep(listUsers(this.mailRoot)).catch((err: Error) => this.o.log.error({ err }, "journal: sweep failed")), this.o.sweepIntervalMs ?? SWEEP_INTERVAL_MS);
      // Referenced: the sweep keeps the process alive (the watches do not hold it).
      this.writeStatus();
    }
  }

  /** Runs rounds until nothing is dirty (or the bound); the catch-up and the final round use it. */
  private async drain(msMax: number): Promise<void> {
    const end = Date.now() + msMax;
    for (let i = 0; this.dirty.size && Date.now() < end && i < 100_000; i++) {
      await this.round();
      // What is left fails each time: the scheduled rounds try it again, paced.
      if ([...this.dirty.keys()].every((k) => this.failing.has(k))) break;
    }
  }

  // ---- watches ----

  private watchDir(path: string, kind: WatchKind, onEvent?: (file: string | null) => void): void {
    if (this.o.inotify === false || this.watches.has(path) || this.closed) return;
    if (this.watches.size >= this.watchesMax) {
      if (!this.stats.watchLimitReached) this.o.log.warn({ watchesMax: this.watchesMax }, "journal: watch limit reached; the rest of the tree relies on the sweep");
      this.stats.watchLimitReached = true;
      return;
    }
    let w: FSWatcher;
    try {
      w = watch(path, { persistent: false }, (_type, file) => onEvent?.(file === null ? null : String(file)));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOSPC" || code === "EMFILE") {
        this.stats.watchLimitReached = true;
        this.o.log.warn({ err, path }, "journal: the kernel refused a watch; the sweep covers the rest");
      }
      return; // ENOENT: gone already; the next scan of its parent decides
    }
    w.on("error", () => this.unwatch(path));
    this.watches.set(path, { w, kind });
    this.stats.watches = this.watches.size;
  }

  private unwatch(path: string): void {
    const x = this.watches.get(path);
    if (!x) return;
    x.w.close();
    this.watches.delete(path);
    this.stats.watches = this.watches.size;
  }

  private discoverDomain(domain: string, scanNew = true): void {
    if (domain.startsWith(".")) return;
    const dpath = join(this.mailRoot, domain);
    if (!isDir(dpath)) return this.unwatch(dpath);
    if (!this.watches.has(dpath)) {
      this.watchDir(dpath, "domain", (file) => file && this.discoverUser(domain, file, true));
      if (scanNew) for (const l of safeReaddir(dpath)) this.discoverUser(domain, l, true);
    }
  }

  private discoverUser(domain: string, local: string, scan: boolean, tries = 0): void {
    if (local.startsWith(".")) return;
    const u = userRef(this.mailRoot, domain, local);
    if (!isDir(u.maildir)) {
      // A user directory whose Maildir is not there yet (SMTP or Dovecot is making
      // it): looked at again shortly (DISCOVER_TRIES times), and by the sweep in any case.
      if (scan && tries < DISCOVER_TRIES && isDir(join(this.mailRoot, domain, local))) setTimeout(() => this.discoverUser(domain, local, true, tries + 1), DISCOVER_RETRY_MS).unref();
      return;
    }
    if (this.watches.has(u.maildir)) return;
    this.watchUser(u);
    for (const dir of listFolders(u.maildir)) this.watchFolder(u, dir);
    this.markAll(u);
  }

  // The watches of a user's Maildir and folders are one-shot: the first event closes
  // the watch and marks what it covers dirty; the round sets the watch again before it
  // scans (so what happens in between is in the scan). A busy folder costs one event a
  // round, not one a change (Dovecot writes its index files in the Maildir root at every
  // STORE).
  private watchUser(u: UserRef): void {
    this.watchDir(u.maildir, "userroot", (file) => {
      this.unwatch(u.maildir);
      // Folder directories and the subscriptions are what matters here; anything else
      // (Dovecot's index, uidlist and lock files) only asks for a cheap look.
      if (file === null || file.startsWith(".") || file === "subscriptions") this.markRoot(u);
      else this.markRootCheck(u);
    });
  }

  /** Sets the watches of a folder's new/ and cur/; true when one of them was not set before (and is now). */
  private watchFolder(u: UserRef, dir: string): boolean {
    const p = folderPath(u.maildir, dir);
    let added = false;
    for (const sub of ["new", "cur"]) {
      const path = join(p, sub);
      if (this.watches.has(path)) continue;
      this.watchDir(path, "folder", () => {
        this.unwatch(path);
        this.markFolder(u, dir);
      });
      added ||= this.watches.has(path);
    }
    return added;
  }

  /**
   * After a user's round: watches for the folders it has, none for those it lost. A
   * folder whose watch is set only now (made while the round scanned it, or its cur/
   * and new/ were not there yet when the round began) is marked for the next round:
   * what arrived in it between this round's listing and the watch is then in that
   * scan, not left to the sweep.
   */
  private syncFolderWatches(u: UserRef, folders: readonly string[]): void {
    const want = new Set(folders.flatMap((d) => ["new", "cur"].map((s) => join(folderPath(u.maildir, d), s))));
    const prefix = u.maildir + "/";
    for (const [path, x] of this.watches) if (x.kind === "folder" && (path.startsWith(prefix) || path === u.maildir) && !want.has(path)) this.unwatch(path);
    for (const d of folders) if (this.watchFolder(u, d)) this.markFolder(u, d);
  }

  // ---- dirty marks and rounds ----

  private entry(u: UserRef): DirtyUser {
    let d = this.dirty.get(u.rel);
    if (!d) {
      d = { user: u, folders: new Set(), root: false, all: false };
      this.dirty.set(u.rel, d);
      this.stats.dirtyUsers = this.dirty.size;
    }
    return d;
  }

  markFolder(u: UserRef, dir: string): void {
    this.entry(u).folders.add(dir);
    this.schedule(this.debounceMs);
  }

  markRoot(u: UserRef): void {
    this.entry(u).root = true;
    this.schedule(this.debounceMs);
  }

  /** The user's Maildir root changed somehow: the round compares its folder list and subscriptions. */
  private markRootCheck(u: UserRef): void {
    this.entry(u).check = true;
    this.schedule(this.debounceMs);
  }

  markAll(u: UserRef): void {
    this.entry(u).all = true;
    this.schedule(this.debounceMs);
  }

  private schedule(ms: number): void {
    if (this.timer || this.closed || this.stats.catchUp === "running") return;
    ms = Math.max(ms, this.lastRoundStart + ROUND_INTERVAL_MIN_MS - Date.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.round().catch((err: Error) => this.o.log.error({ err }, "journal: round failed"));
    }, ms);
  }

  /** One round: up to USERS_PER_ROUND dirty users, USER_CONCURRENCY at a time. */
  round(): Promise<void> {
    if (this.running) return this.running;
    this.running = this.roundOnce().finally(() => (this.running = null));
    return this.running;
  }

  private lastRoundStart = 0;

  private async roundOnce(): Promise<void> {
    this.lastRoundStart = Date.now();
    const cpu0 = process.cpuUsage();
    this.deliveries.catchUp();
    const batch = [...this.dirty.values()].slice(0, USERS_PER_ROUND);
    for (const d of batch) this.dirty.delete(d.user.rel);
    let next = 0;
    const worker = async () => {
      while (next < batch.length) {
        const d = batch[next++]!;
        try {
          // The watches again first: a change from here on is reported or scanned.
          this.watchUser(d.user);
          for (const f of d.root || d.all ? listFolders(d.user.maildir) : d.folders) this.watchFolder(d.user, f);
          if (d.check && !d.root && rootMoved(this.store, d.user)) d.root = true;
          if (!d.root && !d.all && !d.folders.size) continue;
          const r = await scanUser(this.ctx, d.user, d.all ? "all" : d.folders, d.root || d.all);
          this.stats.changes += r.changes;
          this.stats.scans += r.scanned;
          this.failing.delete(d.user.rel);
          this.o.onScanned?.(d.user.address);
          this.syncFolderWatches(d.user, r.folders);
          for (const x of r.retry) this.retryAt(d.user, x.dir, x.atMs);
        } catch (err) {
          // Kept dirty, tried again next round: the state was not written, so nothing is lost.
          if (!this.failing.has(d.user.rel)) this.o.log.error({ err, user: d.user.address }, "journal: scan failed; trying again");
          this.failing.add(d.user.rel);
          const e = this.entry(d.user);
          for (const f of d.folders) e.folders.add(f);
          e.root ||= d.root;
          e.all ||= d.all;
          e.check ||= d.check;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(USER_CONCURRENCY, batch.length) }, worker));
    await this.deliveries.save().catch((err: Error) => this.o.log.error({ err }, "journal: could not save the delivery index"));
    const used = process.cpuUsage(cpu0);
    const cpuMs = (used.user + used.system) / 1000;
    this.stats.rounds++;
    this.stats.lastRoundAt = new Date().toISOString();
    this.stats.roundCpuMsMax = Math.max(this.stats.roundCpuMsMax, cpuMs);
    this.stats.dirtyUsers = this.dirty.size;
    this.stats.failingUsers = this.failing.size;
    if (this.dirty.size) {
      const pause = this.failing.size && this.failing.size === this.dirty.size ? 1000 : (cpuMs * (1 - DUTY_MAX)) / DUTY_MAX;
      this.schedule(Math.min(ROUND_DELAY_MAX_MS, Math.max(this.debounceMs, pause)));
    }
  }

  private retryAt(u: UserRef, dir: string, atMs: number): void {
    this.retries.set(`${u.rel}\0${dir}`, { user: u, dir, atMs });
    this.armRetry();
  }

  private armRetry(): void {
    if (this.retryTimer || this.closed || !this.retries.size) return;
    const first = Math.min(...[...this.retries.values()].map((r) => r.atMs));
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      const now = Date.now();
      for (const [k, r] of this.retries) {
        if (r.atMs > now) continue;
        this.retries.delete(k);
        this.markFolder(r.user, r.dir);
      }
      this.armRetry();
    }, Math.max(10, first - Date.now() + 10));
    this.retryTimer.unref();
  }

  /**
   * The sweep: for every user, watches in place (first) and then its folders' mtimes
   * against the states; what moved is marked dirty. Three stats a folder.
   */
  private async sweep(users: readonly UserRef[]): Promise<void> {
    if (!this.watches.has(this.mailRoot)) {
      // Not there at the start (no mail yet), or the watch was refused: again now.
      this.watchDir(this.mailRoot, "mailroot", (file) => file && this.discoverDomain(file));
      for (const d of safeReaddir(this.mailRoot)) this.discoverDomain(d, false);
    }
    for (const [i, u] of users.entries()) {
      if (this.closed) return;
      if (!this.watches.has(u.maildir)) {
        this.watchUser(u);
        this.watchDir(join(this.mailRoot, u.rel.split("/")[0]!), "domain", (file) => file && this.discoverUser(u.rel.split("/")[0]!, file, true));
      }
      const state = this.store.loadUser(u.rel);
      if (!state) {
        this.markAll(u);
        continue;
      }
      for (const dir of Object.keys(state.folders)) this.watchFolder(u, dir);
      if (rootMoved(this.store, u)) this.markRoot(u);
      for (const dir of Object.keys(state.folders)) if (folderMoved(this.store, u, dir)) this.markFolder(u, dir);
      if (i % 100 === 99) await new Promise((r) => setImmediate(r));
    }
  }

  private writeStatus(): void {
    if (!this.o.statusFile) return;
    const text = JSON.stringify({ pid: process.pid, at: new Date().toISOString(), ...this.stats, deliveriesPending: this.deliveries.size, stateCacheMessages: this.store.cacheMessages }) + "\n";
    void writeDurable(this.o.statusFile, text).catch(() => {});
  }

  /**
   * Stops watching, journals what is still dirty (bounded: FINAL_ROUNDS_MAX rounds or
   * FINAL_MS_MAX; the next start's catch-up takes the rest), then stops.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    for (const t of [this.timer, this.retryTimer]) if (t) clearTimeout(t);
    for (const t of [this.sweepTimer, this.statusTimer]) if (t) clearInterval(t);
    this.timer = this.retryTimer = this.sweepTimer = this.statusTimer = null;
    this.closed = true;
    for (const p of [...this.watches.keys()]) this.unwatch(p);
    await this.running;
    const end = Date.now() + FINAL_MS_MAX;
    for (let i = 0; i < FINAL_ROUNDS_MAX && this.dirty.size && Date.now() < end; i++) await this.round();
    this.writeStatus();
  }
}
