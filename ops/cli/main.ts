// The `mailha` command line: parses arguments (commander), runs one subcommand, and
// exits 0 (ok), 1 (failure) or 2 (usage or configuration error).
import { fileURLToPath } from "node:url";
import { dirname, join, relative } from "node:path";
import { existsSync, readFileSync } from "node:fs";
import { Command, CommanderError, Option } from "commander";
import { loadConfig } from "../../common/config.ts";
import { ConfigError, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError, exitCodeOf } from "../../common/errors.ts";
import { labCheck, labDown, labStatus, labUp, requireLab } from "../lab/lab.ts";
import { generateSecrets } from "../secrets.ts";
import { ensurePackages, missingPackages, DEBIAN_PACKAGES } from "../setup/packages.ts";
import { createOutput, table } from "./output.ts";
import { volumeCommand } from "./volume-cmd.ts";
import { FAULTS, labFault, type Fault } from "../lab/faults.ts";
import { moveCommands, nodeCommandGroup, statusCommand, witnessCommand } from "./cluster-cmd.ts";
import { mailCommands } from "./mail-cmd.ts";
import { failoverTestCommand } from "./failover-cmd.ts";
import { dnsCommand } from "./dns-cmd.ts";
import { journalCommand } from "./journal-cmd.ts";
import { reconcileCommand } from "./reconcile-cmd.ts";
import { spamCommand } from "./spam-cmd.ts";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const VERSION = (JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string }).version;
const DEFAULT_LAB_CONFIG = process.env.MAILHA_LAB_CONFIG ?? relativeIfShorter(join(ROOT, "examples", "lab.yaml"));
/** $MAILHA_CONFIG, else /etc/mailha/mailha.yaml, else (a machine with no cluster of its own) the lab's. */
const DEFAULT_CONFIG = process.env.MAILHA_CONFIG ?? (existsSync("/etc/mailha/mailha.yaml") ? "/etc/mailha/mailha.yaml" : DEFAULT_LAB_CONFIG);

function relativeIfShorter(p: string): string {
  const r = relative(process.cwd(), p);
  return r.length < p.length && !r.startsWith("../..") ? r : p;
}

const EXIT_CODES_HELP = `
Exit codes:
  0  ok
  1  failure (something did not work; the message says what)
  2  usage or configuration error (bad arguments, invalid config, unsafe secret file)`;

const jsonOption = () => new Option("--json", "print the result as JSON on stdout (progress as JSON lines on stderr)");
const configOption = (def: string) => new Option("-c, --config <file>", "cluster configuration file").default(def);

