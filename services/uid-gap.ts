// After `takeover --force` with an Outdated disk (the operator accepted a split brain),
// the other node may have handed out UIDs this side never saw: the same UIDVALIDITY,
// the same numbers, other messages. IMAP forbids reusing a UID (RFC 9051 2.3.1.1), and
// a client that cached the other side's UID N would show the wrong message for it. So
// before Dovecot starts on the forced side, every folder's next UID is raised by
// UID_GAP (more than the other side can have given while apart), and the merge later
// gives the other side's messages new UIDs above. Old UIDs and UIDVALIDITY stay.
// Runs with Dovecot stopped (its dotlocks removed); each dovecot-uidlist is replaced by
// temp file + rename, owner and mode kept. Bounded by the folders on the volume.
import { chownSync, existsSync, readFileSync, renameSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { folderPath, listFolders } from "./journal/maildir.ts";
import { listUsers } from "./journal/scanner.ts";

export const UID_GAP = 100_000;
const UIDLIST_BYTES_MAX = 256 * 1024 * 1024;

/** Raises the next UID of every folder under MAILROOT by GAP; returns how many folders changed. */
export function skipUids(mailRoot: string, gap = UID_GAP): number {
  let changed = 0;
  for (const u of listUsers(mailRoot)) {
    for (const dir of listFolders(u.maildir)) {
      const f = join(folderPath(u.maildir, dir), "dovecot-uidlist");
      if (!existsSync(f)) continue;
      const st = statSync(f);
      if (st.size > UIDLIST_BYTES_MAX) continue;
      const text = readFileSync(f, "utf8");
      const nl = text.indexOf("\n");
      const head = nl < 0 ? text : text.slice(0, nl);
      // Version 3 header: "3 V<uidvalidity> N<next uid> G<guid>".
      const m = /^(3 (?:.* )?)N(\d+)(.*)$/.exec(head);
      if (!m) continue;
      const next = Number(m[2]) + gap;
      const tmp = `${f}.mailha-tmp`;
      writeFileSync(tmp, `${m[1]}N${next}${m[3]}${nl < 0 ? "" : text.slice(nl)}`, { mode: st.mode & 0o777 });
      chownSync(tmp, st.uid, st.gid);
      renameSync(tmp, f);
      changed++;
    }
  }
  return changed;
}
