// The Maildir scanner: compares what is on disk for a user (folders, subscriptions,
// every message's flags) with what was last journaled (scan-state.ts) and turns the
// differences into journal entries: flags, expunge, append, copy, move,
// mailbox-create/rename/delete, subscribe/unsubscribe. The Maildir is the truth, so a
// scan after any crash, restart or failover finds whatever changed while nobody
// watched. One round: scan the user's dirty folders, match appearances against
// disappearances (a move keeps the file name and inode: Dovecot hard-links), against
// SMTP's deliveries (already journaled by SMTP: nothing to add) and against the other
// folders (a copy: same name, a second link); journal the entries (one commit); only
// then write the new states.
//
// Stamps: a change found by a scan is stamped at its file's ctime (a rename or link
// sets it, so it is close to the real change), or just after the last stamp when that
// is later; see ChangeJournal.appendMany's atMs.
// Known gaps: a message that appears and goes between two scans leaves nothing (the
// pair would cancel out); a message copied without a hard link (another file system)
// is journaled as an `append` with its sha256; a move whose two halves land in
// different rounds is a `copy` and an `expunge` (the reconciler treats them alike).
// A flag changed and changed back between two scans leaves nothing.
import { createHash } from "node:crypto";
import { createReadStream, readdirSync, statSync, type Stats } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import type { AppendRequest, ChangeJournal } from "./changes.ts";
import "./kinds.ts";
import type { DeliveryIndex } from "./deliveries.ts";
import { flagNames, folderName, folderPath, INBOX_DIR, listFolders, SMTP_DIRS, parseFileName, readKeywords, readSubscriptions, readUidlist, readUidlistHeader } from "./maildir.ts";
import { emptyMailboxState, type MailboxState, type MsgState, type ScanStore, type UserState } from "./scan-state.ts";

/** A file seen in new/ that no delivery line names yet is left for this long (SMTP journals right after its rename). */
export const DELIVERY_GRACE_MS = 3000;
/** A directory whose mtime is this close to the scan may change again within the same tick: scanned again. */
export const RACY_MS = 2000;
/**
 * A hard link whose original is still in its folder is this young: perhaps an IMAP
 * MOVE half done (Dovecot links into the target, then unlinks the source), looked at
 * again after this long, with the source folder, so that it is journaled as one move.
 */
export const COPY_GRACE_MS = 1000;
/** The folder pairs of copies waiting out COPY_GRACE_MS, at most this many (the oldest dropped: then scanned apart). */
const PAIRS_MAX = 10_000;

export interface ScanContext {
  readonly mailRoot: string;
  readonly store: ScanStore;
  readonly journal: ChangeJournal;
  readonly deliveries: DeliveryIndex;
  readonly log?: Logger;
  readonly now?: () => number;
  /**
   * Per user, the folders of copies waiting out COPY_GRACE_MS (target and source): a
   * round that scans one of them scans the other too, so the source's unlink and the
   * target's link are seen together. In memory: after a restart the catch-up scans
   * every folder that moved in one round anyway.
   */
  readonly pairs?: Map<string, Set<string>>;
}

/** A user's mail: `<mailRoot>/<domain>/<local>/Maildir`. */
export interface UserRef {
  /** `domain/local` */
  readonly rel: string;
  /** `local@domain` */
  readonly address: string;
  readonly maildir: string;
}

export function userRef(mailRoot: string, domain: string, local: string): UserRef {
  return { rel: `${domain}/${local}`, address: `${local}@${domain}`, maildir: join(mailRoot, domain, local, "Maildir") };
}

/** Every user with a Maildir under MAILROOT. */
export function listUsers(mailRoot: string): UserRef[] {
  const out: UserRef[] = [];
  for (const domain of safeReaddir(mailRoot).sort()) {
    if (domain.startsWith(".")) continue;
    for (const local of safeReaddir(join(mailRoot, domain)).sort()) {
      if (local.startsWith(".")) continue;
      const u = userRef(mailRoot, domain, local);
      if (isDir(u.maildir)) out.push(u);
    }
  }
  return out;
}

/** The names in DIR (sorted), none when it is gone. */
export function safeReaddir(dir: string): string[] {
  try {
    return readdirSync(dir).sort();
  } catch {
    return [];
  }
}

export function isDir(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}

function statOrNull(p: string): Stats | null {
  try {
    return statSync(p);
  } catch {
    return null;
  }
}

function mtimeNs(p: string): string {
  try {
    return String(statSync(p, { bigint: true }).mtimeNs);
  } catch {
    return "";
  }
}

