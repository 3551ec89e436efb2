// `npm run bench [-- NAME]`: runs the benchmarks (volume, failover, smtp, reconcile, journal, spam, startup) and prints every
// figure as `NAME VALUE UNIT`, ratios against a baseline measured in the same run, then
// rewrites that benchmark's section of BENCHMARKS.md. The machine is shared and noisy:
// compare ratios, not absolute times.
import { runVolumeBench } from "./volume.ts";
import { runFailoverBench } from "./failover.ts";
import { runSmtpBench } from "./smtp.ts";
import { runReconcileBench } from "./reconcile.ts";
import { runJournalBench } from "./journal.ts";

const BENCHES: Record<string, () => Promise<void>> = { volume: runVolumeBench, failover: runFailoverBench, smtp: runSmtpBench, reconcile: runReconcileBench, journal: runJournalBench, spam: async () => (await import("./spam.ts")).runSpamBench(), startup: async () => (await import("./startup.ts")).runStartupBench() };
const wanted = process.argv.slice(2).filter((a) => !a.startsWith("-"));
const names = wanted.length ? wanted : Object.keys(BENCHES);
for (const n of names) {
  const b = BENCHES[n];
  if (!b) {
    console.error(`unknown benchmark "${n}" (known: ${Object.keys(BENCHES).join(", ")})`);
    process.exit(2);
  }
  await b();
}
process.exit(0);
