// What /proc says about other processes: the members of a process group (a daemon's
// leftover children) and the processes holding files under a path (what keeps a file
// system busy). Read asynchronously and bounded, so a node daemon's heartbeats are
// never held up by a scan.
import { readdir, readFile, readlink } from "node:fs/promises";

const FDS_PER_PROCESS_MAX = 65_536;

export interface ProcessInfo {
  readonly pid: number;
  readonly name: string;
}

async function pids(): Promise<number[]> {
  return (await readdir("/proc")).filter((d) => /^\d+$/.test(d)).map(Number);
}

async function stat(pid: number): Promise<{ name: string; pgrp: number; zombie: boolean } | null> {
  try {
    const s = await readFile(`/proc/${pid}/stat`, "utf8");
    const rest = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return { name: s.slice(s.indexOf("(") + 1, s.lastIndexOf(")")), pgrp: Number(rest[2]), zombie: rest[0] === "Z" };
  } catch {
    return null;
  }
}

/**
 * The live processes of process group PGID (a daemon started in its own session leads
 * one). Zombies are left out: they hold nothing, and an orphan's zombie waits for
 * whoever reaps orphans here, which may be never.
 */
export async function processGroupMembers(pgid: number): Promise<ProcessInfo[]> {
  const out: ProcessInfo[] = [];
  for (const pid of await pids()) {
    const s = await stat(pid);
    if (s && s.pgrp === pgid && !s.zombie) out.push({ pid, name: s.name });
  }
  return out;
}

const under = (p: string, dir: string) => p === dir || p.startsWith(dir.endsWith("/") ? dir : `${dir}/`);

/** The processes whose cwd, root or an open file lies under DIR (like `fuser -m`, for one mount point). */
export async function processesUsing(dir: string): Promise<ProcessInfo[]> {
  const out: ProcessInfo[] = [];
  for (const pid of await pids()) {
    if (pid === process.pid) continue;
    const links: string[] = [];
    for (const l of ["cwd", "root", "exe"]) links.push(await readlink(`/proc/${pid}/${l}`).catch(() => ""));
    const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    for (const fd of fds.slice(0, FDS_PER_PROCESS_MAX)) links.push(await readlink(`/proc/${pid}/fd/${fd}`).catch(() => ""));
    if (links.some((l) => l && under(l, dir))) {
      const s = await stat(pid);
      out.push({ pid, name: s?.name ?? "?" });
    }
  }
  return out;
}

export function signalAll(ps: readonly ProcessInfo[], sig: NodeJS.Signals): void {
  for (const p of ps) {
    try {
      process.kill(p.pid, sig);
    } catch {
      // already gone
    }
  }
}
