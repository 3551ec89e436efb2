// Mail commands: `mailha smtp run` (the SMTP service, started by the node daemon), and
// the account store on the active node: user, alias and domain.
import { Command, Option } from "commander";
import { loadConfig, type MailhaConfig } from "../../common/config.ts";
import { createLogger } from "../../common/log.ts";
import { nodePaths, nodeStateDir } from "../../common/paths.ts";
import { localNodes, nodeStatus } from "../../cluster/client.ts";
import { resolveNode } from "../../replication/client.ts";
import { addAlias, addDomain, addUser, deleteAlias, deleteUser, listAliases, listDomains, listUsers, setPassword } from "../../services/accounts.ts";
import { connectMariadb, mariadbPaths } from "../../services/mariadb.ts";
import { runSmtp } from "../../services/smtp/server.ts";
import { startCpuProfile } from "../../common/profile.ts";
import { runProxy } from "../../services/proxy.ts";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { runBackupMx } from "../../services/smtp/backup-mx.ts";
import { join } from "node:path";
import { createOutput, table } from "./output.ts";
import { UsageError } from "../../common/errors.ts";
import { runUntilSignalled } from "../../common/lifecycle.ts";

const configOpt = (def: string) => new Option("-c, --config <file>", "cluster configuration file").default(def);
const jsonOpt = () => new Option("--json", "print the result as JSON");

/** The MariaDB socket of the active node reachable from here. */
async function activeDb(c: MailhaConfig) {
  for (const id of localNodes(c)) {
    const s = await nodeStatus(c, id, 2000).catch(() => null);
    if (s?.state === "active") return connectMariadb(mariadbPaths(nodePaths(nodeStateDir(c, id))).socket);
  }
  throw new Error("no active node here: run this on the active node (see mailha status)");
}

async function withDb<T>(config: string, fn: (db: Awaited<ReturnType<typeof activeDb>>) => Promise<T>): Promise<T> {
  const db = await activeDb(loadConfig(config));
  try {
    return await fn(db);
  } finally {
    await db.end();
  }
}

async function readPassword(o: { password?: string; passwordStdin?: boolean }): Promise<string> {
  if (o.password) return o.password;
  if (o.passwordStdin) {
    let s = "";
    for await (const chunk of process.stdin) s += chunk;
    return s.replace(/\r?\n$/, "");
  }
  throw new UsageError("give the password with --password PW or --password-stdin");
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
      const proxy = await runProxy({ listenAddress: me.service_address, upstreamAddress: peer.service_address, onEvent: (ev) => log.info(ev, String(ev.type)) });
      const key = Buffer.from(readFileSync(c.heartbeat.key_file, "utf8").trim());
      const mx = await runBackupMx({ config: c, nodeId: id, paths: nodePaths(nodeStateDir(c, id)), key, log });
      const ready = join(nodeStateDir(c, id), "run", "passive.ready");
      writeFileSync(ready, `${process.pid}\n`);
      await runUntilSignalled(async () => {
        await Promise.all([proxy.close(), mx.close()]);
        rmSync(ready, { force: true });
      });
    });

  const pw = (cmd: Command) => cmd.option("--password <pw>", "the password (at least 8 characters)").option("--password-stdin", "read the password from standard input");
  const user = new Command("user").description("mail users (on the active node)");
  pw(user.command("add").argument("<address>").description("add a user").addOption(configOpt(defaultConfig)).addOption(jsonOpt())).action(
    async (address: string, o: { config: string; json?: boolean; password?: string; passwordStdin?: boolean }) => {
      const p = await readPassword(o);
      await withDb(o.config, (db) => addUser(db, address, p));
      createOutput(!!o.json).result({ added: address.toLowerCase() }, () => `user ${address.toLowerCase()} added`);
    },
  );
  pw(user.command("passwd").argument("<address>").description("set a user's password").addOption(configOpt(defaultConfig)).addOption(jsonOpt())).action(
    async (address: string, o: { config: string; json?: boolean; password?: string; passwordStdin?: boolean }) => {
      const p = await readPassword(o);
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
