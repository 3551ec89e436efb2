// The failover test's clients, each a loop that records every request:
//   SmtpSender   nodemailer, one uniquely tagged message per interval, trying the MX
//                hosts in preference order as RFC 5321 asks; counts sent and acknowledged;
//   ImapWatcher  an imapflow session on the mail host's addresses that fetches new
//                messages, sets \Seen on them, and reconnects with a bounded backoff
//                (imapflow does not reconnect by itself);
//   Pop3Reader   POP3 sessions that RETR and DELE what arrived, committed by QUIT.
// Loops end when the trial says stop; every wait and retry is bounded.
import nodemailer from "nodemailer";
import { ImapFlow } from "imapflow";
import { sleep } from "../../common/exec.ts";
import { Pop3Client } from "./pop3.ts";
import type { Proto, Recorder } from "./record.ts";
import type { Finder } from "./resolve.ts";

export interface WorkloadContext {
  readonly rec: Recorder;
  readonly find: Finder;
  readonly stopped: () => boolean;
  /** Prefix of this trial's message ids. */
  readonly run: string;
}

export interface Mailbox {
  readonly address: string;
  readonly password: string;
}

const OP_TIMEOUT_MS = 5000;
/** As the other clients: a server that does not answer within this is skipped for the next. */
const CONNECT_TIMEOUT_MS = 2000;
const BACKOFF_MIN_MS = 100;
const BACKOFF_MAX_MS = 2000;
export const TEST_ID_HEADER = "X-Mailha-Test-Id";
const idOf = (headers: string) => /^x-mailha-test-id:\s*(\S+)/im.exec(headers)?.[1] ?? null;

function withTimeout<T>(p: Promise<T>, ms: number, what: string, onTimeout: () => void): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      t = setTimeout(() => {
        onTimeout();
        reject(new Error(`${what}: no answer within ${ms} ms`));
      }, ms);
    }),
  ]).finally(() => clearTimeout(t));
}

async function backoff(ctx: WorkloadContext, ms: number): Promise<number> {
  for (let waited = 0; waited < ms && !ctx.stopped(); waited += 50) await sleep(50);
  return Math.min(BACKOFF_MAX_MS, ms * 2);
}

export class SmtpSender {
  readonly sent: { id: string; to: string; at: number }[] = [];
  /** Message id -> the mailbox it went to, for every message a server answered 250. */
  readonly acked = new Map<string, string>();
  /** Message id -> the server that answered 250 and when. */
  readonly ackedBy = new Map<string, { host: string; at: number }>();
  private n = 0;

  constructor(private readonly ctx: WorkloadContext, private readonly o: { everyMs: number; recipients: readonly string[]; pop3Share: number }) {}

  private recipient(): string {
    // With a POP3 mailbox (the last recipient), every pop3Share-th message goes to it.
    const r = this.o.recipients;
    return r.length > 1 && this.o.pop3Share > 0 && this.n % this.o.pop3Share === 0 ? r[r.length - 1]! : r[0]!;
  }

  async run(): Promise<void> {
    while (!this.ctx.stopped()) {
      this.n++;
      const id = `${this.ctx.run}-${this.n}`;
      const to = this.recipient();
      this.sent.push({ id, to, at: Date.now() });
      const start = Date.now();
      const errors: string[] = [];
      let host: string | undefined;
      for (const h of await this.ctx.find.mxAddresses()) {
        const tx = nodemailer.createTransport({ host: h, port: 25, secure: false, tls: { rejectUnauthorized: false }, connectionTimeout: CONNECT_TIMEOUT_MS, greetingTimeout: CONNECT_TIMEOUT_MS, socketTimeout: OP_TIMEOUT_MS });
        try {
          await tx.sendMail({ from: "failover-test@example.net", to, subject: `failover test ${id}`, text: `id ${id}\n`, headers: { [TEST_ID_HEADER]: id } });
          host = h;
          break;
        } catch (err) {
          errors.push(`${h}: ${(err as Error).message.split("\n")[0]}`); // next MX, as RFC 5321 asks
        } finally {
          tx.close();
        }
      }
      // The hosts that failed before one answered 250 are kept too: a message sent to two MX hosts can be there twice.
      this.ctx.rec.add({ proto: "smtp", op: "send", start, end: Date.now(), ok: !!host, host, id, error: errors.length ? errors.join("; ").slice(0, 300) : undefined });
      if (host) {
        this.acked.set(id, to);
        this.ackedBy.set(id, { host, at: Date.now() });
      }
      await sleep(this.o.everyMs);
    }
  }
}

export class ImapWatcher {
  /** Message id -> UID, for every tagged message this session fetched. */
  readonly seen = new Map<string, number>();
  /** UIDs whose \Seen flag the server acknowledged. */
  readonly flagged = new Set<number>();
  /** Tagged messages whose \Seen flag the server acknowledged (a UID names another message after a split brain). */
  readonly flaggedIds = new Set<string>();
  uidValidity: bigint | null = null;
  uidValidityChanges = 0;
  /** Selects where UIDNEXT was at or below a UID this session had seen (a forced takeover after a split brain). */
  uidNextRegressions = 0;

  constructor(private readonly ctx: WorkloadContext, private readonly o: Mailbox & { port: 143 | 993; pollMs: number }) {}

  private client(host: string): ImapFlow {
    const c = new ImapFlow({ host, port: this.o.port, secure: this.o.port === 993, doSTARTTLS: this.o.port === 143 ? true : undefined, tls: { rejectUnauthorized: false }, auth: { user: this.o.address, pass: this.o.password }, logger: false, connectionTimeout: CONNECT_TIMEOUT_MS, greetingTimeout: CONNECT_TIMEOUT_MS, socketTimeout: 10_000 });
    c.on("error", () => {});
    return c;
  }

