// The change journal of deliveries: one JSON line per delivered message, appended and
// fsynced on the volume before the SMTP reply, for the reconciliation after a split
// brain. Ids are node:epoch:seq, the epoch being the SMTP process's start time. Every
// entry carries a hybrid logical clock stamp (`hlc`, common/hlc.ts, clock node = the
// node id) and, for a message that came through the backup MX (forwarded by the peer
// or drained from this node's spool), that backup MX's queue id (`peerQueueId`): the
// delivered index (delivered-index.ts) reads it back so such a message is delivered
// once only.
// Appends are group-committed: lines that arrive while a write+fsync runs go out
// together in the next one. The Maildir new/ directories the deliveries renamed into
// are fsynced in the same round, at the same moment as the journal: both join one
// journal commit of the file system (fsyncs started after a commit already covered
// them would each cost ext4 one more device flush, a protocol C round trip here).
//
// Stamps never go backwards across restarts: at start the clock observes the last
// stamp in the node's own file (read from its last HLC_TAIL_BYTES only), and a torn
// last line (a crash in the middle of a write, never acknowledged) is ended with a
// newline so the next entry starts a line of its own. The node's own last stamp is
// taken even when it is far ahead of the wall clock (the clock was set back): stamps
// then run ahead of the wall clock until it catches up, and `clockWarning` says so.
import { closeSync, fstatSync, mkdirSync, openSync, readSync, writeSync } from "node:fs";
import { join } from "node:path";
import { fsyncAsync, fsyncPathAsync } from "../../common/fsutil.ts";
import { HLC_DRIFT_MAX_MS, HlcClock, isHlc, parseHlc, type Hlc } from "../../common/hlc.ts";

export interface JournalEntry {
  readonly id: string;
  readonly node: string;
  readonly epoch: number;
  readonly hlc: Hlc;
  readonly ts: string;
  readonly kind: "delivery";
  readonly mailbox: string;
  readonly file: string;
  readonly sha256: string;
  readonly size: number;
  /** The backup MX's queue id of a message that came through it (delivered-index.ts). */
  readonly peerQueueId?: string;
}

const BATCH_MAX_BYTES = 1024 * 1024;
/** How much of its own file's end the journal reads at start to find its last stamp. */
export const HLC_TAIL_BYTES = 64 * 1024;

/** Where every node's journal lives on the volume; NODE's file in it. */
export function journalDir(dataDir: string): string {
  return join(dataDir, "journal");
}
export const JOURNAL_FILE_RE = /^deliveries-[^/]+\.jsonl$/;
const journalFile = (node: string) => `deliveries-${node}.jsonl`;

/**
 * The end of the open file FD: the last well-formed stamp in its last HLC_TAIL_BYTES, if
 * any, and whether it ends in the middle of a line (a crash during a write).
 */
function tailOf(fd: number): { last?: Hlc; torn: boolean } {
  const size = fstatSync(fd).size;
  const len = Math.min(size, HLC_TAIL_BYTES);
  const buf = Buffer.alloc(len);
  let got = 0;
  while (got < len) {
    const n = readSync(fd, buf, got, len - got, size - len + got);
    if (n === 0) break;
    got += n;
  }
  const torn = got > 0 && buf[got - 1] !== 0x0a;
  // Lines are appended in stamp order: the last line with a stamp holds the greatest.
  // A torn last line does not parse and is passed.
  const lines = buf.subarray(0, got).toString("utf8").split("\n");
  for (let i = lines.length - 1; i >= 0; i--) {
    try {
      const hlc = (JSON.parse(lines[i]!) as { hlc?: unknown }).hlc;
      if (isHlc(hlc)) return { last: hlc, torn };
    } catch {
      // not a whole line
    }
  }
  return { torn };
}

/** A directory of the delivery could not be made durable: the delivery fails (4xx). */
export class DirSyncError extends Error {}

export class Journal {
  private readonly fd: number;
  private seq = 0;
  private readonly epoch = Date.now();
  private pending: { text: string; dirs: readonly string[]; done: (err?: Error) => void }[] = [];
  private writing = false;
  private closed = false;
  private idle: Promise<void> = Promise.resolve();
  private readonly clock: HlcClock;
  /** Set when the last stamp in the file could not be observed (see the header). */
  readonly clockWarning: string | null = null;

