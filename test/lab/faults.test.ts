// The short fault suite: two seeded random trials (npm run test:faults runs many).
import { test } from "node:test";
import { runFaultSuite } from "../faults/suite.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const seed = process.env.FAULT_SEED ? Number(process.env.FAULT_SEED) : Math.floor(Math.random() * 1e6);

test(`fault suite, short (seed ${seed})`, { skip }, async (t) => {
  await runFaultSuite(seed, Number(process.env.FAULT_TRIALS ?? 2), (s) => t.diagnostic(s));
});
