// The user and domain store in MariaDB: schema migrations applied by code at start,
// and the few account operations the lab and the operator commands need. Dovecot reads
// the same tables (passdb/userdb sql) through a read-only database user; each service
// has its own account with the least grants it needs (SQL_ACCOUNTS). Every row an
// operation changes is also journaled (`account` entries, services/journal/accounts.ts)
// before the operation returns.
import type { Connection } from "mysql2/promise";
import { hashPassword } from "./password.ts";
import { journalAccountChange } from "./journal/accounts.ts";

export const DATABASE = "mailha";

interface Migration {
  readonly version: number;
  readonly name: string;
  readonly statements: readonly string[];
}

/** Ordered, append-only: never edit a released migration, add a new one. */
const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    name: "domains, users, aliases",
    statements: [
      `CREATE TABLE domains (
         id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
         name VARCHAR(253) NOT NULL UNIQUE,
         created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
       ) ENGINE=InnoDB`,
      `CREATE TABLE users (
         id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
         email VARCHAR(320) NOT NULL UNIQUE,
         local_part VARCHAR(64) NOT NULL,
         domain_id INT UNSIGNED NOT NULL,
         password VARCHAR(255) NOT NULL,
         active TINYINT(1) NOT NULL DEFAULT 1,
         created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
         updated_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
         FOREIGN KEY (domain_id) REFERENCES domains(id)
       ) ENGINE=InnoDB`,
      `CREATE TABLE aliases (
         id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY,
         source VARCHAR(320) NOT NULL,
         destination VARCHAR(320) NOT NULL,
         domain_id INT UNSIGNED NOT NULL,
         created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
         UNIQUE KEY source_destination (source, destination),
         FOREIGN KEY (domain_id) REFERENCES domains(id)
       ) ENGINE=InnoDB`,
    ],
  },
];

/** Creates the database and applies every migration not yet applied; returns their versions. */
export async function migrate(db: Connection): Promise<number[]> {
  await db.query(`CREATE DATABASE IF NOT EXISTS ${DATABASE} CHARACTER SET utf8mb4`);
  await db.query(`USE ${DATABASE}`);
  await db.query(
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INT UNSIGNED PRIMARY KEY, name VARCHAR(200) NOT NULL, applied_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)) ENGINE=InnoDB",
  );
  const [rows] = await db.query("SELECT version FROM schema_migrations");
  const done = new Set((rows as { version: number }[]).map((r) => r.version));
  const applied: number[] = [];
  for (const m of MIGRATIONS) {
    if (done.has(m.version)) continue;
    // MariaDB commits DDL implicitly; each statement is idempotent only as a whole
    // migration, so a crash mid-migration needs the operator (the error says which).
    for (const sql of m.statements) await db.query(sql);
    await db.query("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [m.version, m.name]);
    applied.push(m.version);
  }
  return applied;
}

/**
 * The MariaDB accounts of the services, each with the least it needs; root (unix_socket,
 * the OS root only) makes the schema and these grants. Their passwords are files in the
 * volume's etc/ (0600), shared by both nodes as the database is.
 */
/** The spam filter's tables (services/spam/store.ts makes them at every activation, before the grants). */
export const SPAM_TABLES = ["dspam_token_data", "dspam_signature_data", "dspam_stats", "dspam_preferences", "dspam_virtual_uids", "mailha_spam_ledger", "mailha_spam_generation"] as const;

/** What classification at delivery writes: counts, signatures, the ledger, a user's first uid; preferences read. */
const SPAM_CLASSIFY_GRANTS = [
  `SELECT, INSERT, UPDATE ON ${DATABASE}.dspam_token_data`,
  `SELECT, INSERT, UPDATE ON ${DATABASE}.dspam_stats`,
  `SELECT, INSERT, UPDATE ON ${DATABASE}.dspam_signature_data`,
  `SELECT, INSERT, UPDATE ON ${DATABASE}.mailha_spam_ledger`,
  `SELECT, INSERT, UPDATE ON ${DATABASE}.mailha_spam_generation`,
  `SELECT, INSERT ON ${DATABASE}.dspam_virtual_uids`,
  `SELECT ON ${DATABASE}.dspam_preferences`,
];

