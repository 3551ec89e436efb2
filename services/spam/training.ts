// What the filter learns from a message, decided by one ordered, first-match table
// (as replication/gi.ts decides a connection): given the training mode, where the
// request comes from (classification at delivery, a user's retrain, corpus training,
// an undo), the verdict and the user's totals, the table names the state the message
// should leave in the counts. The deltas are that state minus what the message
// contributes now (its ledger entry), so a message is never learned twice: retraining
// it back and forth N times leaves exactly the counts of one net class, and an undo
// leaves the counts as if it had never come. Pure; the output is a JSON-serialisable
// SpamDelta whose token and stats deltas are sums (they commute: the split-brain merge
// adds them).
//
// DSPAM semantics kept (libdspam.c `dspam_process`, `_ds_operate`, `_ds_increment_tokens`):
// TEFT learns the verdict at classification; TOE learns nothing then (it counts
// `*_classified`) except during its warm-up, which is DSPAM's `innocent_learned <= 100
// || spam_learned <= 100` (train everything until both classes have more than 100
// learned); after it, TOE here also learns a verdict whose confidence is below 0.70
// (see below); TUM learns the verdict on tokens seen fewer than 50 times, or on all of
// them when the confidence is below 0.70; NOTRAIN learns nothing. A user's correction
// (DSPAM's source=error) learns the right class and counts `*_misclassified`; corpus
// training counts `*_corpusfed`. Deliberate differences: a correction undoes exactly
// what the classification learned (DSPAM subtracts 1 from every token, clamped at
// zero, and only outside TOE, so a TOE warm-up error was never unlearned); a
// correction back to the original verdict restores the classification's state
// (DSPAM would count another misclassification); NOTRAIN counts only
// `*_misclassified` on a correction (DSPAM also bumped `*_learned`, without tokens).
//
// TOE's unsure verdicts: DSPAM's TOE learns only errors, so after the warm-up a
// message the filter was nearly wrong about teaches nothing until it is wrong. Here a
// TOE classification whose confidence (Robinson's, X-DSPAM-Confidence) is below 0.70
// learns its verdict, as TUM does below the same 0.70, i.e. "train on error and on
// unsure", the well-known practice of thick-threshold training (bogofilter's and
// SpamBayes' advice: train what was wrong or unsure). If the unsure verdict was wrong,
// the user's correction undoes it exactly like any other (the ledger), so the
// counts end as the right class. On the SpamAssassin corpus (test/bench/spam.ts)
// it trains about a third of the messages instead of a sixth and takes 1-AUC from
// about 0.1% to 0.03% (random split).
import type { SpamClass, StatColumn, Totals, TrainingMode } from "./classify.ts";

export type TrainSource = "classification" | "error" | "corpus" | "undo";

/** What one message contributes to its user's counts. */
export interface Learned {
  /** The class its tokens were counted in, or null when none. */
  readonly cls: SpamClass | null;
  /** Tokens of the signature that were not counted (TUM's mature tokens). */
  readonly except: readonly string[];
  /** Its share of dspam_stats (non-zero columns only). */
  readonly stats: Readonly<Partial<Record<StatColumn, number>>>;
}

/** The (user, message) ledger: what a message taught, kept beside its signature. */
export interface LedgerEntry {
  readonly key: string;
  /** The classifier's verdict at delivery, null for corpus training. */
  readonly verdict: SpamClass | null;
  /** What the classification itself learned (restored by a retrain to the verdict). */
  readonly atClassification: Learned | null;
  /** What the message contributes now. */
  readonly applied: Learned;
}

export interface TokenDelta {
  readonly uid: number;
  /** Unsigned 64-bit hash, decimal. */
  readonly token: string;
  readonly spamDelta: number;
  readonly innocentDelta: number;
}

