// The volume engine process (`mailha volume run`): wires the protocol core to the
// local store, the replication link, the FUSE export, the control socket and the
// event log. One process per node, started in its own session and deaf to SIGHUP; it
// must never touch the file system it exports. A damaged metadata file or bitmap stops
// it at start with a message naming the file and what to do; a damaged activity log
// (a torn write of its one record) is rebuilt, conservatively (see loadActivityLog).
import { mkdirSync, readFileSync } from "node:fs";
import type { Socket } from "node:net";
import type { Server } from "node:net";
import { join } from "node:path";
import type { MailhaConfig } from "../common/config.ts";
import { createLogger } from "../common/log.ts";
import { EventLog, Pending } from "../common/eventlog.ts";
import { serveControl, type ControlRequest } from "./control.ts";
import { FuseExport } from "./fuse-export.ts";
import { newGenId } from "./gi.ts";
import { VolumeMachine, type Action, type AdminCmd, type Event } from "./machine.ts";
import { startCpuProfile } from "../common/profile.ts";
import { Latency } from "./latency.ts";
import { FileStore } from "./store.ts";
import { DamagedStateFileError } from "../common/fsutil.ts";
import type { Bitmap } from "./bitmap.ts";
import type { Meta } from "./types.ts";
import type { Logger } from "pino";
import { preserveCopy, removeCopy, removePartialCopies, type PreserveProgress } from "./preserve.ts";
import { PeerLink } from "./transport.ts";
import { enginePaths, type EnginePaths } from "./client.ts";

export { enginePaths, type EnginePaths };

const TICK_MS = 100;
const IN_FLIGHT_MAX_BYTES = 16 * 1024 * 1024;
const PING_INTERVAL_MS = 250;
const PING_TIMEOUT_MS = 1500;
const AUTH_TIMEOUT_MS = 5000;

export interface EngineOptions {
  readonly config: MailhaConfig;
  readonly nodeId: string;
  readonly stateDir: string;
}

