// The spam filter's changes in the change journal: every token and stats change is a
// `spam-delta` entry {user, delta}, written before the delta is applied, so that after
// a split brain the reconciler (reconcile/spam.ts) can bring the victim's learning into
// the survivor (token deltas are sums: they commute). The user is named by address, not
// by DSPAM's numeric uid: two sides apart may give one uid to different new users.
// Bounds: a delta names at most TOKENS_MAX tokens (the tokenizer's own bound is lower).
import { z } from "zod";
import type { Connection } from "mysql2/promise";
import { ChangeJournal, registerKind } from "../journal/changes.ts";
import { journalTarget } from "../journal/accounts.ts";
import type { SpamDelta } from "./training.ts";

const TOKENS_MAX = 200_000;

export const spamDeltaKind = z.strictObject({
  user: z.string().min(1).max(320),
  delta: z.looseObject({
    kind: z.literal("spam-delta"),
    v: z.literal(1),
    uid: z.number().int().nonnegative(),
    key: z.string().min(1).max(512),
    tokens: z.array(z.looseObject({ token: z.string(), spamDelta: z.number().int(), innocentDelta: z.number().int() })).max(TOKENS_MAX),
    ledger: z.looseObject({}),
  }),
});

registerKind("spam-delta", spamDeltaKind);

/** A journal for DB's volume and node, or null when the node has no journal marker yet (nothing is journaled then). */
export async function spamJournalFor(db: Connection): Promise<ChangeJournal | null> {
  const t = await journalTarget(db);
  return t ? new ChangeJournal(t.dataDir, t.node) : null;
}

/** Appends USER's DELTAS (durable when this resolves). */
export async function journalSpamDeltas(j: ChangeJournal, user: string, deltas: readonly SpamDelta[]): Promise<void> {
  if (deltas.length === 0) return;
  await j.appendMany(deltas.map((d) => ({ kind: "spam-delta", payload: { user, delta: d as unknown as Record<string, unknown> } })));
}
