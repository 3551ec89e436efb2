// RFC 2136 dynamic updates, signed with TSIG (RFC 8945, HMAC-SHA256), from code: the
// message is built here byte by byte (dns-packet cannot express the delete forms or
// TSIG), sent over UDP with a bounded number of tries, and the server's answer is
// reported by name (NOERROR, REFUSED, NOTAUTH with BADSIG/BADKEY/BADTIME, NOTZONE,
// YXRRSET/NXRRSET for a failed prerequisite...). Answers are untrusted input: every
// read is bounds-checked (names: labels <= 63 bytes, names <= 255, at most 16
// compression pointers, each pointing back), a datagram is taken only from the
// server's address and port with our id, and its TSIG is verified (RFC 8945: over our
// request's MAC, within the fudge); the rest is dropped and counted (answerCounters).
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

/** Appends a TSIG record to MESSAGE (whose ARCOUNT does not count it yet). */
export function signMessage(message: Buffer, key: TsigKey, timeSigned = Math.floor(Date.now() / 1000)): { signed: Buffer; mac: Buffer } {
  if (key.algorithm !== "hmac-sha256") throw new Error(`unsupported TSIG algorithm ${key.algorithm} (use hmac-sha256)`);
  const mac = createHmac("sha256", key.secret).update(message).update(tsigVariablesOf(key.name, CLASS_ANY, 0, key.algorithm, timeSigned, FUDGE_S, 0, Buffer.alloc(0))).digest();
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
  /**
   * The answer's TSIG: true when it verified with our key (MAC over our request's MAC
   * and the answer, signed within its fudge of our clock), false when it was present
   * but did not, null when the answer was unsigned.
   */
  readonly answerSigned: boolean | null;
  /** Why a present TSIG did not verify (null otherwise). */
  readonly signatureProblem: string | null;
  /**
   * The MAC was made with our key for our request, but outside the fudge of our clock:
   * the server's answer, from a server whose clock is off (a forger cannot make it).
   */
  readonly signedOutOfTime: boolean;
}

/** An answer that does not parse: cut short, a name that loops or is too long, junk. */
export class DnsFormatError extends Error {
  constructor(what: string) {
    super(`malformed DNS answer: ${what}`);
  }
}

/** What became of each datagram a client socket received. */
export type AnswerVerdict = "accepted" | "foreign" | "mismatched" | "malformed" | "forged" | "unsigned";
export type AnswerCounters = { received: number } & Record<AnswerVerdict, number>;
/** Datagrams received by update clients in this process, by verdict. */
export const answerCounters: AnswerCounters = { received: 0, accepted: 0, foreign: 0, mismatched: 0, malformed: 0, forged: 0, unsigned: 0 };

const NAME_BYTES_MAX = 255;
const LABEL_BYTES_MAX = 63;
/** Compression pointers followed in one name; each must point before the last one. */
const NAME_POINTERS_MAX = 16;

function need(b: Buffer, off: number, n: number, what: string): void {
  if (!Number.isInteger(off) || off < 0 || off + n > b.length) throw new DnsFormatError(`${what} runs past the end (${n} bytes at ${off} of ${b.length})`);
}
const rd16 = (b: Buffer, off: number, what: string) => (need(b, off, 2, what), b.readUInt16BE(off));
const rd32 = (b: Buffer, off: number, what: string) => (need(b, off, 4, what), b.readUInt32BE(off));

/**
 * Reads the domain name at OFF: its labels (lower-cased) and the offset after it in
 * the message. Every read is bounds-checked; labels, the name's length and pointer
 * jumps are capped, and a pointer must point back, so a loop is refused, not followed.
 */
export function readName(b: Buffer, off: number): { labels: string[]; end: number } {
  const labels: string[] = [];
  let nameBytes = 1;
  let end = -1;
  let jumps = 0;
  let pos = off;
  // Bound: every pass consumes a label (nameBytes grows) or a pointer (jumps grows).
  for (;;) {
    need(b, pos, 1, "a name");
    const len = b[pos]!;
    if (len === 0) {
      if (end < 0) end = pos + 1;
      return { labels, end };
    }
    const kind = len & 0xc0;
    if (kind === 0xc0) {
      const target = rd16(b, pos, "a compression pointer") & 0x3fff;
      if (end < 0) end = pos + 2;
      if (++jumps > NAME_POINTERS_MAX) throw new DnsFormatError(`more than ${NAME_POINTERS_MAX} compression pointers in a name`);
      if (target >= pos) throw new DnsFormatError(`a compression pointer at ${pos} points forward (to ${target})`);
      pos = target;
      continue;
    }
    if (kind !== 0) throw new DnsFormatError(`label type 0x${kind.toString(16)} at ${pos}`);
    if (len > LABEL_BYTES_MAX) throw new DnsFormatError(`a label of ${len} bytes`);
    nameBytes += len + 1;
    if (nameBytes > NAME_BYTES_MAX) throw new DnsFormatError(`a name longer than ${NAME_BYTES_MAX} bytes`);
    need(b, pos + 1, len, "a label");
    labels.push(b.toString("latin1", pos + 1, pos + 1 + len).toLowerCase());
    pos += len + 1;
  }
}

