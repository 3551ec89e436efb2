// The volume benchmark: the same workloads on (a) ext4 on a plain loop file, (b) the
// replicated volume while disconnected, (c) replicating with protocol C to the peer's
// namespace, (d) the same with protocol A. Figures are ratios to (a) from this run.
// Two reference setups show what the architecture itself costs on this machine:
// (p) a FUSE passthrough (pwrite, fdatasync) and (r) a minimal protocol C over FUSE
// (the passthrough plus a peer process that fdatasyncs on every flush); see
// reference-export.ts.
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, fsyncSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { parseDocument } from "yaml";
import { run, sleep, tryRun } from "../../common/exec.ts";
import { mailha } from "../helpers/cli.ts";
import { writeSection } from "./report.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";
import { allocateFully } from "../../replication/store.ts";
import { deliveries, sequential } from "./workloads.ts";

const DELIVERIES = Number(process.env.BENCH_DELIVERIES ?? 1000);
const SEQ_BYTES = 64 * 1024 * 1024;
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const IMAGE_BYTES = 256 * 1024 * 1024;
const REFERENCE = join(dirname(fileURLToPath(import.meta.url)), "reference-export.ts");
const CHILD_START_MS = 30_000;
const SETTLE_MS = 3000;
const CHILD_STOP_MS = 5000;

type Setup = "a" | "p" | "r" | "b" | "c" | "d";
const SETUPS: readonly Setup[] = ["a", "p", "r", "b", "c", "d"];
const SETUP_NAMES: Record<Setup, string> = {
  a: "ext4 on a plain loop file",
  p: "reference: FUSE passthrough, not replicated",
  r: "reference: minimal protocol C over FUSE, peer on loopback",
  b: "volume, not connected",
  c: "volume, protocol C to the peer",
  d: "volume, protocol A to the peer",
};

interface Figures {
  deliveries: number;
  deliveriesDirFsync: number;
  seqMBps: number;
}

function best(f: () => number): number {
  let b = 0;
  for (let i = 0; i < ROUNDS; i++) b = Math.max(b, f());
  return b;
}

function measure(dir: string): Figures {
  return {
    deliveries: best(() => deliveries(dir, DELIVERIES, false)),
    deliveriesDirFsync: best(() => deliveries(dir, DELIVERIES, true)),
    seqMBps: best(() => sequential(dir, SEQ_BYTES)),
  };
}

/**
 * Between setups: the previous setup's images were just removed (the host file system
 * discards their blocks) and its writes may still be going out; the next setup starts
 * after a sync and a short pause so that it does not pay for them.
 */
async function settle(): Promise<void> {
  await run("sync", []);
  await sleep(SETTLE_MS);
}

/** Cleanup that must not hide the error that brought us here. */
function removeQuietly(dir: string): void {
  try {
    rmSync(dir, { recursive: true, force: true });
  } catch (err) {
    process.stderr.write(`could not remove ${dir}: ${(err as Error).message}\n`);
  }
}

