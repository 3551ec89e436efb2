// The Dovecot change source against a Maildir tree written the way Dovecot writes it
// (flags by renaming `<base>:2,<letters>`, keywords in dovecot-keywords, UIDs and the
// mailbox GUID in dovecot-uidlist, copies and moves as hard links that keep the base
// name, folders as `.A.B`, subscriptions with tabs): every kind of change is found and
// journaled once; SMTP's deliveries are not journaled again; a change made while the
// watcher is stopped is found by the catch-up at its start; a crash between the
// journal commit and the state write re-journals, and a crash before the commit loses
// nothing; a watcher killed with SIGKILL before it scanned catches up after a restart.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { appendFileSync, existsSync, linkSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { sleep } from "../../common/exec.ts";
import { compareHlc } from "../../common/hlc.ts";
import { ChangeJournal, type JournalEntry } from "../../services/journal/changes.ts";
import { DeliveryIndex, deliveryIndexFile } from "../../services/journal/deliveries.ts";
import { MaildirWatcher } from "../../services/journal/maildir-watch.ts";
import { readJournal } from "../../services/journal/read.ts";
import { ScanStore } from "../../services/journal/scan-state.ts";
import { scanUser, userRef, type ScanContext } from "../../services/journal/scanner.ts";
import { ROOT } from "../helpers/cli.ts";

const root = mkdtempSync(join(tmpdir(), "mailha-mdwatch-"));
test.after(() => rmSync(root, { recursive: true, force: true }));
const log = pino({ level: "silent" });
let dirs = 0;

