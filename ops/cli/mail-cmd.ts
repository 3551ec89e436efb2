// Mail commands: `mailha smtp run` (the SMTP service, started by the node daemon), and
// the account store on the active node: user, alias and domain.
import { Command, Option } from "commander";
import { loadConfig, type MailhaConfig } from "../../common/config.ts";
import { createLogger } from "../../common/log.ts";
import { nodePaths, nodeStateDir } from "../../common/paths.ts";
import { activeLocalNode } from "../../cluster/client.ts";
import { resolveNode } from "../../replication/client.ts";
import { addAlias, addDomain, addUser, deleteAlias, deleteUser, listAliases, listDomains, listUsers, setPassword } from "../../services/accounts.ts";
import { connectMariadb, mariadbPaths } from "../../services/mariadb.ts";
import { runSmtp } from "../../services/smtp/server.ts";
import { startCpuProfile } from "../../common/profile.ts";
import { runProxy } from "../../services/proxy.ts";
import { prepareStatsDir, publishStats } from "../../services/stats.ts";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { backupMxStateDir, runBackupMx, spoolDir } from "../../services/smtp/backup-mx.ts";
import { chownTree, dropPrivileges, isRoot, type Ids } from "../../services/privileges.ts";
import { join } from "node:path";
import { createOutput, table } from "./output.ts";
import { UsageError } from "../../common/errors.ts";
import { runUntilSignalled } from "../../common/lifecycle.ts";

const configOpt = (def: string) => new Option("-c, --config <file>", "cluster configuration file").default(def);
const jsonOpt = () => new Option("--json", "print the result as JSON");

/** The MariaDB of the active node reachable from here. */
async function activeDb(c: MailhaConfig) {
  const id = await activeLocalNode(c);
  if (!id) throw new Error("no active node here: run this on the active node (see mailha status)");
  return connectMariadb(mariadbPaths(nodePaths(nodeStateDir(c, id))).socket);
}

async function withDb<T>(config: string, fn: (db: Awaited<ReturnType<typeof activeDb>>) => Promise<T>): Promise<T> {
  const db = await activeDb(loadConfig(config));
  try {
    return await fn(db);
  } finally {
    await db.end();
  }
}

/** A password longer than this on stdin is refused (SMTP AUTH refuses more than 1 KiB). */
const PASSWORD_STDIN_MAX_BYTES = 4096;

export const PASSWORD_ARGV_WARNING =
  "mailha: warning: a password given with --password is visible to every local user in ps and stays in your shell history; use --password-stdin (or give no password option to be asked for it)\n";

/** Reads the password from standard input: all of it, one trailing newline removed, bounded. */
async function passwordFromStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const chunk of process.stdin as AsyncIterable<Buffer>) {
    n += chunk.length;
    if (n > PASSWORD_STDIN_MAX_BYTES) throw new UsageError(`the password on standard input is longer than ${PASSWORD_STDIN_MAX_BYTES} bytes`);
    chunks.push(chunk);
  }
  const pw = Buffer.concat(chunks).toString("utf8").replace(/\r?\n$/, "");
  if (pw === "") throw new UsageError("no password on standard input (pipe it in, or use --password-stdin)");
  return pw;
}

