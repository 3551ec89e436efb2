// The replication protocol under many seeded random schedules: delays, cable pulls,
// crashes and restarts of either side, failovers, switchovers, split brains, verifies,
// fencing (frozen I/O).
// Invariants are checked after every step (see test/sim/volume-sim.ts). A failure
// prints its seed; replay one with SIM_SEED=N, run more with SIM_SEEDS=N.
import { test } from "node:test";
import assert from "node:assert/strict";
import { runSimulation } from "../sim/volume-sim.ts";
import type { Protocol, SplitBrainPolicy } from "../../replication/types.ts";

const SEEDS = Number(process.env.SIM_SEEDS ?? 150);
const STEPS = Number(process.env.SIM_STEPS ?? 400);
const ONE = process.env.SIM_SEED ? Number(process.env.SIM_SEED) : null;

const cases: { protocol: Protocol; policy: SplitBrainPolicy; splitBrains: boolean }[] = [
  { protocol: "C", policy: "preserve", splitBrains: false },
  { protocol: "C", policy: "preserve", splitBrains: true },
  { protocol: "C", policy: "disconnect", splitBrains: true },
  { protocol: "C", policy: "discard-younger-primary", splitBrains: true },
  { protocol: "C", policy: "discard-zero-changes", splitBrains: true },
  { protocol: "A", policy: "discard-least-changes", splitBrains: true },
];

for (const c of cases) {
  test(`protocol ${c.protocol}, split-brain policy ${c.policy}${c.splitBrains ? ", with split brains" : ""}`, () => {
    const seeds = ONE !== null ? [ONE] : Array.from({ length: SEEDS }, (_, i) => i + 1);
    const total = { writes: 0, flushesChecked: 0, resyncs: 0, splitBrains: 0, crashes: 0, verifies: 0, fencedDemotions: 0, preserved: 0, stepDowns: 0 };
    for (const seed of seeds) {
      let r;
      try {
        r = runSimulation({ seed, steps: STEPS, ...c });
      } catch (err) {
        assert.fail(`seed ${seed} failed (replay: SIM_SEED=${seed} npm run test:unit):\n${(err as Error).message}\n${(err as Error).stack ?? ""}`);
      }
      for (const k of Object.keys(total) as (keyof typeof total)[]) total[k] += r[k];
    }
    // The schedules must actually exercise the protocol, or the test proves nothing.
    assert.ok(total.flushesChecked > seeds.length, `too few flushes checked: ${JSON.stringify(total)}`);
    if (seeds.length >= 50) {
      assert.ok(total.resyncs > 10, `too few resyncs: ${JSON.stringify(total)}`);
      assert.ok(total.crashes > 10, `too few crashes: ${JSON.stringify(total)}`);
      assert.ok(total.fencedDemotions > 5, `too few fenced demotions without the peer: ${JSON.stringify(total)}`);
      if (c.splitBrains) assert.ok(total.splitBrains > 5, `too few split brains: ${JSON.stringify(total)}`);
      // Every policy keeps a copy of a diverged side before overwriting it.
      if (c.splitBrains) assert.ok(total.preserved > 3, `too few preserved copies: ${JSON.stringify(total)}`);
      if (c.splitBrains && c.policy === "preserve") assert.ok(total.stepDowns > 3, `too few healed double primaries: ${JSON.stringify(total)}`);
    }
  });
}
