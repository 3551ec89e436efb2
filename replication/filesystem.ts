// The filesystem step on top of the exported volume: attach the FUSE file to a loop
// device (direct I/O, so the page cache is not doubled), replay the ext4 journal with
// `fsck -p`, mount; and the reverse. Run by the operator's command or the resource
// manager, never by the engine (which must not touch the file system it serves).
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, unlinkSync } from "node:fs";
import { DamagedStateFileError, firstProblem, isObject, readJsonState, writeFileDurable } from "../common/fsutil.ts";
import { join } from "node:path";
import { run, sleep, tryRun } from "../common/exec.ts";
import { processesUsing, signalAll, type ProcessInfo } from "../common/procs.ts";

export interface FsState {
  readonly loop: string;
  readonly file: string;
  readonly mountpoint: string;
}

function stateFile(stateDir: string): string {
  return join(stateDir, "run", "filesystem.json");
}

function fsStateProblem(v: unknown): string | null {
  if (!isObject(v)) return "not an object";
  return firstProblem(...(["loop", "file", "mountpoint"] as const).map((k) => (typeof v[k] === "string" ? null : `no ${k}`)));
}

/** The device mounted on MOUNTPOINT, from /proc/self/mounts, or null. */
function mountedDevice(mountpoint: string): string | null {
  const line = readFileSync("/proc/self/mounts", "utf8").split("\n").find((l) => l.split(" ")[1] === mountpoint);
  return line ? line.split(" ")[0]! : null;
}

/**
 * Which loop device holds the mount, as the mount step recorded it; a damaged record
 * is rebuilt from what is mounted on MOUNTPOINT (with a warning on stderr), or dropped.
 */
export function readFsState(stateDir: string, mountpoint?: string): FsState | null {
  const f = stateFile(stateDir);
  try {
    return readJsonState<FsState>(f, fsStateProblem, "rebuilt from /proc/self/mounts");
  } catch (err) {
    if (!(err instanceof DamagedStateFileError)) throw err;
    const dev = mountpoint ? mountedDevice(mountpoint) : null;
    const st = dev?.startsWith("/dev/loop") ? { loop: dev, file: "", mountpoint: mountpoint! } : null;
    if (st) writeFileDurable(f, JSON.stringify(st), 0o644);
    else unlinkSync(f);
    process.stderr.write(`mailha: warning: ${f} was damaged (${err.problem}); ${st ? `rebuilt: ${st.loop} is mounted on ${st.mountpoint}` : "removed: nothing of it is mounted"}\n`);
    return st;
  }
}

export function isMounted(mountpoint: string): boolean {
  return readFileSync("/proc/self/mounts", "utf8").split("\n").some((l) => l.split(" ")[1] === mountpoint);
}

export interface MountResult extends FsState {
  readonly created: boolean;
  readonly fsck: string;
}

/** Loop + (mkfs when the volume is brand new) + fsck -p + mount. */
export async function mountVolume(stateDir: string, file: string, mountpoint: string, opts: { mkfsIfBlank: boolean }): Promise<MountResult> {
  if (isMounted(mountpoint)) throw new Error(`${mountpoint} is already mounted`);
  if (!existsSync(file)) throw new Error(`${file} does not exist: is this node primary (mailha volume primary)?`);
  const loop = (await run("losetup", ["--find", "--show", "--direct-io=on", file])).stdout.trim();
  try {
    const type = (await tryRun("blkid", ["-o", "value", "-s", "TYPE", loop]))?.stdout.trim() ?? "";
    let created = false;
    if (!type) {
      if (!opts.mkfsIfBlank) throw new Error(`no file system on the volume (${loop}); refusing to create one on a volume that has been written`);
      await run("mkfs.ext4", ["-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-L", "mailha", loop], { timeoutMs: 300_000 });
      created = true;
    } else if (type !== "ext4") throw new Error(`the volume holds a ${type} file system, not ext4`);
    let fsck = "clean";
    try {
      await run("fsck.ext4", ["-p", loop], { timeoutMs: 600_000 });
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      // 1: errors corrected; 2: corrected, reboot advised (not for a loop device).
      if (code === 1 || code === 2) fsck = "repaired";
      else throw new Error(`fsck -p found problems it cannot fix alone on ${loop}; run fsck.ext4 by hand: ${(err as Error).message}`);
    }
    mkdirSync(mountpoint, { recursive: true });
    await run("mount", ["-t", "ext4", "-o", "noatime", loop, mountpoint]);
    const st: FsState = { loop, file, mountpoint };
    writeFileDurable(stateFile(stateDir), JSON.stringify(st), 0o644);
    return { ...st, created, fsck };
  } catch (err) {
    await tryRun("losetup", ["-d", loop]);
    throw err;
  }
}

