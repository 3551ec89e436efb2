// A deterministic simulation of two volume engines: the real protocol core
// (replication/machine.ts) against a simulated disk (a volatile cache that a crash
// loses, and durable blocks) and a simulated network (ordered links with delays that a
// cable pull or a crash empties). A seed drives every choice, so a failing schedule
// can be replayed exactly. Invariants are checked after every step.
import { Bitmap } from "../../replication/bitmap.ts";
import { VolumeMachine, type Action, type Event, type Store } from "../../replication/machine.ts";
import { BLOCK_SIZE, EMPTY_GI, type Meta, type Msg, type Protocol, type SplitBrainPolicy } from "../../replication/types.ts";

export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const BLOCKS = 2048 + 512; // 10 MiB: three activity-log extents, the last one partial
const SIZE = BLOCKS * BLOCK_SIZE;

/** Block contents are versions: 8 bytes at the start of the block, zero = never written. */
function versionOf(b: Buffer, at = 0): number {
  return b.readDoubleLE(at);
}

class SimStore implements Store {
  readonly sizeBytes = SIZE;
  durable = new Float64Array(BLOCKS);
  cache = new Map<number, number>();
  meta: Meta;
  bitmapBytes: Uint8Array;
  al: number[] = [];
  copies = 0;
  constructor(nodeId: string, primary: boolean, newId: () => string) {
    this.meta = {
      version: 1, nodeId, sizeBytes: SIZE, blockSize: BLOCK_SIZE,
      gi: primary ? { ...EMPTY_GI, current: newId() } : EMPTY_GI,
      disk: primary ? "uptodate" : "inconsistent", role: "secondary", primarySinceMs: null,
      fresh: true, cleanShutdown: true, crashedPrimary: false, peerOutdated: false, preserved: [],
    };
    this.bitmapBytes = new Uint8Array(Math.ceil(BLOCKS / 8));
  }
  view(b: number): number {
    return this.cache.get(b) ?? this.durable[b]!;
  }
  read(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    for (let b = offset / BLOCK_SIZE; b * BLOCK_SIZE < offset + length; b++) {
      const v = this.view(b);
      if (v) out.writeDoubleLE(v, b * BLOCK_SIZE - offset);
    }
    return out;
  }
  write(offset: number, data: Buffer): void {
    for (let i = 0; i < data.length; i += BLOCK_SIZE) this.cache.set((offset + i) / BLOCK_SIZE, versionOf(data, i));
  }
  sync(): void {
    for (const [b, v] of this.cache) this.durable[b] = v;
    this.cache.clear();
  }
  saveMeta(m: Meta): void {
    this.meta = structuredClone(m);
  }
  saveBitmap(b: Bitmap): void {
    this.bitmapBytes = new Uint8Array(b.bytes);
  }
  saveAL(e: readonly number[]): void {
    this.al = [...e];
  }
  /** The preserved copies' contents (what each block held when the copy was made). */
  readonly copyContents = new Map<string, Float64Array>();
  readonly copiesUsed = new Set<string>();
  preserve(): string {
    const path = `sim-copy-${this.meta.nodeId}-${++this.copies}`;
    const snap = new Float64Array(BLOCKS);
    for (let b = 0; b < BLOCKS; b++) snap[b] = this.view(b);
    this.copyContents.set(path, snap);
    return path;
  }
  /** Power loss: the volatile cache is gone. */
  crash(): void {
    this.cache.clear();
  }
  durableBit(b: number): boolean {
    return (this.bitmapBytes[b >> 3]! & (1 << (b & 7))) !== 0;
  }
}

interface SimNode {
  readonly id: string;
  readonly store: SimStore;
  m: VolumeMachine | null; // null while crashed
  allowConnect: boolean;
  retired: Set<string>;
  lastCurrent: string;
  /** Requests waiting for a reply: writes (block, version) and flushes (snapshot). */
  readonly writes: Map<number, { blocks: number[]; version: number }>;
  readonly flushes: Map<number, Map<number, number>>;
  /** Latest acknowledged version per block written through this node. */
  readonly acked: Map<number, number>;
}

export interface SimOptions {
  readonly seed: number;
  readonly steps: number;
  readonly protocol: Protocol;
  readonly policy: SplitBrainPolicy;
  readonly splitBrains: boolean;
  /** Keep the whole log (for replay) instead of the last lines. */
  readonly trace?: boolean;
}

