// The user and domain store in MariaDB: schema migrations applied by code at start,
// and the few account operations the lab and the operator commands need. Dovecot reads
// the same tables (passdb/userdb sql) through a read-only database user.
import type { Connection } from "mysql2/promise";
import { hashPassword } from "./password.ts";

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

/** Grants a read-only database user for Dovecot's passdb/userdb. */
export async function grantReader(db: Connection, user: string, password: string): Promise<void> {
  await db.query("CREATE USER IF NOT EXISTS ?@'localhost' IDENTIFIED BY ?", [user, password]);
  await db.query("ALTER USER ?@'localhost' IDENTIFIED BY ?", [user, password]);
  await db.query(`GRANT SELECT ON ${DATABASE}.* TO ?@'localhost'`, [user]);
}

export async function addDomain(db: Connection, name: string): Promise<void> {
  await db.query(`INSERT IGNORE INTO ${DATABASE}.domains (name) VALUES (?)`, [name.toLowerCase()]);
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
  await db.query(
    `INSERT INTO ${DATABASE}.users (email, local_part, domain_id, password) VALUES (?, ?, ?, ?)
     ON DUPLICATE KEY UPDATE password = VALUES(password)`,
    [addr, local, d.id, hashPassword(password)],
  );
}
