// The change journal: every change a user or operator makes, one JSON line
// `{id: "node:epoch:seq", node, epoch, seq, hlc, kind, ...payload}` in segment files
// `<data>/journal/changes-<node>-<epoch>-<n>.jsonl` on the volume, stamped with the
// node's hybrid logical clock, for the reconciliation after a split brain.
//
// Guarantees: `append` resolves once its lines are written and fsynced (under protocol
// C: on both disks); lines that arrive while a write+fsync runs go out together in the
// next one (group commit). Each segment has exactly one writer (one process: its epoch,
// unique by an exclusive create), and its lines are in HLC order; a segment rotates at
// `segmentBytesMax`. Kinds are registered (`registerKind`, a zod schema of the payload):
// an unknown kind or a payload its schema refuses is never written.
// Bounds: at most PENDING_MAX lines wait for a commit (more: the append fails), a
// commit writes at most BATCH_MAX_BYTES, a line is at most LINE_MAX_BYTES.
// Known gap: a crash between a change and its append loses the line; callers append
// right after the change and answer only once the append resolved, so an acknowledged
// change is journaled (the Dovecot source re-derives its changes from the Maildir
// after any crash, see maildir-watch.ts).
import { closeSync, existsSync, fstatSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import type { z } from "zod";
import { fsyncAsync, fsyncPath, fsyncPathAsync } from "../../common/fsutil.ts";
import { startTicksOf } from "../../common/daemon.ts";
import { compareHlc, formatHlc, HlcClock, isHlc, parseHlc, type Hlc } from "../../common/hlc.ts";
import { readTail, segmentsOf } from "./read.ts";

/** What every line carries; the kind's payload fields follow. */
export interface EntryHead {
  readonly id: string;
  readonly node: string;
  readonly epoch: number;
  readonly seq: number;
  readonly hlc: Hlc;
  readonly kind: string;
}
export type JournalEntry = EntryHead & Record<string, unknown>;

export const RESERVED_FIELDS = ["id", "node", "epoch", "seq", "hlc", "kind"] as const;
const KIND_RE = /^[a-z][a-z0-9-]{0,31}$/;

const kinds = new Map<string, z.ZodType<Record<string, unknown>>>();

/**
 * Makes KIND writable; SCHEMA checks its payload (the fields besides the head). A new
 * source of changes (the spam filter's token deltas, say) is one registration; the
 * reader passes every kind through, registered or not, so a reconciler dispatches on
 * `kind` and needs no change for kinds it does not handle.
 */
export function registerKind<T extends Record<string, unknown>>(kind: string, schema: z.ZodType<T>): void {
  if (!KIND_RE.test(kind)) throw new Error(`journal: bad kind name "${kind}"`);
  const prev = kinds.get(kind);
  if (prev && prev !== schema) throw new Error(`journal: kind "${kind}" is already registered with another schema`);
  kinds.set(kind, schema as z.ZodType<Record<string, unknown>>);
}

export function registeredKinds(): string[] {
  return [...kinds.keys()].sort();
}

/** The payload as its kind's schema accepts it; throws with the reason otherwise. */
export function checkPayload(kind: string, payload: Record<string, unknown>): Record<string, unknown> {
  const schema = kinds.get(kind);
  if (!schema) throw new Error(`journal: unknown kind "${kind}" (registered: ${registeredKinds().join(", ") || "none"})`);
  for (const f of RESERVED_FIELDS) if (f in payload) throw new Error(`journal: a ${kind} payload may not set "${f}"`);
  const r = schema.safeParse(payload);
  if (!r.success) throw new Error(`journal: malformed ${kind} payload: ${r.error.issues.map((i) => `${i.path.join(".") || "(payload)"}: ${i.message}`).join("; ")}`);
  return r.data;
}

export const SEGMENT_BYTES_MAX_DEFAULT = 8 * 1024 * 1024;
export const PENDING_MAX = 100_000;
export const BATCH_MAX_BYTES = 1024 * 1024;
export const LINE_MAX_BYTES = 256 * 1024;
/** Segments (and delivery files) whose tails are read at open to move the clock past them. */
const TAILS_OBSERVED_MAX = 32;
const EPOCH_TRIES_MAX = 1000;

export interface ChangeJournalOptions {
  readonly segmentBytesMax?: number;
  readonly now?: () => number;
}

export interface AppendRequest {
  readonly kind: string;
  readonly payload: Record<string, unknown>;
  /**
   * When the change happened, if known (a file's ctime for a change found by a scan):
   * the stamp is taken there when that is later than every stamp before, else just
   * after the last one; never later than now.
   */
  readonly atMs?: number;
}

interface Pending {
  readonly text: string;
  readonly done: (err?: Error) => void;
}

/** This machine's boot, so that a writer's pid is only trusted on the machine that ran it. */
export function bootId(): string {
  try {
    return readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
  } catch {
    return "unknown";
  }
}

export class ChangeJournal {
  readonly dir: string;
  private readonly clock: HlcClock;
  private readonly now: () => number;
  private readonly segmentBytesMax: number;
  /** The greatest stamp made or observed: stamps at a past time are taken after it. */
  private high: Hlc | null = null;
  private epoch = 0;
  private seq = 0;
  private segment = -1;
  private fd: number | null = null;
  private segmentBytes = 0;
  private pending: Pending[] = [];
  private writing = false;
  private closed = false;
  private idle: Promise<void> = Promise.resolve();

  constructor(dataDir: string, readonly node: string, o: ChangeJournalOptions = {}) {
    this.dir = join(dataDir, "journal");
    this.now = o.now ?? Date.now;
    this.segmentBytesMax = o.segmentBytesMax ?? SEGMENT_BYTES_MAX_DEFAULT;
    this.clock = new HlcClock(node, this.now);
    if (!existsSync(this.dir)) {
      mkdirSync(this.dir, { recursive: true, mode: 0o700 });
      fsyncPath(dataDir);
    }
    // Stamps from here must follow every stamp already on the volume, this node's
    // earlier processes' and the peer's (after a failover the peer's journal is here).
    for (const h of lastStampsOnVolume(this.dir)) this.observe(h);
  }

  /** Moves the clock past STAMP (from elsewhere); false when it is too far ahead. */
  observe(stamp: Hlc): boolean {
    if (!this.clock.observe(stamp)) return false;
    if (this.high === null || compareHlc(stamp, this.high) > 0) this.high = stamp;
    return true;
  }

  /** The stamp of the last line this journal made or the last it observed. */
  get lastStamp(): Hlc | null {
    return this.high;
  }

  private stamp(atMs?: number): Hlc {
    let s: Hlc | null = null;
    if (atMs !== undefined && Number.isFinite(atMs)) {
      const at = Math.min(Math.floor(atMs), this.now());
      const h = this.high ? parseHlc(this.high) : null;
      if (!h || at > h.wallMs) s = formatHlc({ wallMs: at, counter: 0, node: this.node });
      else if (h.counter < 99_999) s = formatHlc({ wallMs: h.wallMs, counter: h.counter + 1, node: this.node });
      if (s && !this.clock.observe(s)) s = null;
    }
    s ??= this.clock.tick();
    this.high = s;
    return s;
  }

  /** Appends one change; resolves with its line once durable. */
  async append(kind: string, payload: Record<string, unknown>, atMs?: number): Promise<JournalEntry> {
    const [e] = await this.appendMany([{ kind, payload, atMs }]);
    return e!;
  }

  /**
   * Appends CHANGES in order (stamps increase along the list); resolves once all are
   * durable. Nothing is written when one of them is malformed.
   */
  appendMany(changes: readonly AppendRequest[]): Promise<JournalEntry[]> {
    if (this.closed) return Promise.reject(new Error("journal: closed"));
    if (changes.length === 0) return Promise.resolve([]);
    const checked = changes.map((c) => ({ kind: c.kind, payload: checkPayload(c.kind, c.payload), atMs: c.atMs }));
    if (this.pending.length + checked.length > PENDING_MAX) return Promise.reject(new Error(`journal: more than ${PENDING_MAX} lines wait for a commit`));
    if (this.epoch === 0) this.openFirstSegment();
    const entries: JournalEntry[] = [];
    let text = "";
    for (const c of checked) {
      const seq = ++this.seq;
      const e = { id: `${this.node}:${this.epoch}:${seq}`, node: this.node, epoch: this.epoch, seq, hlc: this.stamp(c.atMs), kind: c.kind, ...c.payload } as JournalEntry;
      const line = JSON.stringify(e) + "\n";
      if (Buffer.byteLength(line) > LINE_MAX_BYTES) throw new Error(`journal: a ${c.kind} line is over ${LINE_MAX_BYTES} bytes`);
      entries.push(e);
      text += line;
    }
    return new Promise((resolve, reject) => {
      this.pending.push({ text, done: (err) => (err ? reject(err) : resolve(entries)) });
      this.flush();
    });
  }

  private segmentPath(n: number): string {
    return join(this.dir, `changes-${this.node}-${this.epoch}-${n}.jsonl`);
  }

  /** A writer record beside the segments: prune leaves a live writer's open segment. */
  private writerPath(): string {
    return join(this.dir, `changes-${this.node}-${this.epoch}.writer`);
  }

  private openFirstSegment(): void {
    let epoch = this.now();
    for (let i = 0; i < EPOCH_TRIES_MAX; i++, epoch++) {
      this.epoch = epoch;
      try {
        this.fd = openSync(this.segmentPath(0), "wx", 0o600);
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      }
    }
    if (this.fd === null) throw new Error(`journal: no free epoch after ${EPOCH_TRIES_MAX} tries`);
    this.segment = 0;
    this.segmentBytes = 0;
    writeFileSync(this.writerPath(), JSON.stringify({ pid: process.pid, startTicks: startTicksOf(process.pid), boot: bootId() }) + "\n", { mode: 0o600 });
    // The segment's directory entry is made durable with the first commit's fsync below.
    this.dirDirty = true;
  }
  private dirDirty = false;

  private rotate(): void {
    closeSync(this.fd!);
    this.fd = null;
    this.segment++;
    this.fd = openSync(this.segmentPath(this.segment), "wx", 0o600);
    this.segmentBytes = 0;
    this.dirDirty = true;
  }

  private flush(): void {
    if (this.writing) return;
    this.writing = true;
    this.idle = this.drain();
  }

  private async drain(): Promise<void> {
    try {
      while (this.pending.length) {
        const batch: Pending[] = [];
        let bytes = 0;
        while (this.pending.length && bytes < BATCH_MAX_BYTES) {
          const p = this.pending.shift()!;
          batch.push(p);
          bytes += Buffer.byteLength(p.text);
        }
        let error: Error | null = null;
        try {
          if (this.segmentBytes > 0 && this.segmentBytes + bytes > this.segmentBytesMax) this.rotate();
          const buf = Buffer.from(batch.map((b) => b.text).join(""));
          for (let off = 0; off < buf.length; ) off += writeSync(this.fd!, buf, off, buf.length - off);
          this.segmentBytes += buf.length;
          const dir = this.dirDirty;
          this.dirDirty = false;
          await Promise.all([fsyncAsync(this.fd!), dir ? fsyncPathAsync(this.dir) : Promise.resolve()]);
        } catch (err) {
          error = err as Error;
        }
        for (const b of batch) b.done(error ?? undefined);
      }
    } finally {
      this.writing = false;
    }
  }

  /** Waits for the commits in progress, closes the segment and removes the writer record. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.idle;
    if (this.fd !== null) {
      closeSync(this.fd);
      this.fd = null;
      rmSync(this.writerPath(), { force: true });
    }
  }

  /**
   * At process exit (synchronous): when nothing waits for a commit, closes the segment
   * and removes the writer record; otherwise leaves both (prune then asks whether the
   * process is alive).
   */
  abandon(): void {
    if (this.closed || this.pending.length || this.writing) return;
    this.closed = true;
    if (this.fd !== null) {
      closeSync(this.fd);
      this.fd = null;
      rmSync(this.writerPath(), { force: true });
    }
  }

  /** The size of the segment being written (tests). */
  get currentSegment(): { path: string; bytes: number } | null {
    return this.fd === null ? null : { path: this.segmentPath(this.segment), bytes: fstatSync(this.fd).size };
  }
}

/** The last stamps of the most recently written journal files (segments and delivery files). */
function lastStampsOnVolume(dir: string): Hlc[] {
  const files = segmentsOf(dir)
    .sort((a, b) => b.mtimeMs - a.mtimeMs)
    .slice(0, TAILS_OBSERVED_MAX);
  const out: Hlc[] = [];
  for (const f of files) {
    const last = readTail(f.path).last;
    if (last && isHlc(last.hlc)) out.push(last.hlc);
  }
  return out;
}

/** True while the process that wrote changes-NODE-EPOCH-* still runs on this machine. */
export function writerAlive(dir: string, node: string, epoch: number): boolean {
  const f = join(dir, `changes-${node}-${epoch}.writer`);
  if (!existsSync(f)) return false;
  try {
    const w = JSON.parse(readFileSync(f, "utf8")) as { pid: number; startTicks: string | null; boot: string };
    return w.boot === bootId() && w.startTicks !== null && startTicksOf(w.pid) === w.startTicks;
  } catch {
    return false;
  }
}

export interface PruneResult {
  readonly removed: string[];
  readonly kept: number;
}

/**
 * Removes whole change segments whose entries are all older than OLDERTHAN (a
 * watermark the node daemon takes while both sides are in sync, so both have them).
 * A live writer's current segment stays (it may still grow); the delivery files are
 * SMTP's and never removed here. Writer records of writers that are gone go with
 * their last segment.
 */
export function pruneJournal(dataDir: string, olderThan: Hlc): PruneResult {
  parseHlc(olderThan);
  const dir = join(dataDir, "journal");
  const segs = segmentsOf(dir).filter((f) => f.type === "changes");
  const newest = new Map<string, number>();
  for (const f of segs) {
    const w = `${f.node}-${f.epoch}`;
    newest.set(w, Math.max(newest.get(w) ?? -1, f.n!));
  }
  const live = new Map<string, boolean>();
  const isLive = (node: string, epoch: number) => {
    const w = `${node}-${epoch}`;
    if (!live.has(w)) live.set(w, writerAlive(dir, node, epoch));
    return live.get(w)!;
  };
  const removed: string[] = [];
  const left = new Set<string>();
  for (const f of segs) {
    const w = `${f.node}-${f.epoch}`;
    const last = readTail(f.path).last;
    const old = !last || !isHlc(last.hlc) || compareHlc(last.hlc, olderThan) < 0;
    if (!old || (f.n === newest.get(w) && isLive(f.node, f.epoch!))) {
      left.add(w);
      continue;
    }
    rmSync(f.path, { force: true });
    removed.push(f.name);
  }
  for (const r of listWriterRecords(dir)) if (!left.has(`${r.node}-${r.epoch}`) && !isLive(r.node, r.epoch)) rmSync(r.path, { force: true });
  if (removed.length) fsyncPath(dir);
  return { removed: removed.sort(), kept: segs.length - removed.length };
}

export function listWriterRecords(dir: string): { node: string; epoch: number; path: string }[] {
  if (!existsSync(dir)) return [];
  const out: { node: string; epoch: number; path: string }[] = [];
  for (const name of readdirSync(dir)) {
    const m = /^changes-([a-z0-9][a-z0-9_-]{0,31})-(\d+)\.writer$/.exec(name);
    if (m) out.push({ node: m[1]!, epoch: Number(m[2]), path: join(dir, name) });
  }
  return out;
}
