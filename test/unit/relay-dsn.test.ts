// Handing a message to another SMTP server, recipient by recipient: the ones it took,
// the ones it refused (to bounce) and the ones it deferred (to try again) - also when it
// took only some of them, which nodemailer reports as a success. And the bounce itself:
// an RFC 3464 report with each recipient's status, written with its directory fsynced.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import nodemailer from "nodemailer";
import { SMTPServer } from "smtp-server";
import { dsnMessage, headerOf, HEADER_BYTES_MAX, statusOf } from "../../services/smtp/dsn.ts";
import { relay } from "../../services/smtp/relay.ts";
import { ROOT } from "../helpers/cli.ts";

let server: SMTPServer;
let port = 0;
const dir = mkdtempSync(join(tmpdir(), "mailha-relay-"));
const err = (code: number, text: string) => Object.assign(new Error(text), { responseCode: code });

before(async () => {
  // refuse* 550, later* 451, fromdeferred@ as sender 451 at MAIL, baddata* 554 at the end of DATA.
  server = new SMTPServer({
    logger: false,
    authOptional: true,
    disabledCommands: ["AUTH", "STARTTLS"],
    onMailFrom(a, _s, cb) {
      cb(a.address.startsWith("fromdeferred") ? err(451, "4.3.0 try later") : undefined);
    },
    onRcptTo(a, _s, cb) {
      if (a.address.startsWith("refuse")) return cb(err(550, "5.1.1 no such user here"));
      if (a.address.startsWith("later")) return cb(err(451, "4.2.0 mailbox busy"));
      cb();
    },
    onData(stream, session, cb) {
      stream.resume();
      stream.on("end", () => (session.envelope.rcptTo.some((r) => r.address.startsWith("baddata")) ? cb(err(554, "5.6.0 content refused")) : cb(null, "2.0.0 ok")));
    },
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  port = (server.server.address() as AddressInfo).port;
});
after(() => {
  server.close();
  rmSync(dir, { recursive: true, force: true });
});

const send = (from: string, to: string[], p = port) => {
  const tx = nodemailer.createTransport({ host: "127.0.0.1", port: p, secure: false, ignoreTLS: true, connectionTimeout: 2000 });
  return relay(tx, { from, to }, Readable.from([Buffer.from("Subject: x\r\n\r\nhello\r\n")]), "mx.example").finally(() => tx.close());
};

test("a message some recipients took: the others are refused or deferred, each with its own reply", async () => {
  const r = await send("a@example.net", ["ok@x.test", "refuse@x.test", "later@x.test"]);
  assert.deepEqual(r.delivered, ["ok@x.test"]);
  assert.deepEqual(r.refused.map((f) => [f.rcpt, f.status]), [["refuse@x.test", "5.1.1"]]);
  assert.match(r.refused[0]!.diagnostic, /^550 5\.1\.1 no such user here \(mx\.example\)$/);
  assert.deepEqual(r.deferred.map((f) => [f.rcpt, f.status]), [["later@x.test", "4.2.0"]]);
  assert.equal(r.answered, true);
});

test("every recipient refused at RCPT, the message refused at DATA, the sender deferred, nobody answering", async () => {
  const all = await send("a@example.net", ["refuse1@x.test", "later1@x.test"]);
  assert.deepEqual([all.delivered, all.refused.map((f) => f.rcpt), all.deferred.map((f) => f.rcpt)], [[], ["refuse1@x.test"], ["later1@x.test"]]);
  const data = await send("a@example.net", ["baddata@x.test", "ok@x.test"]);
  assert.deepEqual([data.delivered, data.refused.map((f) => `${f.rcpt} ${f.status}`)], [[], ["baddata@x.test 5.6.0", "ok@x.test 5.6.0"]]);
  const mail = await send("fromdeferred@example.net", ["ok@x.test"]);
  assert.deepEqual([mail.refused, mail.deferred.map((f) => f.status), mail.answered], [[], ["4.3.0"], true]);
  const none = await send("a@example.net", ["ok@x.test"], 1);
  assert.deepEqual([none.delivered, none.deferred.map((f) => f.status), none.answered], [[], ["4.4.1"], false]);
});

test("the status of a reply: its enhanced code, else one of its class", () => {
  assert.equal(statusOf("550 5.1.1 no such user", true), "5.1.1");
  assert.equal(statusOf("4.4.7 Delivery time expired", false), "4.4.7");
  assert.equal(statusOf("550 no such user", true), "5.0.0");
  assert.equal(statusOf("421 closing", false), "4.0.0");
});

test("the report: each failed recipient with status and reply, the original header, bounded", async () => {
  const orig = join(dir, "orig.eml");
  writeFileSync(orig, `Subject: hello\r\nX-Big: ${"y".repeat(2 * HEADER_BYTES_MAX)}\r\n\r\nbody\r\n`);
  const header = await headerOf(orig);
  assert.ok(header.length <= HEADER_BYTES_MAX && header.startsWith("Subject: hello\r\n"), "at most 64 KiB of the header, never the body");
  const small = join(dir, "small.eml");
  writeFileSync(small, "Subject: hi\r\nFrom: a@b\r\n\r\nsecret body\r\n");
  const text = dsnMessage({ reportingMta: "mx1.mailha.test", to: "a@example.net", arrival: new Date(0), failures: [{ rcpt: "r@x.test", status: "5.1.1", diagnostic: "550 5.1.1 no such user (mx.example)" }], originalHeader: await headerOf(small) });
  assert.match(text, /^Content-Type: multipart\/report; report-type=delivery-status; boundary="mailha-[0-9a-f]+"\r$/m);
  assert.match(text, /\r\nFinal-Recipient: rfc822; r@x\.test\r\nAction: failed\r\nStatus: 5\.1\.1\r\nDiagnostic-Code: smtp; 550 5\.1\.1 no such user \(mx\.example\)\r\n/);
  assert.match(text, /Content-Type: text\/rfc822-headers\r\n\r\nSubject: hi\r\nFrom: a@b\r\n/);
  assert.ok(!text.includes("secret body"));
});

test("a bounce file and its directory are fsynced (strace sees the directory's fsync after the rename)", { skip: spawnSync("strace", ["-V"]).status !== 0 ? "no strace" : false }, () => {
  const out = join(dir, "strace.txt");
  const script = `import(${JSON.stringify(join(ROOT, "services", "smtp", "dsn.ts"))}).then((m) => m.writeDsnFile(${JSON.stringify(dir)}, "b.eml", "Subject: bounce\\r\\n\\r\\n"))`;
  const r = spawnSync("strace", ["-f", "-qq", "-o", out, "-e", "trace=openat,fsync,rename,renameat,renameat2", process.execPath, "--import", "tsx", "-e", script], { cwd: ROOT, encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  assert.ok(existsSync(join(dir, "b.eml")));
  const lines = readFileSync(out, "utf8").split("\n");
  const renamed = lines.findIndex((l) => /rename\w*\(.*b\.eml/.test(l));
  assert.ok(renamed >= 0, "the file is renamed into place");
  const dirFds = lines.slice(renamed).flatMap((l) => {
    const m = new RegExp(`openat\\(AT_FDCWD, "${dir.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")}", O_RDONLY[^)]*\\) = (\\d+)`).exec(l);
    return m ? [m[1]!] : [];
  });
  assert.ok(dirFds.some((fd) => lines.slice(renamed).some((l) => new RegExp(`fsync\\(${fd}\\)`).test(l))), `the directory is opened and fsynced after the rename:\n${lines.slice(renamed, renamed + 8).join("\n")}`);
});
