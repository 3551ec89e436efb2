// The replication protocol core: one node's state machine. It takes events (an
// application write or flush from the FUSE export, a message from the peer, the peer
// connecting or going away, a timer tick, an operator command) and returns actions
// (messages to send, replies to complete, events to log, the export to open or
// close). It is deterministic: time comes from an injected clock, ids from an injected
// generator, and local storage from an injected synchronous Store, so the simulation
// can run it against a simulated disk and network. The rules are VOLUME-PROTOCOL.md's.
//
// Guarantee (protocol C): a flush is answered only when every write answered before it
// is durable on both disks, or, if the peer is lost meanwhile, when those blocks are
// recorded in the durable bitmap of a new generation. Protocol A answers a flush after
// the local fdatasync; up to `inFlightMaxBytes` of answered writes may then be missing
// on the peer if this node dies, and status reports the bytes at risk.
import { createHash } from "node:crypto";
import { Bitmap } from "./bitmap.ts";
import { decideConnect, type ConnectOutcome, type Side } from "./gi.ts";
import { applyBitmapChunk, bitmapChunks, FrameError } from "./wire.ts";
import {
  BITMAP_CHUNK_BLOCKS,
  BLOCK_SIZE,
  EXTENT_BLOCKS,
  EXTENT_BYTES,
  type ConnState,
  type DiskState,
  type GenIds,
  type Hello,
  type Meta,
  type Msg,
  type PreservedCopy,
  type Protocol,
  type Role,
  type SplitBrainPolicy,
} from "./types.ts";

/** Local storage as the core sees it; every call is synchronous and ordered. */
export interface Store {
  readonly sizeBytes: number;
  read(offset: number, length: number): Buffer;
  write(offset: number, data: Buffer): void;
  /** fdatasync of the image: every earlier write is durable when it returns. */
  sync(): void;
  saveMeta(meta: Meta): void;
  saveBitmap(bitmap: Bitmap): void;
  saveAL(extents: readonly number[]): void;
}

export interface MachineOptions {
  readonly nodeId: string;
  readonly protocol: Protocol;
  readonly splitBrainPolicy: SplitBrainPolicy;
  readonly alExtents: number;
  readonly resyncRateBytesPerS: number;
  /** Bound on replicated-but-unacknowledged bytes; writes wait beyond it. */
  readonly inFlightMaxBytes: number;
  readonly now: () => number;
  readonly newId: () => string;
}

export type AdminCmd =
  | { readonly op: "primary"; readonly force?: boolean }
  | { readonly op: "secondary"; readonly exportBusy?: boolean }
  | { readonly op: "verify" }
  | { readonly op: "outdate" }
  | { readonly op: "freeze" }
  | { readonly op: "resolve"; readonly keep: "local" | "peer" }
  | { readonly op: "connect" }
  | { readonly op: "disconnect" }
  /** Forget a preserved copy (the engine then removes its files); --force if not reconciled. */
  | { readonly op: "drop-preserved"; readonly path: string; readonly force?: boolean }
  /** The reconciler merged everything in this copy. */
  | { readonly op: "mark-reconciled"; readonly path: string };

export type Event =
  | { readonly t: "write"; readonly req: number; readonly offset: number; readonly data: Buffer }
  | { readonly t: "flush"; readonly req: number }
  | { readonly t: "connected" }
  | { readonly t: "disconnected"; readonly reason: string }
  | { readonly t: "msg"; readonly msg: Msg }
  | { readonly t: "tick" }
  | { readonly t: "admin"; readonly req: number; readonly cmd: AdminCmd }
  /** The copy asked for by a `preserve` action is complete and durable (fsynced). */
  | { readonly t: "preserve-done"; readonly path: string; readonly method: "reflink" | "copy"; readonly diskBytes: number }
  | { readonly t: "preserve-failed"; readonly error: string };

export interface VolumeEvent {
  readonly type: string;
  readonly [k: string]: unknown;
}

export type Action =
  | { readonly t: "send"; readonly msg: Msg }
  | { readonly t: "reply"; readonly req: number; readonly error?: string; readonly result?: unknown }
  | { readonly t: "event"; readonly ev: VolumeEvent }
  | { readonly t: "drop"; readonly reason: string }
  | { readonly t: "export"; readonly on: boolean }
  | { readonly t: "allow-connect"; readonly on: boolean }
  /**
   * Copy image, metadata and bitmap aside, durably, and answer with `preserve-done` or
   * `preserve-failed`. The side is StandAlone and secondary meanwhile: nothing writes
   * to the image, and no resync starts before the copy is complete.
   */
  | { readonly t: "preserve"; readonly reason: string }
  /** Remove a dropped preserved copy's files. */
  | { readonly t: "remove-preserved"; readonly path: string }
  /**
   * fdatasync the image now, before any later action. A flush sends its barrier first
   * and syncs after, so the peer's fdatasync runs while this node's does.
   */
  | { readonly t: "sync" };

interface Pending {
  readonly seq: number;
  readonly offset: number;
  readonly length: number;
}

interface ResyncState {
  readonly side: "source" | "target";
  readonly full: boolean;
  /** Source: blocks still to send. */
  readonly set: Bitmap;
  readonly targetFresh: boolean;
  cursor: number;
  /** Source: ranges sent and not yet acknowledged, in order. */
  readonly inflight: { first: number; count: number }[];
  inflightBytes: number;
  sent: number;
  acked: number;
  /** Target: ranges received since the last resync barrier. */
  readonly received: { first: number; count: number }[];
  readonly totalBlocks: number;
  doneBlocks: number;
  bytesSent: number;
  readonly startedMs: number;
  tokens: number;
  lastRefillMs: number;
  lastProgressMs: number;
  ended: boolean;
}

interface VerifyState {
  readonly driver: boolean;
  next: number;
  readonly outstanding: Map<number, string>;
  readonly mismatched: number[];
  readonly extents: number;
  readonly startedMs: number;
}

const RESYNC_WINDOW_BYTES = 8 * 1024 * 1024;
const RESYNC_CHUNK_BLOCKS = 32;
/** Bound on bytes read per pump (zero blocks skipped for a fresh target cost reads too). */
const RESYNC_SCAN_BYTES_MAX = 32 * 1024 * 1024;
const VERIFY_OUTSTANDING_MAX = 4;
const BARRIER_EVERY_BYTES = 4 * 1024 * 1024;
const HANDSHAKE_QUEUE_MAX = 4096;
/** Both sides primary after a split brain: how long to stay StandAlone before trying again. */
const BOTH_PRIMARY_RETRY_MS = 1000;
const PROGRESS_EVERY_MS = 1000;
/**
 * A fenced (frozen) primary waits at most this long for the peer's acknowledgements
 * before it demotes: its peer is usually unreachable then, and the fencing must not
 * wait for the link's ping timeout. Unacknowledged writes go into the durable bitmap.
 */
const FROZEN_DEMOTE_WAIT_MS = 250;

