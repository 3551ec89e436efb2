// Stops SMTP listeners without cutting a message that is being stored: the graceful
// stop of the SMTP service and the backup MX. A client whose message was stored must
// hear its 250; cut before it, it sends the message again to the other MX, and the
// mailbox gets it twice.
//
// close(): every listener stops accepting connections and answers any further command
// with 421 (smtp-server does so once its close() runs); a connection with no message
// in flight is told 421 at once and closed; a connection whose message is being
// stored is closed right after its answer (250 or 4xx) went out; those still storing
// after WAITMS are cut with 421 (the client retries: nothing was acknowledged).
// smtp-server's own cut (its closeTimeout) must come later than WAITMS: closeTimeoutFor.
import type { SMTPServer } from "smtp-server";

/** What smtp-server keeps per connection (not in its type declarations). */
interface Connection {
  readonly id: string;
  send(code: number, text: string): void;
  close(): void;
}

export interface DrainResult {
  /** Connections closed with no message in flight. */
  readonly idle: number;
  /** Connections closed after their message's answer went out. */
  readonly answered: number;
  /** Connections still storing a message after the wait, cut with 421. */
  readonly cut: number;
}

const SHUTDOWN = "4.3.2 Service shutting down, try again later";
/** Room between the end of the wait and smtp-server's own cut. */
const CUT_MARGIN_MS = 1000;

/** The closeTimeout a server drained with WAITMS must be given. */
export function closeTimeoutFor(waitMs: number): number {
  return waitMs + CUT_MARGIN_MS;
}

const connectionsOf = (s: SMTPServer): Connection[] => [...((s as unknown as { connections: Set<Connection> }).connections ?? [])];

export class SessionDrain {
  private readonly busy = new Map<string, Promise<unknown>>();

  /** The delivery of session SESSIONID's message: P settles after its answer was given. */
  track(sessionId: string, p: Promise<unknown>): void {
    const settled = p.then(
      () => undefined,
      () => undefined,
    );
    this.busy.set(sessionId, settled);
    void settled.then(() => {
      if (this.busy.get(sessionId) === settled) this.busy.delete(sessionId);
    });
  }

  /** Messages being stored now. */
  get inFlight(): number {
    return this.busy.size;
  }

  /** Stops SERVERS as described above; resolves when every connection is closed or cut. */
  async close(servers: readonly SMTPServer[], waitMs: number): Promise<DrainResult> {
    let idle = 0;
    let answered = 0;
    let cut = 0;
    const closed = servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    const pending: Promise<void>[] = [];
    for (const s of servers) {
      for (const conn of connectionsOf(s)) {
        const p = this.busy.get(conn.id);
        if (!p) {
          conn.send(421, SHUTDOWN);
          conn.close();
          idle++;
          continue;
        }
        let done = false;
        pending.push(
          Promise.race([p.then(() => (done = true)), sleep(waitMs)]).then(() => {
            if (done) answered++;
            else {
              conn.send(421, SHUTDOWN);
              cut++;
            }
            conn.close();
          }),
        );
      }
    }
    await Promise.all(pending);
    await Promise.all(closed);
    return { idle, answered, cut };
  }
}

const sleep = (ms: number) =>
  new Promise<void>((r) => {
    const t = setTimeout(r, ms);
    t.unref();
  });
