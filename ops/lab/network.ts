// The lab's network: one namespace per host (node a, node b, third host w), a service
// network (a bridge joining a, b, w and the operator's seat on this machine) and a
// separate replication link between a and b only, so one link can be pulled alone.
// Every name it makes starts with the lab's prefix, so teardown finds leftovers.
import { run, tryRun } from "../../common/exec.ts";

export type LabHostRole = "node" | "witness";

export interface LabHost {
  /** Node id, or "w" for the third host. */
  readonly id: string;
  readonly role: LabHostRole;
  readonly netns: string;
  readonly serviceAddress: string;
  readonly replicationAddress?: string;
}

export interface LabLayout {
  readonly name: string;
  readonly hosts: readonly LabHost[];
  readonly bridge: string;
  readonly operatorAddress: string;
  readonly prefixLen: number;
}

/** The device name a host's service interface has inside its namespace. */
export const SERVICE_DEV = "svc0";
/** The device name of the replication interface inside a node's namespace. */
export const REPLICATION_DEV = "rep0";

export const nsPrefix = (lab: string) => `mailha-${lab}-`;
export const linkPrefix = (lab: string) => `mh-${lab}-`;

export function layoutNames(lab: string) {
  const l = linkPrefix(lab);
  return {
    bridge: `${l}br`,
    hostVeth: (i: number) => `${l}s${i}`,
    peerVeth: (i: number) => `${l}p${i}`,
    repVeth: (i: number) => `${l}r${i}`,
  };
}

async function ip(...args: string[]): Promise<void> {
  await run("ip", args, { timeoutMs: 10_000 });
}

/** Refuses to build over an address range the machine already uses for something else. */
async function assertSubnetFree(layout: LabLayout): Promise<void> {
  const { stdout } = await run("ip", ["-j", "-4", "addr", "show"]);
  const used = JSON.parse(stdout) as { ifname: string; addr_info?: { local: string }[] }[];
  const ours = new Set(layout.hosts.map((h) => h.serviceAddress).concat(layout.operatorAddress));
  for (const dev of used) {
    for (const a of dev.addr_info ?? []) {
      if (ours.has(a.local)) throw new Error(`address ${a.local} is already on ${dev.ifname}: is another lab or network using it? (mailha lab down, or change the addresses in the config)`);
    }
  }
}

/** Builds namespaces, bridge, veths and addresses. Throws (and leaves names to clean) on failure. */
export async function buildNetwork(layout: LabLayout): Promise<void> {
  await assertSubnetFree(layout);
  const n = layoutNames(layout.name);
  const p = layout.prefixLen;
  for (const h of layout.hosts) {
    await ip("netns", "add", h.netns);
    await ip("-n", h.netns, "link", "set", "lo", "up");
  }
  await ip("link", "add", n.bridge, "type", "bridge");
  await ip("addr", "add", `${layout.operatorAddress}/${p}`, "dev", n.bridge);
  await ip("link", "set", n.bridge, "up");
  for (const [i, h] of layout.hosts.entries()) {
    await ip("link", "add", n.hostVeth(i), "type", "veth", "peer", "name", n.peerVeth(i));
    await ip("link", "set", n.peerVeth(i), "netns", h.netns);
    await ip("-n", h.netns, "link", "set", n.peerVeth(i), "name", SERVICE_DEV);
    await ip("-n", h.netns, "addr", "add", `${h.serviceAddress}/${p}`, "dev", SERVICE_DEV);
    await ip("-n", h.netns, "link", "set", SERVICE_DEV, "up");
    await ip("link", "set", n.hostVeth(i), "master", n.bridge);
    await ip("link", "set", n.hostVeth(i), "up");
  }
  const nodes = layout.hosts.filter((h) => h.role === "node");
  if (nodes.length === 2) {
    await ip("link", "add", n.repVeth(0), "type", "veth", "peer", "name", n.repVeth(1));
    for (const [i, h] of nodes.entries()) {
      await ip("link", "set", n.repVeth(i), "netns", h.netns);
      await ip("-n", h.netns, "link", "set", n.repVeth(i), "name", REPLICATION_DEV);
      await ip("-n", h.netns, "addr", "add", `${h.replicationAddress}/${p}`, "dev", REPLICATION_DEV);
      await ip("-n", h.netns, "link", "set", REPLICATION_DEV, "up");
    }
  }
}

/** Lab namespaces present on the machine, found by name. */
export async function labNamespaces(lab: string): Promise<string[]> {
  const r = await tryRun("ip", ["-j", "netns", "list"]);
  if (!r || !r.stdout.trim()) return [];
  const list = JSON.parse(r.stdout) as { name: string }[];
  return list.map((x) => x.name).filter((x) => x.startsWith(nsPrefix(lab)));
}

/** Host-side links of the lab (bridge, veth ends), found by name. */
export async function labHostLinks(lab: string): Promise<string[]> {
  const r = await tryRun("ip", ["-j", "link", "show"]);
  if (!r) return [];
  const list = JSON.parse(r.stdout) as { ifname: string }[];
  return list.map((x) => x.ifname).filter((x) => x.startsWith(linkPrefix(lab)));
}

/** PIDs of every process whose network namespace is NS. */
export async function namespacePids(ns: string): Promise<number[]> {
  const r = await tryRun("ip", ["netns", "pids", ns]);
  if (!r) return [];
  return r.stdout.split(/\s+/).filter(Boolean).map(Number).filter((x) => Number.isInteger(x) && x > 0);
}

/** Removes namespaces and host links of the lab. Safe to run when nothing is there. */
export async function teardownNetwork(lab: string): Promise<{ namespaces: string[]; links: string[] }> {
  const namespaces = await labNamespaces(lab);
  for (const ns of namespaces) await tryRun("ip", ["netns", "del", ns]);
  const links = await labHostLinks(lab);
  for (const l of links) await tryRun("ip", ["link", "del", l]);
  return { namespaces, links };
}

export interface LinkState {
  readonly dev: string;
  readonly state: string;
  readonly addresses: string[];
}

/** Interfaces (other than lo) in NS with their operational state and addresses. */
export async function namespaceLinks(ns: string): Promise<LinkState[]> {
  const r = await tryRun("ip", ["-j", "-n", ns, "addr", "show"]);
  if (!r) return [];
  const list = JSON.parse(r.stdout) as { ifname: string; operstate: string; flags?: string[]; addr_info?: { family: string; local: string; prefixlen: number }[] }[];
  return list
    .filter((x) => x.ifname !== "lo")
    .map((x) => ({
      dev: x.ifname,
      state: x.operstate === "UNKNOWN" && x.flags?.includes("UP") ? "UP" : x.operstate,
      addresses: (x.addr_info ?? []).filter((a) => a.family === "inet").map((a) => `${a.local}/${a.prefixlen}`),
    }));
}