/** ext4 (made as the volume's) on a loop device over FILE, measured. */
async function ext4OnLoop(file: string, mnt: string): Promise<Figures> {
  mkdirSync(mnt, { recursive: true });
  const loop = (await run("losetup", ["--find", "--show", "--direct-io=on", file])).stdout.trim();
  try {
    await run("mkfs.ext4", ["-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop], { timeoutMs: 300_000 });
    await run("mount", ["-t", "ext4", "-o", "noatime", loop, mnt]);
    try {
      return measure(mnt);
    } finally {
      if (!(await tryRun("umount", [mnt]))) await tryRun("umount", ["-l", mnt]);
    }
  } finally {
    await tryRun("losetup", ["-d", loop]);
  }
}

async function plainLoop(): Promise<Figures> {
  const base = mkdtempSync(join(tmpdir(), "mailha-bench-plain-"));
  try {
    const img = join(base, "image");
    // Allocated as the engine's image is by default (volume.allocation: full).
    const fd = openSync(img, "w", 0o600);
    try {
      allocateFully(fd, IMAGE_BYTES, img);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    return await ext4OnLoop(img, join(base, "mnt"));
  } finally {
    removeQuietly(base);
  }
}

/** Starts a reference-export.ts process; resolves with its first stdout line. */
function startReference(args: string[], started: ChildProcess[]): Promise<string> {
  const child = spawn(process.execPath, ["--import", "tsx", REFERENCE, ...args], { stdio: ["ignore", "pipe", "inherit"] });
  started.push(child);
  return new Promise((resolve, reject) => {
    let out = "";
    const t = setTimeout(() => reject(new Error(`reference ${args[0]} did not start within ${CHILD_START_MS} ms`)), CHILD_START_MS);
    child.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      const nl = out.indexOf("\n");
      if (nl >= 0) {
        clearTimeout(t);
        resolve(out.slice(0, nl));
      }
    });
    child.once("exit", (code) => {
      clearTimeout(t);
      reject(new Error(`reference ${args[0]} exited (${code}) before it was ready`));
    });
  });
}

/** Setup (p), or (r) with REPLICATED: ext4 on a loop over the reference FUSE export. */
async function reference(replicated: boolean): Promise<Figures> {
  const base = mkdtempSync(join(tmpdir(), "mailha-bench-ref-"));
  const started: ChildProcess[] = [];
  try {
    const port = replicated ? (await startReference(["peer", join(base, "peer-image"), String(IMAGE_BYTES)], started)).replace(/^port /, "") : null;
    await startReference(["export", join(base, "export"), join(base, "image"), String(IMAGE_BYTES), ...(port ? [port] : [])], started);
    return await ext4OnLoop(join(base, "export", "volume"), join(base, "mnt"));
  } finally {
    for (const c of started.reverse()) {
      if (c.exitCode !== null || c.signalCode !== null) continue;
      const gone = new Promise((r) => c.once("exit", r));
      c.kill("SIGTERM");
      const kill = setTimeout(() => c.kill("SIGKILL"), CHILD_STOP_MS);
      await gone;
      clearTimeout(kill);
    }
    await tryRun("umount", ["-l", join(base, "export")]);
    removeQuietly(base);
  }
}

async function cli(args: string[]): Promise<void> {
  const r = await mailha(args);
  if (r.code !== 0) throw new Error(`mailha ${args.join(" ")}: ${r.stderr}`);
}

async function waitStatus(config: string, node: string, pred: (s: { connection: string; unackedBytes: number; link: { up: boolean } }) => boolean): Promise<void> {
  for (let i = 0; i < 300; i++) {
    const r = await mailha(["volume", "status", "--config", config, "--node", node, "--json"]);
    if (r.code === 0 && pred(JSON.parse(r.stdout))) return;
    await sleep(200);
  }
  throw new Error(`volume on ${node} did not reach the expected state`);
}

/** Setups (b) and (c) with protocol C, or (d) with protocol A, on a lab of their own. */
async function volumeSetups(protocol: "A" | "C"): Promise<Partial<Record<Setup, Figures>>> {
  const lab = writeTestLabConfig(protocol === "C" ? "bc" : "bd", protocol === "C" ? 83 : 85);
  const doc = parseDocument(readFileSync(lab.configFile, "utf8"));
  doc.setIn(["volume", "protocol"], protocol);
  writeFileSync(lab.configFile, doc.toString());
  const out: Partial<Record<Setup, Figures>> = {};
  try {
    await cli(["lab", "up", "--no-services", "--config", lab.configFile]);
    const mnt = join(lab.dir, "a", "data");
    if (protocol === "C") {
      out.c = measure(mnt);
      await cli(["volume", "disconnect", "--config", lab.configFile, "--node", "a"]);
      await waitStatus(lab.configFile, "a", (s) => s.connection === "standalone");
      out.b = measure(mnt);
    } else out.d = measure(mnt);
  } finally {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  }
  return out;
}

export async function runVolumeBench(): Promise<void> {
  const command = "npm run bench -- volume";
  process.stderr.write(`volume benchmark: ${DELIVERIES} deliveries x ${ROUNDS} rounds (best), ${SEQ_BYTES / 1024 / 1024} MiB sequential, per setup\n`);
  const res: Partial<Record<Setup, Figures>> = {};
  process.stderr.write(`- (a) ${SETUP_NAMES.a}\n`);
  res.a = await plainLoop();
  await settle();
  process.stderr.write(`- (p) ${SETUP_NAMES.p}\n`);
  res.p = await reference(false);
  await settle();
  process.stderr.write(`- (r) ${SETUP_NAMES.r}\n`);
  res.r = await reference(true);
  await settle();
  process.stderr.write(`- (b), (c) ${SETUP_NAMES.b}; ${SETUP_NAMES.c}\n`);
  Object.assign(res, await volumeSetups("C"));
  await settle();
  process.stderr.write(`- (d) ${SETUP_NAMES.d}\n`);
  Object.assign(res, await volumeSetups("A"));
  const a = res.a!;
  const lines: string[] = [];
  const rows: string[][] = [];
  for (const s of SETUPS) {
    const f = res[s]!;
    lines.push(`volume.deliveries.${s} ${f.deliveries.toFixed(0)} per_s`);
    lines.push(`volume.deliveries_dirfsync.${s} ${f.deliveriesDirFsync.toFixed(0)} per_s`);
    lines.push(`volume.seq_write.${s} ${f.seqMBps.toFixed(1)} MiB_per_s`);
    if (s !== "a") {
      lines.push(`volume.deliveries.${s}_vs_plain ${(f.deliveries / a.deliveries).toFixed(2)} ratio`);
      lines.push(`volume.deliveries_dirfsync.${s}_vs_plain ${(f.deliveriesDirFsync / a.deliveriesDirFsync).toFixed(2)} ratio`);
      lines.push(`volume.seq_write.${s}_vs_plain ${(f.seqMBps / a.seqMBps).toFixed(2)} ratio`);
    }
    rows.push([
      `(${s}) ${SETUP_NAMES[s]}`,
      `${f.deliveries.toFixed(0)} (${(f.deliveries / a.deliveries).toFixed(2)})`,
      `${f.deliveriesDirFsync.toFixed(0)} (${(f.deliveriesDirFsync / a.deliveriesDirFsync).toFixed(2)})`,
      `${f.seqMBps.toFixed(0)} (${(f.seqMBps / a.seqMBps).toFixed(2)})`,
    ]);
  }
  for (const l of lines) console.log(l);
  writeSection("volume", [
    `Command: \`${command}\` (run ${new Date().toISOString().slice(0, 10)}, ${DELIVERIES} deliveries, best of ${ROUNDS} rounds per figure).`,
    "Deliveries: write 4 KiB into tmp/, fsync, rename into new/ (and fsync new/ in the second column). Sequential: 64 MiB written, then fsync. Each cell: the rate, and in brackets its ratio to (a) from the same run.",
    "(p) and (r) are references, not mailha (test/bench/reference-export.ts): the same ext4 and loop device over a fuse-native file that only does pwrite and fdatasync, and (r) that file plus a peer process that gets every write and fdatasyncs its copy on every flush. (r) is what protocol C costs on this machine before any of the engine's own work. Every image, (a)'s loop file included, is fully allocated (zeros written first), as the engine's are by default (`volume.allocation: full`).",
    "",
    "| setup | deliveries/s | deliveries+dir fsync/s | sequential MiB/s |",
    "|---|---|---|---|",
    ...rows.map((r) => `| ${r.join(" | ")} |`),
    "",
    "```",
    ...lines,
    "```",
  ]);
}
