// SMTP sessions against smtp-server as mailha sets it up, in process: a message goes to
// the recipients of its own transaction (RSET, EHLO and STARTTLS forget the earlier
// ones), the recipient limit answers 452 4.5.3, AUTH is advertised only where it can
// succeed, and a quoted local part reaches the recipient check instead of a 501.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { connect as netConnect, type AddressInfo, type Socket } from "node:net";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { SMTPServer, type SMTPServerOptions } from "smtp-server";
import { applyConformance } from "../../services/smtp/conformance.ts";
import { recipientLimitError } from "../../services/smtp/limits.ts";
import { Transactions } from "../../services/smtp/transaction.ts";

const MAX = 3;
const delivered: string[][] = [];
const seenRcpts: string[] = [];
let mx: SMTPServer;
let submission: SMTPServer;

/** A server as mailha's: recipients recorded per transaction, the limit checked first. */
function server(extra: SMTPServerOptions): Promise<SMTPServer> {
  const tx = new Transactions();
  const s = new SMTPServer({
    logger: false,
    disableReverseLookup: true,
    ...extra,
    onRcptTo(a, session, cb) {
      const full = recipientLimitError(session, a.address, MAX);
      if (full) return cb(full);
      seenRcpts.push(a.address);
      if (a.address.startsWith('"')) return cb(Object.assign(new Error(`5.1.1 <${a.address}>: Recipient address rejected: User unknown`), { responseCode: 550 }));
      tx.add(session, a.address, { mailboxes: [a.address.toLowerCase()], remote: [] });
      cb();
    },
    onData(stream, session, cb) {
      stream.resume();
      stream.on("end", () => {
        delivered.push(tx.targets(session).mailboxes);
        cb(null, "2.0.0 Ok");
      });
    },
    onAuth(_a, _s, cb) {
      cb(null, { user: "u" });
    },
  });
  return new Promise((resolve) => s.listen(0, "127.0.0.1", () => resolve(s)));
}

