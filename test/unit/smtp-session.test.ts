// SMTP sessions against smtp-server as mailha sets it up, in process: a message goes to
// the recipients of its own transaction (RSET, EHLO and STARTTLS forget the earlier
// ones), and the recipient limit answers 452 4.5.3.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { connect as netConnect, type AddressInfo, type Socket } from "node:net";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { SMTPServer, type SMTPServerOptions } from "smtp-server";
import { recipientLimitError } from "../../services/smtp/limits.ts";
import { Transactions } from "../../services/smtp/transaction.ts";

const MAX = 3;
const delivered: string[][] = [];
let mx: SMTPServer;

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
  mx = await server({ authOptional: true, disabledCommands: ["AUTH"] });
});
after(() => {
  mx.close();
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
