// MariaDB as a managed daemon: initialises its datadir once, starts mariadbd with our
// own config on the node's data directory (no system my.cnf), and answers "ready" when
// a real query over its socket succeeds. Durability: InnoDB flushes at every commit.
// Least privilege, as Debian packages it: mariadbd runs as the `mysql` user and owns
// its datadir on the volume (one made by an earlier version, root's, is handed over at
// start); no TCP (`--skip-networking`); root logs in by unix_socket only, so only the
// OS root is MariaDB's root; the socket's directory lets in mysql, root and the mail
// group (SMTP after it dropped root), nobody else. The services log in with their own
// accounts (accounts.ts SQL_ACCOUNTS), passwords in 0600 files in the volume's etc/.
import { chmodSync, chownSync, existsSync, mkdirSync, openSync, closeSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import mysql from "mysql2/promise";
import type { DaemonSpec } from "../common/daemon.ts";
import { run } from "../common/exec.ts";
import { nodePaths, type NodePaths } from "../common/paths.ts";
import { SQL_ACCOUNTS, type SqlAccount } from "./accounts.ts";
import { chownTree, isRoot, readServiceSecret, requireSystemUser, type Ids } from "./privileges.ts";

/** The system user mariadbd runs as (Debian's mariadb-server package makes it). */
export const MARIADB_USER = "mysql";

export interface MariadbPaths {
  readonly datadir: string;
  /** The socket's directory: mysql's, group the mail gid, mode 0750. */
  readonly runDir: string;
  readonly socket: string;
  readonly pidFile: string;
  readonly errorLog: string;
  readonly stdoutLog: string;
  /** The volume's etc/: the service accounts' password files. */
  readonly secretsDir: string;
}

export function mariadbPaths(p: NodePaths): MariadbPaths {
  const runDir = join(p.run, "mysqld");
  return {
    datadir: join(p.data, "mariadb"),
    runDir,
    socket: join(runDir, "mariadb.sock"),
    pidFile: join(runDir, "mariadb.pid"),
    errorLog: join(p.log, "mariadb.err"),
    stdoutLog: join(p.log, "mariadb.out"),
    secretsDir: join(p.data, "etc"),
  };
}

const mysqlIds = (): Ids => requireSystemUser(MARIADB_USER, "mariadb-server");

/**
 * Hands MariaDB its files before a start: the datadir to mysql (entries an earlier
 * version left root's too), the socket directory to mysql with group CLIENTGID (0750),
 * the error log (mariadbd opens it as mysql). Root only; as another user, nothing.
 */
export function prepareMariadbFiles(m: MariadbPaths, clientGid: number): void {
  if (!isRoot()) return;
  const mysqlUser = mysqlIds();
  mkdirSync(m.datadir, { recursive: true, mode: 0o750 });
  chownTree(m.datadir, mysqlUser);
  mkdirSync(m.runDir, { recursive: true, mode: 0o750 });
  chownSync(m.runDir, mysqlUser.uid, clientGid);
  chmodSync(m.runDir, 0o750);
  mkdirSync(dirname(m.errorLog), { recursive: true });
  closeSync(openSync(m.errorLog, "a", 0o640));
  chownSync(m.errorLog, mysqlUser.uid, mysqlUser.gid);
}

/** Creates the system tables in an empty datadir; does nothing when they exist. */
export async function initMariadbDatadir(m: MariadbPaths): Promise<boolean> {
  if (existsSync(join(m.datadir, "mysql"))) return false;
  mkdirSync(m.datadir, { recursive: true, mode: 0o750 });
  await run(
    "mariadb-install-db",
    ["--no-defaults", `--datadir=${m.datadir}`, `--user=${MARIADB_USER}`, "--auth-root-authentication-method=socket", "--skip-test-db"],
    { timeoutMs: 120_000 },
  );
  // The few files it writes as root (mysql_upgrade_info) are mysql's too.
  if (isRoot()) chownTree(m.datadir, mysqlIds());
  return true;
}

export function mariadbSpec(name: string, m: MariadbPaths, netns?: string): DaemonSpec {
  return {
    name,
    command: "mariadbd",
    args: [
      "--no-defaults",
      `--user=${MARIADB_USER}`,
      `--datadir=${m.datadir}`,
      `--socket=${m.socket}`,
      `--pid-file=${m.pidFile}`,
      "--skip-networking",
      "--skip-name-resolve",
      "--skip-log-bin",
      "--innodb-buffer-pool-size=64M",
      "--innodb-flush-log-at-trx-commit=1",
      "--innodb-doublewrite=1",
      "--character-set-server=utf8mb4",
      `--log-error=${m.errorLog}`,
    ],
    netns,
    logFile: m.stdoutLog,
    extraLogs: [m.errorLog],
    ready: () => pingMariadb(m.socket),
    readyTimeoutMs: 60_000,
    stopTimeoutMs: 30_000,
  };
}

const ROOT_BY_SOCKET = "CREATE USER `root`@`localhost` IDENTIFIED VIA unix_socket";

/**
 * Root by unix_socket only: root@localhost identified via unix_socket (an earlier
 * version made it with an empty password), no other root and no anonymous account
 * (they were for TCP, which is off). Returns what it changed.
 */
export async function secureRootAccount(db: mysql.Connection): Promise<string[]> {
  const changed: string[] = [];
  const [rows] = await db.query("SELECT user, host FROM mysql.global_priv WHERE user IN ('root', '')");
  for (const r of rows as { user: string; host: string }[]) {
    if (r.user === "root" && r.host === "localhost") {
      const [shown] = await db.query("SHOW CREATE USER 'root'@'localhost'");
      if (Object.values((shown as Record<string, string>[])[0] ?? {})[0] === ROOT_BY_SOCKET) continue;
      await db.query("ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket");
      changed.push("root@localhost: unix_socket only");
    } else {
      await db.query("DROP USER ?@?", [r.user, r.host]);
      changed.push(`dropped ${r.user || "(anonymous)"}@${r.host}`);
    }
  }
  return changed;
}

/** MariaDB's root over the local socket: works only for the OS root (unix_socket). */
export function connectMariadb(socket: string, database?: string): Promise<mysql.Connection> {
  return mysql.createConnection({ socketPath: socket, user: "root", database, connectTimeout: 2000, multipleStatements: false });
}

/** The node state directory whose MariaDB socket SOCKET is (clients name only the socket). */
function nodeOfSocket(socket: string): NodePaths {
  const p = nodePaths(dirname(dirname(dirname(resolve(socket)))));
  if (mariadbPaths(p).socket !== resolve(socket)) throw new Error(`${socket} is not a node's MariaDB socket (<state dir>/run/mysqld/mariadb.sock)`);
  return p;
}

/** Where ACCOUNT's password is kept for the MariaDB behind SOCKET. */
export function sqlSecretFile(socket: string, account: SqlAccount): string {
  return join(mariadbPaths(nodeOfSocket(socket)).secretsDir, SQL_ACCOUNTS[account].secret);
}

/**
 * How a service logs in as its own ACCOUNT over SOCKET (mysql2 options). The password
 * is read now, from the volume (as root: a service that drops root asks before).
 */
export function sqlLogin(socket: string, account: SqlAccount): { socketPath: string; user: string; password: string } {
  return { socketPath: socket, user: SQL_ACCOUNTS[account].user, password: readServiceSecret(sqlSecretFile(socket, account)) };
}

/** A connection as the service ACCOUNT (not root). */
export function connectMariadbAs(socket: string, account: SqlAccount, database?: string): Promise<mysql.Connection> {
  return mysql.createConnection({ ...sqlLogin(socket, account), database, connectTimeout: 2000, multipleStatements: false });
}

/** True when `SELECT 1` answers over the socket. */
export async function pingMariadb(socket: string): Promise<boolean> {
  if (!existsSync(socket)) return false;
  const c = await connectMariadb(socket);
  try {
    const [rows] = await c.query("SELECT 1 AS ok");
    return Array.isArray(rows) && (rows[0] as { ok?: number } | undefined)?.ok === 1;
  } finally {
    await c.end();
  }
}