export interface SimResult {
  readonly steps: number;
  readonly writes: number;
  readonly flushesChecked: number;
  readonly resyncs: number;
  readonly splitBrains: number;
  readonly crashes: number;
  readonly verifies: number;
  /** Fenced primaries that demoted without the peer's acknowledgements. */
  readonly fencedDemotions: number;
  /** Copies of a diverged side made before it was overwritten. */
  readonly preserved: number;
  /** One of two primaries demoted (preserve policy: the volume then heals without the operator). */
  readonly stepDowns: number;
}

export class InvariantError extends Error {}

export function runSimulation(o: SimOptions): SimResult {
  const r = rng(o.seed);
  let now = 1_000_000;
  let idCounter = 0;
  const newId = () => (++idCounter).toString(16).padStart(16, "0");
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  let version = 0;
  let req = 0;
  const log: string[] = [];
  const stats = { writes: 0, flushesChecked: 0, resyncs: 0, splitBrains: 0, crashes: 0, verifies: 0, fencedDemotions: 0, preserved: 0, stepDowns: 0 };
  let splitBrainHappened = false;
  const inSyncAtPeerDeath = new Map<object, boolean>();
  const lastInSync = new Map<object, boolean>();
  const deadSeen = new Set<object>();

  const mk = (id: string, primary: boolean): SimNode => ({
    id, store: new SimStore(id, primary, newId), m: null, allowConnect: true, retired: new Set(), lastCurrent: "",
    writes: new Map(), flushes: new Map(), acked: new Map(),
  });
  const nodes = [mk("a", true), mk("b", false)] as const;
  const other = (n: SimNode) => (n === nodes[0] ? nodes[1] : nodes[0]);

  // The link: connected flag and a queue per direction (delivery time, message).
  let linkUp = false;
  let silentSince: number | null = null;
  let cablePulled = false;
  const queues = new Map<SimNode, { at: number; msg: Msg }[]>([[nodes[0], []], [nodes[1], []]]);
  // Copies asked for by `preserve` actions, finished (or failed: no space) a little later.
  let copiesDue: { n: SimNode; m: VolumeMachine; at: number }[] = [];

  const fail = (what: string): never => {
    throw new InvariantError(`seed ${o.seed}: ${what}\n--- last steps ---\n${log.slice(o.trace ? 0 : -40).join("\n")}`);
  };

  const start = (n: SimNode) => {
    n.m = new VolumeMachine(structuredClone(n.store.meta), new Bitmap(BLOCKS, new Uint8Array(n.store.bitmapBytes)), n.store.al, n.store, {
      nodeId: n.id, protocol: o.protocol, splitBrainPolicy: o.policy, alExtents: 2,
      resyncRateBytesPerS: 64 * 1024 * 1024, inFlightMaxBytes: 256 * 1024, now: () => now, newId,
    });
    n.allowConnect = true;
    n.writes.clear();
    n.flushes.clear();
  };

  const apply = (n: SimNode, ev: Event) => {
    if (!n.m) return;
    const actions = n.m.handle(ev);
    for (const a of actions) act(n, a);
  };

  const act = (n: SimNode, a: Action) => {
    switch (a.t) {
      case "send": {
        if (!linkUp) break;
        const q = queues.get(other(n))!;
        // The bitmap chunks after a hello leave in the same write as the hello: same
        // delivery time, and no draw from the seeded stream (schedules stay as they were).
        if (a.msg.t === "bitmap") q.push({ at: q.at(-1)?.at ?? now, msg: a.msg });
        else q.push({ at: now + Math.floor(r() * 5), msg: a.msg });
        break;
      }
      case "drop":
        log.push(`${n.id} drops the link: ${a.reason}`);
        linkDown();
        break;
      case "allow-connect":
        n.allowConnect = a.on;
        break;
      case "reply":
        onReply(n, a.req, a.error);
        break;
      case "event":
        log.push(`${n.id} ${JSON.stringify(a.ev)}`);
        if (a.ev.type === "resync-started") stats.resyncs++;
        if (a.ev.type === "split-brain") stats.splitBrains++;
        if (a.ev.type === "demoted-without-peer-ack") stats.fencedDemotions++;
        if (a.ev.type === "preserved") stats.preserved++;
        if (a.ev.type === "resync-started" && a.ev.side === "target" && a.ev.diverged === true) checkCopied(n, a.ev);
        break;
      case "preserve":
        if (n.m) copiesDue.push({ n, m: n.m, at: now + Math.floor(r() * 200) });
        break;
      case "remove-preserved":
      case "export":
        break;
      case "sync":
        n.store.sync();
        break;
    }
  };

  const onReply = (n: SimNode, id: number, error?: string) => {
    const w = n.writes.get(id);
    if (w) {
      n.writes.delete(id);
      if (!error) for (const b of w.blocks) n.acked.set(b, w.version);
      return;
    }
    const f = n.flushes.get(id);
    if (f) {
      n.flushes.delete(id);
      if (error) return;
      stats.flushesChecked++;
      const peer = other(n);
      for (const [block, v] of f) {
        if (n.store.durable[block]! < v) fail(`flush acknowledged on ${n.id} but block ${block} version ${v} is not durable locally (has ${n.store.durable[block]})`);
        const onPeer = peer.store.durable[block]! >= v;
        const recorded = n.store.durableBit(block);
        if (o.protocol === "C" && !onPeer && !recorded)
          fail(`protocol C: flush acknowledged on ${n.id}, but block ${block} version ${v} is neither durable on ${peer.id} (has ${peer.store.durable[block]}) nor in ${n.id}'s durable bitmap`);
      }
    }
  };

  const linkDown = () => {
    silentSince = null;
    if (!linkUp) return;
    linkUp = false;
    queues.get(nodes[0])!.length = 0;
    queues.get(nodes[1])!.length = 0;
    for (const n of nodes) apply(n, { t: "disconnected", reason: "link down" });
  };

  const tryConnect = () => {
    if (linkUp || cablePulled) return;
    if (!nodes.every((n) => n.m && n.allowConnect)) return;
    linkUp = true;
    log.push("link up");
    for (const n of nodes) apply(n, { t: "connected" });
  };

  const deliver = (limit: number) => {
    // A link that went silent (a cut cable both sides have not noticed yet) delivers
    // nothing until the ping timeout takes it down.
    if (silentSince !== null) {
      if (now - silentSince > 1500) {
        log.push("silent link timed out");
        silentSince = null;
        linkDown();
      }
      return;
    }
    for (let i = 0; i < limit; i++) {
      const ready = nodes.filter((n) => queues.get(n)!.length > 0);
      if (ready.length === 0) return;
      const n = pick(ready);
      const q = queues.get(n)!;
      const m = q.shift()!;
      if (m.at > now) now = m.at;
      if (o.trace && (m.msg.t === "data" || m.msg.t === "resync-data")) log.push(`${n.id} recv ${m.msg.t} blocks ${m.msg.offset / BLOCK_SIZE}+${m.msg.data.length / BLOCK_SIZE} v${m.msg.data.readDoubleLE(0)}`);
      else if (o.trace && m.msg.t !== "hello") log.push(`${n.id} recv ${JSON.stringify(m.msg)}`);
      apply(n, { t: "msg", msg: m.msg });
      // A hello's bitmap chunks arrive with it, in the same step (no extra draws).
      while (q[0]?.msg.t === "bitmap") apply(n, { t: "msg", msg: q.shift()!.msg });
    }
  };

  const primaries = () => nodes.filter((n) => n.m?.role === "primary");

  const write = (n: SimNode) => {
    const count = r() < 0.8 ? 1 : 1 + Math.floor(r() * 8);
    const first = r() < 0.7 ? Math.floor(r() * 64) : Math.floor(r() * (BLOCKS - count));
    const id = ++req;
    const data = Buffer.alloc(count * BLOCK_SIZE);
    const v = ++version;
    for (let i = 0; i < count; i++) data.writeDoubleLE(v, i * BLOCK_SIZE);
    n.writes.set(id, { blocks: Array.from({ length: count }, (_, i) => first + i), version: v });
    stats.writes++;
    if (o.trace) log.push(`${n.id} app-write v${v} blocks ${first}+${count}`);
    apply(n, { t: "write", req: id, offset: first * BLOCK_SIZE, data });
  };

  const flush = (n: SimNode) => {
    const id = ++req;
    n.flushes.set(id, new Map(n.acked));
    apply(n, { t: "flush", req: id });
  };

  const promote = (n: SimNode, force: boolean) => {
    const id = ++req;
    // Only writes acknowledged in this node's current term as primary are checked.
    n.acked.clear();
    apply(n, { t: "admin", req: id, cmd: { op: "primary", force } });
  };

  // A diverged side that changed anything is overwritten only after a complete copy
  // of exactly what it holds now (nothing of it is overwritten yet at this point).
  const checkCopied = (n: SimNode, ev: Record<string, unknown>) => {
    if (ev.changedBytes === 0) return;
    const path = ev.preserved;
    if (typeof path !== "string") fail(`${n.id} becomes the sync target after a divergence with ${String(ev.changedBytes)} bytes changed, and no copy was kept`);
    const snap = n.store.copyContents.get(path as string);
    if (!snap) fail(`${n.id}: the preserved copy ${String(path)} named at resync start was never made`);
    // An interrupted resync resumes on the same copy: only its first use is compared.
    if (n.store.copiesUsed.has(path as string)) return;
    n.store.copiesUsed.add(path as string);
    for (let b = 0; b < BLOCKS; b++) if (snap![b] !== n.store.view(b)) fail(`${n.id}: block ${b} changed between its copy ${String(path)} (version ${snap![b]}) and the resync (version ${n.store.view(b)})`);
  };

  const finishCopies = () => {
    const due = copiesDue.filter((c) => c.at <= now);
    copiesDue = copiesDue.filter((c) => c.at > now);
    for (const c of due) {
      if (c.n.m !== c.m) continue; // crashed meanwhile: the copy was lost with it
      if (r() < 0.1) {
        log.push(`${c.n.id}: the copy fails (no space)`);
        apply(c.n, { t: "preserve-failed", error: "no space (simulated)" });
        continue;
      }
      const path = c.n.store.preserve();
      log.push(`${c.n.id}: copy ${path} made`);
      apply(c.n, { t: "preserve-done", path, method: "copy", diskBytes: 0 });
      tryConnect();
    }
  };

  const checkInvariants = () => {
    for (const n of nodes) {
      if (!n.m) continue;
      const cur = n.m.meta.gi.current;
      if (cur !== n.lastCurrent) {
        if (n.lastCurrent) n.retired.add(n.lastCurrent);
        if (n.retired.has(cur)) fail(`generation identifiers went backwards on ${n.id}: current ${cur} was retired before`);
        n.lastCurrent = cur;
      }
      if (n.m.role === "primary" && n.m.disk === "inconsistent") fail(`${n.id} is primary on an Inconsistent disk`);
    }
    const [a, b] = nodes;
    if (a.m && b.m && linkUp && a.m.role === "primary" && b.m.role === "primary" && a.m.replicating && b.m.replicating) fail("two primaries connected to each other");
    // Quiescent and connected in sync: both images must be identical.
    if (a.m && b.m && linkUp && a.m.connection === "connected" && b.m.connection === "connected" && queues.get(a)!.length === 0 && queues.get(b)!.length === 0
      && a.m.status().unackedBytes === 0 && b.m.status().unackedBytes === 0 && a.m.meta.gi.current !== "" && a.m.meta.gi.current === b.m.meta.gi.current) {
      for (let blk = 0; blk < BLOCKS; blk++) {
        if (a.store.view(blk) !== b.store.view(blk)) fail(`connected and in sync, but block ${blk} differs: ${a.id} has version ${a.store.view(blk)}, ${b.id} has ${b.store.view(blk)}`);
      }
    }
  };

  start(nodes[0]);
  start(nodes[1]);
  tryConnect();
  deliver(10);
  promote(nodes[0], false);

  for (let step = 0; step < o.steps; step++) {
    now += 1 + Math.floor(r() * 20);
    finishCopies();
    const x = r();
    const prim = primaries();
    if (x < 0.35 && prim.length) {
      write(pick(prim));
    } else if (x < 0.45 && prim.length) {
      flush(pick(prim));
    } else if (x < 0.7) {
      deliver(1 + Math.floor(r() * 10));
    } else if (x < 0.78) {
      for (const n of nodes) apply(n, { t: "tick" });
    } else if (x < 0.8) {
      log.push("cable pulled");
      cablePulled = true;
      linkDown();
    } else if (x < 0.86) {
      cablePulled = false;
      tryConnect();
    } else if (x < 0.875) {
      const n = pick(nodes.filter((k) => k.m));
      if (n) {
        log.push(`${n.id} crashes`);
        stats.crashes++;
        n.store.crash();
        n.m = null;
        n.acked.clear();
        linkDown();
      }
    } else if (x < 0.9) {
      const n = nodes.find((k) => !k.m);
      if (n) {
        log.push(`${n.id} restarts`);
        start(n);
        // A restarted node does not know what its peer did meanwhile.
        inSyncAtPeerDeath.set(n, false);
        lastInSync.set(n, false);
        tryConnect();
      }
    } else if (x < 0.94) {
      // The cluster manager: promote a secondary when there is no live primary.
      // Without its peer it forces only when the peer is dead and this node was in
      // sync when it died (what fencing and quorum establish in the real cluster).
      if (primaries().length === 0) {
        const cands = nodes.filter((n) => n.m);
        const n = cands.length ? pick(cands) : null;
        if (n?.m) {
          const peer = other(n);
          const force = !peer.m && n.m.disk === "consistent" && !splitBrainHappened && inSyncAtPeerDeath.get(n) === true;
          promote(n, force);
        }
      }
    } else if (x < 0.95) {
      const p = primaries()[0];
      if (p && other(p).m && linkUp && p.m!.connection === "connected") {
        log.push(`switchover from ${p.id}`);
        apply(p, { t: "admin", req: ++req, cmd: { op: "secondary" } });
        promote(other(p), false);
      }
    } else if (x < 0.955 && o.splitBrains) {
      // Split brain on purpose: partition, then both sides primary.
      const n = nodes.find((k) => k.m && k.m.role === "secondary");
      if (n && n.m && (n.m.disk === "consistent" || n.m.disk === "uptodate")) {
        log.push(`split brain: ${n.id} forced primary while partitioned`);
        cablePulled = true;
        linkDown();
        promote(n, true);
        splitBrainHappened = true;
      }
    } else if (x < 0.96) {
      const n = nodes.find((k) => k.m && k.m.connection === "connected" && linkUp);
      if (n) {
        stats.verifies++;
        apply(n, { t: "admin", req: ++req, cmd: { op: "verify" } });
      }
    } else if (x < 0.97) {
      // Resolve a split brain by hand when the policy left both standalone.
      const sa = nodes.filter((k) => k.m && k.m.connection === "standalone");
      const failedCopy = nodes.find((k) => k.m && k.m.connection === "standalone" && k.m.status().preserveError !== null);
      const both = nodes.every((k) => k.m && k.m.role === "primary");
      if (both && o.policy === "preserve") {
        // The cluster manager stops one of two active nodes; the volume heals itself.
        const later = pick(nodes);
        log.push(`${later.id} steps down: the peer is active too`);
        apply(later, { t: "admin", req: ++req, cmd: { op: "secondary" } });
        stats.stepDowns++;
      } else if (failedCopy) {
        // The operator made room after a copy failed: connect again, the copy is retried.
        log.push(`${failedCopy.id}: operator connects again after the failed copy`);
        apply(failedCopy, { t: "admin", req: ++req, cmd: { op: "connect" } });
        tryConnect();
      } else if (sa.length >= 1 && nodes.every((k) => k.m)) {
        // Usually only one side is StandAlone: the other saw the link drop first.
        const loser = pick(nodes);
        if (loser.m!.role === "primary") apply(loser, { t: "admin", req: ++req, cmd: { op: "secondary" } });
        apply(loser, { t: "admin", req: ++req, cmd: { op: "resolve", keep: "peer" } });
        apply(other(loser), { t: "admin", req: ++req, cmd: { op: "connect" } });
        tryConnect();
      }
    } else if (x < 0.975) {
      // The cluster manager fences the primary: I/O frozen first, then it is demoted
      // (or it dies meanwhile). What waited for the peer fails instead of lingering.
      const p = primaries()[0];
      if (p) {
        if (linkUp && r() < 0.7) {
          log.push("the link goes silent");
          silentSince = now;
        }
        log.push(`${p.id} fenced: I/O frozen`);
        apply(p, { t: "admin", req: ++req, cmd: { op: "freeze" } });
        if (p.m && (p.m.status().unackedBytes > 0 || r() < 0.3)) {
          // A flush waiting right now must have been failed by the freeze.
          for (const id of p.flushes.keys()) fail(`flush ${id} still waits on ${p.id} after its I/O was frozen`);
        }
        if (r() < 0.5) apply(p, { t: "admin", req: ++req, cmd: { op: "secondary" } });
      }
    } else {
      deliver(50);
    }
    recordPeerDeath();
    checkInvariants();
  }
  return { steps: o.steps, ...stats };

  // Whether each node was connected and in sync at the moment its peer died.
  function recordPeerDeath() {
    for (const n of nodes) {
      const peer = other(n);
      if (!peer.m && n.m && !deadSeen.has(peer)) {
        deadSeen.add(peer);
        inSyncAtPeerDeath.set(n, lastInSync.get(n) === true);
      }
      if (peer.m) deadSeen.delete(peer);
      if (n.m) lastInSync.set(n, n.m.connection === "connected" && n.m.disk === "uptodate" && peer.m?.connection === "connected");
    }
  }
}