export const SQL_ACCOUNTS = {
  /** SMTP's recipient and AUTH lookups (services/smtp/recipients.ts): read only. */
  smtp: {
    user: "mailha_smtp",
    secret: "mariadb-smtp.secret",
    grants: [`SELECT ON ${DATABASE}.users`, `SELECT ON ${DATABASE}.aliases`, ...SPAM_CLASSIFY_GRANTS],
  },
  /** The spam worker (retraining from users' moves, the nightly purge): the filter's tables, the users read. */
  spam: {
    user: "mailha_spam",
    secret: "mariadb-spam.secret",
    grants: [`SELECT ON ${DATABASE}.users`, ...SPAM_TABLES.map((t) => `SELECT, INSERT, UPDATE, DELETE ON ${DATABASE}.${t}`)],
  },
  /** Dovecot's passdb/userdb (services/dovecot.ts): the users table, read only. */
  dovecot: { user: "dovecot", secret: "dovecot-sql.secret", grants: [`SELECT ON ${DATABASE}.users`] },
  /** The account store's commands (users, aliases, domains): rows, never the schema. */
  accounts: { user: "mailha", secret: "mariadb-accounts.secret", grants: [`SELECT, INSERT, UPDATE, DELETE ON ${DATABASE}.*`] },
} as const;

export type SqlAccount = keyof typeof SQL_ACCOUNTS;

/**
 * Makes ACCOUNT (local socket logins only) with PASSWORD and exactly its grants: what
 * an earlier version granted more (Dovecot had SELECT on every table) is taken back.
 */
export async function grantAccount(db: Connection, account: SqlAccount, password: string): Promise<void> {
  const a = SQL_ACCOUNTS[account];
  await db.query("CREATE USER IF NOT EXISTS ?@'localhost' IDENTIFIED BY ?", [a.user, password]);
  await db.query("ALTER USER ?@'localhost' IDENTIFIED BY ?", [a.user, password]);
  await db.query("REVOKE ALL PRIVILEGES, GRANT OPTION FROM ?@'localhost'", [a.user]);
  for (const g of a.grants) await db.query(`GRANT ${g} TO ?@'localhost'`, [a.user]);
}

export async function addDomain(db: Connection, name: string): Promise<void> {
  const [res] = await db.query(`INSERT IGNORE INTO ${DATABASE}.domains (name) VALUES (?)`, [name.toLowerCase()]);
  if ((res as { affectedRows: number }).affectedRows) await journalAccountChange(db, { table: "domains", key: name.toLowerCase(), columns: { name: name.toLowerCase() } });
}

/** Adds a user, or sets the password of an existing one. The domain must exist. */
export async function upsertUser(db: Connection, email: string, password: string): Promise<void> {
  const addr = email.toLowerCase();
  const at = addr.lastIndexOf("@");
  if (at < 1) throw new Error(`not an e-mail address: ${email}`);
  const local = addr.slice(0, at);
  const domain = addr.slice(at + 1);
  const [rows] = await db.query(`SELECT id FROM ${DATABASE}.domains WHERE name = ?`, [domain]);
  const d = (rows as { id: number }[])[0];
  if (!d) throw new Error(`domain ${domain} does not exist (add it first)`);
  const hash = hashPassword(password);
  const [res] = await db.query(
    `INSERT INTO ${DATABASE}.users (email, local_part, domain_id, password) VALUES (?, ?, ?, ?)
     ON DUPLICATE KEY UPDATE password = VALUES(password)`,
    [addr, local, d.id, hash],
  );
  // 1: inserted, 2: the password changed.
  const n = (res as { affectedRows: number }).affectedRows;
  if (n) await journalAccountChange(db, { table: "users", key: addr, columns: n === 1 ? { email: addr, local_part: local, domain, password: hash, active: 1 } : { password: hash } });
}

function splitAddress(email: string): { local: string; domain: string; addr: string } {
  const addr = email.trim().toLowerCase();
  const at = addr.lastIndexOf("@");
  if (at < 1 || at === addr.length - 1 || !/^[a-z0-9._+-]+@[a-z0-9.-]+$/.test(addr)) throw new Error(`not an e-mail address: ${email}`);
  return { local: addr.slice(0, at), domain: addr.slice(at + 1), addr };
}

async function domainId(db: Connection, domain: string): Promise<number> {
  const [rows] = await db.query(`SELECT id FROM ${DATABASE}.domains WHERE name = ?`, [domain]);
  const d = (rows as { id: number }[])[0];
  if (!d) throw new Error(`domain ${domain} does not exist (add it first: mailha domain add ${domain})`);
  return d.id;
}

