// What a user's IMAP move teaches the spam filter, decided by one ordered, first-match
// table (as replication/gi.ts decides a connection): a change journal entry in, one of
// nothing / train as spam / train as innocent out, with the rule that decided. Into
// Junk (moved or copied) is spam; out of Junk into any folder but Trash is innocent
// (a copy out of Junk too: clients without IMAP MOVE move by COPY, STORE \Deleted and
// EXPUNGE, which the watcher journals as a `copy` and an `expunge` when they fall in
// two of its rounds); Junk to Trash says nothing (the user throws spam away); every
// other kind (a delivery filed into Junk, an APPEND, a flag) says nothing. A change
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
