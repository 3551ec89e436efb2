// The passive node's backup MX: it accepts mail for the local domains on port 25,
// checking recipients against a list fetched from the active node (so it never
// accepts what it would later bounce), spools each message durably on its own disk,
// and forwards the spool to the active node, deleting a message only after the active
// node's 250. When this node becomes active, its SMTP service delivers what is left
// in the spool locally (flushSpool).
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { closeSync, createReadStream, existsSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, unlinkSync } from "node:fs";
import { get } from "node:http";
import { join } from "node:path";
import nodemailer from "nodemailer";
import type { Logger } from "pino";
import { SMTPServer, type SMTPServerDataStream, type SMTPServerSession } from "smtp-server";
import type { MailhaConfig } from "../../common/config.ts";
import { fsyncPath, writeFileDurable } from "../../common/fsutil.ts";
import type { NodePaths } from "../../common/paths.ts";
import { aceAddress } from "./address.ts";
import { copyChecked, RejectError } from "./maildir.ts";

const REFRESH_MS = 10_000;
const RECHECK_MS = 2000;
const FORWARD_EVERY_MS = 2000;
const FORWARD_BATCH_MAX = 50;
const AUTH_SKEW_MS = 60_000;

interface Envelope {
  readonly id: string;
  readonly from: string;
  readonly to: string[];
  readonly receivedAt: string;
}

export function spoolDir(paths: NodePaths): string {
  return join(paths.state, "spool");
}

/** The header the active node checks before it hands out its recipient list. */
export function recipientsAuth(key: Buffer, now = Date.now()): string {
  return `${now}:${createHmac("sha256", key).update(`recipients|${now}`).digest("hex")}`;
}

export function checkRecipientsAuth(key: Buffer, header: string | undefined, now = Date.now()): boolean {
  const [ts, mac] = (header ?? "").split(":");
  if (!ts || !mac || Math.abs(now - Number(ts)) > AUTH_SKEW_MS) return false;
  const want = Buffer.from(createHmac("sha256", key).update(`recipients|${ts}`).digest("hex"));
  const got = Buffer.from(mac);
  return want.length === got.length && timingSafeEqual(want, got);
}

function smtpError(code: number, message: string): Error & { responseCode: number } {
  const e = new Error(message) as Error & { responseCode: number };
  e.responseCode = code;
  return e;
}

function spooled(dir: string): Envelope[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((f) => f.endsWith(".json"))
    .map((f) => {
      try {
        return JSON.parse(readFileSync(join(dir, f), "utf8")) as Envelope;
      } catch {
        return null;
      }
    })
    .filter((e): e is Envelope => e !== null)
    .sort((a, b) => a.receivedAt.localeCompare(b.receivedAt));
}

function removeSpooled(dir: string, id: string): void {
  for (const f of [`${id}.json`, `${id}.eml`]) {
    try {
      unlinkSync(join(dir, f));
    } catch {
      // already gone
    }
  }
  fsyncPath(dir);
}

/** Hands every spooled message to DELIVER (local delivery on the active node); removes what it took. */
export async function flushSpool(paths: NodePaths, deliverOne: (env: Envelope, file: string) => Promise<void>, log: Logger): Promise<number> {
  const dir = spoolDir(paths);
  let n = 0;
  for (const env of spooled(dir)) {
    try {
      await deliverOne(env, join(dir, `${env.id}.eml`));
      removeSpooled(dir, env.id);
      n++;
    } catch (err) {
      log.error({ err, id: env.id }, "could not deliver a spooled message; it stays in the spool");
    }
  }
  return n;
}

const CLOSE_TIMEOUT_MS = 500;

