// Releasing held spam, retrained as innocent (a false positive), by the operator
// (`mailha spam quarantine release`) or by the user themself: a message from their own
// account (authenticated submission) to `quarantine-release@<their domain>` whose
// Subject is `release KEY...` (the quarantine's notice has a mailto link for each held
// message). SMTP checks the keys are held for that user and puts a `release` job on the
// spam worker's queue; the worker releases them (this module) within seconds.
// Each message: retrained first (journaled, then applied; a release that fails after
// it is run again and the ledger makes the retraining change nothing), then released
// (journaled, then moved into the INBOX). Bounds: at most RELEASE_KEYS_MAX keys a request.
import { readFileSync } from "node:fs";
import type { ChangeJournal } from "../journal/changes.ts";
import { retrainAndApply } from "./filter.ts";
import { journalSpamDeltas } from "./journal.ts";
import { findHeld, NotHeld, releaseHeld, type QuarantineTarget } from "./quarantine.ts";
import type { MariadbSpamStore } from "./store.ts";

/** The local part users send their release requests to (in each local domain; only on submission, authenticated). */
export const RELEASE_LOCAL_PART = "quarantine-release";
export const RELEASE_KEYS_MAX = 100;
/** The spam worker's queue (its purge, notices and these requests; in the node's Redis). */
export const SPAM_WORKER_QUEUE = "spam-purge";
/** The spam worker's job that releases a user's request. */
export const RELEASE_JOB = "release";

/** The keys a request's SUBJECT names (`release KEY...`, any case; a reply's `Re:` allowed), or null when it is not one. */
export function releaseKeysOf(subject: string): string[] | null {
  const m = /^\s*(?:re:\s*)*release\s+(.+?)\s*$/i.exec(subject);
  if (!m) return null;
  const keys = [...new Set(m[1]!.split(/\s+/).filter((k) => /^[A-Za-z0-9._=,:+-]{1,200}$/.test(k)))];
  return keys.length ? keys : null;
}

export interface Released {
  readonly key: string;
  readonly file: string;
  readonly retrained: boolean;
}

/**
 * Releases USER's held KEYS into their INBOX through T (journaled), each retrained as
 * innocent through STORE first when TRAIN. Throws NotHeld (naming the key) at the first
 * key not held; what was released before it stays released. ONE reports each.
 */
export async function releaseAndRetrain(store: MariadbSpamStore, t: QuarantineTarget & { journal: ChangeJournal }, user: string, keys: readonly string[], train: boolean, one?: (r: Released, n: number) => void): Promise<Released[]> {
  const uid = train ? await store.uidFor(user) : 0;
  const released: Released[] = [];
  for (const key of keys) {
    const h = findHeld(t.mailRoot, user, key);
    if (!h) throw new NotHeld(`${user} has no message ${key} in quarantine (see mailha spam quarantine list --user ${user})`);
    const retrained = train ? (await retrainAndApply(store, uid, readFileSync(h.file), "innocent", "error", undefined, 3, (d) => journalSpamDeltas(t.journal, user, d))).length > 0 : false;
    const done = await releaseHeld(t, user, key);
    released.push({ key, file: done.file, retrained });
    one?.(released.at(-1)!, released.length);
  }
  return released;
}
