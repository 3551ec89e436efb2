// `mailha failover-test`: real clients against the cluster while a fault is injected;
// prints the figures as a table (and a progress bar while it runs), --json, and
// writes an HTML report with the timeline.
import { readFileSync, writeFileSync } from "node:fs";
import { resolve } from "node:path";
import { Command, Option } from "commander";
import { loadConfig } from "../../common/config.ts";
import { EXIT_FAILURE, UsageError } from "../../common/errors.ts";
import { availableFaults, SERVICES } from "../failover/faults.ts";
import { byFaultRows, progressLine, summaryRows, trialRows } from "../failover/present.ts";
import { renderReport } from "../failover/report.ts";
import { runTrial, type TrialResult } from "../failover/trial.ts";
import { createOutput, table } from "./output.ts";

const number = (what: string, min: number, max: number) => (v: string) => {
  const n = Number(v);
  if (!Number.isFinite(n) || n < min || n > max) throw new UsageError(`${what}: expected a number from ${min} to ${max}, found "${v}"`);
  return n;
};

export function failoverTestCommand(defaultConfig: string): Command {
  return new Command("failover-test")
    .description(
      "run real clients (nodemailer to the MX hosts in order, imapflow sessions that fetch and set flags and reconnect, POP3 RETR/DELE) while a fault is injected on the active node (split-brain: apart, both writing, healed, then `mailha reconcile`); report lost and duplicated messages, outages per protocol, UID stability, detection and takeover, as a table and an HTML timeline",
    )
    .addOption(new Option("-c, --config <file>", "cluster configuration file").default(defaultConfig))
    .option("--fault <fault>", "lab: kill-node, freeze-node, cut-replication, cut-links, partition, kill-service, split-brain; anywhere: switchover, failback, none, or a fault of failover_test.faults", "kill-node")
    .option("--trials <n>", "run the trial this many times", number("--trials", 1, 1000), 1)
    .option("--duration <s>", "seconds of client traffic per trial", number("--duration", 2, 3600), 20)
    .option("--fault-after <s>", "seconds of traffic before the fault", number("--fault-after", 0, 3600), 5)
    .option("--freeze-seconds <s>", "how long freeze-node keeps the node stopped", number("--freeze-seconds", 0.1, 600), 5)
    .option("--split-seconds <s>", "split-brain: seconds the clients write on each side while the nodes are apart", number("--split-seconds", 0, 600), 4)
    .addOption(new Option("--service <name>", "the daemon kill-service kills").choices(SERVICES).default("dovecot"))
    .option("--smtp-interval <ms>", "one message every this many ms", number("--smtp-interval", 10, 60_000), 200)
    .option("--imap-sessions <n>", "concurrent IMAP sessions (alternating 143 STARTTLS and 993)", number("--imap-sessions", 0, 50), 2)
    .option("--imap-interval <ms>", "pause between an IMAP session's rounds (NOOP, fetch new mail, set \\Seen)", number("--imap-interval", 10, 60_000), 300)
    .option("--pop3-interval <ms>", "pause between POP3 sessions (each retrieves and deletes what arrived)", number("--pop3-interval", 10, 60_000), 500)
    .option("--no-pop3", "no POP3 workload")
    .option("--user <address>", "the IMAP mailbox (default: the lab's test user)")
    .option("--password-file <file>", "a file holding its password (the way to give it)")
    .option("--password <pw>", "its password on the command line: visible in ps and shell history, prefer --password-file")
    .option("--pop3-user <address>", "the POP3 mailbox, whose mail is deleted (default: the lab's pop3 user)")
    .option("--pop3-password-file <file>", "a file holding its password")
    .option("--pop3-password <pw>", "its password on the command line: visible in ps, prefer --pop3-password-file")
    .option("--dns-server <address>", "ask this server for the MX and mail host records (default: the lab's DNS server; on real nodes the system resolver)")
    .option("--report <file>", "where the HTML report goes", "failover-report.html")
    .addOption(new Option("--json", "print the results as JSON on stdout (progress as JSON lines on stderr)"))
    .action(async (o: Opts) => {
      const out = createOutput(!!o.json);
      const c = loadConfig(o.config);
      if (!availableFaults(c).includes(o.fault)) throw new UsageError(`unknown fault "${o.fault}" (known here: ${availableFaults(c).join(", ")})`);
      const fromFile = (f: string | undefined) => (f ? readFileSync(f, "utf8").replace(/\r?\n$/, "") : undefined);
      if (o.password || o.pop3Password) process.stderr.write("mailha: warning: a password on the command line is visible in ps and kept in shell history; use --password-file\n");
      const imap = { address: o.user ?? c.lab?.test_user.address, password: fromFile(o.passwordFile) ?? o.password ?? c.lab?.test_user.password };
      if (!imap.address || !imap.password) throw new UsageError("say --user and --password (this config has no lab test user)");
      const popUser = o.pop3User ?? c.lab?.pop3_user?.address;
      const popPass = fromFile(o.pop3PasswordFile) ?? o.pop3Password ?? c.lab?.pop3_user?.password;
      if (o.pop3 && (!popUser || !popPass)) throw new UsageError("say --pop3-user and --pop3-password, or --no-pop3 (this config has no lab pop3 user)");
      const tty = !o.json && process.stderr.isTTY;
      let lastLine = 0;
      const results: TrialResult[] = [];
      for (let i = 0; i < o.trials; i++) {
        const r = await runTrial({
          config: c,
          configFile: o.config,
          fault: o.fault,
          faultOptions: { freezeMs: o.freezeSeconds * 1000, service: o.service, splitMs: o.splitSeconds * 1000 },
          faultAfterMs: o.faultAfter * 1000,
          durationMs: o.duration * 1000,
          smtpEveryMs: o.smtpInterval,
          imapSessions: o.imapSessions,
          imapEveryMs: o.imapInterval,
          pop3EveryMs: o.pop3Interval,
          imap: { address: imap.address, password: imap.password },
          pop3: o.pop3 ? { address: popUser!, password: popPass! } : null,
          dnsServer: o.dnsServer ?? (c.lab ? (c.dns.server ?? null) : null),
          progress: (p) => {
            if (o.json) {
              if (Date.now() - lastLine >= 1000) out.progress("trial", { trial: i + 1, ...p });
              else return;
            } else if (tty) process.stderr.write(`\r\x1b[2K${o.trials > 1 ? `trial ${i + 1}/${o.trials} ` : ""}${progressLine(p)}`);
            else if (Date.now() - lastLine >= 5000) process.stderr.write(`${progressLine(p)}\n`);
            else return;
            lastLine = Date.now();
          },
          say: (line) => (o.json ? out.progress("trial", { trial: i + 1, note: line }) : process.stderr.write(`${tty ? "\r\x1b[2K" : ""}- ${line}\n`)),
        });
        if (tty) process.stderr.write("\n");
        results.push(r);
      }
      const report = resolve(o.report);
      writeFileSync(report, renderReport(results, { cluster: c.cluster.name, command: `mailha ${process.argv.slice(2).join(" ")}`.trim() }));
      out.result({ report, results, byFault: byFaultRows(results) }, () =>
        [
          ...(results.length === 1 ? [table(trialRows(results[0]!))] : [table(summaryRows(results)), "", table(byFaultRows(results))]),
          ...results.flatMap((r) => r.notes.map((n) => `note: ${n}`)),
          `report: ${report}`,
        ].join("\n"),
      );
      if (results.some((r) => !r.ok)) process.exitCode = EXIT_FAILURE;
    });
}

interface Opts {
  config: string;
  fault: string;
  trials: number;
  duration: number;
  faultAfter: number;
  freezeSeconds: number;
  splitSeconds: number;
  service: (typeof SERVICES)[number];
  smtpInterval: number;
  imapSessions: number;
  imapInterval: number;
  pop3Interval: number;
  pop3: boolean;
  user?: string;
  password?: string;
  passwordFile?: string;
  pop3PasswordFile?: string;
  pop3User?: string;
  pop3Password?: string;
  dnsServer?: string;
  report: string;
  json?: boolean;
}
