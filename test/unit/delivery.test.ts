// The local delivery path: a 250 needs the message in every Maildir and its journal
// lines fsynced; when the journal fails (its own write or fsync, or the new/ directories
// it syncs), the delivery fails and leaves nothing in new/ or tmp/.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { buffer } from "node:stream/consumers";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import pino from "pino";
import { deliveryPath, type DeliveryFilter } from "../../services/smtp/delivery.ts";
import { withoutAdded } from "../../services/smtp/maildir.ts";
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
  const d = await path(mailRoot, async (e) => void seen.push(...e.map((x) => x.mailbox))).deliverLocal(message(), MAILBOXES, "Return-Path: <x@example.net>\r\n", { peerQueueId: "q-1" });
  assert.equal(d.files.length, 2);
  assert.deepEqual(seen, MAILBOXES);
  assert.equal(files(mailRoot, "new").length, 2);
});

test("the journal failing after the renames fails the delivery and leaves nothing in new/ or tmp/", async () => {
  for (const [what, err] of [["its write or fsync", new Error("EIO: i/o error, fsync")], ["a new/ directory's fsync", new DirSyncError("fsync of new/: EIO")]] as const) {
    const mailRoot = join(root, what.replace(/\W+/g, "-"));
    await assert.rejects(path(mailRoot, () => Promise.reject(err)).deliverLocal(message(), MAILBOXES, "", { session: "s1" }), (e: unknown) => e === err, `${what}: the delivery fails (a 4xx for the client)`);
    assert.deepEqual(files(mailRoot, "new"), [], `${what}: nothing is left in new/`);
    assert.deepEqual(files(mailRoot, "tmp"), [], `${what}: nor in tmp/`);
  }
});

/** A filter that plans by address: "spam" in the local part is spam for that user. */
function byAddress(learned: string[] = [], journaled: string[] = []): DeliveryFilter {
  return {
    async journal(plans) {
      for (const p of plans) if (p.spam) journaled.push(p.spam.user);
    },
    async plan(_head, _whole, mailboxes) {
      return mailboxes.map((m) =>
        m.startsWith("spam")
          ? { fields: `X-DSPAM-Result: Spam\r\nX-DSPAM-Signature: sig-${m.split("@")[0]}\r\n`, folder: ".Junk", spam: { user: m, deltas: [{ key: m }] } }
          : { fields: "X-DSPAM-Result: Innocent\r\n", folder: "" },
      );
    },
    async learn(plans) {
      for (const p of plans) if (p.spam) learned.push(p.spam.user);
    },
  };
}

