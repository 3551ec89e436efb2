// The protocol core against what a peer may send: data and resync blocks outside the
// volume drop the link and write nothing; and two engines with 1 TiB sparse volumes
// complete their handshake over real links (real Hello, real framing and MACs): the
// bitmap travels in chunks.
import { test } from "node:test";
import assert from "node:assert/strict";
import { pino } from "pino";
import { Bitmap } from "../../replication/bitmap.ts";
import { VolumeMachine, type Action, type Event, type Store } from "../../replication/machine.ts";
import { PeerLink } from "../../replication/transport.ts";
import { BLOCK_SIZE, type Meta, type Msg } from "../../replication/types.ts";

const log = pino({ level: "silent" });
const settle = async (cond: () => boolean, ms = 2000) => {
  for (let i = 0; i < ms / 10 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
};

// ---- the protocol core against blocks outside the volume ------------------------------

/** An in-memory store: sparse, reads zeros; records writes. */
function memStore(sizeBytes: number) {
  const writes: { offset: number; length: number }[] = [];
  const store: Store = {
    sizeBytes,
    read: (_offset, length) => Buffer.alloc(length),
    write: (offset, data) => void writes.push({ offset, length: data.length }),
    sync: () => {},
    saveMeta: () => {},
    saveBitmap: () => {},
    saveAL: () => {},
  };
  return { store, writes };
}

function meta(nodeId: string, sizeBytes: number): Meta {
  return {
    version: 1, nodeId, sizeBytes, blockSize: BLOCK_SIZE, gi: { current: "00000000000000c1", bitmap: "", history: ["", ""] }, disk: "uptodate", role: "secondary",
    primarySinceMs: null, fresh: false, cleanShutdown: true, crashedPrimary: false, peerOutdated: false, preserved: [],
  };
}

function machine(nodeId: string, sizeBytes: number, dirty: readonly [number, number][] = []) {
  const { store, writes } = memStore(sizeBytes);
  const bitmap = new Bitmap(Math.ceil(sizeBytes / BLOCK_SIZE));
  for (const [first, count] of dirty) bitmap.setBlocks(first, count);
  let id = 0;
  const m = new VolumeMachine(meta(nodeId, sizeBytes), bitmap, [], store, {
    nodeId, protocol: "C", splitBrainPolicy: "preserve", alExtents: 64, resyncRateBytesPerS: 1024 * 1024, inFlightMaxBytes: 16 * 1024 * 1024, now: () => Date.now(), newId: () => (++id).toString(16).padStart(16, "0"),
  });
  return { m, writes };
}

const drops = (actions: Action[]) => actions.filter((a): a is Extract<Action, { t: "drop" }> => a.t === "drop");
const events = (actions: Action[]) => actions.filter((a): a is Extract<Action, { t: "event" }> => a.t === "event").map((a) => a.ev);

test("data blocks outside the volume drop the link and write nothing", () => {
  const size = 64 * 1024 * 1024;
  const { m, writes } = machine("b", size);
  const bad: [string, number, number][] = [
    ["past the end", size, BLOCK_SIZE],
    ["running over the end", size - 512, BLOCK_SIZE],
    ["negative", -BLOCK_SIZE, BLOCK_SIZE],
    ["not an integer", 1.5, BLOCK_SIZE],
    ["far beyond", 2 ** 60, BLOCK_SIZE],
  ];
  for (const [what, offset, length] of bad) {
    const out = m.handle({ t: "msg", msg: { t: "data", seq: 1, offset, data: Buffer.alloc(length) } });
    assert.equal(drops(out).length, 1, `${what}: the link is dropped`);
    assert.match(drops(out)[0]!.reason, /outside the volume|protocol error/, what);
    assert.ok(events(out).some((e) => e.type === "protocol-error"), `${what}: an event says why`);
  }
  assert.deepEqual(writes, [], "nothing was written");
  assert.equal((m.status().stats as Record<string, number>).protocolErrors, bad.length, "each one counted");
  const ok = m.handle({ t: "msg", msg: { t: "data", seq: 1, offset: size - BLOCK_SIZE, data: Buffer.alloc(BLOCK_SIZE) } });
  assert.equal(drops(ok).length, 0, "the last block of the volume is fine");
});

/** Connects two machines directly (messages in order, synchronously) until quiet or UNTIL. */
function pump(x: VolumeMachine, y: VolumeMachine, until: () => boolean = () => false) {
  const queue: { to: VolumeMachine; ev: Event }[] = [{ to: x, ev: { t: "connected" } }, { to: y, ev: { t: "connected" } }];
  const seen = new Map<VolumeMachine, Action[]>([[x, []], [y, []]]);
  for (let i = 0; i < 10_000 && queue.length && !until(); i++) {
    const { to, ev } = queue.shift()!;
    const out = to.handle(ev);
    seen.get(to)!.push(...out);
    for (const a of out) if (a.t === "send") queue.push({ to: to === x ? y : x, ev: { t: "msg", msg: a.msg } });
  }
  return seen;
}

test("resync blocks outside the volume drop the link and write nothing", () => {
  const size = 64 * 1024 * 1024;
  const a = machine("a", size, [[0, 4]]);
  const b = machine("b", size);
  pump(a.m, b.m, () => b.m.status().connection === "sync-target");
  assert.equal(b.m.status().connection, "sync-target", "b is the target of a's resync");
  const before = b.writes.length;
  for (const offset of [size, -BLOCK_SIZE, 3]) {
    const out = b.m.handle({ t: "msg", msg: { t: "resync-data", offset, data: Buffer.alloc(BLOCK_SIZE) } });
    assert.equal(drops(out).length, 1, `resync block at ${offset}: the link is dropped`);
  }
  assert.equal(b.writes.length, before, "nothing was written");
});

// ---- a 1 TiB volume over real links -----------------------------------------------------

test("two engines with 1 TiB sparse volumes complete the handshake over real links; the bitmap goes in chunks", async (t) => {
  const TiB = 2 ** 40;
  const blocks = TiB / BLOCK_SIZE;
  // Mostly clean, a few scattered runs, one dense stretch where every other block is set.
  const dirty: [number, number][] = [[0, 16], [blocks / 2, 1024], [blocks - 3, 3]];
  const a = machine("a", TiB, dirty);
  for (let i = 0; i < 200_000; i += 2) a.m.bitmap.set(1_000_000 + i);
  const dirtyBlocks = a.m.bitmap.count;
  const b = machine("b", TiB);
  const [pa, pb] = [17795, 17796];
  const opts = { cluster: "c", secret: Buffer.from("s3cret"), pingIntervalMs: 200, pingTimeoutMs: 10_000, authTimeoutMs: 5000, log };
  const la = new PeerLink({ ...opts, nodeId: "a", peerId: "b", listen: { host: "127.0.0.1", port: pa }, peer: { host: "127.0.0.1", port: pb } });
  const lb = new PeerLink({ ...opts, nodeId: "b", peerId: "a", listen: { host: "127.0.0.1", port: pb }, peer: { host: "127.0.0.1", port: pa } });
  t.after(() => (la.stop(), lb.stop()));
  const seen = { a: [] as Record<string, unknown>[], b: [] as Record<string, unknown>[] };
  const wire = (name: "a" | "b", m: VolumeMachine, link: PeerLink) => {
    const dispatch = (ev: Event) => {
      for (const x of m.handle(ev)) {
        if (x.t === "send") link.send(x.msg);
        else if (x.t === "drop") link.drop(x.reason);
        else if (x.t === "event") seen[name].push(x.ev);
      }
    };
    link.on("up", () => dispatch({ t: "connected" }));
    link.on("down", (reason: string) => dispatch({ t: "disconnected", reason }));
    link.on("msg", (msg: Msg) => dispatch({ t: "msg", msg }));
  };
  wire("a", a.m, la);
  wire("b", b.m, lb);
  await lb.start();
  await la.start();
  await settle(() => seen.a.some((e) => e.type === "resync-started") && seen.b.some((e) => e.type === "resync-started"), 20_000);
  const started = (x: Record<string, unknown>[]) => x.find((e) => e.type === "resync-started");
  assert.ok(started(seen.a), `a started the resync: ${JSON.stringify(seen.a.slice(-5))}`);
  assert.equal(started(seen.a)!.side, "source");
  assert.equal(started(seen.b)!.side, "target");
  assert.equal(started(seen.b)!.bytes, dirtyBlocks * BLOCK_SIZE, "b knows every out-of-sync block of a's bitmap");
  assert.equal(b.m.status().connection, "sync-target");
  t.diagnostic(`1 TiB handshake: ${la.stats.bytesSent} bytes from a (${dirtyBlocks} blocks out of sync)`);
  assert.ok(la.stats.bytesSent < 8 * 1024 * 1024, `a's handshake took ${la.stats.bytesSent} bytes on the wire`);
});
