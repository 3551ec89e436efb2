// Runs short external commands (ip, losetup, dig, tsig-keygen...) with a time bound,
// and turns their failures into errors that quote the command and its stderr.
import { execFile } from "node:child_process";

export interface RunOptions {
  readonly timeoutMs?: number;
  readonly input?: string;
  readonly env?: NodeJS.ProcessEnv;
  readonly cwd?: string;
}

export interface RunResult {
  readonly stdout: string;
  readonly stderr: string;
}

export class CommandError extends Error {
  constructor(
    readonly argv: readonly string[],
    readonly code: number | string | null,
    readonly stderr: string,
  ) {
    super(`command failed (${code}): ${argv.join(" ")}${stderr.trim() ? `\n${stderr.trim().split("\n").slice(-10).join("\n")}` : ""}`);
    this.name = "CommandError";
  }
}

const DEFAULT_TIMEOUT_MS = 30_000;

/** Runs `cmd args`; rejects with CommandError on a non-zero exit or timeout. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      cmd,
      args,
      { timeout: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS, maxBuffer: 16 * 1024 * 1024, env: opts.env, cwd: opts.cwd, killSignal: "SIGKILL" },
      (err, stdout, stderr) => {
        if (err) {
          const e = err as NodeJS.ErrnoException & { killed?: boolean };
          const code = e.killed ? "timeout" : (typeof e.code === "number" || typeof e.code === "string" ? e.code : null);
          reject(new CommandError([cmd, ...args], code, String(stderr || e.message)));
        } else resolve({ stdout: String(stdout), stderr: String(stderr) });
      },
    );
    if (opts.input !== undefined) child.stdin?.end(opts.input);
  });
}

/** Like run(), but reports failure as `false` instead of throwing. */
export async function tryRun(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult | null> {
  try {
    return await run(cmd, args, opts);
  } catch {
    return null;
  }
}

/** Polls `probe` until it returns true or `timeoutMs` passes; a bounded wait. */
export async function waitFor(probe: () => Promise<boolean>, timeoutMs: number, intervalMs = 100): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (await probe()) return true;
    } catch {
      // not ready yet
    }
    if (Date.now() >= deadline) return false;
    await sleep(Math.min(intervalMs, Math.max(1, deadline - Date.now())));
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Runs `cmd args` and returns its exit code and output whatever the code (bounded by a timeout). */
export function runAll(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult & { code: number | null }> {
  return new Promise((resolve) => {
    const child = execFile(cmd, args, { timeout: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS, maxBuffer: 64 * 1024 * 1024, env: opts.env, cwd: opts.cwd, killSignal: "SIGKILL" }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as NodeJS.ErrnoException).code === "number" ? ((err as NodeJS.ErrnoException).code as unknown as number) : null) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
  });
}
