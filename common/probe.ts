// Readiness probes for line-based servers: connect (TCP or unix socket), optionally
// send a line, and check the first line of the answer; bounded by a timeout.
import { createConnection, type NetConnectOpts } from "node:net";

export interface LineProbe {
  readonly connect: NetConnectOpts;
  /** Sent once connected (with CRLF appended), e.g. "PING"; omit for greeting servers. */
  readonly send?: string;
  /** The first answer line must start with this. */
  readonly expect: string;
  readonly timeoutMs?: number;
}

export function probeLine(p: LineProbe): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(p.connect);
    let buf = "";
    const done = (ok: boolean) => {
      clearTimeout(t);
      s.destroy();
      resolve(ok);
    };
    const t = setTimeout(() => done(false), p.timeoutMs ?? 1000);
    s.on("error", () => done(false));
    if (p.send !== undefined) s.on("connect", () => s.write(`${p.send}\r\n`));
    s.on("data", (d) => {
      buf += d.toString("latin1");
      if (buf.includes("\r\n") || buf.length > 4096) done(buf.startsWith(p.expect));
    });
  });
}
