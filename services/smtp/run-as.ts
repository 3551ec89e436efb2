// Who SMTP runs as: it starts as root only to bind 25, 587 and 465, then runs as the
// mail uid and gid of mailha.yaml (`mail.mail_uid`, default 5000), the owner Dovecot
// gives every mail file, the same number on both servers (files on the replicated
// volume are owned by number). Before it drops root it hands over what it writes
// afterwards: the outbound spool (messages, bounces), the backup MX's spool it drains,
// and the delivery journals (its own it writes, every node's it reads for the delivered
// index). The journal directory is root's, group mail, 1770: SMTP makes its own change
// journal segments there (the spam filter's deltas) and, the directory being sticky,
// cannot remove or replace anyone else's; the change journal's other files stay root's
// (0600). Maildirs are the mail uid's already (Dovecot and
// maildir.ts make them so). What it reads as root first and keeps: the TLS key, the
// MariaDB and Redis passwords; MariaDB's and Redis's sockets let the mail group in.
import { chmodSync, chownSync, existsSync, mkdirSync, readdirSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import type { NodePaths } from "../../common/paths.ts";
import { chownTree, dropPrivileges, isRoot, type Ids } from "../privileges.ts";
import { spoolDir } from "./backup-mx.ts";
import { JOURNAL_FILE_RE, journalDir } from "./journal.ts";

/** The outbound queue's message files (outbound.ts). */
export const outboundDir = (paths: NodePaths): string => join(paths.data, "outbound");

/** Hands SMTP's files to IDS (root only; runs before the journal and the queue open). */
export function prepareSmtpFiles(paths: NodePaths, ids: Ids, log: Logger): void {
  if (!isRoot()) return;
  const out = outboundDir(paths);
  mkdirSync(out, { recursive: true, mode: 0o700 });
  const changed = chownTree(out, ids) + chownTree(spoolDir(paths), ids);
  const jd = journalDir(paths.data);
  mkdirSync(jd, { recursive: true, mode: 0o750 });
  chownSync(jd, 0, ids.gid);
  chmodSync(jd, 0o1770);
  let journals = 0;
  for (const f of readdirSync(jd)) if (JOURNAL_FILE_RE.test(f)) journals += chownTree(join(jd, f), ids);
  const mail = join(paths.data, "mail");
  if (existsSync(mail)) chownSync(mail, ids.uid, ids.gid);
  if (changed || journals) log.info({ uid: ids.uid, gid: ids.gid, spool_entries: changed, journal_files: journals }, "handed SMTP's files to the mail uid");
}

/** Gives up root (after the listeners are bound); logs who SMTP runs as now. */
export function dropToMailUser(ids: Ids, log: Logger): void {
  dropPrivileges(ids);
  log.info({ uid: ids.uid, gid: ids.gid }, "smtp dropped root: runs as the mail uid");
}
