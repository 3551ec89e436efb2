// Change journal commands: `mailha journal watch` (the Dovecot change source; the node
// daemon starts it on the active node as the `journal` resource) and `mailha journal
// show` (the merged journal in HLC order, for operators and tests).
import { dirname } from "node:path";
import { Command, Option } from "commander";
import { loadConfig, type MailhaConfig } from "../../common/config.ts";
import { UsageError } from "../../common/errors.ts";
import { isHlc } from "../../common/hlc.ts";
import { runUntilSignalled } from "../../common/lifecycle.ts";
import { createLogger } from "../../common/log.ts";
import { nodePaths, nodeStateDir } from "../../common/paths.ts";
import { localNodes, nodeStatus } from "../../cluster/client.ts";
import { resolveNode } from "../../replication/client.ts";
import { mariadbPaths } from "../../services/mariadb.ts";
import { writeNodeMarker } from "../../services/journal/accounts.ts";
import { ChangeJournal, type JournalEntry } from "../../services/journal/changes.ts";
import { MaildirWatcher, watchStatusFile } from "../../services/journal/maildir-watch.ts";
import { readJournal } from "../../services/journal/read.ts";

const configOpt = (def: string) => new Option("-c, --config <file>", "cluster configuration file").default(def);

/** The data directory to read: --data, --node's, else the active node's reachable from here. */
async function dataDirOf(c: MailhaConfig, o: { data?: string; node?: string }): Promise<string> {
  if (o.data) return o.data;
  if (o.node) return nodePaths(nodeStateDir(c, resolveNode(c, o.node))).data;
  for (const id of localNodes(c)) {
    const s = await nodeStatus(c, id, 2000).catch(() => null);
    if (s?.state === "active") return nodePaths(nodeStateDir(c, id)).data;
  }
  throw new UsageError("no active node here: say --node N (its data directory must be mounted) or --data DIR (a preserved copy)");
}

/** One line for people: stamp, node, kind, what. */
function describe(e: JournalEntry): string {
  const f = (k: string) => (e[k] === undefined || e[k] === null ? "" : String(e[k]));
  let what: string;
  switch (e.kind) {
    case "delivery":
      what = `${f("mailbox")} ${f("file").split("/").pop()}`;
      break;
    case "flags":
      what = `${f("user")} ${f("name")} ${f("key")} ${(e.add as string[]).map((x) => `+${x}`).join(" ")} ${(e.remove as string[]).map((x) => `-${x}`).join(" ")}`;
      break;
    case "copy":
    case "move":
      what = `${f("user")} ${f("fromName")} -> ${f("toName")} ${f("key")}`;
      break;
    case "mailbox-rename":
      what = `${f("user")} ${f("from")} -> ${f("name")}`;
      break;
    case "account":
      what = `${f("table")} ${f("key")} ${e.deleted ? "deleted" : Object.keys((e.columns as object) ?? {}).join(",")}`;
      break;
    case "quarantine":
      what = `${f("user")} ${f("action")} ${f("key")}`;
      break;
    default:
      what = [f("user"), f("name"), f("key")].filter(Boolean).join(" ");
  }
  return `${e.hlc}  ${e.node.padEnd(3)} ${e.kind.padEnd(14)} ${what.trim()}`;
}

export function journalCommand(defaultConfig: string): Command {
  const journal = new Command("journal").description("the change journal on the volume (for the reconciliation after a split brain)");
  journal
    .command("watch")
    .description("journal what Dovecot changes for clients (the node daemon runs it on the active node)")
    .addOption(configOpt(defaultConfig))
    .addOption(new Option("-n, --node <id>", "the node"))
    .action(async (o: { config: string; node?: string }) => {
      const c = loadConfig(o.config);
      const id = resolveNode(c, o.node);
      const paths = nodePaths(nodeStateDir(c, id));
      const log = createLogger(`journal@${id}`);
      writeNodeMarker(dirname(mariadbPaths(paths).socket), id); // beside the socket: where the account store looks
      const j = new ChangeJournal(paths.data, id);
      const w = new MaildirWatcher({ dataDir: paths.data, journal: j, log, statusFile: watchStatusFile(paths.run) });
      let closing = false;
      const done = runUntilSignalled(async () => {
        closing = true;
        await w.close();
        await j.close();
        log.info(w.stats, "journal: stopped");
      });
      await w.start().catch((err: Error) => {
        // Not a partial start: the process exits, the resource restarts it, its catch-up starts over.
        if (!closing) {
          log.error({ err }, "journal: start failed");
          process.exit(1);
        }
      });
      await done;
    });
  journal
    .command("show")
    .description("print the journal (every node's changes and SMTP's deliveries) in HLC order")
    .addOption(configOpt(defaultConfig))
    .addOption(new Option("-n, --node <id>", "read this node's data directory (default: the active node's)"))
    .addOption(new Option("--data <dir>", "read the journal of this data directory (a preserved copy, say)"))
    .addOption(new Option("--since <hlc>", "only entries stamped after this"))
    .addOption(new Option("--kind <kind...>", "only these kinds"))
    .addOption(new Option("--from-node <id...>", "only entries these nodes wrote"))
    .addOption(new Option("--json", "one JSON array on stdout"))
    .action(async (o: { config: string; node?: string; data?: string; since?: string; kind?: string[]; fromNode?: string[]; json?: boolean }) => {
      if (o.since && !isHlc(o.since)) throw new UsageError(`--since: not a stamp: ${o.since} (like 1767225600000-00000-a)`);
      const c = loadConfig(o.config, { checkSecrets: false });
      const dataDir = await dataDirOf(c, o);
      const problems: string[] = [];
      const entries = readJournal(dataDir, { since: o.since, kinds: o.kind, nodes: o.fromNode, onProblem: (p) => problems.push(`${p.file}:${p.line}: ${p.problem}`) });
      // Streamed: one entry at a time, whatever the journal's size.
      let first = true;
      if (o.json) process.stdout.write("[");
      for await (const e of entries) {
        const text = o.json ? `${first ? "\n" : ",\n"}${JSON.stringify(e)}` : `${describe(e)}\n`;
        first = false;
        if (!process.stdout.write(text)) await new Promise((r) => process.stdout.once("drain", r));
      }
      if (o.json) process.stdout.write(first ? "]\n" : "\n]\n");
      for (const p of problems) process.stderr.write(`mailha: journal: ${p}\n`);
    });
  return journal;
}
