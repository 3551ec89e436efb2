// The faults a trial can inject, and how each is undone:
//   in the lab   kill-node, freeze-node (SIGSTOP for N seconds), cut-replication,
//                cut-links (both links of the active node), partition, kill-service
//                (one resource daemon), through `mailha lab fault`; split-brain (the
//                scenario of issue 14 under client load: the replication link cut,
//                the active node writing alone, killed, the passive forced to take
//                over and writing alone; after the traffic both are healed, the old
//                node is preserved and resynced, then `mailha reconcile`; its steps
//                are logged with their times);
//   anywhere     switchover and failback (mailha's own commands, on a local node),
//                and the operator's own faults from mailha.yaml (failover_test.faults:
//                an inject and a recover shell command each, run with the target in
//                MAILHA_TARGET_NODE / MAILHA_TARGET_ADDRESS / MAILHA_PEER_NODE).
import { spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { MailhaConfig } from "../../common/config.ts";
import { UsageError } from "../../common/errors.ts";
import { sleep } from "../../common/exec.ts";
import { nodePaths, nodeStateDir } from "../../common/paths.ts";
import { nodeCommand, nodeStatus, type NodeStatusView } from "../../cluster/client.ts";
import { labFault } from "../lab/faults.ts";
import { MAILHA_BIN } from "../../common/self.ts";

export const LAB_FAULTS = ["kill-node", "freeze-node", "cut-replication", "cut-links", "partition", "kill-service", "split-brain"] as const;
export const COMMAND_FAULTS = ["switchover", "failback"] as const;
export const SERVICES = ["dovecot", "mariadb", "redis", "smtp"] as const;

export interface FaultOptions {
  readonly freezeMs: number;
  readonly service: (typeof SERVICES)[number];
  /** split-brain: how long the clients write on each side while the nodes are apart (default 4 s). */
  readonly splitMs?: number;
}

/** One step of a multi-step fault, as it ran. */
export interface FaultStepRecord {
  readonly step: SplitStep["kind"];
  readonly label: string;
  readonly start: number;
  readonly end: number;
  readonly ok: boolean;
  readonly detail?: string;
}

/** What `mailha reconcile --json` reported, in brief. */
export interface ReconcileSummary {
  readonly ops: number;
  readonly applied: number;
  readonly notApplied: number;
  readonly complete: boolean;
  readonly seconds: number;
  readonly events: { readonly victim: number; readonly survivor: number } | null;
  readonly reportFile: string | null;
  /** Why the plan is incomplete: the report's stranded entries (at most 10). */
  readonly incomplete: readonly string[];
}

/** The split-brain fault's record: who was apart when, and what the reconcile did. */
export interface SplitBrainRun {
  /** The node that was active, wrote alone, was killed and became the victim. */
  old: string | null;
  /** The node forced to take over: the survivor. */
  new: string | null;
  readonly log: FaultStepRecord[];
  reconcile: ReconcileSummary | null;
}

export interface FaultPlan {
  readonly name: string;
  readonly description: string;
  /** Injects the fault on TARGET (the active node); resolves with what was done. */
  inject(target: string): Promise<string>;
  /** Undoes what can be undone (links up, nodes thawed); nodes that are down are booted by the trial. */
  recover(): Promise<void>;
  /** split-brain only: its steps and the reconcile, filled while it runs. */
  readonly splitBrain?: SplitBrainRun;
}

/**
 * The split-brain scenario as steps (test/lab/reconcile.test.ts does the same by hand):
 * the clients keep writing throughout, so each side acknowledges mail while apart.
 */
export type SplitStep =
  | { readonly kind: "cut-link" | "kill-node" | "boot-node" | "heal"; readonly label: string; readonly args: readonly string[] }
  | { readonly kind: "wait"; readonly label: string; readonly node: string; readonly until: "outdated" | "failed" | "active" | "resynced"; readonly timeoutMs: number }
  | { readonly kind: "traffic"; readonly label: string; readonly ms: number }
  | { readonly kind: "takeover"; readonly label: string; readonly node: string }
  | { readonly kind: "reconcile"; readonly label: string; readonly node: string; readonly auto: boolean };

export function splitBrainSteps(active: string, passive: string, splitMs: number, auto = true): SplitStep[] {
  return [
    { kind: "cut-link", label: `cut the replication link of ${active}`, args: [active, "replication"] },
    { kind: "wait", label: `${passive} marks its disk Outdated`, node: passive, until: "outdated", timeoutMs: 15_000 },
    { kind: "traffic", label: `clients write on ${active} alone`, ms: splitMs },
    { kind: "kill-node", label: `kill ${active}`, args: [active] },
    { kind: "wait", label: `${passive} refuses its Outdated disk (failed)`, node: passive, until: "failed", timeoutMs: 30_000 },
    { kind: "takeover", label: `mailha takeover --force --node ${passive}`, node: passive },
    { kind: "wait", label: `${passive} is active`, node: passive, until: "active", timeoutMs: 120_000 },
    { kind: "traffic", label: `clients write on ${passive}`, ms: splitMs },
    { kind: "boot-node", label: `boot ${active}`, args: [active] },
    { kind: "heal", label: "heal the links", args: [] },
    { kind: "wait", label: `${active} preserved and resynced (connected, in sync, UpToDate)`, node: active, until: "resynced", timeoutMs: 180_000 },
    auto ? { kind: "reconcile", label: `${passive} merges ${active}'s copy by itself (reconcile.auto)`, node: passive, auto } : { kind: "reconcile", label: "mailha reconcile", node: passive, auto },
  ];
}

/** Whether a node's status shows what a wait step waits for. */
export function reached(until: Extract<SplitStep, { kind: "wait" }>["until"], s: NodeStatusView | null): boolean {
  if (!s) return false;
  switch (until) {
    case "outdated":
      return s.volume?.disk === "outdated";
    case "failed":
      return s.state === "failed";
    case "active":
      return s.state === "active";
    case "resynced":
      return s.volume?.connection === "connected" && s.volume.outOfSyncBytes === 0 && s.volume.disk === "uptodate";
  }
}

/** Runs STEPS in order with RUN, logging each; the first that fails ends the run with its label. */
export async function runSteps(steps: readonly SplitStep[], run: (s: SplitStep) => Promise<string | void>, log: FaultStepRecord[], say: (line: string) => void = () => {}): Promise<void> {
  for (const s of steps) {
    const start = Date.now();
    say(s.label);
    try {
      const detail = await run(s);
      log.push({ step: s.kind, label: s.label, start, end: Date.now(), ok: true, ...(detail ? { detail } : {}) });
    } catch (err) {
      const detail = (err as Error).message;
      log.push({ step: s.kind, label: s.label, start, end: Date.now(), ok: false, detail });
      throw new Error(`split-brain step "${s.label}" failed: ${detail}`);
    }
  }
}

/** The brief of `mailha reconcile --json`'s result. */
export function reconcileSummary(json: string): ReconcileSummary {
  const r = JSON.parse(json) as {
    applied?: number;
    notApplied?: unknown[];
    complete?: boolean;
    seconds?: number;
    events?: { victim: number; survivor: number };
    reportFile?: string | null;
    plan?: { ops?: unknown[] | number; report?: { entries?: { rule: string; outcome: string; says: string; user?: string; victimEvents?: string[]; survivorEvents?: string[] }[] } };
    says?: string;
  };
  if (r.says === "nothing to reconcile") throw new Error("mailha reconcile found no preserved copy to reconcile (the old node was not preserved?)");
  return {
    ops: (typeof r.plan?.ops === "number" ? r.plan.ops : r.plan?.ops?.length) ?? r.applied ?? 0,
    applied: r.applied ?? 0,
    notApplied: r.notApplied?.length ?? 0,
    complete: r.complete === true,
    seconds: r.seconds ?? 0,
    events: r.events ? { victim: r.events.victim, survivor: r.events.survivor } : null,
    reportFile: r.reportFile ?? null,
    incomplete: (r.plan?.report?.entries ?? [])
      .filter((e) => e.outcome === "stranded")
      .slice(0, 10)
      .map((e) => `${e.rule}${e.user ? ` (${e.user})` : ""}: ${e.says}${e.victimEvents?.length || e.survivorEvents?.length ? ` [victim ${(e.victimEvents ?? []).join(",") || "-"}; survivor ${(e.survivorEvents ?? []).join(",") || "-"}]` : ""}`),
  };
}

/** Messages acknowledged by each side while apart: by OLD from the cut to the kill, by NEW from the kill to the boot of OLD. */
export function splitAcks(log: readonly FaultStepRecord[], acks: Iterable<{ host: string; at: number }>, oldAddress: string, newAddress: string): { byOld: number; byNew: number } {
  const at = (k: FaultStepRecord["step"]) => log.find((r) => r.step === k);
  const cut = at("cut-link")?.start;
  const kill = at("kill-node")?.start;
  const boot = at("boot-node")?.start ?? Number.POSITIVE_INFINITY;
  let byOld = 0;
  let byNew = 0;
  if (cut === undefined || kill === undefined) return { byOld, byNew };
  for (const a of acks) {
    if (a.host === oldAddress && a.at >= cut && a.at <= kill) byOld++;
    else if (a.host === newAddress && a.at >= kill && a.at <= boot) byNew++;
  }
  return { byOld, byNew };
}

const BIN = MAILHA_BIN;
const RECONCILE_TIMEOUT_MS = 600_000;

/** `mailha reconcile --json` as a child process, as an operator runs it. */
function runReconcile(configFile: string): Promise<ReconcileSummary> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [BIN, "reconcile", "--config", configFile, "--json"], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    p.stdout.on("data", (d: Buffer) => (out += d.toString()));
    p.stderr.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
    const t = setTimeout(() => p.kill("SIGKILL"), RECONCILE_TIMEOUT_MS);
    p.on("close", (code, sig) => {
      clearTimeout(t);
      if (code !== 0 && !out.trim()) return reject(new Error(`mailha reconcile ${sig ? `was killed (${sig})` : `exited with ${code}`}: ${err.trim().slice(-500)}`));
      try {
        resolve(reconcileSummary(out));
      } catch (e) {
        reject(new Error(`mailha reconcile (exit ${code}): ${(e as Error).message}; ${err.trim().slice(-300)}`));
      }
    });
  });
}

