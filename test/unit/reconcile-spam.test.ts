// The spam filter's learning merged after a split brain (reconcile/spam.ts), on the
// in-memory store: from a common base, the survivor and the victim each train messages
// while apart (one message on both sides); the merge leaves every token count and
// statistic equal to the base plus the survivor's changes plus the victim's changes,
// the message trained on both sides learned once (the later training), and a second
// merge changes nothing. Users are matched by address, not by uid.
import { test } from "node:test";
import assert from "node:assert/strict";
import { formatHlc } from "../../common/hlc.ts";
import { retrain, applyDeltas } from "../../services/spam/filter.ts";
import { MemorySpamStore } from "../../services/spam/store.ts";
import type { SpamDelta } from "../../services/spam/training.ts";
import type { OtherEvent } from "../../reconcile/model.ts";
import { applySpamStep, spamHandler, type SpamStep } from "../../reconcile/spam.ts";
import { journalParts, LINE_TOKENS_MAX } from "../../services/spam/journal.ts";

const words = (seed: number, base: string[]) => Array.from({ length: 30 }, (_, i) => base[(seed * 7 + i * 3) % base.length]).join(" ");
const SPAM = ["viagra", "casino", "lottery", "winner", "bitcoin", "pharmacy", "discount", "prize"];
const HAM = ["meeting", "agenda", "minutes", "project", "schedule", "review", "budget", "report"];
const msg = (id: string, body: string) => Buffer.from(`From: x@example.net\r\nSubject: ${id}\r\nMessage-ID: <${id}@example.net>\r\n\r\n${body}\r\n`);
const M = {
  m1: msg("m1", words(1, SPAM)),
  m2: msg("m2", words(2, SPAM)),
  m3: msg("m3", words(3, HAM)),
  m4: msg("m4", words(4, HAM)),
  m5: msg("m5", words(5, SPAM)),
};
const USER = "bob@mailha.test";

async function train(s: MemorySpamStore, user: string, m: Buffer, cls: "spam" | "innocent"): Promise<SpamDelta[]> {
  const uid = await s.uidFor(user);
  const d = await retrain(s, uid, m, cls, "corpus");
  await applyDeltas(s, d);
  return d;
}

let clock = 1_800_000_000_000;
const events = (node: string, user: string, ds: SpamDelta[]): OtherEvent[] =>
  ds.map((d, i) => ({ id: `${node}:1:${++clock}:${i}`, node, hlc: formatHlc({ wallMs: ++clock, counter: 0, node }), kind: "spam-delta", payload: { user, delta: d } }) as unknown as OtherEvent);

function snapshot(s: MemorySpamStore) {
  const tokens = [...s.tokens].filter(([, v]) => v.spam_hits || v.innocent_hits).map(([k, v]) => [k, v.spam_hits, v.innocent_hits]).sort();
  return { tokens, stats: [...s.stats].sort() };
}

test("the victim's training is added to the survivor's exactly; a message trained on both sides is learned once; merging twice changes nothing", async () => {
  const base = async () => {
    const s = new MemorySpamStore();
    await s.uidFor("someone@else.test"); // uids differ between the sides below
    await train(s, USER, M.m1, "spam");
    return s;
  };
  const survivor = await base();
  const victim = new MemorySpamStore();
  await train(victim, USER, M.m1, "spam"); // same base, bob has another uid here
  assert.notEqual(await victim.uidFor(USER), await survivor.uidFor(USER));

  // Apart. The victim: m2 spam, m3 ham, and m1 corrected to ham. The survivor: m4 ham, then m3 as spam later.
  const vEvents = [...events("a", USER, await train(victim, USER, M.m2, "spam")), ...events("a", USER, await train(victim, USER, M.m3, "innocent")), ...events("a", USER, await train(victim, USER, M.m1, "innocent"))];
  const sEvents = [...events("b", USER, await train(survivor, USER, M.m4, "innocent")), ...events("b", USER, await train(survivor, USER, M.m3, "spam"))];

  // What the merge must give: the base, the survivor's changes, and the victim's for m2 and m1 (m3: the survivor trained it later).
  const expected = await base();
  await train(expected, USER, M.m4, "innocent");
  await train(expected, USER, M.m3, "spam");
  await train(expected, USER, M.m2, "spam");
  await train(expected, USER, M.m1, "innocent");

  const steps = spamHandler.plan({ victim: vEvents, survivor: sEvents, victimState: { mail: {}, accounts: { users: {}, aliases: {}, domains: {} } }, survivorState: { mail: {}, accounts: { users: {}, aliases: {}, domains: {} } } } as never);
  assert.equal(steps.length, 2, "m2 and m1 from the victim; m3 stays as the survivor trained it later");
  for (const st of steps) await applySpamStep(survivor, st.payload as unknown as SpamStep);
  assert.deepEqual(snapshot(survivor), snapshot(expected));

  const again = [];
  for (const st of steps) again.push(await applySpamStep(survivor, st.payload as unknown as SpamStep));
  assert.ok(again.every((r) => !r.changed), "a second merge changes nothing");
  assert.deepEqual(snapshot(survivor), snapshot(expected));

  // The victim trained m5 after the survivor's last word on it: the victim's later class wins.
  const s2 = await base();
  const v2 = await base();
  const early = events("b", USER, await train(s2, USER, M.m5, "innocent"));
  const late = events("a", USER, await train(v2, USER, M.m5, "spam"));
  const st2 = spamHandler.plan({ victim: late, survivor: early } as never);
  assert.equal(st2.length, 1);
  await applySpamStep(s2, st2[0]!.payload as unknown as SpamStep);
  const e2 = await base();
  await train(e2, USER, M.m5, "spam");
  assert.deepEqual(snapshot(s2), snapshot(e2), "learned once, as the later training says");
});

test("a delta too big for one journal line is journaled in parts (no signature) and merges as the whole", async () => {
  const big = msg("big", Array.from({ length: 2500 }, (_, i) => `w${i.toString(36)}x`).join(" "));
  const survivor = new MemorySpamStore();
  const victim = new MemorySpamStore();
  const d = await train(victim, USER, big, "spam");
  assert.ok(d[0]!.tokens.length > LINE_TOKENS_MAX, `the message teaches ${d[0]!.tokens.length} tokens`);
  const parts = d.flatMap((x) => journalParts(USER, x));
  assert.ok(parts.length >= 2, `in ${parts.length} parts`);
  for (const p of parts) {
    assert.ok(Buffer.byteLength(JSON.stringify(p)) < 256 * 1024, "each part fits a journal line");
    assert.equal((p.delta as { signature?: unknown }).signature, undefined, "no signature in the journal");
  }
  const vEvents = parts.map((payload, i) => ({ id: `a:1:${i}`, node: "a", hlc: formatHlc({ wallMs: ++clock, counter: 0, node: "a" }), kind: "spam-delta", payload }) as unknown as OtherEvent);
  const steps = spamHandler.plan({ victim: vEvents, survivor: [] } as never);
  assert.equal(steps.length, 1, "the parts are one message's training");
  await applySpamStep(survivor, steps[0]!.payload as unknown as SpamStep);
  assert.deepEqual(snapshot(survivor).tokens, snapshot(victim).tokens, "every token of every part came over, once");
  const t = await survivor.totals(await survivor.uidFor(USER));
  assert.equal(t.spam_learned, 1, "the stats once");
});
