// `npm run test:faults`: many seeded trials (FAULT_TRIALS, default 20; FAULT_SEED to
// replay); prints the figures per fault type and writes reports/faults-SEED.html.
import { join } from "node:path";
import { table } from "../../ops/cli/output.ts";
import { byFault, byFaultRows, summaryRows } from "../../ops/failover/present.ts";
import { ROOT } from "../helpers/cli.ts";
import { runFaultSuite } from "./suite.ts";

const seed = process.env.FAULT_SEED ? Number(process.env.FAULT_SEED) : Math.floor(Math.random() * 1e6);
const report = join(ROOT, "reports", `faults-${seed}.html`);
const results = await runFaultSuite(seed, Number(process.env.FAULT_TRIALS ?? 20), (s) => console.error(s), report);
console.log(table(summaryRows(results)));
console.log();
console.log(table(byFaultRows(results)));
console.log(`\nreport: ${report}`);
if (process.env.FAULT_JSON) console.log(JSON.stringify({ seed, byFault: byFault(results) }));
process.exit(0);
