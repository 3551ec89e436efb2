// Framing of the replication stream: [u32 length][u8 kind][payload][MAC]. Data and
// resync blocks travel as binary (two f64 then the bytes); everything else as JSON.
// After the handshake every frame but an auth frame ends with a 16-byte MAC:
// HMAC-SHA256 (truncated) under the direction's session key (auth.ts) over a 64-bit frame counter,
// the kind and the payload. The counter is not sent: both ends count, and TCP keeps
// the order, so a frame changed, replayed, reordered or left out fails its MAC.
// Frames are bounded; a larger, unknown, malformed or unauthentic frame is a
// FrameError (verdict "malformed" or "forged") and the link closes.
// The out-of-sync bitmap crosses in `bitmap` messages after the hello, one per chunk
// of BITMAP_CHUNK_BLOCKS blocks that has a bit set, each the raw bits or the runs of
// set bits, whichever is smaller: a clean 1 TiB volume sends none, a dirty one at most
// 32 chunks of 1 MiB.
import { createHash, timingSafeEqual, type Hash } from "node:crypto";
import type { Bitmap } from "./bitmap.ts";
import { BITMAP_CHUNK_BLOCKS, type Msg } from "./types.ts";

export const FRAME_MAX_BYTES = 4 * 1024 * 1024;
/** Bytes of the truncated HMAC-SHA256 at the end of every authenticated frame. */
export const MAC_BYTES = 16;

const KIND_JSON = 1;
const KIND_DATA = 2;
const KIND_RESYNC = 3;
const KIND_AUTH = 10;
const KIND_PING = 11;
const KIND_PONG = 12;

/** A frame on the wire: a protocol message, or the transport's own ping/pong/auth. */
export type Frame = { readonly kind: "msg"; readonly msg: Msg } | { readonly kind: "ping" } | { readonly kind: "pong" } | { readonly kind: "auth"; readonly body: Record<string, unknown> };

export type FrameVerdict = "malformed" | "forged";

/** A frame that cannot be taken: the link must close. */
export class FrameError extends Error {
  constructor(
    readonly verdict: FrameVerdict,
    detail: string,
  ) {
    super(`${verdict === "forged" ? "forged frame" : "malformed frame"}: ${detail}`);
  }
}

/**
 * One direction's frame MACs, counting the frames of the session. HMAC-SHA256 (RFC
 * 2104) from two SHA-256 states keyed once and copied per frame: half the cost of a
 * fresh createHmac for a 4 KiB block.
 */
export class FrameMac {
  private counter = 0;
  private readonly inner: Hash;
  private readonly outer: Hash;

  constructor(key: Buffer) {
    if (key.length > 64) throw new Error("frame key longer than a SHA-256 block");
    const ipad = Buffer.alloc(64, 0x36);
    const opad = Buffer.alloc(64, 0x5c);
    for (let i = 0; i < key.length; i++) {
      ipad[i] = ipad[i]! ^ key[i]!;
      opad[i] = opad[i]! ^ key[i]!;
    }
    this.inner = createHash("sha256").update(ipad);
    this.outer = createHash("sha256").update(opad);
  }

  /** The MAC of the next frame, whose kind byte and payload are PARTS. */
  next(parts: readonly Uint8Array[]): Buffer {
    const n = Buffer.allocUnsafe(8);
    n.writeUInt32BE(Math.floor(this.counter / 2 ** 32), 0);
    n.writeUInt32BE(this.counter % 2 ** 32, 4);
    this.counter++;
    const h = this.inner.copy().update(n);
    for (const p of parts) h.update(p);
    return this.outer.copy().update(h.digest()).digest().subarray(0, MAC_BYTES);
  }
}

function header(kind: number, payloadLen: number, macLen: number): Buffer {
  const h = Buffer.allocUnsafe(5);
  h.writeUInt32BE(1 + payloadLen + macLen, 0);
  h.writeUInt8(kind, 4);
  return h;
}

/** The kind byte and payload of F (data payloads are not copied). */
function parts(f: Frame): { kind: number; payload: Buffer[] } {
  switch (f.kind) {
    case "ping":
      return { kind: KIND_PING, payload: [] };
    case "pong":
      return { kind: KIND_PONG, payload: [] };
    case "auth":
      return { kind: KIND_AUTH, payload: [Buffer.from(JSON.stringify(f.body))] };
    case "msg": {
      const m = f.msg;
      if (m.t === "data" || m.t === "resync-data") {
        const fixed = Buffer.allocUnsafe(16);
        fixed.writeDoubleBE(m.t === "data" ? m.seq : 0, 0);
        fixed.writeDoubleBE(m.offset, 8);
        return { kind: m.t === "data" ? KIND_DATA : KIND_RESYNC, payload: [fixed, m.data] };
      }
      return { kind: KIND_JSON, payload: [Buffer.from(JSON.stringify(m))] };
    }
  }
}

