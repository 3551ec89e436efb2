// The spam quarantine (services/spam/quarantine.ts) on real files: SMTP's delivery path
// holds a message beside the Maildir (no Dovecot folder), the delivery journal names it,
// a listing shows it, a release puts the same bytes into the INBOX's new/, a deletion
// and an expiry remove it, each action journaled first; and after a split brain
// (reconcile/quarantine.ts through sides.ts, merge and the Applier) what the victim held
// is copied into the survivor, a release and a deletion of a message held before the
// split are carried, and a second run changes nothing.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import pino from "pino";
import { deliveryPath, type DeliveryFilter } from "../../services/smtp/delivery.ts";
import { DeliveredIndex } from "../../services/smtp/delivered-index.ts";
import { Journal } from "../../services/smtp/journal.ts";
import { ChangeJournal } from "../../services/journal/changes.ts";
import { listFolders, QUARANTINE_DIR } from "../../services/journal/maildir.ts";
import { DeliveryIndex } from "../../services/journal/deliveries.ts";
import { deleteHeld, expireHeld, findHeld, listHeld, NotHeld, releaseHeld } from "../../services/spam/quarantine.ts";
import { DIGEST_FIELD, DIGEST_ITEMS_MAX, digestMessage, digestStateFile, sendDigests } from "../../services/spam/quarantine-digest.ts";
import { releaseKeysOf } from "../../services/spam/release.ts";
import { readEntries, readMail, sinceSplit, toEvents } from "../../reconcile/sides.ts";
import { merge, NO_KINDS, registerKind } from "../../reconcile/rules.ts";
import { quarantineHandler } from "../../reconcile/quarantine.ts";
import { QUARANTINE_KIND } from "../../services/spam/quarantine.ts";
import { Applier } from "../../reconcile/apply.ts";
import type { AccountTable } from "../../reconcile/model.ts";

const root = mkdtempSync(join(tmpdir(), "mailha-quarantine-"));
test.after(() => rmSync(root, { recursive: true, force: true }));
const uid = process.getuid?.() ?? 0;
const gid = process.getgid?.() ?? 0;
const USER = "carol@mailha.test";
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** Spam for every mailbox whose local part starts with "carol": held; others to INBOX. */
const holdCarol: DeliveryFilter = {
  async journal() {},
  async learn() {},
  async plan(_head, _whole, mailboxes) {
    return mailboxes.map((m) => (m.startsWith("carol") ? { fields: `X-DSPAM-Result: Spam\r\nX-DSPAM-Probability: 1.0000\r\nX-DSPAM-Signature: 7,${m.length}abc\r\n`, folder: QUARANTINE_DIR } : { fields: "X-DSPAM-Result: Innocent\r\n", folder: "" }));
  },
};

function side(name: string) {
  const dataDir = join(root, name);
  const mailRoot = join(dataDir, "mail");
  mkdirSync(mailRoot, { recursive: true });
  const journal = new Journal(dataDir, name);
  const changes = new ChangeJournal(dataDir, name);
  const path = deliveryPath({ mailRoot, uid, gid, sizeMax: 1 << 20, journal, delivered: new DeliveredIndex(join(mailRoot, "no-journals")), log: pino({ level: "silent" }), filter: holdCarol });
  const send = (subject: string, to = [USER]) => path.deliverLocal(Readable.from([Buffer.from(`From: "Deals" <deals@spam.example>\r\nSubject: ${subject}\r\nMessage-ID: <${subject.replace(/\W/g, "")}@spam.example>\r\n\r\ncheap casino lottery\r\n`)]), to, "Return-Path: <deals@spam.example>\r\n", { filter: true });
  return { dataDir, mailRoot, journal, changes, send, target: { mailRoot, journal: changes } };
}

const maildir = (mailRoot: string, user = USER) => join(mailRoot, user.split("@")[1]!, user.split("@")[0]!, "Maildir");