function program(): Command {
  const p = new Command("mailha")
    .description("mailha: a two-node high-availability mail cluster")
    .version(VERSION)
    .showHelpAfterError()
    .addHelpText("after", EXIT_CODES_HELP);

  const config = p.command("config").description("work with the cluster configuration (mailha.yaml)");
  config
    .command("check")
    .description("validate a configuration file and its secret files; prints every problem, or ok")
    .argument("[file]", "configuration file", DEFAULT_CONFIG)
    .addOption(jsonOption())
    .action((file: string, o: { json?: boolean }) => {
      const out = createOutput(!!o.json);
      try {
        const c = loadConfig(file);
        out.result({ ok: true, file: c.file, problems: [] }, () => "ok");
      } catch (err) {
        if (!(err instanceof ConfigError)) throw err;
        out.result({ ok: false, file, problems: err.problems }, () => err.message);
        process.exitCode = EXIT_USAGE;
      }
    });

  const secret = p.command("secret").description("the cluster's secret files");
  secret
    .command("generate")
    .description("create the heartbeat key, replication secret and TSIG key the config names (mode 0600); never overwrites")
    .addOption(configOption(DEFAULT_CONFIG))
    .addOption(jsonOption())
    .action((o: { config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const res = generateSecrets(loadConfig(o.config, { checkSecrets: false }));
      out.result(res, () => table(res.map((r) => [r.created ? "created" : "exists", r.key, r.path])));
    });

  p.command("setup")
    .description("install the Debian packages mailha needs (as root; without starting their system services)")
    .option("--check", "only list what is missing; exit 1 if anything is")
    .addOption(jsonOption())
    .action(async (o: { check?: boolean; json?: boolean }) => {
      const out = createOutput(!!o.json);
      if (o.check) {
        const missing = await missingPackages();
        out.result({ missing }, () => (missing.length ? `missing: ${missing.map((m) => `${m} (${DEBIAN_PACKAGES[m]})`).join(", ")}` : "all packages present"));
        if (missing.length) process.exitCode = EXIT_FAILURE;
        return;
      }
      const r = await ensurePackages((line) => out.progress("packages", { note: line }));
      out.result(r, () => (r.installed.length ? `installed: ${r.installed.join(" ")}` : `all ${r.alreadyPresent} packages already present`));
    });

  const lab = p.command("lab").description("the local two-node lab in network namespaces (needs root)");
  lab
    .command("up")
    .description("build the lab (namespaces a, b, w; service and replication networks), start its daemons, prove they answer")
    .addOption(configOption(DEFAULT_LAB_CONFIG))
    .option("--keep-on-failure", "leave what was built when a step fails (for debugging)")
    .option("--no-services", "network and replicated volumes only (node a primary, ext4 mounted); no mail services")
    .addOption(jsonOption())
    .action(async (o: { config: string; json?: boolean; keepOnFailure?: boolean; services: boolean }) => {
      const out = createOutput(!!o.json);
      const r = await labUp(o.config, out.progress, { keepOnFailure: o.keepOnFailure, noServices: !o.services });
      out.result(r, () =>
        [
          `lab "${r.name}" is up (${r.seconds.toFixed(1)} s)`,
          "",
          table([
            ["host", "namespace", "service", "replication", "daemons"],
            ...r.layout.hosts.map((h) => [
              h.id,
              h.netns,
              `${h.serviceAddress}/${r.layout.prefixLen}`,
              h.replicationAddress ? `${h.replicationAddress}/${r.layout.prefixLen}` : "-",
              r.daemons.filter((d) => d.name.endsWith(`@${h.id}`)).map((d) => d.name.split("@")[0]).join(" ") || "-",
            ]),
            ["(this machine)", "-", `${r.layout.operatorAddress}/${r.layout.prefixLen}`, "-", "-"],
          ]),
          "",
          "checks:",
          ...r.checks.map((c) => `  ${c.ok ? "ok  " : "FAIL"} ${c.check.padEnd(8)} ${c.detail}`),
          "",
          "connect:",
          ...Object.entries(r.connect).map(([k, v]) => `  ${k.padEnd(17)} ${v}`),
        ].join("\n"),
      );
    });
  lab
    .command("down")
    .description("stop every lab process (by PID), remove its mounts, loop devices, namespaces, links and directory; safe to repeat")
    .addOption(configOption(DEFAULT_LAB_CONFIG))
    .addOption(jsonOption())
    .action(async (o: { config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const r = await labDown(o.config, out.progress);
      out.result(r, () => {
        const nothing = !r.stopped.length && !r.namespacesRemoved.length && !r.linksRemoved.length && !r.dirRemoved;
        if (nothing) return `lab "${r.name}" was not up; nothing to remove`;
        return [
          `lab "${r.name}" is down`,
          ...r.stopped.map((s) => `  ${s.name} (pid ${s.pid}): ${s.outcome}`),
          ...(r.strayProcessesKilled ? [`  other processes in lab namespaces stopped: ${r.strayProcessesKilled}`] : []),
          ...(r.unmounted.length ? [`  unmounted: ${r.unmounted.join(" ")}`] : []),
          ...(r.loopDevicesDetached.length ? [`  loop devices detached: ${r.loopDevicesDetached.join(" ")}`] : []),
          `  namespaces removed: ${r.namespacesRemoved.join(" ") || "none"}`,
          `  directory removed: ${r.dirRemoved ? "yes" : "no"}`,
        ].join("\n");
      });
    });
  lab
    .command("status")
    .description("namespaces, links, addresses and processes of the lab; exit 1 unless it is fully up")
    .addOption(configOption(DEFAULT_LAB_CONFIG))
    .addOption(jsonOption())
    .action(async (o: { config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const s = await labStatus(o.config);
      out.result(s, () =>
        [
          `lab "${s.name}": ${s.up ? "up" : s.hosts.some((h) => h.present) ? "DEGRADED" : "down"}`,
          table([
            ["host", "namespace", "links", "processes"],
            ...s.hosts.map((h) => [h.id, h.present ? h.netns : `${h.netns} (absent)`, h.links.map((l) => `${l.dev} ${l.state} ${l.addresses.join(",")}`).join("; ") || "-", summarize(h.processes)]),
          ]),
          ...(s.daemons.length ? ["daemons:", ...s.daemons.map((d) => `  ${d.name.padEnd(14)} pid ${d.pid} ${d.alive ? "running" : "NOT RUNNING"}`)] : []),
        ].join("\n"),
      );
      if (!s.up) process.exitCode = EXIT_FAILURE;
    });
  lab
    .command("check")
    .description("prove the running lab works with real clients: SQL, Redis PING, IMAP login, DNS answer")
    .addOption(configOption(DEFAULT_LAB_CONFIG))
    .addOption(jsonOption())
    .action(async (o: { config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const checks = await labCheck(requireLab(loadConfig(o.config)));
      out.result(checks, () => checks.map((c) => `${c.ok ? "ok  " : "FAIL"} ${c.check.padEnd(8)} ${c.detail}`).join("\n"));
      if (checks.some((c) => !c.ok)) process.exitCode = EXIT_FAILURE;
    });

  p.addCommand(volumeCommand(DEFAULT_CONFIG));
  p.addCommand(nodeCommandGroup(DEFAULT_CONFIG));
  p.addCommand(witnessCommand(DEFAULT_CONFIG));
  p.addCommand(statusCommand(DEFAULT_CONFIG));
  for (const cmd of moveCommands(DEFAULT_CONFIG)) p.addCommand(cmd);
  for (const cmd of mailCommands(DEFAULT_CONFIG)) p.addCommand(cmd);
  p.addCommand(dnsCommand(DEFAULT_CONFIG));
  p.addCommand(journalCommand(DEFAULT_CONFIG));
  p.addCommand(reconcileCommand(DEFAULT_CONFIG));
  p.addCommand(spamCommand(DEFAULT_CONFIG));
  p.addCommand(failoverTestCommand(DEFAULT_LAB_CONFIG));

  lab
    .command("fault")
    .description(`inject a fault: ${FAULTS.join(", ")} (kill-node N, boot-node N, freeze-node N, thaw-node N, cut-link N service|replication|both, partition, heal, kill-service N mariadb|redis|dovecot|smtp)`)
    .argument("<fault>", FAULTS.join("|"))
    .argument("[args...]", "node id, link or service")
    .addOption(configOption(DEFAULT_LAB_CONFIG))
    .addOption(jsonOption())
    .action(async (fault: string, args: string[], o: { config: string; json?: boolean }) => {
      if (!FAULTS.includes(fault as Fault)) throw new UsageError(`unknown fault "${fault}" (known: ${FAULTS.join(", ")})`);
      const r = await labFault(o.config, fault as Fault, args);
      createOutput(!!o.json).result(r, () => `${fault} ${args.join(" ")}: done at ${r.at}`);
    });

  for (const cmd of [p, ...allCommands(p)]) cmd.exitOverride();
  return p;
}

/** "mariadbd(1) dovecot(5)": process names in a namespace with their counts. */
function summarize(ps: readonly { command: string }[]): string {
  const n = new Map<string, number>();
  for (const p of ps) n.set(p.command, (n.get(p.command) ?? 0) + 1);
  return [...n].map(([c, k]) => `${c}(${k})`).join(" ") || "-";
}

function allCommands(c: Command): Command[] {
  return c.commands.flatMap((x) => [x, ...allCommands(x)]);
}

async function main(argv: string[]): Promise<number> {
  try {
    await program().parseAsync(argv);
    return typeof process.exitCode === "number" ? process.exitCode : EXIT_OK;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === "commander.helpDisplayed" || err.code === "commander.version" || err.code === "commander.help") return EXIT_OK;
      return EXIT_USAGE;
    }
    const wantJson = argv.includes("--json");
    const msg = err instanceof Error ? err.message : String(err);
    if (wantJson) process.stdout.write(JSON.stringify({ ok: false, error: msg, problems: err instanceof ConfigError ? err.problems : undefined }, null, 2) + "\n");
    process.stderr.write(`mailha: ${msg}\n`);
    return exitCodeOf(err);
  }
}

const code = await main(process.argv);
// A large --json result may still be in the pipe's buffer: let it out before exiting.
await new Promise<void>((resolve) => process.stdout.write("", () => resolve()));
process.exit(code);