  async run(): Promise<void> {
    let wait = BACKOFF_MIN_MS;
    let lastUid = 0;
    while (!this.ctx.stopped()) {
      let served = false;
      for (const host of await this.ctx.find.mailHostAddresses()) {
        if (this.ctx.stopped()) break;
        const c = this.client(host);
        const op = <T>(name: string, fn: () => Promise<T>) => this.ctx.rec.time("imap" as Proto, name, host, () => withTimeout(fn(), OP_TIMEOUT_MS, name, () => c.close()));
        try {
          await op("connect", () => c.connect());
          const box = await op("select", () => c.mailboxOpen("INBOX"));
          if (this.uidValidity !== null && box.uidValidity !== this.uidValidity) this.uidValidityChanges++;
          this.uidValidity = box.uidValidity;
          // After a split brain the node that took over gives out again UIDs the other
          // had given: look at the whole mailbox again, not only above the last UID seen.
          if (box.uidNext !== undefined && box.uidNext <= lastUid) {
            this.uidNextRegressions++;
            lastUid = 0;
          }
          served = true;
          wait = BACKOFF_MIN_MS;
          while (!this.ctx.stopped()) {
            // NOOP lets the server report new mail (EXISTS); imapflow answers a command
            // on a dead connection without an error, so `usable` is checked each time.
            await op("noop", async () => {
              await c.noop();
              if (!c.usable) throw new Error("connection lost");
            });
            const fresh = await op("fetch", async () => {
              const got: { uid: number; id: string | null }[] = [];
              for await (const m of c.fetch(`${lastUid + 1}:*`, { uid: true, headers: [TEST_ID_HEADER.toLowerCase()] }, { uid: true })) {
                if (m.uid > lastUid) got.push({ uid: m.uid, id: idOf(m.headers?.toString() ?? "") });
              }
              if (!c.usable) throw new Error("connection lost");
              return got;
            });
            for (const m of fresh) {
              lastUid = Math.max(lastUid, m.uid);
              if (m.id) this.seen.set(m.id, m.uid);
            }
            const uids = fresh.map((m) => m.uid);
            const ids = fresh.map((m) => m.id).filter((x): x is string => x !== null);
            if (uids.length) {
              const ok = await op("store-flags", async () => {
                const r = await c.messageFlagsAdd(uids.join(","), ["\\Seen"], { uid: true });
                if (!c.usable || !r) throw new Error("flags not stored");
                return r;
              });
              if (ok) {
                for (const u of uids) this.flagged.add(u);
                for (const id of ids) this.flaggedIds.add(id);
              }
            }
            await sleep(this.o.pollMs);
          }
          await c.logout().catch(() => {});
        } catch {
          c.close();
        }
      }
      if (!served && !this.ctx.stopped()) wait = await backoff(this.ctx, wait);
    }
  }
}

export class Pop3Reader {
  /** Message id -> the UIDLs it was retrieved under (two UIDLs = delivered twice). */
  readonly retrieved = new Map<string, Set<string>>();
  /** Ids whose deletion a QUIT committed. */
  readonly committed = new Set<string>();

  constructor(private readonly ctx: WorkloadContext, private readonly o: Mailbox & { pauseMs: number }) {}

  /** One session: retrieve and delete up to `max` messages; true when the QUIT was acknowledged. */
  async session(host: string, max: number, rec: Recorder | null): Promise<{ ok: boolean; left: number }> {
    const op = <T>(name: string, fn: () => Promise<T>) => (rec ? rec.time("pop3", name, host, fn) : fn());
    let c: Pop3Client | null = null;
    try {
      c = await op("connect", () => Pop3Client.connect(host, 995, CONNECT_TIMEOUT_MS));
      const cl = c;
      await op("login", () => cl.login(this.o.address, this.o.password));
      const list = await op("uidl", () => cl.uidl());
      const taken: string[] = [];
      for (const m of list.slice(0, max)) {
        const body = await op("retr", () => cl.retr(m.n));
        const id = idOf(body.split("\r\n\r\n")[0] ?? "");
        if (id) {
          const s = this.retrieved.get(id) ?? new Set<string>();
          s.add(m.uid);
          this.retrieved.set(id, s);
          taken.push(id);
        }
        await op("dele", () => cl.dele(m.n));
      }
      await op("quit", () => cl.quit());
      for (const id of taken) this.committed.add(id);
      return { ok: true, left: Math.max(0, list.length - max) };
    } catch {
      return { ok: false, left: -1 };
    } finally {
      c?.close();
    }
  }

  async run(): Promise<void> {
    let wait = BACKOFF_MIN_MS;
    while (!this.ctx.stopped()) {
      let ok = false;
      for (const host of await this.ctx.find.mailHostAddresses()) {
        if ((await this.session(host, 50, this.ctx.rec)).ok) {
          ok = true;
          break;
        }
      }
      if (ok) {
        wait = BACKOFF_MIN_MS;
        await sleep(this.o.pauseMs);
      } else wait = await backoff(this.ctx, wait);
    }
  }

  /** After the trial: take what is still in the mailbox (bounded), unrecorded. */
  async drain(): Promise<boolean> {
    for (let attempt = 0; attempt < 20; attempt++) {
      for (const host of await this.ctx.find.mailHostAddresses()) {
        const r = await this.session(host, 1000, null);
        if (r.ok && r.left === 0) return true;
        if (r.ok) break;
      }
      await sleep(500);
    }
    return false;
  }
}
