// The spam filter's maths and training table: the combiners on hand-computed cases,
// DSPAM's per-token probability, TOE's warm-up, exact undo through the signature, and
// seeded random sequences of classify / retrain / undo per mode checking the ledger
// invariant (the counts are always those of one net class per message); the
// significance tie-break, DSPAM's whitelist, TOE's unsure verdicts.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chi2Q, classifyTokens, combineBayes, combineChiSquare, isWhitelisted, tokenProbability, ZERO_TOTALS, type SpamClass, type TrainingMode } from "../../services/spam/classify.ts";
import { decideTraining, inWarmup, retarget, toeUnsure, TRAINING_RULES, type LedgerEntry } from "../../services/spam/training.ts";
import { MemorySpamStore } from "../../services/spam/store.ts";
import { applyDeltas, classifyMessage, DEFAULT_PREFS, parsePreferences, retrain } from "../../services/spam/filter.ts";
import { rng } from "../sim/volume-sim.ts";

const close = (a: number, b: number, eps = 1e-9) => assert.ok(Math.abs(a - b) < eps, `${a} != ${b}`);

test("Graham/Burton combination and chi-square by hand", () => {
  // 0.9 * 0.8 / (0.9 * 0.8 + 0.1 * 0.2) = 0.72 / 0.74
  close(combineBayes([0.9, 0.8]).p, 0.72 / 0.74);
  close(combineBayes([0.5]).p, 0.5);
  close(combineBayes([0.99, 0.01]).p, 0.5);
  // chi2Q(x, 2) = exp(-x/2); chi2Q(x, 4) = exp(-x/2) (1 + x/2)
  close(chi2Q(3, 2), Math.exp(-1.5));
  close(chi2Q(3, 4), Math.exp(-1.5) * 2.5);
  // One token at 0.99: S = 1 - chi2Q(-2 ln 0.01, 2) = 0.99, H = 1 - chi2Q(-2 ln 0.99, 2) = 0.01 -> (0.99 - 0.01 + 1) / 2
  close(combineChiSquare([0.99]), 0.99);
  close(combineChiSquare([0.6]), 0.401); // nothing beyond the exclusion radius: cutoff - 0.1
});

test("per-token probability as DSPAM's _ds_calc_stat (bias, minimum hits, clamps)", () => {
  const totals = { spam_learned: 100, innocent_learned: 100 };
  close(tokenProbability({ spam_hits: 1, innocent_hits: 1 }, totals), 0.4); // fewer than 5 hits (spam + 2 innocent)
  close(tokenProbability({ spam_hits: 10, innocent_hits: 5 }, totals), 0.1 / (0.1 + 0.1)); // innocent hits weigh double
  close(tokenProbability({ spam_hits: 10, innocent_hits: 0 }, totals), 0.99); // spam only: 0.99 unless the rule gives more (0.1 / 0.12 does not)
  close(tokenProbability({ spam_hits: 500, innocent_hits: 0 }, { spam_learned: 100, innocent_learned: 10_000 }), 0.9999); // 5 / (5 + 0.0002), clamped
  close(tokenProbability({ spam_hits: 0, innocent_hits: 10 }, totals), 0.01); // innocent only: 0.01 unless less (0.01 / 0.21 is not)
  close(tokenProbability({ spam_hits: 0, innocent_hits: 100 }, { spam_learned: 10_000, innocent_learned: 100 }), 0.0001); // 0.0001 / 2.0001, clamped
});

test("classification of hand-made token sets, deterministic in any order", () => {
  const totals = { spam_learned: 200, innocent_learned: 200 };
  const spammy = Array.from({ length: 30 }, (_, i) => ({ token: String(1000 + i), frequency: 1, spam_hits: 50, innocent_hits: 0 }));
  const hammy = Array.from({ length: 30 }, (_, i) => ({ token: String(2000 + i), frequency: 1, spam_hits: 0, innocent_hits: 50 }));
  const v = classifyTokens(spammy, totals);
  assert.equal(v.result, "spam");
  assert.equal(v.tokens.length, 27);
  const h = classifyTokens(hammy, totals);
  assert.equal(h.result, "innocent");
  const mixed = [...spammy.slice(0, 10), ...hammy];
  assert.deepEqual(classifyTokens(mixed, totals), classifyTokens([...mixed].reverse(), totals));
  const chi = classifyTokens(spammy, totals, { algorithms: ["chi-square"] });
  assert.equal(chi.result, "spam");
  assert.ok(chi.chiSquare! > 0.99);
});

const day = "2026-05-16";
const toks = (n: number, base = 0) => Array.from({ length: n }, (_, i) => ({ token: String(base + i), spam_hits: 0, innocent_hits: 0 }));

