// Mail in and out of the active node as users and senders see it: swaks and
// nodemailer deliver, imapflow and curl (IMAP, POP3) read; relaying, AUTH before
// STARTTLS, unknown users and oversize messages are refused; malformed input gets
// proper replies and leaves nothing behind; account changes reach SMTP; smtp-source's
// 5,000 messages all arrive, once each; the backup MX's spool drain is exactly-once (a
// forward repeated after its 250, or the spooled copy drained by the node itself, is
// dropped), and nobody else can name a backup MX queue id to suppress a delivery.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { chownSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import nodemailer from "nodemailer";
import { ImapFlow } from "imapflow";
import { run, runAll, sleep } from "../../common/exec.ts";
import { mailha, ROOT } from "../helpers/cli.ts";
import { spawn } from "node:child_process";
import { parseDocument } from "yaml";
import { writeTestLabConfig } from "../helpers/lab.ts";
import { RawSmtp } from "../helpers/smtp.ts";
import { RESOLVED_TTL_MS } from "../../services/smtp/recipients.ts";
import { fault } from "../helpers/cluster.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const PASS = "lab-password-alice";
const IDN = "xn--bcher-kva.test"; // bücher.test

describe("mail on the active node", { skip }, () => {
  const lab = writeTestLabConfig("m", 95);
  const maildir = (user: string, sub = "new") => join(lab.dir, "a", "data", "mail", "mailha.test", user, "Maildir", sub);
  const count = (user: string, sub = "new") => (existsSync(maildir(user, sub)) ? readdirSync(maildir(user, sub)).length : 0);

  /** swaks to node b's backup MX, again while it still waits for the recipient list (451). */
  const viaBackupMx = async (args: string[]) => {
    let sw = await runAll("swaks", ["--server", lab.b, ...args]);
    for (let i = 0; i < 20 && /451 4\.3\.0/.test(sw.stdout); i++) {
      await sleep(500);
      sw = await runAll("swaks", ["--server", lab.b, ...args]);
    }
    return sw;
  };

  before(async () => {
    // Outbound gives up after 6 s here, so the bounce test does not wait for days.
    const doc = parseDocument(readFileSync(lab.configFile, "utf8"));
    doc.setIn(["mail", "outbound", "lifetime_s"], 6);
    doc.setIn(["mail", "outbound", "retry_initial_s"], 1);
    // An internationalised domain (bücher.test), configured in its ACE form.
    doc.setIn(["mail", "domains"], doc.createNode(["mailha.test", IDN]));
    // Room for smtp-source's 5,000 messages and what the spam filter learns of each
    // (their tokens in the journal and in MariaDB: DSPAM's warm-up learns every one).
    doc.setIn(["volume", "size"], "640MiB");
    writeFileSync(lab.configFile, doc.toString());
    const r = await mailha(["lab", "up", "--config", lab.configFile]);
    assert.equal(r.code, 0, `lab up failed:\n${r.stderr}`);
    for (const [u, p] of [["bob@mailha.test", "bob-password-1"], ["carol@mailha.test", "carol-password-1"]]) {
      const a = await mailha(["user", "add", u!, "--password", p!, "--config", lab.configFile]);
      assert.equal(a.code, 0, `user add ${u}: ${a.stderr}`);
    }
    assert.equal((await mailha(["domain", "add", IDN, "--config", lab.configFile])).code, 0);
    const d = await mailha(["user", "add", `dora@${IDN}`, "--password", "dora-password-1", "--config", lab.configFile]);
    assert.equal(d.code, 0, d.stderr);
    const al = await mailha(["alias", "add", "team@mailha.test", "bob@mailha.test", "--config", lab.configFile]);
    assert.equal(al.code, 0, al.stderr);
    await mailha(["alias", "add", "team@mailha.test", "carol@mailha.test", "--config", lab.configFile]);
  });
  after(async () => {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });

  test("mailha user and alias commands manage the accounts", async () => {
    const users = JSON.parse((await mailha(["user", "list", "--json", "--config", lab.configFile])).stdout) as { email: string }[];
    assert.ok(users.some((u) => u.email === "bob@mailha.test"));
    const dup = await mailha(["user", "add", "bob@mailha.test", "--password", "another-pw-1", "--config", lab.configFile]);
    assert.equal(dup.code, 1);
    assert.match(dup.stderr, /already exists/);
    const bad = await mailha(["user", "add", "x@nodomain.example", "--password", "another-pw-1", "--config", lab.configFile]);
    assert.match(bad.stderr, /domain nodomain.example does not exist/);
    const aliases = JSON.parse((await mailha(["alias", "list", "--json", "--config", lab.configFile])).stdout) as { source: string; destination: string }[];
    assert.deepEqual(aliases.filter((a) => a.source === "team@mailha.test").map((a) => a.destination), ["bob@mailha.test", "carol@mailha.test"]);
  });

  test("swaks and nodemailer deliver; imapflow and curl read through IMAP and POP3", async () => {
    const before = count("alice");
    const sw = await run("swaks", ["--server", lab.a, "--to", "alice@mailha.test", "--from", "sender@example.net", "--h-Subject", "via swaks", "--body", "swaks body"]);
    assert.match(sw.stdout, /250 2\.0\.0/);
    const tx = nodemailer.createTransport({ host: lab.a, port: 587, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "bob@mailha.test", pass: "bob-password-1" } });
    const info = await tx.sendMail({ from: "bob@mailha.test", to: "alice@mailha.test", subject: "via nodemailer", text: "nodemailer body" });
    assert.match(info.response, /^250/);
    assert.equal(count("alice"), before + 2);
    for (const f of readdirSync(maildir("alice"))) assert.equal(statSync(join(maildir("alice"), f)).uid, 5000, `${f} belongs to the mail uid`);

    const im = new ImapFlow({ host: lab.a, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "alice@mailha.test", pass: PASS }, logger: false });
    await im.connect();
    await im.mailboxOpen("INBOX");
    const subjects: string[] = [];
    for await (const m of im.fetch("1:*", { envelope: true })) subjects.push(m.envelope?.subject ?? "");
    await im.logout();
    assert.ok(subjects.includes("via swaks") && subjects.includes("via nodemailer"), `imapflow sees both messages (${subjects.join(", ")})`);

    const imapCurl = await run("curl", ["-sk", "--ssl-reqd", `imap://${lab.a}/INBOX;UID=1`, "-u", `alice@mailha.test:${PASS}`]);
    assert.match(imapCurl.stdout, /^Subject: /m);
    const pop = await run("curl", ["-sk", "--ssl-reqd", `pop3://${lab.a}/1`, "-u", `alice@mailha.test:${PASS}`]);
    assert.match(pop.stdout, /^Return-Path: /m, "POP3 RETR returns the message");
  });

  test("submission adds a missing Date and Message-ID; mail on 25 stays as it came", async () => {
    const dir = mkdtempSync(join(tmpdir(), "mailha-sub-"));
    try {
      const bare = (subject: string) => {
        const f = join(dir, `${subject.replace(/ /g, "-")}.eml`);
        writeFileSync(f, `From: bob@mailha.test\r\nTo: alice@mailha.test\r\nSubject: ${subject}\r\n\r\nno Date, no Message-ID\r\n`);
        return `@${f}`;
      };
      const sub = await run("swaks", ["--server", lab.a, "--port", "587", "-tls", "--auth", "PLAIN", "--auth-user", "bob@mailha.test", "--auth-password", "bob-password-1", "--from", "bob@mailha.test", "--to", "alice@mailha.test", "--data", bare("bare via submission")]);
      assert.match(sub.stdout, /250 2\.0\.0/);
      const mx = await run("swaks", ["--server", lab.a, "--from", "sender@example.net", "--to", "alice@mailha.test", "--data", bare("bare via mx")]);
      assert.match(mx.stdout, /250 2\.0\.0/);
      const find = (subject: string) => readdirSync(maildir("alice")).map((f) => readFileSync(join(maildir("alice"), f), "utf8")).find((m) => m.includes(`Subject: ${subject}`)) ?? "";
      const submitted = find("bare via submission");
      assert.match(submitted, /^Date: \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000\r$/m, "submission added a Date");
      assert.match(submitted, /^Message-ID: <[0-9a-f-]{36}@mx1\.mailha\.test>\r$/m, "submission added a Message-ID");
      assert.match(submitted, /\r\nSubject: bare via submission\r\n\r\nno Date, no Message-ID\r\n/, "the message's own header and body follow untouched");
      const received = find("bare via mx");
      assert.ok(received && !/^(Date|Message-ID):/im.test(received), "mail on 25 gets no Date or Message-ID from mailha");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("the passive node: backup MX on 25 (checked, spooled, forwarded) and the proxy for IMAP, POP3 and submission", async () => {
    const before = count("alice");
    // The backup MX needs the recipient list from the active node first.
    const sw = await viaBackupMx(["--to", "alice@mailha.test", "--from", "sender@example.net", "--h-Subject", "via the backup MX"]);
    assert.match(sw.stdout, /250 2\.0\.0 Ok: queued on the backup MX/);
    for (let i = 0; i < 50 && count("alice") === before; i++) await sleep(200);
    assert.equal(count("alice"), before + 1, "the backup MX forwarded the message to the active node");
    const forwarded = readdirSync(maildir("alice")).map((f) => readFileSync(join(maildir("alice"), f), "utf8")).find((m) => m.includes("Subject: via the backup MX"));
    assert.match(forwarded ?? "", /^Received: from mx2\.mailha\.test \(\[/m, "the active node's Received line names the backup MX (its EHLO)");
    assert.match((await runAll("swaks", ["--server", lab.b, "--to", "nobody@mailha.test"])).stdout, /550 5\.1\.1/, "the backup MX refuses unknown users at RCPT (no backscatter)");
    assert.match((await runAll("swaks", ["--server", lab.b, "--to", "victim@example.org"])).stdout, /554 5\.7\.1 Relay access denied/, "the backup MX does not relay");

    const tx = nodemailer.createTransport({ host: lab.b, port: 587, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "bob@mailha.test", pass: "bob-password-1" } });
    const info = await tx.sendMail({ from: "bob@mailha.test", to: "alice@mailha.test", subject: "submitted through the passive node", text: "proxied" });
    assert.match(info.response, /^250/);
    const im = new ImapFlow({ host: lab.b, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "alice@mailha.test", pass: PASS }, logger: false });
    await im.connect();
    await im.mailboxOpen("INBOX");
    const subjects: string[] = [];
    for await (const m of im.fetch("1:*", { envelope: true })) subjects.push(m.envelope?.subject ?? "");
    await im.logout();
    assert.ok(subjects.includes("via the backup MX") && subjects.includes("submitted through the passive node"), `imapflow through the passive node sees both (${subjects.join(", ")})`);
    const pop = await run("curl", ["-sk", "--ssl-reqd", `pop3://${lab.b}/`, "-u", `alice@mailha.test:${PASS}`]);
    assert.match(pop.stdout, /^\d+ \d+/m, "POP3 LIST through the passive node");
    const log = readFileSync(join(lab.dir, "a", "log", "dovecot.log"), "utf8");
    assert.match(log, new RegExp(`rip=${lab.w.replace(/\.\d+$/, "")}\.254, lip=${lab.b.replace(/\./g, "\\.")}`), "Dovecot on the active node saw the client's own address (PROXY header)");
  });

  /** Alice's messages with SUBJECT, as stored. */
  const stored = (subject: string) => readdirSync(maildir("alice")).map((f) => readFileSync(join(maildir("alice"), f), "utf8")).filter((m) => m.includes(`Subject: ${subject}\r\n`));
  const spoolOf = (node: string) => join(lab.dir, node, "spool");
  const logOf = (file: string) => (existsSync(file) ? readFileSync(file, "utf8") : "");
  const smtpLog = () => logOf(join(lab.dir, "a", "log", "smtp.log"));
  const until = async (what: string, ok: () => boolean, ms = 30_000) => {
    for (const t0 = Date.now(); !ok(); await sleep(200)) if (Date.now() - t0 > ms) assert.fail(`waited ${ms} ms for ${what}`);
  };
  /** Sends SUBJECT through b's backup MX and returns b's queue id from its reply. */
  const spoolOnB = async (subject: string) => {
    const sw = await viaBackupMx(["--to", "alice@mailha.test", "--from", "sender@example.net", "--h-Subject", subject]);
    const id = /queued on the backup MX as (\S+)/.exec(sw.stdout)?.[1];
    assert.ok(id, `the backup MX queued the message: ${sw.stdout.slice(-400)}`);
    return id;
  };

  test("the backup MX's spool drain is exactly-once: a forward repeated after its 250, and the spooled copy drained locally, are dropped, not delivered again", async () => {
    // b fetches the recipient list before its route to a goes away.
    await spoolOnB("exactly-once warm-up");
    await until("the warm-up message to arrive", () => stored("exactly-once warm-up").length === 1);
    const subject = `exactly once ${Date.now()}`;
    // b cannot reach a for a moment: the message waits in b's spool, where the test
    // keeps a copy of its files (what b would still have had if it had died between
    // a's 250 and removing them).
    const ns = `mailha-${lab.name}-b`;
    await run("ip", ["-n", ns, "route", "add", "unreachable", `${lab.a}/32`]);
    let id = "";
    let files: [string, Buffer][] = [];
    try {
      id = await spoolOnB(subject);
      files = [`${id}.eml`, `${id}.json`].map((f) => [f, readFileSync(join(spoolOf("b"), f))]);
    } finally {
      await run("ip", ["-n", ns, "route", "del", "unreachable", `${lab.a}/32`]);
    }
    await until("b to forward the message", () => stored(subject).length === 1 && !existsSync(join(spoolOf("b"), `${id}.json`)));
    const journal = readFileSync(join(lab.dir, "a", "data", "journal", "deliveries-a.jsonl"), "utf8").split("\n").filter((l) => l.includes(id)).map((l) => JSON.parse(l) as { peerQueueId?: string; hlc?: string; mailbox: string });
    assert.equal(journal.length, 1, "a journaled the delivery once");
    assert.equal(journal[0]!.peerQueueId, id, "with the backup MX's queue id");
    assert.match(journal[0]!.hlc ?? "", /^\d{13}-\d{5}-a$/, "and an hlc stamp of node a");
    assert.ok(!stored(subject)[0]!.includes("X-Mailha-Backup-Queue-Id"), "the trace field is not stored");

    // The copy back in b's spool: b forwards it again, a answers 250 and does not deliver.
    // As the backup MX left them: owned by the mail uid it runs as (the spool's owner).
    const owner = statSync(spoolOf("b"));
    for (const [f, data] of files) {
      writeFileSync(join(spoolOf("b"), f), data, { mode: 0o600 });
      chownSync(join(spoolOf("b"), f), owner.uid, owner.gid);
    }
    await until("b to forward the copy again", () => !existsSync(join(spoolOf("b"), `${id}.json`)));
    assert.match(logOf(join(lab.dir, "b", "log", "passive.log")), new RegExp(`already delivered \\(backup MX queue id ${id}\\)`), "b was told the message was delivered already");
    assert.match(smtpLog(), new RegExp(`"peerQueueId":"${id}".*answered 250, not delivered again`), "a logged the duplicate as dropped");
    assert.equal(stored(subject).length, 1, "the message is in the mailbox once after the repeated forward");

    // The same copy in a's own spool, as after a takeover by a node that spooled it: the
    // restarted SMTP service drains its spool and drops it.
    mkdirSync(spoolOf("a"), { recursive: true, mode: 0o700 });
    for (const [f, data] of files) writeFileSync(join(spoolOf("a"), f), data, { mode: 0o600 });
    await fault(lab, "kill-service", "a", "smtp");
    await until("a's SMTP service to restart and drain its spool", () => !existsSync(join(spoolOf("a"), `${id}.json`)), 60_000);
    assert.match(smtpLog(), new RegExp(`"id":"${id}".*dropped from the spool, not delivered again`), "the spooled duplicate is logged as dropped");
    assert.equal(stored(subject).length, 1, "the message is in the mailbox exactly once");
  });

  test("a sender cannot name a backup MX queue id: a forged trace field is removed and the message delivered", async () => {
    const id = await spoolOnB("an id to forge");
    await until("the message behind the id to arrive", () => stored("an id to forge").length === 1);
    const dir = mkdtempSync(join(tmpdir(), "mailha-forge-"));
    try {
      const forged = (subject: string) => {
        const f = join(dir, `${subject.replace(/ /g, "-")}.eml`);
        writeFileSync(f, `X-Mailha-Backup-Queue-Id: ${id}\r\nFrom: mallory@example.net\r\nTo: alice@mailha.test\r\nX-Mailha-Backup-Queue-Id: ${id}\r\nSubject: ${subject}\r\n\r\nplease drop me\r\n`);
        return `@${f}`;
      };
      // Straight to a's port 25 from outside: delivered, the field stripped.
      const direct = await run("swaks", ["--server", lab.a, "--from", "mallory@example.net", "--to", "alice@mailha.test", "--data", forged("forged to a")]);
      assert.match(direct.stdout, /250 2\.0\.0 Ok: delivered as/, "a delivers it");
      // Through b's backup MX: b removes the sender's field, a believes only b's own.
      const viaB = await viaBackupMx(["--from", "mallory@example.net", "--to", "alice@mailha.test", "--data", forged("forged to b")]);
      assert.match(viaB.stdout, /250 2\.0\.0 Ok: queued on the backup MX/);
      await until("the forged message through b to arrive", () => stored("forged to b").length === 1);
      for (const subject of ["forged to a", "forged to b"]) {
        const m = stored(subject);
        assert.equal(m.length, 1, `"${subject}" is delivered once`);
        assert.ok(!/X-Mailha-Backup-Queue-Id/i.test(m[0]!), `"${subject}" is stored without the forged field`);
      }
      assert.equal(stored("an id to forge").length, 1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("an internationalised domain: mail to its ACE or its Unicode form is delivered, also through the backup MX, and read over IMAP", async () => {
    const md = join(lab.dir, "a", "data", "mail", IDN, "dora", "Maildir", "new");
    const n = () => (existsSync(md) ? readdirSync(md).length : 0);
    // smtp-server hands the domain over in Unicode whichever form the client used.
    assert.match((await run("swaks", ["--server", lab.a, "--to", `dora@${IDN}`, "--h-Subject", "to the ACE form"])).stdout, /250 2\.0\.0/);
    assert.match((await run("swaks", ["--server", lab.a, "--to", "dora@bücher.test", "--h-Subject", "to the Unicode form"])).stdout, /250 2\.0\.0/);
    assert.equal(n(), 2);
    assert.match(readFileSync(join(md, readdirSync(md)[0]!), "utf8"), new RegExp(`for <dora@${IDN}>`), "the envelope is kept in ACE form");
    assert.match((await runAll("swaks", ["--server", lab.a, "--to", "nobody@bücher.test"])).stdout, /550 5\.1\.1 <nobody@xn--bcher-kva\.test>/, "an unknown user of the domain is refused by name");
    const sw = await viaBackupMx(["--to", "dora@bücher.test", "--h-Subject", "through the backup MX"]);
    assert.match(sw.stdout, /250 2\.0\.0 Ok: queued on the backup MX/);
    for (let i = 0; i < 50 && n() < 3; i++) await sleep(200);
    assert.equal(n(), 3, "the backup MX forwarded it");
    const im = new ImapFlow({ host: lab.a, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: `dora@${IDN}`, pass: "dora-password-1" }, logger: false });
    await im.connect();
    await im.mailboxOpen("INBOX");
    const subjects: string[] = [];
    for await (const m of im.fetch("1:*", { envelope: true })) subjects.push(m.envelope?.subject ?? "");
    await im.logout();
    assert.deepEqual(subjects.sort(), ["through the backup MX", "to the ACE form", "to the Unicode form"]);
  });

  test("an alias delivers one copy to each member", async () => {
    const b0 = count("bob");
    const c0 = count("carol");
    const sw = await run("swaks", ["--server", lab.a, "--to", "team@mailha.test", "--from", "x@example.net"]);
    assert.match(sw.stdout, /250 2\.0\.0/);
    assert.equal(count("bob"), b0 + 1);
    assert.equal(count("carol"), c0 + 1);
  });

  test("submission: a local envelope sender is only for its own user and the members of its alias (587, 465, through b)", async () => {
    const tx = nodemailer.createTransport({ host: lab.a, port: 587, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "bob@mailha.test", pass: "bob-password-1" } });
    try {
      const send = (from: string) => tx.sendMail({ from, to: "carol@mailha.test", subject: `sent as ${from}`, text: "x" });
      await assert.rejects(send("alice@mailha.test"), (e: { responseCode?: number; response?: string }) => e.responseCode === 553 && /not owned by bob@mailha\.test/.test(e.response ?? ""), "bob may not send as alice");
      await assert.rejects(send("nobody@mailha.test"), (e: { responseCode?: number }) => e.responseCode === 553, "nor as an address of a local domain that does not exist");
      assert.match((await send("team@mailha.test")).response, /^250/, "bob is a member of team@: allowed");
      assert.match((await send("Bob@MailHa.test")).response, /^250/, "his own address, in any case");
      assert.match((await send("bob@elsewhere.example")).response, /^250/, "other domains are the receivers' to judge");
    } finally {
      tx.close();
    }
    // The same rule on 465 and through the passive node's proxy.
    for (const [host, port] of [[lab.a, 465], [lab.b, 587]] as const) {
      const t = nodemailer.createTransport({ host, port, secure: port === 465, requireTLS: port === 587, tls: { rejectUnauthorized: false }, auth: { user: "bob@mailha.test", pass: "bob-password-1" } });
      try {
        await assert.rejects(t.sendMail({ from: "alice@mailha.test", to: "carol@mailha.test", subject: "spoof", text: "x" }), (e: { responseCode?: number }) => e.responseCode === 553, `${host}:${port}`);
      } finally {
        t.close();
      }
    }
  });

  test("account changes reach SMTP: a new user at once, a removed one within 5 seconds", async () => {
    // Refused first, so a cached "unknown" would show here.
    assert.match((await runAll("swaks", ["--server", lab.a, "--to", "dave@mailha.test", "--from", "x@example.net"])).stdout, /550 5\.1\.1/);
    assert.equal((await mailha(["user", "add", "dave@mailha.test", "--password", "dave-password-1", "--config", lab.configFile])).code, 0);
    assert.match((await run("swaks", ["--server", lab.a, "--to", "dave@mailha.test", "--from", "x@example.net"])).stdout, /250 2\.0\.0/, "the new user receives mail at once");
    assert.equal(count("dave"), 1);
    const del = await mailha(["user", "del", "dave@mailha.test", "--config", lab.configFile]);
    assert.equal(del.code, 0, del.stderr);
    await sleep(RESOLVED_TTL_MS + 500);
    assert.match((await runAll("swaks", ["--server", lab.a, "--to", "dave@mailha.test", "--from", "x@example.net"])).stdout, /550 5\.1\.1/, "the removed user is refused after the cache time");
    assert.equal(count("dave"), 1);
  });

  test("refusals: relaying without AUTH, AUTH before STARTTLS, an unknown user, an oversize message", async () => {
    const relay = await runAll("swaks", ["--server", lab.a, "--to", "victim@example.org", "--from", "x@example.net"]);
    assert.match(relay.stdout, /554 5\.7\.1 Relay access denied/);
    const c = await RawSmtp.open(lab.a, 587);
    assert.match(await c.cmd("EHLO test"), /^250/);
    assert.match(await c.cmd(`AUTH PLAIN ${Buffer.from(`\0alice@mailha.test\0${PASS}`).toString("base64")}`), /^5\d\d .*STARTTLS/);
    c.close();
    const unknown = await runAll("swaks", ["--server", lab.a, "--to", "nobody@mailha.test"]);
    assert.match(unknown.stdout, /550 5\.1\.1/);
    const before = count("alice");
    const bigFile = join(dirname(lab.configFile), "big-body.txt");
    writeFileSync(bigFile, `${"x".repeat(80)}\n`.repeat(400_000)); // 32 MB, over the 25 MiB limit
    const big = await runAll("swaks", ["--server", lab.a, "--to", "alice@mailha.test", "--body", bigFile], { timeoutMs: 120_000 });
    assert.match(big.stdout, /552/);
    // Through submission too, where the message passes the header completion first.
    const sub = await runAll("swaks", ["--server", lab.a, "--port", "587", "-tls", "--auth", "PLAIN", "--auth-user", "bob@mailha.test", "--auth-password", "bob-password-1", "--from", "bob@mailha.test", "--to", "alice@mailha.test", "--body", bigFile], { timeoutMs: 120_000 });
    assert.match(sub.stdout, /552/);
    assert.equal(count("alice"), before, "the oversize message is not delivered");
  });

  test("malformed input gets SMTP replies and leaves nothing in the Maildir", async () => {
    const before = count("alice");
    const tmpBefore = count("alice", "tmp");
    const cases: [string, Buffer][] = [
      ["a line over 1000 bytes", Buffer.from(`Subject: long\r\n\r\n${"y".repeat(1200)}\r\n.\r\n`)],
      ["a bare LF", Buffer.from("Subject: lf\r\n\r\nline one\nline two\r\n.\r\n")],
      ["NUL bytes", Buffer.concat([Buffer.from("Subject: nul\r\n\r\nbefore"), Buffer.from([0]), Buffer.from("after\r\n.\r\n")])],
    ];
    for (const [what, body] of cases) {
      const c = await RawSmtp.open(lab.a, 25);
      await c.cmd("EHLO test");
      assert.match(await c.cmd("MAIL FROM:<x@example.net>"), /^250/);
      assert.match(await c.cmd("RCPT TO:<alice@mailha.test>"), /^250/);
      assert.match(await c.cmd("DATA"), /^354/);
      const r = await c.cmd(body);
      assert.match(r, /^554 5\.6\.0/, `${what}: expected a 554 5.6.0 reply, got ${r}`);
      assert.match(await c.cmd("NOOP"), /^250/, `${what}: the session goes on after the refusal`);
      c.close();
    }
    // A flood of nonsense commands is cut off with 421; a flood of NOOPs is answered.
    const f = await RawSmtp.open(lab.a, 25);
    let last = "";
    for (let i = 0; i < 12 && last !== "closed"; i++) last = await f.cmd(`XYZZY ${i}`);
    assert.match(last, /^421|closed/);
    f.close();
    const n = await RawSmtp.open(lab.a, 25);
    n.send("NOOP\r\n".repeat(500));
    let answered = 0;
    for (let i = 0; i < 500; i++) if (/^250/.test(await n.reply(5000))) answered++;
    assert.equal(answered, 500, "pipelined NOOPs are all answered");
    n.close();
    // DATA that never ends: the client goes away in the middle.
    const u = await RawSmtp.open(lab.a, 25);
    await u.cmd("EHLO test");
    await u.cmd("MAIL FROM:<x@example.net>");
    await u.cmd("RCPT TO:<alice@mailha.test>");
    await u.cmd("DATA");
    u.send("Subject: cut\r\n\r\nhalf a message...\r\n");
    await sleep(200);
    u.close();
    await sleep(500);
    assert.equal(count("alice"), before, "nothing malformed reached new/");
    assert.equal(count("alice", "tmp"), tmpBefore, "and nothing is left in tmp/");
  });

  test("outbound: delivered to another domain's MX (a sink on the third host); an unreachable one is retried, then bounced", async () => {
    const sinkDir = join(dirname(lab.configFile), "sink");
    const sink = spawn("nsenter", [`--net=/run/netns/mailha-${lab.name}-w`, process.execPath, "--import", "tsx", join(ROOT, "test", "helpers", "sink.ts"), lab.w, sinkDir], { cwd: ROOT, stdio: ["ignore", "pipe", "inherit"] });
    try {
      await new Promise<void>((resolve) => sink.stdout!.once("data", () => resolve()));
      const tx = nodemailer.createTransport({ host: lab.a, port: 587, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "bob@mailha.test", pass: "bob-password-1" } });
      const ok = await tx.sendMail({ from: "bob@mailha.test", to: "someone@sink.test", subject: "outbound to the sink", text: "hello out there" });
      assert.match(ok.response, /^250 2\.0\.0 Ok: queued as/);
      for (let i = 0; i < 100 && !(existsSync(sinkDir) && readdirSync(sinkDir).some((f) => f.endsWith(".eml"))); i++) await sleep(200);
      const got = readdirSync(sinkDir).filter((f) => f.endsWith(".eml")).map((f) => readFileSync(join(sinkDir, f), "utf8"));
      assert.ok(got.some((m) => m.includes("outbound to the sink")), "the sink on the third host received the message");

      const b0 = count("bob");
      const dead = await tx.sendMail({ from: "bob@mailha.test", to: "nobody@dead.test", subject: "to a host that refuses", text: "this will bounce" });
      assert.match(dead.response, /^250/);
      // This lab's outbound lifetime is 6 s, first retry after 1 s: tries at about 0,
      // 1, 3 and 7 s, then a bounce.
      for (let i = 0; i < 150 && count("bob") === b0; i++) await sleep(200);
      assert.equal(count("bob"), b0 + 1, "bob got exactly one bounce");
      const bounce = readdirSync(maildir("bob")).map((f) => readFileSync(join(maildir("bob"), f), "utf8")).find((m) => m.includes("Undelivered Mail Returned to Sender"));
      assert.ok(bounce, "the bounce is in bob's INBOX");
      assert.match(bounce!, /report-type=delivery-status/);
      assert.match(bounce!, /Final-Recipient: rfc822; nobody@dead\.test/);
      assert.match(bounce!, /Action: failed/);
      assert.match(bounce!, /Subject: to a host that refuses/, "the bounce carries the original headers");
      const tries = readFileSync(join(lab.dir, "a", "log", "smtp.log"), "utf8").split("\n").filter((l) => l.includes("outbound attempt failed")).length;
      assert.ok(tries >= 2, `the message was retried before the bounce (${tries} failed attempts logged)`);
    } finally {
      sink.kill("SIGTERM");
    }
  });

  /** Python's smtplib (a client nobody here wrote) running SCRIPT against HOST; its JSON output. In W, from the third host's address. */
  const smtplib = async (script: string, o: { inW?: boolean } = {}): Promise<unknown> => {
    const pre = "import smtplib, ssl, json, time\nctx = ssl.create_default_context()\nctx.check_hostname = False\nctx.verify_mode = ssl.CERT_NONE\n";
    const args = ["-c", pre + script];
    const r = o.inW ? await runAll("nsenter", [`--net=/run/netns/mailha-${lab.name}-w`, "python3", ...args], { timeoutMs: 120_000 }) : await runAll("python3", args, { timeoutMs: 120_000 });
    assert.equal(r.code, 0, `smtplib script failed: ${r.stderr.slice(-800)}`);
    return JSON.parse(r.stdout.trim().split("\n").pop()!);
  };
  /** One transaction on a raw connection to HOST:25; the replies. */
  const transaction = async (host: string, lines: string[], body?: string) => {
    const c = await RawSmtp.open(host, 25);
    const replies: string[] = [];
    try {
      for (const l of lines) replies.push(await c.cmd(l));
      if (body !== undefined) {
        replies.push(await c.cmd("DATA"));
        replies.push(await c.cmd(`${body}\r\n.\r\n`.replace(/\r\n\r\n\.\r\n$/, "\r\n.\r\n")));
      }
    } finally {
      c.close();
    }
    return replies;
  };
  /** Waits until b's backup MX accepts RCPT ADDRESS (its recipient list has it). */
  const bKnows = async (address: string) => {
    for (let i = 0; i < 100; i++) {
      const r = await transaction(lab.b, ["EHLO probe", "MAIL FROM:<probe@example.net>", `RCPT TO:<${address}>`]);
      if (/^250/.test(r[2] ?? "")) return;
      await sleep(500);
    }
    assert.fail(`the backup MX never accepted ${address}`);
  };

  test("a message goes to the recipients of its own transaction: RSET, EHLO and STARTTLS forget the earlier ones", async () => {
    for (const reset of ["RSET", "EHLO again"]) {
      const [a0, b0] = [count("alice"), count("bob")];
      const r = await transaction(lab.a, ["EHLO test", "MAIL FROM:<x@example.net>", "RCPT TO:<bob@mailha.test>", reset, "MAIL FROM:<x@example.net>", "RCPT TO:<alice@mailha.test>"], `Subject: after ${reset}\r\n\r\nfor alice only`);
      assert.match(r.at(-1)!, /^250/, `${reset}: ${r.join(" | ")}`);
      assert.equal(count("alice"), a0 + 1, `${reset}: alice gets the message`);
      assert.equal(count("bob"), b0, `${reset}: bob, named before the ${reset}, gets nothing`);
    }
    const [a0, b0] = [count("alice"), count("bob")];
    const got = (await smtplib(`s = smtplib.SMTP("${lab.a}", 25, timeout=30)
s.ehlo("test")
s.mail("x@example.net")
s.rcpt("bob@mailha.test")
s.starttls(context=ctx)
s.ehlo("test")
s.mail("x@example.net")
s.rcpt("alice@mailha.test")
code, _ = s.data(b"Subject: after STARTTLS\\r\\n\\r\\nfor alice only\\r\\n")
s.quit()
print(json.dumps(code))`)) as number;
    assert.equal(got, 250);
    assert.equal(count("alice"), a0 + 1, "STARTTLS: alice gets the message");
    assert.equal(count("bob"), b0, "STARTTLS: bob, named before it, gets nothing");
  });

  test("limits: at most 50 connections from one address (421 4.7.0 after), 100 messages per session (452 4.5.3 after); refusals in the metrics", async () => {
    const { createConnection } = await import("node:net");
    const greet = (host: string) =>
      new Promise<{ line: string; close: () => void }>((resolve) => {
        const s = createConnection({ host, port: 25 });
        let buf = "";
        s.on("error", () => resolve({ line: "error", close: () => s.destroy() }));
        s.on("data", (d) => {
          buf += d.toString();
          if (buf.includes("\r\n")) resolve({ line: buf.split("\r\n")[0]!, close: () => s.destroy() });
        });
      });
    const held = [];
    try {
      for (let i = 0; i < 50; i++) held.push(await greet(lab.a));
      assert.ok(held.every((h) => /^220 /.test(h.line)), `the first 50 are greeted: ${held.map((h) => h.line).find((l) => !/^220 /.test(l))}`);
      const over = await greet(lab.a);
      over.close();
      assert.match(over.line, /^421 4\.7\.0 Too many connections from your address/);
      held.pop()!.close();
      await sleep(300);
      const again = await greet(lab.a);
      held.push(again);
      assert.match(again.line, /^220 /, "a slot freed is taken again");
    } finally {
      for (const h of held) h.close();
    }
    // The server counts a closed connection out when it sees the close: wait for a greeting.
    for (let i = 0; i < 50; i++) {
      const g = await greet(lab.a);
      g.close();
      if (/^220 /.test(g.line)) break;
      await sleep(200);
    }
    await sleep(300);
    const c = await RawSmtp.open(lab.a, 25);
    try {
      assert.match(await c.cmd("EHLO test"), /^250/);
      for (let i = 0; i < 100; i++) {
        assert.match(await c.cmd("MAIL FROM:<x@example.net>"), /^250/);
        assert.match(await c.cmd("RSET"), /^250/);
      }
      assert.match(await c.cmd("MAIL FROM:<x@example.net>"), /^452 4\.5\.3 Too many messages in one session/);
    } finally {
      c.close();
    }
    let metrics = "";
    for (let i = 0; i < 30 && !/service="smtp",name="messages_refused"\} [1-9]/.test(metrics); i++) {
      await sleep(500);
      metrics = (await runAll("curl", ["-s", `http://${lab.a}:9647/metrics`])).stdout;
    }
    assert.match(metrics, /mailha_service_value\{node="a",service="smtp",name="per_address_refused"\} [1-9]/);
    assert.match(metrics, /mailha_service_value\{node="a",service="smtp",name="messages_refused"\} [1-9]/);
    assert.match(metrics, /mailha_limit\{node="a",limit="smtp_clients_per_address_max"\} 50/);
    // b's passive services publish theirs too (the proxy took this suite's IMAP and POP3).
    let mb = "";
    for (let i = 0; i < 30 && !/service="proxy",name="accepted"\} [1-9]/.test(mb); i++) {
      if (i) await sleep(500); // the services publish every 5 s
      mb = (await runAll("curl", ["-s", `http://${lab.b}:9647/metrics`])).stdout;
    }
    assert.match(mb, /mailha_service_value\{node="b",service="proxy",name="accepted"\} [1-9]/);
    assert.match(mb, /mailha_service_value\{node="b",service="backup-mx",name="spooled"\} \d+/);
  });

  test("mailha spam: train a Maildir of spam and files of ham, classify, each message learned once, stats, a DSPAM dump imported", async () => {
    const dir = mkdtempSync(join(tmpdir(), "mailha-spam-"));
    try {
      const spamWords = ["viagra", "casino", "lottery", "winner", "bitcoin", "pharmacy", "discount", "prize", "claim", "cheap"];
      const hamWords = ["meeting", "agenda", "minutes", "project", "schedule", "review", "budget", "report", "colleague", "quarterly"];
      const msg = (words: string[], i: number, from: string) => {
        const pick = (k: number) => words[(i * 7 + k * 3) % words.length];
        return `From: ${from}\r\nTo: dave@mailha.test\r\nSubject: ${pick(0)} ${pick(1)} ${i}\r\nMessage-ID: <${from.split("@")[0]}-${i}@example.net>\r\n\r\n${Array.from({ length: 40 }, (_, k) => pick(k)).join(" ")}\r\n`;
      };
      mkdirSync(join(dir, "spam", "cur"), { recursive: true });
      mkdirSync(join(dir, "spam", "new"), { recursive: true });
      mkdirSync(join(dir, "ham"), { recursive: true });
      for (let i = 0; i < 30; i++) writeFileSync(join(dir, "spam", i % 2 ? "cur" : "new", `${i}.eml`), msg(spamWords, i, "offers@spam.example"));
      for (let i = 0; i < 30; i++) writeFileSync(join(dir, "ham", `${i}.eml`), msg(hamWords, i, "boss@work.example"));
      const cli = (args: string[]) => mailha([...args, "--config", lab.configFile]);
      // A DSPAM database comes over first, into the empty filter.
      const imp = await cli(["spam", "import", "--dspam-dump", join(ROOT, "test", "fixtures", "spam", "dspam-dump.sql"), "--json"]);
      assert.equal(imp.code, 0, imp.stderr);
      const alice = JSON.parse((await cli(["spam", "stats", "--user", "alice@example.org", "--json"])).stdout) as { totals: { spam_learned: number; innocent_learned: number } }[];
      assert.deepEqual([alice[0]!.totals.spam_learned, alice[0]!.totals.innocent_learned], [250, 610], "DSPAM's stats row came over");
      // dave had mail before (an earlier test): what the filter learned of it is the base.
      const base = ((r) => (r.code === 0 ? (JSON.parse(r.stdout) as { totals: { spam_learned: number; innocent_learned: number } }[])[0]!.totals : { spam_learned: 0, innocent_learned: 0 }))(await cli(["spam", "stats", "--user", "dave@mailha.test", "--json"]));
      const trainSpam = await cli(["spam", "train", "--spam", "--user", "dave@mailha.test", join(dir, "spam"), "--json"]);
      assert.equal(trainSpam.code, 0, trainSpam.stderr);
      assert.deepEqual(((r) => [r.messages, r.learned])(JSON.parse(trainSpam.stdout) as { messages: number; learned: number }), [30, 30], "a Maildir's cur/ and new/ are read");
      const trainHam = await cli(["spam", "train", "--ham", "--user", "dave@mailha.test", join(dir, "ham"), "--json"]);
      assert.equal(trainHam.code, 0, trainHam.stderr);
      const again = JSON.parse((await cli(["spam", "train", "--ham", "--user", "dave@mailha.test", join(dir, "ham"), "--json"])).stdout) as { learned: number; totals: { innocent_learned: number; spam_learned: number } };
      assert.equal(again.learned, 0, "the same messages are not learned twice");
      assert.deepEqual([again.totals.spam_learned - base.spam_learned, again.totals.innocent_learned - base.innocent_learned], [30, 30]);
      writeFileSync(join(dir, "new-spam.eml"), msg(spamWords, 101, "more@spam.example"));
      writeFileSync(join(dir, "new-ham.eml"), msg(hamWords, 102, "boss@work.example"));
      const v = async (f: string) => JSON.parse((await cli(["spam", "classify", "--user", "dave@mailha.test", join(dir, f), "--json"])).stdout) as { result: string; probability: number; tokens: unknown[] };
      const vs = await v("new-spam.eml");
      const vh = await v("new-ham.eml");
      assert.equal(vs.result, "spam", `a spam-like message: ${JSON.stringify(vs).slice(0, 300)}`);
      assert.equal(vh.result, "innocent", `a ham-like message: ${JSON.stringify(vh).slice(0, 300)}`);
      assert.ok(vs.tokens.length > 0, "classify names the tokens that decided");
      const stats = JSON.parse((await cli(["spam", "stats", "--user", "dave@mailha.test", "--json"])).stdout) as { totals: { spam_learned: number } }[];
      assert.equal(stats[0]!.totals.spam_learned - base.spam_learned, 30, "classify learned nothing");
      const twice = await cli(["spam", "import", "--dspam-dump", join(ROOT, "test", "fixtures", "spam", "dspam-dump.sql")]);
      assert.equal(twice.code, 2, "a dump is not imported over users the filter has");
      assert.match(twice.stderr, /has learned data for 2 user\(s\) of the dump already/);
      const bad = await cli(["spam", "train", "--user", "dave@mailha.test", join(dir, "ham")]);
      assert.equal(bad.code, 2, "--spam or --ham is required");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("the spam filter at delivery: spam through either MX lands in Junk with its verdict, ham in INBOX; a submission is not classified; broken, huge and many-part messages are delivered with a reason", async () => {
    const dir = mkdtempSync(join(tmpdir(), "mailha-spam-at-"));
    const cli = (args: string[]) => mailha([...args, "--config", lab.configFile]);
    try {
      assert.equal((await cli(["user", "add", "erin@mailha.test", "--password", "erin-password-1"])).code, 0);
      const spamWords = ["viagra", "casino", "lottery", "winner", "bitcoin", "pharmacy", "discount", "prize", "claim", "cheap"];
      const hamWords = ["meeting", "agenda", "minutes", "project", "schedule", "review", "budget", "report", "colleague", "quarterly"];
      const msg = (words: string[], i: number, from: string) => {
        const pick = (k: number) => words[(i * 7 + k * 3) % words.length];
        return `From: ${from}\r\nTo: erin@mailha.test\r\nSubject: ${pick(0)} ${pick(1)} ${i}\r\nMessage-ID: <${from.split("@")[0]}-${i}-at@example.net>\r\n\r\n${Array.from({ length: 40 }, (_, k) => pick(k)).join(" ")}\r\n`;
      };
      mkdirSync(join(dir, "spam"));
      mkdirSync(join(dir, "ham"));
      for (let i = 0; i < 30; i++) writeFileSync(join(dir, "spam", `${i}.eml`), msg(spamWords, i, "offers@spam.example"));
      for (let i = 0; i < 30; i++) writeFileSync(join(dir, "ham", `${i}.eml`), msg(hamWords, i, "boss@work.example"));
      assert.equal((await cli(["spam", "train", "--spam", "--user", "erin@mailha.test", join(dir, "spam")])).code, 0);
      assert.equal((await cli(["spam", "train", "--ham", "--user", "erin@mailha.test", join(dir, "ham")])).code, 0);
      const stats = async () => (JSON.parse((await cli(["spam", "stats", "--user", "erin@mailha.test", "--json"])).stdout) as { totals: Record<string, number> }[])[0]!.totals;
      const seen = (t: Record<string, number>) => ["spam_learned", "innocent_learned", "spam_classified", "innocent_classified"].reduce((n, k) => n + (t[k] ?? 0), 0);
      const earlier = seen(await stats());
      const erin = (sub: string) => join(lab.dir, "a", "data", "mail", "mailha.test", "erin", "Maildir", sub);
      const findIn = (sub: string, text: string) => (existsSync(erin(sub)) ? readdirSync(erin(sub)).map((f) => readFileSync(join(erin(sub), f), "latin1")).find((m) => m.includes(text)) : undefined);
      const send = async (server: string, body: string, via = "a") => {
        const f = join(dir, `send-${Math.random().toString(36).slice(2)}.eml`);
        writeFileSync(f, body);
        const args = ["--suppress-data", "--from", "someone@example.net", "--to", "erin@mailha.test", "--data", `@${f}`];
        const sw = via === "b" ? await viaBackupMx(args) : await runAll("swaks", ["--server", server, ...args]);
        assert.match(sw.stdout, /250 2\.0\.0/, sw.stdout.slice(-500));
      };
      await send(lab.a, msg(spamWords, 201, "deals@spam.example"));
      await send(lab.a, msg(hamWords, 202, "boss@work.example"));
      const spam = findIn(".Junk/new", "-201-at@");
      assert.ok(spam, "the spam-like message is in erin's Junk");
      assert.ok(!findIn("new", "-201-at@"), "and not in her INBOX");
      assert.match(spam!, /^Return-Path: <someone@example\.net>\r\nReceived: [^]*?\r\nX-DSPAM-Result: Spam\r\n/, "the verdict follows the trace fields");
      assert.match(spam!, /^X-DSPAM-Signature: \d+,[0-9a-f]+\r$/m);
      assert.match(spam!, /^X-DSPAM-Probability: (0|1)\.\d{4}\r$/m);
      assert.match(spam!, /^X-DSPAM-Confidence: (0|1)\.\d{4}\r$/m);
      const ham = findIn("new", "-202-at@");
      assert.ok(ham, "the ham-like message is in INBOX");
      assert.match(ham!, /^X-DSPAM-Result: Innocent\r$/m);
      // Through b's backup MX (forwarded to a's port 25): classified the same.
      await send(lab.b, msg(spamWords, 203, "deals@spam.example"), "b");
      let viaB: string | undefined;
      for (let i = 0; i < 60 && !viaB; i++) {
        viaB = findIn(".Junk/new", "-203-at@");
        if (!viaB) await sleep(500);
      }
      assert.ok(viaB, "spam through the backup MX is in Junk too");
      const later = await stats();
      assert.equal(seen(later) - earlier, 3, `each delivery counted once (learned or classified): ${JSON.stringify(later)}`);
      // IMAP: Junk is the \Junk special-use folder and holds the spam.
      const im = new ImapFlow({ host: lab.a, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "erin@mailha.test", pass: "erin-password-1" }, logger: false });
      await im.connect();
      try {
        const junk = (await im.list()).find((b) => b.specialUse === "\\Junk");
        assert.equal(junk?.path, "Junk", "the \\Junk folder is Junk");
        const st = await im.status("Junk", { messages: true });
        assert.equal((st as { messages?: number }).messages, 2, "both spam messages are in Junk");
      } finally {
        await im.logout();
      }
      // A user's own submission is not classified.
      const sub = await run("swaks", ["--server", lab.a, "--port", "587", "-tls", "--auth", "PLAIN", "--auth-user", "bob@mailha.test", "--auth-password", "bob-password-1", "--from", "bob@mailha.test", "--to", "erin@mailha.test", "--header", "Subject: cheap casino lottery from bob"]);
      assert.match(sub.stdout, /250 2\.0\.0/);
      const fromBob = findIn("new", "cheap casino lottery from bob");
      assert.ok(fromBob && !/X-DSPAM-/.test(fromBob), "submitted mail is delivered as it is");
      // spam_action tag: spam stays in INBOX, with its verdict.
      const tag = await cli(["spam", "prefs", "--user", "erin@mailha.test", "--set", "spam_action=tag", "--json"]);
      assert.equal(tag.code, 0, tag.stderr);
      assert.equal((JSON.parse(tag.stdout) as { effective: { spam_action: string } }).effective.spam_action, "tag");
      assert.equal((await cli(["spam", "prefs", "--set", "spam_action=bin"])).code, 2, "a bad value is refused");
      await send(lab.a, msg(spamWords, 204, "deals@spam.example"));
      const tagged = findIn("new", "-204-at@");
      assert.ok(tagged, "with spam_action tag, spam is delivered to INBOX");
      assert.match(tagged!, /^X-DSPAM-Result: Spam\r$/m, "tagged as spam");
      // spam_action quarantine: spam is held where no mail client sees it, until released or deleted.
      assert.equal((await cli(["spam", "prefs", "--user", "erin@mailha.test", "--set", "spam_action=quarantine"])).code, 0);
      const before = await stats();
      await send(lab.a, msg(spamWords, 205, "deals@spam.example"));
      await send(lab.a, msg(spamWords, 206, "deals@spam.example"));
      assert.ok(!findIn("new", "-205-at@") && !findIn(".Junk/new", "-205-at@"), "held spam is in neither INBOX nor Junk");
      const listed = await cli(["spam", "quarantine", "list", "--user", "erin@mailha.test", "--json"]);
      assert.equal(listed.code, 0, listed.stderr);
      const held = JSON.parse(listed.stdout) as { key: string; subject: string; from: string; probability: string }[];
      const h205 = held.find((h) => h.subject.endsWith(" 205"));
      const h206 = held.find((h) => h.subject.endsWith(" 206"));
      assert.ok(h205 && h206, `both are listed: ${listed.stdout}`);
      assert.equal(h205.from, "deals@spam.example");
      assert.match(h205.probability, /^(0|1)\.\d{4}$/);
      assert.match((await cli(["spam", "quarantine", "list"])).stdout, / 205 /, "the text listing shows it too");
      const im2 = new ImapFlow({ host: lab.a, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "erin@mailha.test", pass: "erin-password-1" }, logger: false });
      await im2.connect();
      try {
        const boxes = (await im2.list()).map((b) => b.path);
        assert.ok(!boxes.some((b) => /quarantine/i.test(b)), `IMAP shows no quarantine folder: ${boxes.join(", ")}`);
        await im2.mailboxOpen("INBOX");
        assert.equal(((await im2.search({ header: { "message-id": "-205-at@" } })) || []).length, 0, "not in INBOX over IMAP");
      } finally {
        await im2.logout();
      }
      // The quarantine's notice (DSPAM's dspam_notify): into erin's INBOX, listing what was held, once.
      const dg = await cli(["spam", "quarantine", "digest", "--user", "erin@mailha.test", "--json"]);
      assert.equal(dg.code, 0, dg.stderr);
      assert.deepEqual((JSON.parse(dg.stdout) as { user: string; listed: number }[]).map((d) => [d.user, d.listed]), [["erin@mailha.test", 2]]);
      const im4 = new ImapFlow({ host: lab.a, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "erin@mailha.test", pass: "erin-password-1" }, logger: false });
      await im4.connect();
      try {
        await im4.mailboxOpen("INBOX");
        const notices = (await im4.search({ header: { "x-mailha-digest": "quarantine" } })) || [];
        assert.equal(notices.length, 1, "one notice in INBOX over IMAP");
        const fetched = await im4.fetchOne(String(notices[0]), { source: true }, { uid: false });
        assert.ok(fetched && fetched.source, "the notice can be fetched");
        const text = fetched.source.toString("utf8");
        assert.match(text, /^Subject: 2 messages held as spam for you\r$/m);
        for (const h of [h205, h206]) assert.ok(text.includes(`Key:     ${h.key}`) && text.includes(h.subject), `the notice lists ${h.subject} and its key`);
      } finally {
        await im4.logout();
      }
      const again = await cli(["spam", "quarantine", "digest", "--user", "erin@mailha.test"]);
      assert.match(again.stdout, /nothing new \(2 held, listed before\): no notice/, "listed once");
      // Release by erin herself: a message from her account (587) to the notice's address
      // with "release KEY" (its mailto link); the spam worker releases it within seconds,
      // into INBOX (IMAP sees it), retrained as innocent.
      const tx = nodemailer.createTransport({ host: lab.a, port: 587, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "erin@mailha.test", pass: "erin-password-1" } });
      try {
        await assert.rejects(tx.sendMail({ from: "erin@mailha.test", to: "quarantine-release@mailha.test", subject: "release 1234.M5P6Q7.nowhere", text: "" }), /550 5\.1\.1 Not held for erin@mailha\.test/, "a key not held for her: refused, nothing asked");
        await assert.rejects(tx.sendMail({ from: "erin@mailha.test", to: "quarantine-release@mailha.test", subject: "please let my mail out", text: "" }), /550 5\.5\.2 Not a release request/);
        const mixed = await tx.sendMail({ from: "erin@mailha.test", to: ["bob@mailha.test", "quarantine-release@mailha.test"], subject: `release ${h205.key}`, text: "" });
        assert.deepEqual(mixed.rejected, ["quarantine-release@mailha.test"], "a request with other recipients: the request address is refused (5.5.1), bob gets the mail");
        assert.match(JSON.stringify(mixed.rejectedErrors ?? []), /5\.5\.1 A release request goes to quarantine-release@ alone/);
        assert.ok(!findIn("new", "-205-at@"), "none of those released anything");
        const info = await tx.sendMail({ from: "erin@mailha.test", to: "quarantine-release@mailha.test", subject: `release ${h205.key}`, text: "" });
        assert.match(info.response, /^250 2\.0\.0 Ok: the message will be in your inbox within seconds/);
      } finally {
        tx.close();
      }
      // On port 25 the address is nothing special: nobody there.
      const outside = await runAll("swaks", ["--server", lab.a, "--from", "someone@example.net", "--to", "quarantine-release@mailha.test", "--header", `Subject: release ${h206.key}`]);
      assert.match(outside.stdout, /550 5\.1\.1 <quarantine-release@mailha\.test>: Recipient address rejected: User unknown/, outside.stdout.slice(-400));
      for (let i = 0; i < 100 && !(findIn("new", "-205-at@") ?? findIn("cur", "-205-at@")); i++) await sleep(100);
      assert.ok(findIn("new", "-205-at@") ?? findIn("cur", "-205-at@"), "released into INBOX within 10 s");
      assert.ok((JSON.parse((await cli(["spam", "quarantine", "list", "--user", "erin@mailha.test", "--json"])).stdout) as { key: string }[]).some((h) => h.key === h206.key), "the other held message is still held");
      const im3 = new ImapFlow({ host: lab.a, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "erin@mailha.test", pass: "erin-password-1" }, logger: false });
      await im3.connect();
      try {
        await im3.mailboxOpen("INBOX");
        const found = await im3.search({ header: { "message-id": "-205-at@" } });
        assert.equal((found || []).length, 1, "the released message is in INBOX over IMAP, once");
      } finally {
        await im3.logout();
      }
      const afterRelease = await stats();
      assert.equal(afterRelease.innocent_learned! - before.innocent_learned!, 1, `retrained as innocent: ${JSON.stringify(afterRelease)}`);
      assert.equal((await cli(["spam", "quarantine", "release", "--user", "erin@mailha.test", h205.key])).code, 2, "releasing it again: no such message (a usage error)");
      // Delete: gone, and not delivered.
      const del = await cli(["spam", "quarantine", "delete", "--user", "erin@mailha.test", h206.key]);
      assert.equal(del.code, 0, del.stderr);
      assert.ok(!(JSON.parse((await cli(["spam", "quarantine", "list", "--user", "erin@mailha.test", "--json"])).stdout) as { key: string }[]).some((h) => h.key === h206.key), "deleted");
      assert.ok(!findIn("new", "-206-at@") && !findIn(".Junk/new", "-206-at@"));
      const journaled = readdirSync(join(lab.dir, "a", "data", "journal")).filter((f) => f.startsWith("changes-")).flatMap((f) => readFileSync(join(lab.dir, "a", "data", "journal", f), "utf8").split("\n")).filter((l) => l.includes('"kind":"quarantine"'));
      assert.deepEqual(journaled.map((l) => (JSON.parse(l) as { action: string; key: string }).action), ["release", "delete"], "each action is in the change journal");
      assert.equal((await cli(["spam", "prefs", "--user", "erin@mailha.test", "--unset", "spam_action"])).code, 0);
      // Broken MIME, 20 MiB, 100,000 parts: delivered (never refused for the filter), with a reason when it stopped early.
      const broken = `From: x@example.net\r\nSubject: broken mime\r\nContent-Type: multipart/mixed; boundary="zz"\r\n\r\n--zz\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n%%%not base64%%%\r\n--zz\r\nContent-Type: multipart/alternative; boundary=\r\n\r\n`;
      await send(lab.a, broken);
      const big = `From: x@example.net\r\nSubject: twenty mebibytes\r\n\r\n${(("lorem ipsum dolor sit amet ").repeat(36) + "\r\n").repeat(20 * 1024)}`;
      await send(lab.a, big);
      const parts = `From: x@example.net\r\nSubject: many parts\r\nContent-Type: multipart/mixed; boundary="p"\r\n\r\n${"--p\r\nContent-Type: text/plain\r\n\r\nx\r\n".repeat(100_000)}--p--\r\n`;
      await send(lab.a, parts);
      for (const [subject, reason] of [["broken mime", null], ["twenty mebibytes", /input-truncated/], ["many parts", /parts-limit|time-limit/]] as const) {
        const m = findIn("new", `Subject: ${subject}`) ?? findIn(".Junk/new", `Subject: ${subject}`);
        assert.ok(m, `"${subject}" was delivered`);
        assert.match(m!, /^X-DSPAM-Result: (Innocent|Spam)\r$/m, `"${subject}" has a verdict`);
        if (reason) assert.match(/^X-DSPAM-Reason: (.*)\r$/m.exec(m!)?.[1] ?? "", reason, `"${subject}" says why the filter stopped early`);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a message takes at most 1,000 recipients (452 4.5.3 after), on 25 and on the backup MX", async () => {
    const { connectMariadb, mariadbPaths } = await import("../../services/mariadb.ts");
    const { nodePaths } = await import("../../common/paths.ts");
    const db = await connectMariadb(mariadbPaths(nodePaths(join(lab.dir, "a"))).socket, "mailha");
    try {
      const [rows] = await db.query("SELECT id FROM domains WHERE name = 'mailha.test'");
      const domainId = (rows as { id: number }[])[0]!.id;
      const values = Array.from({ length: 1001 }, (_, i) => [`many${i}@mailha.test`, "alice@mailha.test", domainId]);
      await db.query("INSERT IGNORE INTO aliases (source, destination, domain_id) VALUES ?", [values]);
    } finally {
      await db.end();
    }
    await bKnows("many1000@mailha.test");
    for (const host of [lab.a, lab.b]) {
      const c = await RawSmtp.open(host, 25);
      try {
        await c.cmd("EHLO test");
        await c.cmd("MAIL FROM:<x@example.net>");
        c.send(Array.from({ length: 1001 }, (_, i) => `RCPT TO:<many${i}@mailha.test>\r\n`).join(""));
        const replies: string[] = [];
        for (let i = 0; i < 1001; i++) replies.push(await c.reply(30_000));
        assert.equal(replies.slice(0, 1000).filter((r) => /^250/.test(r)).length, 1000, `${host}: the first 1,000 recipients are accepted (${replies.find((r) => !/^250/.test(r))})`);
        assert.match(replies[1000]!, /^452 4\.5\.3 /, `${host}: the 1,001st is refused for now`);
      } finally {
        c.close();
      }
    }
  });

  test("a Bcc recipient is not named in the other copies: the Received line says `for` only with one recipient", async () => {
    const subject = `two recipients ${Date.now()}`;
    const r = await transaction(lab.a, ["EHLO test", "MAIL FROM:<x@example.net>", "RCPT TO:<alice@mailha.test>", "RCPT TO:<bob@mailha.test>"], `Subject: ${subject}\r\n\r\nhello both`);
    assert.match(r.at(-1)!, /^250/);
    const copy = stored(subject)[0] ?? "";
    assert.match(copy, /^Received: from test /m);
    assert.ok(!/\bfor </.test(copy.slice(0, copy.indexOf("\r\nSubject:"))), `no recipient is named in the trace field:\n${copy.slice(0, 400)}`);
    const one = `one recipient ${Date.now()}`;
    await transaction(lab.a, ["EHLO test", "MAIL FROM:<x@example.net>", "RCPT TO:<alice@mailha.test>"], `Subject: ${one}\r\n\r\nhello`);
    assert.match(stored(one)[0] ?? "", /\tfor <alice@mailha\.test>; /, "a single recipient is named");
  });

  test("RCPT TO:<postmaster> without a domain is accepted (the first domain's postmaster); a quoted local part is user unknown, not a syntax error", async () => {
    assert.equal((await mailha(["alias", "add", "postmaster@mailha.test", "carol@mailha.test", "--config", lab.configFile])).code, 0);
    await bKnows("postmaster@mailha.test");
    for (const host of [lab.a, lab.b]) {
      const c0 = count("carol");
      const subject = `to the postmaster via ${host}`;
      const r = await transaction(host, ["EHLO test", "MAIL FROM:<x@example.net>", "RCPT TO:<Postmaster>", 'RCPT TO:<"x y"@mailha.test>'], `Subject: ${subject}\r\n\r\nhello postmaster`);
      assert.match(r[2]!, /^250/, `${host}: RCPT TO:<Postmaster> is accepted: ${r[2]}`);
      assert.match(r[3]!, /^550 5\.1\.1 /, `${host}: a quoted local part is valid syntax, and unknown: ${r[3]}`);
      assert.match(r.at(-1)!, /^250/);
      for (let i = 0; i < 50 && count("carol") === c0; i++) await sleep(200);
      assert.equal(count("carol"), c0 + 1, `${host}: the postmaster (carol, by alias) got it`);
    }
  });

  test("a recipient the active node refuses after the backup MX took the message is bounced to the sender, not dropped", async () => {
    for (const u of ["gone1@mailha.test", "gone2@mailha.test"]) assert.equal((await mailha(["user", "add", u, "--password", "gone-password-1", "--config", lab.configFile])).code, 0);
    await bKnows("gone2@mailha.test");
    await bKnows("gone1@mailha.test");
    const bob0 = count("bob");
    const ns = `mailha-${lab.name}-b`;
    const s1 = `partly refused ${Date.now()}`;
    const s2 = `wholly refused ${Date.now()}`;
    await run("ip", ["-n", ns, "route", "add", "unreachable", `${lab.a}/32`]);
    try {
      for (const [subject, to] of [[s1, ["alice@mailha.test", "gone1@mailha.test"]], [s2, ["gone2@mailha.test"]]] as const) {
        const sw = await viaBackupMx(["--to", to.join(","), "--from", "bob@mailha.test", "--h-Subject", subject]);
        assert.match(sw.stdout, /250 2\.0\.0 Ok: queued on the backup MX/);
      }
      for (const u of ["gone1@mailha.test", "gone2@mailha.test"]) assert.equal((await mailha(["user", "del", u, "--config", lab.configFile])).code, 0);
      await sleep(RESOLVED_TTL_MS + 500);
    } finally {
      await run("ip", ["-n", ns, "route", "del", "unreachable", `${lab.a}/32`]);
    }
    await until("alice's copy of the partly refused message", () => stored(s1).length === 1);
    const bounces = () => (existsSync(maildir("bob")) ? readdirSync(maildir("bob")) : []).map((f) => readFileSync(join(maildir("bob"), f), "utf8")).filter((m) => m.includes("Undelivered Mail Returned to Sender") && (m.includes(s1) || m.includes(s2)));
    await until("bob's two bounces", () => bounces().length >= 2, 30_000).catch(() => assert.fail(`bob got ${bounces().length} bounces, not 2 (spool/failed: ${existsSync(join(spoolOf("b"), "failed")) ? readdirSync(join(spoolOf("b"), "failed")).join(", ") : "none"})`));
    assert.equal(count("bob") - bob0, 2, "one bounce for each message");
    for (const [subject, rcpt] of [[s1, "gone1@mailha.test"], [s2, "gone2@mailha.test"]] as const) {
      const b = bounces().find((m) => m.includes(subject))!;
      assert.match(b, /report-type=delivery-status/);
      assert.match(b, new RegExp(`Final-Recipient: rfc822; ${rcpt.replace(/\./g, "\\.")}\r\n`));
      assert.match(b, /Action: failed\r\nStatus: 5\.1\.1\r\n/);
      assert.match(b, /^Return-Path: <>/m, "the bounce has the null sender");
    }
    assert.ok(!bounces().find((m) => m.includes(s1))!.includes("Final-Recipient: rfc822; alice@"), "the recipient who got the message is not in the bounce");
  });

  /** A remote domain's MX on the third host whose answer depends on the recipient: refuse* 550, later* 451 once, never* 451 always, others 250. */
  const pickySink = async (sinkDir: string) => {
    const script = `import { SMTPServer } from "smtp-server";
import { mkdirSync, writeFileSync } from "node:fs";
const dir = ${JSON.stringify(sinkDir)};
mkdirSync(dir, { recursive: true });
const seen = new Set();
let n = 0;
const server = new SMTPServer({ authOptional: true, disabledCommands: ["AUTH", "STARTTLS"], logger: false,
  onRcptTo(a, _s, cb) {
    const local = a.address.split("@")[0];
    const e = (code, text) => Object.assign(new Error(text), { responseCode: code });
    if (local.startsWith("refuse")) return cb(e(550, "5.1.1 no such user here"));
    if (local.startsWith("never")) return cb(e(451, "4.2.0 try again later"));
    if (local.startsWith("later") && !seen.has(a.address)) { seen.add(a.address); return cb(e(451, "4.2.0 try again later")); }
    cb();
  },
  onData(stream, session, cb) {
    const chunks = [];
    stream.on("data", (d) => chunks.push(d));
    stream.on("end", () => {
      n++;
      writeFileSync(dir + "/" + n + ".eml", Buffer.concat(chunks));
      writeFileSync(dir + "/" + n + ".json", JSON.stringify({ from: session.envelope.mailFrom.address, to: session.envelope.rcptTo.map((r) => r.address) }));
      cb(null, "2.0.0 sunk");
    });
  } });
server.listen(25, ${JSON.stringify(lab.w)}, () => process.stdout.write("listening\\n"));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
`;
    const sink = spawn("nsenter", [`--net=/run/netns/mailha-${lab.name}-w`, process.execPath, "--input-type=module", "-e", script], { cwd: ROOT, stdio: ["ignore", "pipe", "inherit"] });
    await new Promise<void>((resolve) => sink.stdout!.once("data", () => resolve()));
    const got = () =>
      existsSync(sinkDir)
        ? readdirSync(sinkDir).filter((f) => f.endsWith(".json")).map((f) => ({ ...(JSON.parse(readFileSync(join(sinkDir, f), "utf8")) as { from: string; to: string[] }), text: readFileSync(join(sinkDir, f.replace(/json$/, "eml")), "utf8") }))
        : [];
    return { sink, got };
  };

  test("outbound: recipients refused by the remote MX are bounced, deferred ones retried; every bounce for the job reaches the sender", async () => {
    const { sink, got } = await pickySink(join(dirname(lab.configFile), "picky-sink"));
    try {
      const tx = nodemailer.createTransport({ host: lab.a, port: 587, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "bob@mailha.test", pass: "bob-password-1" } });
      const s1 = `partly accepted ${Date.now()}`;
      const s2 = `two bounces ${Date.now()}`;
      const sender = "bob-away@sink.test"; // a remote sender: the bounces go through the queue too
      await tx.sendMail({ envelope: { from: sender, to: ["ok1@sink.test", "refuse1@sink.test", "later1@sink.test"] }, from: sender, to: "ok1@sink.test", subject: s1, text: "some of you" });
      await tx.sendMail({ envelope: { from: sender, to: ["refuse2@sink.test", "nobody@dead.test"] }, from: sender, to: "refuse2@sink.test", subject: s2, text: "none of you" });
      tx.close();
      const bouncesOf = (subject: string) => got().filter((m) => m.from === "" && m.text.includes(subject));
      const copiesFor = (rcpt: string, subject: string) => got().filter((m) => m.from === sender && m.to.includes(rcpt) && m.text.includes(subject)).length;
      // This lab's outbound lifetime is 6 s: dead.test is given up after about 7 s.
      await until("the retried recipient and both bounces of the second message", () => copiesFor("later1@sink.test", s1) === 1 && bouncesOf(s2).length === 2, 40_000).catch(() =>
        assert.fail(`later1 copies ${copiesFor("later1@sink.test", s1)}, bounces of the first message ${bouncesOf(s1).length}, of the second ${bouncesOf(s2).length}`),
      );
      await sleep(2000);
      assert.equal(copiesFor("ok1@sink.test", s1), 1, "the accepted recipient got one copy");
      assert.equal(copiesFor("later1@sink.test", s1), 1, "the deferred recipient got one copy, on a retry");
      const b1 = bouncesOf(s1);
      assert.equal(b1.length, 1, "one bounce for the refused recipient of the first message");
      assert.deepEqual(b1[0]!.to, [sender]);
      assert.match(b1[0]!.text, /Final-Recipient: rfc822; refuse1@sink\.test\r\nAction: failed\r\nStatus: 5\.1\.1/);
      assert.ok(!/Final-Recipient: rfc822; (ok1|later1)@/.test(b1[0]!.text), "only the refused recipient is in it");
      const b2 = bouncesOf(s2);
      assert.ok(b2.some((m) => /Final-Recipient: rfc822; refuse2@sink\.test/.test(m.text)) && b2.some((m) => /Final-Recipient: rfc822; nobody@dead\.test\r\nAction: failed\r\nStatus: 4\.4\.7/.test(m.text)), "the refusal and the expiry each bounced");
    } finally {
      sink.kill("SIGTERM");
    }
  });

  test("a message at the size limit for a local and a remote recipient is delivered to both (not stored, then refused)", async () => {
    const sinkDir = join(dirname(lab.configFile), "sink-at-limit");
    const sink = spawn("nsenter", [`--net=/run/netns/mailha-${lab.name}-w`, process.execPath, "--import", "tsx", join(ROOT, "test", "helpers", "sink.ts"), lab.w, sinkDir], { cwd: ROOT, stdio: ["ignore", "pipe", "inherit"] });
    try {
      await new Promise<void>((resolve) => sink.stdout!.once("data", () => resolve()));
      const subject = `at the limit ${Date.now()}`;
      const head = `From: bob@mailha.test\r\nTo: alice@mailha.test, someone@sink.test\r\nSubject: ${subject}\r\nDate: ${new Date().toUTCString()}\r\nMessage-ID: <${Date.now()}@limit.test>\r\n\r\n`;
      const limit = 25 * 1024 * 1024;
      const line = `${"x".repeat(98)}\r\n`;
      let body = line.repeat(Math.floor((limit - head.length) / line.length));
      const rest = limit - head.length - body.length;
      body += rest >= 2 ? `${"y".repeat(rest - 2)}\r\n` : "";
      const raw = head + body;
      assert.equal(Buffer.byteLength(raw), limit);
      const a0 = count("alice");
      const tx = nodemailer.createTransport({ host: lab.a, port: 587, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "bob@mailha.test", pass: "bob-password-1" }, socketTimeout: 120_000 });
      const info = await tx.sendMail({ envelope: { from: "bob@mailha.test", to: ["alice@mailha.test", "someone@sink.test"] }, raw });
      tx.close();
      assert.match(info.response, /^250/, `the message at the limit is accepted: ${info.response}`);
      assert.equal(count("alice"), a0 + 1);
      await until("the remote copy at the sink", () => existsSync(sinkDir) && readdirSync(sinkDir).some((f) => f.endsWith(".eml") && statSync(join(sinkDir, f)).size >= limit), 60_000);
    } finally {
      sink.kill("SIGTERM");
    }
  });

  test("submission on 587 offers AUTH only inside TLS; 465 offers it at once", async () => {
    const got = (await smtplib(`s = smtplib.SMTP("${lab.a}", 587, timeout=30)
s.ehlo("test")
before = s.has_extn("auth")
starttls = s.has_extn("starttls")
s.starttls(context=ctx)
s.ehlo("test")
after = s.esmtp_features.get("auth", "")
s.quit()
t = smtplib.SMTP_SSL("${lab.a}", 465, timeout=30, context=ctx)
t.ehlo("test")
implicit = t.esmtp_features.get("auth", "")
t.quit()
print(json.dumps([before, starttls, after, implicit]))`)) as [boolean, boolean, string, string];
    assert.deepEqual(got, [false, true, " PLAIN LOGIN", " PLAIN LOGIN"], "587: STARTTLS but no AUTH in the clear; AUTH inside TLS and on 465");
  });

  test("smtp-source: 5,000 messages over 20 sessions, every one in the Maildir exactly once", async () => {
    const before = count("carol");
    const r = await run("smtp-source", ["-s", "20", "-m", "5000", "-l", "2048", "-f", "load@example.net", "-t", "carol@mailha.test", `${lab.a}:25`], { timeoutMs: 600_000 });
    assert.equal(r.stderr.trim(), "", `smtp-source reported errors: ${r.stderr.slice(0, 500)}`);
    const files = readdirSync(maildir("carol"));
    assert.equal(files.length - before, 5000, "every accepted message is in the Maildir");
    const ids = new Set<string>();
    for (const f of files) {
      const head = readFileSync(join(maildir("carol"), f), "latin1").slice(0, 400);
      const id = / id ([a-z0-9]+)/.exec(head)?.[1];
      if (id && head.includes("load@example.net")) {
        assert.ok(!ids.has(`${id}:${f}`), `duplicate delivery ${f}`);
        ids.add(`${id}:${f}`);
      }
    }
  });

  // Last: it leaves the third host's address with a record of failed logins.
  test("AUTH is bounded: a long password is refused at once, failed logins from one address slow down, the event loop keeps serving", async () => {
    const lag: number[] = [];
    const probe = await RawSmtp.open(lab.a, 25);
    let probing = true;
    const probing$ = (async () => {
      while (probing) {
        const t0 = Date.now();
        await probe.cmd("NOOP");
        lag.push(Date.now() - t0);
        await sleep(20);
      }
    })();
    const times = (await smtplib(`out = []
def attempt(pw):
    s = smtplib.SMTP_SSL("${lab.a}", 465, timeout=90, context=ctx)
    s.ehlo("w")
    s.user, s.password = "bob@mailha.test", pw
    t = time.time()
    try:
        s.auth("PLAIN", s.auth_plain)
        code = 235
    except smtplib.SMTPException as e:
        code = getattr(e, "smtp_code", -1)
    dt = time.time() - t
    s.close()
    return [code, dt]
out.append(attempt("y" * 12000))
for i in range(5):
    out.append(attempt("wrong-password-%d" % i))
print(json.dumps(out))`, { inW: true })) as [number, number][];
    probing = false;
    await probing$;
    probe.close();
    assert.equal(times[0]![0], 535, "a 12 KB password is refused");
    assert.ok(times[0]![1] < 0.2, `the 12 KB password is refused before any hashing (${times[0]![1].toFixed(3)} s)`);
    assert.ok(Math.max(...lag) < 250, `other clients were answered meanwhile (longest NOOP ${Math.max(...lag)} ms)`);
    for (const [code] of times) assert.equal(code, 535);
    const waits = times.slice(1).map(([, s]) => s);
    assert.ok(waits[4]! > 1.5 && waits[4]! > waits[1]! && waits[3]! > waits[0]!, `each failed login from the address waits longer: ${waits.map((w) => w.toFixed(2)).join(", ")} s`);
    // Another address is not held up: bob logs in from the operator's seat at once.
    const t0 = Date.now();
    const tx = nodemailer.createTransport({ host: lab.a, port: 465, secure: true, tls: { rejectUnauthorized: false }, auth: { user: "bob@mailha.test", pass: "bob-password-1" } });
    await tx.verify();
    tx.close();
    assert.ok(Date.now() - t0 < 1500, `a login from another address is not delayed (${Date.now() - t0} ms)`);
  });
});
