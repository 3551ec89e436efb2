// The spam filter's interface to the rest of mailha: classify a message at delivery
// (the X-DSPAM-* headers and the deltas to journal and apply), retrain one from a
// user's move (by its signature id or the message itself), apply deltas, read a
// user's preferences. Nothing here writes until `applyDeltas`: the caller journals the
// deltas first (the split-brain merge adds them up), then applies them. A message the
// tokenizer could not read within its bounds is classified on what was read, or
// passed through as Innocent with the reason in `X-DSPAM-Reason`: the filter never
// refuses or loses mail.
import { createHash, randomBytes } from "node:crypto";
import { classifyTokens, type Algorithm, type SpamClass, type StatColumn, type TokenStat, type TrainingMode, type UsedToken } from "./classify.ts";
import { DEFAULT_LIMITS, tokenize, type MessageInput, type TokenizeLimits, type TokenizeReason, type Tokenized } from "./tokenize.ts";
import { dayOf, decideTraining, isEmptyDelta, TOE_COUNTS_ONLY_RULE, type Learned, type LedgerEntry, type SpamDelta, type TrainSource } from "./training.ts";
import { LedgerConflict, type ApplyOptions, type SpamStore } from "./store.ts";

export type SpamAction = "junk" | "tag" | "quarantine";

export interface SpamPrefs {
  /** What delivery does with spam: file it in Junk (default), only tag it, or quarantine it. */
  readonly spam_action: SpamAction;
  readonly training_mode: TrainingMode;
  readonly algorithms: readonly Algorithm[];
}

export const DEFAULT_PREFS: SpamPrefs = { spam_action: "junk", training_mode: "toe", algorithms: ["graham", "burton"] };

const MODES: readonly TrainingMode[] = ["teft", "toe", "tum", "notrain"];
const ACTIONS: Record<string, SpamAction> = { junk: "junk", tag: "tag", deliver: "tag", quarantine: "quarantine" };

/**
 * Preferences from dspam_preferences rows (the user's over uid 0's). Both DSPAM's names
 * (`trainingMode`, `spamAction`; its `deliver` is our `tag`) and mailha's
 * (`training_mode`, `spam_action`) are read; unknown values fall back to the defaults.
 */
export function parsePreferences(rows: Record<string, string>): SpamPrefs {
  const get = (...names: string[]): string | undefined => names.map((n) => rows[n]).find((v) => v !== undefined)?.trim().toLowerCase();
  const mode = get("training_mode", "trainingMode");
  const action = get("spam_action", "spamAction");
  const alg = get("algorithms", "algorithm")
    ?.split(/[\s,]+/)
    .filter((a): a is Algorithm => a === "graham" || a === "burton" || a === "chi-square");
  return {
    training_mode: MODES.includes(mode as TrainingMode) ? (mode as TrainingMode) : DEFAULT_PREFS.training_mode,
    spam_action: (action && ACTIONS[action]) || DEFAULT_PREFS.spam_action,
    algorithms: alg && alg.length ? alg : DEFAULT_PREFS.algorithms,
  };
}

export async function readPreferences(store: SpamStore, uid: number): Promise<SpamPrefs> {
  return parsePreferences(await store.preferences(uid));
}

export interface Classification {
  readonly result: SpamClass;
  readonly probability: number;
  readonly confidence: number;
  /** Ranking score (log-odds); the benchmark's AUC uses it. */
  readonly score: number;
  readonly signatureId: string | null;
  /** The X-DSPAM-* fields to add to the message (and X-DSPAM-Reason when the tokenizer stopped early). */
  readonly headers: Record<string, string>;
  /** To journal, then `applyDeltas`. Empty when nothing is learned (NOTRAIN, pass-through). */
  readonly deltas: SpamDelta[];
  /** The most significant tokens (the factors). */
  readonly tokens: readonly UsedToken[];
  readonly reasons: readonly TokenizeReason[];
  /** True when the message was passed through unclassified (nothing readable). */
  readonly passedThrough: boolean;
  /** With `countsApart`: the `*_classified` count this classification made and did not put in `deltas`. */
  readonly counted?: Readonly<Partial<Record<StatColumn, number>>>;
}

export interface ClassifyOptions {
  readonly limits?: TokenizeLimits;
  readonly now?: Date;
  /**
   * A classification that learns nothing but its `*_classified` count (TOE after the
   * warm-up, sure) gets no signature row and no ledger row: its id says so (an
   * unrecorded signature, `unrecordedSignatureId`) and the count is returned in
   * `counted` for the caller to add up (SMTP counts many messages in one delta).
   */
  readonly countsApart?: boolean;
  /** The message's tokens, when the caller has them already (a delivery to several users tokenizes once). */
  readonly tokenized?: Tokenized;
}

