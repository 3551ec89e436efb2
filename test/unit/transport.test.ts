// The replication link on loopback: data blocks wait for the end of the event-loop turn
// (so a write is answered before the socket write), yet the peer receives every
// message in the order it was sent; a wrong secret is refused; blocks queued for a
// session that dies never reach the next one; after the handshake a frame changed,
// replayed or left out on the wire is refused (the link drops and counts it, nothing
// changed reaches the protocol core).
import { test } from "node:test";
import assert from "node:assert/strict";
import { once } from "node:events";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { pino } from "pino";
import { PeerLink } from "../../replication/transport.ts";
import { BLOCK_SIZE, type Msg } from "../../replication/types.ts";

const log = pino({ level: "silent" });

async function freePort(): Promise<number> {
  const s = createServer().listen(0, "127.0.0.1");
  await once(s, "listening");
  const port = (s.address() as { port: number }).port;
  s.close();
  return port;
}

async function pair(secretB = "s3cret") {
  const [pa, pb] = [await freePort(), await freePort()];
  const opts = { cluster: "c", pingIntervalMs: 100, pingTimeoutMs: 2000, authTimeoutMs: 2000, log };
  const a = new PeerLink({ ...opts, nodeId: "a", peerId: "b", secret: Buffer.from("s3cret"), listen: { host: "127.0.0.1", port: pa }, peer: { host: "127.0.0.1", port: pb } });
  const b = new PeerLink({ ...opts, nodeId: "b", peerId: "a", secret: Buffer.from(secretB), listen: { host: "127.0.0.1", port: pb }, peer: { host: "127.0.0.1", port: pa } });
  const got: Msg[] = [];
  b.on("msg", (m: Msg) => got.push(m));
  return { a, b, got };
}

/** Two links that authenticated each other; stopped when the test ends. */
async function connected(t: { after(fn: () => void): void }) {
  const p = await pair();
  t.after(() => (p.a.stop(), p.b.stop()));
  const up = Promise.all([once(p.a, "up"), once(p.b, "up")]);
  await p.b.start();
  await p.a.start();
  await up;
  return p;
}

const data = (seq: number): Msg => ({ t: "data", seq, offset: seq * 4096, data: Buffer.alloc(4096, seq) });

test("data blocks are deferred to the end of the turn but arrive in order with barriers", async (t) => {
  const { a, got } = await connected(t);
  // Same turn: three blocks, a barrier, two more blocks, a barrier-ack-like message.
  for (let s = 1; s <= 3; s++) assert.equal(a.send(data(s)), true);
  assert.equal(a.writeBacklog, 0, "data blocks wait in the link, not in the socket, until the end of the turn");
  a.send({ t: "barrier", seq: 3 });
  for (let s = 4; s <= 5; s++) a.send(data(s));
  a.send({ t: "state", role: "primary", disk: "uptodate" });
  a.send(data(6)); // flushed by the end-of-turn timer alone
  for (let i = 0; i < 100 && got.length < 8; i++) await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(got.map((m) => (m.t === "data" ? `d${m.seq}` : m.t)), ["d1", "d2", "d3", "barrier", "d4", "d5", "state", "d6"]);
  const d2 = got[1] as Extract<Msg, { t: "data" }>;
  assert.equal(d2.offset, 8192);
  assert.ok(d2.data.equals(Buffer.alloc(4096, 2)), "block contents intact");
});

test("blocks queued for a session that drops are not sent on the next one", async (t) => {
  const { a, b, got } = await connected(t);
  a.send(data(1));
  a.drop("test"); // same turn: the queued block belongs to the dead session
  const again = Promise.all([once(a, "up"), once(b, "up")]);
  await again;
  a.send({ t: "barrier", seq: 0 });
  a.send(data(2));
  for (let i = 0; i < 100 && got.length < 2; i++) await new Promise((r) => setTimeout(r, 10));
  await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(got.map((m) => (m.t === "data" ? `d${m.seq}` : m.t)), ["barrier", "d2"]);
});

test("a wrong secret is refused on both sides and nothing is delivered", async (t) => {
  const { a, b, got } = await pair("other");
  t.after(() => (a.stop(), b.stop()));
  const failed = once(b, "auth-failed");
  await b.start();
  await a.start();
  await failed;
  assert.equal(a.up || b.up, false);
  assert.equal(a.send(data(1)), false, "nothing to send on without a session");
  assert.ok(b.stats.authFailures >= 1);
  assert.deepEqual(got, []);
});

/**
 * A TCP relay from a (the connector) to b that hands each a->b frame to TAMPER, which
 * returns the bytes to forward (the frame, a changed frame, two copies, or nothing).
 * Frames are cut by their length prefix only: the relay knows no more than an
 * attacker on the path.
 */
