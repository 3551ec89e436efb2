// Redis as a managed daemon: AOF with appendfsync always in the node's data directory
// (so a queued job survives a failover exactly as an SMTP 250 does), bound to loopback
// inside the node and to a unix socket for local clients.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import type { DaemonSpec } from "../common/daemon.ts";
import { probeLine } from "../common/probe.ts";
import type { NodePaths } from "../common/paths.ts";

export interface RedisPaths {
  readonly dir: string;
  readonly socket: string;
  readonly log: string;
}

export function redisPaths(p: NodePaths): RedisPaths {
  return { dir: join(p.data, "redis"), socket: join(p.run, "redis.sock"), log: join(p.log, "redis.log") };
}

export function redisSpec(name: string, r: RedisPaths, netns?: string): DaemonSpec {
  mkdirSync(r.dir, { recursive: true });
  return {
    name,
    command: "redis-server",
    args: [
      "--port", "6379",
      "--bind", "127.0.0.1",
      "--dir", r.dir,
      "--appendonly", "yes",
      "--appendfsync", "always",
      "--save", "",
      "--daemonize", "no",
      "--unixsocket", r.socket,
      "--unixsocketperm", "700",
      "--logfile", "",
    ],
    netns,
    logFile: r.log,
    ready: () => pingRedis(r.socket),
    readyTimeoutMs: 20_000,
    stopTimeoutMs: 15_000,
  };
}

/** Sends PING over the unix socket; true on +PONG within a second. */
export function pingRedis(socket: string, timeoutMs = 1000): Promise<boolean> {
  return probeLine({ connect: { path: socket }, send: "PING", expect: "+PONG", timeoutMs });
}

/** How a client reaches this node's Redis (ioredis/BullMQ options): every client takes them from here. */
export function redisConnection(socket: string): { path: string; maxRetriesPerRequest: null } {
  return { path: socket, maxRetriesPerRequest: null };
}
