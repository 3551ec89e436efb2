// The operator's own faults for `mailha failover-test` on real nodes: the inject and
// recover commands from mailha.yaml run with the target in the environment, a
// failing or hanging command is reported with its output, and the lab's faults are
// refused on a cluster that is not a lab.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseDocument } from "yaml";
import { parseConfig } from "../../common/config.ts";
import { availableFaults, faultPlan } from "../../ops/failover/faults.ts";
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
