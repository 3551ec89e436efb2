// The SMTP service of the active node (`mailha smtp run`): MX on 25 (no AUTH, local
// domains only, recipients checked at RCPT, relays nothing but the bounces the peer's
// backup MX hands on), submission on 587 (AUTH offered only after STARTTLS) and 465
// (implicit TLS) for the same accounts, AUTH bounded in cost and rate (auth.ts), every
// listener within limits.ts. A message is answered 250 only after it is fsynced in
// every recipient's Maildir and in the journal; anything short of that is a 4xx or 5xx
// and leaves nothing in new/.
// A message that came through the peer's backup MX (forwarded on 25 from the peer's
// service address, or drained from this node's own spool after it became active) is
// journaled with the backup MX's queue id and delivered once only: a copy the journals
// on the volume show delivered already is answered 250 (a forward) or dropped (the
// spool), never delivered again (delivered-index.ts; the trace field: backup-mx.ts).
// Known gap: a forwarded message whose recipients all forward elsewhere (aliases to
// other domains) is queued, not journaled, so a repeated forward queues it again.
// Started as root, it binds its ports and then runs as the mail uid (run-as.ts).
import { randomBytes, randomUUID } from "node:crypto";
import { createReadStream, readFileSync } from "node:fs";
import { flushSpool, stripPeerField } from "./backup-mx.ts";
import { DeliveredIndex } from "./delivered-index.ts";
import { Outbound } from "./outbound.ts";
import { redisConnection, redisPaths } from "../redis.ts";
import { Queue } from "bullmq";
import { ReleaseRequests } from "./release-request.ts";
import { RELEASE_LOCAL_PART, SPAM_WORKER_QUEUE } from "../spam/release.ts";
import { join } from "node:path";
import { SMTPServer, type SMTPServerAuthentication, type SMTPServerDataStream, type SMTPServerSession, type SMTPServerOptions } from "smtp-server";
import type { Logger } from "pino";
import { peerOf, type MailhaConfig } from "../../common/config.ts";
import type { NodePaths } from "../../common/paths.ts";
import { sleep } from "../../common/exec.ts";
import { mariadbPaths } from "../mariadb.ts";
import { Journal, journalDir } from "./journal.ts";
import { deliveryPath } from "./delivery.ts";
import { greetWithoutPause } from "./greeting.ts";
import { completeHeaders } from "./submission-headers.ts";
import { rfc2822, traceFields } from "./trace.ts";
import { aceAddress, recipientAddress } from "./address.ts";
import { applyConformance } from "./conformance.ts";
import { RejectError, withoutAdded } from "./maildir.ts";
import { Directory } from "./recipients.ts";
import type { Failure } from "./dsn.ts";
import { prepareStatsDir, publishStats } from "../stats.ts";
import { ListenerGuard, listenerLimits, recipientLimitError, smtpError } from "./limits.ts";
import { Transactions } from "./transaction.ts";
import { SpamAtDelivery } from "../spam/at-delivery.ts";
import { closeTimeoutFor, SessionDrain } from "./drain.ts";
import { SmtpAuth } from "./auth.ts";
import { hashPassword, PasswordVerifier } from "../password.ts";
import { isRoot, type Ids } from "../privileges.ts";
import { dropToMailUser, prepareSmtpFiles } from "./run-as.ts";

// A stop waits this long for messages being stored to get their answer (drain.ts).
const DRAIN_WAIT_MS = 5000;

const prefixed = (p: string, o: object): Record<string, number> => Object.fromEntries(Object.entries(o).map(([k, v]) => [`${p}${k}`, v as number]));
const CLIENT_CLOSE_MS = 1000;

export interface SmtpPorts {
  readonly mx: number;
  readonly submission: number;
  readonly submissions: number;
}

export const DEFAULT_PORTS: SmtpPorts = { mx: 25, submission: 587, submissions: 465 };

export interface SmtpService {
  close(): Promise<void>;
}

export interface SmtpOptions {
  readonly config: MailhaConfig;
  readonly nodeId: string;
  readonly paths: NodePaths;
  readonly log: Logger;
  readonly ports?: SmtpPorts;
  /** Who to run as once the ports are bound: the mail uid when started as root (null: stay). */
  readonly runAs?: Ids | null;
}

