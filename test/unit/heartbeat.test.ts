// Heartbeat packets: a genuine one is accepted; forged, foreign, replayed and stale
// ones are dropped and counted.
import { test } from "node:test";
import assert from "node:assert/strict";
import { encodeHeartbeat, HeartbeatReceiver, type Heartbeat } from "../../cluster/heartbeat.ts";

const key = Buffer.from("k".repeat(64));
const summary = { state: "active", activeSinceMs: 1, quorum: true, handoffTo: null, wantsFailback: false, volumeInSync: true, requestId: null, grant: null } as const;
const hb = (over: Partial<Heartbeat> = {}): Heartbeat => ({ v: 1, cluster: "c", node: "a", inc: 1000, seq: 1, ts: 5000, link: "service", summary, ...over });

test("a genuine heartbeat is accepted, with its summary", () => {
  const r = new HeartbeatReceiver(key, "c", "a");
  const v = r.accept(encodeHeartbeat(hb(), key), 5000);
  assert.equal(v.verdict, "ok");
  assert.equal(v.hb?.summary.state, "active");
  assert.equal(r.counters.accepted, 1);
});

test("forged packets (wrong key, flipped byte, garbage) are dropped and counted", () => {
  const r = new HeartbeatReceiver(key, "c", "a");
  assert.equal(r.accept(encodeHeartbeat(hb(), Buffer.from("wrong key")), 5000).verdict, "forged");
  const pkt = encodeHeartbeat(hb({ seq: 2 }), key);
  pkt[pkt.length - 3] = pkt[pkt.length - 3]! ^ 1;
  assert.equal(r.accept(pkt, 5000).verdict, "forged");
  assert.equal(r.accept(Buffer.from("hello"), 5000).verdict, "forged");
  assert.equal(r.counters.forged, 3);
  assert.equal(r.counters.accepted, 0);
});

test("packets from another cluster or node are dropped", () => {
  const r = new HeartbeatReceiver(key, "c", "a");
  assert.equal(r.accept(encodeHeartbeat(hb({ cluster: "other" }), key), 5000).verdict, "foreign");
  assert.equal(r.accept(encodeHeartbeat(hb({ node: "b" }), key), 5000).verdict, "foreign");
});

test("a replayed packet is dropped; the same sequence on another link is fine", () => {
  const r = new HeartbeatReceiver(key, "c", "a");
  const p = encodeHeartbeat(hb({ seq: 7 }), key);
  assert.equal(r.accept(p, 5000).verdict, "ok");
  assert.equal(r.accept(p, 5001).verdict, "replayed");
  assert.equal(r.accept(encodeHeartbeat(hb({ seq: 7, link: "replication" }), key), 5000).verdict, "ok");
  assert.equal(r.accept(encodeHeartbeat(hb({ seq: 5 }), key), 5000).verdict, "replayed");
  assert.equal(r.counters.replayed, 2);
});

test("an older incarnation or a far-off timestamp is stale; a restart (newer incarnation) resets sequences", () => {
  const r = new HeartbeatReceiver(key, "c", "a");
  assert.equal(r.accept(encodeHeartbeat(hb({ seq: 50 }), key), 5000).verdict, "ok");
  assert.equal(r.accept(encodeHeartbeat(hb({ inc: 999, seq: 60 }), key), 5000).verdict, "stale");
  assert.equal(r.accept(encodeHeartbeat(hb({ seq: 61, ts: 5000 - 120_000 }), key), 5000).verdict, "stale");
  assert.equal(r.accept(encodeHeartbeat(hb({ inc: 2000, seq: 1 }), key), 5000).verdict, "ok", "the peer restarted: its sequence starts again");
});

test("a summary older than one already taken from another link does not replace it", () => {
  const r = new HeartbeatReceiver(key, "c", "a", { deadtimeMs: 2000 });
  const newer = r.accept(encodeHeartbeat(hb({ seq: 10, link: "service", summary: { ...summary, state: "deactivating" } }), key), 5000);
  assert.equal(newer.verdict, "ok");
  assert.equal(newer.summary?.state, "deactivating", "the newest packet's summary is taken");
  // A packet of an earlier round, late on the other link: the link is alive, its news is old.
  const late = r.accept(encodeHeartbeat(hb({ seq: 8, link: "replication", summary: { ...summary, state: "active" } }), key), 5000);
  assert.equal(late.verdict, "ok", "it still shows the replication link alive");
  assert.equal(late.summary, null, "but its older summary does not roll the peer's view back");
  const same = r.accept(encodeHeartbeat(hb({ seq: 10, link: "replication", summary: { ...summary, state: "deactivating" } }), key), 5000);
  assert.equal(same.summary?.state, "deactivating", "the same round on another link is as new");
});

test("a heartbeat older than a few deadtimes is stale, however new its sequence", () => {
  const r = new HeartbeatReceiver(key, "c", "a", { deadtimeMs: 600 });
  assert.equal(r.accept(encodeHeartbeat(hb({ seq: 1, ts: 100_000 }), key), 100_000).verdict, "ok");
  // Held back by someone on the path for 10 s, then delivered: the peer may be dead by now.
  assert.equal(r.accept(encodeHeartbeat(hb({ seq: 2, ts: 100_000 }), key), 110_000).verdict, "stale");
  assert.equal(r.accept(encodeHeartbeat(hb({ seq: 3, ts: 110_000 - 4 * 600 + 1 }), key), 110_000).verdict, "ok", "within 4 deadtimes of our clock");
  assert.equal(r.counters.stale, 1);
});