  constructor(dataDir: string, private readonly node: string, now: () => number = Date.now) {
    const dir = journalDir(dataDir);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const file = join(dir, journalFile(node));
    this.fd = openSync(file, "a", 0o600);
    const rd = openSync(file, "r");
    let tail: ReturnType<typeof tailOf>;
    try {
      tail = tailOf(rd);
    } finally {
      closeSync(rd);
    }
    // A torn last line was never acknowledged; it is ended here, so that it does not
    // swallow the first new entry (readers pass over a line that does not parse).
    if (tail.torn) writeSync(this.fd, "\n");
    const last = tail.last;
    this.clock = new HlcClock(node, now, last);
    if (last !== undefined && parseHlc(last).wallMs > now() + HLC_DRIFT_MAX_MS) this.clockWarning = `the journal's last stamp ${last} is ahead of the wall clock by more than ${HLC_DRIFT_MAX_MS} ms (was the clock set back?); new stamps continue after it`;
  }

  /** Moves the clock past a stamp seen elsewhere (the peer's journal); false if refused (too far ahead). */
  observe(stamp: Hlc): boolean {
    return this.clock.observe(stamp);
  }

  /**
   * Resolves once the entries and DIRS (directories the delivery renamed into) are
   * durable. Rejects with a DirSyncError when a directory could not be synced (the
   * delivery must fail), with another error when only the journal failed.
   */
  append(e: Omit<JournalEntry, "id" | "node" | "epoch" | "hlc" | "ts" | "kind">[], dirs: readonly string[] = []): Promise<void> {
    let text = "";
    for (const x of e) text += JSON.stringify({ id: `${this.node}:${this.epoch}:${++this.seq}`, node: this.node, epoch: this.epoch, hlc: this.clock.tick(), ts: new Date().toISOString(), kind: "delivery", ...x }) + "\n";
    // Closed (the service is stopping): the directories would go unsynced, so the
    // delivery fails and the client sends it again.
    if (this.closed) return Promise.reject(new DirSyncError("the delivery journal is closed; new/ was not synced"));
    return new Promise((resolve, reject) => {
      this.pending.push({ text, dirs, done: (err) => (err ? reject(err) : resolve()) });
      void this.flush();
    });
  }

  private flush(): void {
    if (this.writing) return;
    this.writing = true;
    this.idle = this.drain();
  }

  private async drain(): Promise<void> {
    try {
      while (this.pending.length) {
        const batch: typeof this.pending = [];
        let bytes = 0;
        while (this.pending.length && bytes < BATCH_MAX_BYTES) {
          const x = this.pending.shift()!;
          batch.push(x);
          bytes += x.text.length;
        }
        // The append only fills the page cache (inline); the fsyncs wait in the pool, the
        // journal's and the directories' together.
        const dirs = [...new Set(batch.flatMap((b) => b.dirs))];
        const dirErrors = new Map<string, Error>();
        let journalError: Error | null = null;
        try {
          const buf = Buffer.from(batch.map((b) => b.text).join(""));
          for (let off = 0; off < buf.length; ) off += writeSync(this.fd, buf, off, buf.length - off);
        } catch (err) {
          journalError = err as Error;
        }
        await Promise.all([
          journalError ? Promise.resolve() : fsyncAsync(this.fd).catch((err: Error) => void (journalError = err)),
          ...dirs.map((d) => fsyncPathAsync(d).catch((err: Error) => void dirErrors.set(d, err))),
        ]);
        for (const b of batch) {
          const bad = b.dirs.find((d) => dirErrors.has(d));
          if (bad) b.done(new DirSyncError(`fsync of ${bad}: ${dirErrors.get(bad)!.message}`));
          else b.done(journalError ?? undefined);
        }
      }
    } finally {
      this.writing = false;
    }
  }

  /** Waits for the appends in progress, then closes (the fd is never reused under them). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.idle;
    closeSync(this.fd);
  }
}
