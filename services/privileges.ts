// Who runs what, and who owns what on the volume: the system users Debian's packages
// make for MariaDB (`mysql`) and Redis (`redis`), the mail uid of mailha.yaml that SMTP
// drops to after binding its ports (the uid Dovecot gives mail files), and the
// service passwords the daemons on the volume share (0600 files in the volume's etc/).
// Files on the replicated volume are owned by number, and a system user's number may
// differ between the two servers: a daemon's directory is handed to its user at every
// start (cheap when nothing differs).
import { chownSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { fsyncPath, writeFileDurable } from "../common/fsutil.ts";
import { randomBytes } from "node:crypto";

export interface Ids {
  readonly uid: number;
  readonly gid: number;
}

/** A system user's ids from /etc/passwd, or null. */
export function systemUser(name: string): Ids | null {
  let text = "";
  try {
    text = readFileSync("/etc/passwd", "utf8");
  } catch {
    return null;
  }
  for (const line of text.split("\n")) {
    const f = line.split(":");
    if (f[0] === name && f.length >= 4) return { uid: Number(f[2]), gid: Number(f[3]) };
  }
  return null;
}

/** USER's ids; throws naming the Debian package that creates it. */
export function requireSystemUser(user: string, debianPackage: string): Ids {
  const ids = systemUser(user);
  if (!ids) throw new Error(`the system user "${user}" does not exist; it comes with Debian's ${debianPackage} package (run: mailha setup)`);
  return ids;
}

export const isRoot = (): boolean => process.getuid?.() === 0;

/** At most this many entries are looked at per tree (a spool, a datadir). */
const TREE_ENTRIES_MAX = 1_000_000;

/**
 * Hands DIR and everything below it to IDS where the owner differs (links themselves,
 * never followed). Children first, DIR last, so an interrupted run is redone at the next
 * start. Returns the number of entries changed. Does nothing unless run as root.
 */
export function chownTree(dir: string, ids: Ids, entriesMax = TREE_ENTRIES_MAX): number {
  if (!isRoot() || !existsSync(dir)) return 0;
  let changed = 0;
  let seen = 0;
  const walk = (path: string): void => {
    if (++seen > entriesMax) throw new Error(`${dir} has more than ${entriesMax} entries; hand it to uid ${ids.uid} by hand (chown -R ${ids.uid}:${ids.gid} ${dir})`);
    const st = lstatSync(path);
    if (st.isDirectory()) for (const e of readdirSync(path)) walk(join(path, e));
    if (st.uid !== ids.uid || st.gid !== ids.gid) {
      chownSync(path, ids.uid, ids.gid);
      changed++;
    }
  };
  walk(dir);
  return changed;
}

/** Owner and group of PATH, or null when it does not exist. */
export function ownerOf(path: string): Ids | null {
  try {
    const st = statSync(path);
    return { uid: st.uid, gid: st.gid };
  } catch {
    return null;
  }
}

/**
 * Gives up root for good: no supplementary groups, then the group, then the user (in
 * that order: after setuid nothing else may be changed). Throws if root could be taken
 * back.
 */
export function dropPrivileges(ids: Ids): void {
  if (ids.uid === 0 || ids.gid === 0) throw new Error(`refusing to "drop" to uid ${ids.uid} gid ${ids.gid}: that is root`);
  process.setgroups?.([]);
  process.setgid?.(ids.gid);
  process.setuid?.(ids.uid);
  let regained = false;
  try {
    process.setuid?.(0);
    regained = true;
  } catch {
    // expected: root is gone
  }
  if (regained || process.getuid?.() !== ids.uid || process.getgid?.() !== ids.gid) throw new Error(`could not drop root to uid ${ids.uid} gid ${ids.gid}`);
}

/**
 * The service password NAME in DIR (the volume's etc/: both nodes use the same one),
 * created once (random, 0600, durable) and read from then on.
 */
export function serviceSecret(dir: string, name: string): string {
  if (!existsSync(dir)) {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    fsyncPath(join(dir, ".."));
  }
  const f = join(dir, name);
  if (!existsSync(f)) writeFileDurable(f, randomBytes(18).toString("base64url"), 0o600);
  return readServiceSecret(f);
}

/** Reads a service password file; the error names the file and what is wrong. */
export function readServiceSecret(file: string): string {
  let text: string;
  try {
    text = readFileSync(file, "utf8").trim();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new Error(`cannot read the service password ${file} (${code === "ENOENT" ? "missing: the resource that owns it creates it at its start" : code === "EACCES" ? "permission denied: it is root's, read it as root" : code})`);
  }
  if (!text) throw new Error(`the service password ${file} is empty`);
  return text;
}
