// RFC 2136 dynamic updates, signed with TSIG (RFC 8945, HMAC-SHA256), from code: the
// message is built here byte by byte (dns-packet cannot express the delete forms or
// TSIG), sent over UDP with a bounded number of tries, and the server's answer is
// reported by name (NOERROR, REFUSED, NOTAUTH with BADSIG/BADKEY/BADTIME, NOTZONE,
// YXRRSET/NXRRSET for a failed prerequisite...). Answers are checked against their
// TSIG when the server signs them.
import { createHmac, randomInt, timingSafeEqual } from "node:crypto";
import { createSocket } from "node:dgram";
import { isIPv4 } from "node:net";
import type { TsigKey } from "./tsig-key.ts";

const TYPES: Record<string, number> = { A: 1, NS: 2, SOA: 6, MX: 15, TXT: 16, AAAA: 28, ANY: 255, TSIG: 250 };
const CLASS_IN = 1;
const CLASS_NONE = 254;
const CLASS_ANY = 255;
const FUDGE_S = 300;
export const RCODES = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET", "NXRRSET", "NOTAUTH", "NOTZONE"];
const TSIG_ERRORS: Record<number, string> = { 16: "BADSIG", 17: "BADKEY", 18: "BADTIME", 22: "BADTRUNC" };

export type RecordType = "A" | "AAAA" | "MX" | "TXT" | "NS";

/** One change or prerequisite, in RFC 2136 terms. */
export type Op =
  | { readonly op: "add"; readonly name: string; readonly type: RecordType; readonly ttl: number; readonly data: string }
  | { readonly op: "delete-rrset"; readonly name: string; readonly type: RecordType }
  | { readonly op: "delete-rr"; readonly name: string; readonly type: RecordType; readonly data: string };

export type Prereq =
  | { readonly pre: "rrset-exists-value"; readonly name: string; readonly type: RecordType; readonly data: string }
  | { readonly pre: "rrset-absent"; readonly name: string; readonly type: RecordType }
  | { readonly pre: "name-in-use"; readonly name: string };

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}
function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

/** A domain name in wire form, lower-cased (canonical), no compression. */
export function wireName(name: string): Buffer {
  const parts = name.replace(/\.$/, "").toLowerCase().split(".").filter(Boolean);
  const out: Buffer[] = [];
  for (const p of parts) {
    const l = Buffer.from(p, "ascii");
    if (l.length > 63) throw new Error(`label too long in ${name}`);
    out.push(Buffer.from([l.length]), l);
  }
  out.push(Buffer.from([0]));
  return Buffer.concat(out);
}

function rdata(type: RecordType, data: string): Buffer {
  switch (type) {
    case "A":
      if (!isIPv4(data)) throw new Error(`not an IPv4 address: ${data}`);
      return Buffer.from(data.split(".").map(Number));
    case "AAAA": {
      const full = expand6(data);
      return Buffer.from(full.flatMap((g) => [g >> 8, g & 0xff]));
    }
    case "MX": {
      const [pref, host] = data.split(/\s+/);
      return Buffer.concat([u16(Number(pref)), wireName(host!)]);
    }
    case "NS":
      return wireName(data);
    case "TXT": {
      const chunks: Buffer[] = [];
      const b = Buffer.from(data, "utf8");
      for (let i = 0; i < b.length || i === 0; i += 255) {
        const c = b.subarray(i, i + 255);
        chunks.push(Buffer.from([c.length]), c);
        if (b.length === 0) break;
      }
      return Buffer.concat(chunks);
    }
  }
}

function expand6(a: string): number[] {
  const [head, tail] = a.split("::");
  const h = head ? head.split(":") : [];
  const t = tail !== undefined && tail !== "" ? tail.split(":") : [];
  const fill = tail !== undefined ? 8 - h.length - t.length : 0;
  return [...h, ...Array(fill).fill("0"), ...t].map((x) => parseInt(x, 16));
}

function rr(name: string, type: number, klass: number, ttl: number, data: Buffer): Buffer {
  return Buffer.concat([wireName(name), u16(type), u16(klass), u32(ttl), u16(data.length), data]);
}

/** The unsigned UPDATE message. */
export function buildUpdate(id: number, zone: string, prereqs: readonly Prereq[], ops: readonly Op[], arcount = 0): Buffer {
  const header = Buffer.concat([u16(id), u16(5 << 11), u16(1), u16(prereqs.length), u16(ops.length), u16(arcount)]);
  const zoneSec = Buffer.concat([wireName(zone), u16(TYPES.SOA!), u16(CLASS_IN)]);
  const pre = prereqs.map((p) => {
    switch (p.pre) {
      case "rrset-exists-value":
        return rr(p.name, TYPES[p.type]!, CLASS_IN, 0, rdata(p.type, p.data));
      case "rrset-absent":
        return rr(p.name, TYPES[p.type]!, CLASS_NONE, 0, Buffer.alloc(0));
      case "name-in-use":
        return rr(p.name, TYPES.ANY!, CLASS_ANY, 0, Buffer.alloc(0));
    }
  });
  const upd = ops.map((o) => {
    switch (o.op) {
      case "add":
        return rr(o.name, TYPES[o.type]!, CLASS_IN, o.ttl, rdata(o.type, o.data));
      case "delete-rrset":
        return rr(o.name, TYPES[o.type]!, CLASS_ANY, 0, Buffer.alloc(0));
      case "delete-rr":
        return rr(o.name, TYPES[o.type]!, CLASS_NONE, 0, rdata(o.type, o.data));
    }
  });
  return Buffer.concat([header, zoneSec, ...pre, ...upd]);
}