export class VolumeMachine {
  readonly bitmap: Bitmap;
  private readonly al: number[];
  private conn: ConnState;
  private allowConnect = true;
  private peer: Hello | null = null;
  private peerRole: Role | null = null;
  private peerDisk: DiskState = "unknown";
  private helloSent: Hello | null = null;
  private seq = 0;
  private lastBarrier = 0;
  private bytesSinceBarrier = 0;
  private acked = 0;
  private readonly pending: Pending[] = [];
  private pendingBytes = 0;
  private readonly flushWaiters: { req: number; seq: number }[] = [];
  private readonly deferred: number[] = [];
  private readonly handshakeQueue: Event[] = [];
  private resync: ResyncState | null = null;
  private verify: VerifyState | null = null;
  private resolveAs: "local" | "peer" | null = null;
  private lastOutcome: ConnectOutcome | null = null;
  private writeBytesWindow = 0;
  /** A promotion waiting for the peer's agreement. */
  private promoteWaiter: { req: number; force: boolean } | null = null;
  /** A demotion waiting for the peer to acknowledge writes in flight. */
  private demoteWaiter: number | null = null;
  private demoteDeadlineMs = 0;
  /**
   * A primary lost its peer with nothing unacknowledged: the new generation starts
   * with its first write, not at once, so a primary that is stopped (or fenced)
   * before it writes again has not moved on, and its return is a plain resync, not
   * a split brain.
   */
  private newCurrentDue = false;
  /**
   * I/O frozen by the cluster manager as it fences this node (DRBD's suspend-io):
   * writes and flushes fail, and nothing written after the freeze is acknowledged
   * as durable, so whatever the peer did not get may be discarded by a resync. Ends
   * with the demotion.
   */
  private frozen = false;
  /** A copy of this side is being made before it becomes a sync target. */
  private preserving: { reason: string; sinceMs: number; reconnect: boolean } | null = null;
  /** When a StandAlone side that waits for the peer's demotion connects again. */
  private reconnectAtMs: number | null = null;
  /** The generations of the last split brain logged (a retry while both are primary logs it once). */
  private lastSplitBrain: string | null = null;
  /** Why the last copy failed (the side stays StandAlone until `connect`). */
  private preserveError: string | null = null;
  /** The in-memory bitmap has bits the durable one lacks. */
  private bitmapDirty = false;
  /** The peer's hello, waiting for the bitmap chunks it announced (BLOCKS: the peer's size in blocks). */
  private incoming: { hello: Hello; bitmap: Bitmap; blocks: number; left: number; nextFirst: number } | null = null;
  private stats = { writes: 0, writeBytes: 0, resyncedBytes: 0, flushes: 0, protocolErrors: 0 };
  private out: Action[] = [];

  constructor(
    readonly meta: Meta,
    bitmap: Bitmap,
    al: readonly number[],
    private readonly store: Store,
    private readonly opt: MachineOptions,
  ) {
    if (bitmap.blocks !== Math.ceil(meta.sizeBytes / BLOCK_SIZE)) throw new Error("bitmap does not match the volume size");
    this.bitmap = bitmap;
    this.al = [...al];
    this.conn = "connecting";
    // An engine always starts as secondary; one that stopped uncleanly as primary
    // remembers it, so its activity-log extents are resynced on the next connect.
    if (meta.role === "primary" && !meta.cleanShutdown) {
      meta.crashedPrimary = true;
      // Every block of a logged extent may differ from the peer: record that in the
      // bitmap now, before a new term as primary evicts extents from the log.
      for (const e of this.al) this.bitmap.setBlocks(e * EXTENT_BLOCKS, Math.max(0, Math.min(EXTENT_BLOCKS, bitmap.blocks - e * EXTENT_BLOCKS)));
      this.store.saveBitmap(this.bitmap);
    }
    meta.role = "secondary";
    meta.cleanShutdown = true;
    if (meta.disk === "uptodate") meta.disk = "consistent";
    this.store.saveMeta(meta);
  }

  // ---- the one entry point ------------------------------------------------------

  handle(ev: Event): Action[] {
    this.out = [];
    if (this.isHandshaking() && (ev.t === "write" || ev.t === "flush")) {
      if (this.handshakeQueue.length >= HANDSHAKE_QUEUE_MAX) this.reply(ev.req, "handshake queue full");
      else this.handshakeQueue.push(ev);
      return this.out;
    }
    switch (ev.t) {
      case "write":
        this.onWrite(ev.req, ev.offset, ev.data);
        break;
      case "flush":
        this.onFlush(ev.req);
        break;
      case "connected":
        this.onConnected();
        break;
      case "disconnected":
        this.onDisconnected(ev.reason);
        break;
      case "msg":
        this.onMsg(ev.msg);
        break;
      case "tick":
        this.onTick();
        break;
      case "admin":
        this.onAdmin(ev.req, ev.cmd);
        break;
      case "preserve-done":
        this.onPreserved(ev.path, ev.method, ev.diskBytes);
        break;
      case "preserve-failed":
        this.onPreserveFailed(ev.error);
        break;
    }
    return this.out;
  }

  // ---- status -------------------------------------------------------------------

  status() {
    const r = this.resync;
    const now = this.opt.now();
    const elapsed = r ? Math.max(1, now - r.startedMs) / 1000 : 0;
    const rate = r ? (r.doneBlocks * BLOCK_SIZE) / elapsed : 0;
    const left = r ? (r.totalBlocks - r.doneBlocks) * BLOCK_SIZE : 0;
    return {
      node: this.opt.nodeId,
      role: this.meta.role,
      connection: this.conn,
      disk: this.meta.disk,
      peer: { role: this.peerRole ?? "unknown", disk: this.peerDisk, node: this.peer?.nodeId ?? null },
      protocol: this.opt.protocol,
      sizeBytes: this.meta.sizeBytes,
      outOfSyncBytes: this.bitmap.count * BLOCK_SIZE,
      unackedBytes: this.pendingBytes,
      gi: this.meta.gi,
      fresh: this.meta.fresh,
      crashedPrimary: this.meta.crashedPrimary,
      splitBrainPolicy: this.opt.splitBrainPolicy,
      lastHandshake: this.lastOutcome,
      resync: r
        ? { side: r.side, full: r.full, totalBytes: r.totalBlocks * BLOCK_SIZE, doneBytes: r.doneBlocks * BLOCK_SIZE, bytesPerS: Math.round(rate), etaS: rate > 0 ? Math.round(left / rate) : null }
        : null,
      verify: this.verify ? { extents: this.verify.extents, checked: this.verify.next, mismatched: this.verify.mismatched.length } : null,
      preserved: this.meta.preserved,
      preserving: this.preserving ? { reason: this.preserving.reason, sinceMs: this.preserving.sinceMs } : null,
      preserveError: this.preserveError,
      activityLog: this.al.length,
      stats: { ...this.stats },
    };
  }

  get role(): Role {
    return this.meta.role;
  }
  get connection(): ConnState {
    return this.conn;
  }
  get disk(): DiskState {
    return this.meta.disk;
  }
  /** True while the peer receives every write (connected, or this side is the sync source). */
  get replicating(): boolean {
    return this.conn === "connected" || this.conn === "sync-source" || this.conn === "verifying";
  }

  // ---- application I/O (primary only) --------------------------------------------

  private onWrite(req: number, offset: number, data: Buffer): void {
    if (this.meta.role !== "primary") return this.reply(req, "EROFS: volume is not primary");
    if (this.frozen) return this.reply(req, "EIO: I/O frozen while this node is fenced");
    if (offset < 0 || offset + data.length > this.meta.sizeBytes) return this.reply(req, "ENOSPC: write beyond the end of the volume");
    if (data.length === 0) return this.reply(req);
    if (!this.replicating) this.startDueGeneration();
    this.touchActivityLog(offset, data.length);
    this.store.write(offset, data);
    if (this.meta.fresh) {
      this.meta.fresh = false;
      this.store.saveMeta(this.meta);
    }
    this.stats.writes++;
    this.stats.writeBytes += data.length;
    this.writeBytesWindow += data.length;
    if (this.replicating) {
      const seq = ++this.seq;
      this.send({ t: "data", seq, offset, data });
      this.pending.push({ seq, offset, length: data.length });
      this.pendingBytes += data.length;
      this.bytesSinceBarrier += data.length;
      if (this.bytesSinceBarrier >= BARRIER_EVERY_BYTES) this.sendBarrier();
      if (this.pendingBytes > this.opt.inFlightMaxBytes) {
        this.deferred.push(req);
        return;
      }
    } else {
      this.markOutOfSync(offset, data.length);
    }
    this.reply(req);
  }

