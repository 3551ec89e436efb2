// Outbound mail: messages from authenticated users to other domains. The message is
// stored durably on the volume and a job is added to the BullMQ queue "outbound" on
// the Redis that also lives on the volume (AOF, appendfsync always), before the 250:
// the queue survives a failover. Workers look up the MX hosts, try them in preference
// order, retry with exponential backoff (bounded by the configured lifetime, five days
// by default, as RFC 5321 suggests), and on a permanent failure or when the lifetime
// is over send a delivery status notification (RFC 3464, dsn.ts) to the sender. Each
// recipient counts on its own (relay.ts): of a message some recipients took, the
// refused ones are bounced at once and the deferred ones retried, alone.
// A job is data from Redis, not an instruction: the worker mails, and at the end
// unlinks, only a regular file directly in its own spool (resolved, so no link leads
// out); any other job fails for good, logged, and the file it names is left alone.
import { randomBytes } from "node:crypto";
import { Resolver } from "node:dns/promises";
import { createReadStream, existsSync, lstatSync, mkdirSync, realpathSync, statSync, unlinkSync } from "node:fs";
import { open } from "node:fs/promises";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { Queue, UnrecoverableError, Worker, type Job } from "bullmq";
import nodemailer from "nodemailer";
import type { Logger } from "pino";
import type { Readable } from "node:stream";
import type { MailhaConfig } from "../../common/config.ts";
import { fsyncPath } from "../../common/fsutil.ts";
import { copyChecked } from "./maildir.ts";
import { dsnMessage, headerOf, writeDsnFile, type Failure } from "./dsn.ts";
import { relay, type RelayOutcome } from "./relay.ts";
import { redisConnection } from "../redis.ts";

export const QUEUE = "outbound";
const CONCURRENCY = 8;
const CONNECT_TIMEOUT_MS = 10_000;
/** MX hosts of one domain tried per attempt. */
const MX_HOSTS_MAX = 10;

export interface OutboundJob {
  readonly id: string;
  readonly from: string;
  readonly to: string[];
  readonly file: string;
  readonly queuedAt: number;
  /** A bounce has an empty sender and is never bounced itself. */
  readonly isBounce: boolean;
  /** Refused recipients whose bounce is still to be sent (a retry sends it first). */
  readonly unbounced?: readonly Failure[];
}

/** Recipients one job may name (more is not a job this service made). */
const JOB_RECIPIENTS_MAX = 10_000;

export type SpoolFile = { readonly kind: "ok"; readonly path: string } | { readonly kind: "missing" } | { readonly kind: "refused"; readonly reason: string };

/**
 * Whether FILE (a job's) is a message of the spool DIR: a regular file directly in it,
 * with one link, after resolving every symbolic link. "missing": in the spool by name
 * but gone (delivered before a crash). Nothing outside DIR is even looked at.
 */
export function spoolFileOf(dir: string, file: unknown): SpoolFile {
  if (typeof file !== "string" || !isAbsolute(file) || file.length > 4096 || file.includes("\0")) return { kind: "refused", reason: "the file is not an absolute path" };
  const spool = resolve(dir);
  if (dirname(resolve(file)) !== spool) return { kind: "refused", reason: `${file} is not in the outbound spool ${spool}` };
  let real: string;
  try {
    real = realpathSync(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") {
      try {
        lstatSync(file);
      } catch {
        return { kind: "missing" };
      }
      return { kind: "refused", reason: `${file} is a link that leads nowhere` };
    }
    return { kind: "refused", reason: `${file}: ${(err as NodeJS.ErrnoException).code}` };
  }
  if (dirname(real) !== realpathSync(spool)) return { kind: "refused", reason: `${file} leads outside the outbound spool (to ${real})` };
  const st = statSync(real);
  if (!st.isFile()) return { kind: "refused", reason: `${file} is not a regular file` };
  if (st.nlink !== 1) return { kind: "refused", reason: `${file} has ${st.nlink} hard links (a spool file has one)` };
  return { kind: "ok", path: real };
}

