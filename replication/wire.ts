// Framing of the replication stream: [u32 length][u8 kind][payload]. Data and resync
// blocks travel as binary (two f64 then the bytes); everything else as JSON. Frames
// are bounded; a larger or unknown frame is a protocol error and closes the link.
import type { Msg } from "./types.ts";

export const FRAME_MAX_BYTES = 4 * 1024 * 1024;

const KIND_JSON = 1;
const KIND_DATA = 2;
const KIND_RESYNC = 3;
const KIND_PING = 11;
const KIND_PONG = 12;

/** A frame on the wire: a protocol message, or the transport's own ping/pong/auth. */
export type Frame = { readonly kind: "msg"; readonly msg: Msg } | { readonly kind: "ping" } | { readonly kind: "pong" } | { readonly kind: "auth"; readonly body: Record<string, unknown> };

const KIND_AUTH = 10;

function header(kind: number, payloadLen: number): Buffer {
  const h = Buffer.allocUnsafe(5);
  h.writeUInt32BE(payloadLen + 1, 0);
  h.writeUInt8(kind, 4);
  return h;
}

/** Encodes a frame as one or more buffers (data payloads are not copied). */
export function encode(f: Frame): Buffer[] {
  switch (f.kind) {
    case "ping":
      return [header(KIND_PING, 0)];
    case "pong":
      return [header(KIND_PONG, 0)];
    case "auth": {
      const body = Buffer.from(JSON.stringify(f.body));
      return [header(KIND_AUTH, body.length), body];
    }
    case "msg": {
      const m = f.msg;
      if (m.t === "data" || m.t === "resync-data") {
        const fixed = Buffer.allocUnsafe(16);
        fixed.writeDoubleBE(m.t === "data" ? m.seq : 0, 0);
        fixed.writeDoubleBE(m.offset, 8);
        return [header(m.t === "data" ? KIND_DATA : KIND_RESYNC, 16 + m.data.length), fixed, m.data];
      }
      const body = Buffer.from(JSON.stringify(m));
      if (body.length + 1 > FRAME_MAX_BYTES) throw new Error(`message ${m.t} too large (${body.length} bytes)`);
      return [header(KIND_JSON, body.length), body];
    }
  }
}

/** Accumulates stream bytes and yields whole frames. */
export class Decoder {
  private chunks: Buffer[] = [];
  private buffered = 0;

  push(chunk: Buffer): Frame[] {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const out: Frame[] = [];
    for (;;) {
      if (this.buffered < 4) break;
      const head = this.peek(4);
      const len = head.readUInt32BE(0);
      if (len < 1 || len > FRAME_MAX_BYTES + 32) throw new Error(`bad frame length ${len}`);
      if (this.buffered < 4 + len) break;
      const frame = this.take(4 + len).subarray(4);
      out.push(decodeFrame(frame));
    }
    return out;
  }

  private peek(n: number): Buffer {
    if (this.chunks[0]!.length >= n) return this.chunks[0]!;
    const all = Buffer.concat(this.chunks);
    this.chunks = [all];
    return all;
  }

  private take(n: number): Buffer {
    let first = this.chunks[0]!;
    if (first.length < n) {
      first = Buffer.concat(this.chunks);
      this.chunks = [first];
    }
    const out = first.subarray(0, n);
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.buffered -= n;
    return out;
  }
}

function decodeFrame(f: Buffer): Frame {
  const kind = f.readUInt8(0);
  const p = f.subarray(1);
  switch (kind) {
    case KIND_PING:
      return { kind: "ping" };
    case KIND_PONG:
      return { kind: "pong" };
    case KIND_AUTH:
      return { kind: "auth", body: JSON.parse(p.toString("utf8")) as Record<string, unknown> };
    case KIND_JSON:
      return { kind: "msg", msg: JSON.parse(p.toString("utf8")) as Msg };
    case KIND_DATA:
    case KIND_RESYNC: {
      const seq = p.readDoubleBE(0);
      const offset = p.readDoubleBE(8);
      // Copy: the stream's buffer is reused by later frames.
      const data = Buffer.from(p.subarray(16));
      return { kind: "msg", msg: kind === KIND_DATA ? { t: "data", seq, offset, data } : { t: "resync-data", offset, data } };
    }
    default:
      throw new Error(`unknown frame kind ${kind}`);
  }
}
