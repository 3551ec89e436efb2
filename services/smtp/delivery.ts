// The one local delivery path of the active node: every message for local mailboxes
// (from port 25, submission, the peer's backup MX, this node's own spool, the outbound
// queue's bounces) is delivered here, all or nothing into the Maildirs (maildir.ts),
// journaled with every copy before the caller answers 250 (journal.ts), and delivered
// once only when it carries a backup MX queue id (delivered-index.ts). Mail from outside
// is classified on the way (a DeliveryFilter: the spam filter's fields and folder per
// mailbox, what it learned journaled with the copy and applied after the journal).
// Known gap: a journal line whose fsync reported an error may still reach the disk. It
// then names a copy that was taken back out of new/; if it carries a backup MX queue
// id, the delivered index read at the next start counts that message as delivered and
// drops a later forward of it (a double fault: the error, and the data persisting anyway).
import type { Readable } from "node:stream";
import type { Logger } from "pino";
import type { DeliveredIndex } from "./delivered-index.ts";
import { DirSyncError, type Journal } from "./journal.ts";
import { deliver, type Delivered, type MailboxPlan } from "./maildir.ts";

/** One mailbox's plan from the filter, and what its classification learned (to journal, then apply). */
export interface FilterPlan extends MailboxPlan {
  readonly spam?: { readonly user: string; readonly deltas: readonly object[]; readonly counted?: object };
}

/** The spam filter as the delivery path sees it (services/spam/at-delivery.ts). */
export interface DeliveryFilter {
  /** Plans MAILBOXES from HEAD (bounded in time; never rejects: a failure plans them unfiltered). */
  plan(head: Buffer, whole: boolean, mailboxes: readonly string[], session?: string): Promise<FilterPlan[]>;
  /** Journals what PLANS learned (the change journal, durable when it resolves); runs beside the delivery journal. */
  journal(plans: readonly FilterPlan[]): Promise<void>;
  /** Applies what PLANS learned, once journaled (never rejects; a failure is logged). */
  learn(plans: readonly FilterPlan[], session?: string): Promise<void>;
}

export interface LocalDeliveryExtra {
  /** The backup MX's queue id, when the message came through one. */
  readonly peerQueueId?: string;
  readonly session?: string;
  /** Classify it (mail from outside): the filter's fields and folder per mailbox. */
  readonly filter?: boolean;
}

export interface DeliveryPathOptions {
  readonly mailRoot: string;
  readonly uid: number;
  readonly gid: number;
  readonly sizeMax: number;
  readonly journal: Pick<Journal, "append">;
  readonly delivered: Pick<DeliveredIndex, "claim" | "release" | "remaining" | "record">;
  readonly log: Logger;
  /** The spam filter (null: none, every message delivered as it is). */
  readonly filter?: DeliveryFilter | null;
}

export interface DeliveryPath {
  /**
   * MAILBOXES get the message all or nothing, and every copy is journaled (with
   * PEERQUEUEID, the backup MX's queue id, when it came through one) before this resolves.
   */
  deliverLocal(input: Readable, mailboxes: readonly string[], headers: string, extra?: LocalDeliveryExtra): Promise<Delivered>;
  /**
   * Runs DELIVERTO for the backup MX's message QUEUEID to the MAILBOXES it has not reached
   * yet, or returns "duplicate" when it reached them all; "busy" while another delivery
   * of the same message runs (the caller answers 4xx or keeps it for later).
   */
  oncePerQueueId(queueId: string, mailboxes: readonly string[], deliverTo: (todo: string[]) => Promise<unknown>): Promise<"delivered" | "duplicate" | "busy">;
}

export function deliveryPath(o: DeliveryPathOptions): DeliveryPath {
  return {
    async deliverLocal(input, mailboxes, headers, extra = {}) {
      const { peerQueueId, session } = extra;
      const filter = extra.filter ? (o.filter ?? null) : null;
      let plans: FilterPlan[] | null = null;
      const planner = filter
        ? async (head: Buffer, whole: boolean) => {
            plans = await filter.plan(head, whole, mailboxes, session);
            return plans;
          }
        : undefined;
      // The journal round also syncs the new/ directories. Either failing fails the
      // delivery: deliver() takes the copies out of new/ again, the client gets a 4xx and
      // sends the message again (a 250 promises the journal line, README "Guarantees").
      const record = (d: Delivered, newDirs: readonly string[]) =>
        o.journal
          .append(
            d.copies.map((c, i) => ({ mailbox: mailboxes[i]!, file: c.file.slice(o.mailRoot.length + 1), sha256: c.sha256, size: c.size, ...(peerQueueId ? { peerQueueId } : {}) })),
            newDirs,
          )
          .catch((err: Error) => {
            o.log.error({ err, session, peerQueueId, dirs: err instanceof DirSyncError }, "the delivery journal failed; the delivery is undone and refused (4xx)");
            throw err;
          });
      // What the filter learned goes into the change journal in the same round (it is
      // not mail: its failure does not fail the delivery, it only keeps it from being
      // applied); applied once both are durable. The delivery line is written first: the
      // change journal's fsync commits the file system's running transaction, and the
      // Maildir rename in it should not become durable without its line (a file no
      // journal names, found by the other node after a split brain).
      let learned = false;
      const durable = async (d: Delivered, newDirs: readonly string[]) => {
        const recorded = record(d, newDirs);
        const spam = filter && plans?.some((p) => p.spam) ? filter.journal(plans).then(() => true, (err: Error) => (o.log.warn({ err, session }, "spam filter: what a delivery learned could not be journaled; not applied"), false)) : Promise.resolve(false);
        try {
          await recorded;
        } finally {
          learned = await spam;
        }
      };
      const d = await deliver(input, mailboxes, { mailRoot: o.mailRoot, uid: o.uid, gid: o.gid, headers, sizeMax: o.sizeMax }, durable, planner);
      if (peerQueueId) o.delivered.record(peerQueueId, mailboxes);
      if (filter && plans && learned) await filter.learn(plans, session);
      return d;
    },
    async oncePerQueueId(queueId, mailboxes, deliverTo) {
      if (!o.delivered.claim(queueId)) return "busy";
      try {
        const todo = await o.delivered.remaining(queueId, mailboxes);
        if (!todo.length) return "duplicate";
        await deliverTo(todo);
        return "delivered";
      } finally {
        o.delivered.release(queueId);
      }
    },
  };
}