/**
 * Encodes a frame as one or more buffers (data payloads are not copied), with the next
 * MAC of SEAL unless it is an auth frame (those belong to the handshake, before keys).
 */
export function encode(f: Frame, seal: FrameMac | null = null): Buffer[] {
  const { kind, payload } = parts(f);
  const len = payload.reduce((n, b) => n + b.length, 0);
  if (len + 1 > FRAME_MAX_BYTES) throw new Error(`${f.kind === "msg" ? `message ${f.msg.t}` : f.kind} too large (${len} bytes)`);
  const sealed = seal !== null && f.kind !== "auth";
  const h = header(kind, len, sealed ? MAC_BYTES : 0);
  if (!sealed) return [h, ...payload];
  return [h, ...payload, seal.next([h.subarray(4), ...payload])];
}

const isRecord = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

/** Accumulates stream bytes and yields whole frames, one at a time. */
export class Decoder {
  private chunks: Buffer[] = [];
  private buffered = 0;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  /**
   * The next whole frame, checked with OPEN (the peer's direction, null before the
   * handshake is done), or null until more bytes come. Throws FrameError. One frame at
   * a time, because the handshake that sets OPEN happens between two frames.
   */
  next(open: FrameMac | null): Frame | null {
    if (this.buffered < 4) return null;
    const len = this.peek(4).readUInt32BE(0);
    if (len < 1 || len > FRAME_MAX_BYTES + MAC_BYTES) throw new FrameError("malformed", `length ${len}`);
    if (this.buffered < 4 + len) return null;
    const frame = this.take(4 + len).subarray(4);
    const kind = frame[0]!;
    if (kind === KIND_AUTH || open === null) return decodeFrame(kind, frame.subarray(1));
    if (frame.length < 1 + MAC_BYTES) throw new FrameError("malformed", `a ${frame.length}-byte frame cannot carry its MAC`);
    const body = frame.subarray(0, frame.length - MAC_BYTES);
    const want = open.next([body]);
    if (!timingSafeEqual(want, frame.subarray(frame.length - MAC_BYTES))) throw new FrameError("forged", `kind ${kind}, ${len} bytes: the MAC does not verify (changed, replayed, reordered or a frame missing)`);
    return decodeFrame(kind, body.subarray(1));
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

function json(p: Buffer): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(p.toString("utf8"));
  } catch {
    throw new FrameError("malformed", "JSON that does not parse");
  }
  if (!isRecord(v)) throw new FrameError("malformed", "JSON that is not an object");
  return v;
}

function decodeFrame(kind: number, p: Buffer): Frame {
  switch (kind) {
    case KIND_PING:
      return { kind: "ping" };
    case KIND_PONG:
      return { kind: "pong" };
    case KIND_AUTH:
      return { kind: "auth", body: json(p) };
    case KIND_JSON: {
      const m = json(p);
      if (typeof m.t !== "string") throw new FrameError("malformed", "a message without a type");
      return { kind: "msg", msg: m as unknown as Msg };
    }
    case KIND_DATA:
    case KIND_RESYNC: {
      if (p.length < 16) throw new FrameError("malformed", `a block frame of ${p.length} bytes`);
      const seq = p.readDoubleBE(0);
      const offset = p.readDoubleBE(8);
      if (!Number.isSafeInteger(seq) || seq < 0 || !Number.isSafeInteger(offset) || offset < 0) throw new FrameError("malformed", `a block with sequence ${seq} at offset ${offset}`);
      // Copy: the stream's buffer is reused by later frames.
      const data = Buffer.from(p.subarray(16));
      return { kind: "msg", msg: kind === KIND_DATA ? { t: "data", seq, offset, data } : { t: "resync-data", offset, data } };
    }
    default:
      throw new FrameError("malformed", `unknown kind ${kind}`);
  }
}

// ---- the bitmap in chunks ------------------------------------------------------------

type BitmapMsg = Extract<Msg, { t: "bitmap" }>;

