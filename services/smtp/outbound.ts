// Outbound mail: messages from authenticated users to other domains. The message is
// stored durably on the volume and a job is added to the BullMQ queue "outbound" on
// the Redis that also lives on the volume (AOF, appendfsync always), before the 250:
// the queue survives a failover. Workers look up the MX hosts, try them in preference
// order, retry with exponential backoff (bounded by the configured lifetime, five days
// by default, as RFC 5321 suggests), and on a permanent failure or when the lifetime
// is over send a delivery status notification (RFC 3464) to the sender.
import { randomBytes } from "node:crypto";
import { Resolver } from "node:dns/promises";
import { createReadStream, existsSync, mkdirSync, readFileSync, unlinkSync } from "node:fs";
import { open } from "node:fs/promises";
import { join } from "node:path";
import { Queue, UnrecoverableError, Worker, type Job } from "bullmq";
import nodemailer from "nodemailer";
import type { Logger } from "pino";
import type { Readable } from "node:stream";
import type { MailhaConfig } from "../../common/config.ts";
import { fsyncPath } from "../../common/fsutil.ts";
import { copyChecked } from "./maildir.ts";

export const QUEUE = "outbound";
const CONCURRENCY = 8;
const CONNECT_TIMEOUT_MS = 10_000;

export interface OutboundJob {
  readonly id: string;
  readonly from: string;
  readonly to: string[];
  readonly file: string;
  readonly queuedAt: number;
  /** A bounce has an empty sender and is never bounced itself. */
  readonly isBounce: boolean;
}

interface Attempt {
  readonly permanent: boolean;
  readonly message: string;
}

export class Outbound {
  private readonly queue: Queue;
  private worker: Worker | null = null;
  private readonly dir: string;
  private readonly resolver = new Resolver({ timeout: 3000, tries: 2 });

  constructor(
    private readonly c: MailhaConfig,
    dataDir: string,
    redisSocket: string,
    private readonly myName: string,
    private readonly localDeliver: (from: string, to: string, file: string) => Promise<void>,
    private readonly isLocal: (address: string) => boolean,
    private readonly log: Logger,
  ) {
    this.dir = join(dataDir, "outbound");
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    if (c.mail.outbound.resolvers.length) this.resolver.setServers(c.mail.outbound.resolvers);
    this.queue = new Queue(QUEUE, { connection: { path: redisSocket, maxRetriesPerRequest: null } });
    this.connection = { path: redisSocket, maxRetriesPerRequest: null };
  }

  private readonly connection: { path: string; maxRetriesPerRequest: null };

  private backoffMs(attempt: number): number {
    const o = this.c.mail.outbound;
    return Math.min(o.retry_max_s, o.retry_initial_s * 2 ** Math.max(0, attempt - 1)) * 1000;
  }

  /** How many tries fit into the lifetime with this backoff (bounded). */
  private attempts(): number {
    let t = 0;
    let n = 1;
    while (n < 200 && t + this.backoffMs(n) <= this.c.mail.outbound.lifetime_s * 1000) t += this.backoffMs(n++);
    return n;
  }

  /** Stores the message (streamed, checked) and queues it; resolves once both are durable. */
  async enqueue(stream: Readable, from: string, to: string[], headers: string, sizeMax: number, isBounce = false): Promise<string> {
    const id = `${Date.now()}-${randomBytes(6).toString("hex")}`;
    const file = join(this.dir, `${id}.eml`);
    const fh = await open(file, "wx", 0o600);
    try {
      await copyChecked(stream, fh, headers, sizeMax);
      await fh.sync();
    } catch (err) {
      await fh.close();
      unlinkSync(file);
      throw err;
    }
    await fh.close();
    fsyncPath(this.dir);
    await this.add({ id, from, to, file, queuedAt: Date.now(), isBounce });
    return id;
  }

  private async add(job: OutboundJob): Promise<void> {
    await this.queue.add("deliver", job, {
      jobId: job.id,
      attempts: this.attempts(),
      backoff: { type: "custom" },
      removeOnComplete: 1000,
      removeOnFail: 1000,
    });
  }

  start(): void {
    this.worker = new Worker(QUEUE, (job: Job<OutboundJob>) => this.process(job), {
      connection: this.connection,
      concurrency: CONCURRENCY,
      settings: { backoffStrategy: (attemptsMade: number) => this.backoffMs(attemptsMade) },
    });
    this.worker.on("failed", (job, err) => this.log.warn({ id: job?.id, attempts: job?.attemptsMade, err: err.message }, "outbound attempt failed"));
  }

  private async process(job: Job<OutboundJob>): Promise<void> {
    const j = job.data;
    if (!existsSync(j.file)) return; // already delivered (a retry after a crash)
    const remaining: string[] = [];
    const failures: { rcpt: string; message: string }[] = [];
    const byDomain = new Map<string, string[]>();
    for (const r of j.to) {
      const d = r.slice(r.lastIndexOf("@") + 1).toLowerCase();
      byDomain.set(d, [...(byDomain.get(d) ?? []), r]);
    }
    for (const [domain, rcpts] of byDomain) {
      const res = await this.sendToDomain(domain, j.from, rcpts, j.file);
      if (res === null) continue;
      if (res.permanent) for (const r of rcpts) failures.push({ rcpt: r, message: res.message });
      else remaining.push(...rcpts);
    }
    const expired = Date.now() - j.queuedAt >= this.c.mail.outbound.lifetime_s * 1000;
    const lastTry = job.attemptsMade + 1 >= (job.opts.attempts ?? 1);
    if (remaining.length && (expired || lastTry)) {
      for (const r of remaining) failures.push({ rcpt: r, message: `4.4.7 Delivery time expired: still failing after ${Math.round((Date.now() - j.queuedAt) / 1000)} s` });
      remaining.length = 0;
    }
    if (failures.length) await this.bounce(j, failures);
    if (remaining.length) {
      // Retry only those still pending: rewrite the job's recipients.
      await job.updateData({ ...j, to: remaining });
      throw new Error(`temporary failure for ${remaining.join(", ")}`);
    }
    unlinkSync(j.file);
    fsyncPath(this.dir);
    if (failures.length && !remaining.length) throw new UnrecoverableError(`permanent failure: ${failures.map((f) => f.rcpt).join(", ")}`);
  }

