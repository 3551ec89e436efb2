// The failover benchmark: repeated power losses of the active node in a lab of its
// own; detection (kill -> the survivor declares the peer dead) and takeover (kill ->
// the survivor is active) from the cluster event logs, median and p95, printed beside
// the configured keepalive and deadtime.
import { rmSync } from "node:fs";
import { dirname } from "node:path";
import { sleep } from "../../common/exec.ts";
import { mailha } from "../helpers/cli.ts";
import { config, fault, firstEvent, msBetween, status, waitNode } from "../helpers/cluster.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";
import { writeSection } from "./report.ts";

const KILLS = Number(process.env.BENCH_KILLS ?? 10);

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!;
}

export async function runFailoverBench(): Promise<void> {
  const lab = writeTestLabConfig("fb", 93);
  const detection: number[] = [];
  const takeover: number[] = [];
  try {
    const up = await mailha(["lab", "up", "--config", lab.configFile]);
    if (up.code !== 0) throw new Error(`lab up failed: ${up.stderr}`);
    const c = config(lab);
    for (let i = 0; i < KILLS; i++) {
      const active = (await status(lab, "a"))?.state === "active" ? "a" : "b";
      const survivor = active === "a" ? "b" : "a";
      const { at } = await fault(lab, "kill-node", active);
      await waitNode(lab, survivor, "taking over", (s) => s.state === "active", 60_000);
      const dead = firstEvent(lab, survivor, at, (e) => e.type === "peer" && e.state === "dead");
      const act = firstEvent(lab, survivor, at, (e) => e.type === "state" && e.state === "active");
      if (!dead || !act) throw new Error("events missing");
      detection.push(msBetween(at, dead.time) / 1000);
      takeover.push(msBetween(at, act.time) / 1000);
      process.stderr.write(`- kill ${i + 1}/${KILLS} of ${active}: detection ${detection.at(-1)} s, takeover ${takeover.at(-1)} s\n`);
      await fault(lab, "boot-node", active);
      await waitNode(lab, active, "rejoining in sync", (s) => s.state === "passive" && s.volume?.connection === "connected" && s.volume.disk === "uptodate", 120_000);
      await sleep(1000);
    }
    const lines = [
      `failover.keepalive ${c.timers.keepalive_ms / 1000} s`,
      `failover.deadtime ${c.timers.deadtime_ms / 1000} s`,
      `failover.witness_lease ${(c.quorum.witness?.lease_ms ?? 0) / 1000} s`,
      `failover.kills ${KILLS} count`,
      `failover.detection.p50 ${pct(detection, 50).toFixed(2)} s`,
      `failover.detection.p95 ${pct(detection, 95).toFixed(2)} s`,
      `failover.takeover.p50 ${pct(takeover, 50).toFixed(2)} s`,
      `failover.takeover.p95 ${pct(takeover, 95).toFixed(2)} s`,
    ];
    for (const l of lines) console.log(l);
    writeSection("failover", [
      `Command: \`npm run bench -- failover\` (run ${new Date().toISOString().slice(0, 10)}, ${KILLS} power losses of the active node, alternating; lab timers keepalive ${c.timers.keepalive_ms} ms, deadtime ${c.timers.deadtime_ms} ms, witness lease ${c.quorum.witness?.lease_ms} ms, fencing ${c.fencing.agent}).`,
      "Detection: from the kill to the survivor declaring its peer dead. Takeover: from the kill to the survivor active (volume promoted, ext4 checked and mounted, MariaDB, Redis and Dovecot started). Targets: detection at most 1 s, takeover at most 5 s.",
      "",
      "| figure | p50 | p95 |",
      "|---|---|---|",
      `| detection | ${pct(detection, 50).toFixed(2)} s | ${pct(detection, 95).toFixed(2)} s |`,
      `| takeover | ${pct(takeover, 50).toFixed(2)} s | ${pct(takeover, 95).toFixed(2)} s |`,
      "",
      "```",
      ...lines,
      "```",
    ]);
  } finally {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  }
}
