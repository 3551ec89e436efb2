// The spam filter's changes in the change journal: every token and stats change is a
// `spam-delta` entry {user, delta}, written before the delta is applied, so that after
// a split brain the reconciler (reconcile/spam.ts) can bring the victim's learning into
// the survivor (token deltas are sums: they commute). The user is named by address, not
// by DSPAM's numeric uid: two sides apart may give one uid to different new users.
// Bounds: a delta names at most TOKENS_MAX tokens (the tokenizer's own bound is lower);
// one whose line would be over the journal's line limit is written as several lines of
// LINE_TOKENS_MAX tokens each, every one with the same key and ledger (the merge takes
// the union of a key's tokens and its last ledger entry, so the parts are one delta to
// it), the stats on the first only. A delta is journaled without its signature's token
// list: the survivor of a split brain retrains a merged message from the message itself.
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

/** Tokens per journal line: a token delta is at most ~75 bytes of JSON, a line at most LINE_MAX_BYTES (256 KiB). */
export const LINE_TOKENS_MAX = 3000;

/** DELTA as journal payloads: without the signature, its tokens in parts of at most LINE_TOKENS_MAX. */
export function journalParts(user: string, delta: SpamDelta): Record<string, unknown>[] {
  const { signature: _s, ...rest } = delta;
  if (rest.tokens.length <= LINE_TOKENS_MAX) return [{ user, delta: rest as unknown as Record<string, unknown> }];
  const out: Record<string, unknown>[] = [];
  for (let i = 0; i < rest.tokens.length; i += LINE_TOKENS_MAX) out.push({ user, delta: { ...rest, tokens: rest.tokens.slice(i, i + LINE_TOKENS_MAX), stats: i === 0 ? rest.stats : {}, part: out.length } as unknown as Record<string, unknown> });
  return out;
}

/** Appends USER's DELTAS (durable when this resolves). */
export async function journalSpamDeltas(j: ChangeJournal, user: string, deltas: readonly SpamDelta[]): Promise<void> {
  await journalSpamDeltasOf(j, deltas.map((d) => ({ user, delta: d })));
}

/** Appends several users' deltas in one commit (a delivery to several users). */
export async function journalSpamDeltasOf(j: ChangeJournal, list: readonly { user: string; delta: SpamDelta }[]): Promise<void> {
  const payloads = list.flatMap((x) => journalParts(x.user, x.delta));
  if (payloads.length === 0) return;
  await j.appendMany(payloads.map((payload) => ({ kind: "spam-delta", payload })));
}