/** A line-by-line client: each command's complete reply (continuation lines joined). */
class Client {
  private buf = "";
  private constructor(private sock: Socket | TLSSocket) {
    this.listen(sock);
  }
  private listen(sock: Socket | TLSSocket) {
    sock.on("data", (d: Buffer) => (this.buf += d.toString("latin1")));
  }
  static async open(s: SMTPServer): Promise<Client> {
    const sock = netConnect((s.server.address() as AddressInfo).port, "127.0.0.1");
    const c = new Client(sock);
    await c.reply();
    return c;
  }
  async reply(): Promise<string> {
    for (let i = 0; i < 500; i++) {
      const m = /^(?:\d{3}-[^\r\n]*\r\n)*\d{3}(?: [^\r\n]*)?\r\n/.exec(this.buf);
      if (m) {
        this.buf = this.buf.slice(m[0].length);
        return m[0].trimEnd();
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    return "timeout";
  }
  async cmd(line: string): Promise<string> {
    this.sock.write(`${line}\r\n`);
    return this.reply();
  }
  async starttls(): Promise<void> {
    assert.match(await this.cmd("STARTTLS"), /^220/);
    const t = tlsConnect({ socket: this.sock as Socket, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => t.once("secureConnect", () => resolve()).once("error", reject));
    this.sock = t;
    this.listen(t);
  }
  close() {
    this.sock.destroy();
  }
}

before(async () => {
  const applied = applyConformance();
  assert.deepEqual(applied, { authOnlyWhereAllowed: true, quotedLocalParts: true }, "both corrections apply to this smtp-server");
  mx = await server({ authOptional: true, disabledCommands: ["AUTH"] });
  submission = await server({ authMethods: ["PLAIN", "LOGIN"], authOptional: true, allowInsecureAuth: false });
});
after(() => {
  mx.close();
  submission.close();
});

/** One transaction on a fresh connection after STEPS; the mailboxes it was delivered to. */
async function deliverAfter(steps: (c: Client) => Promise<void>): Promise<string[]> {
  const c = await Client.open(mx);
  try {
    await c.cmd("EHLO test");
    assert.match(await c.cmd("MAIL FROM:<x@example.net>"), /^250/);
    assert.match(await c.cmd("RCPT TO:<bob@mailha.test>"), /^250/);
    await steps(c);
    assert.match(await c.cmd("MAIL FROM:<x@example.net>"), /^250/);
    assert.match(await c.cmd("RCPT TO:<alice@mailha.test>"), /^250/);
    assert.match(await c.cmd("DATA"), /^354/);
    assert.match(await c.cmd("Subject: x\r\n\r\nhello\r\n."), /^250/);
    return delivered.at(-1)!;
  } finally {
    c.close();
  }
}

test("RSET, EHLO and STARTTLS end the transaction: the recipient named before gets nothing", async () => {
  assert.deepEqual(await deliverAfter(async (c) => void assert.match(await c.cmd("RSET"), /^250/)), ["alice@mailha.test"], "RSET");
  assert.deepEqual(await deliverAfter(async (c) => void assert.match(await c.cmd("EHLO again"), /^250/)), ["alice@mailha.test"], "EHLO");
  assert.deepEqual(
    await deliverAfter(async (c) => {
      await c.starttls();
      assert.match(await c.cmd("EHLO test"), /^250/);
    }),
    ["alice@mailha.test"],
    "STARTTLS",
  );
});

test("the recipient limit: the next new recipient gets 452 4.5.3, a repeated one still counts once", async () => {
  const c = await Client.open(mx);
  try {
    await c.cmd("EHLO test");
    await c.cmd("MAIL FROM:<x@example.net>");
    for (let i = 0; i < MAX; i++) assert.match(await c.cmd(`RCPT TO:<r${i}@mailha.test>`), /^250/);
    assert.match(await c.cmd("RCPT TO:<R0@mailha.test>"), /^250/, "a repeated recipient replaces its entry");
    assert.match(await c.cmd("RCPT TO:<r9@mailha.test>"), /^452 4\.5\.3 Too many recipients/);
    assert.match(await c.cmd("RSET"), /^250/);
    await c.cmd("MAIL FROM:<x@example.net>");
    assert.match(await c.cmd("RCPT TO:<r9@mailha.test>"), /^250/, "a new transaction starts from zero");
  } finally {
    c.close();
  }
});

test("AUTH is not advertised before STARTTLS where it would be refused; inside TLS it is", async () => {
  const c = await Client.open(submission);
  try {
    const plain = await c.cmd("EHLO test");
    assert.match(plain, /STARTTLS/);
    assert.doesNotMatch(plain, /AUTH/);
    assert.match(await c.cmd("AUTH PLAIN AGJvYgBwdw=="), /^538 .*STARTTLS/, "and refused if a client tries");
    await c.starttls();
    assert.match(await c.cmd("EHLO test"), /250[ -]AUTH PLAIN LOGIN/);
  } finally {
    c.close();
  }
  const m = await Client.open(mx);
  assert.doesNotMatch(await m.cmd("EHLO test"), /AUTH/, "port 25 never offers it");
  m.close();
});

test("a quoted local part is valid syntax: it reaches the recipient check (550 5.1.1), a plain one inside quotes is unquoted", async () => {
  const c = await Client.open(mx);
  try {
    await c.cmd("EHLO test");
    assert.match(await c.cmd('MAIL FROM:<"odd sender"@example.net>'), /^250/);
    assert.match(await c.cmd('RCPT TO:<"x y"@mailha.test>'), /^550 5\.1\.1 <"x y"@mailha\.test>/);
    assert.match(await c.cmd('RCPT TO:<"a\\"b"@mailha.test> NOTIFY=NEVER'), /^550 5\.1\.1/);
    assert.match(await c.cmd('RCPT TO:<"bob"@mailha.test>'), /^250/);
    assert.equal(seenRcpts.at(-1), "bob@mailha.test", '"bob" is bob');
    assert.match(await c.cmd('RCPT TO:<"x<y"@mailha.test>'), /^501/, "angle brackets inside quotes stay refused");
    assert.match(await c.cmd('RCPT TO:<"x y"@bad..domain>'), /^501/, "the domain is still checked");
  } finally {
    c.close();
  }
});