test("TOE: trains everything in its warm-up (100 or fewer of either class learned), then only counts", () => {
  assert.ok(inWarmup({ spam_learned: 100, innocent_learned: 500 }));
  assert.ok(!inWarmup({ spam_learned: 101, innocent_learned: 101 }));
  const warm = decideTraining({ uid: 1, key: "k", mode: "toe", source: "classification", verdict: "spam", tokens: toks(3), totals: { spam_learned: 100, innocent_learned: 300 }, prior: null, day });
  assert.equal(warm.tokens.length, 3);
  assert.deepEqual(warm.stats, { spam_learned: 1 });
  const after = decideTraining({ uid: 1, key: "k", mode: "toe", source: "classification", verdict: "spam", tokens: toks(3), totals: { spam_learned: 101, innocent_learned: 101 }, prior: null, day });
  assert.equal(after.tokens.length, 0);
  assert.deepEqual(after.stats, { spam_classified: 1 });
  const teft = decideTraining({ uid: 1, key: "k", mode: "teft", source: "classification", verdict: "innocent", tokens: toks(2), totals: { spam_learned: 500, innocent_learned: 500 }, prior: null, day });
  assert.deepEqual(teft.tokens.map((t) => [t.spamDelta, t.innocentDelta]), [[0, 1], [0, 1]]);
  const tum = decideTraining({ uid: 1, key: "k", mode: "tum", source: "classification", verdict: "spam", confidence: 0.9, tokens: [{ token: "1", spam_hits: 60, innocent_hits: 0 }, { token: "2", spam_hits: 1, innocent_hits: 0 }], totals: { spam_learned: 500, innocent_learned: 500 }, prior: null, day });
  assert.deepEqual(tum.tokens.map((t) => t.token), ["2"]);
  const notrain = decideTraining({ uid: 1, key: "k", mode: "notrain", source: "classification", verdict: "spam", tokens: toks(2), totals: ZERO_TOTALS, prior: null, day });
  assert.equal(notrain.tokens.length, 0);
  assert.deepEqual(notrain.stats, {});
});

test("a correction undoes exactly what the classification learned; undo forgets everything", () => {
  const tokens = toks(4);
  const c = decideTraining({ uid: 1, key: "s", mode: "teft", source: "classification", verdict: "spam", tokens, totals: { spam_learned: 500, innocent_learned: 500 }, prior: null, day });
  const prior = c.ledger.after as LedgerEntry;
  const fix = decideTraining({ uid: 1, key: "s", mode: "teft", source: "error", asClass: "innocent", tokens, totals: ZERO_TOTALS, prior, day });
  assert.deepEqual(fix.tokens.map((t) => [t.spamDelta, t.innocentDelta]), Array(4).fill([-1, 1]));
  assert.deepEqual(fix.stats, { innocent_learned: 1, innocent_misclassified: 1, spam_learned: -1 });
  const undo = decideTraining({ uid: 1, key: "s", mode: "teft", source: "undo", tokens, totals: ZERO_TOTALS, prior: fix.ledger.after, day });
  assert.deepEqual(undo.tokens.map((t) => [t.spamDelta, t.innocentDelta]), Array(4).fill([0, -1]));
  assert.deepEqual(undo.stats, { innocent_learned: -1, innocent_misclassified: -1 });
  assert.equal(undo.ledger.after, null);
  // retarget is what the merge uses: before -> after over the same tokens
  assert.deepEqual(retarget(1, null, null, ["1"]), { tokens: [], stats: {} });
  assert.ok(TRAINING_RULES.length >= 10);
});

/** The counts one message should contribute when it has net class NET (or none). */
function sumCounts(store: MemorySpamStore): { tokens: Map<string, [number, number]>; stats: Record<string, number> } {
  const tokens = new Map<string, [number, number]>();
  for (const [k, v] of store.tokens) if (v.spam_hits || v.innocent_hits) tokens.set(k, [v.spam_hits, v.innocent_hits]);
  const stats: Record<string, number> = {};
  for (const [uid, s] of store.stats) for (const [c, n] of Object.entries(s)) if (n) stats[`${uid}:${c}`] = n;
  return { tokens, stats };
}

const messages = Array.from({ length: 6 }, (_, i) =>
  Buffer.from(`From: sender${i}@example.net\r\nSubject: message number ${i} ${i % 2 ? "cheap pills offer" : "meeting notes"}\r\n\r\nbody words ${i} ${"alpha beta gamma ".repeat(i + 1)} end\r\n`),
);