export async function runEngine(o: EngineOptions): Promise<void> {
  const c = o.config;
  const me = c.nodes.find((n) => n.id === o.nodeId);
  const peer = c.nodes.find((n) => n.id !== o.nodeId);
  if (!me || !peer) throw new Error(`node ${o.nodeId} is not in ${c.file}`);
  const p = enginePaths(o.stateDir);
  mkdirSync(join(o.stateDir, "run"), { recursive: true });
  mkdirSync(join(o.stateDir, "log"), { recursive: true });
  const log = createLogger(`volume@${o.nodeId}`);
  const writeProfile = startCpuProfile(`volume-${o.nodeId}`);
  const secret = Buffer.from(readFileSync(c.volume.secret_file, "utf8").trim());

  const store = new FileStore(p.volumeDir);
  const removedPartial = removePartialCopies(store.files.preserved);
  if (removedPartial.length) log.warn({ removed: removedPartial }, "removed preserved copies a crash left half made; the copy is made again before any resync");
  const meta = store.loadMeta();
  if (meta.nodeId !== o.nodeId) throw new Error(`the volume in ${p.volumeDir} belongs to node ${meta.nodeId}, not ${o.nodeId}`);
  if (meta.sizeBytes !== c.volume.size) log.warn({ meta: meta.sizeBytes, config: c.volume.size }, "volume size differs from the config; using the volume's");
  const bitmap = store.loadBitmap();
  const alRebuilt = loadActivityLog(store, meta, bitmap, log);
  const machine = new VolumeMachine(meta, bitmap, alRebuilt.extents, store, {
    nodeId: o.nodeId,
    protocol: c.volume.protocol,
    splitBrainPolicy: c.volume.split_brain_policy,
    alExtents: c.volume.activity_log_extents,
    resyncRateBytesPerS: c.volume.resync_rate_max_bytes_per_s,
    inFlightMaxBytes: IN_FLIGHT_MAX_BYTES,
    now: Date.now,
    newId: () => newGenId(),
  });

  const link = new PeerLink({
    nodeId: o.nodeId,
    peerId: peer.id,
    cluster: c.cluster.name,
    secret,
    listen: { host: me.replication_address, port: c.volume.port },
    peer: { host: peer.replication_address, port: c.volume.port },
    pingIntervalMs: PING_INTERVAL_MS,
    pingTimeoutMs: PING_TIMEOUT_MS,
    authTimeoutMs: AUTH_TIMEOUT_MS,
    log,
  });

  const pending = new Pending<{ error?: string; result?: unknown }>();
  const events = new EventLog(p.eventLog, o.nodeId, log, "volumeEvent");
  let exportOp: Promise<void> = Promise.resolve();

  const latency = { write: new Latency(), flush: new Latency() };
  const timed = async (l: Latency, ev: Event): Promise<string | null> => {
    const t0 = process.hrtime.bigint();
    const r = await request(ev);
    l.since(t0);
    return r.error ?? null;
  };
  const fuse = new FuseExport(p.exportDir, {
    sizeBytes: store.sizeBytes,
    readInto: (buf, len, pos) => store.readInto(buf, len, pos),
    write: (offset, data) => timed(latency.write, { t: "write", req: 0, offset, data }),
    flush: () => timed(latency.flush, { t: "flush", req: 0 }),
  }, o.nodeId);

  const emitEvent = (ev: Record<string, unknown>) => events.emit(ev);

  // The copy of this side before it is overwritten (see preserve.ts); one at a time.
  let copying: (PreserveProgress & { reason: string; startedMs: number }) | null = null;
  let lastProgressEventMs = 0;
  function startPreserve(reason: string): void {
    if (copying) return;
    const startedMs = Date.now();
    copying = { reason, startedMs, doneBytes: 0, totalBytes: store.sizeBytes, method: "copy" };
    store.sync();
    void preserveCopy(store.files, store.files.preserved, reason, startedMs, (pr) => {
      copying = { ...pr, reason, startedMs };
      if (Date.now() - lastProgressEventMs >= 1000) {
        lastProgressEventMs = Date.now();
        emitEvent({ type: "preserve-progress", ...pr });
      }
    }).then(
      (r) => {
        copying = null;
        log.info({ path: r.path, method: r.method, seconds: (Date.now() - startedMs) / 1000 }, "preserved a copy of this side");
        dispatch({ t: "preserve-done", path: r.path, method: r.method, diskBytes: r.diskBytes });
      },
      (err: Error) => {
        copying = null;
        log.error({ err: err.message }, "could not preserve a copy of this side; it stays StandAlone");
        dispatch({ t: "preserve-failed", error: `${err.message}; this side stays StandAlone and is not overwritten: make room, then \`mailha volume connect\`` });
      },
    );
  }

  function act(a: Action): void {
    switch (a.t) {
      case "send":
        link.send(a.msg);
        break;
      case "sync":
        link.flushQueued(); // the peer works while this node's fdatasync blocks
        store.sync();
        break;
      case "reply":
        pending.settle(a.req, { error: a.error, result: a.result });
        break;
      case "event":
        emitEvent(a.ev);
        break;
      case "drop":
        link.drop(a.reason);
        break;
      case "allow-connect":
        link.setAllowed(a.on);
        break;
      case "preserve":
        startPreserve(a.reason);
        break;
      case "remove-preserved":
        removeCopy(store.files.preserved, a.path).catch((err: Error) => log.error({ err: err.message, path: a.path }, "could not remove a dropped preserved copy"));
        break;
      case "export":
        exportOp = exportOp.then(() => (a.on ? fuse.mount() : fuse.unmount())).then(
          () => emitEvent({ type: "export", on: a.on, file: a.on ? fuse.file : null }),
          (err: Error) => emitEvent({ type: "export-failed", on: a.on, error: err.message }),
        );
        break;
    }
  }

  function dispatch(ev: Event): void {
    for (const a of machine.handle(ev)) act(a);
  }

  /** Sends an event that carries a request id; resolves with the core's answer. */
  function request(ev: Event): Promise<{ error?: string; result?: unknown }> {
    const [req, answer] = pending.open();
    dispatch({ ...ev, req } as Event);
    return answer;
  }

  async function admin(cmd: AdminCmd): Promise<unknown> {
    const r = await request({ t: "admin", req: 0, cmd });
    if (r.error !== undefined) throw new Error(r.error);
    return r.result;
  }

  function status() {
    const preserving = copying ? { reason: copying.reason, method: copying.method, doneBytes: copying.doneBytes, totalBytes: copying.totalBytes, startedMs: copying.startedMs } : null;
    return { ...machine.status(), preserving, link: { up: link.up, ...link.stats }, export: { mounted: fuse.mounted, file: fuse.mounted ? fuse.file : null, inUse: fuse.busy }, image: { allocatedBytes: store.allocatedBytes() }, latency: { write: latency.write.summary(), flush: latency.flush.summary(), localSync: store.syncLatency.summary() }, pid: process.pid };
  }

  async function handle(req: ControlRequest, sock: Socket): Promise<unknown> {
    const args = req.args ?? {};
    switch (req.op) {
      case "status":
        return status();
      case "events":
        events.subscribe(sock);
        return undefined;
      case "primary": {
        const r = await admin({ op: "primary", force: args.force === true });
        await exportOp;
        return { ...(r as object), export: fuse.mounted ? fuse.file : null };
      }
      case "secondary": {
        const r = await admin({ op: "secondary", exportBusy: fuse.busy });
        await exportOp;
        return r;
      }
      case "verify":
        return admin({ op: "verify" });
      case "outdate":
        return admin({ op: "outdate" });
      case "freeze":
        return admin({ op: "freeze" });
      case "connect":
        return admin({ op: "connect" });
      case "disconnect":
        return admin({ op: "disconnect" });
      case "preserved-drop":
        if (typeof args.path !== "string" || args.path === "") throw new Error("preserved-drop needs path");
        return admin({ op: "drop-preserved", path: args.path, force: args.force === true });
      case "preserved-mark":
        if (typeof args.path !== "string" || args.path === "") throw new Error("preserved-mark needs path");
        return admin({ op: "mark-reconciled", path: args.path });
      case "resolve":
        if (args.keep !== "local" && args.keep !== "peer") throw new Error('resolve needs keep: "local" or "peer"');
        return admin({ op: "resolve", keep: args.keep });
      default:
        throw new Error(`unknown operation "${req.op}"`);
    }
  }

  link.on("up", () => dispatch({ t: "connected" }));
  link.on("down", (reason: string) => dispatch({ t: "disconnected", reason }));
  link.on("msg", (msg) => dispatch({ t: "msg", msg }));
  link.on("auth-failed", (info: { remote: string; why: string }) => emitEvent({ type: "auth-failed", ...info }));

  const control: Server = await serveControl(p.controlSocket, handle);
  await link.start();
  const tick = setInterval(() => dispatch({ t: "tick" }), TICK_MS);
  if (alRebuilt.damaged) emitEvent({ type: "activity-log-rebuilt", file: store.files.al, problem: alRebuilt.damaged, allOutOfSync: alRebuilt.allOutOfSync });
  emitEvent({ type: "engine-started", pid: process.pid, role: machine.role, disk: machine.disk, gi: machine.meta.gi });

  let stopping = false;
  const stop = async (sig: string) => {
    if (stopping) return;
    stopping = true;
    emitEvent({ type: "engine-stopping", signal: sig, role: machine.role });
    writeProfile();
    clearInterval(tick);
    link.stop();
    await exportOp.catch(() => {});
    await fuse.unmount().catch(() => {});
    control.close();
    store.close();
    process.exit(0);
  };
  process.on("SIGHUP", () => {});
  process.on("SIGTERM", () => void stop("SIGTERM"));
  process.on("SIGINT", () => void stop("SIGINT"));
  // Runs until a signal stops it (stop() exits the process).
  await new Promise<never>(() => {});
}

