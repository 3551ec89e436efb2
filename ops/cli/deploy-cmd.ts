// `mailha deploy`: installs and configures both nodes and the witness over SSH
// (ops/deploy/run.ts does the work); prints per server what preflight found and what
// changed (or, with --dry-run, what would), then the cluster's state, DNS and what to
// do next. Exit 1 when preflight refused, a server failed or the cluster is not healthy.
import { existsSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { Command, Option } from "commander";
import { EXIT_FAILURE, UsageError } from "../../common/errors.ts";
import { PACKAGE_ROOT } from "../../common/self.ts";
import { deploy, type DeployResult } from "../deploy/run.ts";
import { upgrade } from "../deploy/upgrade.ts";
import { createOutput } from "./output.ts";

/** The newest .deb the package build left (dist-deb/), if any. */
function builtPackage(): string | null {
  const dir = join(PACKAGE_ROOT, "dist-deb");
  if (!existsSync(dir)) return null;
  const debs = readdirSync(dir)
    .filter((f) => /^mailha_.*\.deb$/.test(f))
    .map((f) => join(dir, f))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  return debs[0] ?? null;
}

function render(r: DeployResult): string {
  const out: string[] = [];
  for (const h of r.hosts) {
    out.push(`${h.name} (${h.role}, ${h.host})${h.error ? `: FAILED: ${h.error}` : ""}`);
    for (const p of h.problems) out.push(`  ${p.severity}: ${p.message}`);
    const list = r.dryRun || r.refused ? h.planned : h.done;
    if (!list.length) out.push(r.dryRun || r.refused ? "  nothing to change" : "  nothing changed");
    for (const a of list) out.push(`  ${r.dryRun || r.refused ? "would" : "did"}: ${a}`);
  }
  if (!r.dryRun && !r.refused) out.push(r.healthy ? "cluster healthy: one node active, the other passive, the volume in sync" : "cluster NOT healthy (see below)");
  if (r.dns.records && (r.healthy || r.dryRun)) out.push("DNS records (managed by hand):", ...r.dns.records.trimEnd().split("\n").map((l) => `  ${l}`));
  out.push(...r.next.map((n) => `next: ${n}`));
  return out.join("\n");
}

const collect = (v: string, prev: string[] = []) => [...prev, v];

interface Flags {
  config: string;
  package?: string;
  sshUser: string;
  sshConfig?: string;
  host?: string[];
  dryRun?: boolean;
  timeout: string;
  json?: boolean;
}

/** The options deploy and upgrade share. */
function common(cmd: Command, defaultConfig: string): Command {
  return cmd
    .addOption(new Option("-c, --config <file>", "cluster configuration file").default(defaultConfig))
    .option("--package <file.deb>", "the package to install (default: the newest in dist-deb/, from npm run package)")
    .addOption(new Option("--ssh-user <user>", "who ssh logs in as (needs root: packages, units)").default("root"))
    .option("--ssh-config <file>", "an ssh config file (-F) for reaching the servers")
    .option("--host <name=host>", "reach a server (a node id, or witness) at HOST instead of its address in the config (repeatable)", collect)
    .addOption(new Option("--timeout <seconds>", "how long to wait for a healthy cluster (each step)").default("600"))
    .addOption(new Option("--json", "print the result as JSON on stdout (progress as JSON lines on stderr)"));
}

function options(o: Flags) {
  const pkg = o.package ?? builtPackage();
  if (!pkg) throw new UsageError("no package: build one with `npm run package`, or say --package FILE.deb");
  const hosts: Record<string, string> = {};
  for (const h of o.host ?? []) {
    const m = /^([a-z][a-z0-9]*)=(.+)$/.exec(h);
    if (!m) throw new UsageError(`--host ${h}: expected NAME=HOST (a node id or witness)`);
    hosts[m[1]!] = m[2]!;
  }
  const timeout = Number(o.timeout);
  if (!Number.isFinite(timeout) || timeout <= 0) throw new UsageError(`--timeout ${o.timeout}: a number of seconds`);
  const out = createOutput(!!o.json);
  return { out, opts: { configFile: o.config, packageFile: pkg, sshUser: o.sshUser, ...(o.sshConfig ? { sshConfig: o.sshConfig } : {}), hosts, dryRun: !!o.dryRun, healthTimeoutMs: timeout * 1000, progress: (step: string, detail?: Record<string, unknown>) => out.progress(step, detail) } };
}

export function deployCommand(defaultConfig: string): Command {
  const cmd = common(new Command("deploy"), defaultConfig)
    .description("install mailha on both nodes and the witness over SSH, write the config and secrets, create the volume, start the units, wait for a healthy cluster (again: changes only what is not right)")
    .option("--dry-run", "only print what would change")
    .action(async (o: Flags) => {
      const { out, opts } = options(o);
      const r = await deploy(opts);
      out.result(r, () => render(r));
      if (r.refused || r.hosts.some((h) => h.error) || (!r.dryRun && !r.healthy)) process.exitCode = EXIT_FAILURE;
    });
  // Its options are deploy's (commander parses them on the parent wherever they stand).
  cmd
    .command("upgrade")
    .description("a new package onto the running cluster: the passive node, a switchover, the other node, the witness; mail keeps flowing (takes deploy's options: --config, --package, --ssh-config, --host, --timeout, --json)")
    .action(async (_o: unknown, sub: Command) => {
      const { out, opts } = options(sub.optsWithGlobals() as Flags);
      const r = await upgrade(opts);
      out.result(r, () => [...r.steps.map((s) => `did: ${s}`), r.healthy ? `upgraded to ${r.version}; ${r.active} is active; the cluster is healthy` : `upgrade STOPPED: ${r.error}`, ...r.next.map((n) => `next: ${n}`)].join("\n"));
      if (!r.healthy) process.exitCode = EXIT_FAILURE;
    });
  return cmd;
}
