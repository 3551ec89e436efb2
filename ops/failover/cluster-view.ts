// The cluster as the failover test sees it: each node's state and whether the volume
// is in sync, from the node's control socket when it is local (the lab, or the node
// the tool runs on), else from the node's Prometheus endpoint; and the cluster event
// logs that are on this machine, merged and parsed.
import { existsSync, readFileSync } from "node:fs";
import { get } from "node:http";
import type { MailhaConfig } from "../../common/config.ts";
import { nodeStatus } from "../../cluster/client.ts";
import { clusterEventLog } from "../../cluster/node.ts";

export interface NodeView {
  readonly id: string;
  /** null: the node does not answer. */
  readonly state: string | null;
  readonly inSync: boolean;
}

export interface ClusterEvent {
  readonly time: number;
  readonly node: string;
  readonly type: string;
  readonly state?: string;
  readonly prev?: string;
  readonly reason?: string | null;
  readonly resource?: string;
  readonly [k: string]: unknown;
}

function metrics(address: string, port: number, timeoutMs: number): Promise<string | null> {
  return new Promise((resolve) => {
    const req = get({ host: address, port, path: "/metrics", timeout: timeoutMs }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (body = (body + d).slice(0, 1 << 20)));
      res.on("end", () => resolve(res.statusCode === 200 ? body : null));
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(null));
  });
}

export async function nodeView(c: MailhaConfig, id: string, timeoutMs = 1000): Promise<NodeView> {
  const local = await nodeStatus(c, id, timeoutMs).catch(() => null);
  if (local) return { id, state: local.state, inSync: !!local.volume && local.volume.connection === "connected" && local.volume.disk === "uptodate" && local.volume.peer.disk === "uptodate" };
  const n = c.nodes.find((x) => x.id === id)!;
  const text = await metrics(n.service_address, c.manager.metrics_port, timeoutMs);
  if (!text) return { id, state: null, inSync: false };
  const state = /mailha_node_state\{[^}]*state="([a-z-]+)"[^}]*\} 1\b/.exec(text)?.[1] ?? null;
  const connected = /mailha_volume_connected\{[^}]*\} 1\b/.test(text);
  const oos = Number(/mailha_volume_out_of_sync_bytes\{[^}]*\} (\d+)/.exec(text)?.[1] ?? "1");
  return { id, state, inSync: connected && oos === 0 };
}

export async function clusterView(c: MailhaConfig): Promise<NodeView[]> {
  return Promise.all(c.nodes.map((n) => nodeView(c, n.id)));
}

/** Healthy: one node active, the other passive (not failed, not in standby), the volume in sync. */
export const healthy = (v: readonly NodeView[]) => v.every((n) => (n.state === "active" || n.state === "passive") && n.inSync) && v.filter((n) => n.state === "active").length === 1;

/** Cluster events of every node whose log is on this machine, from SINCE on, in time order. */
export function clusterEvents(c: MailhaConfig, since: number): ClusterEvent[] {
  const out: ClusterEvent[] = [];
  for (const n of c.nodes) {
    const f = clusterEventLog(c, n.id);
    if (!existsSync(f)) continue;
    for (const line of readFileSync(f, "utf8").split("\n")) {
      if (!line) continue;
      try {
        const e = JSON.parse(line) as Record<string, unknown>;
        const time = new Date(String(e.time)).getTime();
        if (time >= since) out.push({ ...e, time, node: n.id, type: String(e.type) } as ClusterEvent);
      } catch {
        // a torn last line of a crashed node
      }
    }
  }
  return out.sort((a, b) => a.time - b.time);
}
