// The graceful stop of an SMTP listener (services/smtp/drain.ts), on a real smtp-server
// over loopback with raw clients: a message being stored gets its 250 before its
// connection closes, an idle client is told 421 at once, a store longer than the wait
// is cut with 421, and nobody can connect afterwards.
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import type { AddressInfo } from "node:net";
import { SMTPServer, type SMTPServerDataStream, type SMTPServerSession } from "smtp-server";
import { closeTimeoutFor, SessionDrain } from "../../services/smtp/drain.ts";

interface Client {
  readonly sock: Socket;
  readonly lines: string[];
  /** Resolves with the first line (from the start) matching RE. */
  waitFor(re: RegExp): Promise<string>;
  readonly ended: Promise<void>;
}

function client(port: number): Promise<Client> {
  return new Promise((resolve, reject) => {
    const sock = connect(port, "127.0.0.1");
    const lines: string[] = [];
    const waiters: { re: RegExp; r: (l: string) => void }[] = [];
    let buf = "";
    const ended = new Promise<void>((r) => sock.on("close", () => r()));
    sock.on("data", (d) => {
      buf += d.toString("latin1");
      let i;
      while ((i = buf.indexOf("\r\n")) >= 0) {
        const l = buf.slice(0, i);
        buf = buf.slice(i + 2);
        lines.push(l);
        for (const w of [...waiters]) if (w.re.test(l)) (waiters.splice(waiters.indexOf(w), 1), w.r(l));
      }
    });
    sock.on("error", () => {});
    const c: Client = {
      sock,
      lines,
      ended,
      waitFor: (re) => {
        const hit = lines.find((l) => re.test(l));
        return hit !== undefined ? Promise.resolve(hit) : new Promise((r) => waiters.push({ re, r }));
      },
    };
    sock.once("connect", () => resolve(c));
    sock.once("error", reject);
  });
}

/** A server whose delivery takes STOREMS after the message was read; DRAIN tracks it. */
async function server(storeMs: number, waitMs: number) {
  const drain = new SessionDrain();
  const stored: string[] = [];
  let dataEnded = () => {};
  const dataEnd = new Promise<void>((r) => (dataEnded = r));
  const s = new SMTPServer({
    authOptional: true,
    disabledCommands: ["AUTH", "STARTTLS"],
    logger: false,
    closeTimeout: closeTimeoutFor(waitMs),
    onData(stream: SMTPServerDataStream, session: SMTPServerSession, cb) {
      const chunks: Buffer[] = [];
      stream.on("data", (d: Buffer) => chunks.push(d));
      drain.track(
        session.id,
        new Promise<void>((r) => stream.on("end", r)).then(async () => {
          dataEnded();
          await new Promise((r) => setTimeout(r, storeMs));
          stored.push(Buffer.concat(chunks).toString());
          cb(null, "2.0.0 Ok: stored");
        }),
      );
    },
  });
  s.on("error", () => {});
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", () => r()));
  const port = (s.server.address() as AddressInfo).port;
  return { s, drain, stored, dataEnd, port };
}

async function sendMessage(c: Client): Promise<void> {
  await c.waitFor(/^220 /);
  c.sock.write("EHLO client.test\r\n");
  await c.waitFor(/^250 /);
  c.sock.write("MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
  await c.waitFor(/^354 /);
  c.sock.write("Subject: drain\r\n\r\nbody\r\n.\r\n");
}

test("a stop lets a message being stored answer 250, tells an idle client 421 at once, and refuses new connections", async () => {
  const { s, drain, stored, dataEnd, port } = await server(1500, 20_000);
  const busy = await client(port);
  const idle = await client(port);
  await idle.waitFor(/^220 /);
  idle.sock.write("EHLO idle.test\r\n");
  await idle.waitFor(/^250 /);
  await sendMessage(busy);
  await dataEnd;
  assert.equal(drain.inFlight, 1);
  const t0 = Date.now();
  const closing = drain.close([s], 20_000);
  // The idle client hears 421 while the other message is still being stored.
  assert.match(await idle.waitFor(/^421 /), /^421 4\.3\.2 /);
  await idle.ended;
  assert.equal(stored.length, 0, "the idle client was closed before the store finished");
  // Its answer, then the end of the connection: no 421 for the message that was stored.
  assert.match(await busy.waitFor(/^250 2\.0\.0 Ok: stored/), /stored/);
  await busy.ended;
  assert.deepEqual(busy.lines.filter((l) => /^421/.test(l)), []);
  const r = await closing;
  assert.deepEqual(r, { idle: 1, answered: 1, cut: 0 });
  assert.ok(Date.now() - t0 < 10_000, "the stop ended when the store did, not at the end of the wait");
  assert.equal(stored.length, 1);
  await assert.rejects(client(port), /ECONNREFUSED/);
});

test("a store longer than the wait is cut with 421, and its late answer goes nowhere", async () => {
  const { s, drain, stored, dataEnd, port } = await server(1200, 300);
  const busy = await client(port);
  await sendMessage(busy);
  await dataEnd;
  const r = await drain.close([s], 300);
  assert.deepEqual(r, { idle: 0, answered: 0, cut: 1 });
  assert.match(await busy.waitFor(/^421 /), /^421 4\.3\.2 /);
  await busy.ended;
  assert.deepEqual(busy.lines.filter((l) => /^250 2\.0\.0/.test(l)), []);
  // The store finishes later; its callback must not throw into a closed connection.
  await new Promise((r) => setTimeout(r, 1200));
  assert.equal(stored.length, 1);
  assert.equal(drain.inFlight, 0);
});

test("a stop with nothing in flight closes every connection with 421 and returns at once", async () => {
  const { s, drain, port } = await server(0, 20_000);
  const a = await client(port);
  await a.waitFor(/^220 /);
  // Mid-transaction but before DATA: nothing was acknowledged, the client retries.
  a.sock.write("EHLO a.test\r\nMAIL FROM:<a@example.test>\r\n");
  await a.waitFor(/^250 Accepted/);
  const t0 = Date.now();
  const r = await drain.close([s], 20_000);
  assert.deepEqual(r, { idle: 1, answered: 0, cut: 0 });
  assert.ok(Date.now() - t0 < 10_000);
  assert.match(await a.waitFor(/^421 /), /^421 4\.3\.2 /);
  await a.ended;
});
