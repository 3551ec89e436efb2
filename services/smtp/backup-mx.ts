// The passive node's backup MX: it accepts mail for the local domains on port 25,
// checking recipients against a list fetched from the active node (so it never
// accepts what it would later bounce), spools each message durably on its own disk,
// and forwards the spool to the active node, deleting a message only once the active
// node answered for every recipient: refused ones are bounced to the sender (a DSN,
// spooled and forwarded like any message), deferred ones tried again (for at most
// mail.outbound.lifetime_s, then bounced). When this node becomes active, its SMTP
// service delivers what is left in the spool locally (flushSpool). It applies the
// active node's limits (limits.ts: clients, recipients per message, size less the room
// for what it adds).
//
// The drain is exactly-once: each forwarded message opens with a trace field
// `X-Mailha-Backup-Queue-Id: <spool id>`, which the active node believes only on the
// first line of a message on port 25 from the peer's service address and removes from
// every message (here too, on the way into the spool, so no sender can plant one). The
// active node journals that id with the delivery (delivered-index.ts); a copy forwarded
// again, because the 250 came but this node died before it removed the spool files, is
// answered 250 without a second delivery, and a copy this node drains itself after a
// takeover is dropped when the journals on the volume show it delivered.
import { randomBytes } from "node:crypto";
import { closeSync, createReadStream, existsSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import { pipeline, Readable, Transform, type TransformCallback } from "node:stream";
import nodemailer from "nodemailer";
import type { Logger } from "pino";
import { SMTPServer, type SMTPServerDataStream, type SMTPServerSession } from "smtp-server";
import type { MailhaConfig } from "../../common/config.ts";
import { fsyncPath, writeFileDurable } from "../../common/fsutil.ts";
import { callPeer, peerEnds } from "../../common/peer-rpc.ts";
import type { NodePaths } from "../../common/paths.ts";
import { aceAddress, recipientAddress } from "./address.ts";
import { applyConformance } from "./conformance.ts";
import { copyChecked, RejectError } from "./maildir.ts";
import { ListenerGuard, listenerLimits, recipientLimitError, smtpError } from "./limits.ts";
import { publishStats } from "../stats.ts";
import { dsnMessage, headerOf, type Failure } from "./dsn.ts";
import { relay } from "./relay.ts";
import { closeTimeoutFor, SessionDrain } from "./drain.ts";

const REFRESH_MS = 10_000;
const RECHECK_MS = 2000;
const FORWARD_EVERY_MS = 2000;
const FORWARD_BATCH_MAX = 50;

/** The trace field that carries the backup MX's queue id to the active node. */
export const PEER_QUEUE_ID_FIELD = "X-Mailha-Backup-Queue-Id";
const PEER_FIELD_RE = /^x-mailha-backup-queue-id[ \t]*:/i;
const QUEUE_ID_RE = /^[0-9a-z][0-9a-z-]{0,63}$/;
/** A header line longer than this is decided by its start and passed on without being held. */
const LINE_HOLD_MAX = 1024;

/** SOURCE without the trace field; `queueId` is its value on a trusted first line, else null. */
export type PeerFiltered = Readable & { readonly queueId: Promise<string | null> };

/**
 * Removes every PEER_QUEUE_ID_FIELD field (and its folded lines) from the header of
 * SOURCE (up to the first empty line); the body is passed on untouched. With TRUSTED
 * (a connection from the peer's service address), a field on the first line is the
 * backup MX's queue id: `queueId` resolves with it once the first line has passed (or
 * the message ended), with null in every other case. Holds at most LINE_HOLD_MAX bytes.
 * The result carries the source's `sizeExceeded` flag (smtp-server's) once it ended.
 */
export function stripPeerField(source: Readable, trusted: boolean): PeerFiltered {
  let inHeader = true;
  let lineNo = 0;
  let dropping = false; // the field being read is the trace field (folded lines follow it)
  let midLine: boolean | null = null; // within a long line: whether it is passed on
  let held: Buffer | null = null;
  let settle: (id: string | null) => void = () => {};
  const queueId = new Promise<string | null>((resolve) => (settle = resolve));
  if (!trusted) settle(null);
  /** Whether LINE (a whole line, or the first LINE_HOLD_MAX bytes of one) is passed on. */
  const keep = (line: Buffer, whole: boolean): boolean => {
    const first = lineNo++ === 0;
    const text = line.toString("latin1");
    let pass: boolean;
    if (text === "\r\n" || text === "\n") {
      inHeader = false;
      pass = true;
    } else if (text[0] === " " || text[0] === "\t") pass = !dropping;
    else {
      dropping = PEER_FIELD_RE.test(text);
      pass = !dropping;
    }
    if (first) {
      const value = text.slice(text.indexOf(":") + 1).trim();
      settle(trusted && dropping && whole && QUEUE_ID_RE.test(value) ? value : null);
    }
    return pass;
  };
  const piece = (t: Transform, bytes: Buffer, endsLine: boolean) => {
    if (midLine !== null) {
      if (midLine) t.push(bytes);
      if (endsLine) midLine = null;
      return;
    }
    held = held ? Buffer.concat([held, bytes]) : bytes;
    if (!endsLine && held.length < LINE_HOLD_MAX) return;
    const line = held;
    held = null;
    const pass = keep(line, endsLine);
    if (pass) t.push(line);
    if (!endsLine) midLine = pass;
  };
  const out = new Transform({
    transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
      let pos = 0;
      while (inHeader && pos < chunk.length) {
        const lf = chunk.indexOf(0x0a, pos);
        const end = lf < 0 ? chunk.length : lf + 1;
        piece(this, chunk.subarray(pos, end), lf >= 0);
        pos = end;
      }
      if (pos < chunk.length) this.push(pos ? chunk.subarray(pos) : chunk);
      cb();
    },
    flush(cb: TransformCallback) {
      if (held && keep(held, true)) this.push(held);
      held = null;
      settle(null); // no-op once settled
      cb();
    },
  }) as Transform & { queueId: Promise<string | null> };
  out.queueId = queueId;
  source.once("end", () => {
    (out as Readable & { sizeExceeded?: boolean }).sizeExceeded = (source as Readable & { sizeExceeded?: boolean }).sizeExceeded;
  });
  pipeline(source, out, () => {
    settle(null);
    // pipeline destroys OUT with the source's error; nothing more to do here.
  });
  return out;
}

