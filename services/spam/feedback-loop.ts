// Retraining from users' IMAP moves: one bounded round reads the change journal's new
// `move`/`copy` entries (feedback-cursor.ts), and its `expunge`/`append` pairs that are
// moves Dovecot made by writing the message anew (feedback.ts `rewrittenMove`), asks
// the table (feedback.ts) what each teaches, finds the message in the user's Maildir
// by its key (the new one), and retrains it
// (`retrainAndApply`, source "error": by its X-DSPAM-Signature, else by its content),
// journaling each delta (`spam-delta`) before it is applied; then the cursor moves on,
// durably. Guarantees: an entry is handled once the cursor is written past it, so a
// restart or a failover repeats at most the last round (harmless: the ledger learns a
// message once per class) and loses nothing; a failure of the database or the journal
// ends the round before the entry it failed on (the next round tries it again).
// Known gaps: a message gone from the Maildir before its entry is handled (moved to
// Junk and deleted within a round) cannot be read and teaches nothing (counted as
// `missing`); while a reconcile run holds its lock the loop waits, and afterwards the
// moves of the users it touched, stamped inside its run (and RECONCILE_SLACK_MS
// after), are taken as the reconciler's and skipped, a user's own move among them too.
// Bounds: ENTRIES_MAX entries a round, a message read up to MESSAGE_BYTES_MAX (the
// tokenizer reads less), FOLDERS_MAX folders and DIR_ENTRIES_MAX names a folder looked
// through per message, REPORTS_MAX reconcile reports read.
import { closeSync, existsSync, openSync, opendirSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import { parseHlc } from "../../common/hlc.ts";
import type { JournalEntry } from "../journal/changes.ts";
import { folderName, folderPath, listFolders } from "../journal/maildir.ts";
import { chooseRound, readChunks, readCursor, sameCursor, writeCursor, type FeedbackCursor } from "./feedback-cursor.ts";
import { decideFeedback, nextRecent, rewrittenMove, withinReconcile, type FeedbackAction, type ReconcileWindow, type SeenExpunge } from "./feedback.ts";
import { readPreferences, retrainAndApply } from "./filter.ts";
import type { SpamStore } from "./store.ts";
import type { SpamDelta } from "./training.ts";

export const ENTRIES_MAX = 100;
export const MESSAGE_BYTES_MAX = 64 * 1024 * 1024;
const FOLDERS_MAX = 2000;
const DIR_ENTRIES_MAX = 1_000_000;
const REPORTS_MAX = 64;
const REPORT_BYTES_MAX = 64 * 1024 * 1024;
/** Moves and copies; expunges and appends for the moves Dovecot made by writing the message anew. */
const KINDS: ReadonlySet<string> = new Set(["move", "copy", "expunge", "append"]);

export interface FeedbackLoopOptions {
  /** The volume (its journal/, mail/, reconcile/). */
  readonly dataDir: string;
  readonly mailRoot: string;
  /** This node's run directory (a reconcile run's lock). */
  readonly runDir: string;
  readonly cursorFile: string;
  readonly store: SpamStore;
  /** Journals USER's deltas durably (resolves once they are on disk). */
  readonly journal: (user: string, deltas: readonly SpamDelta[]) => Promise<void>;
  readonly log: Logger;
  readonly entriesMax?: number;
  readonly segmentBytesMax?: number;
  readonly roundBytesMax?: number;
}

export interface FeedbackCounts {
  rounds: number;
  entries: number;
  spam: number;
  innocent: number;
  /** Retrains that changed nothing (the message had that class already). */
  unchanged: number;
  none: number;
  reconciler: number;
  missing: number;
  errors: number;
  /** Wall-clock ms of the last entry handled, 0 before any. */
  last_entry_ms: number;
  /** Ms between a handled entry's stamp and its handling (the last one). */
  lag_ms: number;
}

export type RoundResult =
  | { readonly t: "idle" }
  | { readonly t: "paused"; readonly why: string }
  | { readonly t: "done"; readonly handled: number; readonly more: boolean }
  | { readonly t: "failed"; readonly handled: number; readonly error: string };

/** A user's Maildir (null for an address that could not be a folder name). */
export function userMaildir(mailRoot: string, user: string): string | null {
  const at = user.lastIndexOf("@");
  if (at <= 0 || at === user.length - 1) return null;
  const local = user.slice(0, at);
  const domain = user.slice(at + 1);
  const ok = (s: string) => s !== "." && s !== ".." && !s.includes("/") && !s.includes("\0");
  return ok(local) && ok(domain) ? join(mailRoot, domain, local, "Maildir") : null;
}

/** The file of KEY in FOLDERDIR's cur/ or new/ (`<key>` or `<key>:2,<flags>`), looked through bounded. */
function fileOfKey(folderDir: string, key: string): string | null {
  for (const sub of ["cur", "new"]) {
    const dir = join(folderDir, sub);
    let d;
    try {
      d = opendirSync(dir);
    } catch {
      continue;
    }
    try {
      for (let i = 0; i < DIR_ENTRIES_MAX; i++) {
        const e = d.readSync();
        if (!e) break;
        if (e.name === key || e.name.startsWith(`${key}:`)) return join(dir, e.name);
      }
    } finally {
      d.closeSync();
    }
  }
  return null;
}

/**
 * Where the message of a move/copy entry is now: NEWKEY in the folder it went to,
 * else KEY in the folder it came from, else either key in any folder (it moved on).
 */
export function findMessage(mailRoot: string, e: { user: string; fromName: string; toName: string; key: string; newKey: string }): string | null {
  const maildir = userMaildir(mailRoot, e.user);
  if (!maildir || !existsSync(maildir)) return null;
  const folders = listFolders(maildir).slice(0, FOLDERS_MAX);
  const byName = new Map(folders.map((d) => [folderName(d), d] as const));
  const tries: [string | undefined, string][] = [
    [byName.get(e.toName), e.newKey],
    [byName.get(e.fromName), e.key],
  ];
  for (const [dir, key] of tries) {
    if (dir === undefined) continue;
    const f = fileOfKey(folderPath(maildir, dir), key);
    if (f) return f;
  }
  for (const dir of folders) {
    for (const key of new Set([e.newKey, e.key])) {
      const f = fileOfKey(folderPath(maildir, dir), key);
      if (f) return f;
    }
  }
  return null;
}

/** The message in FILE, at most MAXBYTES of it (null when it went away). */
export function readMessage(file: string, maxBytes = MESSAGE_BYTES_MAX): Buffer | null {
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch {
    return null;
  }
  try {
    const len = Math.min(statSync(file).size, maxBytes);
    const buf = Buffer.alloc(len);
    let got = 0;
    while (got < len) {
      const n = readSync(fd, buf, got, len - got, got);
      if (n === 0) break;
      got += n;
    }
    return buf.subarray(0, got);
  } finally {
    closeSync(fd);
  }
}

/** True while a reconcile run holds its lock in RUNDIR (reconcile/run.ts: `reconcile.lock` with a live pid). */
export function reconcileRunning(runDir: string): boolean {
  const f = join(runDir, "reconcile.lock");
  if (!existsSync(f)) return false;
  const pid = Number(readFileSync(f, "utf8").trim());
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** `report-2026-12-02T03-39-49-123Z.json` -> its start in ms. */
function reportStartMs(name: string): number {
  const m = /^report-(\d{4}-\d{2}-\d{2}T\d{2})-(\d{2})-(\d{2})-(\d{3})Z\.json$/.exec(name);
  return m ? Date.parse(`${m[1]}:${m[2]}:${m[3]}.${m[4]}Z`) : NaN;
}

/** The reconcile runs the reports in DATADIR/reconcile tell of (the newest REPORTS_MAX), cached by file name. */
export function reconcileWindows(dataDir: string, cache: Map<string, ReconcileWindow | null>): ReconcileWindow[] {
  const dir = join(dataDir, "reconcile");
  let names: string[];
  try {
    names = readdirSync(dir).filter((n) => Number.isFinite(reportStartMs(n)));
  } catch {
    return [];
  }
  const out: ReconcileWindow[] = [];
  for (const n of names.sort().slice(-REPORTS_MAX)) {
    if (!cache.has(n)) {
      let w: ReconcileWindow | null = null;
      try {
        const f = join(dir, n);
        if (statSync(f).size <= REPORT_BYTES_MAX) {
          const r = JSON.parse(readFileSync(f, "utf8")) as { seconds?: unknown; plan?: { report?: { mailboxes?: Record<string, unknown> } } };
          const startMs = reportStartMs(n);
          const seconds = typeof r.seconds === "number" && Number.isFinite(r.seconds) ? r.seconds : 0;
          w = { startMs, endMs: startMs + Math.ceil(seconds * 1000), users: Object.keys(r.plan?.report?.mailboxes ?? {}) };
        }
      } catch {
        w = null; // being written, or not a report: asked again next time
      }
      if (w === null) continue;
      cache.set(n, w);
    }
    const w = cache.get(n);
    if (w) out.push(w);
  }
  return out;
}

const str = (v: unknown): string => (typeof v === "string" ? v : "");

export class FeedbackLoop {
  readonly counts: FeedbackCounts = { rounds: 0, entries: 0, spam: 0, innocent: 0, unchanged: 0, none: 0, reconciler: 0, missing: 0, errors: 0, last_entry_ms: 0, lag_ms: 0 };
  private cursor: FeedbackCursor | null = null;
  private readonly reports = new Map<string, ReconcileWindow | null>();

  constructor(private readonly o: FeedbackLoopOptions) {}

  /** The cursor as the loop has it (read from its file on the first round). */
  get position(): FeedbackCursor | null {
    return this.cursor;
  }

  /** One bounded round (see the module header). */
  async round(now: () => number = Date.now): Promise<RoundResult> {
    if (reconcileRunning(this.o.runDir)) return { t: "paused", why: "a reconcile run is applying its changes" };
    this.cursor ??= readCursor(this.o.cursorFile, (e) => this.o.log.warn({ file: e.file, problem: e.problem }, "spam feedback: the cursor is damaged; reading the journal again from its start (nothing is learned twice)"));
    const cursor = this.cursor;
    const read = readChunks(join(this.o.dataDir, "journal"), cursor, { segmentBytesMax: this.o.segmentBytesMax, roundBytesMax: this.o.roundBytesMax });
    const present = new Set(read.present);
    if (read.chunks.length === 0 && Object.keys(cursor.segments).every((n) => present.has(n))) return { t: "idle" };
    const limit = this.o.entriesMax ?? ENTRIES_MAX;
    const pick = chooseRound(cursor, read, KINDS, limit);
    this.counts.rounds++;
    const windows = pick.entries.length ? reconcileWindows(this.o.dataDir, this.reports) : [];
    let handled = 0;
    let error: string | null = null;
    let recent: SeenExpunge[] = [...(cursor.recent ?? [])];
    for (const e of pick.entries) {
      try {
        const paired = await this.handle(e, recent, windows, now);
        handled++;
        const seen = e.kind === "expunge" ? { node: e.node, user: str(e.user).toLowerCase(), name: str(e.name), key: str(e.key), wallMs: parseHlc(e.hlc).wallMs } : null;
        recent = nextRecent(recent, seen, paired);
      } catch (err) {
        error = (err as Error).message;
        this.counts.errors++;
        this.o.log.error({ err, entry: e.id, user: e.user }, "spam feedback: the round stops before this entry (tried again next round)");
        break;
      }
    }
    const next = { ...(error === null ? pick.cursor : chooseRound(cursor, read, KINDS, handled).cursor), recent };
    if (!sameCursor(next, cursor)) {
      writeCursor(this.o.cursorFile, next);
      this.cursor = next;
    }
    if (error !== null) return { t: "failed", handled, error };
    return { t: "done", handled, more: read.chunks.some((c) => c.more) || pick.entries.length >= limit };
  }

  /** Handles one entry; returns the expunge it was paired with (an append that was a rewritten move). */
  private async handle(entry: JournalEntry, recent: readonly SeenExpunge[], windows: readonly ReconcileWindow[], now: () => number): Promise<SeenExpunge | null> {
    if (entry.kind === "expunge") return null; // only an append after it may say something (rewrittenMove)
    const user = str(entry.user).toLowerCase();
    const wallMs = parseHlc(entry.hlc).wallMs;
    // An append shortly after an expunge of the same message (size) is Dovecot's move by rewriting.
    const rewritten = rewrittenMove(recent, { kind: entry.kind, node: entry.node, user: entry.user, name: entry.name, size: entry.size, wallMs });
    if (entry.kind === "append" && !rewritten) return null;
    const paired = rewritten?.expunge ?? null;
    const e: JournalEntry = rewritten ? { ...entry, kind: "move", fromName: rewritten.fromName, toName: rewritten.toName, newKey: entry.key } : entry;
    const d = decideFeedback({ kind: e.kind, fromName: e.fromName, toName: e.toName, byReconciler: withinReconcile(user, wallMs, windows) });
    this.counts.entries++;
    this.counts.last_entry_ms = wallMs;
    this.counts.lag_ms = Math.max(0, now() - wallMs);
    if (d.action === "none") {
      if (d.rule.startsWith("the reconciler")) this.counts.reconciler++;
      else this.counts.none++;
      return paired;
    }
    const file = findMessage(this.o.mailRoot, { user: str(e.user), fromName: str(e.fromName), toName: str(e.toName), key: str(e.key), newKey: str(e.newKey) || str(e.key) });
    const msg = file ? readMessage(file) : null;
    if (!msg) {
      this.counts.missing++;
      this.o.log.warn({ entry: e.id, user, key: e.newKey, folder: e.toName, action: d.action }, "spam feedback: the message is no longer in the Maildir; nothing learned from this move");
      return paired;
    }
    const deltas = await this.learn(user, msg, d.action);
    if (deltas.length === 0) this.counts.unchanged++;
    else this.counts[d.action]++;
    this.o.log.info({ entry: e.id, stamp: e.hlc, lag_ms: this.counts.lag_ms, user, from: e.fromName, to: e.toName, key: e.newKey, ...(rewritten ? { via: "expunge+append" } : {}), as: d.action, rule: d.rule, deltas: deltas.map((x) => x.rule), bytes: msg.length }, "spam feedback: retrained");
    return paired;
  }

  private async learn(user: string, msg: Buffer, cls: Exclude<FeedbackAction, "none">): Promise<SpamDelta[]> {
    const store = this.o.store;
    const uid = await store.uidFor(user);
    const prefs = await readPreferences(store, uid);
    // The journal first: what is applied is always journaled (the split-brain merge adds it up).
    return retrainAndApply(store, uid, msg, cls, "error", prefs, 3, (d) => this.o.journal(user, d));
  }
}
