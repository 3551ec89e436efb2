// The system users mailha's daemons run as. MariaDB's `mysql` and Redis's `redis` come
// with their Debian packages; the mail uid of mailha.yaml (SMTP after it dropped root,
// and the owner of every mail file) needs no passwd entry, but gets one, `mailha`, so
// that ps and ls show a name: a system user with no home and no shell, made only when
// both the uid and the name are free (idempotent; an existing entry is left alone).
import { readFileSync } from "node:fs";
import { run } from "../../common/exec.ts";

export const MAIL_USER_NAME = "mailha";

function entries(file: string): string[][] {
  try {
    return readFileSync(file, "utf8").split("\n").filter(Boolean).map((l) => l.split(":"));
  } catch {
    return [];
  }
}

export interface MailUserResult {
  /** The name the uid has now (null: none, the name was taken by another uid). */
  readonly name: string | null;
  readonly created: boolean;
}

/** Makes the `mailha` group and user with GID and UID unless they are there or taken. */
export async function ensureMailUser(uid: number, gid: number): Promise<MailUserResult> {
  const users = entries("/etc/passwd");
  const byUid = users.find((u) => Number(u[2]) === uid);
  if (byUid) return { name: byUid[0]!, created: false };
  if (users.some((u) => u[0] === MAIL_USER_NAME)) return { name: null, created: false };
  if (process.getuid?.() !== 0) throw new Error(`uid ${uid} has no user name; run as root so mailha can create the system user ${MAIL_USER_NAME}`);
  const groups = entries("/etc/group");
  const byGid = groups.find((g) => Number(g[2]) === gid);
  if (!byGid) {
    if (groups.some((g) => g[0] === MAIL_USER_NAME)) return { name: null, created: false };
    await run("groupadd", ["--system", "--gid", String(gid), MAIL_USER_NAME]);
  }
  await run("useradd", ["--system", "--uid", String(uid), "--gid", String(gid), "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "--comment", "mailha mail storage and SMTP", MAIL_USER_NAME]);
  return { name: MAIL_USER_NAME, created: true };
}
