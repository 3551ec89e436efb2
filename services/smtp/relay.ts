// One hand-over of a message to another SMTP server (the outbound queue to a remote MX,
// the backup MX to the active node), and what became of each recipient: delivered
// (the server's 250 after DATA, for the recipients it accepted), refused (a 5xx: to be
// bounced) or deferred (a 4xx or no answer: to be tried again). nodemailer resolves a
// send that only some recipients accepted, listing the others in `rejectedErrors`: a
// caller that took the promise alone for "done" lost them without a bounce.
import type { Readable } from "node:stream";
import type { Transporter } from "nodemailer";
import { statusOf, type Failure } from "./dsn.ts";

export interface RelayOutcome {
  readonly delivered: string[];
  readonly refused: Failure[];
  readonly deferred: Failure[];
  /** Whether the server answered the transaction at all (false: no connection, a timeout). */
  readonly answered: boolean;
  /** The server's reply to the end of the message, when it took it. */
  readonly response?: string;
}

interface SmtpErrorLike {
  readonly responseCode?: number;
  readonly response?: string;
  readonly recipient?: string;
  readonly message: string;
  readonly rejectedErrors?: SmtpErrorLike[];
}

const oneLine = (s: string) => s.replace(/[\r\n]+/g, " ").trim();

/** A failure of RCPT from the server's reply in ERR, at WHERE. */
function failureOf(rcpt: string, err: SmtpErrorLike, where: string): Failure {
  const reply = oneLine(err.response ?? err.message);
  const permanent = (err.responseCode ?? 0) >= 500;
  return { rcpt, status: statusOf(reply, permanent), diagnostic: `${reply} (${where})` };
}

/** Sends RAW from FROM to TO through TX (WHERE names the server in diagnostics) and sorts the recipients. */
export async function relay(tx: Transporter, envelope: { from: string; to: readonly string[] }, raw: Readable, where: string): Promise<RelayOutcome> {
  const to = [...envelope.to];
  const sortOut = (errors: readonly SmtpErrorLike[], delivered: string[], answered: boolean, response?: string): RelayOutcome => {
    const refused: Failure[] = [];
    const deferred: Failure[] = [];
    const seen = new Set<string>();
    for (const e of errors) {
      if (!e.recipient) continue;
      seen.add(e.recipient.toLowerCase());
      ((e.responseCode ?? 0) >= 500 ? refused : deferred).push(failureOf(e.recipient, e, where));
    }
    const ok = new Set(delivered.map((d) => d.toLowerCase()));
    // A recipient the result names nowhere was not delivered: tried again.
    for (const r of to) if (!ok.has(r.toLowerCase()) && !seen.has(r.toLowerCase())) deferred.push({ rcpt: r, status: "4.4.0", diagnostic: `no reply for this recipient (${where})` });
    return { delivered: to.filter((r) => ok.has(r.toLowerCase())), refused, deferred, answered, ...(response ? { response } : {}) };
  };
  try {
    const info = (await tx.sendMail({ envelope: { from: envelope.from, to }, raw })) as { accepted?: unknown[]; rejectedErrors?: SmtpErrorLike[]; response?: string };
    const accepted = (info.accepted ?? []).map((a) => (typeof a === "string" ? a : String((a as { address?: string }).address ?? a)));
    return sortOut(info.rejectedErrors ?? [], accepted, true, info.response);
  } catch (e) {
    const err = e as SmtpErrorLike & { code?: string };
    // Every recipient refused at RCPT: each with its own reply.
    if (err.rejectedErrors?.length) return sortOut(err.rejectedErrors, [], true);
    // MAIL FROM or DATA refused, or no SMTP answer at all: the same for everyone.
    const answered = typeof err.responseCode === "number" && err.responseCode > 0;
    const permanent = answered && err.responseCode! >= 500;
    const reply = answered ? oneLine(err.response ?? err.message) : `4.4.1 ${oneLine(err.message)}`;
    const f = (rcpt: string): Failure => ({ rcpt, status: statusOf(reply, permanent), diagnostic: `${reply} (${where})` });
    return { delivered: [], refused: permanent ? to.map(f) : [], deferred: permanent ? [] : to.map(f), answered };
  }
}
