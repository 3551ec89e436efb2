// The vocabulary of the replicated volume: its three small state enumerations (as
// DRBD has), generation identifiers, persisted metadata, and the messages two engines
// exchange. Shared by the pure protocol core, the file store and the transport.

export type Role = "primary" | "secondary";
export type ConnState = "standalone" | "connecting" | "connected" | "sync-source" | "sync-target" | "verifying";
export type DiskState = "uptodate" | "consistent" | "outdated" | "inconsistent" | "diskless" | "unknown";
export type Protocol = "A" | "C";
export type SplitBrainPolicy = "disconnect" | "discard-zero-changes" | "discard-least-changes" | "discard-younger-primary" | "preserve";

export const BLOCK_SIZE = 4096;
/** Activity-log extent: 4 MiB = 1024 blocks. */
export const EXTENT_BLOCKS = 1024;
export const EXTENT_BYTES = EXTENT_BLOCKS * BLOCK_SIZE;
/** Blocks one `bitmap` message covers at most: 32 GiB of volume, 1 MiB of raw bits. */
export const BITMAP_CHUNK_BLOCKS = 8 * 1024 * 1024;

/** Generation identifiers: 16 hex digits each; "" means empty. */
export interface GenIds {
  readonly current: string;
  readonly bitmap: string;
  readonly history: readonly [string, string];
}

export const EMPTY_GI: GenIds = { current: "", bitmap: "", history: ["", ""] };

/**
 * A durable copy of this side (image, metadata, bitmap) made before it was overwritten
 * by a resync, for the reconciler. Removed only by the operator (`volume preserved
 * drop`), and only with --force while `reconciled` is not set.
 */
export interface PreservedCopy {
  readonly path: string;
  readonly atMs: number;
  /** This side's generations when the copy was made: it holds generation `gi.current`. */
  readonly gi: GenIds;
  readonly changedBlocks: number;
  readonly reason: string;
  /** How the image was copied: a reflink (instant, shares blocks) or a sparse copy. */
  readonly method?: "reflink" | "copy";
  /** Bytes the copy takes on this node's disk. */
  readonly diskBytes?: number;
  /** Set by the reconciler once every change in the copy is merged into the survivor. */
  reconciledAtMs?: number | null;
}

/** What each node persists about its volume (besides the image and the bitmap). */
export interface Meta {
  readonly version: 1;
  readonly nodeId: string;
  readonly sizeBytes: number;
  readonly blockSize: number;
  gi: GenIds;
  disk: DiskState;
  /** The role when this was last written. */
  role: Role;
  /** Wall-clock ms when it last became primary (discard-younger-primary). */
  primarySinceMs: number | null;
  /** Nothing has been written since `volume create`: the image is all zeros. */
  fresh: boolean;
  /** False from promotion until a clean demotion: a primary that crashed. */
  cleanShutdown: boolean;
  /** Set at start after an unclean stop as primary; cleared when in sync with the peer again. */
  crashedPrimary: boolean;
  /** The peer's disk is known to be outdated (set by fencing). */
  peerOutdated: boolean;
  preserved: PreservedCopy[];
}

/** A node's side of the connection handshake. */
export interface Hello {
  readonly t: "hello";
  readonly nodeId: string;
  readonly sizeBytes: number;
  readonly gi: GenIds;
  readonly disk: DiskState;
  readonly role: Role;
  readonly fresh: boolean;
  readonly crashedPrimary: boolean;
  readonly primarySinceMs: number | null;
  /** Blocks set in the bitmap: changes since the peer was last in sync, and the
   *  activity-log extents of a primary that crashed. */
  readonly changedBlocks: number;
  /**
   * How many `bitmap` messages follow this hello: the bitmap in chunks of
   * BITMAP_CHUNK_BLOCKS blocks (wire.ts), those with no bit set left out, so that the
   * handshake of any volume size fits in frames.
   */
  readonly bitmapChunks: number;
  /** The operator's split-brain resolution: keep this side's data, or the peer's. */
  readonly resolve: "local" | "peer" | null;
}

export type Msg =
  | Hello
  /** Part of the sender's bitmap, after its hello: blocks [first, first+blocks), as raw bits or runs of set bits (base64). */
  | { readonly t: "bitmap"; readonly first: number; readonly blocks: number; readonly encoding: "raw" | "runs"; readonly data: string }
  | { readonly t: "data"; readonly seq: number; readonly offset: number; readonly data: Buffer }
  | { readonly t: "barrier"; readonly seq: number }
  | { readonly t: "barrier-ack"; readonly seq: number }
  | { readonly t: "state"; readonly role: Role; readonly disk: DiskState }
  | { readonly t: "role-request" }
  | { readonly t: "role-reply"; readonly granted: boolean; readonly reason: string }
  | { readonly t: "resync-data"; readonly offset: number; readonly data: Buffer }
  | { readonly t: "resync-barrier"; readonly count: number }
  | { readonly t: "resync-ack"; readonly count: number }
  | { readonly t: "resync-end"; readonly current: string }
  | { readonly t: "resync-done"; readonly current: string }
  | { readonly t: "verify-start" }
  | { readonly t: "verify-req"; readonly extent: number }
  | { readonly t: "verify-res"; readonly extent: number; readonly hash: string }
  | { readonly t: "verify-end"; readonly mismatched: readonly number[] };

export type MsgType = Msg["t"];
