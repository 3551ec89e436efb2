// The resource group runner with stand-in agents: a kill requested during a start does
// not wait for the start to finish its slow resource, nor for a graceful stop of what
// it started (a self-fencing node must let go within its bound); a start that fails
// for its own reasons still stops what it started, in reverse order.
import { test } from "node:test";
import assert from "node:assert/strict";
import { pino } from "pino";
import { GroupRunner, type ResourceAgent, type ResourceContext } from "../../cluster/resources.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function harness(slowStartMs: number, failSecond = false) {
  const calls: string[] = [];
  const ctx = { log: pino({ level: "silent" }), forcePromote: false, overrideOutdated: false, abortRequested: false, daemons: new Map(), saveDaemons: () => {} } as unknown as ResourceContext;
  const agent = (name: string, layer: number, start: (c: ResourceContext) => Promise<void>): ResourceAgent => ({
    name, layer, startTimeoutMs: 60_000, stopTimeoutMs: 60_000, monitorTimeoutMs: 1000,
    start: async (c) => {
      calls.push(`start ${name}`);
      await start(c);
    },
    stop: async () => void calls.push(`stop ${name}`),
    monitor: async () => {},
    kill: async () => void calls.push(`kill ${name}`),
  });
  // The second resource waits like a daemon for readiness: polling, giving up on abort.
  const slow = async (c: ResourceContext) => {
    const until = Date.now() + slowStartMs;
    while (Date.now() < until) {
      if (c.abortRequested) throw new Error("start aborted");
      await sleep(20);
    }
    if (failSecond) throw new Error("would not start");
  };
  const agents = [agent("volume", 0, async () => {}), agent("db", 2, slow), agent("smtp", 3, async () => {})];
  return { calls, runner: new GroupRunner(agents, ctx, () => {}) };
}

test("a kill during a start runs at once: no waiting for the slow resource, no graceful stop", async () => {
  const { calls, runner } = harness(30_000);
  const started = runner.start(false);
  await sleep(100);
  const t0 = Date.now();
  runner.requestAbort();
  const killed = await runner.kill();
  assert.ok(Date.now() - t0 < 1000, `the kill took ${Date.now() - t0} ms`);
  assert.deepEqual(await started, { ok: false, error: "activation aborted" });
  assert.equal(killed.ok, true);
  assert.ok(!calls.some((c) => c.startsWith("stop ")), `no graceful stop before the kill: ${calls.join(", ")}`);
  assert.ok(!calls.includes("start smtp"), "nothing after the aborted resource starts");
  for (const r of ["volume", "db", "smtp"]) assert.ok(calls.includes(`kill ${r}`), `${r} killed`);
  assert.equal(runner.states.get("db"), "stopped");
});

test("a start that fails on its own stops what it started, in reverse order", async () => {
  const { calls, runner } = harness(50, true);
  const r = await runner.start(false);
  assert.equal(r.ok, false);
  assert.match(r.error ?? "", /db: would not start/);
  assert.deepEqual(calls, ["start volume", "start db", "stop volume"]);
  assert.equal(runner.states.get("db"), "failed");
});

test("a new start after an aborted one is not aborted", async () => {
  const { calls, runner } = harness(100);
  const first = runner.start(false);
  runner.requestAbort();
  await runner.kill();
  assert.equal((await first).ok, false);
  const second = await runner.start(false);
  assert.deepEqual(second, { ok: true });
  assert.ok(calls.filter((c) => c === "start smtp").length === 1);
});
