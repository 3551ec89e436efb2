// Commands on the servers over the system's OpenSSH client and the operator's own keys
// and ssh config (as Ansible does): a shell script as the remote command, its input
// (secrets, files) on the channel's stdin, never on a command line. Bounded: a connect
// timeout, a time limit per command, at most OUTPUT_MAX bytes kept of each stream.
import { spawn } from "node:child_process";

export interface SshTarget {
  /** What ssh connects to: an address or a Host of the ssh config. */
  readonly host: string;
  readonly user: string;
  /** An ssh config file (-F), e.g. the test machines'. */
  readonly configFile?: string;
}

export interface SshResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

const OUTPUT_MAX = 4 * 1024 * 1024;
export const SSH_CONNECT_TIMEOUT_S = 10;

/** The ssh argument list for TARGET (batch mode: never a password prompt). */
export function sshArgs(t: SshTarget): string[] {
  return [...(t.configFile ? ["-F", t.configFile] : []), "-o", "BatchMode=yes", "-o", `ConnectTimeout=${SSH_CONNECT_TIMEOUT_S}`, "-o", "ServerAliveInterval=10", "-l", t.user, t.host];
}

/** Runs the shell SCRIPT on TARGET (bash, as the remote command); INPUT is its stdin (secrets go there, never into the script). */
export function sshRun(t: SshTarget, script: string, o: { input?: string | Buffer; timeoutMs?: number } = {}): Promise<SshResult> {
  return new Promise((resolve) => {
    // The remote command: bash reading the script from an argument (quoted once for the remote shell).
    const child = spawn("ssh", [...sshArgs(t), `bash -c ${shellQuote(script)}`], { stdio: ["pipe", "pipe", "pipe"] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outBytes = 0;
    let errBytes = 0;
    child.stdout.on("data", (b: Buffer) => {
      if ((outBytes += b.length) <= OUTPUT_MAX) out.push(b);
    });
    child.stderr.on("data", (b: Buffer) => {
      if ((errBytes += b.length) <= OUTPUT_MAX) err.push(b);
    });
    const timer = setTimeout(() => child.kill("SIGKILL"), o.timeoutMs ?? 120_000);
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ code: 255, stdout: "", stderr: `ssh: ${e.message}` });
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? (signal ? 254 : 255), stdout: Buffer.concat(out).toString("utf8"), stderr: Buffer.concat(err).toString("utf8") + (signal ? `\n(killed: ${signal}, over the time limit)` : "") });
    });
    child.stdin.on("error", () => undefined);
    child.stdin.end(o.input ?? "");
  });
}

/** Copies a local FILE to PATH on TARGET (scp with the same options), mode MODE. */
export function scpTo(t: SshTarget, file: string, path: string, timeoutMs = 600_000): Promise<SshResult> {
  return new Promise((resolve) => {
    const args = [...(t.configFile ? ["-F", t.configFile] : []), "-o", "BatchMode=yes", "-o", `ConnectTimeout=${SSH_CONNECT_TIMEOUT_S}`, "-q", file, `${t.user}@${t.host.includes(":") ? `[${t.host}]` : t.host}:${path}`];
    const child = spawn("scp", args, { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (b: Buffer) => void (stderr.length < 65536 && (stderr += b.toString("utf8"))));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ code: 255, stdout: "", stderr: `scp: ${e.message}` });
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 255, stdout: "", stderr });
    });
  });
}

/** S as one word for a POSIX shell. */
export function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}
