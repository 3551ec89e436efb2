// Frame fuzzing: random and mutated packets for the heartbeat receiver, the witness,
// the replication link (framing, MACs, the protocol core's block and bitmap handlers,
// a live listener) and DNS answers. Every one must be dropped and counted by a named
// verdict, with no crash, no hang and no change of state; a genuine packet after the
// junk is still taken. Seeded: each case has its own seed, printed on a failure;
// FUZZ_SEED=N replays that case alone, FUZZ_ITERATIONS=N runs more cases per target.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { createSocket } from "node:dgram";
import { once } from "node:events";
import { createConnection, createServer } from "node:net";
import { pino } from "pino";
import { encodeHeartbeat, HeartbeatReceiver, type Heartbeat } from "../../cluster/heartbeat.ts";
import { RequestChecker, runWitness, seal, WitnessClient } from "../../cluster/witness.ts";
import { judgeAnswer } from "../../dns/query.ts";
import { DnsFormatError, parseAnswer, wireName } from "../../dns/update.ts";
import { Bitmap } from "../../replication/bitmap.ts";
import { VolumeMachine, type Store } from "../../replication/machine.ts";
import { PeerLink } from "../../replication/transport.ts";
import { BLOCK_SIZE, type Meta, type Msg } from "../../replication/types.ts";
import { bitmapChunks, Decoder, encode, FrameError, FrameMac, type Frame } from "../../replication/wire.ts";
import { rng } from "../sim/volume-sim.ts";

const ITERATIONS = Number(process.env.FUZZ_ITERATIONS ?? 300);
const ONE = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : null;

/** Runs CHECK for every case seed of TARGET; a failure names the seed that replays it. */
async function cases(target: number, count: number, check: (r: () => number, seed: number) => void | Promise<void>): Promise<number> {
  const seeds = ONE !== null ? (Math.floor(ONE / 1_000_000) === target ? [ONE] : []) : Array.from({ length: count }, (_, i) => target * 1_000_000 + i);
  for (const seed of seeds) {
    try {
      await check(rng(seed), seed);
    } catch (err) {
      assert.fail(`fuzz case failed, replay with FUZZ_SEED=${seed}: ${(err as Error).stack ?? err}`);
    }
  }
  return seeds.length;
}

const int = (r: () => number, n: number) => Math.floor(r() * n);
const bytes = (r: () => number, n: number) => Buffer.from(Array.from({ length: n }, () => int(r, 256)));

/** A changed copy of PKT: bits flipped, bytes set, cut, grown, spliced, or replaced. */
function mutate(r: () => number, pkt: Buffer): Buffer {
  const b = Buffer.from(pkt);
  switch (int(r, 6)) {
    case 0: {
      const flips = 1 + int(r, 4);
      for (let i = 0; i < flips && b.length; i++) {
        const at = int(r, b.length);
        b[at] = b[at]! ^ (1 << int(r, 8));
      }
      return b;
    }
    case 1:
      if (b.length) b[int(r, b.length)] = int(r, 256);
      return b;
    case 2:
      return b.subarray(0, int(r, b.length));
    case 3:
      return Buffer.concat([b, bytes(r, 1 + int(r, 64))]);
    case 4: {
      const at = int(r, b.length + 1);
      return Buffer.concat([b.subarray(0, at), bytes(r, 1 + int(r, 16)), b.subarray(at)]);
    }
    default:
      return bytes(r, int(r, 2 * b.length + 8));
  }
}

/** A value of a random JSON type (for bodies that carry a valid MAC but junk fields). */
function junk(r: () => number): unknown {
  const choices: unknown[] = [null, true, -1, 0, 2 ** 53, 1.5, "", "x".repeat(int(r, 300)), [], {}, { state: "active" }, "__proto__", Number.MAX_VALUE];
  return choices[int(r, choices.length)];
}

// ---- heartbeats ----------------------------------------------------------------------

const HB_KEY = Buffer.from("fuzz-heartbeat-key");
const SUMMARY = { state: "active", activeSinceMs: 1, quorum: true, handoffTo: null, wantsFailback: false, volumeInSync: true, requestId: null, grant: null } as const;

