// The operator's own faults for `mailha failover-test` on real nodes: the inject and
// recover commands from mailha.yaml run with the target in the environment, a
// failing or hanging command is reported with its output, and the lab's faults are
// refused on a cluster that is not a lab; the split-brain fault's steps, how they run,
// what counts as each side's acknowledgements and how the reconcile's result is read.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseDocument } from "yaml";
import { parseConfig } from "../../common/config.ts";
import type { NodeStatusView } from "../../cluster/client.ts";
import { availableFaults, faultPlan, reached, reconcileSummary, runSteps, splitAcks, splitBrainSteps, type FaultStepRecord } from "../../ops/failover/faults.ts";
import { ROOT } from "../helpers/cli.ts";

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "mailha-faults-"));
  for (const f of ["hb.key", "repl.secret", "tsig.key"]) writeFileSync(join(dir, f), 'key "k" { algorithm hmac-sha256; secret "AAAA"; };\n', { mode: 0o600 });
});
after(() => rmSync(dir, { recursive: true, force: true }));

function config(faults: Record<string, unknown>, lab = true) {
  const doc = parseDocument(readFileSync(join(ROOT, "examples", "lab.yaml"), "utf8"));
  doc.setIn(["heartbeat", "key_file"], join(dir, "hb.key"));
  doc.setIn(["volume", "secret_file"], join(dir, "repl.secret"));
  doc.setIn(["dns", "tsig_key_file"], join(dir, "tsig.key"));
  doc.setIn(["failover_test", "faults"], faults);
  if (!lab) doc.deleteIn(["lab"]);
  return parseConfig(doc.toString(), join(dir, "mailha.yaml"));
}
const opts = { freezeMs: 1000, service: "dovecot" as const };

test("an operator fault runs its inject and recover commands with the target in the environment", async () => {
  const out = join(dir, "fault.log");
  const c = config({ "pull-cable": { description: "unplug the active node", inject: `echo "in $MAILHA_TARGET_NODE $MAILHA_TARGET_ADDRESS $MAILHA_PEER_NODE" >> ${out}`, recover: `echo "out $MAILHA_TARGET_NODE" >> ${out}` } }, false);
  assert.ok(availableFaults(c).includes("pull-cable"));
  assert.ok(!availableFaults(c).includes("kill-node"), "lab faults are not offered on real nodes");
  const plan = faultPlan(c, c.file, "pull-cable", opts);
  assert.equal(plan.description, "unplug the active node");
  await plan.inject("b");
  await plan.recover();
  assert.equal(readFileSync(out, "utf8"), `in b ${c.nodes[1]!.service_address} a\nout b\n`);
});

test("a failing inject command is reported with its exit code and output; a hanging one is killed at its bound", async () => {
  const c = config({ broken: { inject: "echo 'no route to the hoster API' >&2; exit 3" }, hangs: { inject: "sleep 30", timeout_ms: 300 } }, false);
  await assert.rejects(faultPlan(c, c.file, "broken", opts).inject("a"), /exited with 3: no route to the hoster API/);
  const t0 = Date.now();
  await assert.rejects(faultPlan(c, c.file, "hangs", opts).inject("a"), /killed \(SIGKILL\) after 300 ms/);
  assert.ok(Date.now() - t0 < 5000);
});

test("lab faults need the lab; unknown faults are named with what is known", () => {
  const real = config({}, false);
  assert.throws(() => faultPlan(real, real.file, "kill-node", opts), /needs the lab; on real nodes define it under failover_test.faults/);
  assert.throws(() => faultPlan(real, real.file, "meteor", opts), /unknown fault "meteor" \(known here: switchover, failback, none\)/);
  const lab = config({});
  assert.ok(availableFaults(lab).includes("kill-service") && availableFaults(lab).includes("cut-links"));
});

test("split brain: cut, Outdated, writes on the old side, kill, failed, forced takeover, writes on the new side, boot, heal, resynced, reconcile", () => {
  const steps = splitBrainSteps("a", "b", 3000);
  assert.deepEqual(
    steps.map((s) => `${s.kind}${"args" in s ? ` ${s.args.join(" ")}` : ""}${"node" in s ? ` ${s.node}` : ""}${"until" in s ? ` ${s.until}` : ""}${"ms" in s ? ` ${s.ms}` : ""}`.trim()),
    ["cut-link a replication", "wait b outdated", "traffic 3000", "kill-node a", "wait b failed", "takeover b", "wait b active", "traffic 3000", "boot-node a", "heal", "wait a resynced", "reconcile b"],
  );
  const lab = config({});
  assert.ok(availableFaults(lab).includes("split-brain"));
  const plan = faultPlan(lab, lab.file, "split-brain", { ...opts, splitMs: 3000 });
  assert.match(plan.description, /forced to take over.*merges its mail by itself \(reconcile\.auto\)/);
  assert.deepEqual(splitBrainSteps("a", "b", 10, false).at(-1), { kind: "reconcile", label: "mailha reconcile", node: "b", auto: false });
  assert.deepEqual(plan.splitBrain, { old: null, new: null, log: [], reconcile: null });
  const real = config({}, false);
  assert.ok(!availableFaults(real).includes("split-brain"));
  assert.throws(() => faultPlan(real, real.file, "split-brain", opts), /needs the lab/);
});

