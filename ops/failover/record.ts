// What the failover test's clients did: one record per request (protocol, operation,
// start, end, outcome, the server that answered), kept in a bounded list, and the
// figures drawn from it: outages (from the first failed operation to the next
// successful one) and percentiles.
export type Proto = "smtp" | "imap" | "pop3";
export const PROTOS: readonly Proto[] = ["smtp", "imap", "pop3"];

export interface OpRecord {
  readonly proto: Proto;
  readonly op: string;
  readonly start: number;
  readonly end: number;
  readonly ok: boolean;
  readonly host?: string;
  readonly error?: string;
  /** The message's test id (SMTP sends). */
  readonly id?: string;
}

/** Enough for hours of traffic at the default rates; beyond it records are counted, not kept. */
const RECORDS_MAX = 200_000;

export class Recorder {
  readonly ops: OpRecord[] = [];
  dropped = 0;

  add(r: OpRecord): void {
    if (this.ops.length < RECORDS_MAX) this.ops.push(r);
    else this.dropped++;
  }

  /** Runs one client request and records it; failures are recorded and rethrown. */
  async time<T>(proto: Proto, op: string, host: string | undefined, fn: () => Promise<T>): Promise<T> {
    const start = Date.now();
    try {
      const v = await fn();
      this.add({ proto, op, start, end: Date.now(), ok: true, host });
      return v;
    } catch (err) {
      this.add({ proto, op, start, end: Date.now(), ok: false, host, error: (err as Error).message.split("\n")[0]!.slice(0, 200) });
      throw err;
    }
  }

  count(proto: Proto): { ops: number; failures: number } {
    const mine = this.ops.filter((o) => o.proto === proto);
    return { ops: mine.length, failures: mine.filter((o) => !o.ok).length };
  }
}

export interface Window {
  readonly from: number;
  readonly to: number;
}

/**
 * The outages one protocol's clients saw: each runs from the start of a failed
 * operation to the end of the next successful one (or to the end of the trial).
 */
export function outages(ops: readonly OpRecord[], proto: Proto, trialEnd: number): Window[] {
  const out: Window[] = [];
  let from: number | null = null;
  for (const o of ops.filter((x) => x.proto === proto).sort((a, b) => a.end - b.end)) {
    if (!o.ok) from = from === null ? o.start : Math.min(from, o.start);
    else if (from !== null) {
      out.push({ from, to: o.end });
      from = null;
    }
  }
  if (from !== null) out.push({ from, to: trialEnd });
  return out;
}

export function longest(ws: readonly Window[]): number {
  return ws.reduce((m, w) => Math.max(m, w.to - w.from), 0);
}

/** The p-th percentile (0..100) by nearest rank; null for no data. */
export function percentile(xs: readonly number[], p: number): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
}