/** A Maildir tree and the moves Dovecot (and SMTP) make in it. */
class FakeDovecot {
  readonly data: string;
  readonly mailRoot: string;
  private n = 0;
  constructor() {
    this.data = join(root, `data${++dirs}`);
    this.mailRoot = join(this.data, "mail");
    mkdirSync(this.mailRoot, { recursive: true });
  }
  maildir(user = "alice@mailha.test"): string {
    const [local, domain] = user.split("@");
    return join(this.mailRoot, domain!, local!, "Maildir");
  }
  folder(dir: string, user?: string): string {
    return dir === "" ? this.maildir(user) : join(this.maildir(user), dir);
  }
  /** A folder as Dovecot creates it: cur/new/tmp, maildirfolder, a uidlist with a fresh GUID. */
  create(dir: string, user?: string): string {
    const p = this.folder(dir, user);
    for (const s of ["cur", "new", "tmp"]) mkdirSync(join(p, s), { recursive: true });
    if (dir !== "") writeFileSync(join(p, "maildirfolder"), "");
    const guid = randomBytes(16).toString("hex");
    if (!existsSync(join(p, "dovecot-uidlist"))) writeFileSync(join(p, "dovecot-uidlist"), `3 V${1_700_000_000 + ++this.n} N1 G${guid}\n`);
    return readFileSync(join(p, "dovecot-uidlist"), "utf8").match(/ G([0-9a-f]{32})/)![1]!;
  }
  private nextUid(p: string): number {
    return readFileSync(join(p, "dovecot-uidlist"), "utf8").trim().split("\n").length;
  }
  /** IMAP APPEND: tmp/ -> cur/ with flags (new/ without), a uidlist line. */
  append(dir: string, body: string, letters = "", user?: string): string {
    const p = this.folder(dir, user);
    const base = `17000${String(++this.n).padStart(5, "0")}.M${this.n}P1.vm,S=${body.length},W=${body.length}`;
    writeFileSync(join(p, "tmp", base), body);
    renameSync(join(p, "tmp", base), letters || dir ? join(p, "cur", `${base}:2,${letters}`) : join(p, "new", base));
    appendFileSync(join(p, "dovecot-uidlist"), `${this.nextUid(p)} :${base}\n`);
    return base;
  }
  /** SMTP: a file in INBOX's new/ and its line in the delivery journal. */
  deliver(body: string, user = "alice@mailha.test"): string {
    const p = this.folder("", user);
    const base = `17000${String(++this.n).padStart(5, "0")}.M${this.n}P9Q1.mx,S=${body.length}`;
    writeFileSync(join(p, "new", base), body);
    mkdirSync(join(this.data, "journal"), { recursive: true });
    const [local, domain] = user.split("@");
    appendFileSync(join(this.data, "journal", "deliveries-a.jsonl"), JSON.stringify({ id: `a:1:${this.n}`, node: "a", epoch: 1, ts: new Date().toISOString(), kind: "delivery", mailbox: user, file: `${domain}/${local}/Maildir/new/${base}`, sha256: "0".repeat(64), size: body.length }) + "\n");
    return base;
  }
  private find(dir: string, base: string, user?: string): { sub: string; fname: string } {
    const p = this.folder(dir, user);
    for (const sub of ["new", "cur"]) for (const f of readdirSync(join(p, sub))) if (f === base || f.startsWith(`${base}:`)) return { sub, fname: f };
    throw new Error(`${base} is not in ${dir || "INBOX"}`);
  }
  /** STORE: a rename to the new letters (into cur/). */
  flags(dir: string, base: string, letters: string, user?: string): void {
    const p = this.folder(dir, user);
    const f = this.find(dir, base, user);
    renameSync(join(p, f.sub, f.fname), join(p, "cur", `${base}:2,${[...letters].sort().join("")}`));
  }
  keywords(dir: string, words: string[], user?: string): void {
    writeFileSync(join(this.folder(dir, user), "dovecot-keywords"), words.map((w, i) => `${i} ${w}\n`).join(""));
  }
  expunge(dir: string, base: string, user?: string): void {
    const f = this.find(dir, base, user);
    unlinkSync(join(this.folder(dir, user), f.sub, f.fname));
  }
  /** COPY: a hard link with the same base name into the destination's new/ (cur/ with flags). */
  copy(from: string, base: string, to: string, user?: string): void {
    const f = this.find(from, base, user);
    const letters = f.fname.split(":2,")[1] ?? "";
    const dest = this.folder(to, user);
    linkSync(join(this.folder(from, user), f.sub, f.fname), letters ? join(dest, "cur", `${base}:2,${letters}`) : join(dest, "new", base));
    appendFileSync(join(dest, "dovecot-uidlist"), `${this.nextUid(dest)} :${base}\n`);
  }
  move(from: string, base: string, to: string, user?: string): void {
    this.copy(from, base, to, user);
    this.expunge(from, base, user);
  }
  renameFolder(from: string, to: string, user?: string): void {
    renameSync(this.folder(from, user), this.folder(to, user));
  }
  deleteFolder(dir: string, user?: string): void {
    const trash = join(this.maildir(user), `..DOVECOT-TRASHED`);
    renameSync(this.folder(dir, user), trash);
    rmSync(trash, { recursive: true });
  }
  subscriptions(names: string[], user?: string): void {
    const f = join(this.maildir(user), "subscriptions");
    writeFileSync(`${f}.lock`, `V\t2\n\n${names.map((n) => n.split("/").join("\t")).join("\n")}\n`);
    renameSync(`${f}.lock`, f);
  }
}

async function journal(data: string): Promise<JournalEntry[]> {
  const out: JournalEntry[] = [];
  for await (const e of readJournal(data)) if (e.kind !== "delivery") out.push(e);
  return out;
}

const summary = (es: readonly JournalEntry[]) =>
  es.map((e) => {
    switch (e.kind) {
      case "flags":
        return `flags ${e.name} ${e.key} +${(e.add as string[]).join(",")} -${(e.remove as string[]).join(",")}`;
      case "copy":
      case "move":
        return `${e.kind} ${e.fromName} -> ${e.toName} ${e.key}`;
      case "mailbox-rename":
        return `mailbox-rename ${e.from} -> ${e.name}`;
      case "subscribe":
      case "unsubscribe":
      case "mailbox-create":
      case "mailbox-delete":
        return `${e.kind} ${e.name}`;
      default:
        return `${e.kind} ${e.name} ${e.key}`;
    }
  });

