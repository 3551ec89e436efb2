// Import of a DSPAM database from a `mysqldump` file: only the INSERT statements of
// DSPAM's tables (dspam_token_data, dspam_stats, dspam_signature_data,
// dspam_preferences, dspam_virtual_uids) are read; every other statement (CREATE,
// LOCK, SET, comments) is skipped. The values are parsed by a small bounded lexer
// (numbers, quoted strings with MySQL's escapes, NULL, 0x hex, _binary prefixes),
// never by handing the file to SQL. Limits: a statement of at most 64 MiB, a line of
// at most 64 MiB; an error names the line. DSPAM's users come over under mailha's uid
// for the same address (the file is read twice: users first), so a dump loads into a
// filter that classifies mail already, unless one of its users has learned data there
// (refused: ImportConflict). Rows replace existing ones with the same key (importing
// twice gives the same counts), in batches of 500, one transaction per batch.
import { createReadStream } from "node:fs";
import { createInterface } from "node:readline";
import type { Connection } from "mysql2/promise";
import { DATABASE } from "../accounts.ts";
import { MariadbSpamStore, tokenLiteral } from "./store.ts";

export type SqlValue = string | number | Buffer | null;

export const DUMP_TABLES = {
  dspam_token_data: ["uid", "token", "spam_hits", "innocent_hits", "last_hit"],
  dspam_stats: ["uid", "spam_learned", "innocent_learned", "spam_misclassified", "innocent_misclassified", "spam_corpusfed", "innocent_corpusfed", "spam_classified", "innocent_classified"],
  dspam_signature_data: ["uid", "signature", "data", "length", "created_on"],
  dspam_preferences: ["uid", "preference", "value"],
  dspam_virtual_uids: ["uid", "username"],
} as const;
export type DumpTable = keyof typeof DUMP_TABLES;

export class DumpError extends Error {
  constructor(
    readonly line: number,
    message: string,
  ) {
    super(`line ${line}: ${message}`);
  }
}

const STATEMENT_CHARS_MAX = 64 * 1024 * 1024;

/** One INSERT statement's rows: TABLE, its COLUMNS and the value tuples. */
export interface DumpInsert {
  readonly table: DumpTable;
  readonly columns: readonly string[];
  readonly rows: SqlValue[][];
  readonly line: number;
}

const ESCAPES: Record<string, string> = { "0": "\0", n: "\n", r: "\r", t: "\t", Z: "\x1a", b: "\b", "\\": "\\", "'": "'", '"': '"', "%": "\\%", _: "\\_" };

/**
 * Parses one INSERT statement S (text read as latin1, so strings keep their bytes),
 * or returns null for a statement into another table. Throws DumpError on bad syntax.
 */
