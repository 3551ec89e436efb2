// What two nodes decide when they connect: every row of the generation-identifier
// table, and what each split-brain policy does, from both sides (the decision must
// be the same seen from either node).
import { test } from "node:test";
import assert from "node:assert/strict";
import { decideConnect, splitBrainVictim } from "../../replication/gi.ts";
import type { GenIds, Hello, SplitBrainPolicy } from "../../replication/types.ts";

function hello(nodeId: string, gi: Partial<GenIds>, more: Partial<Hello> = {}): Hello {
  return {
    t: "hello", nodeId, sizeBytes: 1 << 24, gi: { current: "", bitmap: "", history: ["", ""], ...gi }, disk: "consistent", role: "secondary",
    fresh: false, crashedPrimary: false, primarySinceMs: null, changedBlocks: 0, bitmapChunks: 0, resolve: null, ...more,
  };
}

/** Decides from both sides and checks they agree; returns a's view. */
function decide(a: Hello, b: Hello, policy: SplitBrainPolicy = "preserve") {
  const x = decideConnect(a, b, policy);
  const y = decideConnect(b, a, policy);
  assert.equal(x.kind, y.kind, "both sides must reach the same kind of outcome");
  if (x.kind === "resync" && y.kind === "resync") {
    assert.notEqual(x.source, y.source, "exactly one side is the source");
    assert.equal(x.full, y.full);
  }
  if (x.kind === "split-brain" && y.kind === "split-brain") {
    const flip = (s: "me" | "peer" | null) => (s === null ? null : s === "me" ? "peer" : "me");
    assert.equal(x.victim, flip(y.victim), "both sides must pick the same victim");
  }
  return x;
}

test("brand-new pair: wait for the operator", () => {
  assert.equal(decide(hello("a", {}), hello("b", {})).kind, "wait");
});

test("one side new: full sync from the other", () => {
  const r = decide(hello("a", { current: "X" }), hello("b", {}));
  assert.deepEqual([r.kind, r.kind === "resync" && r.source, r.kind === "resync" && r.full], ["resync", "me", true]);
});

test("same generation, clean: no sync; with bits set or after a primary crash: resync from the right side", () => {
  assert.equal(decide(hello("a", { current: "X" }), hello("b", { current: "X" })).kind, "no-sync");
  const crashed = decide(hello("a", { current: "X" }), hello("b", { current: "X" }, { crashedPrimary: true, changedBlocks: 1024 }));
  assert.equal(crashed.kind === "resync" && crashed.source, "peer", "the crashed primary's data may be newer: it is the source");
  const target = decide(hello("a", { current: "X" }, { disk: "inconsistent", changedBlocks: 5 }), hello("b", { current: "X" }));
  assert.equal(target.kind === "resync" && target.source, "peer", "an interrupted resync continues into the Inconsistent side");
});

test("one side moved on: bitmap resync from it", () => {
  const r = decide(hello("a", { current: "Y", bitmap: "X" }, { changedBlocks: 10 }), hello("b", { current: "X" }));
  assert.deepEqual([r.kind, r.kind === "resync" && r.source, r.kind === "resync" && r.full], ["resync", "me", false]);
});

test("one side moved on twice: full sync", () => {
  const r = decide(hello("a", { current: "Z", bitmap: "Y", history: ["X", ""] }), hello("b", { current: "X" }));
  assert.deepEqual([r.kind, r.kind === "resync" && r.source, r.kind === "resync" && r.full], ["resync", "me", true]);
});

test("both moved on from the same generation: split brain; nothing in common: unrelated", () => {
  assert.equal(decide(hello("a", { current: "Y", bitmap: "X" }), hello("b", { current: "Z", bitmap: "X" })).kind, "split-brain");
  assert.equal(decide(hello("a", { current: "Y", bitmap: "W" }), hello("b", { current: "Z", bitmap: "X" })).kind, "unrelated");
  assert.equal(decide(hello("a", { current: "X" }), hello("b", { current: "X" }, { sizeBytes: 1 << 25 })).kind, "refuse");
});

const sbA = (more: Partial<Hello>) => hello("a", { current: "Y", bitmap: "X" }, more);
const sbB = (more: Partial<Hello>) => hello("b", { current: "Z", bitmap: "X" }, more);

test("disconnect: nobody is overwritten", () => {
  const r = decide(sbA({ changedBlocks: 1 }), sbB({ changedBlocks: 100 }), "disconnect");
  assert.equal(r.kind === "split-brain" && r.victim, null);
});

test("discard-zero-changes: only a side that changed nothing is overwritten", () => {
  const r = decide(sbA({ changedBlocks: 0 }), sbB({ changedBlocks: 7 }), "discard-zero-changes");
  assert.equal(r.kind === "split-brain" && r.victim, "me");
  const both = decide(sbA({ changedBlocks: 3 }), sbB({ changedBlocks: 7 }), "discard-zero-changes");
  assert.equal(both.kind === "split-brain" && both.victim, null, "both changed something: disconnect");
});

test("discard-least-changes and preserve: the side with fewer changed blocks loses", () => {
  for (const p of ["discard-least-changes", "preserve"] as const) {
    const r = decide(sbA({ changedBlocks: 300 }), sbB({ changedBlocks: 20 }), p);
    assert.equal(r.kind === "split-brain" && r.victim, "peer", p);
  }
});

test("discard-younger-primary: the side that became primary last loses", () => {
  const r = decide(sbA({ changedBlocks: 1, primarySinceMs: 2000 }), sbB({ changedBlocks: 500, primarySinceMs: 1000 }), "discard-younger-primary");
  assert.equal(r.kind === "split-brain" && r.victim, "me");
});

test("a side that is still primary is never chosen to be overwritten", () => {
  for (const p of ["discard-least-changes", "discard-younger-primary"] as const) {
    const r = decide(sbA({ changedBlocks: 1, role: "primary", primarySinceMs: 2000 }), sbB({ changedBlocks: 500, primarySinceMs: 1000 }), p);
    assert.equal(r.kind === "split-brain" && r.victim, null, p);
  }
  assert.equal(splitBrainVictim(sbA({ changedBlocks: 1 }), sbB({ changedBlocks: 5 }), "preserve"), "me");
});

test("preserve: the active (primary) side keeps serving, the secondary is copied and overwritten, whatever each changed", () => {
  const r = decide(sbA({ changedBlocks: 1, role: "primary" }), sbB({ changedBlocks: 500 }), "preserve");
  assert.equal(r.kind === "split-brain" && r.victim, "peer");
  const s = decide(sbA({ changedBlocks: 900 }), sbB({ changedBlocks: 5, role: "primary" }), "preserve");
  assert.equal(s.kind === "split-brain" && s.victim, "me");
});
