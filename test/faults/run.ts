// `npm run test:faults`: many seeded trials (FAULT_TRIALS, default 20; FAULT_SEED to replay).
import { runFaultSuite } from "./suite.ts";

const seed = process.env.FAULT_SEED ? Number(process.env.FAULT_SEED) : Math.floor(Math.random() * 1e6);
const results = await runFaultSuite(seed, Number(process.env.FAULT_TRIALS ?? 20), (s) => console.error(s));
console.log(JSON.stringify({ seed, trials: results.length, lost: results.reduce((n, r) => n + r.smtp.lost.length, 0), results }, null, 2));
process.exit(0);
