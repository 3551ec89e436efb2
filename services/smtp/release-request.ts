// Users' own quarantine releases by mail (services/spam/release.ts): on submission
// only, an authenticated user's message to `quarantine-release@<a local domain>` is a
// request, never mail: its Subject names the held messages (`release KEY...`, the
// quarantine notice's mailto links fill it in). Only the user's own quarantine is
// looked at (the login is who asks); every key must be held for them, or nothing is
// asked and the answer is 550. The release itself is the spam worker's (a `release`
// job on its queue in the node's Redis): it retrains each as innocent and moves it into
// the INBOX within seconds. A request goes to that address alone (with other recipients
// it is refused at RCPT), and is read up to REQUEST_HEAD_MAX bytes (the rest drained).
// On port 25 the address is nothing special.
import type { Queue } from "bullmq";
import type { Logger } from "pino";
import type { Readable } from "node:stream";
import type { SMTPServerSession } from "smtp-server";
import { decoded, findHeld, headFieldsOf } from "../spam/quarantine.ts";
import { RELEASE_JOB, RELEASE_KEYS_MAX, RELEASE_LOCAL_PART, releaseKeysOf } from "../spam/release.ts";
import { smtpError } from "./limits.ts";

export const REQUEST_HEAD_MAX = 64 * 1024;

export interface ReleaseRequestOptions {
  readonly mailRoot: string;
  readonly queue: Pick<Queue, "add">;
  readonly isLocalDomain: (domain: string) => boolean;
  readonly log: Logger;
}

export class ReleaseRequests {
  /** Transactions (their envelopes) that are release requests. */
  private readonly requests = new WeakSet<object>();

  constructor(private readonly o: ReleaseRequestOptions) {}

  /** True when RCPT (an address) is a release address of a local domain. */
  isReleaseAddress(rcpt: string): boolean {
    const at = rcpt.lastIndexOf("@");
    return at > 0 && rcpt.slice(0, at).toLowerCase() === RELEASE_LOCAL_PART && this.o.isLocalDomain(rcpt.slice(at + 1).toLowerCase());
  }

  /** RCPT TO on submission: the error to answer, or null (accepted as this transaction's request). */
  rcpt(session: SMTPServerSession): Error | null {
    if (!session.user) return smtpError(530, "5.7.0 Authentication required");
    if (session.envelope.rcptTo.length > 0) return smtpError(550, `5.5.1 A release request goes to ${RELEASE_LOCAL_PART}@ alone`);
    this.requests.add(session.envelope);
    return null;
  }

  /** This transaction is a release request. */
  has(session: SMTPServerSession): boolean {
    return this.requests.has(session.envelope);
  }

  /** The request's message: reads its head, checks the keys, asks the worker; the 250 text, or an SMTP error thrown. */
  async data(stream: Readable, session: SMTPServerSession): Promise<string> {
    const user = String(session.user);
    const head = await readHead(stream, REQUEST_HEAD_MAX);
    const subject = decoded(headFieldsOf(head).get("subject"));
    const keys = releaseKeysOf(subject);
    if (!keys) throw smtpError(550, "5.5.2 Not a release request: its Subject must be: release KEY (see the quarantine notice)");
    if (keys.length > RELEASE_KEYS_MAX) throw smtpError(550, `5.5.3 At most ${RELEASE_KEYS_MAX} keys in one request`);
    const missing = keys.filter((k) => !findHeld(this.o.mailRoot, user, k));
    if (missing.length) throw smtpError(550, `5.1.1 Not held for ${user}: ${missing.slice(0, 3).join(" ")}${missing.length > 3 ? " ..." : ""}`);
    await this.o.queue.add(RELEASE_JOB, { user, keys }, { attempts: 3, backoff: { type: "fixed", delay: 5000 }, removeOnComplete: { count: 100 }, removeOnFail: { count: 100 } });
    this.o.log.info({ session: session.id, user, keys }, "quarantine release requested by the user");
    return `2.0.0 Ok: ${keys.length === 1 ? "the message" : `${keys.length} messages`} will be in your inbox within seconds`;
  }
}

/** The first MAX bytes of STREAM; the rest is read and dropped, so the client's DATA ends. */
function readHead(stream: Readable, max: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    stream.on("data", (c: Buffer) => {
      if (size >= max) return;
      const part = c.subarray(0, max - size);
      chunks.push(part);
      size += part.length;
    });
    stream.once("end", () => resolve(Buffer.concat(chunks, size)));
    stream.once("error", reject);
  });
}
