// Reading one side of a split brain for the merge: its mail state from the Maildir
// tree (read only: Dovecot's file names, dovecot-uidlist, dovecot-keywords,
// subscriptions; every message hashed once), its account rows, and its change journal
// translated into the merge's events; and which events each side wrote since the
// split. The victim's side is its preserved copy mounted read-only; the survivor's is
// its live data directory (reading files under a running Dovecot is safe: it replaces
// files by rename, and a file that vanishes meanwhile is skipped).
//
// Since the split: the two journals were one (the same blocks on both disks) until the
// split, so an entry is the split's work on one side exactly when its id is not in the
// other side's journal. An entry older than the other side's oldest retained entry is
// not counted (the other side may have pruned it).
// Bounds: MESSAGES_MAX messages per side, ENTRIES_MAX journal entries per side.
import { createHash } from "node:crypto";
import { createReadStream, readdirSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import type { Connection } from "mysql2/promise";
import { compareHlc } from "../common/hlc.ts";
import { DATABASE } from "../services/accounts.ts";
import type { JournalEntry } from "../services/journal/changes.ts";
import { flagNames, folderName, folderPath, listFolders, parseFileName, QUARANTINE_DIR, readKeywords, readSubscriptions, readUidlist } from "../services/journal/maildir.ts";
import { readJournal } from "../services/journal/read.ts";
import { listUsers } from "../services/journal/scanner.ts";
import "../services/journal/kinds.ts";
import { QUARANTINE_KIND } from "../services/spam/quarantine.ts";
import type { AccountRow, AccountTable, JournalEvent, MailboxState, MessageState, SideState, UserMailState } from "./model.ts";

export const MESSAGES_MAX = 2_000_000;
/** Where MailRead.files keeps a user's quarantine (not a mailbox: never in the mail state). */
export const QUARANTINE_GUID = "mailha-quarantine";
export const ENTRIES_MAX = 5_000_000;

export interface MailRead {
  readonly mail: Record<string, UserMailState>;
  /** user -> mailbox GUID -> key -> the file (for the worker to APPEND from). */
  readonly files: Map<string, Map<string, Map<string, string>>>;
  readonly messages: number;
}

const HEADER_SCAN_BYTES = 64 * 1024;

/** The Message-ID field of a header block (the first HEADER_SCAN_BYTES of a message), unfolded. */
export function messageIdOf(head: string): string | undefined {
  const end = head.search(/\r?\n\r?\n/);
  const block = (end >= 0 ? head.slice(0, end) : head).replace(/\r?\n[ \t]+/g, " ");
  const m = /^message-id:[ \t]*(<[^<>\s]{1,500}>)/im.exec(block);
  return m ? m[1] : undefined;
}

async function sha256File(path: string): Promise<{ sha256: string; messageId?: string } | null> {
  try {
    const h = createHash("sha256");
    let head = "";
    for await (const chunk of createReadStream(path)) {
      h.update(chunk as Buffer);
      if (head.length < HEADER_SCAN_BYTES) head += (chunk as Buffer).subarray(0, HEADER_SCAN_BYTES - head.length).toString("latin1");
    }
    const messageId = messageIdOf(head);
    return { sha256: h.digest("hex"), ...(messageId ? { messageId } : {}) };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null; // moved or expunged meanwhile
    throw err;
  }
}

function names(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/** Every user's mailboxes under `<dataDir>/mail`, each message with its flags, UID and content hash. */
export async function readMail(dataDir: string): Promise<MailRead> {
  const mail: Record<string, UserMailState> = {};
  const files = new Map<string, Map<string, Map<string, string>>>();
  let count = 0;
  for (const u of listUsers(join(dataDir, "mail"))) {
    const mailboxes: Record<string, MailboxState> = {};
    const userFiles = new Map<string, Map<string, string>>();
    for (const dir of listFolders(u.maildir)) {
      const path = folderPath(u.maildir, dir);
      const ul = readUidlist(path);
      // A folder Dovecot never opened has no GUID yet: it holds only SMTP's deliveries
      // (INBOX) and is named by a stand-in that the journal's deliveries use too.
      const guid = ul.guid ?? standInGuid(u.address, folderName(dir));
      const keywords = readKeywords(path);
      const messages: Record<string, MessageState> = {};
      const fileOf = new Map<string, string>();
      for (const sub of ["cur", "new"]) {
        for (const f of names(join(path, sub))) {
          if (f.startsWith(".")) continue;
          if (++count > MESSAGES_MAX) throw new Error(`reconcile: more than ${MESSAGES_MAX} messages under ${dataDir}`);
          const { key, letters } = parseFileName(f);
          const file = join(path, sub, f);
          const read = await sha256File(file);
          if (read === null) continue;
          const uid = ul.uids.get(key);
          messages[key] = { sha256: read.sha256, flags: flagNames(letters, keywords), ...(uid !== undefined ? { uid } : {}), ...(read.messageId ? { messageId: read.messageId } : {}) };
          fileOf.set(key, file);
        }
      }
      mailboxes[guid] = { name: folderName(dir), ...(ul.uidvalidity !== null ? { uidValidity: ul.uidvalidity } : {}), messages };
      userFiles.set(guid, fileOf);
    }
    mail[u.address] = { mailboxes, subscriptions: readSubscriptions(u.maildir) };
    // The spam quarantine beside the Maildir: its files only (no Dovecot folder, no
    // state), so the merge can copy a message the victim held (reconcile/quarantine.ts).
    const held = new Map<string, string>();
    const qNew = join(dirname(u.maildir), QUARANTINE_DIR, "new");
    for (const f of names(qNew)) {
      if (f.startsWith(".")) continue;
      if (++count > MESSAGES_MAX) throw new Error(`reconcile: more than ${MESSAGES_MAX} messages under ${dataDir}`);
      held.set(parseFileName(f).key, join(qNew, f));
    }
    if (held.size) userFiles.set(QUARANTINE_GUID, held);
    files.set(u.address, userFiles);
  }
  return { mail, files, messages: count };
}

/**
 * A folder with a stand-in GUID on one side is the folder of the same name on the
 * other side when that one has a real GUID (Dovecot gave it one there first): the map
 * stand-in -> real GUID, and MAIL with those folders renamed in place.
 */
export function unifyStandIns(a: MailRead, b: MailRead): Map<string, string> {
  const map = new Map<string, string>();
  const visit = (x: MailRead, y: MailRead) => {
    for (const [user, st] of Object.entries(x.mail)) {
      const other = y.mail[user];
      if (!other) continue;
      for (const [guid, box] of Object.entries(st.mailboxes)) {
        if (guid !== standInGuid(user, box.name)) continue;
        const real = Object.entries(other.mailboxes).find(([g, ob]) => ob.name === box.name && g !== standInGuid(user, ob.name));
        if (!real) continue;
        map.set(guid, real[0]);
        const boxes = st.mailboxes as Record<string, MailboxState>;
        boxes[real[0]] = box;
        delete boxes[guid];
        const files = x.files.get(user);
        const f = files?.get(guid);
        if (files && f) {
          files.set(real[0], f);
          files.delete(guid);
        }
      }
    }
  };
  visit(a, b);
  visit(b, a);
  return map;
}

/** The GUID used for a folder that has no dovecot-uidlist yet (only SMTP wrote to it). */
export function standInGuid(user: string, name: string): string {
  return createHash("sha256").update(`mailha-standin\0${user}\0${name}`).digest("hex").slice(0, 32);
}

/** The survivor's account rows, as the journal's `account` entries name them. */
export async function readAccounts(db: Connection): Promise<Record<AccountTable, Record<string, AccountRow>>> {
  const [users] = await db.query(`SELECT u.email, u.local_part, d.name AS domain, u.password, u.active FROM ${DATABASE}.users u JOIN ${DATABASE}.domains d ON d.id = u.domain_id`);
  const [aliases] = await db.query(`SELECT source, destination FROM ${DATABASE}.aliases`);
  const [domains] = await db.query(`SELECT name FROM ${DATABASE}.domains`);
  const out: Record<AccountTable, Record<string, AccountRow>> = { users: {}, aliases: {}, domains: {} };
  for (const r of users as { email: string; local_part: string; domain: string; password: string; active: number }[]) out.users[r.email] = { email: r.email, local_part: r.local_part, domain: r.domain, password: r.password, active: Number(r.active) };
  for (const r of aliases as { source: string; destination: string }[]) out.aliases[`${r.source} ${r.destination}`] = { source: r.source, destination: r.destination };
  for (const r of domains as { name: string }[]) out.domains[r.name] = { name: r.name };
  return out;
}

/**
 * The victim's account rows, rebuilt: its database is inside the copy, not running.
 * The survivor's rows with the victim's journaled changes applied in order. Known gap:
 * a row the survivor deleted that the victim only partly changed comes back with just
 * the columns the victim's journal names (an insert names all of them).
 */
export function victimAccounts(survivor: Record<AccountTable, Record<string, AccountRow>>, victimEvents: readonly JournalEvent[]): Record<AccountTable, Record<string, AccountRow>> {
  const out: Record<AccountTable, Record<string, AccountRow>> = { users: { ...survivor.users }, aliases: { ...survivor.aliases }, domains: { ...survivor.domains } };
  for (const e of victimEvents) {
    if (e.kind !== "account") continue;
    const a = e as Extract<JournalEvent, { kind: "account" }>;
    const rows = out[a.table];
    if (a.deleted) delete rows[a.key];
    else rows[a.key] = { ...(rows[a.key] ?? {}), ...a.columns };
  }
  return out;
}

/** The journal of a data directory, every node's files, in clock order. */
export async function readEntries(dataDir: string, onProblem?: (p: { file: string; line: number; problem: string }) => void): Promise<JournalEntry[]> {
  const out: JournalEntry[] = [];
  for await (const e of readJournal(dataDir, { onProblem })) {
    if (out.length >= ENTRIES_MAX) throw new Error(`reconcile: more than ${ENTRIES_MAX} journal entries under ${dataDir}`);
    out.push(e);
  }
  return out;
}

/** Each side's entries since the split (see the header). */
export function sinceSplit(victim: readonly JournalEntry[], survivor: readonly JournalEntry[]): { victim: JournalEntry[]; survivor: JournalEntry[]; common: number } {
  const vIds = new Set(victim.map((e) => e.id));
  const sIds = new Set(survivor.map((e) => e.id));
  const oldest = (l: readonly JournalEntry[]) => (l.length ? l.reduce((m, e) => (compareHlc(e.hlc, m) < 0 ? e.hlc : m), l[0]!.hlc) : null);
  const vOldest = oldest(victim);
  const sOldest = oldest(survivor);
  let common = 0;
  for (const id of vIds) if (sIds.has(id)) common++;
  return {
    victim: victim.filter((e) => !sIds.has(e.id) && (sOldest === null || compareHlc(e.hlc, sOldest) >= 0)),
    survivor: survivor.filter((e) => !vIds.has(e.id) && (vOldest === null || compareHlc(e.hlc, vOldest) >= 0)),
    common,
  };
}

/**
 * Journal entries as the merge's events. SMTP's delivery lines name the recipient's
 * address and the file in INBOX's new/; the GUID of that INBOX comes from the side's
 * state (or its stand-in). Entries the merge does not know pass as they are (their
 * kind decides: a registered handler, or a stranded report entry).
 */
export function toEvents(entries: readonly JournalEntry[], state: SideState, standIns: ReadonlyMap<string, string> = new Map()): JournalEvent[] {
  const real = (g: string) => standIns.get(g) ?? g;
  const boxOf = (user: string, name: string): string => {
    const boxes = state.mail[user]?.mailboxes ?? {};
    for (const [guid, b] of Object.entries(boxes)) if (b.name === name) return guid;
    return real(standInGuid(user, name));
  };
  const out: JournalEvent[] = [];
  for (const e of entries) {
    const base = { id: e.id, hlc: e.hlc, ...(typeof e.origin === "string" ? { origin: e.origin } : {}) };
    const x = e as Record<string, unknown>;
    const guidOr = (g: unknown, user: string, name: unknown) => real(typeof g === "string" ? g : standInGuid(user, String(name ?? "INBOX")));
    switch (e.kind) {
      case "delivery": {
        const user = String(x.mailbox);
        // `file` is relative to the mail root: `domain/local/Maildir/new/<name>`,
        // `domain/local/Maildir/.Junk/new/<name>` for spam the filter filed, or
        // `domain/local/quarantine/new/<name>` for spam it held.
        const parts = String(x.file).split("/");
        if (parts[2] === QUARANTINE_DIR) {
          // Held in the spam quarantine, not in a folder: the quarantine's kind.
          out.push({ ...base, kind: QUARANTINE_KIND, payload: { user, key: parseFileName(basename(String(x.file))).key, action: "hold", sha256: String(x.sha256) } });
          break;
        }
        const folder = parts.length === 6 ? folderName(parts[3]!) : "INBOX";
        const key = parseFileName(basename(String(x.file))).key;
        const queueId = typeof x.peerQueueId === "string" ? x.peerQueueId : typeof x.queueId === "string" ? x.queueId : undefined;
        out.push({ ...base, kind: "delivery", user, mailbox: boxOf(user, folder), key, sha256: String(x.sha256), flags: [], ...(queueId ? { queueId } : {}) });
        break;
      }
      case "append":
        out.push({ ...base, kind: "append", user: String(x.user), mailbox: guidOr(x.mailbox, String(x.user), x.name), key: String(x.key), sha256: String(x.sha256), flags: (x.flags as string[]) ?? [] });
        break;
      case "flags":
        out.push({ ...base, kind: "flags", user: String(x.user), mailbox: guidOr(x.mailbox, String(x.user), x.name), key: String(x.key), add: (x.add as string[]) ?? [], remove: (x.remove as string[]) ?? [] });
        break;
      case "expunge":
        out.push({ ...base, kind: "expunge", user: String(x.user), mailbox: guidOr(x.mailbox, String(x.user), x.name), key: String(x.key) });
        break;
      case "copy":
      case "move":
        out.push({ ...base, kind: e.kind, user: String(x.user), from: guidOr(x.from, String(x.user), x.fromName), to: guidOr(x.to, String(x.user), x.toName), key: String(x.key), newKey: String(x.newKey), sha256: String(x.sha256), flags: (x.flags as string[]) ?? [] });
        break;
      case "mailbox-create":
      case "mailbox-rename":
        out.push({ ...base, kind: e.kind, user: String(x.user), guid: guidOr(x.guid, String(x.user), x.name), name: String(x.name) });
        break;
      case "mailbox-delete":
        out.push({ ...base, kind: "mailbox-delete", user: String(x.user), guid: guidOr(x.guid, String(x.user), x.name) });
        break;
      case "subscribe":
      case "unsubscribe":
        out.push({ ...base, kind: e.kind, user: String(x.user), name: String(x.name) });
        break;
      case "account":
        out.push({ ...base, kind: "account", table: x.table as AccountTable, key: String(x.key), columns: (x.columns as Record<string, string | number | null>) ?? {}, ...(x.deleted === true ? { deleted: true as const } : {}) });
        break;
      default: {
        const { id: _i, node: _n, epoch: _e, seq: _s, hlc: _h, kind, ...payload } = e;
        out.push({ ...base, kind, payload: payload as never });
      }
    }
  }
  return out;
}
