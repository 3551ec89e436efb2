// Fencing agents behind one interface: make sure the peer runs nothing.
//   command: runs the configured command with the peer id; exit 0 means fenced. It
//            runs in a process group of its own; at the timeout the whole group gets
//            SIGTERM, then SIGKILL after FENCE_KILL_GRACE_MS, so no agent the shell
//            started is left running (and fencing later) after we gave up on it.
//   lab:     SIGKILLs every process in the peer's network namespace (power loss).
//   none:    cannot fence; the cluster then never takes over without a witness.
import { spawn } from "node:child_process";
import { run, sleep, tryRun } from "../common/exec.ts";
import { processGroupMembers, signalAll } from "../common/procs.ts";

export interface FenceResult {
  readonly ok: boolean;
  readonly detail: string;
}

export interface FenceAgent {
  readonly name: string;
  fence(peerId: string): Promise<FenceResult>;
}

/** After SIGTERM at the timeout, the fence command's group has this long before SIGKILL. */
export const FENCE_KILL_GRACE_MS = 1000;
const GROUP_POLL_MS = 50;
/** Rounds of SIGKILL while waiting for the group to be gone (a bound on a process stuck in D state). */
const GROUP_KILL_ROUNDS_MAX = 40;

/** SIGTERM to process group PGID, SIGKILL to what is left after the grace; resolves once it is empty (bounded). */
async function killGroup(pgid: number, graceMs: number): Promise<void> {
  const sig = (s: NodeJS.Signals) => {
    try {
      process.kill(-pgid, s);
    } catch {
      // the group is gone
    }
  };
  sig("SIGTERM");
  const deadline = Date.now() + graceMs;
  while (Date.now() < deadline) {
    if ((await processGroupMembers(pgid)).length === 0) return;
    await sleep(GROUP_POLL_MS);
  }
  sig("SIGKILL");
  for (let i = 0; i < GROUP_KILL_ROUNDS_MAX; i++) {
    const left = await processGroupMembers(pgid);
    if (left.length === 0) return;
    signalAll(left, "SIGKILL");
    await sleep(GROUP_POLL_MS);
  }
}

export function commandAgent(command: string, timeoutMs: number, graceMs = FENCE_KILL_GRACE_MS): FenceAgent {
  return {
    name: "command",
    fence: (peerId) =>
      new Promise((resolve) => {
        // detached: a session and process group of its own, whose id is the shell's pid.
        const child = spawn("/bin/sh", ["-c", `${command} "$1"`, "fence", peerId], { stdio: ["ignore", "pipe", "pipe"], detached: true });
        let out = "";
        let timedOut = false;
        child.stdout.on("data", (d) => (out += d));
        child.stderr.on("data", (d) => (out += d));
        const t = setTimeout(() => {
          timedOut = true;
          const pgid = child.pid;
          const detail = `fence command timed out after ${timeoutMs} ms; its process group was killed`;
          if (pgid === undefined) resolve({ ok: false, detail });
          else void killGroup(pgid, graceMs).then(() => resolve({ ok: false, detail }));
        }, timeoutMs);
        child.on("error", (err) => {
          clearTimeout(t);
          resolve({ ok: false, detail: `fence command could not run: ${err.message}` });
        });
        child.on("exit", (code) => {
          clearTimeout(t);
          if (timedOut) return;
          resolve({ ok: code === 0, detail: `fence command exited ${code}${out.trim() ? `: ${out.trim().slice(-300)}` : ""}` });
        });
      }),
  };
}

export function labAgent(netnsOf: (peerId: string) => string): FenceAgent {
  return {
    name: "lab",
    async fence(peerId) {
      const ns = netnsOf(peerId);
      const r = await tryRun("ip", ["netns", "pids", ns]);
      if (!r) return { ok: false, detail: `namespace ${ns} not found` };
      const pids = r.stdout.split(/\s+/).filter(Boolean).map(Number);
      for (const pid of pids) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // gone
        }
      }
      // Powered off: nothing may be left running there.
      for (let i = 0; i < 50; i++) {
        const left = (await run("ip", ["netns", "pids", ns])).stdout.trim();
        if (!left) return { ok: true, detail: `killed ${pids.length} process(es) in ${ns}` };
        await new Promise((res) => setTimeout(res, 100));
      }
      return { ok: false, detail: `processes survived SIGKILL in ${ns}` };
    },
  };
}

export function noneAgent(): FenceAgent {
  return { name: "none", fence: async () => ({ ok: false, detail: "no fencing agent configured" }) };
}
