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
  const act = (node: "a" | "b", a: Action) => {
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
  return { m, run, cmd, setInSync: (v: boolean) => (inSync = v) };
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
