// Optional CPU profiling of a long-running daemon, for finding where a benchmark's CPU
// goes: with MAILHA_CPU_PROFILE=DIR set, the process profiles itself from start to exit
// and writes DIR/<name>-<pid>.cpuprofile (open it in Chrome's DevTools). Off by default.
import { mkdirSync, writeFileSync } from "node:fs";
import { Session } from "node:inspector";
import { join } from "node:path";

/** Starts profiling when MAILHA_CPU_PROFILE is set; returns a function that writes the profile. */
export function startCpuProfile(name: string): () => void {
  const dir = process.env.MAILHA_CPU_PROFILE;
  if (!dir) return () => {};
  const session = new Session();
  session.connect();
  session.post("Profiler.enable", () => session.post("Profiler.start"));
  let written = false;
  return () => {
    if (written) return;
    written = true;
    // post() answers synchronously while the session is connected in this thread.
    session.post("Profiler.stop", (err, res) => {
      if (err || !res) return;
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, `${name}-${process.pid}.cpuprofile`), JSON.stringify(res.profile));
    });
  };
}