test("heartbeats: random, mutated and junk-bodied packets are dropped and counted; state does not move", async () => {
  await cases(1, ITERATIONS, (r) => {
    const rx = new HeartbeatReceiver(HB_KEY, "c", "a", { deadtimeMs: 600 });
    const now = 1_000_000;
    const hb = (seq: number, over: Record<string, unknown> = {}): Heartbeat => ({ v: 1, cluster: "c", node: "a", inc: 7, seq, ts: now, link: "service", summary: SUMMARY, ...over }) as Heartbeat;
    assert.equal(rx.accept(encodeHeartbeat(hb(10), HB_KEY), now).verdict, "ok");
    const state = () => JSON.stringify([(rx as unknown as { inc: number }).inc, [...(rx as unknown as { lastSeq: Map<string, number> }).lastSeq], (rx as unknown as { highestSeq: number }).highestSeq]);
    const before = state();
    for (let i = 0; i < 20; i++) {
      let pkt: Buffer;
      if (r() < 0.5) pkt = mutate(r, encodeHeartbeat(hb(11 + i), HB_KEY));
      else {
        // A valid MAC over a body with one field made junk: only the key's holder could send it.
        const field = ["v", "seq", "inc", "ts", "link", "summary", "cluster", "node"][int(r, 8)]!;
        const body = Buffer.from(JSON.stringify({ ...hb(11 + i), [field]: junk(r) }));
        pkt = Buffer.concat([createHmac("sha256", HB_KEY).update(body).digest(), body]);
      }
      const v = rx.accept(pkt, now);
      if (v.verdict === "ok") {
        // Only a body that is still a heartbeat of ours, with a newer sequence, can pass.
        assert.equal(v.hb.node, "a");
        assert.ok(v.hb.seq > 10 && Number.isSafeInteger(v.hb.seq));
        return;
      }
      assert.equal(state(), before, `a ${v.verdict} packet moved the receiver's state`);
    }
    const c = rx.counters;
    assert.equal(c.received, c.accepted + c.forged + c.foreign + c.replayed + c.stale, "every packet has one verdict");
    assert.equal(rx.accept(encodeHeartbeat(hb(100), HB_KEY), now).verdict, "ok", "the genuine peer is still heard");
  });
});

// ---- the witness ---------------------------------------------------------------------

const W_KEY = Buffer.from("fuzz-witness-key");

test("witness: random, mutated and junk-bodied requests are dropped and counted; marks do not move", async () => {
  await cases(2, ITERATIONS, (r) => {
    const ck = new RequestChecker(W_KEY, "c", ["a", "b"]);
    const now = 5_000_000;
    const req = (ts: number, over: Record<string, unknown> = {}) => ({ v: 1, t: "lease-request", cluster: "c", node: "a", op: "acquire", ts, nonce: "n1", ...over });
    assert.equal(ck.check(seal(req(now), W_KEY), now).verdict, "ok");
    for (let i = 0; i < 20; i++) {
      const pkt = r() < 0.5 ? mutate(r, seal(req(now + 1 + i), W_KEY)) : seal(req(now + 1 + i, { [["v", "t", "cluster", "node", "op", "ts", "nonce"][int(r, 7)]!]: junk(r) }), W_KEY);
      const v = ck.check(pkt, now);
      if (v.verdict === "ok") {
        assert.ok(v.req && (v.req.op === "acquire" || v.req.op === "release") && Number.isSafeInteger(v.req.ts) && v.req.ts > now);
        return;
      }
    }
    // The high-water mark did not move: the next genuine request is taken, an old one is not.
    assert.equal(ck.check(seal(req(now), W_KEY), now).verdict, "replayed");
    assert.equal(ck.check(seal(req(now + 1000), W_KEY), now).verdict, "ok");
  });
});

test("witness over UDP: junk and mutated requests get no answer and no lease; a genuine node still gets one", async () => {
  const events: Record<string, unknown>[] = [];
  const server = await runWitness({ host: "127.0.0.1", port: 17794, key: W_KEY, cluster: "c", leaseMs: 5000, nodes: ["a", "b"], onEvent: (e) => events.push(e) });
  const sock = createSocket("udp4");
  sock.bind(0, "127.0.0.1");
  await once(sock, "listening");
  let answers = 0;
  sock.on("message", () => answers++);
  const b = new WitnessClient({ host: "127.0.0.1", port: 17794, key: W_KEY, cluster: "c", node: "b" });
  try {
    let sent = 0;
    const caughtUp = async () => {
      for (let i = 0; i < 100 && server.stats.requests < sent; i++) await new Promise((res) => setTimeout(res, 10));
    };
    await cases(3, Math.ceil(ITERATIONS / 3), async (r) => {
      const base = seal({ v: 1, t: "lease-request", cluster: "c", node: "a", op: "acquire", ts: Date.now(), nonce: "x" }, W_KEY);
      let pkt = mutate(r, base);
      if (pkt.equals(base)) pkt = Buffer.concat([pkt, Buffer.from([0])]);
      await new Promise<void>((resolve) => sock.send(pkt, 17794, "127.0.0.1", () => resolve()));
      // Paced, so that no datagram is lost in a socket buffer: each one must be counted.
      if (++sent % 50 === 0) await caughtUp();
    });
    await caughtUp();
    assert.equal(server.stats.requests, sent);
    assert.equal(server.stats.grants, 0, "no junk got the lease");
    assert.equal(answers, 0, "junk gets no answer");
    assert.equal(server.stats.forged + server.stats.foreign + server.stats.replayed + server.stats.stale, sent, "each one counted by its verdict");
    assert.equal((await b.request("acquire", 1000))?.granted, true, "node b gets the lease: nobody holds it");
  } finally {
    b.close();
    sock.close();
    server.close();
  }
});