function context(fd: FakeDovecot, j: ChangeJournal, store = new ScanStore(join(fd.data, "journal", "scan"))): ScanContext {
  return { mailRoot: fd.mailRoot, store, journal: j, deliveries: new DeliveryIndex(join(fd.data, "journal"), deliveryIndexFile(store.dir)), log };
}

/** Waits until the journal has COUNT mail entries (or fails saying what it has). */
async function waitFor(data: string, count: number, ms = 8000): Promise<JournalEntry[]> {
  const end = Date.now() + ms;
  for (;;) {
    const es = await journal(data);
    if (es.length >= count || Date.now() > end) return es;
    await sleep(50);
  }
}

test("the scanner finds every kind of change Dovecot makes, once each, and leaves SMTP's deliveries to SMTP", async () => {
  const fd = new FakeDovecot();
  const inboxGuid = fd.create("");
  const sentGuid = fd.create(".Sent");
  const m1 = fd.append("", "one\r\n");
  const m2 = fd.append("", "two\r\n");
  const m3 = fd.append("", "three\r\n");
  fd.subscriptions(["Sent"]);
  const j = new ChangeJournal(fd.data, "a");
  const u = userRef(fd.mailRoot, "mailha.test", "alice");
  const ctx = context(fd, j);
  // The first scan of the tree is the baseline: what is there is no change.
  ctx.deliveries.skipToEnd();
  await scanUser(ctx, u, "all", true, true);
  await ctx.store.markBaseline();
  assert.deepEqual(await journal(fd.data), []);

  fd.keywords("", ["$Label1", "Work"]);
  fd.flags("", m1, "Sab");
  const sent = fd.append(".Sent", "a sent message\r\n", "S");
  const projGuid = fd.create(".Proj");
  fd.copy("", m2, ".Proj");
  fd.move("", m3, ".Sent");
  const delivered = fd.deliver("from smtp\r\n");
  fd.subscriptions(["Sent", "Proj"]);
  ctx.deliveries.catchUp();
  await scanUser(ctx, u, new Set(["", ".Sent", ".Proj"]), true);
  const first = await journal(fd.data);
  assert.deepEqual(summary(first).sort(), [
    `append Sent ${sent}`,
    `copy INBOX -> Proj ${m2}`,
    `flags INBOX ${m1} +$Label1,Work,\\Seen -`,
    "mailbox-create Proj",
    `move INBOX -> Sent ${m3}`,
    "subscribe Proj",
  ]);
  assert.ok(!first.some((e) => e.key === delivered), "the delivery is SMTP's entry, not journaled again");
  const flags = first.find((e) => e.kind === "flags")!;
  assert.deepEqual({ mailbox: flags.mailbox, uid: flags.uid, flags: flags.flags }, { mailbox: inboxGuid, uid: 1, flags: ["$Label1", "Work", "\\Seen"] });
  const move = first.find((e) => e.kind === "move")!;
  assert.deepEqual([move.from, move.to, move.fromUid, move.newKey], [inboxGuid, sentGuid, 3, m3]);
  assert.match(String(move.sha256), /^[0-9a-f]{64}$/);
  assert.equal(first.find((e) => e.kind === "mailbox-create")!.guid, projGuid);
  assert.equal(first.find((e) => e.kind === "append")!.flags?.toString(), "\\Seen");
  for (let i = 1; i < first.length; i++) assert.ok(compareHlc(first[i - 1]!.hlc, first[i]!.hlc) < 0, "stamps increase");

  // Flags off, an expunge, a rename (with a child), a delete, an unsubscribe.
  fd.flags("", m1, "S");
  fd.expunge("", m2);
  fd.create(".Proj.Sub");
  await scanUser(ctx, u, new Set([""]), true);
  fd.renameFolder(".Proj", ".Work");
  fd.renameFolder(".Proj.Sub", ".Work.Sub");
  fd.deleteFolder(".Sent");
  fd.subscriptions(["Proj"]);
  await scanUser(ctx, u, new Set([".Work", ".Work.Sub"]), true);
  const second = (await journal(fd.data)).slice(first.length);
  assert.deepEqual(summary(second).sort(), [
    `expunge INBOX ${m2}`,
    `expunge Sent ${m3}`,
    `expunge Sent ${sent}`,
    `flags INBOX ${m1} + -$Label1,Work`,
    "mailbox-create Proj/Sub",
    "mailbox-delete Sent",
    "mailbox-rename Proj -> Work",
    "mailbox-rename Proj/Sub -> Work/Sub",
    "unsubscribe Sent",
  ]);
  const del = second.findIndex((e) => e.kind === "mailbox-delete");
  assert.ok(second.slice(0, del).filter((e) => e.kind === "expunge" && e.name === "Sent").length === 2, "the deleted folder's expunges come before its delete");
  assert.deepEqual(second.filter((e) => e.kind === "expunge" && e.name === "Sent").map((e) => e.key).sort(), [m3, sent].sort(), "a deleted folder's messages are expunged first");

  // Nothing changed: nothing journaled.
  await scanUser(ctx, u, "all", true);
  assert.equal((await journal(fd.data)).length, first.length + second.length);
  await j.close();
});

