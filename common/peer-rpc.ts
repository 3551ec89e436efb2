// The node-to-node channel: one request per connection over TLS 1.2 with a pre-shared
// key (ECDHE-PSK-CHACHA20-POLY1305) derived from the cluster's heartbeat key. Both ends
// prove they hold the key (a wrong key fails the handshake), the traffic is encrypted,
// and the ephemeral key exchange makes every connection fresh: a recorded request
// cannot be replayed and an answer cannot be moved to another request. Each end names
// itself in the PSK identity (`<cluster>/<node>`); a server answers only its peer.
//
// Frame: the client sends one JSON line `{"op":..,"args":{..}}` (at most
// REQUEST_BYTES_MAX); the server answers one JSON line `{"ok":true,"result":..,
// "bodyBytes":N}` (or `{"ok":false,"error":".."}`) and then N raw bytes. The client
// bounds the line and the body (maxBytes) and the whole call (timeoutMs); a bad answer
// is an error, never a crash. Used by the backup MX (the active node's recipient list)
// and by the reconciler (the victim's preserved copy, read where it lies).
import { hkdfSync } from "node:crypto";
import { connect as tlsConnect, createServer as createTlsServer, type Server, type TLSSocket } from "node:tls";
import { readFileSync } from "node:fs";
import type { Logger } from "pino";
import { peerOf, type MailhaConfig } from "./config.ts";

const CIPHERS = "ECDHE-PSK-CHACHA20-POLY1305";
export const REQUEST_BYTES_MAX = 64 * 1024;
const REQUEST_WAIT_MS = 5000;
const CONNECTIONS_MAX = 16;
/** The default bound on an answer's JSON line and on its body. */
export const ANSWER_BYTES_MAX = 64 * 1024 * 1024;

export interface PeerEnds {
  readonly key: Buffer;
  readonly cluster: string;
  /** This node's id (the PSK identity it shows). */
  readonly self: string;
  /** The only node this end talks to. */
  readonly peer: string;
}

/** Node SELF's end of the channel (KEY: the heartbeat key read already, by a process that gave up root) to its peer (the peer's service address and peer port). */
export function peerEnds(c: MailhaConfig, self: string, key?: Buffer): PeerEnds & { host: string; port: number } {
  const peer = peerOf(c, self);
  return { key: key ?? Buffer.from(readFileSync(c.heartbeat.key_file, "utf8").trim()), cluster: c.cluster.name, self, peer: peer.id, host: peer.service_address, port: c.manager.peer_port };
}

/** The channel's key: HKDF-SHA256 of the heartbeat key, bound to the cluster's name. */
export function peerKey(key: Buffer, cluster: string): Buffer {
  return Buffer.from(hkdfSync("sha256", key, Buffer.from(cluster), Buffer.from("mailha peer-rpc v1"), 32));
}

export interface Answer {
  readonly result?: unknown;
  /** Raw bytes after the JSON line (a file). */
  readonly body?: Buffer;
}

export type Handler = (args: Record<string, unknown>) => Promise<Answer>;

export interface PeerRpcCounters {
  /** TLS handshakes that failed (wrong key, wrong identity, not TLS). */
  refused: number;
  /** Requests that were not one bounded JSON line with a known op. */
  malformed: number;
  /** Requests answered (ok or error). */
  served: number;
}

export interface PeerRpcServer {
  readonly counters: PeerRpcCounters;
  /** The port it listens on (the one asked for, or the one given for 0). */
  readonly port: number;
  close(): void;
}