/**
 * The activity log at start. A damaged record (a power loss tore its one write) is
 * rewritten empty. Its extents matter only after an unclean stop as primary (they say
 * which blocks may differ from the peer): then, not knowing them, every block is marked
 * out of sync first, so the next connect resyncs the whole volume instead of missing a
 * block. The bitmap is saved before the log is rewritten.
 */
export function loadActivityLog(store: FileStore, meta: Meta, bitmap: Bitmap, log: Logger): { extents: number[]; damaged: string | null; allOutOfSync: boolean } {
  try {
    return { extents: store.loadAL(), damaged: null, allOutOfSync: false };
  } catch (err) {
    if (!(err instanceof DamagedStateFileError)) throw err;
    const crashedPrimary = meta.role === "primary" && !meta.cleanShutdown;
    if (crashedPrimary) {
      bitmap.setBlocks(0, bitmap.blocks);
      store.saveBitmap(bitmap);
    }
    store.saveAL([]);
    log.warn(
      { file: err.file, problem: err.problem },
      crashedPrimary
        ? "the activity log was damaged after an unclean stop as primary: every block is marked out of sync (a full resync on the next connect), the log rewritten empty"
        : "the activity log was damaged; not needed after a clean stop: rewritten empty",
    );
    return { extents: [], damaged: err.problem, allOutOfSync: crashedPrimary };
  }
}
