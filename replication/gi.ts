// What two nodes do when they connect, decided from their generation identifiers
// exactly as VOLUME-PROTOCOL.md tables it (first rule that matches wins), and how a
// split brain is resolved under each policy. Pure and symmetric: each side computes
// the same outcome from its own point of view.
import { randomBytes } from "node:crypto";
import type { GenIds, Hello, SplitBrainPolicy } from "./types.ts";

export type Side = "me" | "peer";

export type ConnectOutcome =
  | { readonly kind: "refuse"; readonly reason: string }
  | { readonly kind: "wait"; readonly reason: string }
  | { readonly kind: "no-sync"; readonly reason: string }
  | { readonly kind: "resync"; readonly source: Side; readonly full: boolean; readonly reason: string }
  | { readonly kind: "split-brain"; readonly victim: Side | null; readonly reason: string }
  | { readonly kind: "unrelated"; readonly reason: string };

/** A fresh random 64-bit generation identifier. */
export function newGenId(rand: () => Buffer = () => randomBytes(8)): string {
  let id = rand().toString("hex");
  if (/^0+$/.test(id)) id = "0000000000000001";
  return id;
}

const inHistory = (id: string, gi: GenIds) => id !== "" && gi.history.includes(id);

/** The rule table of VOLUME-PROTOCOL.md, from `me`'s side. */
export function decideConnect(me: Hello, peer: Hello, policy: SplitBrainPolicy): ConnectOutcome {
  if (me.sizeBytes !== peer.sizeBytes) return { kind: "refuse", reason: `volume sizes differ (${me.sizeBytes} vs ${peer.sizeBytes} bytes)` };
  if (me.role === "primary" && peer.role === "primary") return { kind: "split-brain", victim: null, reason: "both nodes are primary" };
  const a = me.gi;
  const b = peer.gi;
  if (a.current === "" && b.current === "") return { kind: "wait", reason: "brand-new pair: make one side primary (volume primary --force) to start the first sync" };
  if (a.current === "") return { kind: "resync", source: "peer", full: true, reason: "this side is new" };
  if (b.current === "") return { kind: "resync", source: "me", full: true, reason: "the peer is new" };
  if (a.current === b.current) {
    const dirty = me.changedBlocks > 0 || peer.changedBlocks > 0 || me.crashedPrimary || peer.crashedPrimary || me.disk === "inconsistent" || peer.disk === "inconsistent";
    if (!dirty) return { kind: "no-sync", reason: "same generation, nothing out of sync" };
    return { kind: "resync", source: sameGenerationSource(me, peer), full: false, reason: "same generation with blocks out of sync (unclean stop or interrupted resync)" };
  }
  if (a.bitmap !== "" && a.bitmap === b.current) return { kind: "resync", source: "me", full: false, reason: "this side moved on while the peer stayed" };
  if (b.bitmap !== "" && b.bitmap === a.current) return { kind: "resync", source: "peer", full: false, reason: "the peer moved on while this side stayed" };
  if (inHistory(a.current, b)) return { kind: "resync", source: "peer", full: true, reason: "the peer moved on more than once; this side's bitmap is too old" };
  if (inHistory(b.current, a)) return { kind: "resync", source: "me", full: true, reason: "this side moved on more than once; the peer's bitmap is too old" };
  if (a.bitmap !== "" && a.bitmap === b.bitmap) return { kind: "split-brain", victim: splitBrainVictim(me, peer, policy), reason: `both sides moved on from generation ${a.bitmap}` };
  return { kind: "unrelated", reason: `no common generation (${a.current} vs ${b.current})` };
}

/** With equal generations, the side whose data may be newer is the source. */
function sameGenerationSource(me: Hello, peer: Hello): Side {
  if (me.disk === "inconsistent" && peer.disk !== "inconsistent") return "peer";
  if (peer.disk === "inconsistent" && me.disk !== "inconsistent") return "me";
  if (me.crashedPrimary !== peer.crashedPrimary) return me.crashedPrimary ? "me" : "peer";
  if (me.role !== peer.role) return me.role === "primary" ? "me" : "peer";
  return me.nodeId < peer.nodeId ? "me" : "peer";
}

/** Which side loses (becomes the sync target) under POLICY, or null to stay disconnected. */
export function splitBrainVictim(me: Hello, peer: Hello, policy: SplitBrainPolicy): Side | null {
  const byId = (): Side => (me.nodeId > peer.nodeId ? "me" : "peer");
  const younger = (): Side | null => {
    const x = me.primarySinceMs ?? 0;
    const y = peer.primarySinceMs ?? 0;
    return x === y ? null : x > y ? "me" : "peer";
  };
  const least = (): Side => (me.changedBlocks === peer.changedBlocks ? (younger() ?? byId()) : me.changedBlocks < peer.changedBlocks ? "me" : "peer");
  let victim: Side | null;
  switch (policy) {
    case "disconnect":
      return null;
    case "discard-zero-changes":
      if (me.changedBlocks === 0 && peer.changedBlocks === 0) victim = me.role === peer.role ? byId() : me.role === "secondary" ? "me" : "peer";
      else if (me.changedBlocks === 0) victim = "me";
      else if (peer.changedBlocks === 0) victim = "peer";
      else return null;
      break;
    case "preserve":
      // The side that is active keeps serving; the other is copied, overwritten and
      // reconciled into it. With neither active, as discard-least-changes.
      victim = me.role !== peer.role ? (me.role === "secondary" ? "me" : "peer") : least();
      break;
    case "discard-least-changes":
      victim = least();
      break;
    case "discard-younger-primary":
      victim = younger() ?? byId();
      break;
  }
  // A primary cannot be overwritten under its file system: the operator must demote it.
  if ((victim === "me" ? me : peer).role === "primary") return null;
  return victim;
}