function uidlistStamp(dir: string): string {
  const s = statOrNull(join(dir, "dovecot-uidlist"));
  return s ? `${s.mtimeMs}:${s.size}` : "";
}

async function sha256Of(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest("hex");
}

/** What a round found in one folder. */
interface Appeared {
  readonly dir: string;
  readonly key: string;
  readonly fname: string;
  readonly sub: "cur" | "new";
  readonly letters: string;
  readonly ino: number;
  readonly nlink: number;
  readonly size: number;
  readonly ctimeMs: number;
}
interface Disappeared {
  readonly dir: string;
  readonly key: string;
  readonly m: MsgState;
}

interface Change extends AppendRequest {
  readonly atMs: number;
}

/** Why a folder is scanned: a watch said so, the sweep saw its mtimes move, or everything. */
export type Dirty = ReadonlySet<string> | "all";

export interface UserRoundResult {
  readonly changes: number;
  readonly scanned: number;
  /** Folders to scan again later (files left for SMTP's journal line), with when. */
  readonly retry: { dir: string; atMs: number }[];
  readonly folders: readonly string[];
}

/**
 * One user's round: scans the folders in DIRTY (and the folder list and subscriptions
 * when ROOTDIRTY), journals what changed, then saves the states. BASELINE journals
 * nothing (the first scan of a tree: what is there already is not a change).
 */
