// Fencing agents behind one interface: make sure the peer runs nothing.
//   command: runs the configured command with the peer id; exit 0 means fenced.
//   lab:     SIGKILLs every process in the peer's network namespace (power loss).
//   none:    cannot fence; the cluster then never takes over without a witness.
import { spawn } from "node:child_process";
import { run, tryRun } from "../common/exec.ts";

export interface FenceResult {
  readonly ok: boolean;
  readonly detail: string;
}

export interface FenceAgent {
  readonly name: string;
  fence(peerId: string): Promise<FenceResult>;
}

export function commandAgent(command: string, timeoutMs: number): FenceAgent {
  return {
    name: "command",
    fence: (peerId) =>
      new Promise((resolve) => {
        const child = spawn("/bin/sh", ["-c", `${command} "$1"`, "fence", peerId], { stdio: ["ignore", "pipe", "pipe"] });
        let out = "";
        child.stdout.on("data", (d) => (out += d));
        child.stderr.on("data", (d) => (out += d));
        const t = setTimeout(() => {
          child.kill("SIGKILL");
          resolve({ ok: false, detail: `fence command timed out after ${timeoutMs} ms` });
        }, timeoutMs);
        child.on("error", (err) => {
          clearTimeout(t);
          resolve({ ok: false, detail: `fence command could not run: ${err.message}` });
        });
        child.on("exit", (code) => {
          clearTimeout(t);
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
