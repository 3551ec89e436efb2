// The account source of the change journal: services/accounts.ts calls
// `journalAccountChange` after each row it changes (users, aliases, domains) and
// returns only once the `account` entry is durable, so a change the operator's command
// reported is in the journal. It finds the journal from the MariaDB connection it was
// given: the volume is the parent of MariaDB's datadir, and the node is the one named
// in the node marker beside MariaDB's socket (the node's own run directory: it can
// never name the peer), which the journal resource writes at every start.
// Entries carry the changed columns with their new values; a password only as its
// hash; never a database id (they differ between the sides).
// Known gaps: a crash between the row change and the append loses the entry (the
// command then failed, and the operator runs it again). Before a node's first journal
// resource start there is no marker: the node daemon's own bootstrap of that first
// activation (the config's domains, the monitor user, re-made by every activation on
// either side) is then not journaled, and a warning says so.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import type { Connection } from "mysql2/promise";
import { writeFileDurable } from "../../common/fsutil.ts";
import { createLogger } from "../../common/log.ts";
import { ChangeJournal } from "./changes.ts";
import "./kinds.ts";

export const NODE_MARKER = "journal-node";

export type AccountColumns = Record<string, string | number | null>;

export interface AccountChange {
  readonly table: "users" | "aliases" | "domains";
  readonly key: string;
  readonly columns: AccountColumns;
  readonly deleted?: true;
}

/** Names NODE as the node of this run directory (the journal resource, at every start). */
export function writeNodeMarker(runDir: string, node: string): void {
  let cur: string | null = null;
  try {
    cur = readFileSync(join(runDir, NODE_MARKER), "utf8").trim();
  } catch {
    cur = null;
  }
  if (cur !== node) writeFileDurable(join(runDir, NODE_MARKER), `${node}\n`, 0o644);
}

interface Target {
  readonly dataDir: string;
  readonly node: string;
}

const targets = new WeakMap<object, Promise<Target | null>>();
const journals = new Map<string, ChangeJournal>();

/** The volume and node a MariaDB connection's changes are journaled under (null before the journal resource ran). */
export async function journalTarget(db: Connection): Promise<Target | null> {
  return targetOf(db);
}

async function targetOf(db: Connection): Promise<Target | null> {
  const [rows] = await db.query("SELECT @@datadir AS datadir, @@socket AS socket");
  const r = (rows as { datadir: string; socket: string }[])[0];
  if (!r?.datadir || !r.socket) return null;
  const dataDir = dirname(r.datadir.replace(/\/+$/, ""));
  try {
    const node = readFileSync(join(dirname(r.socket), NODE_MARKER), "utf8").trim();
    return node ? { dataDir, node } : null;
  } catch {
    return null;
  }
}

function journalFor(t: Target): ChangeJournal {
  const k = `${t.dataDir}\0${t.node}`;
  let j = journals.get(k);
  if (!j) {
    j = new ChangeJournal(t.dataDir, t.node);
    journals.set(k, j);
    // Every append was awaited; at exit only the writer record is left to tidy.
    const jj = j;
    process.once("exit", () => jj.abandon());
  }
  return j;
}

let warned = false;

/** Journals CHANGE (made on DB's server) and resolves once it is durable. */
export async function journalAccountChange(db: Connection, change: AccountChange): Promise<void> {
  let t = targets.get(db);
  if (!t) {
    t = targetOf(db);
    targets.set(db, t);
  }
  const target = await t;
  if (!target) {
    if (!warned) createLogger("accounts").warn({ table: change.table, key: change.key }, "account change not journaled: no journal node marker beside MariaDB's socket (the journal resource has not started on this node yet)");
    warned = true;
    return;
  }
  // Closed after each change: a long-lived caller (the node daemon's bootstrap, a test)
  // must not hold a file open on the volume, or the file system's stop would have to
  // kill it to unmount. Account changes are rare; each one gets a small segment.
  const j = journalFor(target);
  try {
    await j.append("account", { ...change });
  } finally {
    for (const [k, v] of journals) if (v === j) journals.delete(k);
    await j.close();
  }
}

/** Closes the journals this process opened for account changes (tests, long-lived callers). */
export async function closeAccountJournals(): Promise<void> {
  for (const j of journals.values()) await j.close();
  journals.clear();
}
