// The change journal of deliveries: one JSON line per delivered message, appended and
// fsynced on the volume before the SMTP reply, for the reconciliation after a split
// brain. Ids are node:epoch:seq, the epoch being the SMTP process's start time.
// Appends are group-committed: lines that arrive while a write+fsync runs go out
// together in the next one.
import { closeSync, fsync, mkdirSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";

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

export class Journal {
  private readonly fd: number;
  private seq = 0;
  private readonly epoch = Date.now();
  private pending: { text: string; done: (err?: Error) => void }[] = [];
  private writing = false;
  private closed = false;
  private idle: Promise<void> = Promise.resolve();

  constructor(dataDir: string, private readonly node: string) {
    const dir = join(dataDir, "journal");
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    this.fd = openSync(join(dir, `deliveries-${node}.jsonl`), "a", 0o600);
  }

  /** Resolves once the entries are durable. */
  append(e: Omit<JournalEntry, "id" | "node" | "epoch" | "ts" | "kind">[]): Promise<void> {
    let text = "";
    for (const x of e) text += JSON.stringify({ id: `${this.node}:${this.epoch}:${++this.seq}`, node: this.node, epoch: this.epoch, ts: new Date().toISOString(), kind: "delivery", ...x }) + "\n";
    if (this.closed) return Promise.reject(new Error("the delivery journal is closed"));
    return new Promise((resolve, reject) => {
      this.pending.push({ text, done: (err) => (err ? reject(err) : resolve()) });
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
        try {
          // The append only fills the page cache (inline); the fsync waits in the pool.
          const buf = Buffer.from(batch.map((b) => b.text).join(""));
          for (let off = 0; off < buf.length; ) off += writeSync(this.fd, buf, off, buf.length - off);
          await new Promise<void>((resolve, reject) => fsync(this.fd, (err) => (err ? reject(err) : resolve())));
          for (const b of batch) b.done();
        } catch (err) {
          for (const b of batch) b.done(err as Error);
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
