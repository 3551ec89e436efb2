// The replication link: one authenticated TCP connection between the two replication
// addresses. The node with the lower id connects (retrying with a bounded backoff);
// the other accepts, only from the peer's address. Both sides ping; a link silent for
// pingTimeoutMs is declared down (TCP alone takes minutes to notice a pulled cable).
// After the challenge-response (auth.ts) every frame in either direction carries a
// MAC under that direction's session key and frame counter (wire.ts): a frame changed,
// replayed, reordered, left out or injected closes the link, counted as forged; a frame
// that does not parse, as malformed; each with the reason in the log. The protocol
// core checks what the frames say (offsets against the volume size).
import { EventEmitter } from "node:events";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import type { Logger } from "pino";
import { makeNonce, proof, sessionKey, verifyProof } from "./auth.ts";
import type { Msg } from "./types.ts";
import { Decoder, encode, FrameError, FrameMac, type Frame } from "./wire.ts";

export interface LinkOptions {
  readonly nodeId: string;
  readonly peerId: string;
  readonly cluster: string;
  readonly secret: Buffer;
  readonly listen: { readonly host: string; readonly port: number };
  readonly peer: { readonly host: string; readonly port: number };
  readonly pingIntervalMs: number;
  readonly pingTimeoutMs: number;
  readonly authTimeoutMs: number;
  readonly log: Logger;
}

const BACKOFF_MIN_MS = 100;
const BACKOFF_MAX_MS = 2000;

interface Conn {
  readonly sock: Socket;
  readonly decoder: Decoder;
  readonly nonce: string;
  peerNonce: string | null;
  authed: boolean;
  /** MACs of the frames we send: set when we send our proof. */
  sendMac: FrameMac | null;
  /** MACs of the frames the peer sends: set when its proof verifies. */
  recvMac: FrameMac | null;
  lastRecvMs: number;
}

export interface LinkStats {
  authFailures: number;
  connects: number;
  disconnects: number;
  refusedAddresses: number;
  bytesSent: number;
  /** Frames whose MAC did not verify (changed, replayed, reordered, missing, injected). */
  forgedFrames: number;
  /** Frames that did not parse, or came out of turn (a message before the handshake). */
  malformedFrames: number;
}

export class PeerLink extends EventEmitter {
  private server: Server | null = null;
  private session: Conn | null = null;
  private pending = new Set<Conn>();
  private allowed = true;
  private stopped = false;
  private retryTimer: NodeJS.Timeout | null = null;
  private pingTimer: NodeJS.Timeout | null = null;
  private backoffMs = BACKOFF_MIN_MS;
  /** Data messages waiting for the end of this event-loop turn (see send()); at most what one turn writes. */
  private queued: Msg[] = [];
  private flushScheduled = false;
  readonly stats: LinkStats = { authFailures: 0, connects: 0, disconnects: 0, refusedAddresses: 0, bytesSent: 0, forgedFrames: 0, malformedFrames: 0 };

  constructor(private readonly o: LinkOptions) {
    super();
  }

  get up(): boolean {
    return this.session !== null;
  }

  private get connector(): boolean {
    return this.o.nodeId < this.o.peerId;
  }

  async start(): Promise<void> {
    this.server = createServer((sock) => this.accept(sock));
    await new Promise<void>((resolve, reject) => {
      this.server!.once("error", reject);
      this.server!.listen(this.o.listen.port, this.o.listen.host, () => resolve());
    });
    this.server.on("error", (err) => this.o.log.error({ err }, "replication listener error"));
    this.pingTimer = setInterval(() => this.pingAll(), this.o.pingIntervalMs);
    if (this.connector) this.dial();
  }

  stop(): void {
    this.stopped = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.server?.close();
    for (const c of [...this.pending, ...(this.session ? [this.session] : [])]) c.sock.destroy();
  }

  /** Stop (false) or resume (true) connecting; stopping also closes the session. */
  setAllowed(on: boolean): void {
    this.allowed = on;
    if (!on) this.drop("standalone");
    else if (this.connector && !this.session) this.dial();
  }