  /** Before the first write without the peer: start the new generation, durably. */
  private startDueGeneration(): void {
    if (!this.newCurrentDue) return;
    this.newCurrentDue = false;
    this.newGeneration("primary wrote without its peer");
    this.store.saveMeta(this.meta);
  }

  private onFlush(req: number): void {
    if (this.meta.role !== "primary") return this.reply(req, "EROFS: volume is not primary");
    if (this.frozen) return this.reply(req, "EIO: I/O frozen while this node is fenced");
    this.stats.flushes++;
    // A flush without the peer commits out-of-sync blocks on this disk alone.
    if (!this.replicating && this.bitmap.count > 0) this.startDueGeneration();
    if (this.replicating) {
      if (this.seq > this.lastBarrier) this.sendBarrier();
      this.out.push({ t: "sync" });
      if (this.opt.protocol === "C" && this.acked < this.seq) {
        this.flushWaiters.push({ req, seq: this.seq });
        return;
      }
      return this.reply(req);
    }
    // Degraded: the written blocks' bits must be durable before the flush returns.
    if (this.bitmapDirty) this.persistBitmap(); // syncs the image first
    else this.store.sync();
    this.reply(req);
  }

  private sendBarrier(): void {
    this.lastBarrier = this.seq;
    this.bytesSinceBarrier = 0;
    this.send({ t: "barrier", seq: this.seq });
  }

  private touchActivityLog(offset: number, length: number): void {
    const first = Math.floor(offset / EXTENT_BYTES);
    const last = Math.floor((offset + length - 1) / EXTENT_BYTES);
    let changed = false;
    for (let e = first; e <= last; e++) {
      const i = this.al.indexOf(e);
      if (i >= 0) {
        if (i !== this.al.length - 1) {
          this.al.splice(i, 1);
          this.al.push(e);
        }
        continue;
      }
      this.al.push(e);
      changed = true;
      if (this.al.length > this.opt.alExtents) this.evictExtent();
    }
    // The extent is durable in the log before the first write into it.
    if (changed) this.store.saveAL(this.al);
  }

  /**
   * Drops the least recently used extent that has no write in flight to the peer,
   * after making local writes and out-of-sync bits durable, so after a crash every
   * block that may differ is either in the durable bitmap or in a logged extent. When every
   * extent is busy the log grows past its size until acknowledgements arrive (the
   * in-flight bound limits how far).
   */
  private evictExtent(): void {
    for (let i = 0; i < this.al.length - 1; i++) {
      const e = this.al[i]!;
      const lo = e * EXTENT_BYTES;
      const hi = lo + EXTENT_BYTES;
      if (this.pending.some((p) => p.offset < hi && p.offset + p.length > lo)) continue;
      // Writes into the extent must be durable here before it leaves the log.
      this.store.sync();
      if (this.bitmapDirty) this.persistBitmap();
      this.al.splice(i, 1);
      return;
    }
  }

  private markOutOfSync(offset: number, length: number): void {
    const first = Math.floor(offset / BLOCK_SIZE);
    const last = Math.floor((offset + length - 1) / BLOCK_SIZE);
    this.bitmap.setBlocks(first, last - first + 1);
    this.bitmapDirty = true;
  }

  // ---- connection lifecycle --------------------------------------------------------

  private isHandshaking(): boolean {
    return this.helloSent !== null && this.peer === null;
  }

  private onConnected(): void {
    if (!this.allowConnect) return this.drop("standalone: not connecting");
    const chunks = bitmapChunks(this.bitmap);
    const hello = this.hello(chunks.length);
    this.helloSent = hello;
    this.send(hello);
    for (const c of chunks) this.send(c);
  }

  private hello(bitmapChunks = 0): Hello {
    return {
      t: "hello",
      nodeId: this.opt.nodeId,
      sizeBytes: this.meta.sizeBytes,
      gi: this.meta.gi,
      disk: this.meta.disk,
      role: this.meta.role,
      fresh: this.meta.fresh,
      crashedPrimary: this.meta.crashedPrimary,
      primarySinceMs: this.meta.primarySinceMs,
      changedBlocks: this.bitmap.count,
      bitmapChunks,
      resolve: this.resolveAs,
    };
  }

  private onDisconnected(reason: string): void {
    const was = this.conn;
    const hadPeer = this.peer !== null;
    this.helloSent = null;
    this.peer = null;
    this.incoming = null;
    this.peerRole = null;
    this.setPeerDisk("unknown");
    if (this.verify) {
      this.emit({ type: "verify-aborted", reason });
      this.verify = null;
    }
    // Everything not acknowledged by the peer is out of sync.
    for (const p of this.pending) this.markOutOfSync(p.offset, p.length);
    this.pending.length = 0;
    this.pendingBytes = 0;
    this.acked = this.seq;
    this.lastBarrier = this.seq;
    this.bytesSinceBarrier = 0;
    if (this.resync) {
      if (this.resync.side === "source") this.bitmap.union(this.resync.set);
      this.emit({ type: "resync-interrupted", side: this.resync.side, doneBytes: this.resync.doneBlocks * BLOCK_SIZE, leftBytes: (this.resync.totalBlocks - this.resync.doneBlocks) * BLOCK_SIZE });
      this.resync = null;
    }
    if (this.meta.role === "primary" && hadPeer) {
      // Flushes waiting for the peer are about to be acknowledged on this disk alone:
      // from then on this side has data the peer lacks. Otherwise the new generation
      // waits for the first write or flush without the peer.
      if (this.flushWaiters.length > 0 && !this.frozen) this.newGeneration("primary lost its peer while flushes waited");
      else this.newCurrentDue = true;
    }
    else if (this.meta.disk === "uptodate" && this.meta.role === "secondary") this.setDisk("consistent");
    this.persistBitmap();
    this.store.saveMeta(this.meta);
    // Only now may waiting flushes return: their blocks are recorded durably. A
    // frozen node's flushes fail instead: it is being fenced and its data yields.
    for (const w of this.flushWaiters.splice(0)) this.reply(w.req, this.frozen ? "EIO: I/O frozen while this node is fenced" : undefined);
    for (const r of this.deferred.splice(0)) this.reply(r);
    if (this.demoteWaiter !== null) this.finishDemote(this.demoteWaiter);
    if (this.promoteWaiter !== null) {
      this.reply(this.promoteWaiter.req, "the peer went away during the promotion; try again");
      this.promoteWaiter = null;
    }
    this.setConn(this.allowConnect ? "connecting" : "standalone");
    if (hadPeer || was !== "connecting") this.emit({ type: "peer-lost", reason, outOfSyncBytes: this.bitmap.count * BLOCK_SIZE });
    this.drainHandshakeQueue();
  }

