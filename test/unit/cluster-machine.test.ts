// The node state machine as an operator sees it, on a perfect network: the preferred
// node becomes active; standby, switchover and failback move the group; failback is
// refused while the volume is out of sync; auto_failback gives the group back.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ClusterMachine, type Action, type Command, type Event } from "../../cluster/machine.ts";

function pair(autoFailback = false) {
  let now = 0;
  const opts = (id: string, peer: string) => ({
    nodeId: id, peerId: peer, preferred: "a", autoFailback, links: ["service"], keepaliveMs: 100, warntimeMs: 300, deadtimeMs: 600, initdeadMs: 1000,
    witness: true, pingTargets: false, fencing: "none" as const, leaseMs: 2500, selfFenceMs: 1500, maxRestarts: 1, restartWindowMs: 10_000,
  });
  const m = { a: new ClusterMachine(opts("a", "b"), 0), b: new ClusterMachine(opts("b", "a"), 0) };
  const pending: { at: number; node: "a" | "b"; ev: Event }[] = [];
  const replies: Record<number, string | undefined> = {};
  let inSync = true;
  const feed = (node: "a" | "b", ev: Event) => {
    for (const a of m[node].handle(ev)) act(node, a);
  };
  const acts: Record<"a" | "b", Action[]> = { a: [], b: [] };
  const act = (node: "a" | "b", a: Action) => {
    acts[node].push(a);
    if (a.t === "start-group") pending.push({ at: now + 200, node, ev: { t: "group-started", now: 0, ok: true } });
    if (a.t === "stop-group") pending.push({ at: now + 200, node, ev: { t: "group-stopped", now: 0, ok: true } });
    if (a.t === "lease" && a.op === "acquire") pending.push({ at: now + 5, node, ev: { t: "lease", now: 0, held: true, expiresMs: now + 2500 } });
    if (a.t === "reply") replies[a.req] = a.error ?? "ok";
  };
  const run = (ms: number) => {
    const end = now + ms;
    while (now < end) {
      now += 50;
      for (const p of pending.filter((x) => x.at <= now)) {
        pending.splice(pending.indexOf(p), 1);
        feed(p.node, { ...p.ev, now } as Event);
      }
      if (now % 100 === 0) {
        const sa = m.a.summary();
        const sb = m.b.summary();
        feed("b", { t: "heartbeat", now, link: "service", summary: sa });
        feed("a", { t: "heartbeat", now, link: "service", summary: sb });
        feed("a", { t: "volume", now, inSync });
        feed("b", { t: "volume", now, inSync });
      }
      feed("a", { t: "tick", now });
      feed("b", { t: "tick", now });
    }
  };
  let req = 0;
  const cmd = (node: "a" | "b", c: Command) => {
    const id = ++req;
    feed(node, { t: "command", now, req: id, cmd: c });
    return () => replies[id];
  };
  return { m, run, cmd, acts, feed, now: () => now, setInSync: (v: boolean) => (inSync = v) };
}

test("the preferred node becomes active; the other stays passive", () => {
  const p = pair();
  p.run(2000);
  assert.equal(p.m.a.nodeState, "active");
  assert.equal(p.m.b.nodeState, "passive");
});

test("switchover moves the group; failback brings it back, refused while out of sync", () => {
  const p = pair();
  p.run(2000);
  const sw = p.cmd("a", "switchover");
  p.run(2000);
  assert.equal(sw(), "ok");
  assert.equal(p.m.b.nodeState, "active");
  assert.equal(p.m.a.nodeState, "passive", "no automatic failback by default");
  p.setInSync(false);
  p.run(300);
  const refused = p.cmd("b", "failback");
  assert.match(refused() ?? "", /not in sync/);
  p.setInSync(true);
  p.run(300);
  const fb = p.cmd("b", "failback");
  p.run(2000);
  assert.equal(fb(), "ok");
  assert.equal(p.m.a.nodeState, "active");
  assert.equal(p.cmd("a", "failback")(), "already on the preferred node a");
});

