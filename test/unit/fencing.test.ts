// The command fencing agent: at its timeout the whole process group it started is
// killed (the shell and every agent the shell started), SIGKILL when SIGTERM is
// ignored; a command that finishes reports its exit code and output.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { commandAgent } from "../../cluster/fencing.ts";

/** Live processes whose command line holds MARKER. */
function withMarker(marker: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = readFileSync(`/proc/${d}/cmdline`, "utf8");
      const state = readFileSync(`/proc/${d}/stat`, "utf8").split(") ")[1]?.[0];
      if (cmd.includes(marker) && state !== "Z") out.push(Number(d));
    } catch {
      // gone
    }
  }
  return out;
}

test("a fence command that hangs: after the timeout no process it started remains", async () => {
  const marker = `${1000 + (process.pid % 1000)}.25`; // sleep takes fractions: a number no one else sleeps
  const agent = commandAgent(`sh -c 'sleep ${marker} & sleep ${marker}'`, 300);
  const t0 = Date.now();
  const r = await agent.fence("b");
  assert.equal(r.ok, false);
  assert.match(r.detail, /timed out after 300 ms/);
  assert.deepEqual(withMarker(marker), [], `processes of the fence command are still running after its timeout: ${withMarker(marker).join(" ")}`);
  assert.ok(Date.now() - t0 < 3000, "the fence took far longer than its timeout");
});

test("a fence command that ignores SIGTERM is killed after the grace", async () => {
  const marker = `${2000 + (process.pid % 1000)}.25`;
  const agent = commandAgent(`trap '' TERM; sleep ${marker} & sleep ${marker}; :`, 200, 300);
  const r = await agent.fence("b");
  assert.equal(r.ok, false);
  assert.deepEqual(withMarker(marker), [], "a fence command that ignores SIGTERM survived the timeout");
});

test("a fence command that finishes reports its exit code and output", async () => {
  assert.deepEqual(await commandAgent("echo fenced", 5000).fence("b"), { ok: true, detail: "fence command exited 0: fenced b" });
  const bad = await commandAgent("echo no power switch >&2; exit 3;", 5000).fence("b");
  assert.equal(bad.ok, false);
  assert.match(bad.detail, /exited 3: no power switch/);
});