function varint(out: number[], n: number): void {
  // Bound: a safe integer has at most 8 groups of 7 bits.
  while (n >= 0x80) {
    out.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  out.push(n);
}

/** The runs of set bits in [FIRST, FIRST+BLOCKS) as (gap, length) varints, or null past LIMIT bytes. */
function runsOf(bitmap: Bitmap, first: number, blocks: number, limit: number): Buffer | null {
  const out: number[] = [];
  const end = first + blocks;
  let at = first;
  // Bound: each pass moves AT past one run (at least one block).
  for (;;) {
    const start = bitmap.nextSet(at);
    if (start < 0 || start >= end) return Buffer.from(out);
    const len = bitmap.runLength(start, end - start);
    varint(out, start - at);
    varint(out, len);
    if (out.length > limit) return null;
    at = start + len;
  }
}

/** The bitmap as the `bitmap` messages that follow a hello (none for a clean bitmap). */
export function bitmapChunks(bitmap: Bitmap): BitmapMsg[] {
  const out: BitmapMsg[] = [];
  if (bitmap.count === 0) return out;
  for (let first = 0; first < bitmap.blocks; first += BITMAP_CHUNK_BLOCKS) {
    const blocks = Math.min(BITMAP_CHUNK_BLOCKS, bitmap.blocks - first);
    const next = bitmap.nextSet(first);
    if (next < 0) break;
    if (next >= first + blocks) continue;
    const raw = bitmap.bytes.subarray(first / 8, Math.ceil((first + blocks) / 8));
    const runs = runsOf(bitmap, first, blocks, raw.length);
    out.push(runs ? { t: "bitmap", first, blocks, encoding: "runs", data: runs.toString("base64") } : { t: "bitmap", first, blocks, encoding: "raw", data: Buffer.from(raw).toString("base64") });
  }
  return out;
}

/**
 * Sets INTO's bits from one chunk, which must start at or after NEXTFIRST (chunks come
 * in order and do not overlap) and lie within TOTALBLOCKS. Returns the first block
 * after the chunk, or throws FrameError("malformed") naming what is wrong; INTO is
 * left alone when the chunk's size is not INTO's (the handshake refuses such a peer).
 */
export function applyBitmapChunk(m: BitmapMsg, into: Bitmap, totalBlocks: number, nextFirst: number): number {
  const { first, blocks } = m;
  if (!Number.isSafeInteger(first) || !Number.isSafeInteger(blocks) || first < nextFirst || first % 8 !== 0 || blocks < 1 || blocks > BITMAP_CHUNK_BLOCKS || first + blocks > totalBlocks || typeof m.data !== "string")
    throw new FrameError("malformed", `bitmap chunk of ${blocks} blocks at ${first} (expected within ${totalBlocks} blocks, from ${nextFirst})`);
  const bytes = Buffer.from(m.data, "base64");
  const apply = into.blocks === totalBlocks;
  if (m.encoding === "raw") {
    if (bytes.length !== Math.ceil(blocks / 8)) throw new FrameError("malformed", `raw bitmap chunk of ${bytes.length} bytes for ${blocks} blocks`);
    for (let i = 0; i < bytes.length; i++) {
      const byte = bytes[i]!;
      if (byte === 0) continue;
      for (let j = 0; j < 8; j++) if (byte & (1 << j)) {
        if (i * 8 + j >= blocks) throw new FrameError("malformed", "raw bitmap chunk with bits past its end");
        if (apply) into.set(first + i * 8 + j);
      }
    }
  } else if (m.encoding === "runs") {
    let at = 0;
    let p = 0;
    const read = (): number => {
      let n = 0;
      let scale = 1;
      // Bound: 8 groups of 7 bits at most.
      for (let k = 0; k < 8; k++) {
        if (p >= bytes.length) throw new FrameError("malformed", "bitmap runs cut short");
        const b = bytes[p++]!;
        n += (b & 0x7f) * scale;
        if ((b & 0x80) === 0) return n;
        scale *= 0x80;
      }
      throw new FrameError("malformed", "a bitmap run number too long");
    };
    // Bound: each pass consumes at least two bytes of the chunk.
    while (p < bytes.length) {
      const start = at + read();
      const len = read();
      if (len < 1 || start + len > blocks) throw new FrameError("malformed", `a bitmap run of ${len} blocks at ${start} past the chunk's ${blocks}`);
      if (apply) into.setBlocks(first + start, len);
      at = start + len;
    }
  } else throw new FrameError("malformed", `bitmap chunk encoding ${String(m.encoding)}`);
  return first + blocks;
}
