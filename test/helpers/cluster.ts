// Reading a lab cluster from a test: node status, the cluster event logs, waiting
// for a state, running lab faults.
import { readFileSync, existsSync } from "node:fs";
import assert from "node:assert/strict";
import { loadConfig, type MailhaConfig } from "../../common/config.ts";
import { sleep } from "../../common/exec.ts";
import { nodeStatus, type NodeStatusView } from "../../cluster/client.ts";
import { clusterEventLog } from "../../cluster/node.ts";
import { mailha } from "./cli.ts";
import type { TestLab } from "./lab.ts";

export function config(lab: TestLab): MailhaConfig {
  return loadConfig(lab.configFile);
}

export async function status(lab: TestLab, node: string): Promise<NodeStatusView | null> {
  return nodeStatus(config(lab), node, 2000).catch(() => null);
}

export async function waitNode(lab: TestLab, node: string, what: string, pred: (s: NodeStatusView) => boolean, timeoutMs = 60_000): Promise<NodeStatusView> {
  const deadline = Date.now() + timeoutMs;
  let last: NodeStatusView | null = null;
  while (Date.now() < deadline) {
    last = await status(lab, node);
    if (last && pred(last)) return last;
    await sleep(200);
  }
  throw new Error(`node ${node}: ${what} did not happen within ${timeoutMs} ms (last: ${last ? `${last.state}, peer ${last.peer.state}, resources ${JSON.stringify(last.resources)}` : "no answer"})`);
}

export interface ClusterEvent {
  time: string;
  node: string;
  type: string;
  [k: string]: unknown;
}

export function events(lab: TestLab, node: string): ClusterEvent[] {
  const f = clusterEventLog(config(lab), node);
  if (!existsSync(f)) return [];
  return readFileSync(f, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as ClusterEvent);
}

/** The first event of NODE matching PRED after time SINCE (ISO). */
export function firstEvent(lab: TestLab, node: string, since: string, pred: (e: ClusterEvent) => boolean): ClusterEvent | undefined {
  return events(lab, node).find((e) => e.time >= since && pred(e));
}

export async function fault(lab: TestLab, ...args: string[]): Promise<{ at: string }> {
  const r = await mailha(["lab", "fault", ...args, "--config", lab.configFile, "--json"]);
  assert.equal(r.code, 0, `lab fault ${args.join(" ")} failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as { at: string };
}

export const msBetween = (a: string, b: string) => new Date(b).getTime() - new Date(a).getTime();

/** Loop devices left on a dead FUSE export (their backing file shows as "/volume"). */
export async function strayLoops(): Promise<string[]> {
  const { tryRun } = await import("../../common/exec.ts");
  const out = (await tryRun("losetup", ["-a"]))?.stdout ?? "";
  return out.split("\n").filter((l) => l.includes("(/volume)"));
}