export async function scanUser(ctx: ScanContext, u: UserRef, dirty: Dirty, rootDirty: boolean, baseline = false): Promise<UserRoundResult> {
  const now = ctx.now ?? Date.now;
  const changes: Change[] = [];
  const emit = (kind: string, payload: Record<string, unknown>, atMs: number) => {
    if (!baseline) changes.push({ kind, payload, atMs });
  };
  const oldUser = ctx.store.loadUser(u.rel);
  if (!isDir(u.maildir)) {
    // The Maildir went away (removed by hand after `user del`): nothing to journal.
    if (oldUser) ctx.store.removeUser(u.rel);
    return { changes: 0, scanned: 0, retry: [], folders: [] };
  }
  const newUser: UserState = oldUser ? { ...oldUser, folders: { ...oldUser.folders } } : { v: 1, folders: {}, subs: [], subsMt: "" };
  const toScan = new Set<string>(dirty === "all" ? [] : [...dirty]);
  const renamedFrom = new Map<string, string>();
  const removedDirs: string[] = [];
  /** Folders deleted and made again: their new state starts empty (saved over the old at the commit). */
  const recreated = new Set<string>();
  const rootMs = statOrNull(u.maildir)?.mtimeMs ?? now();
  // A deleted folder's messages go first, one expunge each: the merge then knows what
  // the delete took (and what the other side added there since).
  const expungeAll = (dir: string, f: { guid: string | null; name: string }, atMs: number) => {
    for (const [key, m] of ctx.store.loadMailbox(u.rel, dir)?.msgs ?? []) emit("expunge", { user: u.address, mailbox: f.guid, name: f.name, key, uid: m[1] }, atMs);
  };

  // ---- folders and subscriptions ----
  if (rootDirty || !oldUser || dirty === "all") {
    const onDisk = listFolders(u.maildir);
    const disk = new Map(onDisk.map((d) => [d, readUidlistHeader(folderPath(u.maildir, d)).guid]));
    const gone = Object.keys(newUser.folders).filter((d) => !disk.has(d));
    for (const [dir, guid] of disk) {
      const known = newUser.folders[dir];
      const st = statOrNull(folderPath(u.maildir, dir));
      if (known && known.guid && guid && known.guid !== guid) {
        // Deleted and created again under the same name between two scans.
        expungeAll(dir, known, rootMs);
        emit("mailbox-delete", { user: u.address, guid: known.guid, name: known.name }, rootMs);
        recreated.add(dir);
        delete newUser.folders[dir];
      } else if (known) {
        if (!known.guid && guid) newUser.folders[dir] = { ...known, guid };
        continue;
      }
      const from = guid ? gone.find((g) => newUser.folders[g]?.guid === guid) : undefined;
      if (from !== undefined) {
        emit("mailbox-rename", { user: u.address, guid, from: newUser.folders[from]!.name, name: folderName(dir) }, st?.ctimeMs ?? rootMs);
        renamedFrom.set(dir, from);
        gone.splice(gone.indexOf(from), 1);
        delete newUser.folders[from];
      } else if (dir !== INBOX_DIR) {
        emit("mailbox-create", { user: u.address, guid, name: folderName(dir) }, st?.birthtimeMs || st?.ctimeMs || rootMs);
      }
      newUser.folders[dir] = { guid, name: folderName(dir) };
      toScan.add(dir);
    }
    for (const dir of gone) {
      const f = newUser.folders[dir]!;
      if (dir !== INBOX_DIR) {
        expungeAll(dir, f, rootMs);
        emit("mailbox-delete", { user: u.address, guid: f.guid, name: f.name }, rootMs);
      }
      delete newUser.folders[dir];
      removedDirs.push(dir);
      toScan.delete(dir);
    }
    const subsPath = join(u.maildir, "subscriptions");
    const subsMt = mtimeNs(subsPath);
    if (subsMt !== newUser.subsMt) {
      const subs = readSubscriptions(u.maildir);
      const at = statOrNull(subsPath)?.mtimeMs ?? now();
      const was = new Set(newUser.subs);
      const is = new Set(subs);
      for (const n of subs) if (!was.has(n)) emit("subscribe", { user: u.address, name: n }, at);
      for (const n of newUser.subs) if (!is.has(n)) emit("unsubscribe", { user: u.address, name: n }, at);
      newUser.subs = subs;
      newUser.subsMt = subsMt;
    }
  }
  if (dirty === "all") for (const d of Object.keys(newUser.folders)) toScan.add(d);
  const paired = ctx.pairs?.get(u.rel);
  if (paired && [...toScan].some((d) => paired.has(d))) for (const d of paired) toScan.add(d);
  for (const d of [...toScan]) if (!newUser.folders[d]) toScan.delete(d);
  let waiting = false;

  // ---- the folders' messages ----
  const appeared: Appeared[] = [];
  const disappeared = new Map<string, Disappeared[]>();
  const newStates = new Map<string, MailboxState>();
  const seenKeys = new Set<string>();
  for (const dir of toScan) {
    const path = folderPath(u.maildir, dir);
    const info = newUser.folders[dir]!;
    const prev = (recreated.has(dir) ? null : ctx.store.loadMailbox(u.rel, renamedFrom.get(dir) ?? dir)) ?? emptyMailboxState();
    const scannedAtMs = now();
    // mtimes before the listing: a change after it moves them and is seen next time.
    const mt = { cur: mtimeNs(join(path, "cur")), new: mtimeNs(join(path, "new")), uidlist: uidlistStamp(path) };
    // new/ before cur/: Dovecot only moves new -> cur, so no file is missed between them.
    const listing = new Map<string, { fname: string; sub: "cur" | "new"; letters: string }>();
    for (const sub of ["new", "cur"] as const) {
      for (const fname of safeReaddir(join(path, sub))) {
        if (fname.startsWith(".")) continue;
        const p = parseFileName(fname);
        listing.set(p.key, { fname, sub, letters: p.letters });
      }
    }
    const keywords = readKeywords(path);
    let uids: Map<string, number> | null = null;
    let head = { guid: prev.guid ?? info.guid, uidvalidity: prev.uidvalidity };
    if (mt.uidlist !== prev.mt.uidlist) {
      const ul = readUidlist(path);
      uids = ul.uids;
      head = { guid: ul.guid ?? head.guid, uidvalidity: ul.uidvalidity ?? head.uidvalidity };
    }
    // UIDVALIDITY changed: Dovecot renumbered (the old UIDs mean nothing any more).
    const renumbered = prev.uidvalidity !== null && head.uidvalidity !== null && prev.uidvalidity !== head.uidvalidity;
    if (head.guid && !info.guid) newUser.folders[dir] = { ...info, guid: head.guid };
    const guid = newUser.folders[dir]!.guid;
    const msgs = new Map<string, MsgState>();
    for (const [key, f] of listing) {
      const old = prev.msgs.get(key);
      const uid = uids?.get(key) ?? (renumbered ? null : (old?.[1] ?? null));
      if (!old) {
        const st = statOrNull(join(path, f.sub, f.fname));
        if (!st) continue; // gone since the listing: the next round sees it (or not)
        appeared.push({ dir, key, fname: f.fname, sub: f.sub, letters: f.letters, ino: st.ino, nlink: st.nlink, size: st.size, ctimeMs: st.ctimeMs });
        msgs.set(key, [f.letters, uid, st.ino, st.size]);
        continue;
      }
      seenKeys.add(key);
      msgs.set(key, [f.letters, uid, old[2], old[3]]);
      if (old[0] === f.letters && sameKeywords(old[0], prev.keywords, keywords)) continue;
      const before = flagNames(old[0], prev.keywords);
      const after = flagNames(f.letters, keywords);
      const add = after.filter((x) => !before.includes(x));
      const remove = before.filter((x) => !after.includes(x));
      if (!add.length && !remove.length) continue;
      const at = statOrNull(join(path, f.sub, f.fname))?.ctimeMs ?? scannedAtMs;
      emit("flags", { user: u.address, mailbox: guid, name: info.name, key, uid, add, remove, flags: after }, at);
    }
    for (const [key, m] of prev.msgs) {
      if (listing.has(key)) continue;
      const list = disappeared.get(key) ?? [];
      list.push({ dir, key, m });
      disappeared.set(key, list);
    }
    newStates.set(dir, { v: 1, guid, uidvalidity: head.uidvalidity, mt, scannedAtMs, keywords, msgs });
  }

  // ---- appearances: moves, deliveries, copies, appends ----
  const retry: { dir: string; atMs: number }[] = [];
  const ref = (dir: string, key: string, uid: number | null) => ({ mailbox: newUser.folders[dir]?.guid ?? null, name: newUser.folders[dir]?.name ?? folderName(dir), key, uid });
  const oldRef = (dir: string, key: string, uid: number | null) => {
    const f = newUser.folders[dir] ?? oldUser?.folders[dir];
    return { mailbox: f?.guid ?? null, name: f?.name ?? folderName(dir), key, uid };
  };
  /** The content hash, or null when the file went meanwhile (renamed for flags, expunged): the next round decides. */
  const hashOrNull = async (a: Appeared): Promise<string | null> => {
    try {
      return await sha256Of(join(folderPath(u.maildir, a.dir), a.sub, a.fname));
    } catch {
      newStates.get(a.dir)!.msgs.delete(a.key);
      retry.push({ dir: a.dir, atMs: now() });
      return null;
    }
  };
  const copyPayload = (from: ReturnType<typeof ref>, a: Appeared, uid: number | null, flags: string[], sha256: string) => {
    const to = ref(a.dir, a.key, uid);
    return { user: u.address, from: from.mailbox, fromName: from.name, fromUid: from.uid, key: from.key, to: to.mailbox, toName: to.name, newKey: a.key, uid, flags, size: a.size, sha256 };
  };
  appeared.sort((a, b) => a.ctimeMs - b.ctimeMs);
  for (const a of appeared) {
    const st = newStates.get(a.dir)!;
    const m = st.msgs.get(a.key)!;
    const flags = flagNames(a.letters, st.keywords);
    const gone = disappeared.get(a.key)?.find((d) => d.dir !== a.dir);
    if (gone) {
      // Without its content (it went meanwhile) the source's half stays an expunge.
      const sha256 = await hashOrNull(a);
      if (!sha256) continue;
      disappeared.set(a.key, disappeared.get(a.key)!.filter((d) => d !== gone));
      emit("move", copyPayload(oldRef(gone.dir, a.key, gone.m[1]), a, m[1], flags, sha256), a.ctimeMs);
      continue;
    }
    const delivered = ctx.deliveries.take(u.rel, a.key);
    if (delivered) {
      // SMTP journaled it into its folder (INBOX, or Junk by the spam filter); found
      // elsewhere, a client moved it before any scan.
      if (a.dir !== delivered.dir) emit("move", copyPayload(ref(delivered.dir, a.key, null), a, m[1], flags, delivered.sha256), a.ctimeMs);
      continue;
    }
    const source = a.nlink > 1 || seenKeys.has(a.key) ? findCopySource(ctx, u, newUser, newStates, a) : null;
    if (source && !baseline && ctx.pairs && now() - a.ctimeMs < COPY_GRACE_MS) {
      // Its original is still there: a copy, or a move whose unlink is about to come.
      st.msgs.delete(a.key);
      retry.push({ dir: a.dir, atMs: a.ctimeMs + COPY_GRACE_MS });
      let set = ctx.pairs.get(u.rel);
      if (!set) {
        if (ctx.pairs.size >= PAIRS_MAX) ctx.pairs.delete(ctx.pairs.keys().next().value!);
        ctx.pairs.set(u.rel, (set = new Set()));
      }
      set.add(a.dir).add(source.dir);
      waiting = true;
      continue;
    }
    if (source) {
      const sha256 = await hashOrNull(a);
      if (sha256) emit("copy", copyPayload(ref(source.dir, a.key, source.uid), a, m[1], flags, sha256), a.ctimeMs);
      continue;
    }
    if (!baseline && a.sub === "new" && SMTP_DIRS.has(a.dir) && now() - a.ctimeMs < DELIVERY_GRACE_MS) {
      // Perhaps SMTP's delivery, whose journal line is being written: look again later.
      st.msgs.delete(a.key);
      retry.push({ dir: a.dir, atMs: a.ctimeMs + DELIVERY_GRACE_MS });
      continue;
    }
    if (baseline) continue;
    const sha256 = await hashOrNull(a);
    if (sha256) emit("append", { user: u.address, ...ref(a.dir, a.key, m[1]), flags, size: a.size, sha256 }, a.ctimeMs);
  }
  for (const list of disappeared.values()) {
    for (const d of list) {
      const st = newStates.get(d.dir)!;
      const at = Math.max(Number(BigInt(st.mt.cur || "0") / 1_000_000n), Number(BigInt(st.mt.new || "0") / 1_000_000n)) || now();
      emit("expunge", { user: u.address, ...oldRef(d.dir, d.key, d.m[1]) }, at);
    }
  }
  // SMTP's deliveries no scan matched: already in a state (found after the grace,
  // journaled as an append), or delivered and gone before any scan saw them (a quick
  // POP3 client): the latter is an expunge.
  if (!baseline) {
    for (const [key, p] of [...ctx.deliveries.pendingOf(u.rel)]) {
      if (!newStates.has(p.dir) || now() - p.ms < DELIVERY_GRACE_MS) continue;
      ctx.deliveries.take(u.rel, key);
      const somewhere = Object.keys(newUser.folders).some((d) => (newStates.get(d) ?? ctx.store.loadMailbox(u.rel, d))?.msgs.has(key));
      if (!somewhere) emit("expunge", { user: u.address, ...ref(p.dir, key, null) }, p.ms);
    }
  }

  if (!waiting && paired && [...paired].every((d) => toScan.has(d) || !newUser.folders[d])) ctx.pairs?.delete(u.rel);

  // ---- commit: the journal first, then the states ----
  changes.sort((a, b) => a.atMs - b.atMs);
  if (changes.length) await ctx.journal.appendMany(changes);
  await Promise.all([...newStates].map(([dir, s]) => ctx.store.saveMailbox(u.rel, dir, s)));
  for (const from of renamedFrom.values()) if (!newUser.folders[from]) ctx.store.removeMailbox(u.rel, from);
  for (const dir of removedDirs) ctx.store.removeMailbox(u.rel, dir);
  if (!oldUser || JSON.stringify(oldUser) !== JSON.stringify(newUser)) await ctx.store.saveUser(u.rel, newUser);
  return { changes: changes.length, scanned: newStates.size, retry, folders: Object.keys(newUser.folders) };
}

