// A deterministic simulation of the two-node cluster manager: the real node state
// machine (cluster/machine.ts) on both nodes, heartbeats over two links that can be
// cut or lose packets, a witness that grants one lease at a time and can be lost, ping
// targets, resource groups that take time and sometimes fail, fencing that powers the
// peer off, crashes and restarts. A seed drives every choice; invariants are checked
// after every event.
import { ClusterMachine, type Action, type Event, type MachineOptions, type NodeState } from "../../cluster/machine.ts";
import { rng } from "./volume-sim.ts";

export interface ClusterSimOptions {
  readonly seed: number;
  readonly steps: number;
  readonly witness: boolean;
  readonly ping: boolean;
  readonly fencing: "none" | "lab";
  readonly trace?: boolean;
}

export class ClusterInvariantError extends Error {}

const LINKS = ["service", "replication"] as const;
const TIMERS = { keepaliveMs: 100, warntimeMs: 300, deadtimeMs: 600, initdeadMs: 2000 };
const LEASE_MS = 2500;
const SELF_FENCE_MS = 1500;

interface SimNode {
  readonly id: string;
  m: ClusterMachine | null;
  /** Group is (partly) running: between start-group and a finished stop. */
  groupRunning: boolean;
  groupBusy: boolean;
  witnessReachable: boolean;
  pingReachable: boolean;
  nextHeartbeat: number;
  nextPing: number;
  lostQuorumAt: number | null;
  reqs: number;
}