async function relay(toPort: number, tamper: (frame: Buffer, index: number) => Buffer[]): Promise<{ port: number; close(): void }> {
  const socks: Socket[] = [];
  const server: Server = createServer((inbound) => {
    const outbound = createConnection({ host: "127.0.0.1", port: toPort });
    socks.push(inbound, outbound);
    let buf = Buffer.alloc(0);
    let index = 0;
    inbound.on("data", (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
        const n = 4 + buf.readUInt32BE(0);
        for (const b of tamper(buf.subarray(0, n), index++)) outbound.write(b);
        buf = buf.subarray(n);
      }
    });
    outbound.on("data", (chunk: Buffer) => inbound.write(chunk));
    for (const s of [inbound, outbound]) {
      s.on("error", () => {});
      s.on("close", () => (inbound.destroy(), outbound.destroy()));
    }
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return { port: (server.address() as { port: number }).port, close: () => (server.close(), socks.forEach((s) => s.destroy())) };
}

const KIND_DATA = 2;

/** a sends to b through a relay that tampers with the data frames. */
async function tamperedPair(t: { after(fn: () => void): void }, tamper: (frame: Buffer) => Buffer[]) {
  const [pa, pb] = [await freePort(), await freePort()];
  const r = await relay(pb, (f) => (f.length > 5 && f[4] === KIND_DATA ? tamper(f) : [f]));
  const opts = { cluster: "c", secret: Buffer.from("s3cret"), pingIntervalMs: 100, pingTimeoutMs: 2000, authTimeoutMs: 2000, log };
  const a = new PeerLink({ ...opts, nodeId: "a", peerId: "b", listen: { host: "127.0.0.1", port: pa }, peer: { host: "127.0.0.1", port: r.port } });
  const b = new PeerLink({ ...opts, nodeId: "b", peerId: "a", listen: { host: "127.0.0.1", port: pb }, peer: { host: "127.0.0.1", port: pa } });
  const got: Msg[] = [];
  b.on("msg", (m: Msg) => got.push(m));
  t.after(() => (a.stop(), b.stop(), r.close()));
  const up = Promise.all([once(a, "up"), once(b, "up")]);
  await b.start();
  await a.start();
  await within(up, 5000, "the link coming up");
  return { a, b, got };
}

/** P, or a rejection naming WHAT after MS. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<T>((_, reject) => (t = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms))).finally(() => clearTimeout(t))]);
}

const block = (seq: number): Msg => ({ t: "data", seq, offset: seq * BLOCK_SIZE, data: Buffer.alloc(BLOCK_SIZE, seq) });
const settle = async (cond: () => boolean, ms = 2000) => {
  for (let i = 0; i < ms / 10 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
};

test("a data frame changed on the wire after the handshake is refused: the link drops, nothing changed is delivered", async (t) => {
  let flipped = false;
  const { a, b, got } = await tamperedPair(t, (f) => {
    if (flipped) return [f];
    flipped = true;
    const g = Buffer.from(f);
    g[4 + 1 + 16 + 100] = g[4 + 1 + 16 + 100]! ^ 0xff; // one byte of the block
    return [g];
  });
  const down = once(b, "down");
  a.send(block(1));
  const [reason] = (await within(down, 2000, "b dropping the tampered link")) as [string];
  await settle(() => got.length > 0, 200);
  assert.deepEqual(got, [], "the changed block never reached the protocol core");
  assert.match(reason, /MAC|forged|authentic/i);
  assert.equal((b.stats as unknown as Record<string, number>).forgedFrames, 1);
});

test("a data frame replayed on the wire is refused after the original", async (t) => {
  let copies = 0;
  const { a, b, got } = await tamperedPair(t, (f) => (copies++ === 0 ? [f, f] : [f]));
  const down = once(b, "down");
  a.send(block(1));
  await within(down, 2000, "b dropping the link at the copy").catch(() => {});
  assert.deepEqual(got.map((m) => (m.t === "data" ? m.seq : m.t)), [1], "the block arrived once; its copy was refused");
  assert.equal((b.stats as unknown as Record<string, number>).forgedFrames, 1);
});

test("a data frame left out on the wire is noticed at the next frame", async (t) => {
  let n = 0;
  const { a, b, got } = await tamperedPair(t, (f) => (n++ === 0 ? [] : [f]));
  const down = once(b, "down");
  a.send(block(1));
  await new Promise((r) => setTimeout(r, 20));
  a.send(block(2));
  await within(down, 2000, "b dropping the link at block 2").catch(() => {});
  assert.deepEqual(got, [], "block 2 is refused: block 1 is missing before it");
});