  drop(reason: string): void {
    if (this.session) this.close(this.session, reason);
  }

  /**
   * Sends MSG on the session. Data blocks wait for the end of the current event-loop
   * turn, so the application's write is answered before the (costly) socket write and
   * several blocks share one system call; any other message first sends what waits, in
   * order, then itself at once.
   */
  send(msg: Msg): boolean {
    const s = this.session;
    if (!s) return false;
    if (msg.t === "data" || msg.t === "resync-data") {
      this.queued.push(msg);
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        setImmediate(() => {
          this.flushScheduled = false;
          this.flushQueued();
        });
      }
      return true;
    }
    this.write(s, { kind: "msg", msg });
    return true;
  }

  /** Writes the queued data frames now (before anything that must follow them). */
  flushQueued(): void {
    const s = this.session;
    if (this.queued.length === 0 || !s) return;
    const msgs = this.queued;
    this.queued = [];
    // Sealed now, in the order they are written: every other write flushes these first.
    this.writeBufs(s, msgs.flatMap((msg) => encode({ kind: "msg", msg }, s.sendMac!)));
  }

  /** Bytes queued in the socket but not yet handed to the kernel. */
  get writeBacklog(): number {
    return this.session?.sock.writableLength ?? 0;
  }

  private write(c: Conn, f: Frame): void {
    if (f.kind !== "auth" && !c.sendMac) throw new Error("replication link: a frame before the handshake");
    if (c === this.session) this.flushQueued();
    this.writeBufs(c, encode(f, f.kind === "auth" ? null : c.sendMac));
  }

  private writeBufs(c: Conn, bufs: readonly Buffer[]): void {
    c.sock.cork();
    for (const b of bufs) {
      c.sock.write(b);
      this.stats.bytesSent += b.length;
    }
    c.sock.uncork();
  }

  private dial(): void {
    if (this.stopped || !this.allowed || this.session || this.retryTimer) return;
    const sock = createConnection({ host: this.o.peer.host, port: this.o.peer.port, localAddress: this.o.listen.host });
    const c = this.track(sock);
    sock.once("connect", () => this.startAuth(c));
  }

  private scheduleDial(): void {
    if (this.stopped || !this.allowed || !this.connector || this.session || this.retryTimer) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.dial();
    }, this.backoffMs);
    this.backoffMs = Math.min(BACKOFF_MAX_MS, this.backoffMs * 2);
  }

  private accept(sock: Socket): void {
    const remote = (sock.remoteAddress ?? "").replace(/^::ffff:/, "");
    if (remote !== this.o.peer.host || !this.allowed || this.stopped) {
      if (remote !== this.o.peer.host) {
        this.stats.refusedAddresses++;
        this.o.log.warn({ remote }, "replication connection from an address that is not the peer's; refused");
      }
      sock.destroy();
      return;
    }
    this.startAuth(this.track(sock));
  }

  private track(sock: Socket): Conn {
    sock.setNoDelay(true);
    const c: Conn = { sock, decoder: new Decoder(), nonce: makeNonce(), peerNonce: null, authed: false, sendMac: null, recvMac: null, lastRecvMs: Date.now() };
    this.pending.add(c);
    const authTimer = setTimeout(() => {
      if (!c.authed) this.close(c, "authentication timed out");
    }, this.o.authTimeoutMs);
    sock.on("data", (chunk: Buffer) => {
      c.lastRecvMs = Date.now();
      c.decoder.push(chunk);
      // One frame at a time: the handshake sets the peer's key between two frames.
      // Bound: each frame consumes at least 5 buffered bytes.
      while (!sock.destroyed) {
        let f: Frame | null;
        try {
          f = c.decoder.next(c.recvMac);
        } catch (err) {
          if (!(err instanceof FrameError)) throw err;
          if (err.verdict === "forged") this.stats.forgedFrames++;
          else this.stats.malformedFrames++;
          return this.close(c, `protocol error: ${err.message}`);
        }
        if (!f) return;
        this.onFrame(c, f);
      }
    });
    sock.on("error", () => {});
    sock.on("close", () => {
      clearTimeout(authTimer);
      this.closed(c, "connection closed");
    });
    return c;
  }

  private startAuth(c: Conn): void {
    this.write(c, { kind: "auth", body: { t: "auth-hello", node: this.o.nodeId, cluster: this.o.cluster, nonce: c.nonce } });
  }

  private onFrame(c: Conn, f: Frame): void {
    if (f.kind === "auth") {
      if (!c.recvMac) return this.onAuth(c, f.body);
      // The peer may refuse our proof after we accepted its own; nothing else comes unsealed now.
      if (f.body.t === "auth-refused") return this.authFailed(c, "the peer refused our proof (wrong replication secret?)");
      this.stats.malformedFrames++;
      return this.close(c, "protocol error: an authentication frame after the handshake");
    }
    if (!c.recvMac || !c.authed) {
      this.stats.malformedFrames++;
      return this.close(c, "protocol error: a message before authentication");
    }
    if (f.kind === "ping") return this.write(c, { kind: "pong" });
    if (f.kind === "pong") return;
    if (c !== this.session) return this.close(c, "a message on a connection that is not the session");
    this.emit("msg", f.msg);
  }

  private onAuth(c: Conn, body: Record<string, unknown>): void {
    if (body.t === "auth-hello") {
      if (c.peerNonce !== null) return this.authFailed(c, "the peer introduced itself twice");
      if (body.node !== this.o.peerId || body.cluster !== this.o.cluster || typeof body.nonce !== "string" || body.nonce.length > 128) {
        this.authFailed(c, `peer introduced itself as node ${String(body.node)} of cluster ${String(body.cluster)}`);
        return;
      }
      c.peerNonce = body.nonce;
      this.write(c, { kind: "auth", body: { t: "auth-proof", mac: proof(this.o.secret, this.o.cluster, this.o.nodeId, body.nonce, c.nonce) } });
      // Everything we send after our proof is sealed.
      c.sendMac = new FrameMac(sessionKey(this.o.secret, this.o.cluster, this.o.nodeId, c.nonce, body.nonce));
      return;
    }
    if (body.t === "auth-proof") {
      if (!c.peerNonce || !verifyProof(this.o.secret, this.o.cluster, this.o.peerId, c.nonce, c.peerNonce, String(body.mac))) {
        this.write(c, { kind: "auth", body: { t: "auth-refused" } });
        this.authFailed(c, "wrong replication secret");
        return;
      }
      c.authed = true;
      c.recvMac = new FrameMac(sessionKey(this.o.secret, this.o.cluster, this.o.peerId, c.peerNonce, c.nonce));
      this.pending.delete(c);
      if (this.session) this.close(this.session, "replaced by a newer connection");
      this.session = c;
      this.backoffMs = BACKOFF_MIN_MS;
      this.stats.connects++;
      this.o.log.info({ peer: this.o.peerId, remote: c.sock.remoteAddress }, "replication link up");
      this.emit("up");
      return;
    }
    if (body.t === "auth-refused") this.authFailed(c, "the peer refused our proof (wrong replication secret?)");
  }

  private authFailed(c: Conn, why: string): void {
    this.stats.authFailures++;
    this.o.log.warn({ remote: c.sock.remoteAddress, why }, "replication authentication failed");
    this.emit("auth-failed", { remote: c.sock.remoteAddress, why });
    this.close(c, `authentication failed: ${why}`);
  }

  private close(c: Conn, reason: string): void {
    this.closed(c, reason);
    c.sock.destroy();
  }

  private closed(c: Conn, reason: string): void {
    this.pending.delete(c);
    if (this.session === c) {
      this.session = null;
      this.queued = []; // frames of a dead session never reach a later one
      this.stats.disconnects++;
      this.o.log.warn({ reason }, "replication link down");
      this.emit("down", reason);
    }
    this.scheduleDial();
  }

  private pingAll(): void {
    const now = Date.now();
    const s = this.session;
    if (!s) return;
    if (now - s.lastRecvMs > this.o.pingTimeoutMs) return this.close(s, `no answer for ${this.o.pingTimeoutMs} ms`);
    this.write(s, { kind: "ping" });
  }
}
