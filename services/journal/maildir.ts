// How Dovecot keeps a user's mail in Maildir++ (read-only here): flags in file names
// (`<base>:2,<letters>`, keywords as letters a-z mapped in `dovecot-keywords`), UIDs
// and the mailbox GUID in `dovecot-uidlist` (`3 V<uidvalidity> N<nextuid> G<guid>`,
// then `<uid> [fields] :<base>`), folders as `.A.B` directories (names in modified
// UTF-7, `.` between levels), subscriptions in `subscriptions` (`V\t2`, a blank line,
// then one name a line with tabs between levels). Every reader here tolerates a file
// Dovecot is replacing (it writes to a lock file and renames): a missing file is empty.
import { closeSync, openSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { join } from "node:path";

export const INBOX_DIR = "";
/** Junk's folder directory: where SMTP files spam (services/spam/at-delivery.ts). */
export const JUNK_DIR = ".Junk";
/**
 * The spam quarantine's directory: beside the Maildir (`<home>/quarantine`, with tmp/
 * and new/), outside Dovecot's folders, so no IMAP or POP3 client sees it
 * (services/spam/quarantine.ts). SMTP delivers into it when a user's spam_action is
 * quarantine; its journal line names `<domain>/<local>/quarantine/new/<name>`.
 */
export const QUARANTINE_DIR = "quarantine";
/** The folders SMTP delivers into (its journal names them; the scanner must not take them for a client's). */
export const SMTP_DIRS: ReadonlySet<string> = new Set([INBOX_DIR, JUNK_DIR]);

/** `<base>:2,<letters>` -> key and flag letters (a file still in new/ has none). */
export function parseFileName(fname: string): { key: string; letters: string } {
  const i = fname.indexOf(":");
  if (i < 0) return { key: fname, letters: "" };
  const info = fname.slice(i + 1);
  return { key: fname.slice(0, i), letters: info.startsWith("2,") ? [...info.slice(2)].sort().join("") : "" };
}

const SYSTEM_FLAGS: Record<string, string> = { D: "\\Draft", F: "\\Flagged", R: "\\Answered", S: "\\Seen", T: "\\Deleted" };

/** The IMAP flags and keywords that LETTERS stand for (sorted; `P` is Maildir's "passed", not an IMAP flag). */
export function flagNames(letters: string, keywords: readonly string[]): string[] {
  const out: string[] = [];
  for (const l of letters) {
    if (l >= "a" && l <= "z") {
      const k = keywords[l.charCodeAt(0) - 97];
      if (k) out.push(k);
    } else {
      const f = SYSTEM_FLAGS[l];
      if (f) out.push(f);
    }
  }
  return out.sort();
}

function readText(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return "";
    throw err;
  }
}

/** dovecot-keywords of the mailbox in DIR: index -> keyword. */
export function readKeywords(dir: string): string[] {
  const out: string[] = [];
  for (const line of readText(join(dir, "dovecot-keywords")).split("\n")) {
    const m = /^(\d+) (.+)$/.exec(line);
    if (m && Number(m[1]) < 26) out[Number(m[1])] = m[2]!;
  }
  return out;
}

export interface UidlistHeader {
  readonly guid: string | null;
  readonly uidvalidity: number | null;
}

function parseHeader(line: string): UidlistHeader {
  if (!line.startsWith("3 ")) return { guid: null, uidvalidity: null };
  const g = / G([0-9a-f]{32})(?: |$)/.exec(line);
  const v = / V(\d+)(?: |$)/.exec(line);
  return { guid: g ? g[1]! : null, uidvalidity: v ? Number(v[1]) : null };
}

/** The first line of dovecot-uidlist only (the mailbox's identity). */
export function readUidlistHeader(dir: string): UidlistHeader {
  const text = readHead(join(dir, "dovecot-uidlist"), 256);
  return parseHeader(text.split("\n")[0] ?? "");
}

function readHead(path: string, bytes: number): string {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return "";
    throw err;
  }
  try {
    const buf = Buffer.alloc(bytes);
    return buf.subarray(0, readSync(fd, buf, 0, bytes, 0)).toString("utf8");
  } finally {
    closeSync(fd);
  }
}

/** The whole dovecot-uidlist: header and key -> uid. */
export function readUidlist(dir: string): UidlistHeader & { uids: Map<string, number> } {
  const lines = readText(join(dir, "dovecot-uidlist")).split("\n");
  const uids = new Map<string, number>();
  for (let i = 1; i < lines.length; i++) {
    const l = lines[i]!;
    const sp = l.indexOf(" ");
    const colon = l.indexOf(" :");
    if (sp < 1 || colon < 0) continue;
    const uid = Number(l.slice(0, sp));
    if (!Number.isInteger(uid) || uid <= 0) continue;
    uids.set(parseFileName(l.slice(colon + 2)).key, uid);
  }
  return { ...parseHeader(lines[0] ?? ""), uids };
}

/** Modified UTF-7 (RFC 3501 5.1.3) to UTF-8. */
export function decodeMutf7(s: string): string {
  return s.replace(/&([^-]*)-/g, (_, b64: string) => {
    if (b64 === "") return "&";
    const bytes = Buffer.from(b64.replace(/,/g, "/"), "base64");
    let out = "";
    for (let i = 0; i + 1 < bytes.length; i += 2) out += String.fromCharCode((bytes[i]! << 8) | bytes[i + 1]!);
    return out;
  });
}

/** A folder directory (`.A.B`, or "" for the Maildir root) -> its IMAP name (`A/B`, `INBOX`). */
export function folderName(dir: string): string {
  if (dir === INBOX_DIR) return "INBOX";
  return decodeMutf7(dir.slice(1)).split(".").join("/");
}

/** The folder directories of a Maildir (the root first), each with cur/ inside. */
export function listFolders(maildir: string): string[] {
  const out = [INBOX_DIR];
  let names: string[];
  try {
    names = readdirSync(maildir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
  for (const n of names.sort()) {
    // `..DOVECOT-TRASHED` and the like are Dovecot's deletions in progress.
    if (!n.startsWith(".") || n === "." || n === ".." || n.startsWith("..") || n.includes("DOVECOT-TRASHED")) continue;
    try {
      if (statSync(join(maildir, n, "cur")).isDirectory()) out.push(n);
    } catch {
      // not a mailbox (or going away)
    }
  }
  return out;
}

/** The subscribed names (IMAP form, `/` between levels); empty without the file. */
export function readSubscriptions(maildir: string): string[] {
  const lines = readText(join(maildir, "subscriptions")).split("\n");
  let start = 0;
  if (lines[0]?.startsWith("V\t")) start = lines[1] === "" ? 2 : 1;
  const out = new Set<string>();
  for (const l of lines.slice(start)) if (l) out.add(l.split("\t").join("/"));
  return [...out].sort();
}

/** The directory of the folder DIR inside MAILDIR. */
export function folderPath(maildir: string, dir: string): string {
  return dir === INBOX_DIR ? maildir : join(maildir, dir);
}
