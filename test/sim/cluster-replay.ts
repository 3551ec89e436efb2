// Replays one cluster-simulation seed with the whole log:
//   node --import tsx test/sim/cluster-replay.ts SEED [witness] [ping] [fencing]
import { runClusterSimulation } from "./cluster-sim.ts";

const a = process.argv.slice(2);
try {
  console.log("ok", runClusterSimulation({ seed: Number(a[0]), steps: Number(process.env.CLUSTER_STEPS ?? 600), witness: a.includes("witness"), ping: a.includes("ping"), fencing: a.includes("fencing") ? "lab" : "none", trace: true }));
} catch (err) {
  console.log((err as Error).message);
  process.exitCode = 1;
}
