// The limits every SMTP listener of mailha applies, the active node's and the passive
// node's backup MX alike: clients at once, idle time, message size and recipients per
// message (mail.message_recipients_max, 452 4.5.3 beyond it, as Postfix's
// smtpd_recipient_limit). The backup MX takes BACKUP_MX_SIZE_SLACK_BYTES less than the
// size limit: what it forwards carries its own Received line and trace field on top,
// and the active node must not refuse (and bounce) a message the backup MX accepted.
import type { SMTPServerOptions, SMTPServerSession } from "smtp-server";
import type { MailhaConfig } from "../../common/config.ts";

export const CLIENTS_MAX = 200;
export const SOCKET_TIMEOUT_MS = 120_000;
/** Room for the backup MX's Received line (its HELO name is at most 255 octets) and trace field. */
export const BACKUP_MX_SIZE_SLACK_BYTES = 1024;

export function smtpError(code: number, message: string): Error & { responseCode: number } {
  const e = new Error(message) as Error & { responseCode: number };
  e.responseCode = code;
  return e;
}

/** smtp-server options for the limits; ROLE "backup-mx" leaves the slack under the size limit. */
export function listenerLimits(c: MailhaConfig, role: "active" | "backup-mx"): Pick<SMTPServerOptions, "size" | "maxClients" | "socketTimeout"> {
  return {
    size: c.mail.message_size_max_bytes - (role === "backup-mx" ? BACKUP_MX_SIZE_SLACK_BYTES : 0),
    maxClients: CLIENTS_MAX,
    socketTimeout: SOCKET_TIMEOUT_MS,
  };
}

/**
 * The 452 for a RCPT of ADDRESS once the transaction has MAX recipients (a repeated
 * address replaces its entry and does not count); null while there is room. Checked
 * before any lookup, so a long list costs no queries.
 */
export function recipientLimitError(session: SMTPServerSession, address: string, max: number): Error | null {
  const rcpts = session.envelope.rcptTo;
  if (rcpts.length < max) return null;
  const key = address.toLowerCase();
  if (rcpts.some((r) => r.address.toLowerCase() === key)) return null;
  return smtpError(452, `4.5.3 Too many recipients (at most ${max} per message)`);
}
