// The daemon runner: ready within a bound, a failed start shows the log's tail, stop
// escalates from SIGTERM to SIGKILL, and a recorded PID is never confused with another.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DaemonStartError, isAlive, startDaemon, stopDaemon } from "../../common/daemon.ts";

const dir = mkdtempSync(join(tmpdir(), "mailha-daemon-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

test("starts, reports ready, stops with SIGTERM", async () => {
  const flag = join(dir, "ready1");
  const rec = await startDaemon({
    name: "sleeper",
    command: "sh",
    args: ["-c", `touch ${flag}; exec sleep 60`],
    logFile: join(dir, "sleeper.log"),
    ready: async () => existsSync(flag),
    readyTimeoutMs: 5000,
    stopTimeoutMs: 2000,
  });
  assert.ok(isAlive(rec));
  assert.equal(await stopDaemon(rec), "stopped");
  assert.equal(isAlive(rec), false);
  assert.equal(await stopDaemon(rec), "absent", "stopping twice is harmless");
});

test("a daemon that exits at once fails with the tail of its log", async () => {
  await assert.rejects(
    startDaemon({
      name: "broken",
      command: "sh",
      args: ["-c", "echo 'fatal: cannot open /nonexistent/config' >&2; exit 3"],
      logFile: join(dir, "broken.log"),
      ready: async () => false,
      readyTimeoutMs: 5000,
      stopTimeoutMs: 1000,
    }),
    (err: unknown) => err instanceof DaemonStartError && /exited with code 3/.test(err.message) && /cannot open \/nonexistent\/config/.test(err.message),
  );
});

test("a daemon that never gets ready is killed after the bound", async () => {
  const t0 = Date.now();
  await assert.rejects(
    startDaemon({
      name: "slow",
      command: "sleep",
      args: ["60"],
      logFile: join(dir, "slow.log"),
      ready: async () => false,
      readyTimeoutMs: 400,
      stopTimeoutMs: 1000,
    }),
    /not ready after 400 ms/,
  );
  assert.ok(Date.now() - t0 < 5000);
});

test("a daemon that ignores SIGTERM is killed after its stop bound", async () => {
  const flag = join(dir, "ready2");
  const rec = await startDaemon({
    name: "stubborn",
    command: "sh",
    args: ["-c", `trap '' TERM; touch ${flag}; while :; do sleep 0.1; done`],
    logFile: join(dir, "stubborn.log"),
    ready: async () => existsSync(flag),
    readyTimeoutMs: 5000,
    stopTimeoutMs: 300,
  });
  assert.equal(await stopDaemon(rec), "killed");
  assert.equal(isAlive(rec), false);
});

test("a record whose PID now belongs to another process is not alive", () => {
  assert.equal(isAlive({ pid: process.pid, startTicks: "1" }), false);
  assert.equal(isAlive({ pid: process.pid, startTicks: "" }), true);
});
