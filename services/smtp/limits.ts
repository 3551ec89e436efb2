// The limits every SMTP listener of mailha applies, the active node's and the passive
// node's backup MX alike (config `limits:`): clients at once (smtp_clients_max), clients
// per address (smtp_clients_per_address_max: `421 4.7.0` at the greeting, as Postfix's
// anvil), idle time, messages per session (smtp_messages_per_session_max: `452 4.5.3`
// at MAIL FROM), message size and recipients per message (mail.message_recipients_max,
// 452 4.5.3 beyond it, as Postfix's smtpd_recipient_limit). Refusals are counted. The backup MX takes BACKUP_MX_SIZE_SLACK_BYTES less than the
// size limit: what it forwards carries its own Received line and trace field on top,
// and the active node must not refuse (and bounce) a message the backup MX accepted.
import type { SMTPServerOptions, SMTPServerSession } from "smtp-server";
import type { MailhaConfig } from "../../common/config.ts";

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
    maxClients: c.limits.smtp_clients_max,
    socketTimeout: c.limits.smtp_idle_ms,
  };
}

export interface GuardCounters {
  /** Connections refused: their address had smtp_clients_per_address_max open already. */
  per_address_refused: number;
  /** MAIL FROMs refused: the session had sent smtp_messages_per_session_max messages. */
  messages_refused: number;
  /** Connections open now (all listeners of this process). */
  open: number;
  /** Addresses with a connection open now. */
  addresses: number;
}

/**
 * The per-address and per-session limits, shared by every listener of one process:
 * `onConnect`/`onClose` count connections per client address (EXEMPT: the peer's
 * service address, whose backup MX forwards many at once), `mailFrom` counts messages
 * per session. Bounded: one map entry per address with an open connection.
 */
export class ListenerGuard {
  readonly counters: GuardCounters = { per_address_refused: 0, messages_refused: 0, open: 0, addresses: 0 };
  private readonly perAddress = new Map<string, number>();
  private readonly counted = new WeakSet<object>();
  private readonly messages = new WeakMap<object, number>();

  constructor(private readonly o: { perAddressMax: number; messagesPerSessionMax: number; exempt?: readonly string[] }) {}

  static of(c: MailhaConfig, exempt: readonly string[] = []): ListenerGuard {
    return new ListenerGuard({ perAddressMax: c.limits.smtp_clients_per_address_max, messagesPerSessionMax: c.limits.smtp_messages_per_session_max, exempt });
  }

  private key(session: SMTPServerSession): string {
    return (session.remoteAddress ?? "").replace(/^::ffff:/, "");
  }

  readonly onConnect = (session: SMTPServerSession, cb: (err?: Error | null) => void): void => {
    const k = this.key(session);
    if (this.o.exempt?.includes(k)) return cb();
    const n = this.perAddress.get(k) ?? 0;
    if (n >= this.o.perAddressMax) {
      this.counters.per_address_refused++;
      return cb(smtpError(421, `4.7.0 Too many connections from your address (at most ${this.o.perAddressMax}), try again later`));
    }
    this.perAddress.set(k, n + 1);
    this.counted.add(session);
    this.counters.open++;
    this.counters.addresses = this.perAddress.size;
    cb();
  };

  readonly onClose = (session: SMTPServerSession): void => {
    if (!this.counted.has(session)) return;
    this.counted.delete(session);
    const k = this.key(session);
    const n = (this.perAddress.get(k) ?? 1) - 1;
    if (n <= 0) this.perAddress.delete(k);
    else this.perAddress.set(k, n);
    this.counters.open = Math.max(0, this.counters.open - 1);
    this.counters.addresses = this.perAddress.size;
  };

  /** The 452 for one more MAIL FROM in SESSION, or null (and the message counted). */
  mailFromError(session: SMTPServerSession): Error | null {
    const n = this.messages.get(session) ?? 0;
    if (n >= this.o.messagesPerSessionMax) {
      this.counters.messages_refused++;
      return smtpError(452, `4.5.3 Too many messages in one session (at most ${this.o.messagesPerSessionMax}): send the rest in a new one`);
    }
    this.messages.set(session, n + 1);
    return null;
  }
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