test("a filtered delivery: each verdict its own file and folder, innocent users share one, what was learned is journaled beside the copies and applied after", async () => {
  for (const size of [100, 3 * 1024 * 1024]) {
    const mailRoot = join(root, `filtered-${size}`);
    const entries: Omit<JournalEntry, "id" | "node" | "epoch" | "hlc" | "ts" | "kind">[] = [];
    const learned: string[] = [];
    const journaled: string[] = [];
    mkdirSync(mailRoot, { recursive: true });
    const p = deliveryPath({ mailRoot, uid, gid, sizeMax: 8 << 20, journal: { append: async (e) => void entries.push(...e) }, delivered: new DeliveredIndex(join(mailRoot, "no-journals")), log: pino({ level: "silent" }), filter: byAddress(learned, journaled) });
    const body = `Subject: hi\r\n\r\n${"x".repeat(70) + "\r\n"}`.padEnd(size, "y") + "\r\n";
    const trace = "Return-Path: <x@example.net>\r\nReceived: from test\r\n";
    const users = ["alice@mailha.test", "bob@mailha.test", "spam1@mailha.test", "spam2@mailha.test"];
    const d = await p.deliverLocal(Readable.from([Buffer.from(body.replace(/y{900}/g, (m) => m.slice(0, 898) + "\r\n"))]), users, trace, { filter: true });
    assert.equal(d.files.length, 4);
    assert.match(d.files[0]!, /\/alice\/Maildir\/new\//);
    assert.match(d.files[2]!, /\/spam1\/Maildir\/\.Junk\/new\//, "spam is filed in Junk");
    assert.ok(existsSync(join(mailRoot, "mailha.test", "spam1", "Maildir", ".Junk", "maildirfolder")), "Junk is a Maildir++ folder");
    const text = (f: string) => readFileSync(f, "utf8");
    assert.ok(text(d.files[0]!).startsWith(trace + "X-DSPAM-Result: Innocent\r\nSubject: hi"), "the verdict follows the trace fields");
    assert.equal(statSync(d.files[0]!).ino, statSync(d.files[1]!).ino, "the same verdict shares one file");
    assert.notEqual(statSync(d.files[2]!).ino, statSync(d.files[3]!).ino, "each signature its own file");
    assert.match(text(d.files[3]!), /X-DSPAM-Signature: sig-spam2\r\n/);
    for (const [i, c] of d.copies.entries()) {
      const buf = readFileSync(c.file);
      assert.equal(c.size, buf.length, "the size is the file's");
      assert.equal(c.sha256, createHash("sha256").update(buf).digest("hex"), "the hash is the file's");
      assert.ok(c.file.endsWith(`,S=${buf.length}`));
      assert.equal(entries[i]!.sha256, c.sha256, "the journal names each copy's own hash");
    }
    assert.deepEqual(journaled, ["spam1@mailha.test", "spam2@mailha.test"], "what was learned is journaled");
    assert.deepEqual(learned, ["spam1@mailha.test", "spam2@mailha.test"], "and applied after");
    assert.equal(entries[2]!.file, d.files[2]!.slice(mailRoot.length + 1));
    // What goes to other domains has no verdict.
    const orig = await buffer(withoutAdded(d.copies[2]!, Buffer.byteLength(trace), "Return-Path: <x@example.net>\r\n".length));
    assert.equal(orig.toString("utf8"), readFileSync(d.copies[2]!.file, "utf8").replace(/^Return-Path: [^\r]*\r\n/, "").replace(/X-DSPAM-Result: Spam\r\nX-DSPAM-Signature: sig-spam1\r\n/, ""));
    for (const u of users) {
      const md = join(mailRoot, "mailha.test", u.split("@")[0]!, "Maildir");
      assert.deepEqual(readdirSync(join(md, "tmp")), [], "nothing is left in tmp/");
    }
  }
});

test("without the filter asked for (a submission, a bounce), nothing is added", async () => {
  const mailRoot = join(root, "unfiltered");
  mkdirSync(mailRoot, { recursive: true });
  const p = deliveryPath({ mailRoot, uid, gid, sizeMax: 1 << 20, journal: { append: async () => {} }, delivered: new DeliveredIndex(join(mailRoot, "no-journals")), log: pino({ level: "silent" }), filter: byAddress() });
  const d = await p.deliverLocal(message(), ["spam1@mailha.test"], "Return-Path: <>\r\n");
  assert.equal(readFileSync(d.files[0]!, "utf8"), "Return-Path: <>\r\nSubject: hi\r\n\r\nhello\r\n");
  assert.match(d.files[0]!, /\/spam1\/Maildir\/new\//);
});

test("the delivery journal gets its line before the spam deltas are journaled (that fsync must not make the Maildir rename durable alone)", async () => {
  const mailRoot = join(root, "ordered");
  mkdirSync(mailRoot, { recursive: true });
  const order: string[] = [];
  const filter = byAddress();
  const p = deliveryPath({
    mailRoot,
    uid,
    gid,
    sizeMax: 1 << 20,
    journal: { append: async () => void order.push("delivery line") },
    delivered: new DeliveredIndex(join(mailRoot, "no-journals")),
    log: pino({ level: "silent" }),
    filter: { ...filter, journal: async (plans) => (order.push("spam deltas"), filter.journal(plans)) },
  });
  const d = await p.deliverLocal(message(), ["spam1@mailha.test"], "Return-Path: <x@example.net>\r\n", { filter: true });
  assert.match(d.files[0]!, /\/spam1\/Maildir\/\.Junk\/new\//);
  assert.deepEqual(order, ["delivery line", "spam deltas"]);
});
