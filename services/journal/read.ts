// Reading the journal: every journal file under `<data>/journal` (all nodes' change
// segments and SMTP's delivery files) merged into one stream in HLC order, with bounded
// memory: a k-way merge that holds one buffered line per open file, and opens a file
// only when the merge reaches the stamp of its first line (so the many small segments
// of short-lived writers are never open all at once).
//
// Tolerated: a torn tail (a crash in the middle of an append: a partial line, or the
// zeros ext4 can leave past the last commit) ends that file quietly; a malformed line
// followed by good ones is skipped and reported. Delivery lines written before SMTP
// stamped them lack `hlc`: theirs is derived from `ts` (counter = position among lines
// of the same millisecond). Lines of one file whose stamps go backwards (a clock step
// under an unstamped writer) keep their file order.
// Bounds: a line over LINE_SCAN_MAX_BYTES is malformed; at most OPEN_FILES_MAX files
// overlap in time (more: the read fails and says so).
import { closeSync, existsSync, openSync, readdirSync, readSync, statSync } from "node:fs";
import { open } from "node:fs/promises";
import { join } from "node:path";
import { StringDecoder } from "node:string_decoder";
import { compareHlc, formatHlc, isHlc, parseHlc, type Hlc } from "../../common/hlc.ts";
import type { JournalEntry } from "./changes.ts";

export const LINE_SCAN_MAX_BYTES = 1024 * 1024;
export const OPEN_FILES_MAX = 256;
const CHUNK_BYTES = 64 * 1024;
const TAIL_BYTES = 64 * 1024;

export interface JournalFile {
  readonly path: string;
  readonly name: string;
  readonly type: "changes" | "deliveries";
  readonly node: string;
  /** Change segments only: the writer's epoch and the segment number. */
  readonly epoch?: number;
  readonly n?: number;
  readonly size: number;
  readonly mtimeMs: number;
}

const SEGMENT_RE = /^changes-([a-z0-9][a-z0-9_-]{0,31})-(\d+)-(\d+)\.jsonl$/;
const DELIVERIES_RE = /^deliveries-([a-z0-9][a-z0-9_-]{0,31})\.jsonl$/;

/** The journal files in DIR (`<data>/journal`), in no particular order. */
export function segmentsOf(dir: string): JournalFile[] {
  if (!existsSync(dir)) return [];
  const out: JournalFile[] = [];
  for (const name of readdirSync(dir)) {
    const s = SEGMENT_RE.exec(name);
    const d = s ? null : DELIVERIES_RE.exec(name);
    if (!s && !d) continue;
    const path = join(dir, name);
    let st;
    try {
      st = statSync(path);
    } catch {
      continue; // pruned meanwhile
    }
    if (s) out.push({ path, name, type: "changes", node: s[1]!, epoch: Number(s[2]), n: Number(s[3]), size: st.size, mtimeMs: st.mtimeMs });
    else out.push({ path, name, type: "deliveries", node: d![1]!, size: st.size, mtimeMs: st.mtimeMs });
  }
  return out;
}

/** Parses one line into an entry (deliveries get their derived fields); null when it is not one. */
function parseLine(line: string): JournalEntry | null {
  if (!line || line.charCodeAt(0) === 0) return null;
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    return null;
  }
  if (!v || typeof v !== "object" || Array.isArray(v)) return null;
  const e = v as Record<string, unknown>;
  if (typeof e.kind !== "string" || typeof e.node !== "string" || typeof e.id !== "string") return null;
  if (e.seq === undefined) {
    const seq = Number(String(e.id).split(":")[2]);
    if (Number.isInteger(seq)) e.seq = seq;
  }
  return e as JournalEntry;
}

/** A stamp from an ISO time (delivery lines without `hlc`). */
function hlcFromTs(ts: unknown, node: string, counter: number): Hlc | null {
  const ms = typeof ts === "string" ? Date.parse(ts) : NaN;
  if (!Number.isFinite(ms) || ms < 0) return null;
  try {
    return formatHlc({ wallMs: ms, counter: Math.min(counter, 99_999), node });
  } catch {
    return null;
  }
}