// ---- the replication link ------------------------------------------------------------

const sampleMsgs = (r: () => number): Msg[] => [
  { t: "data", seq: 1 + int(r, 1000), offset: int(r, 1000) * BLOCK_SIZE, data: bytes(r, 1 + int(r, 2 * BLOCK_SIZE)) },
  { t: "barrier", seq: int(r, 1000) },
  { t: "resync-data", offset: int(r, 1000) * BLOCK_SIZE, data: bytes(r, BLOCK_SIZE) },
  { t: "state", role: "primary", disk: "uptodate" },
  { t: "verify-req", extent: int(r, 10) },
];

test("replication framing: a mutated sealed stream yields the frames before the change and then a FrameError, never a wrong frame", async () => {
  await cases(4, ITERATIONS, (r) => {
    const key = bytes(r, 32);
    const tx = new FrameMac(key);
    const frames: Frame[] = [{ kind: "ping" }, ...sampleMsgs(r).map((msg) => ({ kind: "msg" as const, msg })), { kind: "pong" }];
    const encoded = frames.map((f) => Buffer.concat(encode(f, tx)));
    const stream = Buffer.concat(encoded);
    const changed = mutate(r, stream);
    const rx = new Decoder();
    const open = new FrameMac(key);
    // Feed in random pieces, as TCP would.
    let got: Frame[] = [];
    let error: FrameError | null = null;
    for (let at = 0; at < changed.length && !error; ) {
      const n = 1 + int(r, 4096);
      rx.push(changed.subarray(at, at + n));
      at += n;
      try {
        // Bound: each frame consumes bytes; at most one frame per 5 bytes.
        for (let f = rx.next(open), k = 0; f && k < changed.length; f = rx.next(open), k++) got.push(f);
      } catch (err) {
        if (!(err instanceof FrameError)) throw err;
        error = err;
      }
    }
    // Every frame delivered is one that was sent, in order: the first differing byte ends delivery.
    const same = JSON.stringify(got.map(show)) === JSON.stringify(frames.slice(0, got.length).map(show));
    assert.ok(same, `delivered frames differ from the sent ones: ${JSON.stringify(got.map(show))}`);
    if (!changed.equals(stream)) {
      let firstDiff = 0;
      while (firstDiff < Math.min(changed.length, stream.length) && changed[firstDiff] === stream[firstDiff]) firstDiff++;
      let ends = 0;
      let intact = 0;
      for (const e of encoded) if ((ends += e.length) <= firstDiff) intact++;
      assert.ok(got.length <= intact, `${got.length} frames delivered, only ${intact} were before the change at byte ${firstDiff}`);
    }
    got = [];
  });
});

function show(f: Frame): string {
  if (f.kind !== "msg") return f.kind;
  const m = f.msg;
  return m.t === "data" || m.t === "resync-data" ? `${m.t}@${m.offset}:${m.data.toString("hex")}` : JSON.stringify(m);
}

test("replication framing: random bytes before the handshake are a FrameError or an auth frame, never a message", async () => {
  await cases(5, ITERATIONS, (r) => {
    const d = new Decoder();
    d.push(bytes(r, int(r, 512)));
    try {
      for (let f = d.next(null), k = 0; f && k < 200; f = d.next(null), k++) assert.ok(f.kind === "auth" || f.kind === "ping" || f.kind === "pong" || f.kind === "msg");
    } catch (err) {
      if (!(err instanceof FrameError)) throw err;
    }
  });
});

