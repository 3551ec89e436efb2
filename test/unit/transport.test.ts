// The replication link on loopback: data blocks wait for the end of the event-loop turn
// (so a write is answered before the socket write), yet the peer receives every
// message in the order it was sent; a wrong secret is refused; blocks queued for a
// session that dies never reach the next one.
import { test } from "node:test";
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:net";
import { pino } from "pino";
import { PeerLink } from "../../replication/transport.ts";
import type { Msg } from "../../replication/types.ts";

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
