// A raw SMTP conversation for tests that must send what no polite client sends
// (bare LF, NUL, overlong lines, floods, a DATA that never ends).
import { createConnection, type Socket } from "node:net";

export class RawSmtp {
  private buf = "";
  private waiters: ((line: string) => void)[] = [];
  private constructor(readonly sock: Socket) {
    sock.on("data", (d) => {
      this.buf += d.toString("latin1");
      this.pump();
    });
    sock.on("error", () => {});
  }

  static async open(host: string, port: number): Promise<RawSmtp> {
    const sock = createConnection({ host, port });
    await new Promise<void>((res, rej) => {
      sock.once("connect", () => res());
      sock.once("error", rej);
    });
    const c = new RawSmtp(sock);
    await c.reply();
    return c;
  }

  private pump(): void {
    for (;;) {
      // A reply ends with a line "NNN text" (not "NNN-text").
      const m = /^(?:\d{3}-[^\r\n]*\r\n)*\d{3}(?: [^\r\n]*)?\r\n/.exec(this.buf);
      if (!m || this.waiters.length === 0) return;
      this.buf = this.buf.slice(m[0].length);
      this.waiters.shift()!(m[0].trimEnd());
    }
  }

  /** The next complete reply (multi-line joined), or "closed" / "timeout". */
  reply(timeoutMs = 10_000): Promise<string> {
    return new Promise((resolve) => {
      const t = setTimeout(() => resolve("timeout"), timeoutMs);
      const onClose = () => {
        clearTimeout(t);
        resolve("closed");
      };
      this.sock.once("close", onClose);
      this.waiters.push((line) => {
        clearTimeout(t);
        this.sock.off("close", onClose);
        resolve(line);
      });
      this.pump();
    });
  }

  async cmd(line: string | Buffer): Promise<string> {
    this.sock.write(typeof line === "string" ? `${line}\r\n` : line);
    return this.reply();
  }

  send(raw: string | Buffer): void {
    this.sock.write(raw);
  }

  close(): void {
    this.sock.destroy();
  }
}