function sameKeywords(letters: string, a: readonly string[], b: readonly string[]): boolean {
  for (const l of letters) {
    if (l < "a" || l > "z") continue;
    const i = l.charCodeAt(0) - 97;
    if (a[i] !== b[i]) return false;
  }
  return true;
}

/** The folder that holds the original of a copy: the same name (Dovecot keeps it), else the same inode. */
function findCopySource(ctx: ScanContext, u: UserRef, user: UserState, scanned: Map<string, MailboxState>, a: Appeared): { dir: string; uid: number | null } | null {
  for (const dir of Object.keys(user.folders)) {
    if (dir === a.dir) continue;
    const s = scanned.get(dir) ?? ctx.store.loadMailbox(u.rel, dir);
    const m = s?.msgs.get(a.key);
    if (m) return { dir, uid: m[1] };
  }
  return null;
}

/**
 * Whether a folder's directories moved since its state (or are too fresh to trust):
 * the sweep's test, three stats a folder.
 */
export function folderMoved(store: ScanStore, u: UserRef, dir: string): boolean {
  const s = store.loadMailbox(u.rel, dir);
  if (!s) return true;
  const path = folderPath(u.maildir, dir);
  const cur = mtimeNs(join(path, "cur"));
  const nw = mtimeNs(join(path, "new"));
  if (cur !== s.mt.cur || nw !== s.mt.new) return true;
  const newest = Number(BigInt(cur || "0") > BigInt(nw || "0") ? BigInt(cur || "0") / 1_000_000n : BigInt(nw || "0") / 1_000_000n);
  return s.scannedAtMs - newest < RACY_MS;
}

/** Whether the user's folder list or subscriptions differ from the state. */
export function rootMoved(store: ScanStore, u: UserRef): boolean {
  const s = store.loadUser(u.rel);
  if (!s) return true;
  if (mtimeNs(join(u.maildir, "subscriptions")) !== s.subsMt) return true;
  const disk = listFolders(u.maildir);
  const known = Object.keys(s.folders);
  return disk.length !== known.length || disk.some((d) => !(d in s.folders));
}
