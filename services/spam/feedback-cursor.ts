// Where the spam worker's feedback loop is in the change journal: per change segment
// (`<data>/journal/changes-<node>-<epoch>-<n>.jsonl`) the byte offset read up to, kept
// durably on the volume (`<data>/spam/feedback-cursor.json`), so that after a restart
// or a failover the loop, on either node, goes on where it was: nothing is lost, and
// at most the last round (if it died between learning and writing the cursor) is
// read again, which the ledger makes harmless (a message retrained to the class it
// has changes nothing). Segments are append-only with one writer each, so an offset
// stays valid; a segment pruned away leaves the cursor; a new one is read from 0 (a
// cursor that is missing or damaged starts every segment at 0: repeats, never loses).
// Only the new bytes are read each round, never the whole journal again.
//
// `chooseRound` (pure) picks a round's entries: the move/copy entries read, in HLC
// order across segments, at most ENTRIES_MAX, and never past the last stamp read of a
// segment whose read was cut short by the byte budget (what follows in it may be older
// than another segment's entries). Entries of one message in one writer's segment are
// in its order, so a message moved back and forth is learned in the order it moved.
// Bounds: SEGMENT_BYTES_MAX per segment and ROUND_BYTES_MAX in all per round; a line
// longer than a segment's read is skipped as malformed (the writer's bound is lower).
import { closeSync, mkdirSync, openSync, readSync } from "node:fs";
import { dirname, join } from "node:path";
import { DamagedStateFileError, firstProblem, isObject, readJsonState, writeFileDurable } from "../../common/fsutil.ts";
import { compareHlc, isHlc, type Hlc } from "../../common/hlc.ts";
import type { JournalEntry } from "../journal/changes.ts";
import type { SeenExpunge } from "./feedback.ts";
import { segmentsOf } from "../journal/read.ts";

export const SEGMENT_BYTES_MAX = 4 * 1024 * 1024;
export const ROUND_BYTES_MAX = 8 * 1024 * 1024;
/** Segments named in a cursor at most (more: the file is damaged). */
const SEGMENTS_MAX = 1_000_000;

export interface FeedbackCursor {
  readonly v: 1;
  /** Segment file name -> bytes read. */
  readonly segments: Readonly<Record<string, number>>;
  /** The recent expunges handled: an append that follows may be the move of one (feedback.ts). */
  readonly recent?: readonly SeenExpunge[];
}

export const EMPTY_CURSOR: FeedbackCursor = Object.freeze({ v: 1, segments: Object.freeze({}) });

export function cursorFile(dataDir: string): string {
  return join(dataDir, "spam", "feedback-cursor.json");
}

const cursorProblem = (v: unknown): string | null => {
  if (!isObject(v)) return "not an object";
  const segs = v.segments;
  return firstProblem(
    v.v === 1 ? null : "not version 1",
    isObject(segs) ? null : "no segments",
    isObject(segs) && Object.keys(segs).length <= SEGMENTS_MAX ? null : "too many segments",
    isObject(segs) && Object.values(segs).every((n) => Number.isSafeInteger(n) && (n as number) >= 0) ? null : "an offset that is not a byte count",
    v.recent === undefined ||
      (Array.isArray(v.recent) && v.recent.length <= 1000 && v.recent.every((x) => isObject(x) && typeof x.user === "string" && typeof x.name === "string" && typeof x.key === "string" && typeof x.node === "string" && typeof x.wallMs === "number"))
      ? null
      : "a malformed list of recent expunges",
  );
};

/**
 * The cursor in FILE; EMPTY_CURSOR when there is none. A damaged one is reported to
 * ONDAMAGED and read as EMPTY_CURSOR (every segment again from its start: the ledger
 * makes the repeats harmless).
 */
export function readCursor(file: string, onDamaged?: (e: DamagedStateFileError) => void): FeedbackCursor {
  try {
    return readJsonState<FeedbackCursor>(file, cursorProblem, "remove it: the spam worker then reads the journal again from its start (nothing is learned twice)") ?? EMPTY_CURSOR;
  } catch (err) {
    if (!(err instanceof DamagedStateFileError)) throw err;
    onDamaged?.(err);
    return EMPTY_CURSOR;
  }
}

/** Writes CURSOR to FILE (temp file, fsync, rename, fsync of the folder). */
export function writeCursor(file: string, cursor: FeedbackCursor): void {
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  writeFileDurable(file, JSON.stringify(cursor) + "\n", 0o600);
}

/** One whole line of a segment. */
export interface SegmentLine {
  /** Byte offsets of the line in its segment: [start, end) with end after its newline. */
  readonly start: number;
  readonly end: number;
  /** Null when the line is not a journal entry (malformed, or NULs a crash left). */
  readonly entry: JournalEntry | null;
}

/** What a round read of one segment. */
export interface SegmentChunk {
  readonly name: string;
  /** Where the read began (the cursor's offset). */
  readonly from: number;
  /** After the last whole line read (or after a skipped overlong line). */
  readonly end: number;
  /** True when bytes are left in the segment after END (the budget cut the read). */
  readonly more: boolean;
  readonly lines: readonly SegmentLine[];
}

export interface Chunks {
  readonly chunks: readonly SegmentChunk[];
  /** Every change segment there is now (a cursor drops the others). */
  readonly present: readonly string[];
}