export function parseInsert(s: string, line: number): DumpInsert | null {
  let i = 0;
  const n = s.length;
  const ws = (): void => {
    while (i < n && /\s/.test(s[i]!)) i++;
  };
  const fail = (what: string): never => {
    throw new DumpError(line, `${what} at character ${i + 1}: ${JSON.stringify(s.slice(i, i + 30))}`);
  };
  const word = (): string => {
    ws();
    if (s[i] === "`") {
      const end = s.indexOf("`", i + 1);
      if (end < 0) fail("unterminated `name`");
      const w = s.slice(i + 1, end);
      i = end + 1;
      return w;
    }
    const m = /^[A-Za-z0-9_$.]+/.exec(s.slice(i, i + 200));
    if (!m) return fail("expected a word");
    i += m[0].length;
    return m[0];
  };
  const expect = (c: string): void => {
    ws();
    if (s[i] !== c) fail(`expected '${c}'`);
    i++;
  };
  if (word().toUpperCase() !== "INSERT") fail("expected INSERT");
  let w = word().toUpperCase();
  while (w === "IGNORE" || w === "LOW_PRIORITY" || w === "DELAYED" || w === "HIGH_PRIORITY") w = word().toUpperCase();
  if (w !== "INTO") fail("expected INTO");
  const full = word();
  const table = full.includes(".") ? full.slice(full.lastIndexOf(".") + 1).replace(/`/g, "") : full;
  if (!(table in DUMP_TABLES)) return null;
  const known = DUMP_TABLES[table as DumpTable] as readonly string[];
  let columns: string[] = [...known];
  ws();
  if (s[i] === "(") {
    i++;
    columns = [];
    for (let k = 0; k < 64; k++) {
      columns.push(word());
      ws();
      if (s[i] === ",") i++;
      else break;
    }
    expect(")");
  }
  for (const c of columns) if (!known.includes(c)) fail(`unknown column ${c} of ${table}`);
  const v = word().toUpperCase();
  if (v !== "VALUES" && v !== "VALUE") fail("expected VALUES");
  const rows: SqlValue[][] = [];
  for (;;) {
    expect("(");
    const row: SqlValue[] = [];
    for (;;) {
      ws();
      let c = s[i];
      if (c === "_") {
        const m = /^_(binary|latin1|utf8mb4|utf8)\s*/i.exec(s.slice(i, i + 12));
        if (m) {
          i += m[0].length;
          c = s[i];
        }
      }
      if (c === "'") {
        i++;
        const parts: string[] = [];
        let start = i;
        for (;;) {
          if (i >= n) fail("unterminated string");
          const ch = s[i]!;
          if (ch === "\\") {
            parts.push(s.slice(start, i));
            const e = s[i + 1] ?? "";
            parts.push(ESCAPES[e] ?? e);
            i += 2;
            start = i;
          } else if (ch === "'") {
            if (s[i + 1] === "'") {
              parts.push(s.slice(start, i + 1));
              i += 2;
              start = i;
            } else {
              parts.push(s.slice(start, i));
              i++;
              break;
            }
          } else i++;
        }
        row.push(parts.join(""));
      } else if (c === "0" && (s[i + 1] === "x" || s[i + 1] === "X")) {
        const m = /^0[xX]([0-9A-Fa-f]*)/.exec(s.slice(i, i + STATEMENT_CHARS_MAX))!;
        row.push(Buffer.from(m[1]!, "hex"));
        i += m[0].length;
      } else if (/^NULL\b/i.test(s.slice(i, i + 5))) {
        row.push(null);
        i += 4;
      } else {
        const m = /^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?/.exec(s.slice(i, i + 40));
        if (!m) fail("expected a value");
        row.push(m![0]);
        i += m![0].length;
      }
      ws();
      if (s[i] === ",") {
        i++;
        continue;
      }
      expect(")");
      break;
    }
    if (row.length !== columns.length) fail(`a row of ${row.length} values for ${columns.length} columns`);
    rows.push(row);
    ws();
    if (s[i] === ",") {
      i++;
      continue;
    }
    ws();
    if (s[i] === ";" || i >= n) break;
    fail("expected ',' or ';'");
  }
  return { table: table as DumpTable, columns, rows, line };
}

/** The INSERT statements of the dump FILE, one at a time (bounded; comments and other statements skipped). */
export async function* readDump(file: string): AsyncGenerator<DumpInsert> {
  const rl = createInterface({ input: createReadStream(file, { encoding: "latin1" }), crlfDelay: Infinity });
  let stmt: string[] = [];
  let size = 0;
  let startLine = 0;
  let lineNo = 0;
  let inString = false;
  for await (const line of rl) {
    lineNo++;
    if (line.length > STATEMENT_CHARS_MAX) throw new DumpError(lineNo, `line longer than ${STATEMENT_CHARS_MAX} characters`);
    if (!stmt.length) {
      const t = line.trimStart();
      if (!/^INSERT\b/i.test(t)) continue; // CREATE, LOCK, SET, comments: not ours
      startLine = lineNo;
    }
    stmt.push(line);
    size += line.length + 1;
    if (size > STATEMENT_CHARS_MAX) throw new DumpError(startLine, `statement longer than ${STATEMENT_CHARS_MAX} characters`);
    // Ends outside a string with ';'? Track quotes across the line (escapes included).
    for (let k = 0; k < line.length; k++) {
      const ch = line[k];
      if (ch === "\\" && inString) k++;
      else if (ch === "'") inString = !inString;
    }
    if (!inString && line.trimEnd().endsWith(";")) {
      const ins = parseInsert(stmt.join("\n"), startLine);
      stmt = [];
      size = 0;
      if (ins) yield ins;
    }
  }
  if (stmt.length) throw new DumpError(startLine, "the dump ends inside a statement");
}

export interface ImportCounts {
  statements: number;
  rows: Record<DumpTable, number>;
}

/** Loads the DSPAM rows of the mysqldump FILE into DB (the tables must exist: migrateSpam). */
/** A user of the dump who has learned data in mailha already (the import would mix their counts). */
export class ImportConflict extends Error {
  constructor(readonly users: readonly string[]) {
    super(`the spam filter has learned data for ${users.length} user(s) of the dump already (${users.slice(0, 5).join(", ")}${users.length > 5 ? ", ..." : ""}): import with --replace to put the dump's in place of theirs, or leave them out of the dump`);
  }
}

/**
 * DSPAM's uids mapped to mailha's: a user the dump names (dspam_virtual_uids) gets
 * mailha's uid for the same address (made when new), uid 0 (everyone's defaults) stays
 * 0, a uid the dump does not name (DSPAM with system users) is kept when mailha has no
 * user with it. Refuses (ImportConflict) when a mapped user has tokens or learned
 * messages in mailha already, unless REPLACE (theirs are removed first: a second
 * import of the same dump gives the same counts).
 */