test("seeded random classify / retrain / undo sequences: every message counts as one net class (all modes)", async () => {
  const modes: TrainingMode[] = ["teft", "toe", "tum", "notrain"];
  for (const mode of modes) {
    for (let seed = 1; seed <= 8; seed++) {
      const r = rng(seed * 31 + mode.length);
      const store = new MemorySpamStore();
      const prefs = { ...DEFAULT_PREFS, training_mode: mode };
      const sigs: (string | null)[] = [];
      // Per message: whether it was ever undone, and the last request (a retrain after an undo starts from nothing).
      const net: { undone: boolean; last: SpamClass | "undone" | null }[] = [];
      for (const m of messages) {
        const c = await classifyMessage(store, 1, m, prefs, { now: new Date("2026-05-16T10:00:00Z") });
        await applyDeltas(store, c.deltas);
        sigs.push(c.signatureId);
        net.push({ undone: false, last: null });
      }
      for (let step = 0; step < 40; step++) {
        const i = Math.floor(r() * messages.length);
        const what = r();
        const target = sigs[i] ?? messages[i]!;
        if (what < 0.15) {
          await applyDeltas(store, await retrain(store, 1, target, "spam", "undo", prefs));
          net[i] = { undone: true, last: "undone" };
        } else {
          const cls: SpamClass = what < 0.6 ? "spam" : "innocent";
          await applyDeltas(store, await retrain(store, 1, target, cls, "error", prefs));
          net[i] = { undone: net[i]!.undone, last: cls };
        }
      }
      // Replay: a fresh store where each message is classified and retrained at most once to its net class.
      const fresh = new MemorySpamStore();
      const freshSigs: (string | null)[] = [];
      for (const m of messages) {
        const c = await classifyMessage(fresh, 1, m, prefs, { now: new Date("2026-05-16T10:00:00Z") });
        await applyDeltas(fresh, c.deltas);
        freshSigs.push(c.signatureId);
      }
      for (let i = 0; i < messages.length; i++) {
        const n = net[i]!;
        const target = freshSigs[i] ?? messages[i]!;
        if (n.undone) await applyDeltas(fresh, await retrain(fresh, 1, target, "spam", "undo", prefs));
        if (n.last === "spam" || n.last === "innocent") await applyDeltas(fresh, await retrain(fresh, 1, target, n.last, "error", prefs));
      }
      const a = sumCounts(store);
      const b = sumCounts(fresh);
      assert.deepEqual(a.stats, b.stats, `mode ${mode} seed ${seed}: stats`);
      assert.deepEqual([...a.tokens].sort(), [...b.tokens].sort(), `mode ${mode} seed ${seed}: token counts`);
      // Retraining to the class already learned changes nothing.
      for (let i = 0; i < messages.length; i++) {
        const n = net[i]!.last;
        if (n === "spam" || n === "innocent") assert.deepEqual(await retrain(store, 1, sigs[i] ?? messages[i]!, n, "error", prefs), [], `mode ${mode} seed ${seed}: message ${i} learned twice`);
      }
    }
  }
});

test("preferences: DSPAM's and mailha's names, defaults for the unknown", () => {
  assert.deepEqual(parsePreferences({}), DEFAULT_PREFS);
  assert.equal(parsePreferences({ trainingMode: "TEFT", spamAction: "deliver" }).training_mode, "teft");
  assert.equal(parsePreferences({ trainingMode: "TEFT", spamAction: "deliver" }).spam_action, "tag");
  assert.equal(parsePreferences({ spam_action: "quarantine", training_mode: "bogus" }).spam_action, "quarantine");
  assert.equal(parsePreferences({ training_mode: "bogus" }).training_mode, "toe");
});

test("classifyMessage gives DSPAM's headers and a signature; a message with nothing readable passes through as Innocent", async () => {
  const store = new MemorySpamStore();
  const c = await classifyMessage(store, 1, messages[0]!);
  assert.equal(c.headers["X-DSPAM-Result"], "Innocent");
  assert.match(c.headers["X-DSPAM-Probability"]!, /^\d\.\d{4}$/);
  assert.match(c.headers["X-DSPAM-Confidence"]!, /^\d\.\d{4}$/);
  assert.equal(c.headers["X-DSPAM-Signature"], c.signatureId);
  assert.ok(c.signatureId!.length <= 32);
  assert.equal(JSON.parse(JSON.stringify(c.deltas)).length, 1);
  const p = await classifyMessage(store, 1, Buffer.alloc(0));
  assert.equal(p.passedThrough, true);
  assert.equal(p.headers["X-DSPAM-Result"], "Innocent");
  assert.match(p.headers["X-DSPAM-Reason"]!, /no-tokens/);
});