/** The survivor's automatic reconcile: waits until it merged every copy of its peer, then reads its report. */
interface AutoReconcileView {
  readonly running: unknown;
  readonly waiting: { copy: string; says: string } | null;
  readonly last: { copy: string; ok: boolean; says: string } | null;
  readonly peerCopies: string[] | null;
}

async function awaitAutoReconcile(c: MailhaConfig, node: string): Promise<ReconcileSummary> {
  const t0 = Date.now();
  let last: AutoReconcileView | undefined;
  while (Date.now() - t0 < RECONCILE_TIMEOUT_MS) {
    last = ((await nodeStatus(c, node, 2000).catch(() => null)) as { reconcile?: AutoReconcileView } | null)?.reconcile;
    if (last?.waiting) throw new Error(`the automatic reconcile waits for the operator: ${last.waiting.says}`);
    if (last && !last.running && last.last?.ok && Array.isArray(last.peerCopies) && last.peerCopies.length === 0) {
      const dir = join(nodePaths(nodeStateDir(c, node)).data, "reconcile");
      const newest = readdirSync(dir).filter((f) => f.startsWith("report-")).sort().at(-1);
      if (!newest) throw new Error(`the automatic reconcile left no report in ${dir}`);
      return reconcileSummary(readFileSync(join(dir, newest), "utf8"));
    }
    await sleep(1000);
  }
  throw new Error(`the automatic reconcile did not finish within ${RECONCILE_TIMEOUT_MS / 1000} s (last: ${JSON.stringify(last ?? null)})`);
}

