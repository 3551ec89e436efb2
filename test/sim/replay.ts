// Replays one simulation seed and prints its event log:
//   node --import tsx test/sim/replay.ts SEED [POLICY] [A|C] [nosb] [--block N]
import { runSimulation } from "./volume-sim.ts";
import type { Protocol, SplitBrainPolicy } from "../../replication/types.ts";

const args = process.argv.slice(2);
const seed = Number(args[0]);
const policy = (args[1] ?? "preserve") as SplitBrainPolicy;
const protocol = (args[2] ?? "C") as Protocol;
const splitBrains = !args.includes("nosb");
try {
  const r = runSimulation({ seed, steps: Number(process.env.SIM_STEPS ?? 500), protocol, policy, splitBrains, trace: true });
  console.log("ok", r);
} catch (err) {
  console.log((err as Error).message);
  process.exitCode = 1;
}
