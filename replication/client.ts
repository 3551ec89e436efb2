// The client side of a node's volume engine, for the operator command, the lab and the
// cluster manager: where its files are, starting and stopping it as a daemon, asking it
// questions, waiting for a state.
import { existsSync, rmSync } from "node:fs";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import type { MailhaConfig } from "../common/config.ts";
import { daemonRecordProblem, findRunningDaemon, startDaemon, stopDaemon, isAlive, type DaemonRecord, type DaemonSpec } from "../common/daemon.ts";
import { UsageError } from "../common/errors.ts";
import { sleep } from "../common/exec.ts";
import type { LatencySummary } from "./latency.ts";
import { nodeNetns, nodePaths, nodeStateDir } from "../common/paths.ts";
import { controlCall } from "./control.ts";
import { DamagedStateFileError, readJsonState, writeFileDurable } from "../common/fsutil.ts";
import { removeCopy } from "./preserve.ts";
import { loadMetaFile, volumeFiles } from "./store.ts";
import type { Meta, PreservedCopy } from "./types.ts";
import { MAILHA_BIN } from "../common/self.ts";

/** Where the volume engine keeps its files (here, not in engine.ts: clients must not load the engine). */
export interface EnginePaths {
  readonly volumeDir: string;
  readonly exportDir: string;
  readonly controlSocket: string;
  readonly eventLog: string;
}

export function enginePaths(stateDir: string): EnginePaths {
  return {
    volumeDir: join(stateDir, "volume"),
    exportDir: join(stateDir, "volume-export"),
    controlSocket: join(stateDir, "run", "volume.sock"),
    eventLog: join(stateDir, "log", "volume-events.jsonl"),
  };
}

const BIN = MAILHA_BIN;

export interface VolumeContext {
  readonly config: MailhaConfig;
  readonly nodeId: string;
  readonly stateDir: string;
  readonly paths: EnginePaths;
  readonly netns: string | undefined;
  /** Where the file system on the volume is mounted: the node's data directory. */
  readonly mountpoint: string;
  readonly engineRecord: string;
}

/** The node this command acts for: --node, else the node whose address is local. */
export function resolveNode(c: MailhaConfig, node: string | undefined): string {
  if (node) {
    if (!c.nodes.some((n) => n.id === node)) throw new UsageError(`no node "${node}" in ${c.file} (nodes: ${c.nodes.map((n) => n.id).join(", ")})`);
    return node;
  }
  const local = new Set(Object.values(networkInterfaces()).flatMap((l) => (l ?? []).map((a) => a.address)));
  const mine = c.nodes.filter((n) => local.has(n.service_address) || local.has(n.replication_address));
  if (mine.length === 1) return mine[0]!.id;
  throw new UsageError(`cannot tell which node this is (no local address matches exactly one node); say --node ${c.nodes.map((n) => n.id).join("|")}`);
}

export function volumeContext(c: MailhaConfig, nodeId: string): VolumeContext {
  const stateDir = nodeStateDir(c, nodeId);
  return {
    config: c,
    nodeId,
    stateDir,
    paths: enginePaths(stateDir),
    netns: nodeNetns(c, nodeId),
    mountpoint: nodePaths(stateDir).data,
    engineRecord: join(stateDir, "run", "volume-engine.json"),
  };
}

export function engineSpec(v: VolumeContext): DaemonSpec {
  return {
    name: `volume@${v.nodeId}`,
    command: process.execPath,
    args: [BIN, "volume", "run", "--config", v.config.file, "--node", v.nodeId],
    netns: v.netns,
    logFile: join(v.stateDir, "log", "volume-engine.log"),
    ready: async () => existsSync(v.paths.controlSocket) && !!(await controlCall(v.paths.controlSocket, "status", {}, 1000)),
    readyTimeoutMs: 20_000,
    stopTimeoutMs: 10_000,
  };
}

export async function startEngine(v: VolumeContext): Promise<DaemonRecord> {
  const prev = readEngineRecord(v);
  if (prev && isAlive(prev)) throw new UsageError(`the volume engine of node ${v.nodeId} already runs (pid ${prev.pid})`);
  const rec = await startDaemon(engineSpec(v));
  writeFileDurable(v.engineRecord, JSON.stringify(rec));
  return rec;
}

/**
 * The record of the node's engine process (`run/volume-engine.json`), or null. The
 * record can be rebuilt: a damaged one is replaced by the record of the engine found
 * running with this node's arguments, or removed when none runs (a warning on stderr
 * says which), so a power loss while it was written never keeps a node from starting
 * and never starts a second engine beside a live one.
 */
export function readEngineRecord(v: VolumeContext): DaemonRecord | null {
  try {
    return readJsonState<DaemonRecord>(v.engineRecord, daemonRecordProblem, "it is rebuilt from the running engine, or removed");
  } catch (err) {
    if (!(err instanceof DamagedStateFileError)) throw err;
    const found = findRunningDaemon(engineSpec(v));
    if (found) writeFileDurable(v.engineRecord, JSON.stringify(found));
    else rmSync(v.engineRecord, { force: true });
    process.stderr.write(`mailha: warning: ${err.file} was damaged (${err.problem}); ${found ? `rebuilt: the engine runs as pid ${found.pid}` : "removed: no engine of this node runs"}\n`);
    return found;
  }
}

export async function stopEngine(v: VolumeContext): Promise<string> {
  const rec = readEngineRecord(v);
  if (!rec) return "absent";
  return stopDaemon(rec);
}