function memMachine(sizeBytes: number) {
  const writes: { offset: number; length: number }[] = [];
  const store: Store = { sizeBytes, read: (_o, n) => Buffer.alloc(n), write: (offset, data) => void writes.push({ offset, length: data.length }), sync: () => {}, saveMeta: () => {}, saveBitmap: () => {}, saveAL: () => {} };
  const meta: Meta = {
    version: 1, nodeId: "b", sizeBytes, blockSize: BLOCK_SIZE, gi: { current: "00000000000000c1", bitmap: "", history: ["", ""] }, disk: "uptodate", role: "secondary",
    primarySinceMs: null, fresh: false, cleanShutdown: true, crashedPrimary: false, peerOutdated: false, preserved: [],
  };
  const m = new VolumeMachine(meta, new Bitmap(Math.ceil(sizeBytes / BLOCK_SIZE)), [], store, {
    nodeId: "b", protocol: "C", splitBrainPolicy: "preserve", alExtents: 8, resyncRateBytesPerS: 1 << 20, inFlightMaxBytes: 1 << 24, now: () => 0, newId: () => "00000000000000d1",
  });
  return { m, writes };
}

test("replication core: blocks and bitmap chunks with random offsets, lengths and contents never write outside the volume", async () => {
  const size = 16 * 1024 * 1024 + 3 * BLOCK_SIZE;
  await cases(6, ITERATIONS, (r) => {
    const { m, writes } = memMachine(size);
    const numbers = [0, 1, -1, BLOCK_SIZE, size - BLOCK_SIZE, size, size + 1, 2 ** 53, -(2 ** 53), 0.5, NaN, Infinity];
    const num = () => (r() < 0.5 ? numbers[int(r, numbers.length)]! : int(r, 2 * size) - size / 2);
    // A peer's hello announcing bitmap chunks, then junk chunks, blocks and resync blocks.
    const peerBits = new Bitmap(Math.ceil(size / BLOCK_SIZE));
    peerBits.setBlocks(int(r, 100), 1 + int(r, 50));
    const chunks = bitmapChunks(peerBits);
    const hello: Msg = { t: "hello", nodeId: "a", sizeBytes: size, gi: { current: "00000000000000c1", bitmap: "", history: ["", ""] }, disk: "uptodate", role: "secondary", fresh: false, crashedPrimary: false, primarySinceMs: null, changedBlocks: peerBits.count, bitmapChunks: chunks.length, resolve: null };
    m.handle({ t: "connected" });
    m.handle({ t: "msg", msg: hello });
    for (let i = 0; i < 30; i++) {
      const pick = int(r, 4);
      const msg: Msg =
        pick === 0
          ? { t: "data", seq: 1, offset: num(), data: Buffer.alloc(int(r, 3 * BLOCK_SIZE)) }
          : pick === 1
            ? { t: "resync-data", offset: num(), data: Buffer.alloc(int(r, 3 * BLOCK_SIZE)) }
            : pick === 2
              ? { ...chunks[0]!, first: r() < 0.5 ? chunks[0]!.first : num(), blocks: r() < 0.5 ? chunks[0]!.blocks : num(), data: r() < 0.5 ? chunks[0]!.data : mutate(r, Buffer.from(chunks[0]!.data, "base64")).toString("base64") }
              : { ...chunks[0]!, encoding: r() < 0.5 ? "raw" : "runs", data: bytes(r, int(r, 64)).toString("base64") };
      m.handle({ t: "msg", msg });
      if (r() < 0.2) {
        m.handle({ t: "disconnected", reason: "fuzz" });
        m.handle({ t: "connected" });
        m.handle({ t: "msg", msg: hello });
      }
    }
    for (const w of writes) assert.ok(Number.isSafeInteger(w.offset) && w.offset >= 0 && w.offset + w.length <= size, `a write at ${w.offset} (+${w.length}) outside the volume`);
  });
});

