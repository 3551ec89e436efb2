// The spam filter's learning after a split brain: the victim's `spam-delta` journal
// entries (services/spam/journal.ts) merged into the survivor's tokens and statistics.
//
// Rule (per user and message, the ledger key): a message only the victim trained gets
// the victim's final state for it; a message both sides trained ends in the state of
// the side whose last training of it is later (hybrid logical clock), so it is learned
// once, never twice. The step does not replay the victim's deltas one by one: it takes
// the survivor's ledger entry as it is now and adds what turns it into the victim's
// final one (`retarget`), so every count ends as base + the survivor's changes + the
// victim's changes exactly, and running it again adds nothing (the ledger then equals
// the victim's final entry). The user is matched by address (uids may differ).
// `plan` is pure (a KindHandler of rules.ts); `applySpamStep` runs in the worker.
import { compareHlc } from "../common/hlc.ts";
import type { SpamStore } from "../services/spam/store.ts";
import { retarget, type LedgerEntry, type SpamDelta } from "../services/spam/training.ts";
import type { Json, KindContext, KindHandler, KindStep, OtherEvent } from "./model.ts";

export const SPAM_KIND = "spam-delta";

/** What one step carries: the victim's final ledger entry for (user, key), and every token its deltas named. */
export interface SpamStep {
  readonly user: string;
  readonly key: string;
  readonly final: LedgerEntry | null;
  readonly tokens: readonly string[];
  readonly day: string;
  readonly signature?: SpamDelta["signature"];
}

const groupKey = (user: string, key: string) => `${user}\0${key}`;

function parts(e: OtherEvent): { user: string; delta: SpamDelta } | null {
  const x = (e.payload ?? {}) as unknown as { user?: unknown; delta?: unknown };
  if (typeof x.user !== "string" || !x.delta || typeof x.delta !== "object") return null;
  const d = x.delta as SpamDelta;
  return typeof d.key === "string" && Array.isArray(d.tokens) && d.ledger && typeof d.ledger === "object" ? { user: x.user.toLowerCase(), delta: d } : null;
}

export const spamHandler: KindHandler = {
  plan(ctx: KindContext): readonly KindStep[] {
    const lastSurvivor = new Map<string, string>();
    for (const e of ctx.survivor) {
      const p = parts(e);
      if (!p) continue;
      const k = groupKey(p.user, p.delta.key);
      const prev = lastSurvivor.get(k);
      if (!prev || compareHlc(e.hlc, prev) > 0) lastSurvivor.set(k, e.hlc);
    }
    const groups = new Map<string, { user: string; key: string; events: OtherEvent[]; last: OtherEvent; lastDelta: SpamDelta; tokens: Set<string> }>();
    for (const e of ctx.victim) {
      const p = parts(e);
      if (!p) continue;
      const k = groupKey(p.user, p.delta.key);
      let g = groups.get(k);
      if (!g) groups.set(k, (g = { user: p.user, key: p.delta.key, events: [], last: e, lastDelta: p.delta, tokens: new Set() }));
      g.events.push(e);
      for (const t of p.delta.tokens) g.tokens.add(t.token);
      if (compareHlc(e.hlc, g.last.hlc) >= 0) {
        g.last = e;
        g.lastDelta = p.delta;
      }
    }
    const steps: KindStep[] = [];
    for (const [k, g] of [...groups].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
      const s = lastSurvivor.get(k);
      // The survivor trained this message later: its state stands (learned once).
      if (s && compareHlc(s, g.last.hlc) > 0) continue;
      const step: SpamStep = { user: g.user, key: g.key, final: g.lastDelta.ledger.after, tokens: [...g.tokens].sort(), day: g.lastDelta.day, ...(g.lastDelta.signature ? { signature: g.lastDelta.signature } : {}) };
      steps.push({ sources: g.events.map((e) => e.id), payload: step as unknown as Json });
    }
    return steps;
  },
};

/** Brings the survivor's entry for the step's (user, key) to the victim's final one. */
export async function applySpamStep(store: SpamStore, step: SpamStep, beforeApply?: (d: SpamDelta) => Promise<void>): Promise<{ changed: boolean }> {
  const uid = await store.uidFor(step.user);
  const cur = await store.ledger(uid, step.key);
  const r = retarget(uid, cur?.applied ?? null, step.final?.applied ?? null, step.tokens);
  if (r.tokens.length === 0 && Object.keys(r.stats).length === 0 && JSON.stringify(cur) === JSON.stringify(step.final)) return { changed: false };
  const delta: SpamDelta = {
    kind: "spam-delta",
    v: 1,
    uid,
    key: step.key,
    rule: "reconcile/victim-final-state",
    source: "corpus",
    day: step.day,
    tokens: r.tokens,
    stats: r.stats,
    ledger: { before: cur, after: step.final },
    ...(step.signature ? { signature: step.signature } : {}),
  };
  await beforeApply?.(delta);
  await store.apply([delta]);
  return { changed: true };
}