/** One message's change to the counts: what the change journal carries. */
export interface SpamDelta {
  readonly kind: "spam-delta";
  readonly v: 1;
  readonly uid: number;
  /** The ledger key (the signature id, or a content key for corpus training). */
  readonly key: string;
  /** The rule of the table that decided. */
  readonly rule: string;
  readonly source: TrainSource;
  /** The day it was learned (last_hit), YYYY-MM-DD. */
  readonly day: string;
  readonly tokens: readonly TokenDelta[];
  readonly stats: Readonly<Partial<Record<StatColumn, number>>>;
  /** The ledger entry before and after (null: none). The store refuses a delta whose `before` is stale. */
  readonly ledger: { readonly before: LedgerEntry | null; readonly after: LedgerEntry | null };
  /** A classification's signature: its tokens and their frequencies, to be stored. */
  readonly signature?: { readonly id: string; readonly tokens: readonly { readonly token: string; readonly frequency: number }[] };
}

export interface TrainInput {
  readonly uid: number;
  readonly key: string;
  readonly mode: TrainingMode;
  readonly source: TrainSource;
  /** For classification: the classifier's verdict. */
  readonly verdict?: SpamClass;
  /** For classification: the classifier's confidence (TUM uses it). */
  readonly confidence?: number;
  /** For error and corpus: the class the message is. */
  readonly asClass?: SpamClass;
  /** The message's tokens with their counts now (TUM looks at the counts). */
  readonly tokens: readonly { readonly token: string; readonly spam_hits?: number; readonly innocent_hits?: number }[];
  readonly totals: Pick<Totals, "spam_learned" | "innocent_learned">;
  /** The ledger entry of (uid, key), null if the message was never seen. */
  readonly prior: LedgerEntry | null;
  readonly day: string;
}

/** DSPAM's TOE warm-up: train everything while either class has 100 learned or fewer. */
export const TOE_WARMUP_LEARNED = 100;
/** TUM: a token seen this often or more is mature and not trained at classification. */
export const TUM_MATURE_HITS = 50;
/** TUM trains every token when the verdict's confidence is below this. */
export const TUM_CONFIDENCE_MIN = 0.7;
/** TOE after its warm-up learns a verdict whose confidence is below this (unsure; TUM's 0.70). */
export const TOE_UNSURE_CONFIDENCE = TUM_CONFIDENCE_MIN;

/** The rule of a TOE classification after the warm-up that learns nothing (only `*_classified`). */
export const TOE_COUNTS_ONLY_RULE = "toe classification after warm-up: counts the verdict only";

/** A classification TOE learns after its warm-up: confidence given and below TOE_UNSURE_CONFIDENCE. */
export const toeUnsure = (confidence: number | undefined): boolean => confidence !== undefined && confidence < TOE_UNSURE_CONFIDENCE;

const NOTHING: Learned = Object.freeze({ cls: null, except: [], stats: {} });
const other = (c: SpamClass): SpamClass => (c === "spam" ? "innocent" : "spam");
const col = (c: SpamClass, what: "learned" | "misclassified" | "corpusfed" | "classified"): StatColumn => `${c}_${what}` as StatColumn;

export const inWarmup = (t: Pick<Totals, "spam_learned" | "innocent_learned">): boolean => t.spam_learned <= TOE_WARMUP_LEARNED || t.innocent_learned <= TOE_WARMUP_LEARNED;

interface Ctx extends TrainInput {
  /** The class a request is about: the verdict for a classification, asClass otherwise. */
  readonly cls: SpamClass;
}

/** What the message should contribute: the new ledger entry (null: forget it). */
type Outcome = { readonly entry: LedgerEntry | null };

interface Rule {
  readonly name: string;
  readonly when: (c: Ctx) => boolean;
  readonly then: (c: Ctx) => Outcome;
}

