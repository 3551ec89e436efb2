// After a forced takeover of an Outdated disk, every folder's next UID is raised so no
// UID the other side handed out is given again; UIDVALIDITY, GUID, the UIDs of the
// messages there and the file's owner stay as they were.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { skipUids } from "../../services/uid-gap.ts";

test("next UIDs are raised by the gap in INBOX and in subfolders; everything else is kept", () => {
  const root = mkdtempSync(join(tmpdir(), "mailha-uidgap-"));
  try {
    const md = join(root, "mailha.test", "bob", "Maildir");
    for (const d of ["cur", "new", "tmp", ".Archive/cur", ".Archive/new", ".Archive/tmp", ".Empty/cur"]) mkdirSync(join(md, d), { recursive: true });
    const inbox = "3 V1700000000 N12 G0123456789abcdef0123456789abcdef\n10 :1700000001.M1P1.h,S=100\n11 :1700000002.M2P2.h,S=200\n";
    writeFileSync(join(md, "dovecot-uidlist"), inbox, { mode: 0o600 });
    writeFileSync(join(md, ".Archive", "dovecot-uidlist"), "3 V1700000050 N3 Gfedcba9876543210fedcba9876543210\n2 :1700000003.M3P3.h,S=300\n");
    assert.equal(skipUids(root, 1000), 2, "two folders have a uidlist");
    assert.equal(readFileSync(join(md, "dovecot-uidlist"), "utf8"), inbox.replace(" N12 ", " N1012 "));
    assert.match(readFileSync(join(md, ".Archive", "dovecot-uidlist"), "utf8"), /^3 V1700000050 N1003 Gfedcba9876543210fedcba9876543210\n2 :1700000003/);
    assert.equal(statSync(join(md, "dovecot-uidlist")).mode & 0o777, 0o600);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});