async function waitFor(c: MailhaConfig, node: string, until: Extract<SplitStep, { kind: "wait" }>["until"], timeoutMs: number): Promise<string> {
  const t0 = Date.now();
  let last: NodeStatusView | null = null;
  while (Date.now() - t0 < timeoutMs) {
    last = await nodeStatus(c, node, 2000).catch(() => null);
    if (reached(until, last)) return `after ${((Date.now() - t0) / 1000).toFixed(1)} s`;
    await sleep(200);
  }
  throw new Error(`not within ${timeoutMs / 1000} s (last: ${last ? `${last.state}, volume ${last.volume ? `${last.volume.connection} ${last.volume.disk}, ${last.volume.outOfSyncBytes} bytes out of sync` : "none"}` : "no answer"})`);
}

function splitBrainPlan(c: MailhaConfig, configFile: string, o: FaultOptions, say: (line: string) => void): FaultPlan {
  const run: SplitBrainRun = { old: null, new: null, log: [], reconcile: null };
  const lab = (fault: Parameters<typeof labFault>[1], args: readonly string[]) => labFault(configFile, fault, [...args]);
  let healing: SplitStep[] | null = null;
  const step = async (s: SplitStep): Promise<string | void> => {
    switch (s.kind) {
      case "cut-link":
      case "kill-node":
      case "boot-node":
      case "heal":
        await lab(s.kind, s.args);
        return;
      case "wait":
        return waitFor(c, s.node, s.until, s.timeoutMs);
      case "traffic":
        await sleep(s.ms);
        return;
      case "takeover":
        await nodeCommand(c, s.node, "takeover", true);
        return;
      case "reconcile": {
        const r = s.auto ? await awaitAutoReconcile(c, s.node) : await runReconcile(configFile);
        run.reconcile = r;
        const d = `applied ${r.applied} of ${r.ops} operations in ${r.seconds.toFixed(1)} s${r.complete ? "" : `, INCOMPLETE${r.incomplete.length ? `: ${r.incomplete.join("; ")}` : ""}`}`;
        if (!r.complete) throw new Error(d);
        return d;
      }
    }
  };
  return {
    name: "split-brain",
    description: `split brain: the active node's replication link is cut, it writes alone for ${(o.splitMs ?? 4000) / 1000} s and is killed; the passive node is forced to take over and writes alone; both are healed, the old node is preserved and resynced, then ${c.reconcile.auto ? "the survivor merges its mail by itself (reconcile.auto)" : "\`mailha reconcile\` merges its mail"}`,
    splitBrain: run,
    async inject(target) {
      const passive = c.nodes.find((n) => n.id !== target)!.id;
      run.old = target;
      run.new = passive;
      const steps = splitBrainSteps(target, passive, o.splitMs ?? 4000, c.reconcile.auto);
      const apart = steps.findIndex((s) => s.kind === "boot-node");
      await runSteps(steps.slice(0, apart), step, run.log, say);
      healing = steps.slice(apart);
      return `split brain between ${target} (killed, the victim) and ${passive} (forced takeover, the survivor)`;
    },
    // After the traffic: boot the old node, heal, wait for its resync, then reconcile.
    // (A step failed while they were apart: only heal; the trial boots a node that is down.)
    async recover() {
      if (!healing) return void (await lab("heal", []));
      const rest = healing;
      healing = null;
      await runSteps(rest, step, run.log, say);
    },
  };
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

export function faultPlan(c: MailhaConfig, configFile: string, name: string, o: FaultOptions, say: (line: string) => void = () => {}): FaultPlan {
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
    case "split-brain":
      return splitBrainPlan(c, configFile, o, say);
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