/** FILE as the backup MX forwards it: the trace field with ID first. */
function withQueueId(id: string, file: string): Readable {
  return Readable.from(
    (async function* () {
      yield Buffer.from(`${PEER_QUEUE_ID_FIELD}: ${id}\r\n`);
      for await (const chunk of createReadStream(file)) yield chunk as Buffer;
    })(),
    { objectMode: false },
  );
}

interface Envelope {
  readonly id: string;
  readonly from: string;
  readonly to: string[];
  readonly receivedAt: string;
}

export function spoolDir(paths: NodePaths): string {
  return join(paths.state, "spool");
}

/** The backup MX's own state (the recipient list's cache): written after it gave up root. */
export function backupMxStateDir(paths: NodePaths): string {
  return join(paths.state, "backup-mx");
}

const RECIPIENTS_MAX = 1_000_000;
const RECIPIENTS_BYTES_MAX = 64 * 1024 * 1024;

/** The last list fetched (a cache: a damaged file is ignored and fetched again). */
function readRecipientCache(file: string, log: Logger): Set<string> | null {
  if (!existsSync(file)) return null;
  try {
    const list = JSON.parse(readFileSync(file, "utf8")) as unknown;
    if (Array.isArray(list) && list.every((x) => typeof x === "string")) return new Set(list as string[]);
  } catch {
    // damaged: below
  }
  log.warn({ file }, "the cached recipient list is damaged: ignored, fetched again");
  return null;
}