function parseEntry(text: string): JournalEntry | null {
  if (!text || text.charCodeAt(0) === 0) return null;
  try {
    const v = JSON.parse(text) as unknown;
    if (!isObject(v) || typeof v.kind !== "string" || typeof v.id !== "string" || !isHlc(v.hlc)) return null;
    return v as JournalEntry;
  } catch {
    return null;
  }
}

/** Splits BUF (read at OFFSET) into whole lines; the bytes after the last newline are left. */
export function splitLines(buf: Buffer, offset: number): { lines: SegmentLine[]; used: number } {
  const lines: SegmentLine[] = [];
  let pos = 0;
  for (;;) {
    const nl = buf.indexOf(0x0a, pos);
    if (nl < 0) break;
    lines.push({ start: offset + pos, end: offset + nl + 1, entry: parseEntry(buf.subarray(pos, nl).toString("utf8")) });
    pos = nl + 1;
  }
  return { lines, used: pos };
}

/** Reads what the change segments under JOURNALDIR have after CURSOR (bounded; see the header). */
export function readChunks(journalDir: string, cursor: FeedbackCursor, o: { segmentBytesMax?: number; roundBytesMax?: number } = {}): Chunks {
  const segMax = o.segmentBytesMax ?? SEGMENT_BYTES_MAX;
  let budget = o.roundBytesMax ?? ROUND_BYTES_MAX;
  const segs = segmentsOf(journalDir)
    .filter((f) => f.type === "changes")
    .sort((a, b) => a.epoch! - b.epoch! || a.n! - b.n! || (a.name < b.name ? -1 : 1));
  const chunks: SegmentChunk[] = [];
  for (const f of segs) {
    let from = cursor.segments[f.name] ?? 0;
    if (from > f.size) from = 0; // not the file the cursor knew: read it again (repeats are harmless)
    if (from === f.size || budget <= 0) continue;
    const len = Math.min(f.size - from, segMax, budget);
    const buf = Buffer.alloc(len);
    let got = 0;
    let fd: number;
    try {
      fd = openSync(f.path, "r");
    } catch {
      continue; // pruned meanwhile
    }
    try {
      while (got < len) {
        const n = readSync(fd, buf, got, len - got, from + got);
        if (n === 0) break;
        got += n;
      }
    } finally {
      closeSync(fd);
    }
    budget -= got;
    const { lines, used } = splitLines(buf.subarray(0, got), from);
    let end = from + used;
    // No newline in a full read: a line longer than any the writer makes; skip it.
    if (lines.length === 0 && got === segMax) end = from + got;
    chunks.push({ name: f.name, from, end, more: end < f.size, lines });
  }
  return { chunks, present: segs.map((s) => s.name) };
}

export interface RoundPick {
  /** The entries to handle, in this order. */
  readonly entries: readonly JournalEntry[];
  /** The cursor once they are handled. */
  readonly cursor: FeedbackCursor;
}

/**
 * The round's entries of KINDS (in HLC order, at most LIMIT) and the cursor after
 * them (pure). Lines of other kinds are passed over; a segment's offset stops at its
 * first entry of KINDS not taken. Segments not in PRESENT leave the cursor.
 */
export function chooseRound(cursor: FeedbackCursor, read: Chunks, kinds: ReadonlySet<string>, limit: number): RoundPick {
  type Cand = { entry: JournalEntry; chunk: number; start: number };
  const cands: Cand[] = [];
  read.chunks.forEach((c, i) => {
    for (const l of c.lines) if (l.entry && kinds.has(l.entry.kind)) cands.push({ entry: l.entry, chunk: i, start: l.start });
  });
  // A segment whose read was cut short may hold older entries further on: nothing after its last stamp read.
  let horizon: Hlc | null = null;
  for (const c of read.chunks) {
    if (!c.more) continue;
    const last = [...c.lines].reverse().find((l) => l.entry)?.entry?.hlc ?? null;
    if (last === null) {
      horizon = "0000000000000-00000-0";
      break;
    }
    if (horizon === null || compareHlc(last, horizon) < 0) horizon = last;
  }
  const order = cands
    .filter((c) => horizon === null || compareHlc(c.entry.hlc, horizon) <= 0)
    .sort((a, b) => compareHlc(a.entry.hlc, b.entry.hlc) || a.chunk - b.chunk || a.start - b.start);
  const taken = new Set(order.slice(0, Math.max(0, limit)));
  const segments: Record<string, number> = {};
  const present = new Set(read.present);
  for (const [name, off] of Object.entries(cursor.segments)) if (present.has(name)) segments[name] = off;
  read.chunks.forEach((c, i) => {
    const first = cands.find((x) => x.chunk === i && !taken.has(x));
    segments[c.name] = first ? first.start : c.end;
  });
  return { entries: [...taken].map((c) => c.entry), cursor: { v: 1, segments, ...(cursor.recent ? { recent: cursor.recent } : {}) } };
}

/** True when the two cursors name the same offsets. */
export function sameCursor(a: FeedbackCursor, b: FeedbackCursor): boolean {
  const ka = Object.keys(a.segments);
  return ka.length === Object.keys(b.segments).length && ka.every((k) => a.segments[k] === b.segments[k]) && JSON.stringify(a.recent ?? []) === JSON.stringify(b.recent ?? []);
}
