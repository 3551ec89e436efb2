// The local delivery path: a 250 needs the message in every Maildir and its journal
// lines fsynced; when the journal fails (its own write or fsync, or the new/ directories
// it syncs), the delivery fails and leaves nothing in new/ or tmp/.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import pino from "pino";
import { deliveryPath } from "../../services/smtp/delivery.ts";
import { DeliveredIndex } from "../../services/smtp/delivered-index.ts";
import { DirSyncError, type JournalEntry } from "../../services/smtp/journal.ts";

const root = mkdtempSync(join(tmpdir(), "mailha-delivery-"));
test.after(() => rmSync(root, { recursive: true, force: true }));
const uid = process.getuid?.() ?? 0;
const gid = process.getgid?.() ?? 0;
const MAILBOXES = ["alice@mailha.test", "bob@mailha.test"];

/** A delivery path over MAILROOT whose journal answers APPEND. */
function path(mailRoot: string, append: (e: Omit<JournalEntry, "id" | "node" | "epoch" | "hlc" | "ts" | "kind">[], dirs: readonly string[]) => Promise<void>) {
  mkdirSync(mailRoot, { recursive: true });
  return deliveryPath({ mailRoot, uid, gid, sizeMax: 1 << 20, journal: { append }, delivered: new DeliveredIndex(join(mailRoot, "no-journals")), log: pino({ level: "silent" }) });
}
const files = (mailRoot: string, sub: "new" | "tmp") =>
  MAILBOXES.flatMap((m) => {
    const d = join(mailRoot, "mailha.test", m.split("@")[0]!, "Maildir", sub);
    return existsSync(d) ? readdirSync(d) : [];
  });
const message = () => Readable.from([Buffer.from("Subject: hi\r\n\r\nhello\r\n")]);

test("a journaled delivery is in every Maildir, one journal entry per copy", async () => {
  const mailRoot = join(root, "ok");
  const seen: string[] = [];
  const d = await path(mailRoot, async (e) => void seen.push(...e.map((x) => x.mailbox))).deliverLocal(message(), MAILBOXES, "Return-Path: <x@example.net>\r\n", "q-1");
  assert.equal(d.files.length, 2);
  assert.deepEqual(seen, MAILBOXES);
  assert.equal(files(mailRoot, "new").length, 2);
});

test("the journal failing after the renames fails the delivery and leaves nothing in new/ or tmp/", async () => {
  for (const [what, err] of [["its write or fsync", new Error("EIO: i/o error, fsync")], ["a new/ directory's fsync", new DirSyncError("fsync of new/: EIO")]] as const) {
    const mailRoot = join(root, what.replace(/\W+/g, "-"));
    await assert.rejects(path(mailRoot, () => Promise.reject(err)).deliverLocal(message(), MAILBOXES, "", undefined, "s1"), (e: unknown) => e === err, `${what}: the delivery fails (a 4xx for the client)`);
    assert.deepEqual(files(mailRoot, "new"), [], `${what}: nothing is left in new/`);
    assert.deepEqual(files(mailRoot, "tmp"), [], `${what}: nor in tmp/`);
  }
});
