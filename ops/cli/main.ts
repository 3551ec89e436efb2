// The `mailha` command line: parses arguments (commander), runs one subcommand, and
// exits 0 (ok), 1 (failure) or 2 (usage or configuration error).
// Start-up time: the commands live in groups (GROUPS) whose modules, and the libraries
// they import (MariaDB, Redis, IMAP and SMTP clients...), are loaded only when one of
// the group's commands runs. The build writes the top-level listing (name, usage and
// description of every command) to dist/ops/cli/commands.json (MAILHA_COMMANDS_OUT=FILE
// writes it and exits); with it, `mailha --help` loads no group and a command loads
// only its own. Without it (the sources through tsx) every group is loaded.
import { join, relative } from "node:path";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { Command, CommanderError, Help, Option } from "commander";
import { PACKAGE_ROOT } from "../../common/self.ts";
import { ConfigError, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError, exitCodeOf } from "../../common/errors.ts";
import { createOutput, table } from "./output.ts";
import type { Fault } from "../lab/faults.ts";

const VERSION = (JSON.parse(readFileSync(join(PACKAGE_ROOT, "package.json"), "utf8")) as { version: string }).version;
const DEFAULT_LAB_CONFIG = process.env.MAILHA_LAB_CONFIG ?? relativeIfShorter(join(PACKAGE_ROOT, "examples", "lab.yaml"));
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