/** One resource record: where it starts, its owner, type and rdata bounds. */
export interface RawRecord {
  readonly start: number;
  readonly owner: string[];
  readonly type: number;
  readonly klass: number;
  readonly ttl: number;
  readonly rdStart: number;
  readonly rdEnd: number;
}

/** Splits a message into its header counts, questions and records, all bounds-checked. */
export function parseMessage(b: Buffer): { id: number; flags: number; counts: readonly number[]; questionsEnd: number; records: RawRecord[] } {
  if (b.length < 12) throw new DnsFormatError(`${b.length} bytes, shorter than a header`);
  const counts = [b.readUInt16BE(4), b.readUInt16BE(6), b.readUInt16BE(8), b.readUInt16BE(10)];
  let off = 12;
  // Bounds: each count is at most 65535, and each pass consumes bytes or throws.
  for (let i = 0; i < counts[0]!; i++) off = readName(b, off).end + 4;
  need(b, 12, off - 12, "the question section");
  const questionsEnd = off;
  const records: RawRecord[] = [];
  const rrTotal = counts[1]! + counts[2]! + counts[3]!;
  for (let i = 0; i < rrTotal; i++) {
    const start = off;
    const owner = readName(b, off);
    off = owner.end;
    const type = rd16(b, off, "a record type");
    const klass = rd16(b, off + 2, "a record class");
    const ttl = rd32(b, off + 4, "a record TTL");
    const rdlen = rd16(b, off + 8, "an rdata length");
    const rdStart = off + 10;
    need(b, rdStart, rdlen, "an rdata");
    off = rdStart + rdlen;
    records.push({ start, owner: owner.labels, type, klass, ttl, rdStart, rdEnd: off });
  }
  if (off !== b.length) throw new DnsFormatError(`${b.length - off} bytes after the last record`);
  return { id: b.readUInt16BE(0), flags: b.readUInt16BE(2), counts, questionsEnd, records };
}

function tsigVariablesOf(keyName: string, klass: number, ttl: number, algorithm: string, timeSigned: number, fudge: number, error: number, other: Uint8Array): Buffer {
  const t = Buffer.alloc(6);
  t.writeUIntBE(timeSigned, 0, 6);
  return Buffer.concat([wireName(keyName), u16(klass), u32(ttl), wireName(algorithm), t, u16(fudge), u16(error), u16(other.length), other]);
}

/**
 * Reads the rcode and, if present, the TSIG of an answer; verifies the TSIG (RFC 8945
 * 5.3: our key and algorithm, the MAC over our request's MAC, the answer with its
 * original id and without the TSIG, and the TSIG variables; time within the fudge).
 * Throws DnsFormatError on anything malformed.
 */
export function parseAnswer(b: Buffer, key: TsigKey | null, requestMac: Buffer | null, nowS = Math.floor(Date.now() / 1000)): UpdateResult {
  const m = parseMessage(b);
  if ((m.flags & 0x8000) === 0) throw new DnsFormatError("a query, not an answer");
  const code = m.flags & 0x0f;
  const rcode = RCODES[code] ?? `RCODE${code}`;
  let tsigError: string | null = null;
  let answerSigned: boolean | null = null;
  let signatureProblem: string | null = null;
  let signedOutOfTime = false;
  m.records.forEach((r, i) => {
    if (r.type !== TYPES.TSIG) return;
    if (i !== m.records.length - 1 || m.counts[3] === 0) throw new DnsFormatError("a TSIG record that is not the last additional record");
    const alg = readName(b, r.rdStart);
    let p = alg.end;
    need(b, p, 10, "the TSIG fields");
    const timeSigned = b.readUIntBE(p, 6);
    const fudge = b.readUInt16BE(p + 6);
    const macLen = b.readUInt16BE(p + 8);
    need(b, p + 10, macLen + 6, "the TSIG MAC");
    const mac = b.subarray(p + 10, p + 10 + macLen);
    p += 10 + macLen;
    const originalId = b.readUInt16BE(p);
    const err = b.readUInt16BE(p + 2);
    const otherLen = b.readUInt16BE(p + 4);
    need(b, p + 6, otherLen, "the TSIG other data");
    if (p + 6 + otherLen !== r.rdEnd) throw new DnsFormatError("TSIG rdata of the wrong length");
    const other = b.subarray(p + 6, p + 6 + otherLen);
    if (err) tsigError = TSIG_ERRORS[err] ?? `TSIG error ${err}`;
    if (macLen === 0) return; // an unsigned error answer (BADSIG, BADKEY) carries an empty MAC
    answerSigned = false;
    const keyName = r.owner.join(".");
    const algorithm = alg.labels.join(".");
    if (!key || !requestMac) signatureProblem = "no key to check it with";
    else if (keyName !== key.name.toLowerCase().replace(/\.$/, "")) signatureProblem = `signed with another key (${keyName})`;
    else if (algorithm !== key.algorithm) signatureProblem = `signed with ${algorithm}, not ${key.algorithm}`;
    else {
      const unsigned = Buffer.from(b.subarray(0, r.start));
      unsigned.writeUInt16BE(originalId, 0);
      unsigned.writeUInt16BE(m.counts[3]! - 1, 10);
      const want = createHmac("sha256", key.secret).update(u16(requestMac.length)).update(requestMac).update(unsigned).update(tsigVariablesOf(keyName, r.klass, r.ttl, algorithm, timeSigned, fudge, err, other)).digest();
      if (want.length !== mac.length || !timingSafeEqual(want, mac)) signatureProblem = "the MAC does not verify";
      else if (Math.abs(nowS - timeSigned) > fudge) {
        signatureProblem = `signed at ${timeSigned}, ${nowS - timeSigned} s from our clock (fudge ${fudge} s)`;
        signedOutOfTime = true;
      }
      else answerSigned = true;
    }
  });
  return { rcode, tsigError, answerSigned, signatureProblem, signedOutOfTime };
}