test("a delivery seen before SMTP's journal line waits; moved by a client before any scan it is a move from INBOX", async () => {
  const fd = new FakeDovecot();
  fd.create("");
  fd.create(".Archive");
  const j = new ChangeJournal(fd.data, "a");
  const u = userRef(fd.mailRoot, "mailha.test", "alice");
  const ctx = context(fd, j);
  await scanUser(ctx, u, "all", true, true);
  await ctx.store.markBaseline();
  // A file in new/ with no journal line yet: not an append (yet).
  const p = fd.folder("");
  writeFileSync(join(p, "new", "1700099999.M1P9Q1.mx,S=3"), "abc");
  const r = await scanUser(ctx, u, new Set([""]), false);
  assert.equal(r.retry.length, 1, "looked at again later");
  assert.deepEqual(await journal(fd.data), []);
  // Its line arrives: nothing to journal.
  unlinkSync(join(p, "new", "1700099999.M1P9Q1.mx,S=3"));
  const d = fd.deliver("abc");
  fd.move("", d, ".Archive");
  ctx.deliveries.catchUp();
  await scanUser(ctx, u, new Set(["", ".Archive"]), false);
  assert.deepEqual(summary(await journal(fd.data)), [`move INBOX -> Archive ${d}`]);
  await j.close();
});

test("a crash after the journal commit and before the state write re-journals the change; one before the commit loses nothing", async () => {
  const fd = new FakeDovecot();
  fd.create("");
  const m = fd.append("", "x\r\n");
  const u = userRef(fd.mailRoot, "mailha.test", "alice");
  const j = new ChangeJournal(fd.data, "a");
  {
    const ctx = context(fd, j);
    await scanUser(ctx, u, "all", true, true);
    await ctx.store.markBaseline();
  }
  fd.flags("", m, "F");
  // The process dies right after the journal's fsync: the state is not written.
  class Crashing extends ScanStore {
    override async saveMailbox(): Promise<void> {
      throw new Error("killed");
    }
  }
  await assert.rejects(scanUser(context(fd, j, new Crashing(join(fd.data, "journal", "scan"))), u, new Set([""]), false), /killed/);
  assert.deepEqual(summary(await journal(fd.data)), [`flags INBOX ${m} +\\Flagged -`]);
  // The next process scans again: the change is journaled again (the reconciler dedupes), not lost.
  await scanUser(context(fd, j), u, "all", true);
  assert.deepEqual(summary(await journal(fd.data)), [`flags INBOX ${m} +\\Flagged -`, `flags INBOX ${m} +\\Flagged -`]);

  // Dying before the commit: nothing in the journal, nothing in the state; the next scan has it once.
  fd.flags("", m, "FS");
  const failing = new ChangeJournal(fd.data, "a");
  await failing.close();
  await assert.rejects(scanUser(context(fd, failing), u, new Set([""]), false), /closed/);
  await scanUser(context(fd, j), u, new Set([""]), false);
  assert.deepEqual(summary(await journal(fd.data)).slice(2), [`flags INBOX ${m} +\\Seen -`]);
  await j.close();
});

