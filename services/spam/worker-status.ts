// The spam worker's status file, `<run>/spam-worker.json`: written at every tick of
// the worker (temp file and rename; a cache, never fsynced), read by the `spam`
// resource's monitor (a worker that stopped writing is hung) and by `mailha spam
// status`. Kept apart from worker.ts so that its readers load nothing else.
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { FeedbackCounts, RoundResult } from "./feedback-loop.ts";
import type { PurgeOutcome } from "./purge.ts";

export interface PurgeStatus {
  readonly pattern: string;
  readonly scheduled: boolean;
  readonly error?: string;
  readonly last?: { readonly at: string; readonly job: string; readonly outcome: PurgeOutcome | { readonly ran: false; readonly why: "failed"; readonly error: string } };
}

/** The quarantine's notices (quarantine-digest.ts): their schedule and the last run. */
export interface DigestStatus {
  readonly pattern: string;
  readonly scheduled: boolean;
  readonly error?: string;
  readonly last?: { readonly at: string; readonly job: string; readonly notices: number; readonly listed: number };
}

export interface SpamWorkerStatus {
  readonly at: string;
  readonly pid: number;
  readonly feedback: { readonly enabled: boolean; readonly last: RoundResult["t"] | "not-run"; readonly error?: string; readonly counts: FeedbackCounts };
  readonly purge: PurgeStatus;
  /** Absent in a status written before the notices existed. */
  readonly digest?: DigestStatus;
}

export function spamWorkerStatusFile(runDir: string): string {
  return join(runDir, "spam-worker.json");
}

/** The worker's last status (null: none yet, or torn). */
export function readSpamWorkerStatus(file: string): SpamWorkerStatus | null {
  try {
    return JSON.parse(readFileSync(file, "utf8")) as SpamWorkerStatus;
  } catch {
    return null;
  }
}

export function writeSpamWorkerStatus(file: string, s: SpamWorkerStatus): void {
  try {
    writeFileSync(`${file}.tmp`, JSON.stringify(s) + "\n");
    renameSync(`${file}.tmp`, file);
  } catch {
    // the run directory went away (the node stops): the monitor no longer asks
  }
}
