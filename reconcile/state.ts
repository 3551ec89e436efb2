// Where a reconcile run records how far it got (reconcile-state.json in the node's run
// folder), and how `mailha status` and `failback` read it: a small module of its own so
// that reading it does not load the merge machinery (BullMQ, IMAP, MariaDB).
import { readFileSync } from "node:fs";
import { join } from "node:path";

export function reconcileStateFile(runDir: string): string {
  return join(runDir, "reconcile-state.json");
}

export interface ReconcileState {
  readonly status: "planning" | "running" | "done" | "incomplete";
  readonly copy: string;
  readonly total: number;
  readonly applied: number;
  readonly at: string;
  readonly pid: number;
}

/** What `mailha status` and `failback` look at: a run in progress, or one that left work. */
export function readReconcileState(runDir: string): ReconcileState | null {
  try {
    return JSON.parse(readFileSync(reconcileStateFile(runDir), "utf8")) as ReconcileState;
  } catch {
    return null;
  }
}
