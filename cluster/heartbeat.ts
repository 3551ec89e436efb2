// Heartbeat packets: JSON with the sender's identity, incarnation, sequence, time and
// state summary, authenticated with HMAC-SHA256 over a key file (32-byte MAC first,
// then the body). The receiver drops and counts forged (bad MAC, unparsable, or not
// shaped like a heartbeat), foreign (wrong cluster or node), replayed (sequence not new
// on that link) and stale (older incarnation, or a timestamp more than AGE_DEADTIMES
// deadtimes from our clock: held back on the path, or a clock that is off) packets.
// One sequence numbers each round of packets, the same on every link: a packet keeps
// its link alive, but its summary replaces the peer's only if no later round has been
// heard on any link, so a late packet on one link never rolls the peer's view back.
// Known gap: the age bound needs the two clocks within AGE_DEADTIMES x deadtime of
// each other (NTP); a larger skew makes every packet stale and the peer looks dead.
import { createHmac, timingSafeEqual } from "node:crypto";
import type { NodeState, Summary } from "./machine.ts";

export const PACKET_MAX_BYTES = 1400;
const MAC_BYTES = 32;
/** How many deadtimes a packet's timestamp may be from our clock before it counts as stale. */
export const AGE_DEADTIMES = 4;
/** Links one peer may send on; a packet naming one more is foreign. */
const LINKS_MAX = 8;
const NODE_STATES: readonly NodeState[] = ["starting", "passive", "requesting", "activating", "active", "deactivating", "standby", "failed", "stop-failed"];

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

/**
 * The verdict on one packet. An accepted packet's SUMMARY is its summary when it is the
 * newest heard on any link, null when a later round has already been taken.
 */
export type Received = { readonly verdict: Exclude<Verdict, "ok">; readonly hb?: undefined; readonly summary?: undefined } | { readonly verdict: "ok"; readonly hb: Heartbeat; readonly summary: Summary | null };

function wellFormed(hb: unknown): hb is Heartbeat {
  if (typeof hb !== "object" || hb === null) return false;
  const h = hb as Record<string, unknown>;
  const s = h.summary as Record<string, unknown> | null | undefined;
  return (
    h.v === 1 &&
    Number.isSafeInteger(h.seq) && (h.seq as number) > 0 &&
    Number.isSafeInteger(h.inc) &&
    Number.isFinite(h.ts) &&
    typeof h.link === "string" && h.link.length <= 64 &&
    typeof s === "object" && s !== null && NODE_STATES.includes(s.state as NodeState)
  );
}

/** Checks packets from the one expected peer; keeps the replay state per link. */
export class HeartbeatReceiver {
  readonly counters: HeartbeatCounters = { received: 0, accepted: 0, forged: 0, foreign: 0, replayed: 0, stale: 0 };
  private inc = 0;
  /** Last sequence per link, for at most LINKS_MAX links. */
  private readonly lastSeq = new Map<string, number>();
  private highestSeq = 0;
  private readonly ageMaxMs: number;
  private readonly seqWindow: number;

  constructor(
    private readonly key: Buffer,
    private readonly cluster: string,
    private readonly peer: string,
    o: { readonly deadtimeMs: number; readonly seqWindow?: number } = { deadtimeMs: 2000 },
  ) {
    this.ageMaxMs = AGE_DEADTIMES * o.deadtimeMs;
    this.seqWindow = o.seqWindow ?? 1000;
  }

  accept(pkt: Buffer, nowMs: number): Received {
    this.counters.received++;
    const v = this.check(pkt, nowMs);
    if (v.verdict === "ok") this.counters.accepted++;
    else this.counters[v.verdict]++;
    return v;
  }

  private check(pkt: Buffer, nowMs: number): Received {
    if (pkt.length <= MAC_BYTES || pkt.length > PACKET_MAX_BYTES) return { verdict: "forged" };
    const mac = pkt.subarray(0, MAC_BYTES);
    const body = pkt.subarray(MAC_BYTES);
    const want = createHmac("sha256", this.key).update(body).digest();
    if (!timingSafeEqual(mac, want)) return { verdict: "forged" };
    let hb: unknown;
    try {
      hb = JSON.parse(body.toString("utf8"));
    } catch {
      return { verdict: "forged" };
    }
    if (!wellFormed(hb)) return { verdict: "forged" };
    if (hb.cluster !== this.cluster || hb.node !== this.peer) return { verdict: "foreign" };
    if (Math.abs(nowMs - hb.ts) > this.ageMaxMs) return { verdict: "stale" };
    if (hb.inc < this.inc) return { verdict: "stale" };
    if (hb.inc > this.inc) {
      this.inc = hb.inc;
      this.lastSeq.clear();
      this.highestSeq = 0;
    }
    const last = this.lastSeq.get(hb.link) ?? 0;
    if (hb.seq <= last || hb.seq < this.highestSeq - this.seqWindow) return { verdict: "replayed" };
    if (last === 0 && this.lastSeq.size >= LINKS_MAX) return { verdict: "foreign" };
    this.lastSeq.set(hb.link, hb.seq);
    const newest = hb.seq >= this.highestSeq;
    this.highestSeq = Math.max(this.highestSeq, hb.seq);
    return { verdict: "ok", hb, summary: newest ? hb.summary : null };
  }
}
