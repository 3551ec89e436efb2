// The engine's control socket: JSON lines over a unix socket. A request is
// {id, op, args}; the answer is {id, ok, result} or {id, ok: false, error}. The op
// "events" turns the connection into a stream of event lines until it closes.
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { existsSync, unlinkSync } from "node:fs";

export interface ControlRequest {
  readonly id: number;
  readonly op: string;
  readonly args?: Record<string, unknown>;
}

export type ControlHandler = (req: ControlRequest, sock: Socket) => Promise<unknown> | unknown;

const LINE_MAX_BYTES = 64 * 1024;

export function serveControl(path: string, handler: ControlHandler): Promise<Server> {
  if (existsSync(path)) unlinkSync(path);
  const server = createServer((sock) => {
    let buf = "";
    sock.on("error", () => {});
    sock.on("data", (d) => {
      buf += d.toString("utf8");
      if (buf.length > LINE_MAX_BYTES) return sock.destroy();
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let req: ControlRequest;
        try {
          req = JSON.parse(line) as ControlRequest;
        } catch {
          sock.write(JSON.stringify({ id: null, ok: false, error: "not JSON" }) + "\n");
          continue;
        }
        Promise.resolve()
          .then(() => handler(req, sock))
          .then(
            (result) => {
              if (result !== undefined && !sock.destroyed) sock.write(JSON.stringify({ id: req.id, ok: true, result }) + "\n");
            },
            (err: unknown) => {
              if (!sock.destroyed) sock.write(JSON.stringify({ id: req.id, ok: false, error: err instanceof Error ? err.message : String(err) }) + "\n");
            },
          );
      }
    });
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(path, () => resolve(server));
  });
}

export class ControlError extends Error {}

/** Sends one request and returns its result; rejects with the engine's error text. */
export function controlCall(path: string, op: string, args: Record<string, unknown> = {}, timeoutMs = 30_000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const sock = createConnection({ path });
    let buf = "";
    const t = setTimeout(() => {
      sock.destroy();
      reject(new ControlError(`the daemon at ${path} did not answer "${op}" within ${timeoutMs} ms`));
    }, timeoutMs);
    sock.on("error", (err) => {
      clearTimeout(t);
      reject(new ControlError(`cannot reach the daemon at ${path} (${(err as NodeJS.ErrnoException).code ?? err.message}): is it running?`));
    });
    sock.on("connect", () => sock.write(JSON.stringify({ id: 1, op, args }) + "\n"));
    sock.on("data", (d) => {
      buf += d.toString("utf8");
      const nl = buf.indexOf("\n");
      if (nl < 0) return;
      clearTimeout(t);
      sock.end();
      const res = JSON.parse(buf.slice(0, nl)) as { ok: boolean; result?: unknown; error?: string };
      if (res.ok) resolve(res.result);
      else reject(new ControlError(res.error ?? "failed"));
    });
  });
}

/** Streams event lines to `onEvent` until the returned function is called. */
export function controlEvents(path: string, onEvent: (ev: Record<string, unknown>) => void, onEnd: (err?: Error) => void): () => void {
  const sock = createConnection({ path });
  let buf = "";
  sock.on("connect", () => sock.write(JSON.stringify({ id: 1, op: "events" }) + "\n"));
  sock.on("data", (d) => {
    buf += d.toString("utf8");
    let nl: number;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!line) continue;
      let ev: Record<string, unknown>;
      try {
        ev = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue; // not a JSON line: not an event
      }
      onEvent(ev);
    }
  });
  // Called once: an error is followed by a close.
  let ended = false;
  const end = (err?: Error) => {
    if (ended) return;
    ended = true;
    onEnd(err);
  };
  sock.on("error", (err) => end(err));
  sock.on("close", () => end());
  return () => sock.destroy();
}
