// The change journal of deliveries: one JSON line per delivered message, appended and
// fsynced on the volume before the SMTP reply, for the reconciliation after a split
// brain. Ids are node:epoch:seq, the epoch being the SMTP process's start time.
// Appends are group-committed: lines that arrive while a write+fsync runs go out
// together in the next one.
import { mkdirSync } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
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
  private fh: Promise<FileHandle>;
  private seq = 0;
  private readonly epoch = Date.now();
  private pending: { text: string; done: (err?: Error) => void }[] = [];
  private writing = false;

  constructor(dataDir: string, private readonly node: string) {
    const dir = join(dataDir, "journal");
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    this.fh = open(join(dir, `deliveries-${node}.jsonl`), "a", 0o600);
  }

  /** Resolves once the entries are durable. */
  append(e: Omit<JournalEntry, "id" | "node" | "epoch" | "ts" | "kind">[]): Promise<void> {
    let text = "";
    for (const x of e) text += JSON.stringify({ id: `${this.node}:${this.epoch}:${++this.seq}`, node: this.node, epoch: this.epoch, ts: new Date().toISOString(), kind: "delivery", ...x }) + "\n";
    return new Promise((resolve, reject) => {
      this.pending.push({ text, done: (err) => (err ? reject(err) : resolve()) });
      void this.flush();
    });
  }

  private async flush(): Promise<void> {
    if (this.writing) return;
    this.writing = true;
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
          const fh = await this.fh;
          await fh.write(batch.map((b) => b.text).join(""));
          await fh.sync();
          for (const b of batch) b.done();
        } catch (err) {
          for (const b of batch) b.done(err as Error);
        }
      }
    } finally {
      this.writing = false;
    }
  }

  async close(): Promise<void> {
    await (await this.fh).close();
  }
}
