// A small POP3 client (RFC 1939) over implicit TLS, enough for the failover test's
// POP3 sessions: USER/PASS, UIDL, RETR, DELE, QUIT. Every reply is awaited with a
// bound; a multi-line reply is dot-unstuffed and limited in size.
import { connect as tlsConnect, type TLSSocket } from "node:tls";

const REPLY_BYTES_MAX = 32 * 1024 * 1024;

export class Pop3Error extends Error {}

export class Pop3Client {
  private buf = "";
  private waiter: (() => void) | null = null;
  private closed: Error | null = null;

  private constructor(private readonly sock: TLSSocket, private readonly timeoutMs: number) {
    sock.setEncoding("latin1");
    sock.on("data", (d: string) => {
      this.buf += d;
      if (this.buf.length > REPLY_BYTES_MAX) this.fail(new Pop3Error("reply too large"));
      this.waiter?.();
    });
    sock.on("error", (err) => this.fail(err));
    sock.on("close", () => this.fail(new Pop3Error("connection closed")));
  }

  static async connect(host: string, port: number, timeoutMs: number): Promise<Pop3Client> {
    const sock = tlsConnect({ host, port, rejectUnauthorized: false, timeout: timeoutMs });
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Pop3Error(`no TLS connection to ${host}:${port} within ${timeoutMs} ms`)), timeoutMs);
      sock.once("secureConnect", () => (clearTimeout(t), resolve()));
      sock.once("error", (err) => (clearTimeout(t), reject(err)));
    }).catch((err: Error) => {
      sock.destroy();
      throw err;
    });
    const c = new Pop3Client(sock, timeoutMs);
    await c.reply(false);
    return c;
  }

  private fail(err: Error): void {
    this.closed ??= err;
    this.waiter?.();
  }

  /** Waits for one complete reply: a status line, and for multi-line replies everything up to "." alone. */
  private async reply(multi: boolean): Promise<string[]> {
    const deadline = Date.now() + this.timeoutMs;
    for (;;) {
      const end = this.buf.indexOf("\r\n");
      if (end >= 0) {
        const status = this.buf.slice(0, end);
        if (!status.startsWith("+OK")) {
          this.buf = this.buf.slice(end + 2);
          throw new Pop3Error(status || "empty reply");
        }
        if (!multi) {
          this.buf = this.buf.slice(end + 2);
          return [status];
        }
        const term = this.buf.indexOf("\r\n.\r\n", end);
        if (term >= 0) {
          const body = this.buf.slice(end + 2, term);
          this.buf = this.buf.slice(term + 5);
          return [status, ...(body ? body.split("\r\n").map((l) => (l.startsWith("..") ? l.slice(1) : l)) : [])];
        }
      }
      if (this.closed) throw this.closed;
      const left = deadline - Date.now();
      if (left <= 0) throw new Pop3Error(`no reply within ${this.timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => (clearTimeout(t), resolve());
      });
      this.waiter = null;
    }
  }

  private async command(line: string, multi = false): Promise<string[]> {
    if (this.closed) throw this.closed;
    this.sock.write(`${line}\r\n`);
    return this.reply(multi);
  }

  async login(user: string, pass: string): Promise<void> {
    await this.command(`USER ${user}`);
    await this.command(`PASS ${pass}`);
  }

  /** Message numbers and their unique ids. */
  async uidl(): Promise<{ n: number; uid: string }[]> {
    const [, ...lines] = await this.command("UIDL", true);
    return lines.map((l) => l.split(" ")).map(([n, uid]) => ({ n: Number(n), uid: uid ?? "" }));
  }

  async retr(n: number): Promise<string> {
    const [, ...lines] = await this.command(`RETR ${n}`, true);
    return lines.join("\r\n");
  }

  async dele(n: number): Promise<void> {
    await this.command(`DELE ${n}`);
  }

  /** Ends the session; the server commits the deletions before it answers. */
  async quit(): Promise<void> {
    await this.command("QUIT");
    this.sock.end();
  }

  close(): void {
    this.sock.destroy();
  }
}
