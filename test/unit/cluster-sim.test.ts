// The cluster manager under seeded random schedules: cut links, packet loss, a lost
// witness, isolation from the witness and ping targets, crashes, restarts, fencing,
// switchovers, standby, failing resources. Checked after every event: the group
// never runs on both nodes; no two active nodes both believe they hold quorum; an
// active node without quorum stops within its bound; after healing, exactly one
// node is active. Replay a seed with CLUSTER_SEED=N.
import { test } from "node:test";
import assert from "node:assert/strict";
import { runClusterSimulation } from "../sim/cluster-sim.ts";

const SEEDS = Number(process.env.CLUSTER_SEEDS ?? 120);
const STEPS = Number(process.env.CLUSTER_STEPS ?? 600);
const ONE = process.env.CLUSTER_SEED ? Number(process.env.CLUSTER_SEED) : null;

const modes = [
  { name: "witness + lab fencing (the lab's setup)", witness: true, ping: true, fencing: "lab" as const },
  { name: "witness, no fencing", witness: true, ping: false, fencing: "none" as const },
  { name: "ping targets + fencing, no witness", witness: false, ping: true, fencing: "lab" as const },
  { name: "no tie-breaker, fencing only", witness: false, ping: false, fencing: "lab" as const },
  { name: "no tie-breaker, no fencing (never takes over automatically)", witness: false, ping: false, fencing: "none" as const },
];

for (const m of modes) {
  test(m.name, () => {
    const seeds = ONE !== null ? [ONE] : Array.from({ length: SEEDS }, (_, i) => i + 1);
    const total = { takeovers: 0, selfFences: 0, crashes: 0, partitions: 0, switchovers: 0, fences: 0 };
    for (const seed of seeds) {
      let s;
      try {
        s = runClusterSimulation({ seed, steps: STEPS, ...m, trace: ONE !== null });
      } catch (err) {
        assert.fail(`seed ${seed} failed (replay: CLUSTER_SEED=${seed} npm run test:unit):\n${(err as Error).message}`);
      }
      for (const k of Object.keys(total) as (keyof typeof total)[]) total[k] += s[k];
    }
    if (seeds.length >= 50) {
      assert.ok(total.crashes > 20 && total.partitions > 20, `schedules too tame: ${JSON.stringify(total)}`);
      if (m.fencing !== "none" || m.witness) assert.ok(total.takeovers > 5, `too few takeovers exercised: ${JSON.stringify(total)}`);
    }
  });
}