test("split brain: each wait step's condition on the node's status", () => {
  const st = (state: string, volume: NodeStatusView["volume"]) => ({ state, volume }) as NodeStatusView;
  const vol = (connection: string, disk: string, outOfSyncBytes = 0) => ({ role: "secondary", connection, disk, outOfSyncBytes, peer: { disk: "uptodate" } });
  assert.ok(reached("outdated", st("passive", vol("standalone", "outdated"))));
  assert.ok(!reached("outdated", st("passive", vol("connected", "uptodate"))));
  assert.ok(reached("failed", st("failed", null)) && !reached("failed", st("passive", null)));
  assert.ok(reached("active", st("active", null)) && !reached("active", st("activating", null)));
  assert.ok(reached("resynced", st("passive", vol("connected", "uptodate"))));
  assert.ok(!reached("resynced", st("passive", vol("connected", "inconsistent", 4096))), "a resync still running");
  assert.ok(!reached("resynced", st("passive", vol("connected", "uptodate", 4096))));
  assert.ok(!reached("resynced", st("passive", vol("standalone", "uptodate"))));
  assert.ok(!reached("active", null), "a node that does not answer");
});

test("split brain: the steps run in order and are logged; the first failure ends the run and names its step", async () => {
  const steps = splitBrainSteps("b", "a", 10);
  const ran: string[] = [];
  const log: FaultStepRecord[] = [];
  const said: string[] = [];
  await assert.rejects(
    runSteps(steps, async (s) => {
      ran.push(s.kind);
      if (s.kind === "takeover") throw new Error("the peer answers");
      return s.kind === "wait" ? "after 0.1 s" : undefined;
    }, log, (l) => said.push(l)),
    /split-brain step "mailha takeover --force --node a" failed: the peer answers/,
  );
  assert.deepEqual(ran, ["cut-link", "wait", "traffic", "kill-node", "wait", "takeover"]);
  assert.deepEqual(log.map((r) => [r.step, r.ok]), [["cut-link", true], ["wait", true], ["traffic", true], ["kill-node", true], ["wait", true], ["takeover", false]]);
  assert.equal(log[1]!.detail, "after 0.1 s");
  assert.equal(log.at(-1)!.detail, "the peer answers");
  assert.ok(log.every((r) => r.end >= r.start));
  assert.equal(said[0], "cut the replication link of b");
});

test("split brain: acknowledgements count for the old side from the cut to the kill, for the new side from the kill to the boot", () => {
  const rec = (step: FaultStepRecord["step"], start: number): FaultStepRecord => ({ step, label: step, start, end: start + 1, ok: true });
  const log = [rec("cut-link", 100), rec("kill-node", 200), rec("takeover", 250), rec("boot-node", 300), rec("reconcile", 400)];
  const A = "10.0.0.1";
  const B = "10.0.0.2";
  const acks = [
    { host: A, at: 50 }, // before the split
    { host: A, at: 150 },
    { host: A, at: 199 },
    { host: B, at: 150 }, // b's backup MX before the kill: not the new side yet
    { host: B, at: 260 },
    { host: B, at: 299 },
    { host: B, at: 350 }, // after the heal
  ];
  assert.deepEqual(splitAcks(log, acks, A, B), { byOld: 2, byNew: 2 });
  assert.deepEqual(splitAcks([rec("cut-link", 100)], acks, A, B), { byOld: 0, byNew: 0 }, "no kill: nobody was apart");
});

test("split brain: `mailha reconcile --json` read in brief; no copy to reconcile is an error", () => {
  const json = JSON.stringify({ copy: "/x", dryRun: false, events: { victim: 12, survivor: 9, common: 0 }, plan: { ops: [{}, {}, {}] }, applied: 3, notApplied: [], seconds: 1.25, reportFile: "/r.json", complete: true });
  assert.deepEqual(reconcileSummary(json), { ops: 3, applied: 3, notApplied: 0, complete: true, seconds: 1.25, events: { victim: 12, survivor: 9 }, reportFile: "/r.json", incomplete: [] });
  const partial = reconcileSummary(JSON.stringify({ plan: { ops: [{}, {}], report: { entries: [{ rule: "message-existence/no-expunge", outcome: "stranded", says: "neither side has its file", user: "u@x" }, { rule: "flags/later-change-wins", outcome: "conflict", says: "-" }] } }, applied: 1, notApplied: [{ op: "add-message" }], complete: false, seconds: 2 }));
  assert.equal(partial.complete, false);
  assert.deepEqual(partial.incomplete, ["message-existence/no-expunge (u@x): neither side has its file"]);
  assert.equal(partial.notApplied, 1);
  assert.throws(() => reconcileSummary(JSON.stringify({ copy: null, says: "nothing to reconcile" })), /no preserved copy/);
});