export async function runSmtp(o: SmtpOptions): Promise<SmtpService> {
  const c = o.config;
  const me = c.nodes.find((n) => n.id === o.nodeId)!;
  const ports = o.ports ?? DEFAULT_PORTS;
  if (!greetWithoutPause()) o.log.warn("smtp-server changed: the 100 ms greeting pause stays");
  const conformance = applyConformance();
  if (!conformance.authOnlyWhereAllowed || !conformance.quotedLocalParts) o.log.warn(conformance, "smtp-server changed: a correction of it is not applied (AUTH advertised before STARTTLS, or quoted local parts refused with 501)");
  const tlsDir = join(o.paths.data, "etc", "tls");
  const key = readFileSync(join(tlsDir, "tls.key"));
  const cert = readFileSync(join(tlsDir, "tls.crt"));
  const dir = new Directory(mariadbPaths(o.paths).socket, c.mail.domains);
  const runAs = o.runAs !== undefined ? o.runAs : isRoot() ? { uid: c.mail.mail_uid, gid: c.mail.mail_gid } : null;
  const journal = new Journal(o.paths.data, o.nodeId);
  if (journal.clockWarning) o.log.warn(journal.clockWarning);
  // What it writes and reads after it dropped root is the mail uid's (its journal too).
  if (runAs) prepareSmtpFiles(o.paths, runAs, o.log);
  prepareStatsDir(o.paths, runAs ?? undefined);
  // Read in the background: only mail from the peer and the spool drain wait for it.
  const delivered = new DeliveredIndex(journalDir(o.paths.data));
  void delivered.load().then(
    (r) => {
      if (r.hlcMax && !journal.observe(r.hlcMax)) o.log.warn({ hlc: r.hlcMax }, "a delivery journal's last stamp is too far ahead of this clock; not observed");
      o.log.info(r, "delivered index loaded from the journals");
    },
    (err: Error) => o.log.error({ err }, "could not read the delivery journals; mail from the backup MX waits (4xx) until they can be read"),
  );
  const myName = c.mail.mx.find((m) => m.node === o.nodeId)?.name ?? c.mail.host;
  const mailRoot = join(o.paths.data, "mail");

  // Mail from outside (port 25, the backup MX's) is classified at delivery; a user's own
  // submissions and this node's bounces are not.
  const spam = c.spam.enabled ? new SpamAtDelivery({ socket: mariadbPaths(o.paths).socket, dataDir: o.paths.data, node: o.nodeId, timeoutMs: c.spam.classify_timeout_ms, log: o.log }) : null;
  const { deliverLocal, oncePerQueueId } = deliveryPath({ mailRoot, uid: c.mail.mail_uid, gid: c.mail.mail_gid, sizeMax: c.mail.message_size_max_bytes, journal, delivered, log: o.log, filter: spam });
  const localDeliver = async (from: string, to: string, file: string) => {
    const r = await dir.resolve(to);
    if (r.kind !== "local" || !r.mailboxes.length) throw new Error(`${to} is not a local mailbox`);
    await deliverLocal(createReadStream(file), r.mailboxes, `Return-Path: <${from}>\r\n`);
  };
  // Users' own quarantine releases by mail (release-request.ts), done by the spam worker.
  const releaseQueue = c.spam.enabled ? new Queue(SPAM_WORKER_QUEUE, { connection: redisConnection(redisPaths(o.paths).socket) }) : null;
  releaseQueue?.on("error", (err) => o.log.warn({ err }, "the spam worker's queue (quarantine release requests)"));
  const releases = releaseQueue ? new ReleaseRequests({ mailRoot, queue: releaseQueue, isLocalDomain: (d) => dir.isLocalDomain(d), log: o.log }) : null;
  const outbound = new Outbound(c, o.paths.data, redisPaths(o.paths).socket, myName, localDeliver, (a) => dir.isLocalDomain(a.slice(a.lastIndexOf("@") + 1)), o.log);

  // Submission: an address of a local domain may be the envelope sender (MAIL FROM) only
  // of its own user, or of a member of the alias (team@ for bob when team@ delivers to
  // bob). The From: field is not checked (nor is it by Postfix's sender login check).
  // Other domains' addresses are the receivers' to judge (SPF, DMARC); the null sender
  // is allowed (clients send delivery reports with it).
  const guard = ListenerGuard.of(c, [peerOf(c, o.nodeId).service_address]);
  const countMessage = (_address: { address: string }, session: SMTPServerSession, cb: (err?: Error | null) => void) => cb(guard.mailFromError(session));
  const onMailFrom = (address: { address: string }, session: SMTPServerSession, cb: (err?: Error | null) => void) => {
    const over = guard.mailFromError(session);
    if (over) return cb(over);
    const from = aceAddress(address.address).toLowerCase();
    const user = typeof session.user === "string" ? session.user : "";
    if (!from || from === user || !dir.isLocalDomain(from.slice(from.lastIndexOf("@") + 1))) return cb();
    void dir.resolve(from).then(
      (r) => (r.kind === "local" && r.mailboxes.includes(user) ? cb() : cb(smtpError(553, `5.7.1 <${from}>: Sender address rejected: not owned by ${user}`))),
      (err: Error) => {
        o.log.error({ err }, "sender lookup failed");
        cb(smtpError(451, "4.3.0 Temporary lookup failure, try again later"));
      },
    );
  };

  // Where each recipient goes, per mail transaction (RSET, EHLO, STARTTLS forget it).
  const transactions = new Transactions();
  const peer = c.nodes.find((n) => n.id !== o.nodeId)!;
  // The peer's backup MX forwards on 25 the bounces it made (null sender) for senders of
  // other domains: those, and only from the peer's service address, go into the
  // outbound queue; any other relaying on 25 is refused.
  const peerBounce = (session: SMTPServerSession) => session.remoteAddress === peer.service_address && !!session.envelope.mailFrom && session.envelope.mailFrom.address === "";
  const onRcptTo = (submission: boolean) => (address: { address: string }, session: SMTPServerSession, cb: (err?: Error | null) => void) => {
    const full = recipientLimitError(session, address.address, c.mail.message_recipients_max);
    if (full) return cb(full);
    const rcpt = recipientAddress(address.address, c.mail.domains[0]!);
    if (submission && releases?.isReleaseAddress(rcpt)) return cb(releases.rcpt(session));
    if (releases?.has(session)) return cb(smtpError(550, `5.5.1 A release request goes to ${RELEASE_LOCAL_PART}@ alone`));
    void dir.resolve(rcpt).then(
      (r) => {
        if (r.kind === "not-local") {
          // Authenticated users may send anywhere: into the outbound queue.
          if ((submission && session.user) || (!submission && peerBounce(session))) {
            transactions.add(session, address.address, { mailboxes: [], remote: [rcpt.toLowerCase()] });
            return cb();
          }
          return cb(smtpError(554, "5.7.1 Relay access denied"));
        }
        if (r.kind === "unknown") return cb(smtpError(550, `5.1.1 <${rcpt}>: Recipient address rejected: User unknown`));
        // r.remote: aliases that forward elsewhere
        transactions.add(session, address.address, r);
        cb();
      },
      (err: Error) => {
        o.log.error({ err }, "recipient lookup failed");
        cb(smtpError(451, "4.3.0 Temporary lookup failure, try again later"));
      },
    );
  };

  // Deliveries in progress: a stop lets them finish and answer (bounded) before it
  // closes their connections.
  const drain = new SessionDrain();
  // TRUSTPEER: port 25, where the peer's backup MX forwards; only a connection from the
  // peer's service address may name a backup MX queue id (the trace field); it is
  // removed from every message, on every port.
  const onData = (trustPeer: boolean) => (stream: SMTPServerDataStream, session: SMTPServerSession, cb: (err?: Error | null, message?: string) => void) => {
    const t0 = Date.now();
    const from = session.envelope.mailFrom ? aceAddress(session.envelope.mailFrom.address) : "";
    const proto = `E${session.transmissionType ?? "SMTP"}`.replace(/^EE/, "E");
    const headers = traceFields({ from, helo: session.hostNameAppearsAs, remoteAddress: session.remoteAddress, by: myName, protocol: proto, id: session.id, rcpts: session.envelope.rcptTo.map((r) => aceAddress(r.address)), date: new Date() });
    // Mail for other domains leaves without the Return-Path line (RFC 5321 4.4).
    const returnPath = headers.slice(0, headers.indexOf("\r\n") + 2);
    const filtered = stripPeerField(stream, trustPeer && session.remoteAddress === peer.service_address);
    // Submission: a message without Date: or Message-ID: gets them (as an MSA does).
    const input = session.user ? completeHeaders(filtered, { date: () => rfc2822(new Date()), messageId: () => `<${randomUUID()}@${myName}>` }) : filtered;
    if (releases?.has(session)) {
      drain.track(
        session.id,
        releases.data(input, session).then(
          (text) => cb(null, text),
          (err: Error & { responseCode?: number }) => {
            input.resume();
            if (err.responseCode) return cb(err);
            o.log.error({ err, session: session.id }, "a quarantine release request failed");
            cb(smtpError(451, "4.3.0 Could not take the release request, try again later"));
          },
        ),
      );
      return;
    }
    const { mailboxes, remote } = transactions.targets(session);
    const fail = (err: Error) => {
      // Drain whatever the client still sends, then answer.
      input.resume();
      if (err instanceof RejectError) return cb(smtpError(err.responseCode, err.message));
      if ((err as NodeJS.ErrnoException).code === "ECONNECTION") return cb(err);
      o.log.error({ err, session: session.id }, "delivery failed");
      cb(smtpError(451, "4.3.0 Could not store the message, try again later"));
    };
    if (mailboxes.length === 0 && remote.length) {
      drain.track(session.id, outbound
        .enqueue(input, from, remote, headers.slice(returnPath.length), c.mail.message_size_max_bytes, from === "")
        .then((id) => {
          o.log.info({ session: session.id, from, to: remote, queued: id }, "queued for other domains");
          cb(null, `2.0.0 Ok: queued as ${id}`);
        })
        .catch((err: Error) => {
          input.resume();
          if (err instanceof RejectError) return cb(smtpError(err.responseCode, err.message));
          o.log.error({ err }, "could not queue the message");
          cb(smtpError(451, "4.3.0 Could not queue the message, try again later"));
        }));
      return;
    }
    const deliverTo = async (todo: readonly string[], peerQueueId?: string) => {
      const d = await deliverLocal(input, todo, headers, { ...(peerQueueId ? { peerQueueId } : {}), session: session.id, filter: !session.user });
      // Remote recipients of the same message: queued from the delivered copy (once:
      // with the first delivery of a backup MX's message), without the Return-Path line
      // (the final delivery's to write) and not measured again: the client's bytes were
      // within the limit, and the copy's own fields (Received, a submission's Date:) must
      // not make the queue refuse what the mailboxes already have.
      if (remote.length && todo.length === mailboxes.length) await outbound.enqueue(withoutAdded(d.copies[0]!, Buffer.byteLength(headers), Buffer.byteLength(returnPath)), from, remote, "", d.size);
      o.log.info({ session: session.id, from, to: todo, remote, size: d.size, ms: Date.now() - t0, ...(peerQueueId ? { peerQueueId } : {}) }, "delivered");
      cb(null, `2.0.0 Ok: delivered as ${session.id}`);
    };
    drain.track(session.id, filtered.queueId
      .then(async (peerQueueId) => {
        if (!peerQueueId) return deliverTo(mailboxes);
        const r = await oncePerQueueId(peerQueueId, mailboxes, (todo) => deliverTo(todo, peerQueueId));
        if (r === "busy") {
          input.resume();
          cb(smtpError(451, `4.3.0 Backup MX message ${peerQueueId} is being delivered now, try again later`));
        } else if (r === "duplicate") {
          input.resume();
          o.log.warn({ session: session.id, peerQueueId, from, to: mailboxes, dropped: delivered.dropped() }, "the backup MX forwarded a message delivered already (its queue id is in a delivery journal); answered 250, not delivered again");
          cb(null, `2.0.0 Ok: already delivered (backup MX queue id ${peerQueueId})`);
        }
      })
      .catch(fail));
  };

  // AUTH: bounded in length, hashed in the worker pool, penalised per client address.
  const verifier = new PasswordVerifier();
  const smtpAuth = new SmtpAuth({ lookup: (u) => dir.storedPassword(u), verify: (p, h) => verifier.verify(p, h), dummyHash: hashPassword(randomBytes(16).toString("hex")) });
  const onAuth = (auth: SMTPServerAuthentication, session: SMTPServerSession, cb: (err: Error | null | undefined, res?: { user: string }) => void) => {
    const user = auth.username ?? "";
    void smtpAuth.check(session.remoteAddress, user, auth.password ?? "").then((v) => {
      if (v === "ok") return cb(null, { user: user.toLowerCase() });
      if (v === "invalid") return cb(smtpError(535, "5.7.8 Authentication credentials invalid"));
      if (v === "throttled") return cb(smtpError(454, "4.7.0 Too many failed logins from your address, try again later"));
      cb(smtpError(454, "4.7.0 Temporary authentication failure"));
    });
  };

  const common: SMTPServerOptions = {
    name: myName,
    banner: "mailha ESMTP",
    key,
    cert,
    ...listenerLimits(c, "active"),
    onConnect: guard.onConnect,
    onClose: guard.onClose,
    // A planned stop waits this long for sessions to end, then cuts them: a client
    // without its 250 sends again, to the node that takes over.
    closeTimeout: closeTimeoutFor(DRAIN_WAIT_MS),
    disableReverseLookup: true,
    logger: false,
  };

  const mx = new SMTPServer({ ...common, secure: false, authOptional: true, disabledCommands: ["AUTH"], onMailFrom: countMessage, onRcptTo: onRcptTo(false), onData: onData(true) });
  const sub: SMTPServerOptions = { ...common, authMethods: ["PLAIN", "LOGIN"], authOptional: false, onAuth, onMailFrom, onRcptTo: onRcptTo(true), onData: onData(false) };
  const submission = new SMTPServer({ ...sub, secure: false, allowInsecureAuth: false });
  const submissions = new SMTPServer({ ...sub, secure: true });
  // Submission forwarded by the passive node's proxy (PROXY v2 from the peer only).
  const proxied = { useProxy: [peer.service_address] } as unknown as SMTPServerOptions;
  const submissionProxied = new SMTPServer({ ...sub, ...proxied, secure: false, allowInsecureAuth: false });
  const submissionsProxied = new SMTPServer({ ...sub, ...proxied, secure: true });
  const servers: [SMTPServer, number][] = [
    [mx, ports.mx],
    [submission, ports.submission],
    [submissions, ports.submissions],
    [submissionProxied, 10587],
    [submissionsProxied, 10465],
  ];
  for (const [s, port] of servers) {
    s.on("error", (err) => o.log.warn({ err, port }, "smtp connection error"));
    // Replies are small writes: without this, Nagle and delayed ACKs add ~40 ms per step.
    s.server.on("connection", (sock: import("node:net").Socket) => sock.setNoDelay(true));
    await new Promise<void>((resolve, reject) => {
      s.server.once("error", reject);
      s.listen(port, me.service_address, () => resolve());
    });
  }
  o.log.info({ address: me.service_address, ports }, "smtp listening");
  const stopStats = publishStats(o.paths, "smtp", () => ({ ...guard.counters, ...(spam ? prefixed("spam_", spam.counters) : {}) }));
  if (runAs) dropToMailUser(runAs, o.log);
  // Only now: every file the worker writes (bounces) is the mail uid's.
  outbound.start();
  // Mail this node took as backup MX while it was passive is delivered here now, all
  // recipients at once, unless a journal shows it delivered (forwarded before).
  const flushed = await flushSpool(
    o.paths,
    async (env, file) => {
      // Local mailboxes get it here; other domains' addresses (a bounce the backup MX
      // made for a remote sender, an alias forwarding elsewhere) go to the outbound
      // queue, and a recipient who is gone by now is bounced.
      const mailboxes = new Set<string>();
      const remote: string[] = [];
      const refused: Failure[] = [];
      for (const rcpt of env.to) {
        const r = await dir.resolve(rcpt);
        if (r.kind === "local") {
          for (const m of r.mailboxes) mailboxes.add(m);
          remote.push(...r.remote);
        } else if (r.kind === "not-local") remote.push(rcpt);
        else refused.push({ rcpt, status: "5.1.1", diagnostic: `550 5.1.1 <${rcpt}>: Recipient address rejected: User unknown (${myName})` });
      }
      const r = mailboxes.size ? await oncePerQueueId(env.id, [...mailboxes], (todo) => deliverLocal(createReadStream(file), todo, `Return-Path: <${env.from}>\r\n`, { peerQueueId: env.id, filter: true })) : "delivered";
      if (r === "busy") throw new Error(`backup MX message ${env.id} is being delivered by another session`);
      if (r === "duplicate") {
        delivered.dropped();
        return r; // its other recipients went with the delivery the journals show
      }
      if (remote.length) await outbound.enqueue(createReadStream(file), env.from, remote, "", Number.MAX_SAFE_INTEGER, env.from === "");
      if (refused.length) await outbound.bounce({ id: env.id, from: env.from, file, queuedAt: Date.parse(env.receivedAt), isBounce: env.from === "" }, refused);
      return r;
    },
    o.log,
  );
  if (flushed.delivered || flushed.dropped) o.log.info(flushed, "drained the backup MX spool");
  return {
    async close() {
      stopStats();
      const inFlight = drain.inFlight;
      const r = await drain.close(servers.map(([s]) => s), DRAIN_WAIT_MS);
      o.log.info({ ...r, inFlight }, "SMTP listeners closed");
      // Each bounded: a dead Redis or MariaDB (the reason for a restart, often) must
      // not hold the stop until the resource manager's SIGKILL.
      const bounded = (p: Promise<unknown>) => Promise.race([p.catch(() => {}), sleep(CLIENT_CLOSE_MS)]);
      await Promise.all([bounded(outbound.close()), bounded(dir.close()), bounded(verifier.close()), bounded(spam?.close() ?? Promise.resolve()), bounded(releaseQueue?.close() ?? Promise.resolve())]);
      await bounded(journal.close());
    },
  };
}
