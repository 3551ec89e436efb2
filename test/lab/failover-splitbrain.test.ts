// `mailha failover-test --fault split-brain`: real clients keep writing while the
// active node's replication link is cut, it writes alone and is killed, the passive
// node is forced to take over and writes alone, both heal, the old node is preserved
// and resynced and `mailha reconcile` merges its mail. Counted only after the merge:
// each side acknowledged mail while apart, none of it is lost, none is there twice. The
// spam filter is on (the default). A POP3 message both sides served while apart is one
// message under one UIDL (the Maildir base name, the same on both nodes).
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { mailha } from "../helpers/cli.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";
import type { TrialResult } from "../../ops/failover/trial.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;

describe("failover-test --fault split-brain", { skip }, () => {
  const lab = writeTestLabConfig("y", 119);

  before(async () => {
    const r = await mailha(["lab", "up", "--config", lab.configFile]);
    assert.equal(r.code, 0, `lab up failed:\n${r.stderr}`);
  });
  after(async () => {
    if (process.env.KEEP_LAB) return console.log(`lab kept: ${lab.configFile}`);
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });

  test("both sides acknowledge mail while apart; after the reconcile nothing is lost or doubled", async (t) => {
    const report = join(dirname(lab.configFile), "failover-report.html");
    const r = await mailha(["failover-test", "--fault", "split-brain", "--json", "--report", report, "--config", lab.configFile]);
    const doc = JSON.parse(r.stdout || "{}") as { results?: TrialResult[] };
    const res = doc.results?.[0];
    assert.ok(res, `no result (exit ${r.code}):\n${r.stderr.slice(-3000)}`);
    t.diagnostic(`split brain: ${JSON.stringify(res.splitBrain)}; smtp ${res.smtp.acked} acked, ${res.smtp.found} found; flags ${res.imap.flagsSet} set, ${res.imap.flagsLost} lost; notes: ${res.notes.join(" | ")}`);
    const sb = res.splitBrain;
    assert.ok(sb, "the result has the split brain");
    assert.deepEqual(sb.steps.map((s) => s.step).slice(-1), ["reconcile"], "the reconcile is the last step");
    assert.ok(sb.reconcile, "mailha reconcile ran");
    assert.ok(sb.ackedByOld > 0, `the old node ${sb.old} acknowledged mail while apart`);
    assert.ok(sb.ackedByNew > 0, `the new node ${sb.new} acknowledged mail while apart`);
    assert.ok((sb.reconcile?.applied ?? 0) >= 1, "the reconcile brought the old node's mail over");
    assert.deepEqual(res.smtp.lost, [], "no acknowledged message is lost");
    assert.deepEqual(res.smtp.duplicated, [], "no message is there twice");
    assert.ok(res.imap.uidValidityStable && res.imap.oldUidsStable, "UIDVALIDITY and the UIDs of older messages did not change");
    assert.ok(res.healthyAfter, "the cluster is healthy afterwards");
    for (const s of sb.steps) assert.ok(s.ok, `step "${s.label}" failed: ${s.detail}`);
    assert.ok(sb.reconcile.complete, `the reconcile is complete: ${JSON.stringify(sb.reconcile)}`);
    assert.equal(r.code, 0, `failover-test failed:\n${r.stderr.slice(-2000)}`);
  });
});
