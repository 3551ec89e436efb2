// The change journal of deliveries: one JSON line per delivered message, appended and
// fsynced on the volume before the SMTP reply, for the reconciliation after a split
// brain. Ids are node:epoch:seq, the epoch being the SMTP process's start time.
// Appends are group-committed: lines that arrive while a write+fsync runs go out
// together in the next one. The Maildir new/ directories the deliveries renamed into
// are fsynced in the same round, at the same moment as the journal: both join one
// journal commit of the file system (fsyncs started after a commit already covered
// them would each cost ext4 one more device flush, a protocol C round trip here).
import { closeSync, mkdirSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";
import { fsyncAsync, fsyncPathAsync } from "../../common/fsutil.ts";

export interface JournalEntry {
  readonly id: string;
  readonly node: string;
  readonly epoch: number;
  readonly ts: string;
  readonly kind: "delivery";
  readonly mailbox: string;
  readonly file: string;
  readonly sha256: string;
  readonly size: number;
}

const BATCH_MAX_BYTES = 1024 * 1024;

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

  constructor(dataDir: string, private readonly node: string) {
    const dir = join(dataDir, "journal");
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    this.fd = openSync(join(dir, `deliveries-${node}.jsonl`), "a", 0o600);
  }

  /**
   * Resolves once the entries and DIRS (directories the delivery renamed into) are
   * durable. Rejects with a DirSyncError when a directory could not be synced (the
   * delivery must fail), with another error when only the journal failed.
   */
  append(e: Omit<JournalEntry, "id" | "node" | "epoch" | "ts" | "kind">[], dirs: readonly string[] = []): Promise<void> {
    let text = "";
    for (const x of e) text += JSON.stringify({ id: `${this.node}:${this.epoch}:${++this.seq}`, node: this.node, epoch: this.epoch, ts: new Date().toISOString(), kind: "delivery", ...x }) + "\n";
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