test("significance ties go to the better-attested token (evidence, innocent hits double), so weak spam tokens do not crowd out strong innocent ones", () => {
  const totals = { spam_learned: 500, innocent_learned: 500 };
  // Both sets sit at DSPAM's plain 0.99 / 0.01 (same distance from 0.5); the weak spam
  // tokens are sparse bigrams (complexity 5), which DSPAM's order would put first.
  const weakSpam = Array.from({ length: 30 }, (_, i) => ({ token: String(3000 + i), name: `w${i}+#+#+#+x`, frequency: 1, spam_hits: 5, innocent_hits: 0 }));
  const strongHam = Array.from({ length: 30 }, (_, i) => ({ token: String(4000 + i), name: `h${i}`, frequency: 1, spam_hits: 0, innocent_hits: 40 }));
  close(tokenProbability(weakSpam[0]!, totals), 0.99);
  close(tokenProbability(strongHam[0]!, totals), 0.01);
  const v = classifyTokens([...weakSpam, ...strongHam], totals);
  assert.equal(v.result, "innocent");
  assert.ok(v.tokens.every((t) => t.innocent_hits === 40), "the 27 places go to the innocent tokens with 80 weighted hits");
});

test("DSPAM's auto-whitelist: a From line learned innocent more than 10 times (spam at most 1 in 15) makes the message innocent", () => {
  const totals = { spam_learned: 500, innocent_learned: 500 };
  const spammy = Array.from({ length: 30 }, (_, i) => ({ token: String(5000 + i), name: `cheap${i}`, frequency: 1, spam_hits: 80, innocent_hits: 0 }));
  const from = (spam_hits: number, innocent_hits: number) => ({ token: "77", name: "From*Bob <bob@example.com>", frequency: 1, spam_hits, innocent_hits });
  assert.equal(classifyTokens(spammy, totals).result, "spam");
  const w = classifyTokens([...spammy, from(0, 11)], totals);
  assert.equal(w.result, "innocent");
  assert.equal(w.whitelisted, true);
  assert.equal(classifyTokens([...spammy, from(0, 10)], totals).result, "spam"); // 10 is not more than 10
  assert.equal(classifyTokens([...spammy, from(1, 15)], totals).result, "innocent"); // 1 <= 15 / 15
  assert.equal(classifyTokens([...spammy, from(1, 14)], totals).result, "spam"); // 1 > floor(14 / 15)
  // A From* word token with many innocent hits is not the whitelist token.
  assert.equal(classifyTokens([...spammy, { token: "78", name: "From*Bob", frequency: 1, spam_hits: 0, innocent_hits: 50 }], totals).result, "spam");
  assert.ok(isWhitelisted({ spam_hits: 0, innocent_hits: 11 }) && !isWhitelisted({ spam_hits: 0, innocent_hits: 10 }));
});

test("TOE after its warm-up learns an unsure verdict (confidence below 0.70), and a correction undoes exactly that", () => {
  const totals = { spam_learned: 500, innocent_learned: 500 };
  const tokens = toks(3);
  const sure = decideTraining({ uid: 1, key: "k", mode: "toe", source: "classification", verdict: "spam", confidence: 0.95, tokens, totals, prior: null, day });
  assert.equal(sure.tokens.length, 0);
  assert.deepEqual(sure.stats, { spam_classified: 1 });
  const unsure = decideTraining({ uid: 1, key: "k", mode: "toe", source: "classification", verdict: "spam", confidence: 0.55, tokens, totals, prior: null, day });
  assert.match(unsure.rule, /unsure/);
  assert.deepEqual(unsure.tokens.map((t) => [t.spamDelta, t.innocentDelta]), Array(3).fill([1, 0]));
  assert.deepEqual(unsure.stats, { spam_learned: 1 });
  assert.ok(toeUnsure(0.69) && !toeUnsure(0.7) && !toeUnsure(undefined));
  // The user says innocent: the spam learned is taken back, innocent learned, the error counted.
  const fix = decideTraining({ uid: 1, key: "k", mode: "toe", source: "error", asClass: "innocent", tokens, totals, prior: unsure.ledger.after, day });
  assert.deepEqual(fix.tokens.map((t) => [t.spamDelta, t.innocentDelta]), Array(3).fill([-1, 1]));
  assert.deepEqual(fix.stats, { innocent_learned: 1, innocent_misclassified: 1, spam_learned: -1 });
  // And back to spam: exactly the classification's state again.
  const back = decideTraining({ uid: 1, key: "k", mode: "toe", source: "error", asClass: "spam", tokens, totals, prior: fix.ledger.after, day });
  assert.deepEqual(back.tokens.map((t) => [t.spamDelta, t.innocentDelta]), Array(3).fill([1, -1]));
  assert.deepEqual(back.ledger.after, unsure.ledger.after);
});