function spooledCount(dir: string): number {
  try {
    return readdirSync(dir).filter((f) => f.endsWith(".json")).length;
  } catch {
    return 0;
  }
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

/**
 * Hands every spooled message to DELIVERONE (local delivery on the active node, which
 * says "duplicate" for a message the journals show delivered already); removes what it
 * took. Bounded by the spool's size: each message is tried once per call.
 */
export async function flushSpool(paths: NodePaths, deliverOne: (env: Envelope, file: string) => Promise<"delivered" | "duplicate">, log: Logger): Promise<{ delivered: number; dropped: number }> {
  const dir = spoolDir(paths);
  const n = { delivered: 0, dropped: 0 };
  for (const env of spooled(dir)) {
    try {
      const r = await deliverOne(env, join(dir, `${env.id}.eml`));
      removeSpooled(dir, env.id);
      if (r === "duplicate") {
        n.dropped++;
        log.warn({ id: env.id, from: env.from, to: env.to }, "a spooled message was delivered already (its backup MX queue id is in a delivery journal); dropped from the spool, not delivered again");
      } else n.delivered++;
    } catch (err) {
      log.error({ err, id: env.id }, "could not deliver a spooled message; it stays in the spool");
    }
  }
  return n;
}

// A takeover waits this long for messages being spooled to get their answer (drain.ts):
// short, the ports go to the active services.
const DRAIN_WAIT_MS = 1000;

/** A new spool queue id (QUEUE_ID_RE). */
function newQueueId(): string {
  return `${Date.now()}-${randomBytes(6).toString("hex")}`;
}

/**
 * Spools a delivery status notification (dsn.ts) to ENV's sender for FAILURES, to be
 * forwarded like any spooled message (the active node delivers or queues it); durable
 * before the caller changes ENV. A bounce of a bounce (the null sender) is dropped.
 */
async function spoolBounce(dir: string, env: Envelope, failures: readonly Failure[], reportingMta: string, log: Logger): Promise<void> {
  if (!env.from) {
    log.error({ id: env.id, failures }, "recipients of a bounce were refused; the bounce is dropped");
    return;
  }
  const id = newQueueId();
  const text = dsnMessage({ reportingMta, to: env.from, arrival: new Date(env.receivedAt), failures, originalHeader: await headerOf(join(dir, `${env.id}.eml`)) });
  writeFileDurable(join(dir, `${id}.eml`), text);
  writeFileDurable(join(dir, `${id}.json`), JSON.stringify({ id, from: "", to: [env.from], receivedAt: new Date().toISOString() } satisfies Envelope));
  log.warn({ id: env.id, bounce: id, to: env.from, failures }, "recipients of a spooled message were refused; a bounce to the sender is spooled");
}

export async function runBackupMx(o: { config: MailhaConfig; nodeId: string; paths: NodePaths; key: Buffer; log: Logger }): Promise<{ close(): Promise<void> }> {
  const c = o.config;
  const me = c.nodes.find((n) => n.id === o.nodeId)!;
  const peer = c.nodes.find((n) => n.id !== o.nodeId)!;
  const dir = spoolDir(o.paths);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const cacheFile = join(backupMxStateDir(o.paths), "recipients.json");
  let recipients: Set<string> | null = readRecipientCache(cacheFile, o.log);

  // The list comes from the active node over the peer channel (TLS with the cluster's
  // key: not readable or replayable on the service network), bounded; a bad answer is
  // logged and the list kept as it was.
  const ends = peerEnds(c, o.nodeId, o.key);
  const refresh = async (): Promise<void> => {
    try {
      const a = await callPeer(ends, "recipients", {}, { timeoutMs: 3000, maxBytes: RECIPIENTS_BYTES_MAX });
      const list = (a.result as { recipients?: unknown } | null)?.recipients;
      if (!Array.isArray(list) || list.length > RECIPIENTS_MAX || !list.every((x) => typeof x === "string" && x.length <= 320)) {
        o.log.warn({ peer: peer.id }, "the active node's recipient list is malformed: kept the one we had");
        return;
      }
      recipients = new Set(list as string[]);
      writeFileDurable(cacheFile, JSON.stringify(list));
    } catch (err) {
      // Not active, not reachable, or refused: try again at the next refresh.
      o.log.debug({ peer: peer.id, err: (err as Error).message }, "recipient list not fetched");
    }
  };
  let lastRefresh = Date.now();
  await refresh();

  const conformance = applyConformance();
  if (!conformance.quotedLocalParts) o.log.warn(conformance, "smtp-server changed: quoted local parts are refused with 501");
  const tlsDir = join(o.paths.data, "etc", "tls");
  const tlsOpts = existsSync(join(tlsDir, "tls.key")) ? { key: readFileSync(join(tlsDir, "tls.key")), cert: readFileSync(join(tlsDir, "tls.crt")) } : { hideSTARTTLS: true };
  const myName = c.mail.mx.find((m) => m.node === o.nodeId)?.name ?? c.mail.host;
  const guard = ListenerGuard.of(c);
  const drain = new SessionDrain();
  const server = new SMTPServer({
    name: myName,
    banner: "mailha ESMTP (backup MX)",
    onConnect: guard.onConnect,
    onClose: guard.onClose,
    onMailFrom: (_address, session, cb) => cb(guard.mailFromError(session)),
    // At a takeover the ports go to the active services: idle sessions are told 421 at
    // once, a message being spooled gets its answer first (at most DRAIN_WAIT_MS).
    closeTimeout: closeTimeoutFor(DRAIN_WAIT_MS),
    ...tlsOpts,
    secure: false,
    authOptional: true,
    disabledCommands: ["AUTH"],
    // The active node's limits (clients, idle time, recipients); the size less the room
    // for what this node adds when it forwards.
    ...listenerLimits(c, "backup-mx"),
    disableReverseLookup: true,
    logger: false,
    onRcptTo(address, session, cb) {
      const full = recipientLimitError(session, address.address, c.mail.message_recipients_max);
      if (full) return cb(full);
      const addr = recipientAddress(address.address, c.mail.domains[0]!).toLowerCase();
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
      const id = newQueueId();
      const eml = join(dir, `${id}.eml`);
      const from = session.envelope.mailFrom ? aceAddress(session.envelope.mailFrom.address) : "";
      const headers = `Received: from ${session.hostNameAppearsAs ?? "unknown"} ([${session.remoteAddress}])\r\n\tby ${me.service_address} (mailha backup MX) id ${id}; ${new Date().toUTCString()}\r\n`;
      const fd = openSync(eml, "wx", 0o600);
      // A trace field from the sender is removed: only this node's own, added when it
      // forwards, may reach the active node.
      drain.track(session.id, copyChecked(stripPeerField(stream, false), fd, headers, listenerLimits(c, "backup-mx").size!)
        .then(() => {
          fsyncSync(fd);
          closeSync(fd);
          const env: Envelope = { id, from, to: session.envelope.rcptTo.map((r) => recipientAddress(r.address, c.mail.domains[0]!).toLowerCase()), receivedAt: new Date().toISOString() };
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
        }));
    },
  });
  // smtp-server reports a client's failed TLS handshake or reset connection as an
  // 'error' event: without a listener it would end this process (and the proxy with it).
  server.on("error", (err) => o.log.warn({ err: err.message }, "backup MX connection error"));
  server.server.on("connection", (sock: import("node:net").Socket) => sock.setNoDelay(true));
  await new Promise<void>((resolve, reject) => {
    server.server.once("error", reject);
    server.listen(25, me.service_address, () => resolve());
  });

  // Forwarding, recipient by recipient (relay.ts): those the active node took are done,
  // those it refused (5xx) are bounced to the sender, those it deferred (4xx) stay in
  // the spool alone and are tried again, until mail.outbound.lifetime_s after the
  // message came (then bounced, 4.4.7). While the active node does not answer at all,
  // the spool waits: it drains here when this node takes over.
  let forwarding = false;
  const forward = async () => {
    if (forwarding) return;
    forwarding = true;
    // EHLO with this node's MX name: the active node's Received line names the backup MX.
    const tx = nodemailer.createTransport({ host: peer.service_address, port: 25, secure: false, name: myName, tls: { rejectUnauthorized: false }, connectionTimeout: 3000, greetingTimeout: 3000, socketTimeout: 30_000 });
    try {
      for (const env of spooled(dir).slice(0, FORWARD_BATCH_MAX)) {
        const eml = join(dir, `${env.id}.eml`);
        const out = await relay(tx, env, withQueueId(env.id, eml), "the active node");
        if (!out.answered) break; // the active node is not there: try again later
        const refused = [...out.refused];
        let deferred = out.deferred;
        if (deferred.length && Date.now() - Date.parse(env.receivedAt) >= c.mail.outbound.lifetime_s * 1000) {
          for (const f of deferred) refused.push({ rcpt: f.rcpt, status: "4.4.7", diagnostic: `4.4.7 Delivery time expired: the active node still deferred it, last: ${f.diagnostic}` });
          deferred = [];
        }
        if (refused.length) await spoolBounce(dir, env, refused, myName, o.log);
        if (deferred.length) {
          writeFileDurable(join(dir, `${env.id}.json`), JSON.stringify({ ...env, to: deferred.map((f) => f.rcpt) } satisfies Envelope));
          o.log.warn({ id: env.id, delivered: out.delivered, deferred }, "the active node deferred recipients of a spooled message; they stay in the spool");
        } else removeSpooled(dir, env.id);
        if (out.delivered.length) o.log.info({ id: env.id, to: out.delivered, response: out.response }, "forwarded to the active node");
      }
    } catch (err) {
      o.log.error({ err }, "forwarding the spool failed; it is tried again");
    } finally {
      tx.close();
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
  const stopStats = publishStats(o.paths, "backup-mx", () => ({ ...guard.counters, spooled: spooledCount(dir) }));
  return {
    async close() {
      stopStats();
      for (const t of timers) clearInterval(t);
      const inFlight = drain.inFlight;
      const r = await drain.close([server], DRAIN_WAIT_MS);
      o.log.info({ ...r, inFlight }, "backup MX listener closed");
    },
  };
}