export async function runBackupMx(o: { config: MailhaConfig; nodeId: string; paths: NodePaths; key: Buffer; log: Logger }): Promise<{ close(): Promise<void> }> {
  const c = o.config;
  const me = c.nodes.find((n) => n.id === o.nodeId)!;
  const peer = c.nodes.find((n) => n.id !== o.nodeId)!;
  const dir = spoolDir(o.paths);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const cacheFile = join(o.paths.run, "recipients.json");
  let recipients: Set<string> | null = existsSync(cacheFile) ? new Set(JSON.parse(readFileSync(cacheFile, "utf8")) as string[]) : null;

  const refresh = () =>
    new Promise<void>((resolve) => {
      const req = get({ host: peer.service_address, port: c.manager.metrics_port, path: "/recipients", headers: { "x-mailha-auth": recipientsAuth(o.key) }, timeout: 3000 }, (res) => {
        let body = "";
        res.on("data", (d) => (body += d));
        res.on("end", () => {
          if (res.statusCode === 200) {
            const list = (JSON.parse(body) as { recipients: string[] }).recipients;
            recipients = new Set(list);
            writeFileDurable(cacheFile, JSON.stringify(list));
          }
          resolve();
        });
      });
      req.on("error", () => resolve());
      req.on("timeout", () => req.destroy());
    });
  let lastRefresh = Date.now();
  await refresh();

  const tlsDir = join(o.paths.data, "etc", "tls");
  const tlsOpts = existsSync(join(tlsDir, "tls.key")) ? { key: readFileSync(join(tlsDir, "tls.key")), cert: readFileSync(join(tlsDir, "tls.crt")) } : { hideSTARTTLS: true };
  const myName = c.mail.mx.find((m) => m.node === o.nodeId)?.name ?? c.mail.host;
  const server = new SMTPServer({
    name: myName,
    banner: "mailha ESMTP (backup MX)",
    // At a takeover the ports go to the active services at once: sessions still open
    // after this are cut (no 250 was given for their message, so the client retries).
    closeTimeout: CLOSE_TIMEOUT_MS,
    ...tlsOpts,
    secure: false,
    authOptional: true,
    disabledCommands: ["AUTH"],
    size: c.mail.message_size_max_bytes,
    disableReverseLookup: true,
    logger: false,
    onRcptTo(address, _session, cb) {
      const addr = aceAddress(address.address).toLowerCase();
      const domain = addr.slice(addr.lastIndexOf("@") + 1);
      if (!c.mail.domains.includes(domain)) return cb(smtpError(554, "5.7.1 Relay access denied"));
      const check = () => {
        if (!recipients) return cb(smtpError(451, "4.3.0 Recipient list not available yet, try again later"));
        if (!recipients.has(addr)) return cb(smtpError(550, `5.1.1 <${addr}>: Recipient address rejected: User unknown`));
        cb();
      };
      // An address we do not know may be a user added since the last refresh: ask
      // the active node again (at most every RECHECK_MS) before refusing for good.
      if (recipients?.has(addr) || Date.now() - lastRefresh < RECHECK_MS) return check();
      lastRefresh = Date.now();
      void refresh().then(check);
    },
    onData(stream: SMTPServerDataStream, session: SMTPServerSession, cb) {
      const id = `${Date.now()}-${randomBytes(6).toString("hex")}`;
      const eml = join(dir, `${id}.eml`);
      const from = session.envelope.mailFrom ? aceAddress(session.envelope.mailFrom.address) : "";
      const headers = `Received: from ${session.hostNameAppearsAs ?? "unknown"} ([${session.remoteAddress}])\r\n\tby ${me.service_address} (mailha backup MX) id ${id}; ${new Date().toUTCString()}\r\n`;
      const fd = openSync(eml, "wx", 0o600);
      copyChecked(stream, fd, headers, c.mail.message_size_max_bytes)
        .then(() => {
          fsyncSync(fd);
          closeSync(fd);
          const env: Envelope = { id, from, to: session.envelope.rcptTo.map((r) => aceAddress(r.address).toLowerCase()), receivedAt: new Date().toISOString() };
          writeFileDurable(join(dir, `${id}.json`), JSON.stringify(env)); // fsyncs the spool directory too
          o.log.info({ id, from, to: env.to }, "spooled on the backup MX");
          cb(null, `2.0.0 Ok: queued on the backup MX as ${id}`);
          void forward();
        })
        .catch((err: Error) => {
          closeSync(fd);
          try {
            unlinkSync(eml);
          } catch {
            // nothing to remove
          }
          stream.resume();
          if (err instanceof RejectError) return cb(smtpError(err.responseCode, err.message));
          cb(smtpError(451, "4.3.0 Could not spool the message, try again later"));
        });
    },
  });
  server.server.on("connection", (sock: import("node:net").Socket) => sock.setNoDelay(true));
  await new Promise<void>((resolve, reject) => {
    server.server.once("error", reject);
    server.listen(25, me.service_address, () => resolve());
  });

  let forwarding = false;
  const forward = async () => {
    if (forwarding) return;
    forwarding = true;
    try {
      // EHLO with this node's MX name: the active node's Received line names the backup MX.
      const tx = nodemailer.createTransport({ host: peer.service_address, port: 25, secure: false, name: myName, tls: { rejectUnauthorized: false }, connectionTimeout: 3000, greetingTimeout: 3000, socketTimeout: 30_000 });
      for (const env of spooled(dir).slice(0, FORWARD_BATCH_MAX)) {
        try {
          await tx.sendMail({ envelope: { from: env.from, to: env.to }, raw: createReadStream(join(dir, `${env.id}.eml`)) });
          removeSpooled(dir, env.id);
          o.log.info({ id: env.id }, "forwarded to the active node");
        } catch (err) {
          const code = (err as { responseCode?: number }).responseCode ?? 0;
          if (code >= 500) {
            mkdirSync(join(dir, "failed"), { recursive: true });
            for (const f of [`${env.id}.json`, `${env.id}.eml`]) renameSync(join(dir, f), join(dir, "failed", f));
            o.log.error({ id: env.id, code }, "the active node refused a spooled message for good; moved to spool/failed");
          } else break; // the active node is not there: try again later
        }
      }
      tx.close();
    } finally {
      forwarding = false;
    }
  };
  // Until the first list arrives, ask every second; then every REFRESH_MS.
  const timers = [
    setInterval(() => {
      if (recipients && Date.now() - lastRefresh < REFRESH_MS) return;
      lastRefresh = Date.now();
      void refresh();
    }, 1000),
    setInterval(() => void forward(), FORWARD_EVERY_MS),
  ];
  return {
    async close() {
      for (const t of timers) clearInterval(t);
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}
