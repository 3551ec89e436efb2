// Runs the real `mailha` command as a child process, the way an operator would.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const BIN = join(ROOT, "ops", "bin", "mailha.mjs");

export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export function mailha(args: readonly string[], timeoutMs = 300_000): Promise<CliResult> {
  return runMailha(args, undefined, timeoutMs);
}

/** mailha() with INPUT on its standard input (a password for `user add`, say), then closed. */
export function mailhaWithInput(args: readonly string[], input: string, timeoutMs = 300_000): Promise<CliResult> {
  return runMailha(args, input, timeoutMs);
}

function runMailha(args: readonly string[], input: string | undefined, timeoutMs: number): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, stdio: [input === undefined ? "ignore" : "pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout!.on("data", (d) => (stdout += d));
    child.stderr!.on("data", (d) => (stderr += d));
    if (input !== undefined) {
      child.stdin!.on("error", () => {}); // a command that does not read its input
      child.stdin!.end(input);
    }
    const t = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(t);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

/** The path of the `mailha` program (for a test that runs it under script(1), say). */
export const MAILHA_BIN = BIN;