  /** A primary starts writing without its peer: the old current becomes the bitmap's base. */
  private newGeneration(why: string): void {
    const g = this.meta.gi;
    const next: GenIds =
      g.bitmap === ""
        ? { current: this.opt.newId(), bitmap: g.current, history: g.history }
        : { current: this.opt.newId(), bitmap: g.bitmap, history: [g.current, g.history[0]] };
    this.meta.gi = next;
    this.emit({ type: "generation", reason: why, gi: next });
  }

  /** The peer's hello: its bitmap follows in BITMAPCHUNKS messages (wire.ts). */
  private onPeerHello(peer: Hello): void {
    const blocks = Number.isSafeInteger(peer.sizeBytes) && peer.sizeBytes > 0 ? Math.ceil(peer.sizeBytes / BLOCK_SIZE) : 0;
    if (blocks === 0 || !Number.isSafeInteger(peer.bitmapChunks) || peer.bitmapChunks < 0 || peer.bitmapChunks > Math.ceil(blocks / BITMAP_CHUNK_BLOCKS))
      return this.protocolError(`a hello for ${peer.sizeBytes} bytes with ${peer.bitmapChunks} bitmap chunks`);
    this.incoming = { hello: peer, bitmap: new Bitmap(this.bitmap.blocks), blocks, left: peer.bitmapChunks, nextFirst: 0 };
    if (peer.bitmapChunks === 0) this.helloComplete();
  }

  private onBitmapChunk(m: Extract<Msg, { t: "bitmap" }>): void {
    const i = this.incoming;
    if (!i || i.left === 0) return this.protocolError("a bitmap chunk not announced by a hello");
    try {
      i.nextFirst = applyBitmapChunk(m, i.bitmap, i.blocks, i.nextFirst);
    } catch (err) {
      if (err instanceof FrameError) return this.protocolError(err.message);
      throw err;
    }
    if (--i.left === 0) this.helloComplete();
  }

  private helloComplete(): void {
    const { hello, bitmap } = this.incoming!;
    this.incoming = null;
    this.onHello(hello, bitmap);
  }

  private onHello(peer: Hello, peerBitmap: Bitmap): void {
    this.peer = peer;
    this.peerRole = peer.role;
    this.setPeerDisk(peer.disk);
    const mine = this.helloSent ?? this.hello();
    const decided = decideConnect(mine, peer, this.opt.splitBrainPolicy);
    let outcome = decided;
    const override = this.manualResolution(mine, peer, decided);
    if (override) outcome = override;
    this.lastOutcome = outcome;
    // This side diverged from the peer and is about to be overwritten: keep a copy.
    const divergent = (decided.kind === "split-brain" || decided.kind === "unrelated") && ((outcome.kind === "resync" && outcome.source === "peer") || (outcome.kind === "split-brain" && outcome.victim === "me"));
    const mustCopy = divergent && (decided.kind === "unrelated" || mine.changedBlocks > 0);
    const copy = mustCopy ? this.copyOfCurrent() : null;
    this.emit({ type: "handshake", peer: peer.nodeId, outcome: outcome.kind, reason: outcome.reason, ...(outcome.kind === "resync" ? { source: outcome.source === "me" ? this.opt.nodeId : peer.nodeId, full: outcome.full } : {}) });
    switch (outcome.kind) {
      case "refuse":
      case "unrelated":
        this.goStandalone(outcome.reason);
        break;
      case "wait":
        this.setConn("connected");
        break;
      case "no-sync":
        this.inSync();
        break;
      case "resync":
        if (mustCopy && copy === null) this.beginPreserve(decided.kind === "unrelated" ? "unrelated data, resolved by the operator" : "split brain, resolved by the operator");
        else this.startResync(outcome.source, outcome.full, peer, peerBitmap, false, divergent ? { changedBlocks: mine.changedBlocks, copy: copy?.path ?? null } : null);
        break;
      case "split-brain": {
        // Both primary under the preserve policy: the cluster manager is about to stop
        // one of them (the one that became active last). Keep trying to connect, and
        // the handshake after that demotion preserves and resyncs it.
        const waitForDemotion = outcome.victim === null && mine.role === "primary" && peer.role === "primary" && this.opt.splitBrainPolicy === "preserve";
        const key = `${mine.gi.current}/${peer.gi.current}`;
        if (waitForDemotion && this.lastSplitBrain === key) {
          this.waitForDemotion();
          break;
        }
        this.lastSplitBrain = key;
        this.emit({
          type: "split-brain",
          policy: this.opt.splitBrainPolicy,
          victim: outcome.victim === null ? null : outcome.victim === "me" ? this.opt.nodeId : peer.nodeId,
          local: { node: this.opt.nodeId, gi: mine.gi, changedBytes: mine.changedBlocks * BLOCK_SIZE },
          peer: { node: peer.nodeId, gi: peer.gi, changedBytes: peer.changedBlocks * BLOCK_SIZE },
        });
        if (waitForDemotion) this.waitForDemotion();
        else if (outcome.victim === null) this.goStandalone("split brain: resolve with `mailha volume resolve --keep-local` on the node whose data wins, `--discard-local` on the other");
        else if (mustCopy && copy === null) this.beginPreserve(`split brain, ${this.opt.splitBrainPolicy} policy`);
        else this.startResync(outcome.victim === "me" ? "peer" : "me", false, peer, peerBitmap, true, outcome.victim === "me" ? { changedBlocks: mine.changedBlocks, copy: copy?.path ?? null } : null);
        break;
      }
    }
    this.drainHandshakeQueue();
  }

  /** `volume resolve`: the operator's choice overrides a split brain or unrelated data. */
  private manualResolution(mine: Hello, peer: Hello, outcome: ConnectOutcome): ConnectOutcome | null {
    if (outcome.kind !== "split-brain" && outcome.kind !== "unrelated") return null;
    const a = mine.resolve;
    const b = peer.resolve;
    let source: Side | null = null;
    if (a === "local" || b === "peer") source = "me";
    if (a === "peer" || b === "local") source = source === "me" ? null : "peer";
    if (source === null) return null;
    const victimHello = source === "me" ? peer : mine;
    if (victimHello.role === "primary") return null;
    return { kind: "resync", source, full: outcome.kind === "unrelated", reason: `resolved by the operator (${source === "me" ? this.opt.nodeId : peer.nodeId} keeps its data)` };
  }

  private drainHandshakeQueue(): void {
    if (this.isHandshaking()) return;
    const q = this.handshakeQueue.splice(0);
    for (const ev of q) {
      if (ev.t === "write") this.onWrite(ev.req, ev.offset, ev.data);
      else if (ev.t === "flush") this.onFlush(ev.req);
    }
  }

  private goStandalone(reason: string): void {
    this.allowConnect = false;
    this.setConn("standalone");
    this.out.push({ t: "allow-connect", on: false });
    this.drop(reason);
  }

  private inSync(): void {
    const g = this.meta.gi;
    if (g.bitmap !== "") this.meta.gi = { current: g.current, bitmap: "", history: [g.bitmap, g.history[0]] };
    this.meta.crashedPrimary = false;
    this.resolveAs = null;
    this.bitmap.clearAll();
    this.persistBitmap();
    this.setDisk("uptodate");
    this.setPeerDisk("uptodate");
    this.store.saveMeta(this.meta);
    this.setConn("connected");
  }

  // ---- resync ------------------------------------------------------------------------

