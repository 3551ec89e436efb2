// Where each accepted RCPT goes (local mailboxes, remote forwards), kept per mail
// transaction: smtp-server replaces the session's envelope object at RSET, HELO/EHLO,
// STARTTLS and after DATA, and the state here is keyed by that object, so a recipient
// named before any of them is gone with its transaction. At DATA the targets are read
// back for the envelope's own recipient list only (the library's, which it also
// deduplicates), never from anything the session kept before.
import type { SMTPServerSession } from "smtp-server";

export interface Targets {
  readonly mailboxes: readonly string[];
  readonly remote: readonly string[];
}

export class Transactions {
  private readonly byEnvelope = new WeakMap<object, Map<string, Targets>>();

  /** Records where RCPT ADDRESS (as smtp-server parsed it) goes, for SESSION's current transaction. */
  add(session: SMTPServerSession, address: string, targets: Targets): void {
    const env = session.envelope as object;
    let m = this.byEnvelope.get(env);
    if (!m) this.byEnvelope.set(env, (m = new Map()));
    m.set(address.toLowerCase(), targets);
  }

  /** The distinct mailboxes and remote addresses of the current transaction's recipients. */
  targets(session: SMTPServerSession): { mailboxes: string[]; remote: string[] } {
    const m = this.byEnvelope.get(session.envelope as object);
    const mailboxes = new Set<string>();
    const remote = new Set<string>();
    for (const r of session.envelope.rcptTo) {
      const t = m?.get(r.address.toLowerCase());
      for (const x of t?.mailboxes ?? []) mailboxes.add(x);
      for (const x of t?.remote ?? []) remote.add(x);
    }
    return { mailboxes: [...mailboxes], remote: [...remote] };
  }
}
