// An event log: each event is one JSON line appended to a file, logged, and written
// to every subscriber (a control-socket client streaming events).
import { appendFileSync } from "node:fs";
import type { Socket } from "node:net";
import type { Logger } from "pino";

export class EventLog {
  private readonly subscribers = new Set<Socket>();

  constructor(
    private readonly file: string,
    private readonly node: string,
    private readonly log: Logger,
    private readonly logKey: string,
  ) {}

  emit(ev: Record<string, unknown>): void {
    const line = JSON.stringify({ time: new Date().toISOString(), node: this.node, ...ev });
    appendFileSync(this.file, line + "\n");
    this.log.info({ [this.logKey]: ev }, String(ev.type));
    for (const s of this.subscribers) s.write(line + "\n");
  }

  subscribe(sock: Socket): void {
    this.subscribers.add(sock);
    sock.on("close", () => this.subscribers.delete(sock));
  }
}

/** Requests waiting for an answer from a state machine, by request id. */
export class Pending<R> {
  private readonly waiting = new Map<number, (r: R) => void>();
  private next = 1;

  /** A fresh request id and the promise of its answer. */
  open(): [number, Promise<R>] {
    const id = this.next++;
    return [id, new Promise<R>((resolve) => this.waiting.set(id, resolve))];
  }

  settle(id: number, r: R): void {
    const w = this.waiting.get(id);
    this.waiting.delete(id);
    w?.(r);
  }
}