function tsigVariables(key: TsigKey, timeSigned: number, error = 0, other: Uint8Array = Buffer.alloc(0)): Buffer {
  const t = Buffer.alloc(6);
  t.writeUIntBE(timeSigned, 0, 6);
  return Buffer.concat([wireName(key.name), u16(CLASS_ANY), u32(0), wireName(`${key.algorithm}.`), t, u16(FUDGE_S), u16(error), u16(other.length), other]);
}

/** Appends a TSIG record to MESSAGE (whose ARCOUNT does not count it yet). */
export function signMessage(message: Buffer, key: TsigKey, timeSigned = Math.floor(Date.now() / 1000)): { signed: Buffer; mac: Buffer } {
  if (key.algorithm !== "hmac-sha256") throw new Error(`unsupported TSIG algorithm ${key.algorithm} (use hmac-sha256)`);
  const mac = createHmac("sha256", key.secret).update(message).update(tsigVariables(key, timeSigned)).digest();
  const t = Buffer.alloc(6);
  t.writeUIntBE(timeSigned, 0, 6);
  const tsigRdata = Buffer.concat([wireName(`${key.algorithm}.`), t, u16(FUDGE_S), u16(mac.length), mac, message.subarray(0, 2), u16(0), u16(0)]);
  const signed = Buffer.concat([message, rr(key.name, TYPES.TSIG!, CLASS_ANY, 0, tsigRdata)]);
  signed.writeUInt16BE(message.readUInt16BE(10) + 1, 10);
  return { signed, mac };
}

export interface UpdateResult {
  readonly rcode: string;
  readonly tsigError: string | null;
  /** The answer carried a TSIG that verified with our key (null: the answer was unsigned). */
  readonly answerSigned: boolean | null;
}

function skipName(b: Buffer, off: number): number {
  for (;;) {
    const len = b[off]!;
    if (len === 0) return off + 1;
    if ((len & 0xc0) === 0xc0) return off + 2;
    off += len + 1;
  }
}

/** Reads the rcode and, if present, the TSIG of an answer; verifies the TSIG MAC. */
export function parseAnswer(b: Buffer, key: TsigKey | null, requestMac: Buffer | null): UpdateResult {
  const rcode = RCODES[b.readUInt16BE(2) & 0x0f] ?? `RCODE${b.readUInt16BE(2) & 0x0f}`;
  const counts = [b.readUInt16BE(4), b.readUInt16BE(6), b.readUInt16BE(8), b.readUInt16BE(10)];
  let off = 12;
  for (let i = 0; i < counts[0]!; i++) off = skipName(b, off) + 4;
  let tsigError: string | null = null;
  let answerSigned: boolean | null = null;
  const rrTotal = counts[1]! + counts[2]! + counts[3]!;
  for (let i = 0; i < rrTotal; i++) {
    const start = off;
    off = skipName(b, off);
    const type = b.readUInt16BE(off);
    const rdlen = b.readUInt16BE(off + 8);
    const rdStart = off + 10;
    if (type === TYPES.TSIG && i === rrTotal - 1) {
      let p = skipName(b, rdStart);
      const timeSigned = b.readUIntBE(p, 6);
      p += 8;
      const macLen = b.readUInt16BE(p);
      const mac = b.subarray(p + 2, p + 2 + macLen);
      p += 2 + macLen + 2;
      const err = b.readUInt16BE(p);
      const otherLen = b.readUInt16BE(p + 2);
      const other = b.subarray(p + 4, p + 4 + otherLen);
      if (err) tsigError = TSIG_ERRORS[err] ?? `TSIG error ${err}`;
      if (key && requestMac && macLen > 0) {
        const unsigned = Buffer.from(b.subarray(0, start));
        unsigned.writeUInt16BE(counts[3]! - 1, 10);
        const want = createHmac("sha256", key.secret).update(u16(requestMac.length)).update(requestMac).update(unsigned).update(tsigVariables(key, timeSigned, err, other)).digest();
        answerSigned = want.length === mac.length && timingSafeEqual(want, mac);
      }
    }
    off = rdStart + rdlen;
  }
  return { rcode, tsigError, answerSigned };
}

/** Sends an update (signed when KEY is given); retries a timeout a bounded number of times. */
export async function sendUpdate(server: string, port: number, zone: string, prereqs: readonly Prereq[], ops: readonly Op[], key: TsigKey | null, opts: { timeoutMs?: number; tries?: number } = {}): Promise<UpdateResult> {
  const tries = opts.tries ?? 3;
  let lastErr: Error | null = null;
  for (let i = 0; i < tries; i++) {
    const id = randomInt(0, 65536);
    const msg = buildUpdate(id, zone, prereqs, ops);
    const { signed, mac } = key ? signMessage(msg, key) : { signed: msg, mac: null };
    try {
      const answer = await exchange(server, port, signed, id, opts.timeoutMs ?? 2000);
      return parseAnswer(answer, key, mac);
    } catch (err) {
      lastErr = err as Error;
    }
  }
  throw new Error(`no answer from ${server}:${port} to the update after ${tries} tries (${lastErr?.message})`);
}

function exchange(server: string, port: number, msg: Buffer, id: number, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const sock = createSocket("udp4");
    const t = setTimeout(() => {
      sock.close();
      reject(new Error(`timeout after ${timeoutMs} ms`));
    }, timeoutMs);
    sock.on("message", (m) => {
      if (m.length < 12 || m.readUInt16BE(0) !== id) return;
      clearTimeout(t);
      sock.close();
      resolve(m);
    });
    sock.on("error", (err) => {
      clearTimeout(t);
      sock.close();
      reject(err);
    });
    sock.send(msg, port, server);
  });
}