/** Asks on the terminal (stderr) with echo off; resolves at Enter, rejects on Ctrl-C or Ctrl-D. */
function promptHidden(question: string): Promise<string> {
  const stdin = process.stdin;
  return new Promise((resolve, reject) => {
    let pw = "";
    stdin.setRawMode(true); // echo off before the question shows
    stdin.resume();
    process.stderr.write(question);
    const done = (err: Error | null) => {
      stdin.off("data", onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write("\n");
      if (err) reject(err);
      else resolve(pw);
    };
    const onData = (d: Buffer) => {
      for (const ch of d.toString("utf8")) {
        if (ch === "\r" || ch === "\n") return done(null);
        if (ch === "\u0003" || ch === "\u0004") return done(new UsageError("no password given"));
        if (ch === "\u007f" || ch === "\b") pw = pw.slice(0, -1);
        else if (pw.length < PASSWORD_STDIN_MAX_BYTES) pw += ch;
      }
    };
    stdin.on("data", onData);
  });
}

/**
 * The password of `user add|passwd`: --password-stdin or no option at all reads
 * standard input (when it is a terminal: asked for twice, without echo); --password
 * works but warns, since the command line shows in ps and in shell history.
 */
async function readPassword(o: { password?: string; passwordStdin?: boolean }, address: string): Promise<string> {
  if (o.password !== undefined && o.passwordStdin) throw new UsageError("give either --password or --password-stdin, not both");
  if (o.password !== undefined) {
    process.stderr.write(PASSWORD_ARGV_WARNING);
    return o.password;
  }
  if (o.passwordStdin || !process.stdin.isTTY) return passwordFromStdin();
  const pw = await promptHidden(`password for ${address}: `);
  if ((await promptHidden("again: ")) !== pw) throw new UsageError("the two passwords differ; nothing changed");
  return pw;
}

export function mailCommands(defaultConfig: string): Command[] {
  const smtp = new Command("smtp").description("the SMTP service (MX 25, submission 587/465); the node daemon starts it on the active node");
  smtp
    .command("run")
    .description("run the SMTP service in the foreground")
    .addOption(configOpt(defaultConfig))
    .addOption(new Option("-n, --node <id>", "the node"))
    .action(async (o: { config: string; node?: string }) => {
      const c = loadConfig(o.config);
      const id = resolveNode(c, o.node);
      const log = createLogger(`smtp@${id}`);
      const writeProfile = startCpuProfile(`smtp-${id}`);
      const svc = await runSmtp({ config: c, nodeId: id, paths: nodePaths(nodeStateDir(c, id)), log });
      await runUntilSignalled(async () => {
        writeProfile();
        await svc.close();
      });
    });

  const passive = new Command("passive").description("the passive node's services: the proxy to the active node (and the backup MX); the node daemon starts them");
  passive
    .command("run")
    .description("run the passive node's services in the foreground")
    .addOption(configOpt(defaultConfig))
    .addOption(new Option("-n, --node <id>", "the node"))
    .action(async (o: { config: string; node?: string }) => {
      const c = loadConfig(o.config);
      const id = resolveNode(c, o.node);
      const me = c.nodes.find((n) => n.id === id)!;
      const peer = c.nodes.find((n) => n.id !== id)!;
      const log = createLogger(`passive@${id}`);
      const paths = nodePaths(nodeStateDir(c, id));
      // Root only to bind the service ports: then the mail uid (as SMTP), its spool and
      // state handed over first; the keys are read before.
      const runAs: Ids | null = isRoot() ? { uid: c.mail.mail_uid, gid: c.mail.mail_gid } : null;
      if (runAs) {
        for (const d of [spoolDir(paths), backupMxStateDir(paths)]) {
          mkdirSync(d, { recursive: true, mode: 0o700 });
          chownTree(d, runAs);
        }
      }
      prepareStatsDir(paths, runAs ?? undefined);
      const limits = { connectionsMax: c.limits.proxy_connections_max, perAddressMax: c.limits.proxy_connections_per_address_max, idleMs: c.limits.proxy_idle_ms };
      const proxy = await runProxy({ listenAddress: me.service_address, upstreamAddress: peer.service_address, limits, onEvent: (ev) => log.info(ev, String(ev.type)) });
      const stopStats = publishStats(paths, "proxy", () => ({ ...proxy.stats }));
      const key = Buffer.from(readFileSync(c.heartbeat.key_file, "utf8").trim());
      const mx = await runBackupMx({ config: c, nodeId: id, paths, key, log });
      const ready = join(nodeStateDir(c, id), "run", "passive.ready");
      writeFileSync(ready, `${process.pid}\n`);
      if (runAs) {
        dropPrivileges(runAs);
        log.info({ uid: runAs.uid, gid: runAs.gid }, "passive services dropped root: run as the mail uid");
      }
      await runUntilSignalled(async () => {
        stopStats();
        await Promise.all([proxy.close(), mx.close()]);
        try {
          rmSync(ready, { force: true });
        } catch {
          // root's run directory: the node daemon removes it before the next start
        }
      });
    });

  const pw = (cmd: Command) =>
    cmd
      .option("--password-stdin", "read the password (at least 8 characters) from standard input: the way to give it (the default when stdin is not a terminal)")
      .option("--password <pw>", "the password on the command line: visible in ps and kept in shell history, prefer --password-stdin")
      .addHelpText("after", "\nThe password is read from standard input (printf %s \"$PW\" | mailha user ...),\nor asked for twice without echo when standard input is a terminal. --password\nworks but warns: every local user sees it in ps, and it stays in shell history.");
  const user = new Command("user").description("mail users (on the active node)");
  pw(user.command("add").argument("<address>").description("add a user").addOption(configOpt(defaultConfig)).addOption(jsonOpt())).action(
    async (address: string, o: { config: string; json?: boolean; password?: string; passwordStdin?: boolean }) => {
      const p = await readPassword(o, address);
      await withDb(o.config, (db) => addUser(db, address, p));
      createOutput(!!o.json).result({ added: address.toLowerCase() }, () => `user ${address.toLowerCase()} added`);
    },
  );
  pw(user.command("passwd").argument("<address>").description("set a user's password").addOption(configOpt(defaultConfig)).addOption(jsonOpt())).action(
    async (address: string, o: { config: string; json?: boolean; password?: string; passwordStdin?: boolean }) => {
      const p = await readPassword(o, address);
      await withDb(o.config, (db) => setPassword(db, address, p));
      createOutput(!!o.json).result({ updated: address.toLowerCase() }, () => `password of ${address.toLowerCase()} changed`);
    },
  );
  user.command("del").argument("<address>").description("delete a user (its Maildir stays)").addOption(configOpt(defaultConfig)).addOption(jsonOpt())
    .action(async (address: string, o: { config: string; json?: boolean }) => {
      await withDb(o.config, (db) => deleteUser(db, address));
      createOutput(!!o.json).result({ deleted: address.toLowerCase() }, () => `user ${address.toLowerCase()} deleted`);
    });
  user.command("list").description("list users").addOption(configOpt(defaultConfig)).addOption(jsonOpt())
    .action(async (o: { config: string; json?: boolean }) => {
      const users = await withDb(o.config, listUsers);
      createOutput(!!o.json).result(users, () => table([["user", "active", "created"], ...users.map((u) => [u.email, u.active ? "yes" : "no", u.created])]));
    });

  const alias = new Command("alias").description("aliases (on the active node)");
  alias.command("add").argument("<source>").argument("<destination>").description("mail to SOURCE goes to DESTINATION").addOption(configOpt(defaultConfig)).addOption(jsonOpt())
    .action(async (source: string, destination: string, o: { config: string; json?: boolean }) => {
      await withDb(o.config, (db) => addAlias(db, source, destination));
      createOutput(!!o.json).result({ source, destination }, () => `alias ${source} -> ${destination} added`);
    });
  alias.command("del").argument("<source>").argument("[destination]").description("remove an alias (all its destinations without DESTINATION)").addOption(configOpt(defaultConfig)).addOption(jsonOpt())
    .action(async (source: string, destination: string | undefined, o: { config: string; json?: boolean }) => {
      const n = await withDb(o.config, (db) => deleteAlias(db, source, destination));
      createOutput(!!o.json).result({ removed: n }, () => `${n} alias row(s) removed`);
    });
  alias.command("list").description("list aliases").addOption(configOpt(defaultConfig)).addOption(jsonOpt())
    .action(async (o: { config: string; json?: boolean }) => {
      const rows = await withDb(o.config, listAliases);
      createOutput(!!o.json).result(rows, () => table([["alias", "goes to"], ...rows.map((r) => [r.source, r.destination])]));
    });

  const domain = new Command("domain").description("mail domains (on the active node)");
  domain.command("add").argument("<name>").description("add a domain").addOption(configOpt(defaultConfig)).addOption(jsonOpt())
    .action(async (name: string, o: { config: string; json?: boolean }) => {
      await withDb(o.config, (db) => addDomain(db, name));
      createOutput(!!o.json).result({ added: name.toLowerCase() }, () => `domain ${name.toLowerCase()} added (add it to mail.domains in the config too, so SMTP accepts mail for it)`);
    });
  domain.command("list").description("list domains").addOption(configOpt(defaultConfig)).addOption(jsonOpt())
    .action(async (o: { config: string; json?: boolean }) => {
      const d = await withDb(o.config, listDomains);
      createOutput(!!o.json).result(d, () => d.join("\n"));
    });
  return [smtp, passive, user, alias, domain];
}
