// Group commit for fsync: callers that ask for a durable directory (or file) while an
// fsync of it is already running wait for the next one, which covers all of them, so
// N concurrent deliveries into one Maildir cost about two fsyncs, not N. Bounded: at
// most one fsync in flight and one pending per path.
import { fsyncPathAsync } from "./fsutil.ts";

interface Slot {
  running: Promise<void> | null;
  next: Promise<void> | null;
}

export class GroupSync {
  private readonly slots = new Map<string, Slot>();

  /** Resolves once an fsync of PATH that started after this call has finished. */
  sync(path: string): Promise<void> {
    let s = this.slots.get(path);
    if (!s) {
      s = { running: null, next: null };
      this.slots.set(path, s);
    }
    const slot = s;
    if (!slot.running) {
      slot.running = this.fsyncOnce(path).finally(() => {
        slot.running = null;
        if (!slot.next) this.slots.delete(path);
      });
      return slot.running;
    }
    // One is running (it may have started before our change): queue exactly one more.
    slot.next ??= slot.running.then(() => {
      slot.next = null;
      return this.sync(path);
    });
    return slot.next;
  }

  private fsyncOnce(path: string): Promise<void> {
    return fsyncPathAsync(path);
  }
}