/** The last (and first) whole entry of a file, read from its ends only. */
export function readTail(path: string): { first: JournalEntry | null; last: JournalEntry | null } {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch {
    return { first: null, last: null };
  }
  try {
    const size = statSync(path).size;
    if (size === 0) return { first: null, last: null };
    const readAt = (pos: number, len: number) => {
      const buf = Buffer.alloc(len);
      const n = readSync(fd, buf, 0, len, pos);
      return buf.subarray(0, n).toString("utf8");
    };
    const withStamp = (e: JournalEntry | null) => {
      if (e && !isHlc(e.hlc)) {
        const h = hlcFromTs(e.ts, e.node, 0);
        if (!h) return null;
        (e as Record<string, unknown>).hlc = h;
      }
      return e;
    };
    const headText = readAt(0, Math.min(size, TAIL_BYTES));
    let first: JournalEntry | null = null;
    for (const l of headText.split("\n").slice(0, -1)) if ((first = withStamp(parseLine(l)))) break;
    const start = Math.max(0, size - TAIL_BYTES);
    const lines = readAt(start, size - start).split("\n");
    let last: JournalEntry | null = null;
    for (let i = lines.length - 1; i >= (start === 0 ? 0 : 1) && !last; i--) last = withStamp(parseLine(lines[i]!));
    return { first, last };
  } finally {
    closeSync(fd);
  }
}

export interface ReadOptions {
  /** Only entries stamped after this. */
  readonly since?: Hlc;
  readonly kinds?: readonly string[];
  readonly nodes?: readonly string[];
  /** A malformed line, a torn tail: reported, never thrown. */
  readonly onProblem?: (p: { file: string; line: number; problem: "malformed" | "torn" }) => void;
}

/** One file's entries in order, each with the key the merge sorts by. */
class Cursor {
  private buf = "";
  private pos = 0;
  private lineNo = 0;
  private eof = false;
  private skipping = false;
  private readonly chunk = Buffer.alloc(CHUNK_BYTES);
  private readonly decoder = new StringDecoder("utf8");
  private held: number[] = [];
  private prevKey: Hlc | null = null;
  private prevWall = -1;
  private sameWall = 0;
  current: { entry: JournalEntry; key: Hlc } | null = null;

  private constructor(
    readonly file: JournalFile,
    readonly order: number,
    private readonly fh: Awaited<ReturnType<typeof open>>,
    private readonly onProblem: ReadOptions["onProblem"],
  ) {}

  static async open(file: JournalFile, order: number, onProblem: ReadOptions["onProblem"]): Promise<Cursor> {
    return new Cursor(file, order, await open(file.path, "r"), onProblem);
  }

  private async line(): Promise<string | null> {
    for (;;) {
      const nl = this.buf.indexOf("\n");
      if (nl >= 0 || this.eof) {
        const l = nl >= 0 ? this.buf.slice(0, nl) : this.buf;
        this.buf = nl >= 0 ? this.buf.slice(nl + 1) : "";
        if (this.skipping) {
          this.skipping = false;
          return "\0"; // the end of an overlong line: malformed
        }
        if (nl < 0 && !l.length) return null;
        return l;
      }
      if (this.buf.length > LINE_SCAN_MAX_BYTES) {
        this.buf = "";
        this.skipping = true;
      }
      const { bytesRead } = await this.fh.read(this.chunk, 0, CHUNK_BYTES, this.pos);
      if (bytesRead === 0) {
        this.eof = true;
        this.buf += this.decoder.end();
      } else {
        this.pos += bytesRead;
        this.buf += this.decoder.write(this.chunk.subarray(0, bytesRead));
      }
    }
  }