  /**
   * VICTIM: this side is the target and diverged from the source (split brain or
   * unrelated data): what it had changed, and the durable copy kept of it.
   */
  private startResync(source: Side, full: boolean, peer: Hello, peerBitmap: Bitmap, splitBrain: boolean, victim: { changedBlocks: number; copy: string | null } | null = null): void {
    const amSource = source === "me";
    const target = amSource ? peer : this.helloSent!;
    if (target.role === "primary") return this.goStandalone("the sync target is primary: demote it first");
    const set = new Bitmap(this.bitmap.blocks);
    if (full) set.setAll();
    else {
      set.union(this.bitmap);
      set.union(peerBitmap);
    }
    this.startResyncWith(amSource, full, set, target.fresh && full, splitBrain, victim);
  }

  private startResyncWith(amSource: boolean, full: boolean, set: Bitmap, targetFresh: boolean, splitBrain: boolean, victim: { changedBlocks: number; copy: string | null } | null = null): void {
    if (!amSource && this.meta.role === "primary") return this.goStandalone("refusing to become a sync target while primary");
    const now = this.opt.now();
    this.resolveAs = null;
    this.resync = {
      side: amSource ? "source" : "target",
      full,
      set,
      targetFresh,
      cursor: 0,
      inflight: [],
      inflightBytes: 0,
      sent: 0,
      acked: 0,
      received: [],
      totalBlocks: set.count,
      doneBlocks: 0,
      bytesSent: 0,
      startedMs: now,
      tokens: 0,
      lastRefillMs: now,
      lastProgressMs: now,
      ended: false,
    };
    // Both sides keep the resync set in their own durable bitmap: an interrupted
    // resync continues where it stopped.
    this.bitmap.union(set);
    this.persistBitmap();
    if (amSource) {
      this.setPeerDisk("inconsistent");
      this.setConn("sync-source");
    } else {
      this.setDisk("inconsistent");
      this.store.saveMeta(this.meta);
      this.setConn("sync-target");
    }
    this.emit({ type: "resync-started", side: this.resync.side, full, splitBrain, bytes: set.count * BLOCK_SIZE, ...(victim ? { diverged: true, changedBytes: victim.changedBlocks * BLOCK_SIZE, preserved: victim.copy } : {}) });
    if (amSource) this.pumpResync();
  }

  private pumpResync(): void {
    const r = this.resync;
    if (!r || r.side !== "source" || r.ended) return;
    const now = this.opt.now();
    // Token bucket at the configured rate; leaves room for application writes by
    // halving the rate while the application wrote in the last interval.
    const rate = this.writeBytesWindow > 0 ? this.opt.resyncRateBytesPerS / 2 : this.opt.resyncRateBytesPerS;
    r.tokens = Math.min(rate, r.tokens + ((now - r.lastRefillMs) / 1000) * rate);
    if (r.tokens <= 0 && r.inflight.length === 0 && r.sent === 0) r.tokens = RESYNC_CHUNK_BLOCKS * BLOCK_SIZE;
    r.lastRefillMs = now;
    let sentNow = 0;
    let scanned = 0;
    while (r.inflightBytes < RESYNC_WINDOW_BYTES && r.tokens > 0 && scanned < RESYNC_SCAN_BYTES_MAX) {
      const b = r.set.nextSet(r.cursor);
      if (b < 0) break;
      const n = r.set.runLength(b, RESYNC_CHUNK_BLOCKS);
      r.cursor = b + n;
      const offset = b * BLOCK_SIZE;
      const length = Math.min(n * BLOCK_SIZE, this.meta.sizeBytes - offset);
      const data = this.store.read(offset, length);
      scanned += length;
      if (r.targetFresh && isZero(data)) {
        r.set.clearBlocks(b, n);
        this.bitmap.clearBlocks(b, n);
        r.doneBlocks += n;
        continue;
      }
      this.send({ t: "resync-data", offset, data });
      r.inflight.push({ first: b, count: n });
      r.inflightBytes += length;
      r.tokens -= length;
      r.bytesSent += length;
      this.stats.resyncedBytes += length;
      r.sent++;
      sentNow++;
    }
    if (sentNow > 0) this.send({ t: "resync-barrier", count: r.sent });
    if (r.set.nextSet(r.cursor) < 0 && r.inflight.length === 0) {
      r.ended = true;
      this.send({ t: "resync-end", current: this.meta.gi.current });
    }
    this.progress();
  }

  private onResyncAck(count: number): void {
    const r = this.resync;
    if (!r || r.side !== "source") return;
    while (r.acked < count && r.inflight.length > 0) {
      const x = r.inflight.shift()!;
      r.acked++;
      r.inflightBytes -= Math.min(x.count * BLOCK_SIZE, this.meta.sizeBytes - x.first * BLOCK_SIZE);
      r.set.clearBlocks(x.first, x.count);
      this.bitmap.clearBlocks(x.first, x.count);
      r.doneBlocks += x.count;
    }
    this.pumpResync();
  }

  private onResyncData(offset: number, data: Buffer): void {
    const r = this.resync;
    if (!r || r.side !== "target") return;
    this.store.write(offset, data);
    r.received.push({ first: offset / BLOCK_SIZE, count: Math.ceil(data.length / BLOCK_SIZE) });
    r.bytesSent += data.length;
    this.stats.resyncedBytes += data.length;
  }

  private onResyncBarrier(count: number): void {
    const r = this.resync;
    if (!r || r.side !== "target") return;
    this.store.sync();
    for (const x of r.received.splice(0)) {
      this.bitmap.clearBlocks(x.first, x.count);
      r.doneBlocks += x.count;
    }
    this.persistBitmap();
    this.send({ t: "resync-ack", count });
    this.progress();
  }

  private onResyncEnd(current: string): void {
    const r = this.resync;
    if (!r || r.side !== "target") return;
    this.store.sync();
    this.bitmap.clearAll();
    this.persistBitmap();
    const g = this.meta.gi;
    this.meta.gi = g.current === current ? { current, bitmap: "", history: g.history } : { current, bitmap: "", history: [g.current, g.history[0]] };
    this.meta.fresh = false;
    this.meta.crashedPrimary = false;
    this.setDisk("uptodate");
    this.store.saveMeta(this.meta);
    this.finishResync(r);
    this.send({ t: "resync-done", current });
  }

  private onResyncDone(): void {
    const r = this.resync;
    if (!r || r.side !== "source") return;
    const g = this.meta.gi;
    if (g.bitmap !== "") this.meta.gi = { current: g.current, bitmap: "", history: [g.bitmap, g.history[0]] };
    this.meta.crashedPrimary = false;
    this.bitmap.clearAll();
    this.persistBitmap();
    this.setDisk("uptodate");
    this.setPeerDisk("uptodate");
    this.store.saveMeta(this.meta);
    this.finishResync(r);
  }

  private finishResync(r: ResyncState): void {
    const seconds = (this.opt.now() - r.startedMs) / 1000;
    this.resync = null;
    this.emit({ type: "resync-finished", side: r.side, bytes: r.bytesSent, blocks: r.totalBlocks, seconds });
    this.emit({ type: "generation", reason: "resync finished", gi: this.meta.gi });
    this.setConn("connected");
  }

  private progress(): void {
    const r = this.resync;
    if (!r) return;
    const now = this.opt.now();
    if (now - r.lastProgressMs < PROGRESS_EVERY_MS) return;
    r.lastProgressMs = now;
    this.emit({ type: "resync-progress", side: r.side, doneBytes: r.doneBlocks * BLOCK_SIZE, totalBytes: r.totalBlocks * BLOCK_SIZE });
  }

  // ---- verify ------------------------------------------------------------------------

