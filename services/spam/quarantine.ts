// The spam quarantine (spam_action `quarantine`, DSPAM's): spam held beside the user's
// Maildir, in `<mailRoot>/<domain>/<local>/quarantine/new/` (QUARANTINE_DIR), where no
// IMAP or POP3 client sees it, until it is released into the INBOX (retrained as
// innocent by the caller: it was a false positive), deleted, or expires
// (`spam.quarantine_days`, with the nightly purge). SMTP delivers into it as into a
// folder (services/smtp/maildir.ts folderOf): the file is durable and named by the
// delivery journal before the 250. A release or a deletion is journaled first (kind
// `quarantine`, {user, key, action}), then done, so the split-brain merge
// (reconcile/quarantine.ts) carries it; the holds are the delivery lines.
// A release renames the file into the INBOX's new/ (Maildir delivery: Dovecot takes it
// as SMTP's; the Maildir scanner journals it as an `append`): the same bytes, so the
// merge's content check knows it. Bounds: a listing reads at most LIST_MAX messages,
// HEAD_BYTES_MAX of each; one expiry run deletes at most EXPIRE_MAX.
import { createHash } from "node:crypto";
import { closeSync, existsSync, openSync, readdirSync, readFileSync, readSync, renameSync, statSync, unlinkSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { z } from "zod";
import { fsyncPath } from "../../common/fsutil.ts";
import { registerKind, type ChangeJournal } from "../journal/changes.ts";
import { parseFileName, QUARANTINE_DIR } from "../journal/maildir.ts";
import { listUsers } from "../journal/scanner.ts";

const require = createRequire(import.meta.url);
const libmime = require("libmime") as { decodeWords(s: string): string };

export const LIST_MAX = 100_000;
export const HEAD_BYTES_MAX = 64 * 1024;
export const EXPIRE_MAX = 100_000;
export const QUARANTINE_KIND = "quarantine";

/** What the journal says of a held message: a hold is SMTP's delivery line, or the split-brain merge's copy. */
export type QuarantineAction = "hold" | "release" | "delete";

export const quarantineKind = z.strictObject({
  user: z.string().min(1).max(320),
  key: z.string().min(1).max(512),
  action: z.enum(["hold", "release", "delete"]),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  reason: z.string().max(64).optional(),
});
registerKind(QUARANTINE_KIND, quarantineKind);

/** One held message, as a listing shows it. */
export interface Held {
  readonly user: string;
  /** Its Maildir key (the file name without `:2,`): what release and delete take. */
  readonly key: string;
  readonly file: string;
  readonly size: number;
  /** When it was held (the file's mtime). */
  readonly held: string;
  readonly from: string;
  readonly subject: string;
  readonly date: string;
  readonly probability: string;
  readonly signature: string;
}

/** `<mailRoot>/<domain>/<local>/quarantine` of USER (an address). */
export function quarantineDirOf(mailRoot: string, user: string): string {
  const at = user.lastIndexOf("@");
  if (at <= 0) throw new Error(`not an address: ${user}`);
  return join(mailRoot, user.slice(at + 1), user.slice(0, at), QUARANTINE_DIR);
}

function names(dir: string): string[] {
  try {
    return readdirSync(dir).filter((n) => !n.startsWith("."));
  } catch {
    return [];
  }
}

/** The header block of FILE (at most HEAD_BYTES_MAX), its fields unfolded, names lower-cased (first of each). */
export function headFields(file: string): Map<string, string> {
  const buf = Buffer.alloc(HEAD_BYTES_MAX);
  const fd = openSync(file, "r");
  let n: number;
  try {
    n = readSync(fd, buf, 0, HEAD_BYTES_MAX, 0);
  } finally {
    closeSync(fd);
  }
  return headFieldsOf(buf.subarray(0, n));
}

/** The header block at the start of HEAD (a message's first bytes), as headFields. */
export function headFieldsOf(head: Buffer): Map<string, string> {
  const text = head.toString("utf8");
  const end = text.search(/\r?\n\r?\n/);
  const lines = (end >= 0 ? text.slice(0, end) : text).split(/\r?\n/);
  const out = new Map<string, string>();
  let name = "";
  let value = "";
  const flush = () => {
    if (name && !out.has(name)) out.set(name, value.trim());
  };
  for (const l of lines) {
    if (/^[ \t]/.test(l)) {
      value += " " + l.trim();
      continue;
    }
    flush();
    const i = l.indexOf(":");
    name = i > 0 ? l.slice(0, i).trim().toLowerCase() : "";
    value = i > 0 ? l.slice(i + 1) : "";
  }
  flush();
  return out;
}

export const decoded = (v: string | undefined): string => {
  if (!v) return "";
  try {
    return libmime.decodeWords(v);
  } catch {
    return v;
  }
};

function heldOf(user: string, dir: string, name: string): Held | null {
  const file = join(dir, "new", name);
  let st;
  try {
    st = statSync(file);
    if (!st.isFile()) return null;
  } catch {
    return null;
  }
  const f = headFields(file);
  return {
    user,
    key: parseFileName(name).key,
    file,
    size: st.size,
    held: st.mtime.toISOString(),
    from: decoded(f.get("from")),
    subject: decoded(f.get("subject")),
    date: f.get("date") ?? "",
    probability: f.get("x-dspam-probability") ?? "",
    signature: f.get("x-dspam-signature") ?? "",
  };
}

/** What MAILROOT holds in quarantine (USER's only, when given), oldest first; at most LIST_MAX. */
export function listHeld(mailRoot: string, user?: string): Held[] {
  const users = user ? [user.toLowerCase()] : listUsers(mailRoot).map((u) => u.address);
  const out: Held[] = [];
  for (const u of users) {
    const dir = quarantineDirOf(mailRoot, u);
    for (const n of names(join(dir, "new"))) {
      if (out.length >= LIST_MAX) return sortHeld(out);
      const h = heldOf(u, dir, n);
      if (h) out.push(h);
    }
  }
  return sortHeld(out);
}

const sortHeld = (l: Held[]) => l.sort((a, b) => (a.held < b.held ? -1 : a.held > b.held ? 1 : a.key < b.key ? -1 : a.key > b.key ? 1 : 0));

/** USER's held message KEY, or null. */
export function findHeld(mailRoot: string, user: string, key: string): Held | null {
  const dir = quarantineDirOf(mailRoot, user.toLowerCase());
  for (const n of names(join(dir, "new"))) if (parseFileName(n).key === key) return heldOf(user.toLowerCase(), dir, n);
  return null;
}

export class NotHeld extends Error {}

export interface QuarantineTarget {
  /** `<dataDir>/mail` of the active node's volume. */
  readonly mailRoot: string;
  /** Where the action is journaled before it is done (null: not journaled, tests only). */
  readonly journal: Pick<ChangeJournal, "append"> | null;
}

function sha256Of(file: string): string {
  return createHash("sha256").update(readFileSync(file)).digest("hex");
}

/**
 * Releases USER's held message KEY into their INBOX (new/, the same file name and
 * bytes), journaled first. Returns the message's bytes (for the caller's retraining)
 * and where it went. Throws NotHeld when there is no such message.
 */
export async function releaseHeld(t: QuarantineTarget, user: string, key: string): Promise<{ held: Held; file: string; body: Buffer }> {
  const h = findHeld(t.mailRoot, user, key);
  if (!h) throw new NotHeld(`${user} has no message ${key} in quarantine (see mailha spam quarantine list --user ${user})`);
  const body = readFileSync(h.file);
  const sha256 = createHash("sha256").update(body).digest("hex");
  const inboxNew = join(dirname(dirname(dirname(h.file))), "Maildir", "new");
  if (!existsSync(inboxNew)) throw new Error(`${user}'s INBOX (${inboxNew}) is missing: not released`);
  await t.journal?.append(QUARANTINE_KIND, { user: h.user, key, action: "release", sha256 });
  const dest = join(inboxNew, h.file.slice(dirname(h.file).length + 1));
  renameSync(h.file, dest);
  fsyncPath(inboxNew);
  fsyncPath(dirname(h.file));
  return { held: h, file: dest, body };
}

/** Deletes USER's held message KEY (journaled first); REASON says why (`user`, `expired`). */
export async function deleteHeld(t: QuarantineTarget, user: string, key: string, reason = "user"): Promise<Held> {
  const h = findHeld(t.mailRoot, user, key);
  if (!h) throw new NotHeld(`${user} has no message ${key} in quarantine (see mailha spam quarantine list --user ${user})`);
  await t.journal?.append(QUARANTINE_KIND, { user: h.user, key, action: "delete", sha256: sha256Of(h.file), reason });
  unlinkSync(h.file);
  fsyncPath(dirname(h.file));
  return h;
}

/** Deletes every held message older than DAYS (each journaled first); how many. */
export async function expireHeld(t: QuarantineTarget, days: number, now = new Date()): Promise<number> {
  const before = now.getTime() - days * 86_400_000;
  let n = 0;
  for (const h of listHeld(t.mailRoot)) {
    if (Date.parse(h.held) >= before) break; // oldest first
    if (n >= EXPIRE_MAX) break;
    try {
      await deleteHeld(t, h.user, h.key, "expired");
      n++;
    } catch (err) {
      if (!(err instanceof NotHeld)) throw err; // released or deleted meanwhile
    }
  }
  return n;
}