/** Why the data of a job is not one this service made, or null. */
function badJob(j: Partial<OutboundJob>): string | null {
  if (typeof j.from !== "string") return "no sender";
  if (!Array.isArray(j.to) || j.to.length > JOB_RECIPIENTS_MAX || !j.to.every((r) => typeof r === "string")) return "the recipients are not a list of addresses";
  if (typeof j.queuedAt !== "number") return "no queue time";
  return null;
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
    this.queue = new Queue(QUEUE, { connection: redisConnection(redisSocket) });
    this.connection = redisConnection(redisSocket);
  }

  private readonly connection: ReturnType<typeof redisConnection>;

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
    const where = spoolFileOf(this.dir, job.data.file);
    const bad = where.kind === "refused" ? where.reason : badJob(job.data);
    if (bad) {
      this.log.error({ id: job.id, file: String(job.data.file).slice(0, 512), reason: bad }, "outbound job refused: not a message of the outbound spool; the file it names is left alone");
      throw new UnrecoverableError(`refused: ${bad}`);
    }
    if (where.kind !== "ok") return; // missing: already delivered (a retry after a crash)
    let j: OutboundJob = { ...job.data, file: where.path };
    // A bounce the last try decided on but did not get out (its own failure): first.
    if (j.unbounced?.length) {
      await this.bounce(j, j.unbounced);
      j = { ...j, unbounced: [] };
      await job.updateData(j);
    }
    const refused: Failure[] = [];
    const deferred: Failure[] = [];
    const byDomain = new Map<string, string[]>();
    for (const r of j.to) {
      const d = r.slice(r.lastIndexOf("@") + 1).toLowerCase();
      byDomain.set(d, [...(byDomain.get(d) ?? []), r]);
    }
    for (const [domain, rcpts] of byDomain) {
      const res = await this.sendToDomain(domain, j.from, rcpts, j.file);
      refused.push(...res.refused);
      deferred.push(...res.deferred);
    }
    const expired = Date.now() - j.queuedAt >= this.c.mail.outbound.lifetime_s * 1000;
    const lastTry = job.attemptsMade + 1 >= (job.opts.attempts ?? 1);
    if (deferred.length && (expired || lastTry)) {
      const s = Math.round((Date.now() - j.queuedAt) / 1000);
      for (const f of deferred.splice(0)) refused.push({ rcpt: f.rcpt, status: "4.4.7", diagnostic: `4.4.7 Delivery time expired: still failing after ${s} s, last: ${f.diagnostic}` });
    }
    if (refused.length) {
      // Recorded before it is sent: a retry never sends to a recipient again that was
      // delivered or refused, and still sends a bounce that failed to go out.
      j = { ...j, to: deferred.map((f) => f.rcpt), unbounced: refused };
      await job.updateData(j);
      await this.bounce(j, refused);
      j = { ...j, unbounced: [] };
      await job.updateData(j);
    }
    if (deferred.length) {
      // Retry only those still pending: the job's recipients rewritten.
      if (!refused.length) await job.updateData({ ...j, to: deferred.map((f) => f.rcpt) });
      throw new Error(`temporary failure for ${deferred.map((f) => `${f.rcpt} (${f.diagnostic})`).join(", ")}`);
    }
    unlinkSync(j.file);
    fsyncPath(this.dir);
    if (refused.length) throw new UnrecoverableError(`permanent failure: ${refused.map((f) => f.rcpt).join(", ")}`);
  }

  /** Each of RCPTS at DOMAIN delivered, refused or deferred, by the domain's first MX host that answers. */
  private async sendToDomain(domain: string, from: string, rcpts: string[], file: string): Promise<RelayOutcome> {
    const all = (permanent: boolean, status: string, diagnostic: string): RelayOutcome => {
      const f = rcpts.map((rcpt) => ({ rcpt, status, diagnostic }));
      return { delivered: [], refused: permanent ? f : [], deferred: permanent ? [] : f, answered: false };
    };
    let hosts: string[];
    try {
      const mx = await this.resolver.resolveMx(domain);
      hosts = mx.sort((a, b) => a.priority - b.priority).map((m) => m.exchange);
      if (hosts.length === 1 && hosts[0] === "") return all(true, "5.1.10", `5.1.10 ${domain} accepts no mail (null MX)`);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOTFOUND" || code === "ENODATA") hosts = [domain]; // no MX: the domain's own address (RFC 5321 5.1)
      else return all(false, "4.4.3", `4.4.3 MX lookup for ${domain} failed (${code})`);
    }
    let last = all(false, "4.4.1", `4.4.1 no MX host of ${domain} answered`);
    for (const host of hosts.slice(0, MX_HOSTS_MAX)) {
      let addr: string;
      try {
        addr = (await this.resolver.resolve4(host))[0] ?? host;
      } catch {
        last = all(false, "4.4.4", `4.4.4 cannot resolve ${host}`);
        continue;
      }
      const tx = nodemailer.createTransport({ host: addr, port: 25, secure: false, name: this.myName, tls: { rejectUnauthorized: false, servername: host }, connectionTimeout: CONNECT_TIMEOUT_MS, greetingTimeout: CONNECT_TIMEOUT_MS, socketTimeout: 60_000 });
      try {
        last = await relay(tx, { from, to: rcpts }, createReadStream(file), host);
      } finally {
        tx.close();
      }
      if (last.delivered.length) this.log.info({ domain, host, rcpts: last.delivered }, "outbound delivered");
      // A host that answered gave the domain's answer; one that did not: the next MX.
      if (last.answered) return last;
    }
    return last;
  }

  /**
   * A delivery status notification to the sender of J for FAILURES (never for a bounce):
   * each one a new job of its own (a job can bounce more than once: refused recipients
   * now, expired ones later), its file and the queue's directory fsynced first.
   */
  async bounce(j: Pick<OutboundJob, "id" | "from" | "file" | "queuedAt" | "isBounce">, failures: readonly Failure[]): Promise<void> {
    if (j.isBounce || !j.from) {
      this.log.error({ id: j.id, failures }, "a bounce could not be delivered; dropped");
      return;
    }
    const text = dsnMessage({ reportingMta: this.myName, to: j.from, arrival: new Date(j.queuedAt), failures, originalHeader: existsSync(j.file) ? await headerOf(j.file) : "" });
    const id = `${j.id}-bounce-${randomBytes(4).toString("hex")}`;
    const file = writeDsnFile(this.dir, `${id}.eml`, text);
    if (this.isLocal(j.from)) {
      try {
        await this.localDeliver("", j.from, file);
      } finally {
        unlinkSync(file);
        fsyncPath(this.dir);
      }
    } else await this.add({ id, from: "", to: [j.from], file, queuedAt: Date.now(), isBounce: true });
    this.log.info({ id: j.id, bounce: id, to: j.from, failures: failures.length }, "bounce sent");
  }

  async close(): Promise<void> {
    await this.worker?.close();
    await this.queue.close();
  }
}