  private startVerify(driver: boolean): void {
    const extents = Math.ceil(this.meta.sizeBytes / EXTENT_BYTES);
    this.verify = { driver, next: 0, outstanding: new Map(), mismatched: [], extents, startedMs: this.opt.now() };
    this.setConn("verifying");
    this.emit({ type: "verify-started", extents, driver });
    if (driver) this.pumpVerify();
  }

  private extentHash(e: number): string {
    const offset = e * EXTENT_BYTES;
    const len = Math.min(EXTENT_BYTES, this.meta.sizeBytes - offset);
    return createHash("sha256").update(this.store.read(offset, len)).digest("hex");
  }

  private pumpVerify(): void {
    const v = this.verify;
    if (!v || !v.driver) return;
    while (v.outstanding.size < VERIFY_OUTSTANDING_MAX && v.next < v.extents) {
      const e = v.next++;
      v.outstanding.set(e, this.extentHash(e));
      this.send({ t: "verify-req", extent: e });
    }
    if (v.next >= v.extents && v.outstanding.size === 0) {
      this.send({ t: "verify-end", mismatched: v.mismatched });
      this.endVerify(v.mismatched, true);
    }
  }

  private endVerify(mismatched: readonly number[], driver: boolean): void {
    const v = this.verify;
    this.verify = null;
    this.emit({ type: "verify-finished", extents: v?.extents ?? 0, mismatched: [...mismatched], seconds: v ? (this.opt.now() - v.startedMs) / 1000 : 0 });
    this.setConn("connected");
    if (mismatched.length === 0) return;
    const set = new Bitmap(this.bitmap.blocks);
    for (const e of mismatched) set.setBlocks(e * EXTENT_BLOCKS, Math.min(EXTENT_BLOCKS, this.bitmap.blocks - e * EXTENT_BLOCKS));
    // The driver (the primary, if there is one) has the data that counts.
    this.startResyncWith(driver, false, set, false, false);
  }

  // ---- messages ------------------------------------------------------------------------

  private onMsg(m: Msg): void {
    switch (m.t) {
      case "hello":
        return this.onPeerHello(m);
      case "bitmap":
        return this.onBitmapChunk(m);
      case "data":
        if (this.meta.role === "primary") return this.drop("protocol error: data sent to a primary");
        if (!this.inVolume(m.offset, m.data.length)) return this.protocolError(`a data block at ${m.offset} (+${m.data.length} bytes) outside the volume (${this.meta.sizeBytes} bytes)`);
        this.store.write(m.offset, m.data);
        if (this.meta.fresh) {
          this.meta.fresh = false;
          this.store.saveMeta(this.meta);
        }
        return;
      case "barrier":
        this.store.sync();
        return this.send({ t: "barrier-ack", seq: m.seq });
      case "barrier-ack":
        return this.onBarrierAck(m.seq);
      case "state":
        this.peerRole = m.role;
        this.setPeerDisk(m.disk);
        if (m.role === "primary" && this.meta.role === "primary") this.goStandalone("both nodes primary");
        return;
      case "role-request":
        return this.onRoleRequest();
      case "role-reply":
        return this.onRoleReply(m.granted, m.reason);
      case "resync-data":
        if (!this.inVolume(m.offset, m.data.length) || m.offset % BLOCK_SIZE !== 0) return this.protocolError(`a resync block at ${m.offset} (+${m.data.length} bytes) outside the volume (${this.meta.sizeBytes} bytes) or not block-aligned`);
        return this.onResyncData(m.offset, m.data);
      case "resync-barrier":
        return this.onResyncBarrier(m.count);
      case "resync-ack":
        return this.onResyncAck(m.count);
      case "resync-end":
        return this.onResyncEnd(m.current);
      case "resync-done":
        return this.onResyncDone();
      case "verify-start":
        if (this.conn === "connected") this.startVerify(true);
        return;
      case "verify-req":
        if (!this.verify) this.startVerify(false);
        return this.send({ t: "verify-res", extent: m.extent, hash: this.extentHash(m.extent) });
      case "verify-res": {
        const v = this.verify;
        if (!v || !v.driver) return;
        const mine = v.outstanding.get(m.extent);
        v.outstanding.delete(m.extent);
        if (mine !== undefined && mine !== m.hash) v.mismatched.push(m.extent);
        return this.pumpVerify();
      }
      case "verify-end":
        if (this.verify && !this.verify.driver) this.endVerify(m.mismatched, false);
        return;
    }
  }

  private onBarrierAck(seq: number): void {
    if (seq > this.seq) return this.protocolError(`acknowledgement of write ${seq}, beyond the last one sent (${this.seq})`);
    if (seq > this.acked) this.acked = seq;
    while (this.pending.length > 0 && this.pending[0]!.seq <= this.acked) this.pendingBytes -= this.pending.shift()!.length;
    // The machine's accounting, asserted where it changes: acked <= seq, and the bytes
    // in flight are those of the pending writes.
    if (this.acked > this.seq || this.pendingBytes < 0 || (this.pending.length === 0 && this.pendingBytes !== 0)) {
      throw new Error(`volume machine: accounting broken (acked ${this.acked}, seq ${this.seq}, pending ${this.pending.length} writes / ${this.pendingBytes} bytes)`);
    }
    while (this.flushWaiters.length > 0 && this.flushWaiters[0]!.seq <= this.acked) this.reply(this.flushWaiters.shift()!.req);
    while (this.deferred.length > 0 && this.pendingBytes <= this.opt.inFlightMaxBytes) this.reply(this.deferred.shift()!);
    if (this.demoteWaiter !== null && this.acked >= this.seq) this.finishDemote(this.demoteWaiter);
  }

  // ---- timers and operator commands ---------------------------------------------------

  private onTick(): void {
    if (this.reconnectAtMs !== null && this.opt.now() >= this.reconnectAtMs) this.enableConnect();
    this.demoteFrozenNow();
    if (this.resync?.side === "source") this.pumpResync();
    this.pumpVerify();
    // Ask for acknowledgements of writes nobody flushed, so `unackedBytes` drains.
    if (this.replicating && this.seq > this.lastBarrier) this.sendBarrier();
    this.writeBytesWindow = 0;
  }

