// Hybrid logical clocks (Kulkarni et al.): a timestamp that follows wall time but
// never goes backwards on one node and always moves past any stamp the node has seen,
// so that two nodes' changes can be ordered after a split brain. A stamp is a string
// that sorts correctly as a string: 13 digits of wall ms, 5 digits of counter, node id.
//
// Bounds: the counter has 5 digits; when it would overflow within one millisecond the
// clock moves its wall part forward by one ms (never more than a stated drift above the
// real clock: `HLC_DRIFT_MAX_MS`, beyond which a stamp received from a peer is refused).

export type Hlc = string;

export const HLC_DRIFT_MAX_MS = 60_000;
const COUNTER_MAX = 99_999;

export interface HlcParts {
  readonly wallMs: number;
  readonly counter: number;
  readonly node: string;
}

const NODE_RE = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const HLC_RE = /^(\d{13})-(\d{5})-([a-z0-9][a-z0-9_-]{0,31})$/;

export function formatHlc(p: HlcParts): Hlc {
  if (!Number.isInteger(p.wallMs) || p.wallMs < 0 || p.wallMs > 9_999_999_999_999) throw new Error(`hlc: wall time out of range: ${p.wallMs}`);
  if (!Number.isInteger(p.counter) || p.counter < 0 || p.counter > COUNTER_MAX) throw new Error(`hlc: counter out of range: ${p.counter}`);
  if (!NODE_RE.test(p.node)) throw new Error(`hlc: bad node id "${p.node}"`);
  return `${String(p.wallMs).padStart(13, "0")}-${String(p.counter).padStart(5, "0")}-${p.node}`;
}

/** Parses a stamp; throws with the reason on anything malformed. */
export function parseHlc(s: string): HlcParts {
  const m = HLC_RE.exec(s);
  if (!m) throw new Error(`hlc: malformed stamp "${s.slice(0, 80)}"`);
  return { wallMs: Number(m[1]), counter: Number(m[2]), node: m[3]! };
}

export function isHlc(s: unknown): s is Hlc {
  return typeof s === "string" && HLC_RE.test(s);
}

/** Total order: wall time, then counter, then node id (ties between nodes are broken by id). */
export function compareHlc(a: Hlc, b: Hlc): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

export function maxHlc(a: Hlc, b: Hlc): Hlc {
  return compareHlc(a, b) >= 0 ? a : b;
}

/** One node's clock. `now` is injected so tests and simulations control time. */
export class HlcClock {
  private wallMs = 0;
  private counter = 0;

  constructor(
    readonly node: string,
    private readonly now: () => number = Date.now,
    last?: Hlc,
  ) {
    if (!NODE_RE.test(node)) throw new Error(`hlc: bad node id "${node}"`);
    // This node's own last stamp is never refused: stamps must not go backwards even
    // when the wall clock was set back while the node was down.
    if (last !== undefined) this.advancePast(parseHlc(last));
  }

  /** A stamp for a local event, greater than every stamp made or observed before. */
  tick(): Hlc {
    const pt = this.now();
    if (pt > this.wallMs) {
      this.wallMs = pt;
      this.counter = 0;
    } else this.bump();
    return formatHlc({ wallMs: this.wallMs, counter: this.counter, node: this.node });
  }

  /**
   * Moves the clock past a stamp seen from elsewhere (a peer's journal, a restart's
   * last entry). A stamp more than HLC_DRIFT_MAX_MS ahead of the local clock is refused
   * (returns false) so that one bad clock cannot drag every later stamp into the future.
   */
  observe(stamp: Hlc): boolean {
    const p = parseHlc(stamp);
    if (p.wallMs > this.now() + HLC_DRIFT_MAX_MS) return false;
    this.advancePast(p);
    return true;
  }

  private advancePast(p: HlcParts): void {
    if (p.wallMs > this.wallMs) {
      this.wallMs = p.wallMs;
      this.counter = p.counter;
    } else if (p.wallMs === this.wallMs && p.counter > this.counter) this.counter = p.counter;
  }

  private bump(): void {
    if (this.counter < COUNTER_MAX) this.counter++;
    else {
      this.wallMs++;
      this.counter = 0;
    }
  }
}