  /** Moves to the next entry; false at the end of the file. */
  async advance(): Promise<boolean> {
    for (;;) {
      const l = await this.line();
      if (l === null) {
        for (const n of this.held) this.onProblem?.({ file: this.file.name, line: n, problem: "torn" });
        this.held = [];
        this.current = null;
        await this.fh.close();
        return false;
      }
      this.lineNo++;
      const e = parseLine(l);
      if (!e) {
        // Only NULs or blanks are not even worth a report unless something follows.
        this.held.push(this.lineNo);
        continue;
      }
      for (const n of this.held) this.onProblem?.({ file: this.file.name, line: n, problem: "malformed" });
      this.held = [];
      if (!isHlc(e.hlc)) {
        const ms = typeof e.ts === "string" ? Date.parse(e.ts) : NaN;
        if (ms === this.prevWall) this.sameWall++;
        else this.sameWall = 0;
        this.prevWall = ms;
        const h = hlcFromTs(e.ts, e.node, this.sameWall);
        if (!h) {
          this.onProblem?.({ file: this.file.name, line: this.lineNo, problem: "malformed" });
          continue;
        }
        (e as Record<string, unknown>).hlc = h;
      }
      const key = this.prevKey && compareHlc(e.hlc, this.prevKey) < 0 ? this.prevKey : e.hlc;
      this.prevKey = key;
      this.current = { entry: e, key };
      return true;
    }
  }

  async close(): Promise<void> {
    await this.fh.close().catch(() => {});
  }
}

function before(a: Cursor, b: Cursor): boolean {
  const c = compareHlc(a.current!.key, b.current!.key);
  return c < 0 || (c === 0 && a.order < b.order);
}

/** A binary min-heap of cursors by their current key. */
class Heap {
  readonly items: Cursor[] = [];
  push(c: Cursor): void {
    const h = this.items;
    h.push(c);
    for (let i = h.length - 1; i > 0; ) {
      const p = (i - 1) >> 1;
      if (!before(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }
  pop(): Cursor | undefined {
    const h = this.items;
    const top = h[0];
    const last = h.pop();
    if (h.length && last) {
      h[0] = last;
      for (let i = 0; ; ) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && before(h[l]!, h[m]!)) m = l;
        if (r < h.length && before(h[r]!, h[m]!)) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m]!, h[i]!];
        i = m;
      }
    }
    return top;
  }
  peek(): Cursor | undefined {
    return this.items[0];
  }
}

/**
 * Every entry of the journal under DATADIR in HLC order (ties: the file's name, then
 * its line order). Streams: memory holds one chunk per open file.
 */
export async function* readJournal(dataDir: string, o: ReadOptions = {}): AsyncGenerator<JournalEntry> {
  const dir = join(dataDir, "journal");
  const files: { file: JournalFile; head: Hlc }[] = [];
  for (const f of segmentsOf(dir)) {
    if (f.size === 0) continue;
    const t = readTail(f.path);
    // A change segment entirely at or before `since` is not opened at all.
    if (o.since && f.type === "changes" && t.last && isHlc(t.last.hlc) && compareHlc(t.last.hlc, o.since) <= 0) continue;
    files.push({ file: f, head: t.first && isHlc(t.first.hlc) ? t.first.hlc : "0000000000000-00000-0" });
  }
  files.sort((a, b) => compareHlc(a.head, b.head) || (a.file.name < b.file.name ? -1 : 1));
  const heap = new Heap();
  let next = 0;
  const kinds = o.kinds?.length ? new Set(o.kinds) : null;
  const nodes = o.nodes?.length ? new Set(o.nodes) : null;
  try {
    for (;;) {
      // Open every file whose first stamp is not after the smallest pending one.
      while (next < files.length && (!heap.peek() || compareHlc(files[next]!.head, heap.peek()!.current!.key) <= 0)) {
        if (heap.items.length >= OPEN_FILES_MAX) throw new Error(`journal: more than ${OPEN_FILES_MAX} journal files overlap in time; read fewer at once (--since)`);
        const c = await Cursor.open(files[next]!.file, next, o.onProblem);
        next++;
        if (await c.advance()) heap.push(c);
      }
      const c = heap.pop();
      if (!c) return;
      const e = c.current!.entry;
      if (await c.advance()) heap.push(c);
      if (o.since && compareHlc(e.hlc, o.since) <= 0) continue;
      if (kinds && !kinds.has(e.kind)) continue;
      if (nodes && !nodes.has(e.node)) continue;
      yield e;
    }
  } finally {
    for (const c of heap.items) await c.close();
  }
}

/** The wall-clock milliseconds of a stamp (for people and for the derived stamps). */
export function hlcWallMs(h: Hlc): number {
  return parseHlc(h).wallMs;
}
