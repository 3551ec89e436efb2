// MariaDB as a managed daemon: initialises its datadir once, starts mariadbd with our
// own config on the node's data directory (no system my.cnf), and answers "ready" when
// a real query over its socket succeeds. Durability: InnoDB flushes at every commit.
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import mysql from "mysql2/promise";
import type { DaemonSpec } from "../common/daemon.ts";
import { run } from "../common/exec.ts";
import type { NodePaths } from "../common/paths.ts";

export interface MariadbPaths {
  readonly datadir: string;
  readonly socket: string;
  readonly pidFile: string;
  readonly errorLog: string;
  readonly stdoutLog: string;
}

export function mariadbPaths(p: NodePaths): MariadbPaths {
  return {
    datadir: join(p.data, "mariadb"),
    socket: join(p.run, "mariadb.sock"),
    pidFile: join(p.run, "mariadb.pid"),
    errorLog: join(p.log, "mariadb.err"),
    stdoutLog: join(p.log, "mariadb.out"),
  };
}

/** Creates the system tables in an empty datadir; does nothing when they exist. */
export async function initMariadbDatadir(m: MariadbPaths): Promise<boolean> {
  if (existsSync(join(m.datadir, "mysql"))) return false;
  mkdirSync(m.datadir, { recursive: true });
  await run(
    "mariadb-install-db",
    ["--no-defaults", `--datadir=${m.datadir}`, "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"],
    { timeoutMs: 120_000 },
  );
  return true;
}

export function mariadbSpec(name: string, m: MariadbPaths, netns?: string): DaemonSpec {
  return {
    name,
    command: "mariadbd",
    args: [
      "--no-defaults",
      "--user=root",
      `--datadir=${m.datadir}`,
      `--socket=${m.socket}`,
      `--pid-file=${m.pidFile}`,
      "--port=3306",
      "--bind-address=127.0.0.1",
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

/** Opens a root connection over the local socket. */
export function connectMariadb(socket: string, database?: string): Promise<mysql.Connection> {
  return mysql.createConnection({ socketPath: socket, user: "root", database, connectTimeout: 2000, multipleStatements: false });
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
