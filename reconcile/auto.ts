// When the survivor merges a healed split brain by itself (`reconcile.auto`): a pure
// decision over what the node daemon sees (its own state, the volume, the peer's
// preserved copies, the runs so far), as one ordered, first-match table. The node
// daemon runs `mailha reconcile` as a child process when the verdict says start.
//
// A run starts only on the active node, with the volume in sync (the victim's resync is
// over: the survivor's data is the one both disks hold), the peer answering, one run at
// a time; a copy is tried at most attemptsMax times, retryMs apart; after that the node
// waits for the operator and `mailha status` says what to run. A copy is taken in the
// order the victim made them (oldest first).

export interface AutoTry {
  readonly attempts: number;
  readonly lastMs: number;
  readonly error?: string;
}

export interface AutoInput {
  readonly now: number;
  readonly enabled: boolean;
  readonly active: boolean;
  /** Connected, both disks UpToDate. */
  readonly volumeInSync: boolean;
  /** The peer's copies not reconciled yet, oldest first; null: the peer did not answer. */
  readonly peerCopies: readonly string[] | null;
  /** A reconcile child runs now. */
  readonly running: boolean;
  readonly tries: Readonly<Record<string, AutoTry>>;
  readonly attemptsMax: number;
  readonly retryMs: number;
}

export type AutoVerdict =
  | { readonly t: "none"; readonly why: AutoWhy }
  | { readonly t: "start"; readonly copy: string; readonly attempt: number }
  | { readonly t: "operator"; readonly copy: string; readonly says: string };

export type AutoWhy = "disabled" | "running" | "not-active" | "volume-not-in-sync" | "peer-unknown" | "nothing-to-do" | "retry-later";

type Rule = { readonly name: string; readonly when: (i: AutoInput) => boolean; readonly then: (i: AutoInput) => AutoVerdict };

const first = (i: AutoInput) => i.peerCopies![0]!;
const triesOf = (i: AutoInput) => i.tries[first(i)] ?? { attempts: 0, lastMs: 0 };

/** Ordered, first match wins. */
export const AUTO_RULES: readonly Rule[] = [
  { name: "a run is going on", when: (i) => i.running, then: () => ({ t: "none", why: "running" }) },
  { name: "only the active node merges", when: (i) => !i.active, then: () => ({ t: "none", why: "not-active" }) },
  { name: "the peer's copies are not known", when: (i) => i.peerCopies === null, then: () => ({ t: "none", why: "peer-unknown" }) },
  { name: "no copy waits", when: (i) => i.peerCopies!.length === 0, then: () => ({ t: "none", why: "nothing-to-do" }) },
  {
    name: "switched off: the operator runs it",
    when: (i) => !i.enabled,
    then: (i) => ({ t: "operator", copy: first(i), says: "reconcile.auto is off: look with `mailha reconcile --dry-run`, then run `mailha reconcile`" }),
  },
  { name: "the victim's resync is not over", when: (i) => !i.volumeInSync, then: () => ({ t: "none", why: "volume-not-in-sync" }) },
  {
    name: "tried often enough",
    when: (i) => triesOf(i).attempts >= i.attemptsMax,
    then: (i) => ({ t: "operator", copy: first(i), says: `the automatic reconcile failed ${triesOf(i).attempts} times (last: ${triesOf(i).error ?? "unknown"}): look with \`mailha reconcile --dry-run\`, then run \`mailha reconcile\`` }),
  },
  { name: "wait between tries", when: (i) => triesOf(i).attempts > 0 && i.now - triesOf(i).lastMs < i.retryMs, then: () => ({ t: "none", why: "retry-later" }) },
  { name: "merge the oldest copy", when: () => true, then: (i) => ({ t: "start", copy: first(i), attempt: triesOf(i).attempts + 1 }) },
];

export function decideAuto(i: AutoInput): AutoVerdict {
  if (!(i.attemptsMax >= 1 && i.retryMs >= 0)) throw new Error("decideAuto: attemptsMax >= 1 and retryMs >= 0");
  for (const r of AUTO_RULES) if (r.when(i)) return r.then(i);
  throw new Error("decideAuto: no rule matched"); // the last rule always matches
}

/**
 * Whether the active node may prune the change journal now. Segments are removed only
 * while both disks hold the same journal (in sync) and nothing waits to be merged
 * (no copy on either side, no run): a merge needs both sides' entries since the split,
 * and a side pruned alone would count the other's old entries as new. What goes is
 * older than the retention (`reconcile.journal_keep_ms`).
 */
export function mayPruneJournal(i: { readonly active: boolean; readonly volumeInSync: boolean; readonly peerCopies: readonly string[] | null; readonly localCopies: number; readonly running: boolean }): { readonly ok: boolean; readonly why: string } {
  if (!i.active) return { ok: false, why: "not active" };
  if (!i.volumeInSync) return { ok: false, why: "the volume is not in sync" };
  if (i.running) return { ok: false, why: "a reconcile runs" };
  if (i.peerCopies === null) return { ok: false, why: "the peer's copies are not known" };
  if (i.peerCopies.length > 0 || i.localCopies > 0) return { ok: false, why: "a split-brain copy is not reconciled yet" };
  return { ok: true, why: "in sync, nothing to merge" };
}