  private onAdmin(req: number, cmd: AdminCmd): void {
    switch (cmd.op) {
      case "primary":
        return this.promote(req, !!cmd.force);
      case "secondary":
        return this.demote(req, !!cmd.exportBusy);
      case "verify":
        if (this.conn !== "connected") return this.reply(req, `cannot verify while ${this.conn}; the peer must be connected and in sync`);
        // The primary drives (its data counts); with no primary, the lower node id.
        if (this.meta.role === "primary" || (this.peerRole !== "primary" && this.opt.nodeId < (this.peer?.nodeId ?? ""))) this.startVerify(true);
        else this.send({ t: "verify-start" });
        return this.reply(req, undefined, { started: true });
      case "freeze":
        if (this.meta.role !== "primary") return this.reply(req, "only a primary's I/O can be frozen");
        if (!this.frozen) this.emit({ type: "io-frozen" });
        this.frozen = true;
        // What still waits for the peer fails now, not when the link times out: the
        // fenced node's file system lets go at once (nothing here counts as durable).
        for (const w of this.flushWaiters.splice(0)) this.reply(w.req, "EIO: I/O frozen while this node is fenced");
        for (const r of this.deferred.splice(0)) this.reply(r, "EIO: I/O frozen while this node is fenced");
        for (const q of this.handshakeQueue.splice(0)) if (q.t === "write" || q.t === "flush") this.reply(q.req, "EIO: I/O frozen while this node is fenced");
        return this.reply(req, undefined, { frozen: true });
      case "outdate":
        if (this.meta.role === "primary") return this.reply(req, "a primary cannot be outdated");
        if (this.replicating || this.conn === "sync-target") return this.reply(req, "connected to the peer: it is not outdated");
        this.setDisk(this.meta.disk === "inconsistent" ? "inconsistent" : "outdated");
        this.store.saveMeta(this.meta);
        return this.reply(req, undefined, { disk: this.meta.disk });
      case "resolve":
        this.resolveAs = cmd.keep;
        if (this.preserving) this.preserving.reconnect = true;
        else this.enableConnect();
        return this.reply(req, undefined, { resolveAs: cmd.keep === "local" ? "keep-local" : "discard-local", ...(this.preserving ? { preserving: true } : {}) });
      case "connect":
        if (this.preserving) {
          this.preserving.reconnect = true;
          return this.reply(req, undefined, { connection: this.conn, preserving: true });
        }
        this.preserveError = null;
        this.enableConnect();
        return this.reply(req, undefined, { connection: this.conn });
      case "drop-preserved":
        return this.dropPreserved(req, cmd.path, !!cmd.force);
      case "mark-reconciled": {
        const p = this.findPreserved(cmd.path);
        if (!p) return this.reply(req, `no preserved copy "${cmd.path}" (\`mailha volume preserved list\` shows them)`);
        p.reconciledAtMs = this.opt.now();
        this.store.saveMeta(this.meta);
        this.emit({ type: "preserved-reconciled", path: p.path });
        return this.reply(req, undefined, { path: p.path, reconciledAtMs: p.reconciledAtMs });
      }
      case "disconnect":
        if (this.preserving) this.preserving.reconnect = false;
        this.reconnectAtMs = null;
        this.allowConnect = false;
        this.out.push({ t: "allow-connect", on: false });
        if (this.peer || this.helloSent) this.drop("disconnected by the operator");
        else this.setConn("standalone");
        return this.reply(req, undefined, { connection: "standalone" });
    }
  }

  private findPreserved(path: string): PreservedCopy | undefined {
    return this.meta.preserved.find((p) => p.path === path || p.path.endsWith(`/${path}`));
  }

  private dropPreserved(req: number, path: string, force: boolean): void {
    const p = this.findPreserved(path);
    if (!p) return this.reply(req, `no preserved copy "${path}" (\`mailha volume preserved list\` shows them)`);
    if (!p.reconciledAtMs && !force) return this.reply(req, `the copy ${p.path} holds changes not yet reconciled (\`mailha reconcile\` merges them into the survivor); --force drops it anyway`);
    this.meta.preserved.splice(this.meta.preserved.indexOf(p), 1);
    this.store.saveMeta(this.meta);
    this.out.push({ t: "remove-preserved", path: p.path });
    this.emit({ type: "preserved-dropped", path: p.path, reconciled: !!p.reconciledAtMs });
    this.reply(req, undefined, { dropped: p.path, reconciled: !!p.reconciledAtMs });
  }

  private promote(req: number, force: boolean): void {
    if (this.meta.role === "primary") return this.reply(req, undefined, { role: "primary" });
    if (this.preserving) return this.reply(req, "refused: a copy of this side is being made before the peer's data overwrites it; wait for it (`mailha volume status`)");
    if (this.peerRole === "primary" && this.peer) return this.reply(req, "refused: the peer is primary and connected");
    const d = this.meta.disk;
    if (this.conn === "sync-target") return this.reply(req, "refused: this side is the target of a resync (Inconsistent)");
    if (this.conn === "verifying") return this.reply(req, "refused: an online verify is running; wait for it to finish or disconnect");
    if ((d === "inconsistent" || d === "outdated" || d === "diskless") && !force) return this.reply(req, `refused: local disk is ${d}; --force only if you accept losing the peer's newer data`);
    const peerSafe = this.peer !== null || this.meta.peerOutdated;
    if (d === "consistent" && !peerSafe && !force) return this.reply(req, "refused: local disk is Consistent and the peer's state is unknown; use --force only when the peer is down or fenced");
    if (d === "diskless") return this.reply(req, "refused: no local disk");
    if (this.promoteWaiter !== null) return this.reply(req, "a promotion is already waiting for the peer");
    // While connected, becoming primary is agreed with the peer first, so two nodes
    // that both ask at once cannot both succeed.
    if (this.peer) {
      this.promoteWaiter = { req, force };
      this.send({ t: "role-request" });
      return;
    }
    this.finishPromote(req, force);
  }

  private onRoleRequest(): void {
    let reason = "";
    if (this.meta.role === "primary") reason = "the peer is primary";
    else if (this.promoteWaiter !== null && this.opt.nodeId < (this.peer?.nodeId ?? "")) reason = `both nodes asked to become primary; ${this.opt.nodeId} goes first`;
    else if (this.conn === "verifying") reason = "an online verify is running";
    if (!reason) this.peerRole = "primary";
    this.send({ t: "role-reply", granted: !reason, reason });
  }

  private onRoleReply(granted: boolean, reason: string): void {
    const w = this.promoteWaiter;
    if (!w) return;
    this.promoteWaiter = null;
    if (!granted) return this.reply(w.req, `refused by the peer: ${reason}`);
    this.finishPromote(w.req, w.force);
  }

  private finishPromote(req: number, force: boolean): void {
    const wasConnected = this.peer !== null;
    let rehandshake = false;
    if (!wasConnected) {
      if (this.meta.gi.current === "") this.meta.gi = { ...this.meta.gi, current: this.opt.newId() };
      this.newGeneration("became primary without its peer");
    } else if (this.meta.gi.current === "") {
      // Brand-new pair: forcing this side gives it the first generation; a new
      // handshake then starts the initial (full) sync from it.
      this.meta.gi = { current: this.opt.newId(), bitmap: "", history: ["", ""] };
      rehandshake = true;
    }
    this.meta.role = "primary";
    this.meta.primarySinceMs = this.opt.now();
    this.meta.cleanShutdown = false;
    this.setDisk("uptodate");
    this.store.saveMeta(this.meta);
    this.emit({ type: "role", role: "primary", forced: force });
    if (rehandshake) this.drop("first promotion of a new pair: reconnecting to start the initial sync");
    else if (this.peer) this.send({ t: "state", role: "primary", disk: this.meta.disk });
    this.out.push({ t: "export", on: true });
    this.reply(req, undefined, { role: "primary" });
  }

  private demote(req: number, exportBusy: boolean): void {
    if (this.meta.role === "secondary") return this.reply(req, undefined, { role: "secondary" });
    if (exportBusy) return this.reply(req, "refused: the volume is in use (unmount the file system and detach the loop device first)");
    if (this.demoteWaiter !== null) return this.reply(req, "a demotion is already waiting for the peer");
    // A clean demotion leaves nothing that only this node has: local writes are made
    // durable, and writes in flight are either acknowledged by the peer or (if the
    // peer goes away first) recorded in the durable bitmap.
    this.store.sync();
    if (this.replicating && this.acked < this.seq) {
      if (this.seq > this.lastBarrier) this.sendBarrier();
      this.demoteWaiter = req;
      this.demoteDeadlineMs = this.opt.now() + FROZEN_DEMOTE_WAIT_MS;
      return;
    }
    this.finishDemote(req);
  }