export interface UpdateOptions {
  readonly timeoutMs?: number;
  readonly tries?: number;
  /**
   * Take a NOERROR only when it is signed with our key: an unsigned or forged one is
   * dropped and the client goes on waiting for the server's own (for the DNS lease).
   */
  readonly requireSignedAnswer?: boolean;
}

type UpdateVerdict = Exclude<AnswerVerdict, "accepted" | "foreign">;

/** The verdict on one datagram received for the update with ID (signed with REQUESTMAC). */
export function judgeUpdateAnswer(answer: Buffer, id: number, key: TsigKey | null, requestMac: Buffer | null, requireSigned: boolean): Judgement<UpdateResult, UpdateVerdict> {
  if (answer.length < 12 || answer.readUInt16BE(0) !== id) return { verdict: "mismatched" };
  let r: UpdateResult;
  try {
    r = parseAnswer(answer, key, requestMac);
  } catch (err) {
    if (err instanceof DnsFormatError) return { verdict: "malformed" };
    throw err;
  }
  // A signature that does not verify is not the server's: wait for the real answer.
  // (One that verifies but is out of time is the server's: its caller hears why.)
  if (r.answerSigned === false && !r.signedOutOfTime) return { verdict: "forged" };
  if (requireSigned && r.answerSigned !== true && !r.signedOutOfTime && r.rcode === "NOERROR") return { verdict: "unsigned" };
  return { verdict: "accepted", result: r };
}

/** Sends an update (signed when KEY is given); retries a timeout a bounded number of times. */
export async function sendUpdate(server: string, port: number, zone: string, prereqs: readonly Prereq[], ops: readonly Op[], key: TsigKey | null, opts: UpdateOptions = {}): Promise<UpdateResult> {
  const tries = opts.tries ?? 3;
  let lastErr: Error | null = null;
  for (let i = 0; i < tries; i++) {
    const id = randomInt(0, 65536);
    const msg = buildUpdate(id, zone, prereqs, ops);
    const { signed, mac } = key ? signMessage(msg, key) : { signed: msg, mac: null };
    try {
      return await exchange(server, port, signed, opts.timeoutMs ?? 2000, (m) => judgeUpdateAnswer(m, id, key, mac, !!opts.requireSignedAnswer), answerCounters);
    } catch (err) {
      lastErr = err as Error;
    }
  }
  throw new Error(`no answer from ${server}:${port} to the update after ${tries} tries (${lastErr?.message})`);
}

/** A judge's verdict on one datagram: dropped (by name), or accepted with its result. */
export type Judgement<T, V extends string> = { readonly verdict: V } | { readonly verdict: "accepted"; readonly result: T };

/**
 * Sends MSG to SERVER:PORT and resolves with the first datagram from that address and
 * port that JUDGE accepts; every other one is dropped and counted in COUNTERS by its
 * verdict (a datagram from elsewhere is "foreign"). Bounded by TIMEOUTMS; nothing
 * thrown by JUDGE escapes the socket handler (it counts as "malformed").
 */
export function exchange<T, V extends string>(
  server: string,
  port: number,
  msg: Buffer,
  timeoutMs: number,
  judge: (m: Buffer) => Judgement<T, V>,
  counters: { received: number; accepted: number; foreign: number; malformed: number } & Record<V, number>,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const sock = createSocket("udp4");
    let done = false;
    const finish = (err: Error | null, value?: T) => {
      if (done) return;
      done = true;
      clearTimeout(t);
      sock.close();
      if (err) reject(err);
      else resolve(value as T);
    };
    const t = setTimeout(() => finish(new Error(`no answer from ${server}:${port} within ${timeoutMs} ms`)), timeoutMs);
    sock.on("message", (m, rinfo) => {
      if (done) return;
      counters.received++;
      if (rinfo.address !== server || rinfo.port !== port) {
        counters.foreign++;
        return;
      }
      let v: Judgement<T, V | "malformed">;
      try {
        v = judge(m);
      } catch {
        v = { verdict: "malformed" };
      }
      (counters as Record<string, number>)[v.verdict]!++;
      if (v.verdict === "accepted") finish(null, (v as { result: T }).result);
    });
    sock.on("error", (err) => finish(err));
    sock.send(msg, port, server, (err) => err && finish(err));
  });
}