  /** null when delivered; else whether the failure is permanent. */
  private async sendToDomain(domain: string, from: string, rcpts: string[], file: string): Promise<Attempt | null> {
    let hosts: string[];
    try {
      const mx = await this.resolver.resolveMx(domain);
      hosts = mx.sort((a, b) => a.priority - b.priority).map((m) => m.exchange);
      if (hosts.length === 1 && hosts[0] === "") return { permanent: true, message: `5.1.10 ${domain} accepts no mail (null MX)` };
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOTFOUND" || code === "ENODATA") hosts = [domain]; // no MX: the domain's own address (RFC 5321 5.1)
      else return { permanent: false, message: `4.4.3 MX lookup for ${domain} failed (${code})` };
    }
    let last: Attempt = { permanent: false, message: `4.4.1 no MX host of ${domain} answered` };
    for (const host of hosts) {
      let addr: string;
      try {
        addr = (await this.resolver.resolve4(host))[0] ?? host;
      } catch {
        last = { permanent: false, message: `4.4.4 cannot resolve ${host}` };
        continue;
      }
      const tx = nodemailer.createTransport({ host: addr, port: 25, secure: false, name: this.myName, tls: { rejectUnauthorized: false, servername: host }, connectionTimeout: CONNECT_TIMEOUT_MS, greetingTimeout: CONNECT_TIMEOUT_MS, socketTimeout: 60_000 });
      try {
        await tx.sendMail({ envelope: { from: from || "", to: rcpts }, raw: createReadStream(file) });
        this.log.info({ domain, host, rcpts }, "outbound delivered");
        return null;
      } catch (err) {
        const code = (err as { responseCode?: number }).responseCode ?? 0;
        last = { permanent: code >= 500 && code < 600, message: `${code || "4.4.2"} ${host}: ${(err as Error).message.split("\n")[0]}` };
        if (last.permanent) return last; // a 5xx from an MX is the domain's answer
      } finally {
        tx.close();
      }
    }
    return last;
  }

  /** A delivery status notification to the sender (never for a bounce). */
  private async bounce(j: OutboundJob, failures: { rcpt: string; message: string }[]): Promise<void> {
    if (j.isBounce || !j.from) {
      this.log.error({ id: j.id, failures }, "a bounce could not be delivered; dropped");
      return;
    }
    const boundary = `mailha-${randomBytes(8).toString("hex")}`;
    const original = readFileSync(j.file, "latin1");
    const headerEnd = original.indexOf("\r\n\r\n");
    const headers = headerEnd >= 0 ? original.slice(0, headerEnd + 2) : original.slice(0, 4000);
    const text = [
      `From: Mail Delivery System <MAILER-DAEMON@${this.myName}>`,
      `To: <${j.from}>`,
      `Subject: Undelivered Mail Returned to Sender`,
      `Date: ${new Date().toUTCString()}`,
      `Auto-Submitted: auto-replied`,
      `MIME-Version: 1.0`,
      `Content-Type: multipart/report; report-type=delivery-status; boundary="${boundary}"`,
      "",
      `--${boundary}`,
      "Content-Type: text/plain; charset=us-ascii",
      "",
      `Your message could not be delivered to ${failures.length === 1 ? "this recipient" : "these recipients"}:`,
      ...failures.map((f) => `  <${f.rcpt}>: ${f.message}`),
      "",
      `--${boundary}`,
      "Content-Type: message/delivery-status",
      "",
      `Reporting-MTA: dns; ${this.myName}`,
      `Arrival-Date: ${new Date(j.queuedAt).toUTCString()}`,
      "",
      ...failures.flatMap((f) => [`Final-Recipient: rfc822; ${f.rcpt}`, "Action: failed", `Status: ${/^[45]\.\d+\.\d+/.exec(f.message.replace(/^\d{3} /, ""))?.[0] ?? (f.message.startsWith("5") ? "5.0.0" : "4.4.7")}`, `Diagnostic-Code: smtp; ${f.message}`, ""]),
      `--${boundary}`,
      "Content-Type: text/rfc822-headers",
      "",
      headers.trimEnd(),
      "",
      `--${boundary}--`,
      "",
    ].join("\r\n");
    const file = join(this.dir, `${j.id}.bounce.eml`);
    const fh = await open(file, "w", 0o600);
    await fh.write(text);
    await fh.sync();
    await fh.close();
    if (this.isLocal(j.from)) {
      await this.localDeliver("", j.from, file);
      unlinkSync(file);
    } else await this.add({ id: `${j.id}-bounce`, from: "", to: [j.from], file, queuedAt: Date.now(), isBounce: true });
    this.log.info({ id: j.id, to: j.from, failures: failures.length }, "bounce sent");
  }

  async close(): Promise<void> {
    await this.worker?.close();
    await this.queue.close();
  }
}
