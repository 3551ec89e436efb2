// Faults for the lab, shared by tests, people and the failover test tool:
//   kill-node N      every process in N's namespace gets SIGKILL (power loss)
//   boot-node N      after a kill: clear N's dead mounts and loop devices, start its node daemon
//   freeze-node N    SIGSTOP every process in N's namespace; thaw-node N: SIGCONT
//   cut-link N L     take link L (service, replication, both) of node N down
//   partition        the nodes cannot reach each other (replication down, service blackholed); both still reach w
//   heal             every link up, partitions removed, frozen nodes thawed
//   kill-service N S SIGKILL one resource daemon (mariadb, redis, dovecot, smtp) on node N
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { loadConfig } from "../../common/config.ts";
import { isAlive, startDaemon, type DaemonRecord } from "../../common/daemon.ts";
import { UsageError } from "../../common/errors.ts";
import { run, tryRun } from "../../common/exec.ts";
import { nodeSpec } from "../../cluster/client.ts";
import { nodePaths } from "../../common/paths.ts";
import { unmountVolume } from "../../replication/filesystem.ts";
import { loopsUnder, mountsUnder, requireLab } from "./lab.ts";
import { namespacePids, REPLICATION_DEV, SERVICE_DEV, nsPrefix } from "./network.ts";

export type Fault = "kill-node" | "boot-node" | "freeze-node" | "thaw-node" | "cut-link" | "partition" | "heal" | "kill-service";
export const FAULTS: readonly Fault[] = ["kill-node", "boot-node", "freeze-node", "thaw-node", "cut-link", "partition", "heal", "kill-service"];
const SERVICES = ["mariadb", "redis", "dovecot", "smtp"] as const;

async function signalAll(ns: string, sig: NodeJS.Signals): Promise<number> {
  const pids = await namespacePids(ns);
  for (const p of pids) {
    try {
      process.kill(p, sig);
    } catch {
      // gone
    }
  }
  return pids.length;
}

export async function labFault(configFile: string, fault: Fault, args: string[]): Promise<Record<string, unknown>> {
  const c = requireLab(loadConfig(configFile, { checkSecrets: false }));
  const ns = (id: string) => `${nsPrefix(c.lab.name)}${id}`;
  const node = (i: number) => {
    const id = args[i];
    if (!id || !c.nodes.some((n) => n.id === id)) throw new UsageError(`${fault} needs a node id (${c.nodes.map((n) => n.id).join(" or ")})`);
    return id;
  };
  const at = new Date().toISOString();
  switch (fault) {
    case "kill-node": {
      const id = node(0);
      const n = await signalAll(ns(id), "SIGKILL");
      return { fault, node: id, at, killed: n };
    }
    case "boot-node": {
      const id = node(0);
      if ((await namespacePids(ns(id))).length) throw new UsageError(`node ${id} still runs processes: kill-node first`);
      const dir = resolve(join(c.lab.dir, id));
      // Like a reboot: the file system on the dead export first, its loop device while
      // the export's path still names it, then whatever else was mounted.
      await unmountVolume(dir, nodePaths(dir).data, { lazy: true }).catch(() => ({}));
      for (const l of await loopsUnder(dir)) await tryRun("losetup", ["-d", l]);
      for (const m of mountsUnder(dir)) await tryRun("umount", ["-l", m.mountpoint]);
      const rec = await startDaemon(nodeSpec(c, id));
      const stateFile = join(c.lab.dir, "lab.json");
      if (existsSync(stateFile)) {
        const st = JSON.parse(readFileSync(stateFile, "utf8")) as { daemons: DaemonRecord[] };
        st.daemons = st.daemons.filter((d) => d.name !== rec.name).concat(rec);
        writeFileSync(stateFile, JSON.stringify(st, null, 2));
      }
      return { fault, node: id, at, pid: rec.pid };
    }
    case "freeze-node":
    case "thaw-node": {
      const id = node(0);
      const n = await signalAll(ns(id), fault === "freeze-node" ? "SIGSTOP" : "SIGCONT");
      return { fault, node: id, at, processes: n };
    }
    case "cut-link": {
      const id = node(0);
      const which = args[1] ?? "both";
      const devs = which === "service" ? [SERVICE_DEV] : which === "replication" ? [REPLICATION_DEV] : which === "both" ? [SERVICE_DEV, REPLICATION_DEV] : null;
      if (!devs) throw new UsageError("cut-link NODE service|replication|both");
      // One ip process for both: the links go down together, so no heartbeat on one
      // reports what the other's loss began (a peer that heard "writing alone" outdates itself).
      await run("ip", ["-n", ns(id), "-batch", "-"], { input: devs.map((d) => `link set ${d} down\n`).join("") });
      return { fault, node: id, link: which, at };
    }
    case "partition": {
      const [a, b] = c.nodes;
      await run("ip", ["-n", ns(a!.id), "link", "set", REPLICATION_DEV, "down"]);
      await tryRun("ip", ["-n", ns(a!.id), "route", "add", "blackhole", `${b!.service_address}/32`]);
      await tryRun("ip", ["-n", ns(b!.id), "route", "add", "blackhole", `${a!.service_address}/32`]);
      return { fault, at };
    }
    case "kill-service": {
      const id = node(0);
      const svc = args[1] ?? "";
      if (!(SERVICES as readonly string[]).includes(svc)) throw new UsageError(`kill-service NODE SERVICE: SERVICE is one of ${SERVICES.join(", ")}`);
      const f = join(nodePaths(resolve(join(c.lab.dir, id))).run, "resources.json");
      const rec = existsSync(f) ? (JSON.parse(readFileSync(f, "utf8")) as DaemonRecord[]).find((d) => d.name === svc && isAlive(d)) : undefined;
      if (!rec) throw new UsageError(`${svc} does not run on node ${id}`);
      process.kill(rec.pid, "SIGKILL");
      return { fault, node: id, service: svc, pid: rec.pid, at };
    }
    case "heal": {
      for (const n of c.nodes) {
        await signalAll(ns(n.id), "SIGCONT");
        for (const d of [SERVICE_DEV, REPLICATION_DEV]) await tryRun("ip", ["-n", ns(n.id), "link", "set", d, "up"]);
        const peer = c.nodes.find((x) => x.id !== n.id)!;
        await tryRun("ip", ["-n", ns(n.id), "route", "del", "blackhole", `${peer.service_address}/32`]);
      }
      return { fault, at };
    }
  }
}
