// The witness lends its lease to one node at a time, over authenticated UDP; recorded
// requests replayed to it change nothing, and a recorded answer answers nothing.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createSocket } from "node:dgram";
import { once } from "node:events";
import { decideLease, RequestChecker, runWitness, seal, WitnessClient } from "../../cluster/witness.ts";

test("one holder at a time; renewal by the holder; free again after expiry or release", () => {
  let cur = decideLease(null, { node: "a", op: "acquire" }, 0, 1000);
  assert.equal(cur.granted, true);
  const b = decideLease(cur.next, { node: "b", op: "acquire" }, 500, 1000);
  assert.equal(b.granted, false, "b is refused while a's lease runs");
  cur = decideLease(cur.next, { node: "a", op: "acquire" }, 900, 1000);
  assert.equal(cur.granted, true, "a renews");
  assert.equal(decideLease(cur.next, { node: "b", op: "acquire" }, 1800, 1000).granted, false, "the renewal moved the expiry");
  assert.equal(decideLease(cur.next, { node: "b", op: "acquire" }, 1901, 1000).granted, true, "b gets it once a's lease has expired");
  const released = decideLease(cur.next, { node: "a", op: "release" }, 1000, 1000);
  assert.equal(decideLease(released.next, { node: "b", op: "acquire" }, 1001, 1000).granted, true, "b gets it after a releases");
  const foreign = decideLease(cur.next, { node: "b", op: "release" }, 1000, 1000);
  assert.equal(foreign.next?.holder, "a", "b cannot release a's lease");
});

test("over UDP: a node with the key gets the lease, the other waits, a wrong key gets nothing", async () => {
  const key = Buffer.from("witness-test-key");
  const events: Record<string, unknown>[] = [];
  const server = await runWitness({ host: "127.0.0.1", port: 17790, key, cluster: "c", leaseMs: 400, nodes: ["a", "b"], onEvent: (e) => events.push(e) });
  const a = new WitnessClient({ host: "127.0.0.1", port: 17790, key, cluster: "c", node: "a" });
  const b = new WitnessClient({ host: "127.0.0.1", port: 17790, key, cluster: "c", node: "b" });
  const x = new WitnessClient({ host: "127.0.0.1", port: 17790, key: Buffer.from("wrong"), cluster: "c", node: "b" });
  try {
    assert.equal((await a.request("acquire", 1000))?.granted, true);
    const refused = await b.request("acquire", 1000);
    assert.equal(refused?.granted, false);
    assert.equal(refused?.holder, "a");
    assert.equal(await x.request("acquire", 300), null, "a request with a wrong key gets no answer");
    assert.equal(server.stats.forged, 1);
    await new Promise((r) => setTimeout(r, 450));
    assert.equal((await b.request("acquire", 1000))?.granted, true, "b gets the lease after a's expired");
    assert.ok(events.some((e) => e.type === "lease" && e.holder === "b"));
  } finally {
    a.close();
    b.close();
    x.close();
    server.close();
  }
});

