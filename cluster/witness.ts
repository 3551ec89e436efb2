// The witness: a tiny UDP lease server for the third host (`mailha witness run`). It
// grants its lease to at most one node at a time: a node gets it when nobody holds
// it, when the holder's lease has expired, or when it is the holder (renewal).
// Requests and answers are authenticated with the heartbeat key (HMAC-SHA256). Each
// request carries a timestamp (ms, strictly increasing per node) and a nonce: the
// witness keeps a high-water mark per node and drops a request not newer than it
// (replayed) or more than REQUEST_AGE_MAX_MS from its own clock (stale), so a recorded
// acquire cannot keep a dead holder's lease alive and a recorded release cannot free a
// live holder's lease. Each answer names the node and carries the request's nonce, and
// the node takes only the answer to a request it is waiting for. The node counts its
// lease from the moment it sent the request, never from the witness's clock.
// Known gaps: the high-water marks live in memory, so right after a witness restart a
// request recorded in the last REQUEST_AGE_MAX_MS can be replayed once per node (a
// lease period of delay at most); node and witness clocks must agree within
// REQUEST_AGE_MAX_MS (NTP).
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { createSocket, type Socket } from "node:dgram";

const MAC_BYTES = 32;
const PACKET_MAX_BYTES = 2048;
/** How far a request's timestamp may be from the witness's clock. */
export const REQUEST_AGE_MAX_MS = 10_000;

export interface LeaseRequest {
  readonly v: 1;
  readonly t: "lease-request";
  readonly cluster: string;
  readonly node: string;
  readonly op: "acquire" | "release";
  /** The node's clock (ms) when it sent this; strictly increasing per node. */
  readonly ts: number;
  readonly nonce: string;
}

export interface LeaseAnswer {
  readonly v: 1;
  readonly t: "lease-answer";
  /** The node that asked, and its request's nonce. */
  readonly node: string;
  readonly nonce: string;
  readonly granted: boolean;
  readonly holder: string | null;
  readonly remainingMs: number;
  /** Set when the request was refused unseen: its timestamp is too far from the witness's clock. */
  readonly refused?: "stale";
}

export function seal(obj: unknown, key: Buffer): Buffer {
  const body = Buffer.from(JSON.stringify(obj));
  return Buffer.concat([createHmac("sha256", key).update(body).digest(), body]);
}

export function open(pkt: Buffer, key: Buffer): unknown {
  if (pkt.length <= MAC_BYTES || pkt.length > PACKET_MAX_BYTES) return null;
  const body = pkt.subarray(MAC_BYTES);
  if (!timingSafeEqual(pkt.subarray(0, MAC_BYTES), createHmac("sha256", key).update(body).digest())) return null;
  try {
    return JSON.parse(body.toString("utf8")) as unknown;
  } catch {
    return null;
  }
}

const isObject = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

function asRequest(x: unknown): LeaseRequest | null {
  if (!isObject(x) || x.v !== 1 || x.t !== "lease-request" || typeof x.cluster !== "string" || typeof x.node !== "string") return null;
  if ((x.op !== "acquire" && x.op !== "release") || !Number.isSafeInteger(x.ts) || typeof x.nonce !== "string" || x.nonce.length > 64) return null;
  return x as unknown as LeaseRequest;
}

function asAnswer(x: unknown): LeaseAnswer | null {
  if (!isObject(x) || x.v !== 1 || x.t !== "lease-answer" || typeof x.node !== "string" || typeof x.nonce !== "string" || typeof x.granted !== "boolean") return null;
  if ((x.holder !== null && typeof x.holder !== "string") || typeof x.remainingMs !== "number" || !Number.isFinite(x.remainingMs)) return null;
  return x as unknown as LeaseAnswer;
}

/** The lease decision, pure: who holds it after REQ at time NOW. */
export function decideLease(cur: { holder: string; expiresMs: number } | null, req: Pick<LeaseRequest, "node" | "op">, nowMs: number, leaseMs: number) {
  const live = cur && cur.expiresMs > nowMs ? cur : null;
  if (req.op === "release") return { next: live?.holder === req.node ? null : live, granted: false };
  if (!live || live.holder === req.node) return { next: { holder: req.node, expiresMs: nowMs + leaseMs }, granted: true };
  return { next: live, granted: false };
}

/** What the witness made of a packet. */
export type RequestVerdict = "ok" | "forged" | "foreign" | "replayed" | "stale";

/** The witness's checks, pure: the verdict on PKT, and the high-water marks it moves. */
export class RequestChecker {
  private readonly highWater = new Map<string, number>();

