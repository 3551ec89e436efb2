// The daemon runner: starts an external server (MariaDB, Redis, Dovecot, BIND...) as a
// detached child in its own session, waits for it to answer within a bound, and stops
// it by PID with SIGTERM, then SIGKILL after a bound. A start that fails reports the
// tail of the daemon's log. PIDs are checked against the process start time recorded
// at launch, so a reused PID is never signalled.
import { spawn } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { dirname } from "node:path";
import { sleep } from "./exec.ts";
import { firstProblem, isObject } from "./fsutil.ts";
import { processGroupMembers, signalAll } from "./procs.ts";

export interface DaemonSpec {
  /** Human name, e.g. "mariadb@a". */
  readonly name: string;
  readonly command: string;
  readonly args: readonly string[];
  /** Run inside this network namespace (nsenter --net, so host mounts stay shared). */
  readonly netns?: string;
  readonly env?: NodeJS.ProcessEnv;
  readonly cwd?: string;
  /** Where the daemon's stdout and stderr go (appended). */
  readonly logFile: string;
  /** Other log files worth showing when the start fails (e.g. MariaDB's error log). */
  readonly extraLogs?: readonly string[];
  /** True once the daemon answers. Must itself be quick; it is polled. */
  readonly ready: () => Promise<boolean>;
  readonly readyTimeoutMs: number;
  readonly stopTimeoutMs: number;
  /** Polled while waiting for readiness: true kills the daemon and fails the start at once. */
  readonly shouldAbort?: () => boolean;
}

/** What is kept about a started daemon so that any later process can stop it. */
export interface DaemonRecord {
  readonly name: string;
  readonly pid: number;
  /** Field 22 of /proc/PID/stat at launch: guards against PID reuse. */
  readonly startTicks: string;
  readonly argv: readonly string[];
  readonly logFile: string;
  readonly stopTimeoutMs: number;
}

/** What is wrong with a DaemonRecord read back from a file (null: nothing). */
export function daemonRecordProblem(v: unknown): string | null {
  if (!isObject(v)) return "not an object";
  return firstProblem(
    typeof v.name === "string" ? null : "no name",
    Number.isInteger(v.pid) && (v.pid as number) > 0 ? null : "no pid",
    typeof v.startTicks === "string" ? null : "no startTicks",
    Array.isArray(v.argv) && v.argv.every((a) => typeof a === "string") ? null : "no argv",
    typeof v.logFile === "string" ? null : "no logFile",
    typeof v.stopTimeoutMs === "number" ? null : "no stopTimeoutMs",
  );
}

/** At most this many /proc entries are read by findRunningDaemon. */
const PROCS_SCANNED_MAX = 100_000;

/**
 * The live process that runs SPEC (its arguments after the program are SPEC's), as a
 * record, or null: rebuilds a daemon record whose file was lost or damaged. nsenter
 * execs the program, so in the lab the PID is the same.
 */
export function findRunningDaemon(spec: Pick<DaemonSpec, "name" | "args" | "logFile" | "stopTimeoutMs">): DaemonRecord | null {
  const want = spec.args.join("\0");
  for (const d of readdirSync("/proc").slice(0, PROCS_SCANNED_MAX)) {
    if (!/^\d+$/.test(d) || Number(d) === process.pid) continue;
    let argv: string[];
    try {
      argv = readFileSync(`/proc/${d}/cmdline`, "utf8").replace(/\0$/, "").split("\0");
    } catch {
      continue;
    }
    if (argv.slice(1).join("\0") !== want) continue;
    const pid = Number(d);
    const startTicks = startTicksOf(pid);
    if (startTicks === null || procState(pid) === "Z") continue;
    return { name: spec.name, pid, startTicks, argv, logFile: spec.logFile, stopTimeoutMs: spec.stopTimeoutMs };
  }
  return null;
}

export class DaemonStartError extends Error {
  constructor(name: string, reason: string, readonly logTail: string) {
    super(`${name} did not start: ${reason}${logTail ? `\n--- last lines of its log ---\n${logTail}` : ""}`);
    this.name = "DaemonStartError";
  }
}

const LOG_TAIL_LINES = 25;
const LOG_TAIL_BYTES_MAX = 16 * 1024;
const POLL_MS = 50;

