// One run of DSPAM's purge (MariadbSpamStore.purge) under a lock, so that two runs
// never overlap: the nightly job of the spam worker (a repeatable BullMQ job, see
// worker.ts) and an operator's `mailha spam purge` take the same MariaDB named lock
// (GET_LOCK, held by the connection: a run that dies releases it with its
// connection). A run that finds the lock taken does nothing and says so. It also
// deletes held spam past spam.quarantine_days (quarantine.ts), when given the volume. The lock
// needs no privilege, so the worker's own account (`mailha_spam`) and root share it.
import type { Connection } from "mysql2/promise";
import type { TrainingMode } from "./classify.ts";
import { MariadbSpamStore, type PurgeCounts } from "./store.ts";
import { dayOf } from "./training.ts";
import { expireHeld, type QuarantineTarget } from "./quarantine.ts";

export const PURGE_LOCK = "mailha.spam-purge";

export type PurgeOutcome =
  | { readonly ran: true; readonly day: string; readonly counts: PurgeCounts & { quarantineExpired?: number }; readonly deleted: number; readonly ms: number }
  | { readonly ran: false; readonly why: "another purge runs" };

/**
 * Runs the purge as of NOW's day over DB (a connection of its own), unless another holds
 * the lock; with QUARANTINE, held spam older than its days goes too (each deletion journaled).
 */
export async function purgeLocked(db: Connection, o: { now?: Date; defaultMode?: TrainingMode; quarantine?: { target: QuarantineTarget; days: number } } = {}): Promise<PurgeOutcome> {
  const [rows] = await db.query("SELECT GET_LOCK(?, 0) AS got", [PURGE_LOCK]);
  if (Number((rows as { got: number | null }[])[0]?.got) !== 1) return { ran: false, why: "another purge runs" };
  try {
    const t0 = Date.now();
    const day = dayOf(o.now ?? new Date());
    const counts: PurgeCounts & { quarantineExpired?: number } = await new MariadbSpamStore(db).purge(day, o.defaultMode ?? "toe");
    if (o.quarantine) counts.quarantineExpired = await expireHeld(o.quarantine.target, o.quarantine.days, o.now);
    const deleted = Object.values(counts).reduce((a, b) => a + b, 0);
    return { ran: true, day, counts, deleted, ms: Date.now() - t0 };
  } finally {
    await db.query("SELECT RELEASE_LOCK(?)", [PURGE_LOCK]).catch(() => undefined);
  }
}