  constructor(
    private readonly key: Buffer,
    private readonly cluster: string,
    private readonly nodes: readonly string[],
  ) {}

  check(pkt: Buffer, nowMs: number): { verdict: RequestVerdict; req?: LeaseRequest } {
    const req = asRequest(open(pkt, this.key));
    if (!req) return { verdict: "forged" };
    if (req.cluster !== this.cluster || !this.nodes.includes(req.node)) return { verdict: "foreign" };
    if (req.ts <= (this.highWater.get(req.node) ?? 0)) return { verdict: "replayed", req };
    if (Math.abs(nowMs - req.ts) > REQUEST_AGE_MAX_MS) return { verdict: "stale", req };
    this.highWater.set(req.node, req.ts);
    return { verdict: "ok", req };
  }
}

export interface WitnessServer {
  readonly stats: { requests: number; grants: number; refusals: number } & Record<Exclude<RequestVerdict, "ok">, number>;
  close(): void;
}

export function runWitness(o: { host: string; port: number; key: Buffer; cluster: string; leaseMs: number; nodes: readonly string[]; onEvent: (ev: Record<string, unknown>) => void }): Promise<WitnessServer> {
  let lease: { holder: string; expiresMs: number } | null = null;
  const stats = { requests: 0, grants: 0, refusals: 0, forged: 0, foreign: 0, replayed: 0, stale: 0 };
  const checker = new RequestChecker(o.key, o.cluster, o.nodes);
  const sock = createSocket("udp4");
  sock.on("message", (msg, rinfo) => {
    stats.requests++;
    const now = Date.now();
    const { verdict, req } = checker.check(msg, now);
    if (verdict !== "ok") {
      stats[verdict]++;
      o.onEvent({ type: `${verdict}-request`, from: rinfo.address, ...(req ? { node: req.node, op: req.op, skewMs: now - req.ts } : {}) });
      // A node whose clock is off hears why; a replay or a forgery gets nothing.
      if (verdict === "stale" && req) {
        const ans: LeaseAnswer = { v: 1, t: "lease-answer", node: req.node, nonce: req.nonce, granted: false, holder: lease && lease.expiresMs > now ? lease.holder : null, remainingMs: 0, refused: "stale" };
        sock.send(seal(ans, o.key), rinfo.port, rinfo.address);
      }
      return;
    }
    const r = req!;
    const before = lease?.holder ?? null;
    const d = decideLease(lease, r, now, o.leaseMs);
    lease = d.next;
    if (r.op === "acquire") {
      if (d.granted) stats.grants++;
      else stats.refusals++;
      if ((lease?.holder ?? null) !== before) o.onEvent({ type: "lease", holder: lease?.holder ?? null, previous: before });
    } else if (before !== (lease?.holder ?? null)) o.onEvent({ type: "lease-released", by: r.node });
    const ans: LeaseAnswer = { v: 1, t: "lease-answer", node: r.node, nonce: r.nonce, granted: d.granted, holder: lease?.holder ?? null, remainingMs: lease ? lease.expiresMs - now : 0 };
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
  /** Requests waiting for their answer, by nonce; each removed by its answer or its timeout. */
  private readonly waiting = new Map<string, (a: LeaseAnswer) => void>();
  private lastTs = 0;
  /** Answers dropped: not authentic, not ours, or for no request we wait for. */
  readonly dropped = { forged: 0, foreign: 0, unexpected: 0 };

  constructor(private readonly o: { host: string; port: number; key: Buffer; cluster: string; node: string; localAddress?: string }) {
    this.sock = createSocket("udp4");
    this.sock.on("message", (msg, rinfo) => {
      const a = asAnswer(open(msg, o.key));
      if (!a) return void this.dropped.forged++;
      if (a.node !== o.node || rinfo.address !== o.host || rinfo.port !== o.port) return void this.dropped.foreign++;
      const w = this.waiting.get(a.nonce);
      if (!w) return void this.dropped.unexpected++;
      this.waiting.delete(a.nonce);
      w(a);
    });
    this.sock.on("error", () => {});
    if (o.localAddress) this.sock.bind(0, o.localAddress);
  }

  request(op: "acquire" | "release", timeoutMs: number): Promise<LeaseAnswer | null> {
    const nonce = randomBytes(16).toString("hex");
    this.lastTs = Math.max(Date.now(), this.lastTs + 1);
    const req: LeaseRequest = { v: 1, t: "lease-request", cluster: this.o.cluster, node: this.o.node, op, ts: this.lastTs, nonce };
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