/** This process's part of the ids it makes (random), and a counter: unique without a random draw per message. */
const ID_BASE = randomBytes(3).toString("hex");
let idSeq = 0;
const idTail = (now: Date) => `${Math.floor(now.getTime() / 1000).toString(16)}${ID_BASE}${((idSeq = (idSeq + 1) % 0x1000000)).toString(16).padStart(6, "0")}`;

/** A DSPAM-style signature id (at most 32 characters): uid, time, this process, a counter. */
export function newSignatureId(uid: number, now: Date): string {
  return `${uid},${idTail(now)}`.slice(0, 32);
}

/**
 * The id of a classification that was recorded nowhere (`countsApart`): uid, a dot, the
 * verdict (s or i), time, random. A retrain of such a message finds no signature and no
 * ledger row and knows from the id what the classification was and that it learned nothing.
 */
export function unrecordedSignatureId(uid: number, now: Date, verdict: SpamClass): string {
  return `${uid}.${verdict === "spam" ? "s" : "i"}${idTail(now)}`.slice(0, 32);
}

const UNRECORDED_RE = /^\d+\.([si])[0-9a-f]+$/;

/** The ledger entry an unrecorded signature KEY stands for (its verdict, nothing learned), or null for any other key. */
export function unrecordedEntry(key: string): LedgerEntry | null {
  const m = UNRECORDED_RE.exec(key);
  if (!m) return null;
  const nothing: Learned = { cls: null, except: [], stats: {} };
  return { key, verdict: m[1] === "s" ? "spam" : "innocent", atClassification: nothing, applied: nothing };
}

const fmt = (x: number): string => (Number.isFinite(x) ? x : 0.5).toFixed(4);

async function statsOf(store: SpamStore, uid: number, t: Tokenized): Promise<TokenStat[]> {
  const hashes = [...t.tokens.keys()];
  const counts = await store.tokenCounts(uid, hashes);
  return hashes.map((h) => {
    const tk = t.tokens.get(h)!;
    const c = counts.get(h);
    return { token: h, name: tk.name, frequency: tk.frequency, spam_hits: c?.spam_hits ?? 0, innocent_hits: c?.innocent_hits ?? 0 };
  });
}

/** Classifies MESSAGE for UID: the verdict, its headers and what to learn (not yet applied). */
export async function classifyMessage(store: SpamStore, uid: number, message: MessageInput, prefs: SpamPrefs = DEFAULT_PREFS, opts: ClassifyOptions = {}): Promise<Classification> {
  const now = opts.now ?? new Date();
  const tokenized = opts.tokenized ?? (await tokenize(message, opts.limits ?? DEFAULT_LIMITS));
  const headers: Record<string, string> = {};
  if (tokenized.reasons.length) headers["X-DSPAM-Reason"] = tokenized.reasons.join(", ");
  if (tokenized.tokens.size === 0) {
    headers["X-DSPAM-Result"] = "Innocent";
    headers["X-DSPAM-Processed"] = now.toUTCString();
    headers["X-DSPAM-Reason"] = [...tokenized.reasons, "no-tokens"].join(", ");
    return { result: "innocent", probability: 0, confidence: 0, score: 0, signatureId: null, headers, deltas: [], tokens: [], reasons: tokenized.reasons, passedThrough: true };
  }
  const [stats, totals] = await Promise.all([statsOf(store, uid, tokenized), store.learned(uid)]);
  const v = classifyTokens(stats, totals, { algorithms: prefs.algorithms, trainingMode: prefs.training_mode });
  const deltas: SpamDelta[] = [];
  let signatureId: string | null = null;
  let counted: Partial<Record<StatColumn, number>> | undefined;
  if (prefs.training_mode !== "notrain") {
    signatureId = newSignatureId(uid, now);
    const d = decideTraining({ uid, key: signatureId, mode: prefs.training_mode, source: "classification", verdict: v.result, confidence: v.confidence, tokens: stats, totals, prior: null, day: dayOf(now) });
    if (opts.countsApart && d.rule === TOE_COUNTS_ONLY_RULE && d.tokens.length === 0) {
      signatureId = unrecordedSignatureId(uid, now, v.result);
      counted = d.stats;
    } else deltas.push({ ...d, signature: { id: signatureId, tokens: stats.map((s) => ({ token: s.token, frequency: s.frequency })) } });
  }
  headers["X-DSPAM-Result"] = v.result === "spam" ? "Spam" : "Innocent";
  headers["X-DSPAM-Processed"] = now.toUTCString();
  headers["X-DSPAM-Confidence"] = fmt(v.confidence);
  headers["X-DSPAM-Probability"] = fmt(v.probability);
  if (signatureId) headers["X-DSPAM-Signature"] = signatureId;
  return { result: v.result, probability: v.probability, confidence: v.confidence, score: v.score, signatureId, headers, deltas, tokens: v.tokens, reasons: tokenized.reasons, passedThrough: false, ...(counted ? { counted } : {}) };
}