/** Starts the daemon and resolves once `ready()` is true; kills it and throws otherwise. */
export async function startDaemon(spec: DaemonSpec): Promise<DaemonRecord> {
  mkdirSync(dirname(spec.logFile), { recursive: true });
  const argv = spec.netns ? ["nsenter", `--net=/run/netns/${spec.netns}`, "--", spec.command, ...spec.args] : [spec.command, ...spec.args];
  const fd = openSync(spec.logFile, "a");
  let exited: string | null = null;
  let child;
  try {
    child = spawn(argv[0]!, argv.slice(1), { detached: true, stdio: ["ignore", fd, fd], env: spec.env ?? process.env, cwd: spec.cwd });
  } finally {
    closeSync(fd);
  }
  child.on("error", (err) => (exited = `could not run ${argv[0]}: ${err.message}`));
  child.on("exit", (code, signal) => (exited = signal ? `exited on signal ${signal}` : `exited with code ${code}`));
  child.unref();
  const pid = child.pid;
  const record = pid ? { name: spec.name, pid, startTicks: startTicksOf(pid) ?? "", argv, logFile: spec.logFile, stopTimeoutMs: spec.stopTimeoutMs } : null;
  const deadline = Date.now() + spec.readyTimeoutMs;
  for (;;) {
    if (exited || !record) throw new DaemonStartError(spec.name, exited ?? "no pid", logTail(spec));
    if (spec.shouldAbort?.()) {
      await killDaemon(record);
      throw new DaemonStartError(spec.name, "start aborted (the group is being stopped or fenced)", "");
    }
    let ok = false;
    try {
      ok = await spec.ready();
    } catch {
      ok = false;
    }
    if (ok) return record;
    if (Date.now() >= deadline) {
      await stopDaemon(record);
      throw new DaemonStartError(spec.name, `not ready after ${spec.readyTimeoutMs} ms`, logTail(spec));
    }
    await sleep(POLL_MS);
  }
}

export type StopOutcome = "absent" | "stopped" | "killed";

/**
 * Stops the daemon by PID: SIGTERM, wait up to its bound, then SIGKILL. Whatever is
 * left of its process group afterwards (children of a killed master, e.g. Dovecot's
 * imap processes, which would keep the volume busy) is killed too.
 */
export async function stopDaemon(rec: DaemonRecord, timeoutMs = rec.stopTimeoutMs): Promise<StopOutcome> {
  if (!isAlive(rec)) {
    await killGroupLeftovers(rec.pid);
    return "absent";
  }
  signal(rec.pid, "SIGTERM");
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!isAlive(rec)) {
      await killGroupLeftovers(rec.pid);
      return "stopped";
    }
    await sleep(POLL_MS);
  }
  await killDaemon(rec);
  return "killed";
}

/** SIGKILL to the daemon and everything left in its process group; waits (bounded) until they are gone. */
export async function killDaemon(rec: Pick<DaemonRecord, "pid" | "startTicks">): Promise<void> {
  if (isAlive(rec)) signal(rec.pid, "SIGKILL");
  for (let i = 0; i < 100 && isAlive(rec); i++) await sleep(POLL_MS);
  await killGroupLeftovers(rec.pid);
}

/** The daemon was started in its own session, so its PID is its process group's id. */
async function killGroupLeftovers(pgid: number): Promise<void> {
  for (let round = 0; round < 40; round++) {
    const left = await processGroupMembers(pgid);
    if (left.length === 0) return;
    signalAll(left, "SIGKILL");
    await sleep(POLL_MS);
  }
}

/** True while the recorded process (same PID and start time) exists and is not a zombie. */
export function isAlive(rec: Pick<DaemonRecord, "pid" | "startTicks">): boolean {
  const ticks = startTicksOf(rec.pid);
  if (ticks === null) return false;
  if (rec.startTicks && ticks !== rec.startTicks) return false;
  return procState(rec.pid) !== "Z";
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

function statFields(pid: number): string[] | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // comm (field 2) may hold spaces; fields after the last ')' are fixed.
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  } catch {
    return null;
  }
}

/** Process start time in clock ticks since boot, or null when there is no such process. */
export function startTicksOf(pid: number): string | null {
  return statFields(pid)?.[19] ?? null;
}

function procState(pid: number): string | null {
  return statFields(pid)?.[0] ?? null;
}

/** The last lines of the daemon's own output and its extra logs. */
function logTail(spec: DaemonSpec): string {
  const parts: string[] = [];
  for (const f of [spec.logFile, ...(spec.extraLogs ?? [])]) {
    if (!existsSync(f)) continue;
    const size = statSync(f).size;
    if (size === 0) continue;
    const len = Math.min(size, LOG_TAIL_BYTES_MAX);
    const buf = Buffer.alloc(len);
    const fd = openSync(f, "r");
    try {
      readSync(fd, buf, 0, len, size - len);
    } finally {
      closeSync(fd);
    }
    const lines = buf.toString("utf8").trimEnd().split("\n").slice(-LOG_TAIL_LINES);
    parts.push(`[${f}]\n${lines.join("\n")}`);
  }
  return parts.join("\n");
}
