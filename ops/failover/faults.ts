// The faults a trial can inject, and how each is undone:
//   in the lab   kill-node, freeze-node (SIGSTOP for N seconds), cut-replication,
//                cut-links (both links of the active node), partition, kill-service
//                (one resource daemon), through `mailha lab fault`;
//   anywhere     switchover and failback (mailha's own commands, on a local node),
//                and the operator's own faults from mailha.yaml (failover_test.faults:
//                an inject and a recover shell command each, run with the target in
//                MAILHA_TARGET_NODE / MAILHA_TARGET_ADDRESS / MAILHA_PEER_NODE).
import { spawn } from "node:child_process";
import type { MailhaConfig } from "../../common/config.ts";
import { UsageError } from "../../common/errors.ts";
import { nodeCommand } from "../../cluster/client.ts";
import { labFault } from "../lab/faults.ts";

export const LAB_FAULTS = ["kill-node", "freeze-node", "cut-replication", "cut-links", "partition", "kill-service"] as const;
export const COMMAND_FAULTS = ["switchover", "failback"] as const;
export const SERVICES = ["dovecot", "mariadb", "redis", "smtp"] as const;

export interface FaultOptions {
  readonly freezeMs: number;
  readonly service: (typeof SERVICES)[number];
}

export interface FaultPlan {
  readonly name: string;
  readonly description: string;
  /** Injects the fault on TARGET (the active node); resolves with what was done. */
  inject(target: string): Promise<string>;
  /** Undoes what can be undone (links up, nodes thawed); nodes that are down are booted by the trial. */
  recover(): Promise<void>;
}

/** The fault names this config can run. */
export function availableFaults(c: MailhaConfig): string[] {
  return [...(c.lab ? LAB_FAULTS : []), ...COMMAND_FAULTS, ...Object.keys(c.failover_test.faults), "none"];
}

function shell(cmd: string, env: NodeJS.ProcessEnv, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    // Its own process group, so a command that hangs is killed with its children.
    const p = spawn("sh", ["-c", cmd], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"], detached: true });
    let out = "";
    p.stdout.on("data", (d: Buffer) => (out = (out + d.toString()).slice(-4000)));
    p.stderr.on("data", (d: Buffer) => (out = (out + d.toString()).slice(-4000)));
    const t = setTimeout(() => {
      try {
        process.kill(-p.pid!, "SIGKILL");
      } catch {
        p.kill("SIGKILL");
      }
    }, timeoutMs);
    p.on("close", (code, sig) => {
      clearTimeout(t);
      if (code === 0) resolve(out.trim());
      else reject(new Error(`\`${cmd}\` ${sig ? `was killed (${sig}) after ${timeoutMs} ms` : `exited with ${code}`}: ${out.trim().slice(-500)}`));
    });
  });
}

export function faultPlan(c: MailhaConfig, configFile: string, name: string, o: FaultOptions): FaultPlan {
  const lab = (fault: Parameters<typeof labFault>[1], args: string[]) => labFault(configFile, fault, args);
  const heal = async () => void (await lab("heal", []));
  const custom = c.failover_test.faults[name];
  if (custom) {
    const env = (target: string) => {
      const n = c.nodes.find((x) => x.id === target)!;
      return { MAILHA_TARGET_NODE: target, MAILHA_TARGET_ADDRESS: n.service_address, MAILHA_PEER_NODE: c.nodes.find((x) => x.id !== target)!.id };
    };
    let last = c.nodes[0]!.id;
    return {
      name,
      description: custom.description ?? `operator command: ${custom.inject}`,
      async inject(target) {
        last = target;
        return (await shell(custom.inject, env(target), custom.timeout_ms)) || `ran ${custom.inject}`;
      },
      async recover() {
        if (custom.recover) await shell(custom.recover, env(last), custom.timeout_ms);
      },
    };
  }
  if ((LAB_FAULTS as readonly string[]).includes(name) && !c.lab) throw new UsageError(`fault "${name}" needs the lab; on real nodes define it under failover_test.faults in ${configFile}`);
  switch (name) {
    case "kill-node":
      return { name, description: "every process of the active node gets SIGKILL (power loss)", inject: async (t) => (await lab("kill-node", [t]), `killed node ${t}`), recover: heal };
    case "freeze-node": {
      let thaw: NodeJS.Timeout | null = null;
      return {
        name,
        description: `the active node is frozen (SIGSTOP) for ${o.freezeMs / 1000} s`,
        async inject(t) {
          await lab("freeze-node", [t]);
          thaw = setTimeout(() => void lab("thaw-node", [t]).catch(() => {}), o.freezeMs);
          return `froze node ${t} for ${o.freezeMs} ms`;
        },
        async recover() {
          if (thaw) clearTimeout(thaw);
          await heal();
        },
      };
    }
    case "cut-replication":
      return { name, description: "the active node's replication link is pulled", inject: async (t) => (await lab("cut-link", [t, "replication"]), `cut the replication link of ${t}`), recover: heal };
    case "cut-links":
      return { name, description: "both links of the active node are pulled (it is isolated)", inject: async (t) => (await lab("cut-link", [t, "both"]), `cut both links of ${t}`), recover: heal };
    case "partition":
      return { name, description: "the nodes cannot reach each other; both still reach the witness", inject: async () => (await lab("partition", []), "partitioned the nodes"), recover: heal };
    case "kill-service":
      return { name, description: `${o.service} is killed (SIGKILL) on the active node`, inject: async (t) => (await lab("kill-service", [t, o.service]), `killed ${o.service} on ${t}`), recover: async () => {} };
    case "switchover":
      return { name, description: "planned move of the resource group to the passive node", inject: async (t) => (await nodeCommand(c, t, "switchover"), `switchover from ${t}`), recover: async () => {} };
    case "failback":
      return {
        name,
        description: `the group moves back to the preferred node (${c.cluster.preferred_node})`,
        inject: async (t) => (await nodeCommand(c, t, "failback"), `failback from ${t} to ${c.cluster.preferred_node}`),
        recover: async () => {},
      };
    case "none":
      return { name, description: "no fault (a baseline)", inject: async () => "nothing", recover: async () => {} };
    default:
      throw new UsageError(`unknown fault "${name}" (known here: ${availableFaults(c).join(", ")})`);
  }
}