test("replication link: random and mutated bytes on a live listener never bring the link up or deliver a message", async (t) => {
  const log = pino({ level: "silent" });
  const srv = createServer().listen(0, "127.0.0.1");
  await once(srv, "listening");
  const port = (srv.address() as { port: number }).port;
  srv.close();
  const b = new PeerLink({ nodeId: "b", peerId: "a", cluster: "c", secret: Buffer.from("s3cret"), listen: { host: "127.0.0.1", port }, peer: { host: "127.0.0.1", port: 1 }, pingIntervalMs: 1000, pingTimeoutMs: 5000, authTimeoutMs: 500, log });
  let ups = 0;
  let msgs = 0;
  b.on("up", () => ups++);
  b.on("msg", () => msgs++);
  await b.start();
  t.after(() => b.stop());
  const hello = Buffer.concat(encode({ kind: "auth", body: { t: "auth-hello", node: "a", cluster: "c", nonce: "ab".repeat(32) } }));
  const proofish = Buffer.concat(encode({ kind: "auth", body: { t: "auth-proof", mac: "00".repeat(32) } }));
  const data = Buffer.concat(encode({ kind: "msg", msg: { t: "data", seq: 1, offset: 0, data: Buffer.alloc(64) } }, new FrameMac(Buffer.alloc(32))));
  const ran = await cases(7, Math.ceil(ITERATIONS / 10), async (r) => {
    const sock = createConnection({ host: "127.0.0.1", port });
    sock.on("error", () => {});
    sock.resume(); // read what the link says, so that its close reaches us
    await once(sock, "connect");
    const parts = [hello, proofish, data].filter(() => r() < 0.7).map((p) => (r() < 0.5 ? mutate(r, p) : p));
    sock.write(Buffer.concat([...parts, r() < 0.5 ? bytes(r, int(r, 256)) : Buffer.alloc(0)]));
    // The link closes the connection (bad frame, wrong proof, or the auth timeout).
    await Promise.race([once(sock, "close"), new Promise((res) => setTimeout(res, 1500))]);
    const closed = sock.destroyed || sock.readyState === "closed";
    sock.destroy();
    assert.ok(closed, "the link closed the junk connection");
  });
  assert.equal(ups, 0, "the link never came up");
  assert.equal(msgs, 0, "no message was delivered");
  if (ran > 0) assert.ok(b.stats.authFailures + b.stats.malformedFrames + b.stats.forgedFrames > 0, `drops counted: ${JSON.stringify(b.stats)}`);
});

// ---- DNS answers ---------------------------------------------------------------------

const TSIG = { name: "fuzz-key", algorithm: "hmac-sha256", secret: Buffer.alloc(32, 5) };
const u16 = (n: number) => Buffer.from([n >> 8, n & 0xff]);

/** A genuine answer to an update with REQUESTMAC, signed as RFC 8945 4.3 says. */
function signedAnswer(id: number, requestMac: Buffer, nowS: number): Buffer {
  const msg = Buffer.concat([u16(id), u16(0x8000 | (5 << 11)), u16(1), u16(0), u16(0), u16(0), wireName("mailha.test"), u16(6), u16(1)]);
  const time = Buffer.alloc(6);
  time.writeUIntBE(nowS, 0, 6);
  const vars = Buffer.concat([wireName(TSIG.name), u16(255), Buffer.alloc(4), wireName(TSIG.algorithm), time, u16(300), u16(0), u16(0)]);
  const mac = createHmac("sha256", TSIG.secret).update(u16(requestMac.length)).update(requestMac).update(msg).update(vars).digest();
  const rdata = Buffer.concat([wireName(TSIG.algorithm), time, u16(300), u16(32), mac, u16(id), u16(0), u16(0)]);
  const out = Buffer.concat([msg, wireName(TSIG.name), u16(250), u16(255), Buffer.alloc(4), u16(rdata.length), rdata]);
  out.writeUInt16BE(1, 10);
  return out;
}

test("DNS answers: mutated signed answers are refused as malformed or fail their signature, never verify; no hang", async () => {
  await cases(8, ITERATIONS * 3, (r) => {
    const now = 1_700_000_000;
    const reqMac = bytes(r, 32);
    const base = signedAnswer(int(r, 65536), reqMac, now);
    assert.equal(parseAnswer(base, TSIG, reqMac, now).answerSigned, true, "the genuine answer verifies");
    const pkt = mutate(r, base);
    let res: ReturnType<typeof parseAnswer> | null = null;
    try {
      res = parseAnswer(pkt, TSIG, reqMac, now);
    } catch (err) {
      if (!(err instanceof DnsFormatError)) throw err;
    }
    // Only the genuine answer verifies, give or take what RFC 8945 leaves out of the MAC:
    // the header id (the original id is covered) and the case of the TSIG's names.
    const sameButCase = (i: number) => pkt[i] === base[i] || (pkt[i]! | 0x20) === base[i]! && base[i]! >= 0x61 && base[i]! <= 0x7a;
    if (res?.answerSigned === true) assert.ok(pkt.length === base.length && Array.from({ length: pkt.length - 2 }, (_, i) => i + 2).every(sameButCase), `a changed answer verified: ${pkt.toString("hex")}`);
    // And the query side's judge never throws, whatever it gets.
    const v = judgeAnswer(pkt, pkt.length >= 2 ? pkt.readUInt16BE(0) : 0, "mailha.test", "SOA");
    assert.ok(["accepted", "malformed", "mismatched"].includes(v.verdict));
  });
});