/** The X-DSPAM-Signature of a message's header block (bounded look), if any. */
export function signatureOf(message: Buffer): string | null {
  const head = message.subarray(0, 256 * 1024).toString("latin1");
  const end = head.search(/\r?\n\r?\n/);
  const m = /^X-DSPAM-Signature:[ \t]*([0-9a-zA-Z,._-]{1,32})/im.exec(end < 0 ? head : head.slice(0, end));
  return m ? m[1]! : null;
}

/** The ledger key of a message without a signature (corpus training): its content hash. */
export function contentKey(message: Buffer): string {
  return `sha256:${createHash("sha256").update(message).digest("hex").slice(0, 56)}`;
}

export type RetrainSource = Exclude<TrainSource, "classification">;

/**
 * What retraining TARGET (a signature id, or the message itself) as AS_CLASS teaches:
 * SOURCE "error" for a user's correction (a move into or out of Junk), "corpus" for
 * corpus training, "undo" to forget it. Not applied; empty when nothing changes (the
 * same message learned as the same class again). A message is found by its
 * X-DSPAM-Signature, else by its content hash.
 */
export async function retrain(store: SpamStore, uid: number, target: string | Buffer, asClass: SpamClass, source: RetrainSource = "error", prefs?: SpamPrefs, opts: ClassifyOptions = {}): Promise<SpamDelta[]> {
  const now = opts.now ?? new Date();
  const p = prefs ?? (await readPreferences(store, uid));
  let key: string;
  let tokens: { token: string; spam_hits?: number; innocent_hits?: number }[];
  const sigId = typeof target === "string" ? target : signatureOf(target);
  const sig = sigId ? await store.signature(uid, sigId) : null;
  if (sig && sigId) {
    key = sigId;
    tokens = sig.tokens.map((t) => ({ token: t.token }));
  } else if (Buffer.isBuffer(target)) {
    key = sigId ?? contentKey(target);
    const t = await tokenize(target, opts.limits ?? DEFAULT_LIMITS);
    tokens = [...t.tokens.keys()].map((token) => ({ token }));
  } else {
    return []; // a signature that is gone (purged after 14 days) and no message: nothing to learn from
  }
  const [stored, totals] = await Promise.all([store.ledger(uid, key), store.learned(uid)]);
  // An unrecorded classification has no row: it stands for its verdict, nothing learned
  // (its count was added up apart). The delta is decided from that, and written as a
  // new row (what the store holds is no row).
  const implicit = stored === null ? unrecordedEntry(key) : null;
  const d = decideTraining({ uid, key, mode: p.training_mode, source, asClass, tokens, totals, prior: stored ?? implicit, day: dayOf(now) });
  if (isEmptyDelta(d)) return [];
  return [implicit ? { ...d, ledger: { before: null, after: d.ledger.after } } : d];
}

/** Applies DELTAS (one transaction per message). LedgerConflict: compute them again. */
export async function applyDeltas(store: SpamStore, deltas: readonly SpamDelta[], opts?: ApplyOptions): Promise<void> {
  await store.apply(deltas, opts);
}

/** Retrains and applies, computing again after a LedgerConflict (at most ATTEMPTS times). */
export async function retrainAndApply(store: SpamStore, uid: number, target: string | Buffer, asClass: SpamClass, source: RetrainSource = "error", prefs?: SpamPrefs, attempts = 3, beforeApply?: (d: SpamDelta[]) => Promise<void>): Promise<SpamDelta[]> {
  for (let i = 1; ; i++) {
    const d = await retrain(store, uid, target, asClass, source, prefs);
    // The change journal first (BEFOREAPPLY): what is applied is always journaled.
    if (beforeApply && d.length) await beforeApply(d);
    try {
      await applyDeltas(store, d);
      return d;
    } catch (e) {
      if (!(e instanceof LedgerConflict) || i >= attempts) throw e;
    }
  }
}
