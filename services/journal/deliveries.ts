// What SMTP delivered and the Maildir scanner has not seen yet, read incrementally from
// SMTP's delivery journals (`deliveries-*.jsonl`), so that a delivered message is not
// journaled a second time as an `append` when the scanner finds it in the Maildir.
// The read offsets and the entries not yet seen are kept durably beside the scan state
// (written after the journal commit of the round, like the state).
// Bounds: PENDING_MAX entries (the oldest go first; a message whose entry went is then
// journaled as an `append` with its sha256, which the reconciler dedupes by content),
// entries older than PENDING_AGE_MAX_MS are dropped, and one call reads at most
// READ_BYTES_MAX of each file (the rest the next round).
import { closeSync, openSync, readFileSync, readSync, statSync } from "node:fs";
import { join } from "node:path";
import { segmentsOf } from "./read.ts";
import { writeDurable } from "./scan-state.ts";

export const PENDING_MAX = 100_000;
export const PENDING_AGE_MAX_MS = 24 * 3600_000;
const READ_BYTES_MAX = 4 * 1024 * 1024;

export interface PendingDelivery {
  readonly sha256: string;
  readonly size: number;
  /** When SMTP journaled it (ms). */
  readonly ms: number;
  /** The Maildir++ folder directory it was delivered into: "" (INBOX) or `.Junk` (the spam filter's). */
  readonly dir: string;
}

interface Saved {
  readonly v: 1;
  readonly offsets: Record<string, { ino: number; off: number }>;
  /** [key, sha256, size, ms, dir]; dir absent in files written before folders (INBOX). */
  readonly pending: [string, string, number, number, string?][];
}

export class DeliveryIndex {
  private offsets = new Map<string, { ino: number; off: number }>();
  private pending = new Map<string, PendingDelivery>();
  private changed = false;

  constructor(
    private readonly journalDir: string,
    private readonly stateFile: string,
  ) {
    let saved: Saved | null = null;
    try {
      saved = JSON.parse(readFileSync(stateFile, "utf8")) as Saved;
    } catch {
      saved = null;
    }
    if (saved?.v === 1) {
      for (const [f, o] of Object.entries(saved.offsets)) this.offsets.set(f, o);
      for (const [k, sha256, size, ms, dir] of saved.pending) this.pending.set(k, { sha256, size, ms, dir: dir ?? "" });
    }
  }

  /** Reads what SMTP appended since the last call (whole lines only). */
  catchUp(nowMs = Date.now()): void {
    for (const f of segmentsOf(this.journalDir)) {
      if (f.type !== "deliveries") continue;
      let st;
      try {
        st = statSync(f.path);
      } catch {
        continue;
      }
      let o = this.offsets.get(f.name);
      // A new file, or one that was replaced or cut: from its start.
      if (!o || o.ino !== st.ino || o.off > st.size) o = { ino: st.ino, off: 0 };
      if (st.size > o.off) o = { ino: st.ino, off: o.off + this.readFrom(f.path, o.off, Math.min(st.size - o.off, READ_BYTES_MAX)) };
      const prev = this.offsets.get(f.name);
      if (!prev || prev.off !== o.off || prev.ino !== o.ino) {
        this.offsets.set(f.name, o);
        this.changed = true;
      }
    }
    for (const [k, p] of this.pending) {
      if (nowMs - p.ms <= PENDING_AGE_MAX_MS && this.pending.size <= PENDING_MAX) break;
      this.pending.delete(k);
      this.changed = true;
    }
  }

  /**
   * Starts after what the files hold now, forgetting the pending entries: the first
   * scan of a tree takes what is in the Maildirs as they are, so SMTP's history is no news.
   */
  skipToEnd(): void {
    this.pending.clear();
    for (const f of segmentsOf(this.journalDir)) {
      if (f.type !== "deliveries") continue;
      try {
        const st = statSync(f.path);
        const tail = Math.min(st.size, 64 * 1024);
        const buf = Buffer.alloc(tail);
        const fd = openSync(f.path, "r");
        try {
          readSync(fd, buf, 0, tail, st.size - tail);
        } finally {
          closeSync(fd);
        }
        const nl = buf.lastIndexOf(0x0a);
        this.offsets.set(f.name, { ino: st.ino, off: nl < 0 ? st.size - tail : st.size - tail + nl + 1 });
      } catch {
        // gone
      }
    }
    this.changed = true;
  }

  /** Reads LEN bytes at OFF, takes the whole lines in; returns the bytes consumed. */
  private readFrom(path: string, off: number, len: number): number {
    const buf = Buffer.alloc(len);
    const fd = openSync(path, "r");
    let n: number;
    try {
      n = readSync(fd, buf, 0, len, off);
    } finally {
      closeSync(fd);
    }
    const end = buf.subarray(0, n).lastIndexOf(0x0a);
    if (end < 0) return 0;
    for (const line of buf.subarray(0, end).toString("utf8").split("\n")) {
      let e: { file?: unknown; sha256?: unknown; size?: unknown; ts?: unknown };
      try {
        e = JSON.parse(line) as typeof e;
      } catch {
        continue;
      }
      if (typeof e.file !== "string") continue;
      // <domain>/<local>/Maildir/new/<name>, or <domain>/<local>/Maildir/<.Folder>/new/<name>
      const parts = e.file.split("/");
      if (parts.length !== 5 && parts.length !== 6) continue;
      // <domain>/<local>/quarantine/new/<name>: the spam quarantine, no Dovecot folder (no scan sees it).
      if (parts[2] !== "Maildir") continue;
      const dir = parts.length === 6 ? parts[3]! : "";
      const key = deliveryKey(`${parts[0]}/${parts[1]}`, parts[parts.length - 1]!);
      this.pending.delete(key); // re-inserted: the Map keeps age order
      this.pending.set(key, { sha256: String(e.sha256 ?? ""), size: Number(e.size ?? 0), ms: Date.parse(String(e.ts ?? "")) || Date.now(), dir });
      this.changed = true;
    }
    return end + 1;
  }

  /** The delivery of message KEY to the user at USERREL (`domain/local`), removed from the index. */
  take(userRel: string, key: string): PendingDelivery | undefined {
    const k = deliveryKey(userRel, key);
    const p = this.pending.get(k);
    if (p) {
      this.pending.delete(k);
      this.changed = true;
    }
    return p;
  }

  /** The user's deliveries not seen yet (key, entry). */
  *pendingOf(userRel: string): Generator<[string, PendingDelivery]> {
    const prefix = `${userRel}\0`;
    for (const [k, p] of this.pending) if (k.startsWith(prefix)) yield [k.slice(prefix.length), p];
  }

  get size(): number {
    return this.pending.size;
  }

  /** Writes the offsets and the pending entries durably (after the round's journal commit). */
  async save(): Promise<void> {
    if (!this.changed) return;
    const saved: Saved = { v: 1, offsets: Object.fromEntries(this.offsets), pending: [...this.pending].map(([k, p]) => [k, p.sha256, p.size, p.ms, p.dir]) };
    await writeDurable(this.stateFile, JSON.stringify(saved));
    this.changed = false;
  }
}

function deliveryKey(userRel: string, key: string): string {
  return `${userRel}\0${key}`;
}

export function deliveryIndexFile(scanDir: string): string {
  return join(scanDir, "deliveries.json");
}