export interface UnmountOptions {
  /** Detach at once (the file system is already dead, or this node is fencing itself). */
  readonly lazy?: boolean;
  /**
   * When the file system is busy, stop the processes that hold it (SIGTERM, then
   * SIGKILL) and try again, as an HA file system agent's force_unmount does. Each
   * round's victims are reported.
   */
  readonly killHolders?: (victims: readonly ProcessInfo[], signal: NodeJS.Signals) => void;
}

const UNMOUNT_ROUNDS = 4;
const HOLDER_GRACE_MS = 1000;

/** Unmounts and detaches the loop device; lazily when the file system is already dead. */
export async function unmountVolume(stateDir: string, mountpoint: string, opts: UnmountOptions = {}): Promise<{ unmounted: boolean; detached: string | null }> {
  const st = readFsState(stateDir, mountpoint);
  let unmounted = false;
  for (let round = 0; isMounted(mountpoint); round++) {
    try {
      await run("umount", opts.lazy ? ["-l", mountpoint] : [mountpoint], { timeoutMs: 120_000 });
      unmounted = true;
      break;
    } catch (err) {
      if (!opts.killHolders || round >= UNMOUNT_ROUNDS - 1 || !/busy/i.test((err as Error).message)) throw err;
      const sig: NodeJS.Signals = round === 0 ? "SIGTERM" : "SIGKILL";
      const victims = await processesUsing(mountpoint);
      opts.killHolders(victims, sig);
      signalAll(victims, sig);
      await sleep(round === 0 ? HOLDER_GRACE_MS : 200);
    }
  }
  let detached: string | null = null;
  if (st?.loop) {
    if (await tryRun("losetup", ["-d", st.loop])) detached = st.loop;
  }
  if (existsSync(stateFile(stateDir))) unlinkSync(stateFile(stateDir));
  return { unmounted, detached };
}

export interface PreservedView {
  readonly mountpoint: string;
  readonly loop: string;
  /** Unmounts, detaches and removes the working image. */
  close(): Promise<void>;
}

/**
 * Mounts a preserved copy read-only for the reconciler or an operator. The copy is the
 * victim's image as it was, often after a power loss, so its ext4 journal may hold the
 * last changes; replaying it writes, and the copy itself is never written: the journal
 * is replayed on a working image beside it (`view/image`, sparse or a reflink, removed
 * by close()), which is then mounted read-only.
 */
export async function mountPreservedCopy(copyDir: string, mountpoint: string): Promise<PreservedView> {
  const image = join(copyDir, "image");
  if (!existsSync(image)) throw new Error(`${copyDir} is not a preserved copy (no image in it)`);
  if (isMounted(mountpoint)) throw new Error(`${mountpoint} is already mounted`);
  // One working image per mountpoint: two readers of the same copy (the victim's export
  // and an operator's look) never share one; a rerun at the same mountpoint reuses it.
  const viewDir = join(copyDir, `view-${createHash("sha256").update(mountpoint).digest("hex").slice(0, 12)}`);
  const work = join(viewDir, "image");
  mkdirSync(viewDir, { recursive: true, mode: 0o700 });
  await run("cp", ["--sparse=always", "--reflink=auto", image, work], { timeoutMs: 3_600_000 });
  const cleanup = async () => {
    await tryRun("rm", ["-rf", viewDir]);
  };
  try {
    try {
      await run("fsck.ext4", ["-p", work], { timeoutMs: 600_000 });
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      if (code !== 1 && code !== 2) throw new Error(`the preserved copy in ${copyDir} has a file system fsck -p cannot repair alone: ${(err as Error).message}`);
    }
    const loop = (await run("losetup", ["--find", "--show", "--read-only", work])).stdout.trim();
    try {
      mkdirSync(mountpoint, { recursive: true });
      await run("mount", ["-t", "ext4", "-o", "ro,noload", loop, mountpoint]);
    } catch (err) {
      await tryRun("losetup", ["-d", loop]);
      throw err;
    }
    return {
      mountpoint,
      loop,
      close: async () => {
        if (isMounted(mountpoint)) await run("umount", [mountpoint], { timeoutMs: 120_000 });
        await tryRun("losetup", ["-d", loop]);
        await cleanup();
      },
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

/** Unmounts what a dead process left mounted on MOUNTPOINT (a preserved view) and detaches its loop device. */
export async function unmountStale(mountpoint: string): Promise<boolean> {
  const line = readFileSync("/proc/self/mounts", "utf8").split("\n").find((l) => l.split(" ")[1] === mountpoint);
  if (!line) return false;
  const dev = line.split(" ")[0]!;
  await run("umount", [mountpoint], { timeoutMs: 120_000 });
  if (dev.startsWith("/dev/loop")) await tryRun("losetup", ["-d", dev]);
  return true;
}
