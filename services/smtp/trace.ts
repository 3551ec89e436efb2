// The trace fields the active node puts on top of every message it delivers (RFC 5321
// 4.4): Return-Path with the envelope sender, and a Received field naming the client,
// this host and the session. Its `for` clause names the recipient only when there is
// exactly one: every copy carries the same field, and with several recipients it would
// show each one (Bcc recipients too) to all the others.

/** An RFC 5322 date-time of D in UTC. */
export function rfc2822(d: Date): string {
  return d.toUTCString().replace(/GMT$/, "+0000");
}

export interface TraceOptions {
  /** The envelope sender ("" for the null sender). */
  readonly from: string;
  /** The client's HELO/EHLO name, and its address. */
  readonly helo: string | undefined | false;
  readonly remoteAddress: string;
  /** This host's name. */
  readonly by: string;
  /** "ESMTP", "ESMTPS", "ESMTPSA", ... */
  readonly protocol: string;
  readonly id: string;
  /** The envelope recipients, in ACE form. */
  readonly rcpts: readonly string[];
  readonly date: Date;
}

/** Return-Path and Received, each line ending in CRLF. */
export function traceFields(o: TraceOptions): string {
  const forClause = o.rcpts.length === 1 ? `\r\n\tfor <${o.rcpts[0]}>` : "";
  return `Return-Path: <${o.from}>\r\nReceived: from ${o.helo || "unknown"} ([${o.remoteAddress}])\r\n\tby ${o.by} (mailha) with ${o.protocol} id ${o.id}${forClause}; ${rfc2822(o.date)}\r\n`;
}
