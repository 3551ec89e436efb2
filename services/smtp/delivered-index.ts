// The delivered index: which backup-MX queue ids the cluster has already delivered, and
// to which mailboxes, so that a message the backup MX forwards again (the active node's
// 250 reached the disk but not the backup MX's spool cleanup) or that a node drains
// from its own spool after a takeover is dropped instead of delivered a second time.
// It is read from every node's delivery journal on the volume
// (<data>/journal/deliveries-*.jsonl: after failovers both nodes' files are there),
// streamed at start, and the SMTP service records each new delivery in it.
//
// Bounds: at most INDEX_IDS_MAX queue ids (the oldest are forgotten first), read from
// the last TAIL_BYTES_MAX of each of at most FILES_MAX journal files (a line is at most
// that long too); at most one claim per open SMTP session. So a message is known as
// delivered if it is among the last 100,000 that came through a backup MX and in the
// last 64 MiB (some 200,000 deliveries) of the journal that recorded it.
// Known gap: a spooled copy that waits longer than that after its delivery (a backup MX
// cut off from every active node for days of heavy mail) would be delivered again.
import { createReadStream, existsSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { compareHlc, isHlc, type Hlc } from "../../common/hlc.ts";
import { JOURNAL_FILE_RE } from "./journal.ts";

export const INDEX_IDS_MAX = 100_000;
export const TAIL_BYTES_MAX = 64 * 1024 * 1024;
export const FILES_MAX = 16;

export interface IndexLoad {
  readonly files: number;
  /** Journal files beyond FILES_MAX, not read. */
  readonly skipped: number;
  readonly ids: number;
  /** The greatest stamp at the end of any journal (for the local clock to observe). */
  readonly hlcMax?: Hlc;
  readonly ms: number;
}

interface Seen {
  readonly queueId: string;
  readonly mailbox: string;
  readonly ts: string;
}

const HLC_KEY = '"hlc":"';

/** One journal's tail: the backup-MX deliveries in it and its last stamp. */
async function readTail(file: string, bytesMax: number, out: Seen[]): Promise<Hlc | undefined> {
  const size = statSync(file).size;
  const start = Math.max(0, size - bytesMax);
  const lines = createInterface({ input: createReadStream(file, { start }), crlfDelay: Infinity });
  let first = start > 0; // a line cut by the start offset is not a whole line
  let last: Hlc | undefined;
  for await (const line of lines) {
    if (first) {
      first = false;
      continue;
    }
    const h = line.indexOf(HLC_KEY);
    if (h >= 0) {
      const stamp = line.slice(h + HLC_KEY.length, line.indexOf('"', h + HLC_KEY.length));
      if (isHlc(stamp)) last = stamp;
    }
    // Most deliveries did not come through a backup MX: only theirs are parsed.
    if (!line.includes('"peerQueueId"')) continue;
    try {
      const e = JSON.parse(line) as { peerQueueId?: unknown; mailbox?: unknown; ts?: unknown };
      if (typeof e.peerQueueId === "string" && typeof e.mailbox === "string" && typeof e.ts === "string") out.push({ queueId: e.peerQueueId, mailbox: e.mailbox, ts: e.ts });
    } catch {
      // a torn line (a crash in the middle of a write): never acknowledged, so not delivered
    }
  }
  return last;
}

export class DeliveredIndex {
  /** Queue id -> mailboxes it was delivered to; in insertion order, oldest first. */
  private ids = new Map<string, Set<string>>();
  private readonly claimed = new Set<string>();
  private loading: Promise<IndexLoad> | null = null;
  private droppedCount = 0;

  constructor(
    private readonly dir: string,
    private readonly idsMax = INDEX_IDS_MAX,
    private readonly tailBytesMax = TAIL_BYTES_MAX,
  ) {}

  /** Streams the journals' tails in (once; once more on the next call after a failure). */
  load(): Promise<IndexLoad> {
    this.loading ??= this.read().catch((err: unknown) => {
      this.loading = null;
      throw err;
    });
    return this.loading;
  }

  /** Which of MAILBOXES the message QUEUEID has not been delivered to yet (after the load). */
  async remaining(queueId: string, mailboxes: readonly string[]): Promise<string[]> {
    await this.load();
    const done = this.ids.get(queueId);
    return done ? mailboxes.filter((m) => !done.has(m)) : [...mailboxes];
  }

  /** Records a delivery of QUEUEID to MAILBOXES (made durable in the journal just before). */
  record(queueId: string, mailboxes: readonly string[]): void {
    add(this.ids, queueId, mailboxes, this.idsMax);
  }

  /**
   * Marks QUEUEID as being delivered now. False when it already is: the caller answers
   * 4xx (the sender keeps its copy and tries again, and then finds it delivered).
   */
  claim(queueId: string): boolean {
    if (this.claimed.has(queueId)) return false;
    this.claimed.add(queueId);
    return true;
  }

  release(queueId: string): void {
    this.claimed.delete(queueId);
  }

  /** Counts one duplicate dropped; returns how many since start. */
  dropped(): number {
    return ++this.droppedCount;
  }

  get size(): number {
    return this.ids.size;
  }

  private async read(): Promise<IndexLoad> {
    const t0 = Date.now();
    const names = existsSync(this.dir) ? readdirSync(this.dir).filter((f) => JOURNAL_FILE_RE.test(f)).sort() : [];
    const files = names.slice(0, FILES_MAX);
    const seen: Seen[] = [];
    let hlcMax: Hlc | undefined;
    for (const f of files) {
      const last = await readTail(join(this.dir, f), this.tailBytesMax, seen);
      if (last && (!hlcMax || compareHlc(last, hlcMax) > 0)) hlcMax = last;
    }
    // Oldest first across the files, so the bound forgets the oldest; then what was
    // recorded while the files were read, which is newer still.
    seen.sort((x, y) => (x.ts < y.ts ? -1 : x.ts > y.ts ? 1 : 0));
    const ids = new Map<string, Set<string>>();
    for (const s of seen) add(ids, s.queueId, [s.mailbox], this.idsMax);
    for (const [q, m] of this.ids) add(ids, q, [...m], this.idsMax);
    this.ids = ids;
    return { files: files.length, skipped: names.length - files.length, ids: ids.size, ...(hlcMax ? { hlcMax } : {}), ms: Date.now() - t0 };
  }
}

/** Adds MAILBOXES to QUEUEID's set, making it the newest; forgets the oldest beyond MAX. */
function add(ids: Map<string, Set<string>>, queueId: string, mailboxes: readonly string[], max: number): void {
  const set = ids.get(queueId) ?? new Set<string>();
  ids.delete(queueId);
  for (const m of mailboxes) set.add(m);
  ids.set(queueId, set);
  while (ids.size > max) ids.delete(ids.keys().next().value!);
}