export async function servePeerRpc(o: PeerEnds & { host: string; port: number; handlers: Record<string, Handler>; log: Logger }): Promise<PeerRpcServer> {
  const psk = peerKey(o.key, o.cluster);
  const want = `${o.cluster}/${o.peer}`;
  const counters: PeerRpcCounters = { refused: 0, malformed: 0, served: 0 };
  let open = 0;
  const server: Server = createTlsServer(
    {
      ciphers: CIPHERS,
      minVersion: "TLSv1.2",
      maxVersion: "TLSv1.2",
      pskIdentityHint: o.cluster,
      pskCallback: (_sock, identity) => (identity === want ? psk : null),
    },
    (sock: TLSSocket) => {
      open++;
      sock.once("close", () => open--);
      if (open > CONNECTIONS_MAX) return void sock.destroy();
      sock.on("error", () => {});
      sock.setTimeout(REQUEST_WAIT_MS, () => sock.destroy());
      let buf = Buffer.alloc(0);
      const onData = (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        const nl = buf.indexOf(10);
        if (nl < 0) {
          if (buf.length > REQUEST_BYTES_MAX) {
            counters.malformed++;
            sock.destroy();
          }
          return;
        }
        sock.off("data", onData);
        sock.setTimeout(0);
        let req: { op?: unknown; args?: unknown };
        try {
          req = JSON.parse(buf.subarray(0, nl).toString("utf8")) as typeof req;
        } catch {
          counters.malformed++;
          return void sock.destroy();
        }
        const h = typeof req.op === "string" && Object.hasOwn(o.handlers, req.op) ? o.handlers[req.op] : undefined;
        const args = req.args && typeof req.args === "object" && !Array.isArray(req.args) ? (req.args as Record<string, unknown>) : {};
        if (!h) {
          counters.malformed++;
          return void sock.end(JSON.stringify({ ok: false, error: `unknown operation ${JSON.stringify(String(req.op)).slice(0, 80)}` }) + "\n");
        }
        void h(args).then(
          (a) => {
            counters.served++;
            sock.write(JSON.stringify({ ok: true, result: a.result ?? null, bodyBytes: a.body?.length ?? 0 }) + "\n");
            if (a.body) sock.end(a.body);
            else sock.end();
          },
          (err: Error) => {
            counters.served++;
            o.log.warn({ op: req.op, err: err.message }, "peer request failed");
            sock.end(JSON.stringify({ ok: false, error: err.message }) + "\n");
          },
        );
      };
      sock.on("data", onData);
    },
  );
  server.on("tlsClientError", () => counters.refused++);
  server.maxConnections = CONNECTIONS_MAX * 2;
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(o.port, o.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  server.on("error", (err) => o.log.error({ err }, "peer channel error"));
  const addr = server.address();
  return { counters, port: typeof addr === "object" && addr ? addr.port : o.port, close: () => void server.close() };
}

export interface CallOptions {
  readonly timeoutMs?: number;
  /** Bound on the answer's JSON line and, separately, on its body. */
  readonly maxBytes?: number;
  readonly localAddress?: string;
}

/** One request to the peer; rejects on a refused handshake, a timeout, a bad or oversize answer, or the peer's error. */
export function callPeer(o: PeerEnds & { host: string; port: number }, op: string, args: Record<string, unknown> = {}, c: CallOptions = {}): Promise<Answer> {
  const psk = peerKey(o.key, o.cluster);
  const max = c.maxBytes ?? ANSWER_BYTES_MAX;
  return new Promise<Answer>((resolve, reject) => {
    let done = false;
    const finish = (err: Error | null, a?: Answer) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(a!);
    };
    const sock = tlsConnect({
      host: o.host,
      port: o.port,
      ciphers: CIPHERS,
      minVersion: "TLSv1.2",
      maxVersion: "TLSv1.2",
      ...(c.localAddress ? { localAddress: c.localAddress } : {}),
      checkServerIdentity: () => undefined,
      pskCallback: () => ({ psk, identity: `${o.cluster}/${o.self}` }),
    });
    const timer = setTimeout(() => finish(new Error(`peer ${o.peer} did not answer ${op} within ${c.timeoutMs ?? 10_000} ms`)), c.timeoutMs ?? 10_000);
    const line = JSON.stringify({ op, args }) + "\n";
    if (Buffer.byteLength(line) > REQUEST_BYTES_MAX) return finish(new Error(`request ${op} is over ${REQUEST_BYTES_MAX} bytes`));
    sock.once("secureConnect", () => sock.write(line));
    sock.on("error", (err) => finish(new Error(`peer ${o.peer} (${o.host}:${o.port}): ${err.message}`)));
    const chunks: Buffer[] = [];
    let got = 0;
    let head: { ok?: unknown; result?: unknown; error?: unknown; bodyBytes?: unknown } | null = null;
    let headEnd = -1;
    sock.on("data", (d: Buffer) => {
      chunks.push(d);
      got += d.length;
      if (!head) {
        const all = Buffer.concat(chunks);
        const nl = all.indexOf(10);
        if (nl < 0) {
          if (got > max) finish(new Error(`peer ${o.peer}: answer to ${op} is over ${max} bytes`));
          return;
        }
        let h: unknown;
        try {
          h = JSON.parse(all.subarray(0, nl).toString("utf8"));
        } catch {
          return finish(new Error(`peer ${o.peer}: the answer to ${op} is not JSON`));
        }
        if (!h || typeof h !== "object") return finish(new Error(`peer ${o.peer}: the answer to ${op} is not an object`));
        const hd = h as { ok?: unknown; result?: unknown; error?: unknown; bodyBytes?: unknown };
        head = hd;
        if (hd.ok !== true) return finish(new Error(typeof hd.error === "string" ? hd.error.slice(0, 500) : `peer ${o.peer}: ${op} failed`));
        const n = hd.bodyBytes;
        if (typeof n !== "number" || !Number.isSafeInteger(n) || n < 0 || n > max) return finish(new Error(`peer ${o.peer}: bad body length in the answer to ${op}`));
        headEnd = nl + 1;
        chunks.length = 0;
        chunks.push(all);
      }
      if (got - headEnd > (head.bodyBytes as number)) finish(new Error(`peer ${o.peer}: the answer to ${op} is longer than it says`));
    });
    sock.on("end", () => {
      if (!head) return finish(new Error(`peer ${o.peer} closed without answering ${op}`));
      const all = Buffer.concat(chunks);
      const body = all.subarray(headEnd);
      if (body.length !== head.bodyBytes) return finish(new Error(`peer ${o.peer}: the answer to ${op} was cut short`));
      finish(null, { result: head.result, ...(body.length ? { body } : {}) });
    });
  });
}