  /** A frozen primary's demotion that waited long enough: the unacknowledged writes are recorded, then it goes. */
  private demoteFrozenNow(): void {
    if (this.demoteWaiter === null || !this.frozen || this.opt.now() < this.demoteDeadlineMs) return;
    for (const p of this.pending) this.markOutOfSync(p.offset, p.length);
    this.emit({ type: "demoted-without-peer-ack", unackedBytes: this.pendingBytes });
    this.finishDemote(this.demoteWaiter);
  }

  private finishDemote(req: number): void {
    this.demoteWaiter = null;
    this.frozen = false;
    this.newCurrentDue = false;
    this.store.sync(); // writes accepted while the demotion waited

    if (this.bitmapDirty) this.persistBitmap();
    this.meta.role = "secondary";
    this.meta.cleanShutdown = true;
    this.store.saveMeta(this.meta);
    this.out.push({ t: "export", on: false });
    this.emit({ type: "role", role: "secondary" });
    if (this.peer) this.send({ t: "state", role: "secondary", disk: this.meta.disk });
    this.reply(req, undefined, { role: "secondary" });
  }

  // ---- preserved copies -----------------------------------------------------------

  /** The complete copy of this side's current generation, if one was made. */
  private copyOfCurrent(): PreservedCopy | null {
    return this.meta.preserved.find((p) => p.gi.current === this.meta.gi.current && p.gi.bitmap === this.meta.gi.bitmap) ?? null;
  }

  /**
   * Before this side is overwritten: StandAlone (nothing reaches the image: it is a
   * secondary with no export and no link), the engine copies it, and only when the
   * copy is durable does the link come back; the next handshake then finds the copy
   * and starts the resync.
   */
  private beginPreserve(reason: string): void {
    this.preserving = { reason, sinceMs: this.opt.now(), reconnect: true };
    this.preserveError = null;
    this.emit({ type: "preserving", reason, changedBytes: this.bitmap.count * BLOCK_SIZE });
    this.goStandalone(`keeping a copy of this side before the peer's data overwrites it (${reason})`);
    this.out.push({ t: "preserve", reason });
  }

  private onPreserved(path: string, method: "reflink" | "copy", diskBytes: number): void {
    const p = this.preserving;
    if (!p) return;
    this.preserving = null;
    this.meta.preserved.push({ path, atMs: this.opt.now(), gi: this.meta.gi, changedBlocks: this.bitmap.count, reason: p.reason, method, diskBytes, reconciledAtMs: null });
    this.store.saveMeta(this.meta);
    this.emit({ type: "preserved", path, reason: p.reason, method, diskBytes, changedBytes: this.bitmap.count * BLOCK_SIZE });
    if (p.reconnect) this.enableConnect();
  }

  private onPreserveFailed(error: string): void {
    if (!this.preserving) return;
    this.preserving = null;
    this.preserveError = error;
    this.emit({ type: "preserve-failed", error });
    // Stays StandAlone: it is never overwritten uncopied. `volume connect` tries again.
  }

  /** StandAlone for a moment, then connect again (see onTick): one side will step down. */
  private waitForDemotion(): void {
    this.goStandalone("split brain with both nodes primary: waiting for one to step down, then it is preserved and resynced");
    this.reconnectAtMs = this.opt.now() + BOTH_PRIMARY_RETRY_MS;
  }

  private enableConnect(): void {
    this.reconnectAtMs = null;
    if (this.allowConnect) return;
    this.allowConnect = true;
    this.out.push({ t: "allow-connect", on: true });
    this.setConn("connecting");
  }

  // ---- small helpers --------------------------------------------------------------------

  /**
   * Makes the bitmap durable. Local data is synced first: a cleared bit says "the
   * peer has what I have", which must stay true if this node then loses its cache.
   */
  private persistBitmap(): void {
    this.store.sync();
    this.store.saveBitmap(this.bitmap);
    this.bitmapDirty = false;
  }

  private send(msg: Msg): void {
    this.out.push({ t: "send", msg });
  }
  private reply(req: number, error?: string, result?: unknown): void {
    this.out.push(error === undefined ? { t: "reply", req, result } : { t: "reply", req, error });
  }
  private emit(ev: VolumeEvent): void {
    this.out.push({ t: "event", ev });
  }
  private drop(reason: string): void {
    this.out.push({ t: "drop", reason });
  }
  /** The peer sent what it must not: drop the link, count it, say why. */
  private protocolError(what: string): void {
    this.stats.protocolErrors++;
    this.emit({ type: "protocol-error", reason: what });
    this.drop(`protocol error: ${what}`);
  }
  /** [OFFSET, OFFSET+LENGTH) is a range of bytes of this volume. */
  private inVolume(offset: number, length: number): boolean {
    return Number.isSafeInteger(offset) && offset >= 0 && length >= 0 && offset + length <= this.meta.sizeBytes;
  }
  private setConn(c: ConnState): void {
    if (c === this.conn) return;
    const prev = this.conn;
    if (!CONN_NEXT[prev].includes(c)) throw new Error(`volume machine: connection ${prev} -> ${c} is not a transition (CONN_NEXT)`);
    this.conn = c;
    // Writes reach the peer again: a generation left due is no longer needed.
    if (this.replicating || c === "sync-target") this.newCurrentDue = false;
    this.emit({ type: "connection", state: c, prev });
  }
  private setDisk(d: DiskState): void {
    if (d === this.meta.disk) return;
    const prev = this.meta.disk;
    if (!DISK_NEXT[prev].includes(d)) throw new Error(`volume machine: disk ${prev} -> ${d} is not a transition (DISK_NEXT)`);
    this.meta.disk = d;
    this.emit({ type: "disk", disk: d, prev });
  }
  private setPeerDisk(d: DiskState): void {
    if (d === this.peerDisk) return;
    this.peerDisk = d;
    this.emit({ type: "peer-disk", disk: d });
  }
}

/**
 * The connection states each state may go to (DRBD's `cstate` checks, central). A
 * drop goes to `connecting` (or `standalone` when connecting is off: disconnect, a
 * split brain); a resync or verify ends `connected`; a resync may follow a handshake
 * or a verify that found differences.
 */
export const CONN_NEXT: Readonly<Record<ConnState, readonly ConnState[]>> = {
  standalone: ["connecting"],
  connecting: ["connected", "sync-source", "sync-target", "standalone"],
  connected: ["connecting", "verifying", "sync-source", "sync-target", "standalone"],
  "sync-source": ["connected", "connecting", "standalone"],
  "sync-target": ["connected", "connecting", "standalone"],
  verifying: ["connected", "connecting", "sync-source", "sync-target", "standalone"],
};

/**
 * This side's disk states and where each may go: UpToDate becomes Consistent when a
 * secondary loses its peer, Inconsistent when it becomes a resync target, Outdated by
 * the outdate-peer step; only a finished resync (or a handshake with nothing to sync)
 * makes a disk UpToDate; an Inconsistent disk never becomes Consistent or Outdated
 * without a resync (`outdate` leaves it Inconsistent).
 */
export const DISK_NEXT: Readonly<Record<DiskState, readonly DiskState[]>> = {
  uptodate: ["consistent", "inconsistent", "outdated"],
  consistent: ["uptodate", "inconsistent", "outdated"],
  outdated: ["uptodate", "inconsistent"],
  inconsistent: ["uptodate"],
  diskless: [],
  unknown: [],
};

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += 8) {
    if (i + 8 <= b.length) {
      if (b.readBigUInt64LE(i) !== 0n) return false;
    } else {
      for (let j = i; j < b.length; j++) if (b[j] !== 0) return false;
    }
  }
  return true;
}
