// Heartbeat packets: JSON with the sender's identity, incarnation, sequence, time and
// state summary, authenticated with HMAC-SHA256 over a key file (32-byte MAC first,
// then the body). The receiver drops and counts forged (bad MAC or unparsable),
// foreign (wrong cluster or node), replayed (sequence not new on that link) and stale
// (older incarnation or timestamp far from ours) packets.
import { createHmac, timingSafeEqual } from "node:crypto";
import type { Summary } from "./machine.ts";

export const PACKET_MAX_BYTES = 1400;
const MAC_BYTES = 32;
/** How far a sender's clock may be from ours before its packets count as stale. */
export const CLOCK_SKEW_MAX_MS = 60_000;

export interface Heartbeat {
  readonly v: 1;
  readonly cluster: string;
  readonly node: string;
  /** Start time of the sender's daemon (ms): a restart gives a larger one. */
  readonly inc: number;
  readonly seq: number;
  readonly ts: number;
  readonly link: string;
  readonly summary: Summary;
}

export function encodeHeartbeat(hb: Heartbeat, key: Buffer): Buffer {
  const body = Buffer.from(JSON.stringify(hb));
  const mac = createHmac("sha256", key).update(body).digest();
  const pkt = Buffer.concat([mac, body]);
  if (pkt.length > PACKET_MAX_BYTES) throw new Error(`heartbeat of ${pkt.length} bytes exceeds ${PACKET_MAX_BYTES}`);
  return pkt;
}

export type Verdict = "ok" | "forged" | "foreign" | "replayed" | "stale";

export interface HeartbeatCounters {
  received: number;
  accepted: number;
  forged: number;
  foreign: number;
  replayed: number;
  stale: number;
}

/** Checks packets from the one expected peer; keeps the replay state per link. */
export class HeartbeatReceiver {
  readonly counters: HeartbeatCounters = { received: 0, accepted: 0, forged: 0, foreign: 0, replayed: 0, stale: 0 };
  private inc = 0;
  private readonly lastSeq = new Map<string, number>();
  private highestSeq = 0;

  constructor(
    private readonly key: Buffer,
    private readonly cluster: string,
    private readonly peer: string,
    private readonly seqWindow = 1000,
  ) {}

  accept(pkt: Buffer, nowMs: number): { verdict: Verdict; hb?: Heartbeat } {
    this.counters.received++;
    const v = this.check(pkt, nowMs);
    if (v.verdict === "ok") this.counters.accepted++;
    else this.counters[v.verdict]++;
    return v;
  }

  private check(pkt: Buffer, nowMs: number): { verdict: Verdict; hb?: Heartbeat } {
    if (pkt.length <= MAC_BYTES || pkt.length > PACKET_MAX_BYTES) return { verdict: "forged" };
    const mac = pkt.subarray(0, MAC_BYTES);
    const body = pkt.subarray(MAC_BYTES);
    const want = createHmac("sha256", this.key).update(body).digest();
    if (!timingSafeEqual(mac, want)) return { verdict: "forged" };
    let hb: Heartbeat;
    try {
      hb = JSON.parse(body.toString("utf8")) as Heartbeat;
    } catch {
      return { verdict: "forged" };
    }
    if (hb.v !== 1 || typeof hb.seq !== "number" || typeof hb.inc !== "number" || typeof hb.link !== "string" || !hb.summary) return { verdict: "forged" };
    if (hb.cluster !== this.cluster || hb.node !== this.peer) return { verdict: "foreign" };
    if (Math.abs(nowMs - hb.ts) > CLOCK_SKEW_MAX_MS) return { verdict: "stale" };
    if (hb.inc < this.inc) return { verdict: "stale" };
    if (hb.inc > this.inc) {
      this.inc = hb.inc;
      this.lastSeq.clear();
      this.highestSeq = 0;
    }
    const last = this.lastSeq.get(hb.link) ?? 0;
    if (hb.seq <= last || hb.seq < this.highestSeq - this.seqWindow) return { verdict: "replayed" };
    this.lastSeq.set(hb.link, hb.seq);
    this.highestSeq = Math.max(this.highestSeq, hb.seq);
    return { verdict: "ok", hb };
  }
}
