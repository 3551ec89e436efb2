// The failover test's figures and report: outages from client records, percentiles,
// and an HTML report that renders, checked in headless Chromium by looking at the
// screenshot's colours (outage shading only where clients failed, node states, the
// fault line).
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { longest, outages, percentile, type OpRecord } from "../../ops/failover/record.ts";
import { byFault } from "../../ops/failover/present.ts";
import { COLORS, renderReport } from "../../ops/failover/report.ts";
import type { TrialResult } from "../../ops/failover/trial.ts";
import { countColor, readPng, screenshot } from "../helpers/browser.ts";
import { mailha } from "../helpers/cli.ts";

const T0 = Date.UTC(2026, 10, 22, 3, 0, 0);

/** Client records every 200 ms for 12 s; failing between FAIL[0] and FAIL[1] (ms after T0). */
function ops(proto: OpRecord["proto"], fail: [number, number] | null): OpRecord[] {
  const out: OpRecord[] = [];
  for (let t = 0; t < 12_000; t += 200) {
    const bad = !!fail && t >= fail[0] && t < fail[1];
    out.push({ proto, op: "op", start: T0 + t, end: T0 + t + 50, ok: !bad, host: "10.0.0.1" });
  }
  return out;
}

function trial(fail: boolean): TrialResult {
  const o = [...ops("smtp", fail ? [4000, 5400] : null), ...ops("imap", fail ? [4000, 7000] : null), ...ops("pop3", null)];
  const fig = (p: OpRecord["proto"]) => {
    const ws = outages(o, p, T0 + 12_000);
    return { ops: o.filter((x) => x.proto === p).length, failures: o.filter((x) => x.proto === p && !x.ok).length, outageMs: longest(ws), outages: ws };
  };
  return {
    fault: fail ? "kill-node" : "none",
    description: "test",
    target: fail ? "a" : null,
    faultDetail: null,
    startedAt: T0,
    faultAt: fail ? T0 + 4000 : null,
    trafficEndAt: T0 + 12_000,
    detectionMs: fail ? 600 : null,
    takeoverMs: fail ? 3200 : null,
    activeAfter: fail ? "b" : "a",
    smtp: { ...fig("smtp"), sent: 60, acked: 53, found: 53, lost: [], duplicated: [] },
    imap: { ...fig("imap"), flagsSet: 40, flagsLost: 0, uidValidityStable: true, oldUidsStable: true },
    pop3: { ...fig("pop3"), acked: 20, retrieved: 20, lost: [], duplicated: [] },
    healthyAfter: true,
    notes: [],
    ok: true,
    timeline: {
      ops: o,
      initialStates: { a: "active", b: "passive" },
      events: fail
        ? [
            { time: T0 + 4600, node: "b", type: "peer", state: "dead" },
            { time: T0 + 4610, node: "b", type: "state", state: "activating" },
            { time: T0 + 7200, node: "b", type: "state", state: "active" },
          ]
        : [],
    },
  };
}

test("outages run from the first failed operation to the next successful one", () => {
  const o = ops("smtp", [1000, 2000]);
  const ws = outages(o, "smtp", T0 + 12_000);
  assert.equal(ws.length, 1);
  assert.equal(ws[0]!.from, T0 + 1000);
  assert.equal(ws[0]!.to, T0 + 2050, "ends with the first success after the failures");
  assert.deepEqual(outages(ops("smtp", null), "smtp", T0 + 12_000), []);
  assert.equal(outages(ops("smtp", [11_000, 13_000]), "smtp", T0 + 12_000)[0]!.to, T0 + 12_000, "an outage still going at the end lasts to the end");
});

test("percentiles by nearest rank, and figures per fault type", () => {
  assert.equal(percentile([5, 1, 3, 2, 4], 50), 3);
  assert.equal(percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], 95), 19);
  assert.equal(percentile([], 50), null);
  const f = byFault([trial(true), trial(true), trial(false)]);
  assert.deepEqual(f.map((x) => [x.fault, x.trials]), [["kill-node", 2], ["none", 1]]);
  assert.equal(f[0]!.p50.takeoverMs, 3200);
  assert.equal(f[0]!.p95.imapOutageMs, 3050);
});

const chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].some(existsSync);

test("the HTML report renders in headless Chromium: outages shaded where clients failed, states and the fault drawn", { skip: chromium ? false : "chromium is not installed (mailha setup installs it)" }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "mailha-report-"));
  try {
    const shots = [];
    for (const fail of [true, false]) {
      const html = join(dir, `${fail}.html`);
      writeFileSync(html, renderReport([trial(fail)], { cluster: "test", command: "mailha failover-test" }));
      await screenshot(html, join(dir, `${fail}.png`), 1200, 900);
      shots.push(readPng(join(dir, `${fail}.png`)));
    }
    const [bad, good] = shots as [ReturnType<typeof readPng>, ReturnType<typeof readPng>];
    assert.equal(bad.width, 1200);
    // 1.4 s of SMTP outage and 3 s of IMAP outage over 12 s on a ~970 px axis, lanes ~32 px high.
    assert.ok(countColor(bad, COLORS.outage) > 4000, `outage shading visible (${countColor(bad, COLORS.outage)} px)`);
    assert.ok(countColor(bad, COLORS.failed) > 200, "failed operations drawn");
    assert.ok(countColor(bad, COLORS.ok) > 2000, "successful operations drawn");
    assert.ok(countColor(bad, COLORS.active) > 3000, "active state drawn");
    assert.ok(countColor(bad, COLORS.down) > 1000, "the killed node is drawn down");
    assert.ok(countColor(bad, COLORS.fault) > 30, "the fault line drawn");
    assert.ok(countColor(good, COLORS.outage) < 300, `no outage shading without failures beyond the legend (${countColor(good, COLORS.outage)} px)`);
    assert.ok(countColor(good, COLORS.down) < 300, "no node drawn down without a kill (beyond the legend)");
  } finally {
    if (process.env.KEEP_REPORT) console.log(`report kept in ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
  }
});

test("mailha failover-test refuses bad arguments with exit 2 and says what is expected", async () => {
  const trials = await mailha(["failover-test", "--trials", "0"]);
  assert.equal(trials.code, 2);
  assert.match(trials.stderr, /--trials: expected a number from 1 to 1000, found "0"/);
  const service = await mailha(["failover-test", "--service", "nginx"]);
  assert.equal(service.code, 2);
  assert.match(service.stderr, /dovecot, mariadb, redis, smtp/);
});
