// Latency figures for `volume status`: a bounded ring of the most recent samples per
// operation (application writes, flushes, local syncs), summarised as count, p50, p99
// and max in microseconds. Lets an operator see where a slow fsync spends its time.
const RING = 4096;

export interface LatencySummary {
  readonly count: number;
  readonly p50Us: number;
  readonly p99Us: number;
  readonly maxUs: number;
}

export class Latency {
  private readonly ring = new Float64Array(RING);
  private n = 0;

  /** Records one sample, measured from START (process.hrtime.bigint()). */
  since(start: bigint): void {
    this.add(Number(process.hrtime.bigint() - start) / 1000);
  }

  add(us: number): void {
    this.ring[this.n % RING] = us;
    this.n++;
  }

  summary(): LatencySummary {
    const k = Math.min(this.n, RING);
    if (k === 0) return { count: 0, p50Us: 0, p99Us: 0, maxUs: 0 };
    const s = Array.from(this.ring.subarray(0, k)).sort((x, y) => x - y);
    const at = (q: number) => Math.round(s[Math.min(k - 1, Math.floor(q * k))]!);
    return { count: this.n, p50Us: at(0.5), p99Us: at(0.99), maxUs: Math.round(s[k - 1]!) };
  }
}