export type { LatencySummary };

export type VolumeStatus = {
  node: string;
  role: string;
  connection: string;
  disk: string;
  peer: { role: string; disk: string; node: string | null };
  protocol: string;
  sizeBytes: number;
  outOfSyncBytes: number;
  unackedBytes: number;
  fresh: boolean;
  gi: { current: string; bitmap: string; history: string[] };
  resync: { side: string; full: boolean; totalBytes: number; doneBytes: number; bytesPerS: number; etaS: number | null } | null;
  verify: { extents: number; checked: number; mismatched: number } | null;
  preserved: PreservedCopy[];
  /** A copy of this side being made before it is overwritten (progress of the image). */
  preserving: { reason: string; method: "reflink" | "copy"; doneBytes: number; totalBytes: number; startedMs: number } | null;
  /** Why the last copy failed; the side stays StandAlone until `volume connect`. */
  preserveError: string | null;
  lastHandshake: { kind: string; reason: string } | null;
  link: { up: boolean; authFailures: number; connects: number; disconnects: number; bytesSent: number };
  export: { mounted: boolean; file: string | null; inUse: boolean };
  /** The backing image on this node's disk: a sparse one holds fewer bytes than its size. */
  image?: { allocatedBytes: number };
  stats: { writes: number; writeBytes: number; resyncedBytes: number; flushes: number };
  /** Recent application writes and flushes as the engine answered them, and its own fdatasyncs. */
  latency?: { write: LatencySummary; flush: LatencySummary; localSync: LatencySummary };
  pid: number;
};

export function volumeCall(v: VolumeContext, op: string, args: Record<string, unknown> = {}, timeoutMs?: number): Promise<unknown> {
  return controlCall(v.paths.controlSocket, op, args, timeoutMs);
}

export async function volumeStatus(v: VolumeContext, timeoutMs?: number): Promise<VolumeStatus> {
  return (await volumeCall(v, "status", {}, timeoutMs)) as VolumeStatus;
}

/** Polls the engine's status until `pred` holds; throws with the last status after the bound. */
export async function waitForVolume(v: VolumeContext, pred: (s: VolumeStatus) => boolean, timeoutMs: number, what: string, shouldAbort?: () => boolean): Promise<VolumeStatus> {
  const deadline = Date.now() + timeoutMs;
  let last: VolumeStatus | null = null;
  for (;;) {
    if (shouldAbort?.()) throw new Error(`node ${v.nodeId}: stopped waiting for ${what}: aborted`);
    try {
      last = await volumeStatus(v);
      if (pred(last)) return last;
    } catch {
      // engine not answering yet
    }
    if (Date.now() > deadline) throw new Error(`node ${v.nodeId}: ${what} did not happen within ${timeoutMs} ms (last status: ${last ? `${last.role}/${last.connection}/${last.disk}` : "no answer"})`);
    await sleep(100);
  }
}

/** True when the node's engine runs (its record names a live process). */
function engineRunning(v: VolumeContext): boolean {
  const rec = readEngineRecord(v);
  return !!rec && isAlive(rec);
}

function offlineMeta(v: VolumeContext): { file: string; meta: Meta } {
  const file = volumeFiles(v.paths.volumeDir).meta;
  if (!existsSync(file)) throw new UsageError(`node ${v.nodeId} has no volume in ${v.paths.volumeDir}`);
  return { file, meta: loadMetaFile(file) };
}

/** The preserved copies of a node: from its engine, or from its metadata when it is stopped. */
export async function listPreserved(v: VolumeContext): Promise<PreservedCopy[]> {
  if (engineRunning(v)) return (await volumeStatus(v)).preserved;
  return offlineMeta(v).meta.preserved;
}

/**
 * Forgets a preserved copy and removes its files. Refused while the copy holds
 * changes the reconciler has not merged, unless FORCE.
 */
export async function dropPreserved(v: VolumeContext, path: string, force: boolean): Promise<{ dropped: string; reconciled: boolean }> {
  if (engineRunning(v)) return (await volumeCall(v, "preserved-drop", { path, force })) as { dropped: string; reconciled: boolean };
  const { file, meta } = offlineMeta(v);
  const p = meta.preserved.find((x) => x.path === path || x.path.endsWith(`/${path}`));
  if (!p) throw new UsageError(`no preserved copy "${path}" on node ${v.nodeId} (\`mailha volume preserved list\` shows them)`);
  if (!p.reconciledAtMs && !force) throw new Error(`the copy ${p.path} holds changes not yet reconciled (\`mailha reconcile\` merges them into the survivor); --force drops it anyway`);
  meta.preserved = meta.preserved.filter((x) => x !== p);
  writeFileDurable(file, JSON.stringify(meta, null, 2));
  await removeCopy(volumeFiles(v.paths.volumeDir).preserved, p.path);
  return { dropped: p.path, reconciled: !!p.reconciledAtMs };
}

/** Records that everything in a preserved copy is merged (the reconciler calls this). */
export async function markReconciled(v: VolumeContext, path: string): Promise<void> {
  if (engineRunning(v)) {
    await volumeCall(v, "preserved-mark", { path });
    return;
  }
  const { file, meta } = offlineMeta(v);
  const p = meta.preserved.find((x) => x.path === path || x.path.endsWith(`/${path}`));
  if (!p) throw new UsageError(`no preserved copy "${path}" on node ${v.nodeId}`);
  p.reconciledAtMs = Date.now();
  writeFileDurable(file, JSON.stringify(meta, null, 2));
}
