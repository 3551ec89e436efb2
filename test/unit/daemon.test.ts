// The daemon runner: ready within a bound, a failed start shows the log's tail, stop
// escalates from SIGTERM to SIGKILL (and takes a killed master's children along), a
// recorded PID is never confused with another, and the holders of a directory are found.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DaemonStartError, isAlive, startDaemon, stopDaemon } from "../../common/daemon.ts";
import { processesUsing } from "../../common/procs.ts";

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

test("a start that is aborted while waiting for readiness kills the daemon at once", async () => {
  const pidFile = join(dir, "aborted.pid");
  let abort = false;
  setTimeout(() => (abort = true), 300);
  const t0 = Date.now();
  await assert.rejects(
    startDaemon({
      name: "aborted",
      command: "sh",
      args: ["-c", `echo $$ > ${pidFile}; exec sleep 60`],
      logFile: join(dir, "aborted.log"),
      ready: async () => false,
      readyTimeoutMs: 30_000,
      stopTimeoutMs: 10_000,
      shouldAbort: () => abort,
    }),
    /start aborted/,
  );
  assert.ok(Date.now() - t0 < 3000, "did not wait for the readiness bound");
  const pid = Number(readFileSync(pidFile, "utf8"));
  assert.equal(isAlive({ pid, startTicks: "" }), false, "the daemon is gone");
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

test("stopping a daemon also stops the children its killed master leaves behind", async () => {
  const flag = join(dir, "ready3");
  const pidFile = join(dir, "child.pid");
  // A master that ignores SIGTERM and has a worker child (like Dovecot's imap process
  // holding a mailbox open): after the stop neither may be left.
  const rec = await startDaemon({
    name: "master",
    command: "sh",
    args: ["-c", `trap '' TERM; sleep 60 & echo $! > ${pidFile}; touch ${flag}; while :; do sleep 0.1; done`],
    logFile: join(dir, "master.log"),
    ready: async () => existsSync(flag),
    readyTimeoutMs: 5000,
    stopTimeoutMs: 300,
  });
  const child = Number(readFileSync(pidFile, "utf8"));
  assert.ok(isAlive({ pid: child, startTicks: "" }), "the worker runs");
  assert.equal(await stopDaemon(rec), "killed");
  assert.equal(isAlive({ pid: child, startTicks: "" }), false, "the worker is gone too");
});

test("processesUsing finds who holds files under a directory", async () => {
  const sub = join(dir, "held");
  mkdirSync(sub);
  const p = spawn("sleep", ["30"], { cwd: sub, stdio: "ignore" });
  try {
    await new Promise((r) => setTimeout(r, 100));
    const holders = await processesUsing(sub);
    assert.deepEqual(holders.map((h) => h.pid), [p.pid]);
    assert.deepEqual(await processesUsing(join(dir, "nobody-here")), []);
  } finally {
    p.kill("SIGKILL");
  }
});