async function uidMap(db: Connection, file: string, database: string, replace: boolean): Promise<Map<number, number>> {
  const named = new Map<number, string>();
  for await (const ins of readDump(file)) {
    if (ins.table !== "dspam_virtual_uids") continue;
    const iu = ins.columns.indexOf("uid");
    const in_ = ins.columns.indexOf("username");
    for (const row of ins.rows) {
      const u = Number(row[iu]);
      const name = row[in_];
      if (Number.isSafeInteger(u) && typeof name === "string") named.set(u, Buffer.from(name, "latin1").toString("utf8").toLowerCase());
    }
  }
  const map = new Map<number, number>([[0, 0]]);
  const conflicts: string[] = [];
  for (const [dumpUid, name] of named) {
    await db.query(`INSERT IGNORE INTO \`${database}\`.dspam_virtual_uids (username) VALUES (?)`, [name]);
    const [rows] = await db.query(`SELECT uid FROM \`${database}\`.dspam_virtual_uids WHERE username = ?`, [name]);
    const uid = (rows as { uid: number }[])[0]!.uid;
    const [t] = await db.query(`SELECT (SELECT COUNT(*) FROM \`${database}\`.dspam_token_data WHERE uid = ?) AS tokens, (SELECT COALESCE(SUM(spam_learned + innocent_learned + spam_corpusfed + innocent_corpusfed), 0) FROM \`${database}\`.dspam_stats WHERE uid = ?) AS learned`, [uid, uid]);
    const r = (t as { tokens: number | string; learned: number | string }[])[0]!;
    if (Number(r.tokens) > 0 || Number(r.learned) > 0) {
      if (!replace) conflicts.push(name);
      // REPLACE: what mailha had for this user goes; the dump's is theirs now.
      else for (const t of ["dspam_token_data", "dspam_stats", "dspam_signature_data", "dspam_preferences", "mailha_spam_ledger"]) await db.query(`DELETE FROM \`${database}\`.${t} WHERE uid = ?`, [uid]);
    }
    map.set(dumpUid, uid);
  }
  if (conflicts.length) throw new ImportConflict(conflicts);
  return map;
}

export async function importDspamDump(db: Connection, file: string, database = DATABASE, opts: { replace?: boolean } = {}): Promise<ImportCounts> {
  const counts: ImportCounts = { statements: 0, rows: { dspam_token_data: 0, dspam_stats: 0, dspam_signature_data: 0, dspam_preferences: 0, dspam_virtual_uids: 0 } };
  const map = await uidMap(db, file, database, !!opts.replace);
  const [known] = await db.query(`SELECT uid FROM \`${database}\`.dspam_virtual_uids`);
  const taken = new Set((known as { uid: number }[]).map((r) => r.uid));
  const mapUid = (line: number, v: SqlValue): number => {
    const u = Number(v);
    const m = map.get(u);
    if (m !== undefined) return m;
    // A uid the dump does not name: kept, unless it is a mailha user's.
    if (taken.has(u)) throw new DumpError(line, `uid ${u} has no username in the dump and is another user's in mailha`);
    return u;
  };
  for await (const ins of readDump(file)) {
    counts.statements++;
    // The users were taken over above (each under mailha's uid for the address).
    if (ins.table === "dspam_virtual_uids") {
      counts.rows.dspam_virtual_uids += ins.rows.length;
      continue;
    }
    for (let k = 0; k < ins.rows.length; k += 500) {
      const batch = ins.rows.slice(k, k + 500);
      const cols = ins.columns.map((c) => `\`${c}\``).join(", ");
      const params: unknown[] = [];
      const tuples = batch.map((row) => {
        const ph = row.map((v, j) => {
          const c = ins.columns[j]!;
          if (c === "uid") {
            params.push(mapUid(ins.line, v));
            return "?";
          }
          if (c === "token") {
            if (typeof v !== "string") throw new DumpError(ins.line, `token is not a number`);
            try {
              return `CAST(${tokenLiteral(v)} AS UNSIGNED)`;
            } catch (e) {
              throw new DumpError(ins.line, (e as Error).message);
            }
          }
          if (c === "data" || c === "signature" || c === "preference" || c === "value") params.push(typeof v === "string" ? Buffer.from(v, "latin1") : v);
          else if (c === "username") params.push(typeof v === "string" ? Buffer.from(v, "latin1").toString("utf8") : v);
          else params.push(v);
          return "?";
        });
        return `(${ph.join(", ")})`;
      });
      const update = ins.columns.filter((c) => c !== "uid" || ins.table === "dspam_virtual_uids").map((c) => `\`${c}\` = VALUES(\`${c}\`)`).join(", ");
      await db.beginTransaction();
      try {
        await db.query(`INSERT INTO \`${database}\`.${ins.table} (${cols}) VALUES ${tuples.join(", ")} ON DUPLICATE KEY UPDATE ${update}`, params);
        await db.commit();
      } catch (e) {
        await db.rollback().catch(() => undefined);
        throw new DumpError(ins.line, (e as Error).message);
      }
      counts.rows[ins.table] += batch.length;
    }
  }
  // Counts changed under every process that caches them (token-cache.ts).
  await new MariadbSpamStore(db, database).bumpAllGenerations();
  return counts;
}