export function runClusterSimulation(o: ClusterSimOptions) {
  const r = rng(o.seed);
  let now = 0;
  const log: string[] = [];
  const stats = { takeovers: 0, selfFences: 0, crashes: 0, partitions: 0, switchovers: 0, fences: 0 };
  const queue: { at: number; seq: number; fn: () => void }[] = [];
  let seq = 0;
  const at = (t: number, fn: () => void) => {
    queue.push({ at: t, seq: seq++, fn });
    queue.sort((x, y) => x.at - y.at || x.seq - y.seq);
  };
  const linkUp: Record<string, boolean> = { service: true, replication: true };
  let loss = 0;
  let witnessUp = true;
  let lease: { holder: string; expires: number } | null = null;

  const opts = (id: string, peer: string): MachineOptions => ({
    nodeId: id, peerId: peer, preferred: "a", autoFailback: false, links: [...LINKS], ...TIMERS,
    witness: o.witness, pingTargets: o.ping, fencing: o.fencing, leaseMs: LEASE_MS, selfFenceMs: SELF_FENCE_MS, maxRestarts: 2, restartWindowMs: 10_000,
  });
  const mk = (id: string): SimNode => ({ id, m: null, groupRunning: false, groupBusy: false, witnessReachable: true, pingReachable: true, nextHeartbeat: 0, nextPing: 0, lostQuorumAt: null, reqs: 0 });
  const nodes = [mk("a"), mk("b")] as const;
  const other = (n: SimNode) => (n === nodes[0] ? nodes[1] : nodes[0]);
  const fail = (what: string): never => {
    throw new ClusterInvariantError(`seed ${o.seed}: ${what}\n--- last steps ---\n${log.slice(o.trace ? 0 : -40).join("\n")}`);
  };

  const boot = (n: SimNode) => {
    n.m = new ClusterMachine(opts(n.id, other(n).id), now);
    n.groupRunning = false;
    n.groupBusy = false;
    n.nextHeartbeat = now;
    n.nextPing = now;
    n.lostQuorumAt = null;
  };

  const crash = (n: SimNode, why: string) => {
    if (!n.m) return;
    log.push(`${now} ${n.id} ${why}`);
    n.m = null;
    n.groupRunning = false; // power off: nothing of the group runs any more
    n.groupBusy = false;
  };

  const feed = (n: SimNode, ev: Event) => {
    if (!n.m) return;
    const acts = n.m.handle(ev);
    for (const a of acts) act(n, a);
    check();
  };

  const act = (n: SimNode, a: Action) => {
    const m = n.m;
    if (!m) return;
    switch (a.t) {
      case "event":
        log.push(`${now} ${n.id} ${JSON.stringify(a.ev)}`);
        if (a.ev.type === "self-fence") stats.selfFences++;
        break;
      case "start-group": {
        if (a.forcePromote) stats.takeovers++;
        n.groupRunning = true;
        n.groupBusy = true;
        const ok = r() > 0.05;
        at(now + 50 + Math.floor(r() * 1500), () => {
          if (n.m !== m) return;
          n.groupBusy = false;
          if (!ok) n.groupRunning = false;
          feed(n, { t: "group-started", now, ok, error: ok ? undefined : "simulated start failure" });
        });
        break;
      }
      case "stop-group": {
        n.groupBusy = true;
        const ok = r() > 0.02;
        // A stop finishes within the self-fencing bound (the bound the operator sets).
        at(now + 20 + Math.floor(r() * (SELF_FENCE_MS - 200)), () => {
          if (n.m !== m) return;
          n.groupBusy = false;
          if (ok) n.groupRunning = false;
          feed(n, { t: "group-stopped", now, ok, error: ok ? undefined : "simulated stop failure" });
        });
        break;
      }
      case "kill-group":
        at(now + 10 + Math.floor(r() * 90), () => {
          if (n.m !== m) return;
          n.groupRunning = false;
          n.groupBusy = false;
          feed(n, { t: "group-killed", now, ok: true });
        });
        break;
      case "restart-resource":
        at(now + 50 + Math.floor(r() * 300), () => n.m === m && feed(n, { t: "resource-restarted", now, resource: a.resource, ok: r() > 0.1 }));
        break;
      case "fence-peer": {
        stats.fences++;
        const peer = other(n);
        at(now + 50 + Math.floor(r() * 200), () => {
          if (n.m !== m) return;
          if (o.fencing === "lab") crash(peer, "fenced (powered off) by its peer");
          feed(n, { t: "fenced", now, ok: o.fencing === "lab", detail: "sim" });
        });
        break;
      }
      case "lease": {
        if (a.op === "release") {
          if (witnessUp && n.witnessReachable && lease?.holder === n.id) lease = null;
          break;
        }
        const sent = now;
        if (!witnessUp || !n.witnessReachable) break; // no answer
        at(now + Math.floor(r() * 30), () => {
          if (!witnessUp) return;
          const free = !lease || lease.expires <= now || lease.holder === n.id;
          if (free) lease = { holder: n.id, expires: now + LEASE_MS };
          const granted = free;
          if (!n.witnessReachable) return;
          at(now + Math.floor(r() * 30), () => n.m === m && feed(n, { t: "lease", now, held: granted, expiresMs: sent + LEASE_MS }));
        });
        break;
      }
      case "dns":
        // Only the node that runs (or starts) the group publishes the mail host; a
        // takeover without the peer never publishes the peer's address.
        if (m.nodeState !== "active" && m.nodeState !== "activating") fail(`${n.id} published the mail host while ${m.nodeState}`);
        if (a.peerLive && m.nodeState !== "active") fail(`${n.id} published both addresses before it was active`);
        log.push(`${now} ${n.id} dns peerLive=${a.peerLive}`);
        break;
      case "outdate-disk":
        // The sim has no volume model beyond "in sync": a node never asks without one.
        fail(`${n.id} asked to outdate its disk without a volume state`);
        break;
      case "reply":
        break;
    }
  };

  const check = () => {
    const running = nodes.filter((n) => n.m && n.groupRunning);
    if (running.length > 1) fail(`the resource group runs on both nodes (states ${nodes.map((n) => `${n.id}:${n.m?.nodeState}`).join(", ")})`);
    const activeWithQuorum = nodes.filter((n) => n.m?.nodeState === "active" && n.m.hasQuorum(now));
    if (activeWithQuorum.length > 1) fail("two active nodes that both believe they hold quorum");
    for (const n of nodes) {
      if (n.m?.nodeState === "active" && !n.m.hasQuorum(now)) fail(`${n.id} is active without quorum`);
      // Self-fencing bound: a node that left "active" for lack of quorum stops in time.
      if (n.m && n.m.nodeState === "deactivating" && !n.m.hasQuorum(now)) {
        n.lostQuorumAt ??= now;
        if (now - n.lostQuorumAt > SELF_FENCE_MS) fail(`${n.id} still stopping ${now - n.lostQuorumAt} ms after losing quorum (bound ${SELF_FENCE_MS} ms)`);
      } else if (n.m) n.lostQuorumAt = null;
    }
  };

  const pulse = () => {
    for (const n of nodes) {
      if (!n.m) continue;
      if (now >= n.nextHeartbeat) {
        n.nextHeartbeat = now + TIMERS.keepaliveMs;
        const summary = n.m.summary();
        const peer = other(n);
        for (const l of LINKS) {
          if (!linkUp[l] || r() < loss) continue;
          const m = n.m;
          at(now + Math.floor(r() * 40), () => {
            if (!linkUp[l] || !peer.m || !m) return;
            feed(peer, { t: "heartbeat", now, link: l, summary });
          });
        }
      }
      if (o.ping && now >= n.nextPing) {
        n.nextPing = now + 1000;
        feed(n, { t: "ping", now, ok: n.pingReachable });
      }
      feed(n, { t: "tick", now });
    }
  };

  const advance = (ms: number) => {
    const end = now + ms;
    while (queue.length && queue[0]!.at <= end) {
      const e = queue.shift()!;
      now = Math.max(now, e.at);
      e.fn();
    }
    now = end;
    pulse();
  };

  boot(nodes[0]);
  boot(nodes[1]);
  for (let step = 0; step < o.steps; step++) {
    advance(10 + Math.floor(r() * 90));
    const x = r();
    if (x < 0.015) {
      const l = LINKS[Math.floor(r() * 2)]!;
      linkUp[l] = !linkUp[l];
      stats.partitions++;
      log.push(`${now} link ${l} ${linkUp[l] ? "restored" : "cut"}`);
    } else if (x < 0.02) {
      loss = r() < 0.5 ? 0 : r() * 0.5;
      log.push(`${now} packet loss ${loss.toFixed(2)}`);
    } else if (x < 0.025 && o.witness) {
      witnessUp = !witnessUp;
      log.push(`${now} witness ${witnessUp ? "back" : "lost"}`);
    } else if (x < 0.03) {
      const n = nodes[Math.floor(r() * 2)]!;
      n.witnessReachable = !n.witnessReachable;
      n.pingReachable = n.witnessReachable || r() < 0.5;
      log.push(`${now} ${n.id} ${n.witnessReachable ? "reaches" : "is cut from"} the witness/ping targets`);
    } else if (x < 0.034) {
      const n = nodes[Math.floor(r() * 2)]!;
      if (n.m) {
        stats.crashes++;
        crash(n, "crashes");
      } else {
        log.push(`${now} ${n.id} restarts`);
        boot(n);
      }
    } else if (x < 0.037) {
      const act = nodes.find((n) => n.m?.nodeState === "active");
      if (act) {
        stats.switchovers++;
        feed(act, { t: "volume", now, inSync: true });
        feed(act, { t: "command", now, req: ++act.reqs, cmd: "switchover" });
      }
    } else if (x < 0.04) {
      const n = nodes[Math.floor(r() * 2)]!;
      feed(n, { t: "command", now, req: ++n.reqs, cmd: r() < 0.5 ? "standby" : "online" });
    } else if (x < 0.045) {
      const act = nodes.find((n) => n.m?.nodeState === "active");
      if (act) feed(act, { t: "monitor-failed", now, resource: "mariadb", error: "simulated" });
    }
  }

  // Heal everything; a healthy cluster must settle with exactly one active node.
  linkUp.service = linkUp.replication = true;
  loss = 0;
  witnessUp = true;
  for (const n of nodes) {
    n.witnessReachable = n.pingReachable = true;
    if (!n.m) boot(n);
  }
  // The operator (or the hoster's power cycle) brings back what fencing or failures left.
  for (let i = 0; i < 50; i++) {
    advance(100);
    for (const n of nodes) {
      if (!n.m) boot(n);
      else if (["standby", "failed", "stop-failed"].includes(n.m.nodeState)) feed(n, { t: "command", now, req: ++n.reqs, cmd: "online" });
    }
  }
  for (let i = 0; i < 300; i++) advance(100);
  const states = nodes.map((n) => n.m?.nodeState as NodeState);
  const active = states.filter((s) => s === "active").length;
  if (active !== 1) fail(`after healing, ${active} active nodes (states ${states.join(", ")})`);
  return stats;
}