test("the watcher journals changes as inotify reports them, and a change made while it was stopped at its next start", async () => {
  const fd = new FakeDovecot();
  fd.create("");
  fd.create(".Sent");
  const m = fd.append("", "hello\r\n");
  let j = new ChangeJournal(fd.data, "a");
  let w = new MaildirWatcher({ dataDir: fd.data, journal: j, log, debounceMs: 30 });
  await w.start();
  assert.deepEqual(await journal(fd.data), [], "the first start is a baseline");
  fd.flags("", m, "S");
  const sent = fd.append(".Sent", "sent\r\n", "S");
  assert.deepEqual(summary(await waitFor(fd.data, 2)).sort(), [`append Sent ${sent}`, `flags INBOX ${m} +\\Seen -`]);
  // A new user whose Maildir appears while the watcher runs.
  fd.create("", "bob@mailha.test");
  const bm = fd.append("", "for bob\r\n", "", "bob@mailha.test");
  const withBob = await waitFor(fd.data, 3);
  assert.equal(withBob.at(-1)?.user, "bob@mailha.test");
  assert.equal(withBob.at(-1)?.key, bm);
  await w.close();
  await j.close();

  // Stopped: changes nobody watches.
  fd.flags("", m, "FS");
  fd.expunge(".Sent", sent);
  fd.create(".Drafts");
  j = new ChangeJournal(fd.data, "a");
  w = new MaildirWatcher({ dataDir: fd.data, journal: j, log, debounceMs: 30 });
  await w.start();
  const after = (await journal(fd.data)).slice(withBob.length);
  assert.deepEqual(summary(after).sort(), ["mailbox-create Drafts", `expunge Sent ${sent}`, `flags INBOX ${m} +\\Flagged -`].sort());
  await w.close();
  await j.close();
});

/** A watcher without the sweep whose rounds call ON_SCANNED after a user's scan, before its watches are synced. */
const hookedWatcher = (fd: FakeDovecot, j: ChangeJournal, onScanned: () => void) => new MaildirWatcher({ dataDir: fd.data, journal: j, log, debounceMs: 30, sweepIntervalMs: 3_600_000, onScanned });

test("a message that lands in a new folder between the round's listing and the folder's watch is journaled by the next round, not left to the sweep", async () => {
  const fd = new FakeDovecot();
  fd.create("");
  const j = new ChangeJournal(fd.data, "a");
  let sent = "";
  // The first round that sees .Sent has listed it empty; the message lands before its watches are set.
  const w = hookedWatcher(fd, j, () => {
    if (!sent && existsSync(join(fd.folder(".Sent"), "cur"))) sent = fd.append(".Sent", "sent\r\n", "S");
  });
  try {
    await w.start();
    fd.create(".Sent");
    const es = await waitFor(fd.data, 2);
    assert.deepEqual(summary(es).sort(), ["mailbox-create Sent", `append Sent ${sent}`].sort());
  } finally {
    await w.close();
    await j.close();
  }
});

test("an IMAP MOVE whose unlink comes after a round saw its link is one move, and a plain COPY is still a copy", async () => {
  const fd = new FakeDovecot();
  fd.create("");
  fd.create(".Projects");
  const m = fd.append("", "to move\r\n", "S");
  const c = fd.append("", "to copy\r\n", "S");
  const j = new ChangeJournal(fd.data, "a");
  let linked = false;
  let unlinked = false;
  // The round that sees the link (the source still there) is followed by the unlink.
  const w = hookedWatcher(fd, j, () => {
    if (linked && !unlinked) {
      unlinked = true;
      fd.expunge("", m);
    }
  });
  try {
    await w.start();
    fd.copy("", m, ".Projects");
    linked = true;
    const es = await waitFor(fd.data, 1);
    assert.deepEqual(summary(es), [`move INBOX -> Projects ${m}`]);
    assert.ok(unlinked, "the round saw the link before the unlink");
    fd.copy("", c, ".Projects");
    const more = (await waitFor(fd.data, 2)).slice(1);
    assert.deepEqual(summary(more), [`copy INBOX -> Projects ${c}`]);
  } finally {
    await w.close();
    await j.close();
  }
});