/** `mailha config|secret|setup`: light, defined at once; what they do is imported when run. */
function ownCommands(p: Command): void {
  const config = p.command("config").description("work with the cluster configuration (mailha.yaml)");
  config
    .command("check")
    .description("validate a configuration file and its secret files; prints every problem, or ok")
    .argument("[file]", "configuration file", DEFAULT_CONFIG)
    .addOption(jsonOption())
    .action(async (file: string, o: { json?: boolean }) => {
      const out = createOutput(!!o.json);
      const { loadConfig } = await import("../../common/config.ts");
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
    .action(async (o: { config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const [{ loadConfig }, { generateSecrets }] = await Promise.all([import("../../common/config.ts"), import("../secrets.ts")]);
      const res = generateSecrets(loadConfig(o.config, { checkSecrets: false }));
      out.result(res, () => table(res.map((r) => [r.created ? "created" : "exists", r.key, r.path])));
    });

  p.command("setup")
    .description("install the Debian packages mailha needs (as root; without starting their system services)")
    .option("--check", "only list what is missing; exit 1 if anything is")
    .addOption(jsonOption())
    .action(async (o: { check?: boolean; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const { ensurePackages, missingPackages, DEBIAN_PACKAGES } = await import("../setup/packages.ts");
      if (o.check) {
        const missing = await missingPackages();
        out.result({ missing }, () => (missing.length ? `missing: ${missing.map((m) => `${m} (${DEBIAN_PACKAGES[m]})`).join(", ")}` : "all packages present"));
        if (missing.length) process.exitCode = EXIT_FAILURE;
        return;
      }
      const r = await ensurePackages((line) => out.progress("packages", { note: line }));
      out.result(r, () => (r.installed.length ? `installed: ${r.installed.join(" ")}` : `all ${r.alreadyPresent} packages already present`));
    });
}

/** The modules `mailha lab` needs (the lab pulls in every client library). */
async function labModules() {
  const [lab, faults, config] = await Promise.all([import("../lab/lab.ts"), import("../lab/faults.ts"), import("../../common/config.ts")]);
  return { ...lab, ...faults, loadConfig: config.loadConfig };
}
type LabModules = Awaited<ReturnType<typeof labModules>>;

function labCommand(m: LabModules): Command {
  const lab = new Command("lab").description("the local two-node lab in network namespaces (needs root)");
  lab
    .command("up")
    .description("build the lab (namespaces a, b, w; service and replication networks), start its daemons, prove they answer")
    .addOption(configOption(DEFAULT_LAB_CONFIG))
    .option("--keep-on-failure", "leave what was built when a step fails (for debugging)")
    .option("--no-services", "network and replicated volumes only (node a primary, ext4 mounted); no mail services")
    .addOption(jsonOption())
    .action(async (o: { config: string; json?: boolean; keepOnFailure?: boolean; services: boolean }) => {
      const out = createOutput(!!o.json);
      const r = await m.labUp(o.config, out.progress, { keepOnFailure: o.keepOnFailure, noServices: !o.services });
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
      const r = await m.labDown(o.config, out.progress);
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
      const s = await m.labStatus(o.config);
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
      const checks = await m.labCheck(m.requireLab(m.loadConfig(o.config)));
      out.result(checks, () => checks.map((c) => `${c.ok ? "ok  " : "FAIL"} ${c.check.padEnd(8)} ${c.detail}`).join("\n"));
      if (checks.some((c) => !c.ok)) process.exitCode = EXIT_FAILURE;
    });

  lab
    .command("fault")
    .description(`inject a fault: ${m.FAULTS.join(", ")} (kill-node N, boot-node N, freeze-node N, thaw-node N, cut-link N service|replication|both, partition, heal, kill-service N mariadb|redis|dovecot|smtp)`)
    .argument("<fault>", m.FAULTS.join("|"))
    .argument("[args...]", "node id, link or service")
    .addOption(configOption(DEFAULT_LAB_CONFIG))
    .addOption(jsonOption())
    .action(async (fault: string, args: string[], o: { config: string; json?: boolean }) => {
      if (!m.FAULTS.includes(fault as Fault)) throw new UsageError(`unknown fault "${fault}" (known: ${m.FAULTS.join(", ")})`);
      const r = await m.labFault(o.config, fault as Fault, args);
      createOutput(!!o.json).result(r, () => `${fault} ${args.join(" ")}: done at ${r.at}`);
    });

  return lab;
}

/**
 * The command groups, in the order of the help listing: each loads its module(s) and
 * returns its top-level commands. A group is loaded when one of its commands is run.
 */
const GROUPS: Readonly<Record<string, () => Promise<Command[]>>> = {
  lab: async () => [labCommand(await labModules())],
  volume: async () => [(await import("./volume-cmd.ts")).volumeCommand(DEFAULT_CONFIG)],
  cluster: async () => {
    const m = await import("./cluster-cmd.ts");
    return [m.nodeCommandGroup(DEFAULT_CONFIG), m.witnessCommand(DEFAULT_CONFIG), m.statusCommand(DEFAULT_CONFIG), ...m.moveCommands(DEFAULT_CONFIG)];
  },
  mail: async () => (await import("./mail-cmd.ts")).mailCommands(DEFAULT_CONFIG),
  dns: async () => [(await import("./dns-cmd.ts")).dnsCommand(DEFAULT_CONFIG)],
  journal: async () => [(await import("./journal-cmd.ts")).journalCommand(DEFAULT_CONFIG)],
  reconcile: async () => [(await import("./reconcile-cmd.ts")).reconcileCommand(DEFAULT_CONFIG)],
  spam: async () => [(await import("./spam-cmd.ts")).spamCommand(DEFAULT_CONFIG)],
  failover: async () => [(await import("./failover-cmd.ts")).failoverTestCommand(DEFAULT_LAB_CONFIG)],
  init: async () => [(await import("./init-cmd.ts")).initCommand()],
  deploy: async () => [(await import("./deploy-cmd.ts")).deployCommand(DEFAULT_CONFIG)],
};

/** One top-level command as the help listing shows it, and the group that defines it. */
interface Listed {
  readonly name: string;
  readonly group: string;
  readonly term: string;
  readonly description: string;
}
const LISTING_FILE = new URL("./commands.json", import.meta.url);

/** The build's list of top-level commands, or null (the sources, or no build). */
function readListing(): Listed[] | null {
  try {
    return (JSON.parse(readFileSync(LISTING_FILE, "utf8")) as { commands: Listed[] }).commands;
  } catch {
    return null;
  }
}

/** The top-level command that argv names ("help status" names status), or undefined. */
function commandWord(argv: readonly string[]): string | undefined {
  const words = argv.slice(2).filter((a) => !a.startsWith("-"));
  return words[0] === "help" ? words[1] : words[0];
}

/**
 * The program: the group of the command named is loaded (every group, without a
 * listing); the others' commands are stand-ins that only show in the help listing.
 */
async function program(argv: readonly string[]): Promise<Command> {
  const p = new Command("mailha")
    .description("mailha: a two-node high-availability mail cluster")
    .version(VERSION)
    .showHelpAfterError()
    .addHelpText("after", EXIT_CODES_HELP);
  ownCommands(p);
  const listing = readListing();
  const word = commandWord(argv);
  const terms = new Map<Command, string>();
  for (const [group, load] of Object.entries(GROUPS)) {
    const listed = listing?.filter((l) => l.group === group);
    if (!listed || listed.some((l) => l.name === word)) {
      for (const cmd of await load()) p.addCommand(cmd);
      continue;
    }
    for (const l of listed) {
      const stand = new Command(l.name).description(l.description);
      terms.set(stand, l.term);
      p.addCommand(stand);
    }
  }
  if (terms.size) {
    p.configureHelp({
      subcommandTerm(this: Help, cmd: Command): string {
        return terms.get(cmd) ?? Help.prototype.subcommandTerm.call(this, cmd);
      },
    });
  }
  for (const cmd of [p, ...allCommands(p)]) cmd.exitOverride();
  return p;
}

/** MAILHA_COMMANDS_OUT=FILE (the build): every group loaded, their top-level commands written to FILE. */
async function writeListing(file: string): Promise<void> {
  const help = new Help();
  const commands: Listed[] = [];
  for (const [group, load] of Object.entries(GROUPS)) {
    for (const cmd of await load()) commands.push({ name: cmd.name(), group, term: help.subcommandTerm(cmd), description: help.subcommandDescription(cmd) });
  }
  writeFileSync(file, JSON.stringify({ commands }, null, 2) + "\n");
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
    await (await program(argv)).parseAsync(argv);
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

// A reader that went away (`mailha --help | head -1`) is no failure of the command.
process.stdout.on("error", (err: NodeJS.ErrnoException) => {
  if (err.code !== "EPIPE") throw err;
  process.exit(typeof process.exitCode === "number" ? process.exitCode : EXIT_OK);
});
if (process.env.MAILHA_COMMANDS_OUT) {
  await writeListing(process.env.MAILHA_COMMANDS_OUT);
  process.exit(EXIT_OK);
}
const code = await main(process.argv);
// A large --json result may still be in the pipe's buffer: let it out before exiting.
await new Promise<void>((resolve) => process.stdout.write("", () => resolve()));
process.exit(code);