const learnAll = (cls: SpamClass, stats: Partial<Record<StatColumn, number>>): Learned => ({ cls, except: [], stats });
const classified = (c: Ctx, learned: Learned): Outcome => ({ entry: { key: c.key, verdict: c.cls, atClassification: learned, applied: learned } });
const corrected = (c: Ctx, learned: Learned): Outcome => ({
  entry: { key: c.key, verdict: c.prior?.verdict ?? null, atClassification: c.prior?.atClassification ?? null, applied: learned },
});
/** The `*_classified` count a classification made (kept through corrections). */
const classifiedStats = (c: Ctx): Partial<Record<StatColumn, number>> => {
  const s = c.prior?.atClassification?.stats ?? {};
  const out: Partial<Record<StatColumn, number>> = {};
  for (const k of ["spam_classified", "innocent_classified"] as const) if (s[k]) out[k] = s[k];
  return out;
};

/** The decision table: the first rule whose `when` holds decides. */
export const TRAINING_RULES: readonly Rule[] = [
  { name: "undo: forget everything the message taught", when: (c) => c.source === "undo", then: () => ({ entry: null }) },
  { name: "classification seen before: nothing new", when: (c) => c.source === "classification" && c.prior !== null, then: (c) => ({ entry: c.prior }) },
  { name: "notrain classification: nothing learned", when: (c) => c.source === "classification" && c.mode === "notrain", then: (c) => classified(c, NOTHING) },
  {
    name: "notrain correction: counts the error only",
    when: (c) => c.source === "error" && c.mode === "notrain",
    then: (c) => corrected(c, (c.prior?.verdict ?? other(c.cls)) === c.cls ? NOTHING : { cls: null, except: [], stats: { [col(c.cls, "misclassified")]: 1 } }),
  },
  { name: "notrain corpus: nothing learned", when: (c) => c.source === "corpus" && c.mode === "notrain", then: (c) => corrected(c, c.prior?.applied ?? NOTHING) },
  {
    name: "toe classification after warm-up, unsure (confidence below 0.70): learns the verdict",
    when: (c) => c.source === "classification" && c.mode === "toe" && !inWarmup(c.totals) && toeUnsure(c.confidence),
    then: (c) => classified(c, learnAll(c.cls, { [col(c.cls, "learned")]: 1 })),
  },
  {
    name: TOE_COUNTS_ONLY_RULE,
    when: (c) => c.source === "classification" && c.mode === "toe" && !inWarmup(c.totals),
    then: (c) => classified(c, { cls: null, except: [], stats: { [col(c.cls, "classified")]: 1 } }),
  },
  {
    name: "toe classification in warm-up: trains everything (as teft)",
    when: (c) => c.source === "classification" && c.mode === "toe",
    then: (c) => classified(c, learnAll(c.cls, { [col(c.cls, "learned")]: 1 })),
  },
  { name: "teft classification: learns the verdict", when: (c) => c.source === "classification" && c.mode === "teft", then: (c) => classified(c, learnAll(c.cls, { [col(c.cls, "learned")]: 1 })) },
  {
    name: "tum classification, low confidence: learns the verdict on every token",
    when: (c) => c.source === "classification" && c.mode === "tum" && (c.confidence ?? 0) < TUM_CONFIDENCE_MIN,
    then: (c) => classified(c, learnAll(c.cls, { [col(c.cls, "learned")]: 1 })),
  },
  {
    name: "tum classification: learns the verdict on immature tokens",
    when: (c) => c.source === "classification" && c.mode === "tum",
    then: (c) =>
      classified(c, {
        cls: c.cls,
        except: c.tokens.filter((t) => (t.spam_hits ?? 0) + (t.innocent_hits ?? 0) >= TUM_MATURE_HITS).map((t) => t.token),
        stats: { [col(c.cls, "learned")]: 1 },
      }),
  },
  {
    name: "retrain to the verdict: back to what the classification learned",
    when: (c) => c.source === "error" && c.prior !== null && c.prior.verdict === c.cls && c.prior.atClassification !== null,
    then: (c) => corrected(c, c.prior!.atClassification!),
  },
  {
    name: "already learned as this class: nothing new",
    when: (c) => c.source !== "classification" && c.prior !== null && c.prior.applied.cls === c.cls && c.prior.applied.except.length === 0,
    then: (c) => ({ entry: c.prior }),
  },
  {
    name: "correction: learns the right class, counts the error",
    when: (c) => c.source === "error",
    then: (c) => corrected(c, learnAll(c.cls, { ...classifiedStats(c), [col(c.cls, "learned")]: 1, [col(c.cls, "misclassified")]: 1 })),
  },
  {
    name: "corpus: learns the class, counts it corpus-fed",
    when: (c) => c.source === "corpus",
    then: (c) => corrected(c, learnAll(c.cls, { ...classifiedStats(c), [col(c.cls, "learned")]: 1, [col(c.cls, "corpusfed")]: 1 })),
  },
];

