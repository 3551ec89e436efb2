// The fault suite: seeded random trials of `mailha failover-test` over a lab of its
// own. The seed picks each trial's fault and timing and is printed, so a failing run
// can be replayed (FAULT_SEED=N). After every trial: no acknowledged message lost,
// UIDs stable, never two active nodes (from the event logs), cluster healthy again.
import assert from "node:assert/strict";
import { cpSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { loadConfig } from "../../common/config.ts";
import { SERVICES } from "../../ops/failover/faults.ts";
import { renderReport } from "../../ops/failover/report.ts";
import { runTrial, type TrialResult } from "../../ops/failover/trial.ts";
import { mailha } from "../helpers/cli.ts";
import { events } from "../helpers/cluster.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";
import { rng } from "../sim/volume-sim.ts";

/** The faults of the issue: power loss, freeze, either link, both links, one service, planned moves. */
export const SUITE_FAULTS = ["kill-node", "freeze-node", "cut-replication", "cut-links", "kill-service", "switchover", "failback"] as const;

/**
 * Intervals each node was active, from its event log. A node that lost power logs no
 * end: its interval ends at the kill (KILLS), or at its next start.
 */
function activeIntervals(lab: ReturnType<typeof writeTestLabConfig>, node: string, kills: readonly number[]): [number, number][] {
  const out: [number, number][] = [];
  let from: number | null = null;
  for (const e of events(lab, node)) {
    const t = new Date(e.time).getTime();
    if (e.type === "node-started" && from !== null) {
      const kill = kills.filter((k) => k >= from! && k <= t).sort((a, b) => a - b)[0];
      out.push([from, kill ?? t]);
      from = null;
    }
    if (e.type !== "state") continue;
    if (e.state === "activating") from ??= t;
    else if (e.prev === "deactivating" || e.state === "failed" || e.state === "stop-failed") {
      if (from !== null) out.push([from, t]);
      from = null;
    }
  }
  if (from !== null) {
    const kill = kills.filter((k) => k >= from!).sort((a, b) => a - b)[0];
    out.push([from, kill ?? Number.MAX_SAFE_INTEGER]);
  }
  return out;
}

/** Runs TRIALS seeded trials on a lab of the suite's own; writes the HTML report to REPORT (also when a trial fails). */
export async function runFaultSuite(seed: number, trials: number, log: (s: string) => void, report?: string): Promise<TrialResult[]> {
  const r = rng(seed);
  const lab = writeTestLabConfig("f", 103);
  const results: TrialResult[] = [];
  log(`fault suite: seed ${seed} (replay with FAULT_SEED=${seed}), ${trials} trial(s)`);
  try {
    const up = await mailha(["lab", "up", "--config", lab.configFile]);
    assert.equal(up.code, 0, `lab up failed: ${up.stderr}`);
    const c = loadConfig(lab.configFile);
    const kills: Record<string, number[]> = { a: [], b: [] };
    for (let i = 0; i < trials; i++) {
      const fault = SUITE_FAULTS[Math.floor(r() * SUITE_FAULTS.length)]!;
      const faultAfterMs = 2000 + Math.floor(r() * 3000);
      const freezeMs = 1000 + Math.floor(r() * 5000);
      const service = SERVICES[Math.floor(r() * SERVICES.length)]!;
      const detail = fault === "freeze-node" ? ` for ${freezeMs} ms` : fault === "kill-service" ? ` (${service})` : "";
      log(`trial ${i + 1}/${trials}: ${fault}${detail} after ${faultAfterMs} ms`);
      const res = await runTrial({
        config: c,
        configFile: lab.configFile,
        fault,
        faultOptions: { freezeMs, service },
        faultAfterMs,
        durationMs: faultAfterMs + 10_000,
        smtpEveryMs: 200,
        imapSessions: 2,
        imap: c.lab!.test_user,
        pop3: c.lab!.pop3_user ?? null,
        dnsServer: c.dns.server ?? null,
        say: log,
      });
      results.push(res);
      if ((fault === "kill-node" || fault === "freeze-node") && res.target && res.faultAt) kills[res.target]!.push(new Date(res.faultAt).getTime());
      log(`  acknowledged ${res.smtp.acked}, found ${res.smtp.found}, lost ${res.smtp.lost.length}, duplicated ${res.smtp.duplicated.length}; detection ${res.detectionMs ?? "-"} ms, takeover ${res.takeoverMs ?? "-"} ms; outages smtp ${res.smtp.outageMs} imap ${res.imap.outageMs} pop3 ${res.pop3?.outageMs ?? "-"} ms; flags lost ${res.imap.flagsLost}`);
      for (const n of res.notes) log(`  note: ${n}`);
      assert.deepEqual(res.smtp.lost, [], `seed ${seed} trial ${i + 1} (${fault}): acknowledged messages missing: ${res.smtp.lost.join(", ")}`);
      assert.ok(res.imap.uidValidityStable && res.imap.oldUidsStable, `seed ${seed} trial ${i + 1} (${fault}): UIDVALIDITY or older UIDs changed`);
      const [ia, ib] = [activeIntervals(lab, "a", kills.a!), activeIntervals(lab, "b", kills.b!)];
      for (const [a0, a1] of ia) for (const [b0, b1] of ib) assert.ok(a1 <= b0 || b1 <= a0, `seed ${seed} trial ${i + 1}: a and b were active at the same time`);
      const st = await mailha(["status", "--config", lab.configFile, "--json"]);
      const nodes = (JSON.parse(st.stdout) as { nodes: { state: string; volume: { connection: string } | null }[] }).nodes;
      assert.equal(nodes.filter((n) => n.state === "active").length, 1, `seed ${seed} trial ${i + 1}: not exactly one active node afterwards`);
      assert.ok(nodes.every((n) => n.volume?.connection === "connected"), `seed ${seed} trial ${i + 1}: the volume is not back in sync`);
    }
    return results;
  } finally {
    if (report && results.length) {
      mkdirSync(dirname(report), { recursive: true });
      writeFileSync(report, renderReport(results, { cluster: "fault suite", command: `FAULT_SEED=${seed} FAULT_TRIALS=${trials} npm run test:faults`, seed }));
      log(`report: ${report}`);
    }
    // FAULT_LOGS=DIR keeps every node's logs (event logs, daemon logs) for a post-mortem.
    if (process.env.FAULT_LOGS) {
      const logsOnly = (p: string) => {
        const parts = p.slice(lab.dir.length).split("/");
        return parts.length <= 2 || parts[2] === "log";
      };
      cpSync(lab.dir, process.env.FAULT_LOGS, { recursive: true, filter: logsOnly });
    }
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  }
}