test("a watcher killed (SIGKILL) before it scanned a change journals it after a restart", async () => {
  const fd = new FakeDovecot();
  fd.create("");
  const m = fd.append("", "hello\r\n");
  const script = `
    import { ChangeJournal } from "./services/journal/changes.ts";
    import { MaildirWatcher } from "./services/journal/maildir-watch.ts";
    import { pino } from "pino";
    const j = new ChangeJournal(${JSON.stringify(fd.data)}, "a");
    const w = new MaildirWatcher({ dataDir: ${JSON.stringify(fd.data)}, journal: j, log: pino({ level: "silent" }), debounceMs: Number(process.env.DEBOUNCE) });
    await w.start();
    process.stdout.write("started\\n");
    setInterval(() => {}, 1000);
  `;
  const run = async (debounce: number) => {
    const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], { cwd: ROOT, env: { ...process.env, DEBOUNCE: String(debounce) }, stdio: ["ignore", "pipe", "inherit"] });
    await new Promise<void>((resolve, reject) => {
      child.stdout.on("data", (d) => String(d).includes("started") && resolve());
      child.on("exit", (code) => reject(new Error(`watcher exited with ${code}`)));
    });
    return child;
  };
  let child = await run(30);
  child.kill("SIGKILL");
  await new Promise((r) => child.once("exit", r));
  // Its debounce is long: the change is made, and the watcher dies before scanning it.
  child = await run(60_000);
  fd.flags("", m, "S");
  await sleep(300);
  child.kill("SIGKILL");
  await new Promise((r) => child.once("exit", r));
  assert.deepEqual(await journal(fd.data), [], "nothing journaled yet");
  child = await run(30);
  const es = await waitFor(fd.data, 1);
  child.kill("SIGKILL");
  await new Promise((r) => child.once("exit", r));
  assert.deepEqual(summary(es), [`flags INBOX ${m} +\\Seen -`]);
});

test("a folder's state is a snapshot and a log of changes: read back whole, a torn line and an old snapshot's lines passed over", async () => {
  const dir = join(root, `state${++dirs}`);
  const store = new ScanStore(dir);
  const st = (msgs: [string, string][]) => ({ v: 1 as const, guid: null, uidvalidity: 1, mt: { cur: "1", new: "2", uidlist: "" }, scannedAtMs: 5, keywords: ["Work"], msgs: new Map(msgs.map(([k, l], i) => [k, [l, i + 1, 100 + i, 10] as [string, number, number, number]])) });
  await store.saveMailbox("d/u", "", st([["a", ""], ["b", "S"]]));
  await store.saveMailbox("d/u", "", st([["a", "F"], ["c", ""]]));
  const log = join(dir, "d", "u", "m.log");
  assert.ok(existsSync(log), "the second save is a log line");
  const read = () => new ScanStore(dir).loadMailbox("d/u", "")!;
  assert.deepEqual([...read().msgs.keys()].sort(), ["a", "c"]);
  assert.equal(read().msgs.get("a")![0], "F");
  // A torn line (a crash during the write): that round is as if not saved.
  appendFileSync(log, '\n{"gen":1,"set":[["z"');
  assert.deepEqual([...read().msgs.keys()].sort(), ["a", "c"]);
  // Once the log outgrows its bound, a new snapshot; the old log's lines no longer apply.
  const big = st(Array.from({ length: 3000 }, (_, i) => [`k${i}`, i % 2 ? "S" : ""] as [string, string]));
  await store.saveMailbox("d/u", "", big);
  for (let r = 0; r < 40; r++) await store.saveMailbox("d/u", "", st(Array.from({ length: 3000 }, (_, i) => [`k${i}`, (i + r) % 3 ? "S" : "F"] as [string, string])));
  const last = st(Array.from({ length: 3000 }, (_, i) => [`k${i}`, (i + 39) % 3 ? "S" : "F"] as [string, string]));
  assert.deepEqual([...read().msgs], [...last.msgs]);
  assert.ok(!existsSync(log) || readFileSync(log, "utf8").length < 200_000, "the log is compacted into snapshots");
});
