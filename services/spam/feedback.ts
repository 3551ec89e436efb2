// What a user's IMAP move teaches the spam filter, decided by one ordered, first-match
// table (as replication/gi.ts decides a connection): a change journal entry in, one of
// nothing / train as spam / train as innocent out, with the rule that decided. Into
// Junk (moved or copied) is spam; out of Junk into any folder but Trash is innocent
// (a copy out of Junk too: clients without IMAP MOVE move by COPY, STORE \Deleted and
// EXPUNGE, which the watcher journals as a `copy` and an `expunge` when they fall in
// two of its rounds); Junk to Trash says nothing (the user throws spam away); every
// other kind (a delivery filed into Junk, an APPEND, a flag) says nothing. Dovecot does
// not always move by a hard link: out of Junk it often writes the message anew under a
// new name, which the watcher journals as an `expunge` in the old folder and an
// `append` in the new one, in the same round; `rewrittenMove` (below, pure) pairs them
// back into the move they were (kept: the recent expunges, `nextRecent`), and the table decides on that move. A change
// the reconciler made itself on the survivor after a split brain is not the user's
// word: `withinReconcile` (below, pure) says when an entry falls inside a reconcile
// run for its user, and the table's first row then decides nothing.
// Pure: no I/O, no clock. The folder names are Dovecot's default special-use names
// as mailha creates them (`Junk`, `Trash`), compared exactly (IMAP names are
// case-sensitive, INBOX aside).

export const JUNK = "Junk";
export const TRASH = "Trash";

export type FeedbackAction = "none" | "spam" | "innocent";

/** The fields of a journal entry the decision looks at (a `move` or `copy`, or any other kind). */
export interface FeedbackInput {
  readonly kind: string;
  readonly fromName?: unknown;
  readonly toName?: unknown;
  /** True when the entry falls inside a reconcile run that touched this user (see withinReconcile). */
  readonly byReconciler?: boolean;
}

export interface FeedbackDecision {
  readonly action: FeedbackAction;
  readonly rule: string;
}

interface Ctx {
  readonly kind: string;
  readonly from: string | null;
  readonly to: string | null;
  readonly byReconciler: boolean;
}

interface Rule {
  readonly name: string;
  readonly when: (c: Ctx) => boolean;
  readonly then: FeedbackAction;
}

const moveOrCopy = (c: Ctx) => (c.kind === "move" || c.kind === "copy") && c.from !== null && c.to !== null;

/** The decision table: the first rule whose `when` holds decides. */
export const FEEDBACK_RULES: readonly Rule[] = [
  { name: "the reconciler's own change after a split brain: not the user's word", when: (c) => c.byReconciler, then: "none" },
  { name: "not a move or a copy: nothing to learn", when: (c) => !moveOrCopy(c), then: "none" },
  { name: "within Junk: nothing new", when: (c) => c.from === JUNK && c.to === JUNK, then: "none" },
  { name: "into Junk: spam", when: (c) => c.to === JUNK, then: "spam" },
  { name: "from Junk to Trash: thrown away, nothing learned", when: (c) => c.from === JUNK && c.to === TRASH, then: "none" },
  { name: "out of Junk: innocent", when: (c) => c.from === JUNK, then: "innocent" },
  { name: "between other folders: nothing to learn", when: () => true, then: "none" },
];

const str = (v: unknown): string | null => (typeof v === "string" && v.length > 0 ? v : null);

/** What ENTRY teaches: the first matching rule of FEEDBACK_RULES. */
export function decideFeedback(entry: FeedbackInput): FeedbackDecision {
  const c: Ctx = { kind: entry.kind, from: str(entry.fromName), to: str(entry.toName), byReconciler: entry.byReconciler === true };
  const rule = FEEDBACK_RULES.find((r) => r.when(c));
  // The last row matches everything: a missing rule is a broken table.
  if (!rule) throw new Error(`no feedback rule matches ${JSON.stringify(c)}`);
  return { action: rule.then, rule: rule.name };
}

/** One reconcile run as its report tells it: when it ran and whose mail it changed. */
export interface ReconcileWindow {
  readonly startMs: number;
  readonly endMs: number;
  /** The users with operations in the run (the report's `mailboxes`). */
  readonly users: readonly string[];
}

/**
 * The watcher stamps a change at its file's ctime, or just after its last stamp when
 * that is later (a change found a round late): a reconciler's move is stamped at most
 * this long after the run ended.
 */
export const RECONCILE_SLACK_MS = 30_000;

/** True when a change of USER stamped at WALLMS falls inside one of WINDOWS (with the slack after each). */
export function withinReconcile(user: string, wallMs: number, windows: readonly ReconcileWindow[]): boolean {
  return windows.some((w) => wallMs >= w.startMs && wallMs <= w.endMs + RECONCILE_SLACK_MS && w.users.includes(user));
}

/** An `expunge` the feedback loop read (what a following `append` may pair with). */
export interface SeenExpunge {
  readonly node: string;
  readonly user: string;
  readonly name: string;
  readonly key: string;
  readonly wallMs: number;
}

/** An `append` at most this long after an `expunge` of the same user may be its rewritten move. */
export const REWRITE_PAIR_MS = 2000;

/** The physical size Dovecot and mailha write into a Maildir name (`...,S=1641`), or null. */
export function sizeOfKey(key: string): number | null {
  const m = /,S=(\d{1,15})(?:,|:|$)/.exec(key);
  return m ? Number(m[1]) : null;
}

/** Expunges kept for pairing at most (the newest; older ones than REWRITE_PAIR_MS before the newest go first). */
export const RECENT_EXPUNGES_MAX = 32;

/**
 * The move that E (an `append`) and one of RECENT (the expunges read before it) are,
 * or null: the newest expunge of the same user and node, at most REWRITE_PAIR_MS
 * before E, of the same size (the size in the expunged name, when it has one, is the
 * appended message's). The watcher may journal the two in different rounds, with other
 * entries between them, hence a list and not only the entry before.
 */
export function rewrittenMove(recent: readonly SeenExpunge[], e: { readonly kind: string; readonly node: string; readonly user?: unknown; readonly name?: unknown; readonly size?: unknown; readonly wallMs: number }): { fromName: string; toName: string; expunge: SeenExpunge } | null {
  if (e.kind !== "append" || typeof e.name !== "string" || typeof e.user !== "string") return null;
  const user = e.user.toLowerCase();
  for (let i = recent.length - 1; i >= 0; i--) {
    const x = recent[i]!;
    if (x.node !== e.node || x.user !== user) continue;
    if (e.wallMs < x.wallMs || e.wallMs - x.wallMs > REWRITE_PAIR_MS) continue;
    const size = sizeOfKey(x.key);
    if (size !== null && size !== e.size) continue;
    return { fromName: x.name, toName: e.name, expunge: x };
  }
  return null;
}

/** RECENT after handling E (pure): an expunge joins, a paired one leaves, stale and surplus ones go. */
export function nextRecent(recent: readonly SeenExpunge[], seen: SeenExpunge | null, paired: SeenExpunge | null): SeenExpunge[] {
  let out = paired ? recent.filter((x) => x !== paired) : [...recent];
  if (seen) out.push(seen);
  const newest = Math.max(...out.map((x) => x.wallMs), 0);
  out = out.filter((x) => newest - x.wallMs <= REWRITE_PAIR_MS);
  return out.slice(-RECENT_EXPUNGES_MAX);
}
