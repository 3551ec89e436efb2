// The change journal of deliveries: one JSON line per delivered message, appended and
// fsynced on the volume before the SMTP reply, for the reconciliation after a split
// brain. Ids are node:epoch:seq, the epoch being the SMTP process's start time.
import { closeSync, fsyncSync, mkdirSync, openSync, writeSync } from "node:fs";
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

export class Journal {
  private readonly fd: number;
  private seq = 0;
  private readonly epoch = Date.now();

  constructor(dataDir: string, private readonly node: string) {
    const dir = join(dataDir, "journal");
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    this.fd = openSync(join(dir, `deliveries-${node}.jsonl`), "a", 0o600);
  }

  append(e: Omit<JournalEntry, "id" | "node" | "epoch" | "ts" | "kind">[]): void {
    let text = "";
    for (const x of e) text += JSON.stringify({ id: `${this.node}:${this.epoch}:${++this.seq}`, node: this.node, epoch: this.epoch, ts: new Date().toISOString(), kind: "delivery", ...x }) + "\n";
    writeSync(this.fd, text);
    fsyncSync(this.fd);
  }

  close(): void {
    closeSync(this.fd);
  }
}