test("held spam: beside the Maildir (no folder), listed, released into new/ with the same bytes, deleted and expired, each action journaled first", async () => {
  const s = side("one");
  try {
    const d = await s.send("win a prize now", [USER, "dave@mailha.test"]);
    const md = maildir(s.mailRoot);
    assert.deepEqual(readdirSync(join(md, "new")), [], "nothing in carol's INBOX");
    assert.deepEqual(listFolders(md), [""], "no Dovecot folder was made for it (only INBOX)");
    assert.equal(readdirSync(join(maildir(s.mailRoot, "dave@mailha.test"), "new")).length, 1, "dave's innocent copy is in his INBOX");
    const held = listHeld(s.mailRoot);
    assert.equal(held.length, 1);
    const h = held[0]!;
    assert.equal(h.user, USER);
    assert.equal(h.file, d.files[0], "the held file is the delivered copy");
    assert.equal(h.subject, "win a prize now");
    assert.equal(h.from, '"Deals" <deals@spam.example>');
    assert.equal(h.probability, "1.0000");
    assert.match(h.signature, /^7,/);
    // The delivery journal names it under quarantine/, and the scanner's index of SMTP's
    // deliveries leaves it out (no scan of a folder would ever match it).
    const lines = readFileSync(join(s.dataDir, "journal", "deliveries-one.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as { mailbox: string; file: string });
    assert.ok(lines.some((l) => l.mailbox === USER && l.file.startsWith(`mailha.test/carol/${QUARANTINE_DIR}/new/`)), JSON.stringify(lines));
    const index = new DeliveryIndex(join(s.dataDir, "journal"), join(root, "one-index.json"));
    index.catchUp();
    assert.equal([...index.pendingOf("mailha.test/carol")].length, 0, "not pending for the scanner");
    assert.equal([...index.pendingOf("mailha.test/dave")].length, 1, "dave's INBOX copy is");

    const bytes = readFileSync(h.file);
    const r = await releaseHeld(s.target, USER, h.key);
    assert.deepEqual(readFileSync(join(md, "new", readdirSync(join(md, "new"))[0]!)), bytes, "the same bytes in carol's INBOX new/");
    assert.equal(r.file.startsWith(join(md, "new")), true);
    assert.equal(listHeld(s.mailRoot, USER).length, 0, "no longer held");
    await assert.rejects(releaseHeld(s.target, USER, h.key), NotHeld, "a second release says there is no such message");

    await s.send("second offer");
    await s.send("third offer");
    const a = listHeld(s.mailRoot, USER).find((h) => h.subject === "second offer");
    const b = listHeld(s.mailRoot, USER).find((h) => h.subject === "third offer");
    await deleteHeld(s.target, USER, a!.key);
    assert.equal(findHeld(s.mailRoot, USER, a!.key), null);
    // Expiry: only what is older than the days goes.
    const old = new Date(Date.now() - 40 * 86_400_000);
    utimesSync(b!.file, old, old);
    await s.send("fourth offer");
    assert.equal(await expireHeld(s.target, 30), 1, "the 40-day-old one expired");
    assert.deepEqual(listHeld(s.mailRoot, USER).map((x) => x.subject), ["fourth offer"]);

    await s.changes.close();
    const entries = (await readEntries(s.dataDir)).filter((e) => e.kind === QUARANTINE_KIND) as unknown as { key: string; action: string; sha256: string; reason?: string }[];
    assert.deepEqual(entries.map((e) => [e.key, e.action, e.reason ?? null]), [[h.key, "release", null], [a!.key, "delete", "user"], [b!.key, "delete", "expired"]]);
    assert.equal(entries[0]!.sha256, sha(bytes), "the release names the held bytes");
  } finally {
    await s.journal.close();
    await s.changes.close();
  }
});

test("after a split brain: the victim's holds are copied into the survivor, its release and deletion of messages held before the split carried; a second run changes nothing", async () => {
  const base = side("base");
  await base.send("held before one");
  await base.send("held before two");
  await base.send("held before three");
  await base.journal.close();
  await base.changes.close();
  // The split: the same volume on both sides.
  cpSync(base.dataDir, join(root, "victim"), { recursive: true });
  cpSync(base.dataDir, join(root, "survivor"), { recursive: true });
  const v = side("victim");
  const s = side("survivor");
  try {
    const bySubject = (n: string) => listHeld(v.mailRoot, USER).find((h) => h.subject === `held before ${n}`)!;
    const [b1, b2, b3] = [bySubject("one"), bySubject("two"), bySubject("three")];
    // Apart. The victim: a new hold, a release of b1, a deletion of b2. The survivor: a
    // new hold of its own, and it released b3 itself.
    await v.send("held on the victim");
    const released = await releaseHeld(v.target, USER, b1!.key);
    await deleteHeld(v.target, USER, b2!.key);
    await s.send("held on the survivor");
    await releaseHeld(s.target, USER, b3!.key);
    for (const x of [v, s]) {
      await x.journal.close();
      await x.changes.close();
    }
    // The victim's INBOX copy of b1 is merged as mail (by content, by the mail rules);
    // here it is put there the way that merge would, so the release must not add it twice.
    const sInbox = join(maildir(s.mailRoot), "new");
    writeFileSync(join(sInbox, "merged-b1"), readFileSync(released.file));

    const run = async () => {
      const vMail = await readMail(v.dataDir);
      const sMail = await readMail(s.dataDir);
      const split = sinceSplit(await readEntries(v.dataDir), await readEntries(s.dataDir));
      const accounts = { domains: {}, users: {}, aliases: {} } as Record<AccountTable, Record<string, never>>;
      const survivor = { mail: sMail.mail, accounts };
      const victim = { mail: vMail.mail, accounts };
      const plan = merge({ survivor, victim, victimEvents: toEvents(split.victim, victim), survivorEvents: toEvents(split.survivor, survivor) }, { kinds: registerKind(NO_KINDS, QUARANTINE_KIND, quarantineHandler) });
      const ops = plan.ops.filter((o) => o.op === "extension");
      assert.equal(plan.ops.length, ops.length, `only quarantine operations: ${JSON.stringify(plan.ops.map((o) => o.op))}`);
      const applier = new Applier({ survivorData: s.dataDir, imap: { host: "127.0.0.1", port: 1, masterPassword: "" }, dovecotConf: "", db: null as never, victimFiles: vMail.files, victimFile: async (f) => ({ body: readFileSync(f), mtime: new Date() }), standIns: new Map(), journal: async () => new ChangeJournal(s.dataDir, "survivor") });
      const outcomes = [];
      for (const op of ops) outcomes.push(await applier.apply(op));
      return { ops, outcomes };
    };
    const first = await run();
    assert.deepEqual(first.ops.map((o) => (o as unknown as { payload: { action: string } }).payload.action).sort(), ["delete", "hold", "release"]);
    assert.ok(first.outcomes.every((o) => o.done), JSON.stringify(first.outcomes));
    const heldNow = listHeld(s.mailRoot, USER).map((h) => h.subject).sort();
    assert.deepEqual(heldNow, ["held on the survivor", "held on the victim"], "the victim's hold is in the survivor's quarantine; b1, b2 (the victim's actions) and b3 (the survivor's) are not");
    const victimHeld = findHeld(s.mailRoot, USER, listHeld(v.mailRoot, USER).find((h) => h.subject === "held on the victim")!.key)!;
    assert.equal(sha(readFileSync(victimHeld.file)), sha(readFileSync(listHeld(v.mailRoot, USER).find((h) => h.subject === "held on the victim")!.file)), "with the victim's bytes");
    const inbox = readdirSync(sInbox).map((f) => readFileSync(join(sInbox, f), "utf8"));
    assert.equal(inbox.filter((m) => m.includes("Subject: held before one")).length, 1, "b1 once in the survivor's INBOX (its content was there: not added again)");
    assert.equal(inbox.filter((m) => m.includes("Subject: held before three")).length, 1, "b3, released on the survivor, once");
    assert.ok(!inbox.some((m) => m.includes("Subject: held before two")), "b2, deleted on the victim, is not delivered");

    // Each step was journaled on the survivor: planning again finds nothing to do.
    const second = await run();
    assert.deepEqual(second.ops, [], "a second run plans nothing");
    // A step applied but not journaled (killed in between) is planned again and finds it done.
    const sJournal = join(s.dataDir, "journal");
    for (const f of readdirSync(sJournal).filter((f) => f.startsWith("changes-survivor-"))) {
      const lines = readFileSync(join(sJournal, f), "utf8").split("\n").filter((l) => !l.includes('"reason":"reconcile"'));
      writeFileSync(join(sJournal, f), lines.join("\n"));
    }
    const third = await run();
    assert.equal(third.ops.length, 3);
    assert.ok(third.outcomes.every((o) => o.done && o.says), `it only finds everything done: ${JSON.stringify(third.outcomes)}`);
    assert.deepEqual(listHeld(s.mailRoot, USER).map((h) => h.subject).sort(), heldNow);
    assert.equal(readdirSync(sInbox).length, inbox.length);
    assert.ok(!existsSync(join(maildir(s.mailRoot), ".quarantine")));
  } finally {
    for (const x of [v, s]) {
      await x.journal.close();
      await x.changes.close();
    }
  }
});

test("the quarantine's notice: each user with spam held since the last notice gets one in the INBOX (sender, subject, key, expiry), listed once; nothing new, no notice", async () => {
  const s = side("digest");
  await s.send("Cheap pills 1");
  await s.send("Casino \u0007bonus\r 2");
  const md = maildir(s.mailRoot);
  const inbox = () => readdirSync(join(md, "new")).map((n) => readFileSync(join(md, "new", n), "utf8")).filter((m) => m.includes(`${DIGEST_FIELD}:`));
  const o = { mailRoot: s.mailRoot, dataDir: s.dataDir, uid, gid, quarantineDays: 30 };
  const first = await sendDigests(o);
  assert.deepEqual(first.map((d) => [d.user, d.listed, d.held]), [[USER, 2, 2]]);
  const notices = inbox();
  assert.equal(notices.length, 1, "one notice");
  const n = notices[0]!;
  const cut = n.indexOf("\r\n\r\n");
  const head = n.slice(0, cut);
  const body = n.slice(cut + 4);
  assert.match(head, /^Subject: 2 messages held as spam for you$/m);
  assert.match(head, /^To: <carol@mailha\.test>$/m);
  assert.match(head, /^Auto-Submitted: auto-generated$/m);
  assert.match(head, /^Content-Type: text\/plain; charset=utf-8$/m);
  assert.ok(!/[^\r]\n/.test(n), "CRLF line ends only");
  for (const h of listHeld(s.mailRoot, USER)) {
    assert.ok(body.includes(`Key:     ${h.key}`), `lists ${h.key}`);
    assert.ok(body.includes(`mailha spam quarantine release --user ${USER} KEY`));
    const link = body.split("\r\n").find((l) => l.startsWith("Release: ") && l.includes(encodeURIComponent(h.key)))!;
    assert.ok(link, `a release link for ${h.key}`);
    const url = new URL(link.slice("Release: ".length));
    assert.equal(url.protocol, "mailto:");
    assert.equal(url.pathname, "quarantine-release@mailha.test");
    assert.deepEqual(releaseKeysOf(url.searchParams.get("subject")!), [h.key], "the link's subject is a release request for that key");
  }
  assert.match(body, /^Subject: Cheap pills 1$/m);
  assert.match(body, /^Subject: Casino bonus 2$/m, "control characters out of a spammer's subject");
  assert.match(body, /^From:    "?Deals"? <deals@spam\.example>$/m);
  assert.match(body, /deleted after \d{4}-\d\d-\d\d \d\d:\d\d UTC/);
  // Again: nothing new, no second notice.
  assert.deepEqual((await sendDigests(o)).map((d) => [d.listed, d.file]), [[0, null]]);
  assert.equal(inbox().length, 1);
  // A new one held: the next notice lists only it (and says how many in all).
  await s.send("Lottery 3");
  const third = await sendDigests(o);
  assert.deepEqual(third.map((d) => [d.listed, d.held]), [[1, 3]]);
  const latest = inbox().find((m) => m.includes("Lottery 3"))!;
  assert.match(latest, /^Subject: 1 message held as spam for you$/m);
  assert.ok(!latest.includes("Cheap pills 1"), "what was listed before is not listed again");
  assert.match(latest, /In all, 3 messages are held for you\./);
  // Released or deleted messages leave the state; a user with none left is forgotten.
  for (const h of listHeld(s.mailRoot, USER)) await deleteHeld(s.target, USER, h.key);
  assert.deepEqual(await sendDigests(o), []);
  assert.deepEqual(JSON.parse(readFileSync(digestStateFile(s.dataDir), "utf8")), { v: 1, told: {} });
  // A damaged state file is named, with the remedy, not silently reset.
  writeFileSync(digestStateFile(s.dataDir), "{ not json");
  await assert.rejects(sendDigests(o), /quarantine-digest\.json/);
});

test("the quarantine's notice is bounded: at most DIGEST_ITEMS_MAX listed, the rest counted", () => {
  const held = Array.from({ length: DIGEST_ITEMS_MAX + 5 }, (_, i) => ({ user: USER, key: `k${i}`, file: "", size: 1, held: "2026-12-06T07:00:00.000Z", from: "x@y.z", subject: `s${i}`, date: "", probability: "1.0000", signature: "" }));
  const m = digestMessage(USER, held, held.length, { now: new Date("2026-12-06T08:00:00Z"), quarantineDays: 30, host: "a.mailha.test" }).toString("utf8");
  assert.equal(m.match(/^Key: /gm)?.length, DIGEST_ITEMS_MAX);
  assert.match(m, /\.\.\. and 5 more held since the last notice\./);
  assert.match(m, /deleted after 2027-01-05 07:00 UTC/);
});

test("a release request's subject: `release KEY...` (any case, after Re:), keys of a Maildir key's characters; anything else is not one", () => {
  assert.deepEqual(releaseKeysOf("release 1796594063.M142230P2292Q10.vm,S=238"), ["1796594063.M142230P2292Q10.vm,S=238"]);
  assert.deepEqual(releaseKeysOf("Re: RE: Release  a.b  c.d a.b"), ["a.b", "c.d"], "case, replies, repeats");
  for (const no of ["", "release", "release   ", "please release a.b", "release <script>", "1 message held as spam for you"]) assert.equal(releaseKeysOf(no), null, no);
});