test("standby hands the group over and keeps the node out until online", () => {
  const p = pair();
  p.run(2000);
  p.cmd("a", "standby");
  p.run(2000);
  assert.equal(p.m.a.nodeState, "standby");
  assert.equal(p.m.b.nodeState, "active");
  p.cmd("a", "online");
  p.run(2000);
  assert.equal(p.m.a.nodeState, "passive");
  assert.equal(p.m.b.nodeState, "active", "coming online does not take the group back");
});

test("auto_failback: the preferred node takes the group back once the volume is in sync", () => {
  const p = pair(true);
  p.run(2000);
  p.cmd("a", "switchover");
  p.setInSync(false);
  p.run(3000);
  assert.equal(p.m.b.nodeState, "active", "not while the volume is out of sync");
  p.setInSync(true);
  p.run(3000);
  assert.equal(p.m.a.nodeState, "active");
  assert.equal(p.m.b.nodeState, "passive");
});

test("a heartbeat that brings no newer summary shows the link alive and keeps the peer's last word", () => {
  const p = pair();
  p.run(2000);
  const before = p.m.b.status().peer.summary;
  assert.equal(before?.state, "active");
  // A late packet on a second look at the same link: heard, but its summary was older.
  p.m.b.handle({ t: "heartbeat", now: 2010, link: "service", summary: null });
  assert.equal(p.m.b.status().peer.summary?.state, "active", "the newest summary stays");
  assert.equal(p.m.b.status().links.service, "up");
});

test("the active node publishes both addresses only while the peer is heard and in sync; a change is said once", () => {
  const p = pair();
  p.run(2000);
  const dns = () => p.acts.a.filter((x) => x.t === "dns").map((x) => (x as Extract<Action, { t: "dns" }>).peerLive);
  assert.deepEqual(dns(), [true], "active with the peer up and in sync: both");
  assert.deepEqual(p.acts.b.filter((x) => x.t === "dns"), [], "the passive node publishes nothing");
  p.setInSync(false);
  p.run(500);
  assert.deepEqual(dns(), [true, false], "out of sync: only the active node");
  p.setInSync(true);
  p.run(500);
  assert.deepEqual(dns(), [true, false, true]);
});

test("outdate-peer: the passive node marks its disk Outdated once when the active peer writes alone and its link is down", () => {
  const p = pair();
  p.run(2000);
  const outdates = () => p.acts.b.filter((x) => x.t === "outdate-disk").length;
  const t = p.now();
  // a writes without b (its replication link is down); b is secondary, Consistent, not replicating.
  p.feed("a", { t: "volume", now: t, inSync: false, writingAlone: true, role: "primary", disk: "uptodate", replicating: false });
  p.feed("b", { t: "volume", now: t, inSync: false, role: "secondary", disk: "consistent", replicating: true });
  p.feed("b", { t: "heartbeat", now: t, link: "service", summary: p.m.a.summary() });
  assert.equal(outdates(), 0, "still replicating: nothing to do");
  p.feed("b", { t: "volume", now: t, inSync: false, role: "secondary", disk: "consistent", replicating: false });
  assert.equal(outdates(), 1);
  p.feed("b", { t: "heartbeat", now: t + 1, link: "service", summary: p.m.a.summary() });
  p.feed("b", { t: "volume", now: t + 1, inSync: false, role: "secondary", disk: "consistent", replicating: false });
  assert.equal(outdates(), 1, "asked once until answered");
  p.feed("b", { t: "outdated", now: t + 2, ok: false, error: "engine busy" });
  assert.equal(outdates(), 2, "a failed outdate is asked again");
  p.feed("b", { t: "outdated", now: t + 3, ok: true });
  p.feed("b", { t: "volume", now: t + 3, inSync: false, role: "secondary", disk: "outdated", replicating: false });
  p.feed("b", { t: "heartbeat", now: t + 3, link: "service", summary: p.m.a.summary() });
  assert.equal(outdates(), 2, "Outdated: done");
  // The active side itself never outdates.
  assert.equal(p.acts.a.filter((x) => x.t === "outdate-disk").length, 0);
});
