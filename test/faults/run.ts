// `npm run test:faults`: many seeded trials (FAULT_TRIALS, default 20; FAULT_SEED to
// replay); prints the figures per fault type, writes reports/faults-SEED.html, and
// with FAULT_PUBLISH=1 puts the figures in BENCHMARKS.md ("fault suite" section).
import { join } from "node:path";
import { table } from "../../ops/cli/output.ts";
import { byFault, byFaultRows, summaryRows } from "../../ops/failover/present.ts";
import { writeSection } from "../bench/report.ts";
import { ROOT } from "../helpers/cli.ts";
import { runFaultSuite } from "./suite.ts";

const seed = process.env.FAULT_SEED ? Number(process.env.FAULT_SEED) : Math.floor(Math.random() * 1e6);
const trials = Number(process.env.FAULT_TRIALS ?? 20);
const report = join(ROOT, "reports", `faults-${seed}.html`);
const results = await runFaultSuite(seed, trials, (s) => console.error(s), report);
console.log(table(summaryRows(results)));
console.log();
console.log(table(byFaultRows(results)));
console.log(`\nreport: ${report}`);
const lost = results.reduce((n, r) => n + r.smtp.lost.length, 0);
const acked = results.reduce((n, r) => n + r.smtp.acked, 0);
if (process.env.FAULT_PUBLISH) {
  const md = (rows: string[][]) => [`| ${rows[0]!.join(" | ")} |`, `|${rows[0]!.map(() => "---").join("|")}|`, ...rows.slice(1).map((r) => `| ${r.join(" | ")} |`)];
  const lines: string[] = [];
  for (const f of byFault(results)) {
    const k = (name: string, v: number | null) => v !== null && lines.push(`faults.${f.fault}.${name} ${(v / 1000).toFixed(2)} s`);
    k("detection.p50", f.p50.detectionMs);
    k("detection.p95", f.p95.detectionMs);
    k("takeover.p50", f.p50.takeoverMs);
    k("takeover.p95", f.p95.takeoverMs);
    k("smtp_outage.p95", f.p95.smtpOutageMs);
    k("imap_outage.p95", f.p95.imapOutageMs);
  }
  lines.push(`faults.acknowledged ${acked} count`, `faults.lost ${lost} count`);
  writeSection("fault suite", [
    `Command: \`FAULT_SEED=${seed} FAULT_TRIALS=${trials} FAULT_PUBLISH=1 npm run test:faults\` (run ${new Date().toISOString().slice(0, 10)}; ${trials} seeded trials over a lab of the suite's own; each trial: 2-5 s of traffic, the fault on the active node, 10 s more, then recovery to a healthy cluster; lab timers keepalive 100 ms, deadtime 600 ms, witness lease 2000 ms, fencing lab).`,
    "",
    `Clients per trial: nodemailer (a message every 200 ms to the MX hosts in order), two imapflow sessions (fetch, set \\\\Seen), one POP3 session (RETR, DELE). Detection: first sign of the fault in a cluster event log (peer dead, link down, monitor failure); takeover: the group active again (kill-service: the service running again); outage: longest stretch from a failed client operation to the next success. Messages acknowledged in all: ${acked}; lost: ${lost}.`,
    "",
    ...md(byFaultRows(results)),
    "",
    "Every trial:",
    "",
    ...md(summaryRows(results)),
    "",
    "```",
    ...lines,
    "```",
  ]);
  console.log("BENCHMARKS.md: section \"fault suite\" written");
}
process.exit(0);