/** Adds a user; refuses an existing one (use setPassword). */
export async function addUser(db: Connection, email: string, password: string): Promise<void> {
  const { local, domain, addr } = splitAddress(email);
  if (password.length < 8) throw new Error("the password must have at least 8 characters");
  const id = await domainId(db, domain);
  const [rows] = await db.query(`SELECT 1 FROM ${DATABASE}.users WHERE email = ?`, [addr]);
  if ((rows as unknown[]).length) throw new Error(`user ${addr} already exists (change the password with: mailha user passwd ${addr})`);
  const hash = hashPassword(password);
  await db.query(`INSERT INTO ${DATABASE}.users (email, local_part, domain_id, password) VALUES (?, ?, ?, ?)`, [addr, local, id, hash]);
  await journalAccountChange(db, { table: "users", key: addr, columns: { email: addr, local_part: local, domain, password: hash, active: 1 } });
}

export async function setPassword(db: Connection, email: string, password: string): Promise<void> {
  const { addr } = splitAddress(email);
  if (password.length < 8) throw new Error("the password must have at least 8 characters");
  const hash = hashPassword(password);
  const [res] = await db.query(`UPDATE ${DATABASE}.users SET password = ? WHERE email = ?`, [hash, addr]);
  if ((res as { affectedRows: number }).affectedRows === 0) throw new Error(`no user ${addr}`);
  await journalAccountChange(db, { table: "users", key: addr, columns: { password: hash } });
}

export async function deleteUser(db: Connection, email: string): Promise<void> {
  const { addr } = splitAddress(email);
  const [res] = await db.query(`DELETE FROM ${DATABASE}.users WHERE email = ?`, [addr]);
  if ((res as { affectedRows: number }).affectedRows === 0) throw new Error(`no user ${addr}`);
  await journalAccountChange(db, { table: "users", key: addr, columns: {}, deleted: true });
}

export async function listUsers(db: Connection): Promise<{ email: string; active: boolean; created: string }[]> {
  const [rows] = await db.query(`SELECT email, active, created_at FROM ${DATABASE}.users ORDER BY email`);
  return (rows as { email: string; active: number; created_at: Date }[]).map((r) => ({ email: r.email, active: r.active === 1, created: new Date(r.created_at).toISOString() }));
}

export async function addAlias(db: Connection, source: string, destination: string): Promise<void> {
  const s = splitAddress(source);
  const d = splitAddress(destination);
  const id = await domainId(db, s.domain);
  const [res] = await db.query(`INSERT IGNORE INTO ${DATABASE}.aliases (source, destination, domain_id) VALUES (?, ?, ?)`, [s.addr, d.addr, id]);
  if ((res as { affectedRows: number }).affectedRows) await journalAccountChange(db, { table: "aliases", key: `${s.addr} ${d.addr}`, columns: { source: s.addr, destination: d.addr } });
}

export async function deleteAlias(db: Connection, source: string, destination?: string): Promise<number> {
  const s = splitAddress(source);
  // The rows it removes, for the journal (one entry each).
  const [gone] = destination
    ? await db.query(`SELECT destination FROM ${DATABASE}.aliases WHERE source = ? AND destination = ?`, [s.addr, splitAddress(destination).addr])
    : await db.query(`SELECT destination FROM ${DATABASE}.aliases WHERE source = ?`, [s.addr]);
  const [res] = destination
    ? await db.query(`DELETE FROM ${DATABASE}.aliases WHERE source = ? AND destination = ?`, [s.addr, splitAddress(destination).addr])
    : await db.query(`DELETE FROM ${DATABASE}.aliases WHERE source = ?`, [s.addr]);
  const n = (res as { affectedRows: number }).affectedRows;
  if (n === 0) throw new Error(`no alias ${s.addr}${destination ? ` -> ${destination}` : ""}`);
  for (const r of gone as { destination: string }[]) await journalAccountChange(db, { table: "aliases", key: `${s.addr} ${r.destination}`, columns: {}, deleted: true });
  return n;
}

export async function listAliases(db: Connection): Promise<{ source: string; destination: string }[]> {
  const [rows] = await db.query(`SELECT source, destination FROM ${DATABASE}.aliases ORDER BY source, destination`);
  return rows as { source: string; destination: string }[];
}

export async function listDomains(db: Connection): Promise<string[]> {
  const [rows] = await db.query(`SELECT name FROM ${DATABASE}.domains ORDER BY name`);
  return (rows as { name: string }[]).map((r) => r.name);
}
