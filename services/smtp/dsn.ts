// Delivery status notifications (RFC 3464): the bounce a sender gets for recipients a
// message could not reach, from the outbound queue and from the backup MX alike. The
// report names each failed recipient with its status and the server's answer, and
// carries the original message's header (at most HEADER_BYTES_MAX of it, read from the
// file: the message itself is never held in memory). A bounce file is written durably
// (the file and its directory fsynced) before it is queued or spooled.
import { open } from "node:fs/promises";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { writeFileDurable } from "../../common/fsutil.ts";

export const HEADER_BYTES_MAX = 64 * 1024;

export interface Failure {
  readonly rcpt: string;
  /** The enhanced status code, e.g. 5.1.1, 4.4.7. */
  readonly status: string;
  /** What went wrong: the server's reply (with the host) or mailha's own reason. */
  readonly diagnostic: string;
}

/** The status of REPLY ("550 5.1.1 No such user", "4.4.7 ..."): its enhanced code, else one from its class. */
export function statusOf(reply: string, permanent: boolean): string {
  const m = /^(?:\d{3}[ -])?([245]\.\d{1,3}\.\d{1,3})\b/.exec(reply.trim());
  if (m) return m[1]!;
  return permanent ? "5.0.0" : "4.0.0";
}

/** The header of the message in FILE: up to its blank line, at most HEADER_BYTES_MAX. */
export async function headerOf(file: string): Promise<string> {
  const fh = await open(file, "r");
  try {
    const buf = Buffer.alloc(HEADER_BYTES_MAX);
    let got = 0;
    while (got < buf.length) {
      const { bytesRead } = await fh.read(buf, got, buf.length - got, got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    const text = buf.subarray(0, got).toString("latin1");
    const end = text.indexOf("\r\n\r\n");
    return end >= 0 ? text.slice(0, end + 2) : text.slice(0, text.lastIndexOf("\r\n") + 2);
  } finally {
    await fh.close();
  }
}

export interface DsnOptions {
  /** This host's name (Reporting-MTA, the From: domain). */
  readonly reportingMta: string;
  /** The original envelope sender, who gets the report. */
  readonly to: string;
  readonly arrival: Date;
  readonly failures: readonly Failure[];
  /** The original header (headerOf). */
  readonly originalHeader: string;
  readonly date?: Date;
}

/** The report as a message (multipart/report; report-type=delivery-status), lines ending in CRLF. */
export function dsnMessage(o: DsnOptions): string {
  const boundary = `mailha-${randomBytes(8).toString("hex")}`;
  return [
    `From: Mail Delivery System <MAILER-DAEMON@${o.reportingMta}>`,
    `To: <${o.to}>`,
    `Subject: Undelivered Mail Returned to Sender`,
    `Date: ${(o.date ?? new Date()).toUTCString()}`,
    `Auto-Submitted: auto-replied`,
    `MIME-Version: 1.0`,
    `Content-Type: multipart/report; report-type=delivery-status; boundary="${boundary}"`,
    "",
    `--${boundary}`,
    "Content-Type: text/plain; charset=us-ascii",
    "",
    `Your message could not be delivered to ${o.failures.length === 1 ? "this recipient" : "these recipients"}:`,
    ...o.failures.map((f) => `  <${f.rcpt}>: ${f.diagnostic}`),
    "",
    `--${boundary}`,
    "Content-Type: message/delivery-status",
    "",
    `Reporting-MTA: dns; ${o.reportingMta}`,
    `Arrival-Date: ${o.arrival.toUTCString()}`,
    "",
    ...o.failures.flatMap((f) => [`Final-Recipient: rfc822; ${f.rcpt}`, "Action: failed", `Status: ${f.status}`, `Diagnostic-Code: smtp; ${f.diagnostic.replace(/[\r\n]+/g, " ")}`, ""]),
    `--${boundary}`,
    "Content-Type: text/rfc822-headers",
    "",
    o.originalHeader.trimEnd(),
    "",
    `--${boundary}--`,
    "",
  ].join("\r\n");
}

/** Writes TEXT as DIR/NAME, the file and DIR fsynced; returns its path. */
export function writeDsnFile(dir: string, name: string, text: string): string {
  const file = join(dir, name);
  writeFileDurable(file, text);
  return file;
}
