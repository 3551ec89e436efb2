// The witness: a tiny UDP lease server for the third host (`mailha witness run`). It
// grants its lease to at most one node at a time: a node gets it when nobody holds
// it, when the holder's lease has expired, or when it is the holder (renewal).
// Requests and answers are authenticated with the heartbeat key (HMAC-SHA256) and
// carry a nonce, so an answer cannot be replayed. The node counts its lease from the
// moment it sent the request, never from the witness's clock.
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { createSocket, type Socket } from "node:dgram";

const MAC_BYTES = 32;

export interface LeaseRequest {
  readonly v: 1;
  readonly cluster: string;
  readonly node: string;
  readonly op: "acquire" | "release";
  readonly nonce: string;
}

export interface LeaseAnswer {
  readonly v: 1;
  readonly nonce: string;
  readonly granted: boolean;
  readonly holder: string | null;
  readonly remainingMs: number;
}

function seal(obj: unknown, key: Buffer): Buffer {
  const body = Buffer.from(JSON.stringify(obj));
  return Buffer.concat([createHmac("sha256", key).update(body).digest(), body]);
}

function open<T>(pkt: Buffer, key: Buffer): T | null {
  if (pkt.length <= MAC_BYTES || pkt.length > 2048) return null;
  const body = pkt.subarray(MAC_BYTES);
  if (!timingSafeEqual(pkt.subarray(0, MAC_BYTES), createHmac("sha256", key).update(body).digest())) return null;
  try {
    return JSON.parse(body.toString("utf8")) as T;
  } catch {
    return null;
  }
}

/** The lease decision, pure: who holds it after REQ at time NOW. */
export function decideLease(cur: { holder: string; expiresMs: number } | null, req: Pick<LeaseRequest, "node" | "op">, nowMs: number, leaseMs: number) {
  const live = cur && cur.expiresMs > nowMs ? cur : null;
  if (req.op === "release") return { next: live?.holder === req.node ? null : live, granted: false };
  if (!live || live.holder === req.node) return { next: { holder: req.node, expiresMs: nowMs + leaseMs }, granted: true };
  return { next: live, granted: false };
}

export interface WitnessServer {
  readonly stats: { requests: number; grants: number; refusals: number; forged: number };
  close(): void;
}

export function runWitness(o: { host: string; port: number; key: Buffer; cluster: string; leaseMs: number; nodes: readonly string[]; onEvent: (ev: Record<string, unknown>) => void }): Promise<WitnessServer> {
  let lease: { holder: string; expiresMs: number } | null = null;
  const stats = { requests: 0, grants: 0, refusals: 0, forged: 0 };
  const sock = createSocket("udp4");
  sock.on("message", (msg, rinfo) => {
    stats.requests++;
    const req = open<LeaseRequest>(msg, o.key);
    if (!req || req.v !== 1 || req.cluster !== o.cluster || !o.nodes.includes(req.node) || typeof req.nonce !== "string") {
      stats.forged++;
      o.onEvent({ type: "forged-request", from: rinfo.address });
      return;
    }
    const before = lease?.holder ?? null;
    const d = decideLease(lease, req, Date.now(), o.leaseMs);
    lease = d.next;
    if (req.op === "acquire") {
      if (d.granted) stats.grants++;
      else stats.refusals++;
      if ((lease?.holder ?? null) !== before) o.onEvent({ type: "lease", holder: lease?.holder ?? null, previous: before });
    } else if (before !== (lease?.holder ?? null)) o.onEvent({ type: "lease-released", by: req.node });
    const ans: LeaseAnswer = { v: 1, nonce: req.nonce, granted: d.granted, holder: lease?.holder ?? null, remainingMs: lease ? lease.expiresMs - Date.now() : 0 };
    sock.send(seal(ans, o.key), rinfo.port, rinfo.address);
  });
  return new Promise((resolve, reject) => {
    sock.once("error", reject);
    sock.bind(o.port, o.host, () => resolve({ stats, close: () => sock.close() }));
  });
}

/** Asks the witness for the lease; resolves with the answer, or null after the timeout. */
export class WitnessClient {
  private readonly sock: Socket;
  private readonly waiting = new Map<string, (a: LeaseAnswer) => void>();

  constructor(private readonly o: { host: string; port: number; key: Buffer; cluster: string; node: string; localAddress?: string }) {
    this.sock = createSocket("udp4");
    this.sock.on("message", (msg) => {
      const a = open<LeaseAnswer>(msg, o.key);
      if (!a) return;
      const w = this.waiting.get(a.nonce);
      if (w) {
        this.waiting.delete(a.nonce);
        w(a);
      }
    });
    this.sock.on("error", () => {});
    if (o.localAddress) this.sock.bind(0, o.localAddress);
  }

  request(op: "acquire" | "release", timeoutMs: number): Promise<LeaseAnswer | null> {
    const nonce = randomBytes(16).toString("hex");
    const req: LeaseRequest = { v: 1, cluster: this.o.cluster, node: this.o.node, op, nonce };
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.waiting.delete(nonce);
        resolve(null);
      }, timeoutMs);
      this.waiting.set(nonce, (a) => {
        clearTimeout(t);
        resolve(a);
      });
      this.sock.send(seal(req, this.o.key), this.o.port, this.o.host, (err) => {
        if (err) {
          clearTimeout(t);
          this.waiting.delete(nonce);
          resolve(null);
        }
      });
    });
  }

  close(): void {
    this.sock.close();
  }
}
