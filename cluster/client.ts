// The client side of the node daemon: its daemon spec (for `mailha node start` and the
// lab), and questions to its control socket.
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import type { MailhaConfig } from "../common/config.ts";
import type { DaemonSpec } from "../common/daemon.ts";
import { nodeNetns, nodeStateDir } from "../common/paths.ts";
import { controlCall } from "../replication/control.ts";
import { MAILHA_BIN } from "../common/self.ts";

/** The node daemon's control socket (here, not in node.ts: clients must not load the daemon). */
export function nodeControlSocket(c: MailhaConfig, nodeId: string): string {
  return join(nodeStateDir(c, nodeId), "run", "node.sock");
}

const BIN = MAILHA_BIN;

export function nodeSpec(c: MailhaConfig, nodeId: string): DaemonSpec {
  const sock = nodeControlSocket(c, nodeId);
  return {
    name: `node@${nodeId}`,
    command: process.execPath,
    args: [BIN, "node", "run", "--config", c.file, "--node", nodeId],
    netns: nodeNetns(c, nodeId),
    logFile: join(nodeStateDir(c, nodeId), "log", "node.log"),
    ready: async () => existsSync(sock) && !!(await controlCall(sock, "status", {}, 1000)),
    readyTimeoutMs: 60_000,
    stopTimeoutMs: 120_000,
  };
}

export function witnessReadyFile(c: MailhaConfig): string {
  return join(c.lab ? join(c.lab.dir, "w") : c.paths.state_dir, "run", "witness.ready");
}

export function witnessSpec(c: MailhaConfig, netns?: string): DaemonSpec {
  const ready = witnessReadyFile(c);
  return {
    name: "witness@w",
    command: process.execPath,
    args: [BIN, "witness", "run", "--config", c.file],
    netns,
    logFile: join(dirname(dirname(ready)), "log", "witness.log"),
    ready: async () => existsSync(ready),
    readyTimeoutMs: 20_000,
    stopTimeoutMs: 10_000,
  };
}

export type NodeStatusView = {
  node: string;
  state: string;
  stateReason?: string | null;
  peer: { node: string; state: string; summary: { state: string } | null };
  links: Record<string, string>;
  quorum: boolean;
  witness: { held: boolean; expiresInMs: number } | null;
  ping: { ok: boolean } | null;
  activeSinceMs: number | null;
  fencing: string;
  volumeInSync: boolean;
  resources: Record<string, string>;
  heartbeats: { received: number; accepted: number; forged: number; foreign: number; replayed: number; stale: number };
  volume: { role: string; connection: string; disk: string; outOfSyncBytes: number; peer: { disk: string } } | null;
  pid: number;
};

export async function nodeStatus(c: MailhaConfig, nodeId: string, timeoutMs = 3000): Promise<NodeStatusView> {
  return (await controlCall(nodeControlSocket(c, nodeId), "status", {}, timeoutMs)) as NodeStatusView;
}

export function nodeCommand(c: MailhaConfig, nodeId: string, cmd: string, force = false, timeoutMs = 300_000): Promise<unknown> {
  return controlCall(nodeControlSocket(c, nodeId), "command", { cmd, force }, timeoutMs);
}

/** The node reachable from here that runs the resource group (one of localNodes), or null. */
export async function activeLocalNode(c: MailhaConfig): Promise<string | null> {
  for (const id of localNodes(c)) {
    const s = await nodeStatus(c, id, 2000).catch(() => null);
    if (s?.state === "active") return id;
  }
  return null;
}

/** Nodes whose control socket is reachable from here (both in the lab, the local one on a server). */
export function localNodes(c: MailhaConfig): string[] {
  return c.nodes.map((n) => n.id).filter((id) => existsSync(nodeControlSocket(c, id)));
}
