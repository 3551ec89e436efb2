// The data of a reconciliation after a split brain: each side's mail and account state,
// the change-journal events each side wrote since the split, the operations a plan asks
// the survivor to apply, and the report that explains them. Types only, all of them
// JSON-serialisable, so that a plan can be stored, shown (`--dry-run`) and queued (the
// BullMQ job id is the operation id).
import type { Hlc } from "../common/hlc.ts";

export type Scalar = string | number | null;
export type Json = Scalar | boolean | readonly Json[] | { readonly [key: string]: Json };

/** The victim's preserved copy (read only), or the survivor that kept serving. */
export type Side = "victim" | "survivor";

// ---------------------------------------------------------------- state

export interface MessageState {
  readonly sha256: string;
  /** System flags ("\\Seen") and keywords ("$Junk"). */
  readonly flags: readonly string[];
  readonly uid?: number;
  /** The SMTP or backup-MX queue id the message was delivered with, when known. */
  readonly queueId?: string;
  /** Its Message-ID header field (angle brackets kept), when it has one. */
  readonly messageId?: string;
}

export interface MailboxState {
  readonly name: string;
  readonly uidValidity?: number;
  /** Maildir base name (the part before ":2,") -> message. */
  readonly messages: Readonly<Record<string, MessageState>>;
}

export interface UserMailState {
  /** Dovecot mailbox GUID -> mailbox. */
  readonly mailboxes: Readonly<Record<string, MailboxState>>;
  readonly subscriptions: readonly string[];
}

export const ACCOUNT_TABLES = ["domains", "users", "aliases"] as const;
export type AccountTable = (typeof ACCOUNT_TABLES)[number];
export type AccountRow = Readonly<Record<string, Scalar>>;

export interface SideState {
  /** Address -> that user's mail. */
  readonly mail: Readonly<Record<string, UserMailState>>;
  /** Table -> row key (the address for users, the name for domains) -> columns. */
  readonly accounts: Readonly<Record<AccountTable, Readonly<Record<string, AccountRow>>>>;
}

// ---------------------------------------------------------------- journal events

export interface EventBase {
  /** Unique on its side: node:epoch:seq. */
  readonly id: string;
  readonly hlc: Hlc;
  /**
   * Set (to the operation id) on the events the reconcile worker itself causes on the
   * survivor; the planner skips them and sees their effect in the survivor's state.
   */
  readonly origin?: string;
}

/** A new message: an SMTP delivery, or an IMAP APPEND (Sent, Drafts). */
export interface NewMessageEvent extends EventBase {
  readonly kind: "delivery" | "append";
  readonly user: string;
  readonly mailbox: string;
  readonly key: string;
  readonly sha256: string;
  readonly queueId?: string;
  readonly flags: readonly string[];
}

/** Flags added to and removed from one message (`key` in `mailbox`, a GUID). */
export interface FlagChange {
  readonly user: string;
  readonly mailbox: string;
  readonly key: string;
  readonly add: readonly string[];
  readonly remove: readonly string[];
}

export interface FlagsEvent extends EventBase, FlagChange {
  readonly kind: "flags";
}

export interface ExpungeEvent extends EventBase {
  readonly kind: "expunge";
  readonly user: string;
  readonly mailbox: string;
  readonly key: string;
}

/** `key` in `from`; the copy or the moved message is `newKey` in `to`. */
export interface CopyMoveEvent extends EventBase {
  readonly kind: "copy" | "move";
  readonly user: string;
  readonly from: string;
  readonly to: string;
  readonly key: string;
  readonly newKey: string;
  readonly sha256: string;
  /** The flags the copy was made with (a copy takes the source's flags). */
  readonly flags?: readonly string[];
}

export interface MailboxCreateEvent extends EventBase {
  readonly kind: "mailbox-create" | "mailbox-rename";
  readonly user: string;
  readonly guid: string;
  readonly name: string;
}

/**
 * A deleted folder. Dovecot expunges a folder's messages before it deletes it; the
 * journal records those expunges first, so the merge knows which messages the delete took.
 */
export interface MailboxDeleteEvent extends EventBase {
  readonly kind: "mailbox-delete";
  readonly user: string;
  readonly guid: string;
}

export interface SubscriptionEvent extends EventBase {
  readonly kind: "subscribe" | "unsubscribe";
  readonly user: string;
  readonly name: string;
}

/** A database write: the columns it set (all of them for an insert), or a delete. */
export interface AccountEvent extends EventBase {
  readonly kind: "account";
  readonly table: AccountTable;
  readonly key: string;
  readonly columns: Readonly<Record<string, Scalar>>;
  readonly deleted?: true;
}

export type MailEvent = NewMessageEvent | FlagsEvent | ExpungeEvent | CopyMoveEvent | MailboxCreateEvent | MailboxDeleteEvent | SubscriptionEvent;
export type BuiltinEvent = MailEvent | AccountEvent;

/** An event of a kind the core does not know (spam token deltas, ...): planned by a registered handler. */
export interface OtherEvent extends EventBase {
  readonly kind: string;
  readonly payload?: Json;
}

export type JournalEvent = BuiltinEvent | OtherEvent;

// ---------------------------------------------------------------- operations

/** A message file in one side's copy. */
export interface MessageRef {
  readonly user: string;
  readonly mailbox: string;
  readonly key: string;
}

interface OpBase {
  /** Deterministic: the same inputs give the same id (no ':' and never all digits, as BullMQ wants). */
  readonly id: string;
}