/** A UDP relay between one client and the witness that records every packet. */
async function recordingRelay(witnessPort: number) {
  const sock = createSocket("udp4");
  const toWitness: Buffer[] = [];
  const toClient: Buffer[] = [];
  let client: { port: number; address: string } | null = null;
  sock.on("message", (m, r) => {
    if (r.port === witnessPort) {
      toClient.push(Buffer.from(m));
      if (client) sock.send(m, client.port, client.address);
    } else {
      client = { port: r.port, address: r.address };
      toWitness.push(Buffer.from(m));
      sock.send(m, witnessPort, "127.0.0.1");
    }
  });
  sock.bind(0, "127.0.0.1");
  await once(sock, "listening");
  return {
    port: sock.address().port,
    toWitness,
    toClient,
    replayToWitness: (pkt: Buffer) => new Promise<void>((resolve) => sock.send(pkt, witnessPort, "127.0.0.1", () => resolve())),
    replayToClient: (pkt: Buffer) => new Promise<void>((resolve) => sock.send(pkt, client!.port, client!.address, () => resolve())),
    close: () => sock.close(),
  };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test("a recorded acquire replayed after the holder died does not keep the survivor refused", async () => {
  const key = Buffer.from("witness-replay-key");
  const server = await runWitness({ host: "127.0.0.1", port: 17791, key, cluster: "c", leaseMs: 300, nodes: ["a", "b"], onEvent: () => {} });
  const relay = await recordingRelay(17791);
  const a = new WitnessClient({ host: "127.0.0.1", port: relay.port, key, cluster: "c", node: "a" });
  const b = new WitnessClient({ host: "127.0.0.1", port: 17791, key, cluster: "c", node: "b" });
  try {
    assert.equal((await a.request("acquire", 1000))?.granted, true);
    a.close(); // a dies; someone replays its last request to the witness
    const recorded = relay.toWitness.at(-1)!;
    for (let i = 0; i < 8; i++) {
      await relay.replayToWitness(recorded);
      await sleep(50);
    }
    assert.equal((await b.request("acquire", 1000))?.granted, true, "b gets the lease once a's own lease ran out, whatever was replayed");
    assert.ok(server.stats.replayed >= 8, `replays counted (${JSON.stringify(server.stats)})`);
  } finally {
    b.close();
    relay.close();
    server.close();
  }
});

test("a recorded release replayed later does not take the lease from its holder", async () => {
  const key = Buffer.from("witness-replay-key");
  const server = await runWitness({ host: "127.0.0.1", port: 17792, key, cluster: "c", leaseMs: 5000, nodes: ["a", "b"], onEvent: () => {} });
  const relay = await recordingRelay(17792);
  const a = new WitnessClient({ host: "127.0.0.1", port: relay.port, key, cluster: "c", node: "a" });
  const b = new WitnessClient({ host: "127.0.0.1", port: 17792, key, cluster: "c", node: "b" });
  try {
    assert.equal((await a.request("acquire", 1000))?.granted, true);
    await a.request("release", 1000);
    const release = relay.toWitness.at(-1)!;
    assert.equal((await a.request("acquire", 1000))?.granted, true, "a holds the lease again");
    await relay.replayToWitness(release);
    await sleep(50);
    const asked = await b.request("acquire", 1000);
    assert.equal(asked?.granted, false, "the replayed release did not free a's lease");
    assert.equal(asked?.holder, "a");
  } finally {
    a.close();
    b.close();
    relay.close();
    server.close();
  }
});

test("an answer recorded for an earlier request is not taken as the answer to a new one", async () => {
  const key = Buffer.from("witness-replay-key");
  const server = await runWitness({ host: "127.0.0.1", port: 17793, key, cluster: "c", leaseMs: 5000, nodes: ["a", "b"], onEvent: () => {} });
  const relay = await recordingRelay(17793);
  const a = new WitnessClient({ host: "127.0.0.1", port: relay.port, key, cluster: "c", node: "a" });
  try {
    assert.equal((await a.request("acquire", 1000))?.granted, true);
    const grant = relay.toClient.at(-1)!;
    server.close(); // the witness goes away: only the replayed grant could answer
    const pending = a.request("acquire", 300);
    await sleep(20);
    await relay.replayToClient(grant);
    assert.equal(await pending, null, "the old grant carries another nonce: no answer, no lease");
  } finally {
    a.close();
    relay.close();
  }
});

test("a request stamped far from the witness's clock is stale: refused, counted, nothing changes", async () => {
  const key = Buffer.from("k");
  const c = new RequestChecker(key, "c", ["a", "b"]);
  const req = (ts: number, node = "a") => seal({ v: 1, t: "lease-request", cluster: "c", node, op: "acquire", ts, nonce: "n" }, key);
  assert.equal(c.check(req(1_000_000 - 60_000), 1_000_000).verdict, "stale");
  assert.equal(c.check(req(1_000_000), 1_000_000).verdict, "ok");
  assert.equal(c.check(req(1_000_000 - 1), 1_000_000).verdict, "replayed", "older than the high-water mark");
  assert.equal(c.check(req(1_000_000 - 1, "b"), 1_000_000).verdict, "ok", "the marks are per node");
  assert.equal(c.check(req(1_000_001, "x"), 1_000_000).verdict, "foreign");
  assert.equal(c.check(seal({ v: 1, cluster: "c", node: "a", inc: 1, seq: 1 }, key), 1_000_000).verdict, "forged", "a heartbeat body is not a request");
});
