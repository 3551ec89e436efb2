// The passive node's proxy: it listens on the service ports (IMAP, POP3, submission,
// with and without TLS) and forwards each connection to the active node's matching
// "proxied" port, prefixed with a PROXY protocol header so Dovecot and the SMTP service
// see the real client address (version 2 for Dovecot; version 1 for smtp-server, which
// reads only the text form). TLS passes through untouched. When the active
// node cannot be reached the client's connection is reset at once, so it tries the
// mail host's other address without waiting.
// Bounds (config `limits:`): connections at once per port (proxy_connections_max),
// per client address across ports (proxy_connections_per_address_max: the connection
// is closed at once, counted), and idle time (proxy_idle_ms, longer than IMAP IDLE's
// 29 minutes: a connection silent both ways that long is cut, counted).
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { isIPv4 } from "node:net";

/** Service port -> the active node's port that expects a PROXY header. */
export const PROXY_ROUTES: readonly { readonly name: string; readonly port: number; readonly upstreamPort: number; readonly version: 1 | 2 }[] = [
  { name: "imap", port: 143, upstreamPort: 10143, version: 2 },
  { name: "imaps", port: 993, upstreamPort: 10993, version: 2 },
  { name: "pop3", port: 110, upstreamPort: 10110, version: 2 },
  { name: "pop3s", port: 995, upstreamPort: 10995, version: 2 },
  { name: "submission", port: 587, upstreamPort: 10587, version: 1 },
  { name: "submissions", port: 465, upstreamPort: 10465, version: 1 },
];

/** A PROXY protocol v1 (text) header. */
export function proxyV1Header(src: { address: string; port: number }, dst: { address: string; port: number }): Buffer {
  const strip = (a: string) => a.replace(/^::ffff:/, "");
  const s = strip(src.address);
  const d = strip(dst.address);
  if (!isIPv4(s) || !isIPv4(d)) return Buffer.from("PROXY UNKNOWN\r\n");
  return Buffer.from(`PROXY TCP4 ${s} ${d} ${src.port} ${dst.port}\r\n`);
}

const SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
const CONNECT_TIMEOUT_MS = 2000;

/** A PROXY protocol v2 header for a TCP/IPv4 connection from SRC to DST. */
export function proxyV2Header(src: { address: string; port: number }, dst: { address: string; port: number }): Buffer {
  const strip = (a: string) => a.replace(/^::ffff:/, "");
  const s = strip(src.address);
  const d = strip(dst.address);
  if (!isIPv4(s) || !isIPv4(d)) {
    // LOCAL command: no address information (the receiver uses the socket's own).
    return Buffer.concat([SIGNATURE, Buffer.from([0x20, 0x00, 0x00, 0x00])]);
  }
  const b = Buffer.alloc(16 + 12);
  SIGNATURE.copy(b, 0);
  b[12] = 0x21; // version 2, PROXY
  b[13] = 0x11; // TCP over IPv4
  b.writeUInt16BE(12, 14);
  s.split(".").forEach((x, i) => (b[16 + i] = Number(x)));
  d.split(".").forEach((x, i) => (b[20 + i] = Number(x)));
  b.writeUInt16BE(src.port, 24);
  b.writeUInt16BE(dst.port, 26);
  return b;
}

function reset(s: Socket): void {
  if (typeof (s as Socket & { resetAndDestroy?: () => void }).resetAndDestroy === "function") (s as Socket & { resetAndDestroy: () => void }).resetAndDestroy();
  else s.destroy();
}

export interface ProxyStats {
  accepted: number;
  forwarded: number;
  /** The active node could not be reached: reset. */
  refused: number;
  /** Closed at once: the client's address had proxy_connections_per_address_max open. */
  per_address_refused: number;
  /** Cut after proxy_idle_ms without a byte either way. */
  idle_cut: number;
  open: number;
}

export interface ProxyLimits {
  readonly connectionsMax: number;
  readonly perAddressMax: number;
  readonly idleMs: number;
}

export const PROXY_LIMITS_DEFAULT: ProxyLimits = { connectionsMax: 1000, perAddressMax: 50, idleMs: 1_860_000 };

export async function runProxy(o: { listenAddress: string; upstreamAddress: string; limits?: ProxyLimits; onEvent?: (ev: Record<string, unknown>) => void }): Promise<{ stats: ProxyStats; close(): Promise<void> }> {
  const limits = o.limits ?? PROXY_LIMITS_DEFAULT;
  const stats: ProxyStats = { accepted: 0, forwarded: 0, refused: 0, per_address_refused: 0, idle_cut: 0, open: 0 };
  const servers: Server[] = [];
  const open = new Set<Socket>();
  const perAddress = new Map<string, number>();
  for (const r of PROXY_ROUTES) {
    const server = createServer({ pauseOnConnect: true }, (client) => {
      stats.accepted++;
      const addr = (client.remoteAddress ?? "").replace(/^::ffff:/, "");
      const n = perAddress.get(addr) ?? 0;
      if (n >= limits.perAddressMax) {
        stats.per_address_refused++;
        return void client.destroy();
      }
      perAddress.set(addr, n + 1);
      open.add(client);
      stats.open = open.size;
      client.on("close", () => {
        open.delete(client);
        stats.open = open.size;
        const left = (perAddress.get(addr) ?? 1) - 1;
        if (left <= 0) perAddress.delete(addr);
        else perAddress.set(addr, left);
      });
      // Silent both ways for idleMs: cut (a byte either way resets it).
      client.setTimeout(limits.idleMs, () => {
        stats.idle_cut++;
        client.destroy();
      });
      const up = createConnection({ host: o.upstreamAddress, port: r.upstreamPort, localAddress: o.listenAddress });
      const t = setTimeout(() => up.destroy(new Error("connect timeout")), CONNECT_TIMEOUT_MS);
      client.on("error", () => up.destroy());
      up.once("error", () => {
        clearTimeout(t);
        if (!client.destroyed) {
          stats.refused++;
          reset(client);
        }
      });
      up.once("connect", () => {
        clearTimeout(t);
        stats.forwarded++;
        const src = { address: client.remoteAddress ?? "", port: client.remotePort ?? 0 };
        const dst = { address: client.localAddress ?? "", port: client.localPort ?? 0 };
        up.write(r.version === 2 ? proxyV2Header(src, dst) : proxyV1Header(src, dst));
        client.pipe(up);
        up.pipe(client);
        // Upstream traffic counts as activity too (an IMAP IDLE's untagged replies).
        up.on("data", () => client.setTimeout(limits.idleMs));
        client.resume();
        up.on("close", () => client.destroy());
        client.on("close", () => up.destroy());
      });
    });
    server.maxConnections = limits.connectionsMax;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(r.port, o.listenAddress, () => resolve());
    });
    servers.push(server);
  }
  o.onEvent?.({ type: "proxy-listening", upstream: o.upstreamAddress, ports: PROXY_ROUTES.map((r) => r.port) });
  return {
    stats,
    // Stop listening and cut what is still forwarded: the node is handing its ports over.
    close: () => {
      const closed = Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
      for (const s of open) s.destroy();
      return closed.then(() => undefined);
    },
  };
}