/** Per token, what LEARNED counts for it: [spam, innocent]. */
function contribution(l: Learned | null | undefined, except: ReadonlySet<string> | null, token: string): [number, number] {
  if (!l || l.cls === null || (except && except.has(token))) return [0, 0];
  return l.cls === "spam" ? [1, 0] : [0, 1];
}

/**
 * The deltas that take a message's contribution from BEFORE to AFTER over its TOKENS
 * (pure; also what the split-brain merge uses to re-base a victim's change on the
 * survivor's ledger).
 */
export function retarget(uid: number, before: Learned | null, after: Learned | null, tokens: readonly string[]): { tokens: TokenDelta[]; stats: Partial<Record<StatColumn, number>> } {
  const out: TokenDelta[] = [];
  const bx = before && before.except.length ? new Set(before.except) : null;
  const ax = after && after.except.length ? new Set(after.except) : null;
  const seen = new Set<string>();
  for (const token of tokens) {
    if (seen.has(token)) continue;
    seen.add(token);
    const [bs, bi] = contribution(before, bx, token);
    const [as, ai] = contribution(after, ax, token);
    if (as !== bs || ai !== bi) out.push({ uid, token, spamDelta: as - bs, innocentDelta: ai - bi });
  }
  const stats: Partial<Record<StatColumn, number>> = {};
  const keys = new Set<StatColumn>([...(Object.keys(before?.stats ?? {}) as StatColumn[]), ...(Object.keys(after?.stats ?? {}) as StatColumn[])]);
  for (const k of [...keys].sort()) {
    const d = (after?.stats[k] ?? 0) - (before?.stats[k] ?? 0);
    if (d !== 0) stats[k] = d;
  }
  return { tokens: out, stats };
}

/** Decides what INPUT learns: the matching rule and the delta (empty when nothing changes). */
export function decideTraining(input: TrainInput): SpamDelta {
  const cls = input.source === "classification" ? input.verdict : input.asClass;
  if (input.source !== "undo" && !cls) throw new Error(`training from ${input.source} needs ${input.source === "classification" ? "a verdict" : "a class"}`);
  const ctx: Ctx = { ...input, cls: cls ?? "innocent" };
  const rule = TRAINING_RULES.find((r) => r.when(ctx));
  if (!rule) throw new Error(`no training rule matches (mode ${input.mode}, source ${input.source})`);
  const { entry } = rule.then(ctx);
  const tokens = input.tokens.map((t) => t.token);
  const d = retarget(input.uid, input.prior?.applied ?? null, entry?.applied ?? null, tokens);
  return {
    kind: "spam-delta",
    v: 1,
    uid: input.uid,
    key: input.key,
    rule: rule.name,
    source: input.source,
    day: input.day,
    tokens: d.tokens,
    stats: d.stats,
    ledger: { before: input.prior, after: entry },
  };
}

/** True when DELTA changes nothing (no counts, no ledger change, no signature). */
export function isEmptyDelta(d: SpamDelta): boolean {
  return d.tokens.length === 0 && Object.keys(d.stats).length === 0 && !d.signature && JSON.stringify(d.ledger.before) === JSON.stringify(d.ledger.after);
}

/** The day of DATE as YYYY-MM-DD (UTC), DSPAM's last_hit / created_on granularity. */
export const dayOf = (date: Date): string => date.toISOString().slice(0, 10);
