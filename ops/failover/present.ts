// How trial results read on a terminal (and in the report's tables): one trial as a
// figure/value table, several as one row each, figures per fault type at p50 and
// p95, and the progress bar shown while a trial runs.
import { percentile } from "./record.ts";
import type { TrialProgress, TrialResult } from "./trial.ts";

const ms = (v: number | null) => (v === null ? "-" : `${(v / 1000).toFixed(2)} s`);
const yes = (b: boolean) => (b ? "yes" : "NO");

export function trialRows(r: TrialResult): string[][] {
  const rows: string[][] = [
    ["figure", "value"],
    ["fault", `${r.fault}${r.target ? ` on ${r.target}` : ""}`],
    ["detection", ms(r.detectionMs)],
    ["takeover (service back)", ms(r.takeoverMs)],
    ["active afterwards", r.activeAfter ?? "none"],
    ["SMTP sent / acknowledged / found", `${r.smtp.sent} / ${r.smtp.acked} / ${r.smtp.found}`],
    ["lost (acknowledged, never found)", `${r.smtp.lost.length} lost`],
    ["duplicated", String(r.smtp.duplicated.length)],
    ["SMTP outage (longest)", ms(r.smtp.outageMs)],
    ["IMAP operations / failed", `${r.imap.ops} / ${r.imap.failures}`],
    ["IMAP outage (longest)", ms(r.imap.outageMs)],
    ["IMAP \\Seen flags set / lost", `${r.imap.flagsSet} / ${r.imap.flagsLost}`],
  ];
  if (r.pop3) {
    rows.push(["POP3 operations / failed", `${r.pop3.ops} / ${r.pop3.failures}`]);
    rows.push(["POP3 outage (longest)", ms(r.pop3.outageMs)]);
    rows.push(["POP3 acknowledged / retrieved", `${r.pop3.acked} / ${r.pop3.retrieved}`]);
  }
  if (r.splitBrain) {
    const sb = r.splitBrain;
    rows.push([`split brain: acknowledged by ${sb.old ?? "?"} / by ${sb.new ?? "?"} while apart`, `${sb.ackedByOld} / ${sb.ackedByNew}`]);
    const rc = sb.reconcile;
    rows.push(["reconcile", rc ? `applied ${rc.applied} of ${rc.ops} operations in ${rc.seconds.toFixed(1)} s${rc.complete ? "" : " (INCOMPLETE)"}` : "NO (not run)"]);
  }
  rows.push(["UIDVALIDITY unchanged", yes(r.imap.uidValidityStable)]);
  rows.push(["older UIDs unchanged", yes(r.imap.oldUidsStable)]);
  rows.push(["healthy afterwards", yes(r.healthyAfter)]);
  rows.push(["result", r.ok ? "OK" : "FAILED"]);
  return rows;
}

export function summaryRows(rs: readonly TrialResult[]): string[][] {
  return [
    ["#", "fault", "detection", "takeover", "SMTP outage", "IMAP outage", "POP3 outage", "acked / found", "lost", "dup", "flags lost", "UIDs stable", "result"],
    ...rs.map((r, i) => [
      String(i + 1),
      `${r.fault}${r.target ? ` on ${r.target}` : ""}`,
      ms(r.detectionMs),
      ms(r.takeoverMs),
      ms(r.smtp.outageMs),
      ms(r.imap.outageMs),
      r.pop3 ? ms(r.pop3.outageMs) : "-",
      `${r.smtp.acked} / ${r.smtp.found}`,
      `${r.smtp.lost.length} lost`,
      String(r.smtp.duplicated.length),
      String(r.imap.flagsLost),
      yes(r.imap.uidValidityStable && r.imap.oldUidsStable),
      r.ok ? "OK" : "FAILED",
    ]),
  ];
}

export interface FaultFigures {
  readonly fault: string;
  readonly trials: number;
  readonly p50: Record<"detectionMs" | "takeoverMs" | "smtpOutageMs" | "imapOutageMs" | "pop3OutageMs", number | null>;
  readonly p95: Record<"detectionMs" | "takeoverMs" | "smtpOutageMs" | "imapOutageMs" | "pop3OutageMs", number | null>;
  readonly lost: number;
  readonly duplicated: number;
}

/** Figures per fault type: p50 and p95 of detection, takeover and each protocol's outage, and messages lost. */
export function byFault(rs: readonly TrialResult[]): FaultFigures[] {
  const faults = [...new Set(rs.map((r) => r.fault))];
  return faults.map((fault) => {
    const mine = rs.filter((r) => r.fault === fault);
    const pick = (f: (r: TrialResult) => number | null) => mine.map(f).filter((v): v is number => v !== null);
    const series = {
      detectionMs: pick((r) => r.detectionMs),
      takeoverMs: pick((r) => r.takeoverMs),
      smtpOutageMs: pick((r) => r.smtp.outageMs),
      imapOutageMs: pick((r) => r.imap.outageMs),
      pop3OutageMs: pick((r) => r.pop3?.outageMs ?? null),
    };
    const at = (p: number) => Object.fromEntries(Object.entries(series).map(([k, v]) => [k, percentile(v, p)])) as FaultFigures["p50"];
    return { fault, trials: mine.length, p50: at(50), p95: at(95), lost: mine.reduce((n, r) => n + r.smtp.lost.length, 0), duplicated: mine.reduce((n, r) => n + r.smtp.duplicated.length, 0) };
  });
}

export function byFaultRows(rs: readonly TrialResult[]): string[][] {
  const pair = (f: FaultFigures, k: keyof FaultFigures["p50"]) => `${ms(f.p50[k])} / ${ms(f.p95[k])}`;
  return [
    ["fault", "trials", "detection p50 / p95", "takeover p50 / p95", "SMTP outage p50 / p95", "IMAP outage p50 / p95", "POP3 outage p50 / p95", "lost", "duplicated"],
    ...byFault(rs).map((f) => [f.fault, String(f.trials), pair(f, "detectionMs"), pair(f, "takeoverMs"), pair(f, "smtpOutageMs"), pair(f, "imapOutageMs"), pair(f, "pop3OutageMs"), String(f.lost), String(f.duplicated)]),
  ];
}

const BAR_WIDTH = 24;

/** One line: a bar for the traffic phase, then what the clients have done so far. */
export function progressLine(p: TrialProgress): string {
  const done = Math.min(1, p.elapsedMs / p.durationMs);
  const bar = p.phase === "traffic" ? `[${"#".repeat(Math.round(done * BAR_WIDTH)).padEnd(BAR_WIDTH, ".")}] ${(Math.min(p.elapsedMs, p.durationMs) / 1000).toFixed(0).padStart(3)}/${p.durationMs / 1000} s` : `[${p.phase}]`.padEnd(BAR_WIDTH + 2 + 8);
  const pop = p.pop3.ops ? `  pop3 ${p.pop3.ops} ops, ${p.pop3.failures} failed` : "";
  return `${bar}  smtp ${p.acked}/${p.sent} acked  imap ${p.imap.ops} ops, ${p.imap.failures} failed${pop}${p.fault ? `  | ${p.fault}` : ""}`;
}