export interface AccountSetOp extends OpBase {
  readonly op: "account-set";
  readonly table: AccountTable;
  readonly key: string;
  /** The columns to write; all of them when `create`. */
  readonly columns: Readonly<Record<string, Scalar>>;
  readonly create: boolean;
}
export interface AccountDeleteOp extends OpBase {
  readonly op: "account-delete";
  readonly table: AccountTable;
  readonly key: string;
}
export interface MailboxCreateOp extends OpBase {
  readonly op: "mailbox-create";
  readonly user: string;
  /** Created with this GUID (`doveadm mailbox create -g`): a folder that comes back keeps its identity. */
  readonly guid: string;
  readonly name: string;
}
export interface MailboxRenameOp extends OpBase {
  readonly op: "mailbox-rename";
  readonly user: string;
  readonly guid: string;
  readonly from: string;
  readonly name: string;
}
export interface MailboxDeleteOp extends OpBase {
  readonly op: "mailbox-delete";
  readonly user: string;
  readonly guid: string;
  readonly name: string;
}
export interface SubscribeOp extends OpBase {
  readonly op: "subscribe";
  readonly user: string;
  readonly name: string;
  readonly subscribed: boolean;
}
export interface SetFlagsOp extends OpBase, FlagChange {
  readonly op: "set-flags";
}
export interface MoveOp extends OpBase {
  readonly op: "move";
  readonly user: string;
  readonly from: string;
  readonly to: string;
  readonly key: string;
  readonly sha256: string;
}
/**
 * Copy the file `source` from the victim's copy and APPEND it through Dovecot into
 * `mailbox` with `flags` (a new UID on the survivor). `add-message`: a message the
 * survivor never had; `restore-message`: one the survivor had and lost (expunged there,
 * and a later change on the victim keeps it).
 */
export interface AddMessageOp extends OpBase {
  readonly op: "add-message" | "restore-message";
  readonly user: string;
  readonly mailbox: string;
  readonly source: MessageRef;
  readonly sha256: string;
  readonly flags: readonly string[];
  readonly queueId?: string;
}
export interface ExpungeOp extends OpBase {
  readonly op: "expunge";
  readonly user: string;
  readonly mailbox: string;
  readonly key: string;
  readonly sha256: string;
}
export interface ExtensionOp extends OpBase {
  readonly op: "extension";
  readonly kind: string;
  /** The victim events it came from. */
  readonly sources: readonly string[];
  readonly payload: Json;
}

export type Operation =
  | AccountSetOp
  | AccountDeleteOp
  | MailboxCreateOp
  | MailboxRenameOp
  | MailboxDeleteOp
  | SubscribeOp
  | SetFlagsOp
  | MoveOp
  | AddMessageOp
  | ExpungeOp
  | ExtensionOp;
export type OpKind = Operation["op"];

// ---------------------------------------------------------------- report

/**
 * conflict: both sides changed the same thing, a rule chose; removed: the merge takes
 * something away on the survivor; not-carried-over: the victim has it, the survivor will
 * not; redirected: it goes elsewhere (lost+found); skipped / stranded: not applied, with
 * the reason (stranded makes the plan incomplete); note: worth knowing, nothing lost.
 */
export type EntryOutcome = "conflict" | "removed" | "not-carried-over" | "redirected" | "skipped" | "stranded" | "note";

export interface ReportEntry {
  /** `table/row` of the decision table that decided. */
  readonly rule: string;
  readonly outcome: EntryOutcome;
  /** In plain words, for the operator. */
  readonly says: string;
  readonly user?: string;
  readonly mailbox?: string;
  readonly name?: string;
  readonly key?: string;
  readonly sha256?: string;
  readonly queueId?: string;
  readonly flag?: string;
  readonly table?: AccountTable;
  readonly row?: string;
  readonly column?: string;
  readonly victimEvents: readonly string[];
  readonly survivorEvents: readonly string[];
}

export interface Report {
  /** False when something could not be planned (an unknown event kind, mail with nowhere to go). */
  readonly complete: boolean;
  /** Events per kind, on each side. */
  readonly events: Readonly<Record<string, { readonly victim: number; readonly survivor: number }>>;
  /** Operations per kind. */
  readonly ops: Readonly<Record<string, number>>;
  /** User -> mailbox name on the survivor -> operations per kind. */
  readonly mailboxes: Readonly<Record<string, Readonly<Record<string, Readonly<Record<string, number>>>>>>;
  readonly entries: readonly ReportEntry[];
}

export interface Plan {
  /** In the order they must be applied. */
  readonly ops: readonly Operation[];
  readonly report: Report;
}

// ---------------------------------------------------------------- input, extension kinds

export interface MergeInput {
  readonly survivor: SideState;
  readonly victim: SideState;
  readonly victimEvents: readonly JournalEvent[];
  readonly survivorEvents: readonly JournalEvent[];
}

export interface KindContext {
  /** This kind's events, each side sorted by clock. */
  readonly victim: readonly OtherEvent[];
  readonly survivor: readonly OtherEvent[];
  readonly victimState: SideState;
  readonly survivorState: SideState;
}

/** One operation a handler wants: the victim events it came from name it (its id). */
export interface KindStep {
  readonly sources: readonly string[];
  readonly payload: Json;
}

export interface KindHandler {
  /** Pure: the operations for the survivor from both sides' events of the kind. */
  plan(ctx: KindContext): readonly KindStep[];
}

export type KindRegistry = ReadonlyMap<string, KindHandler>;

export interface MergeOptions {
  readonly kinds?: KindRegistry;
  /**
   * Where mail for a user who does not exist after the merge goes: a folder
   * `Recovered/<address>` of this user (the postmaster). Without it, or if that user
   * does not exist either, such mail is stranded (reported, the plan incomplete).
   */
  readonly lostFound?: { readonly user: string };
}
