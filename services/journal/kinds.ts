// The kinds of change this repository journals, each registered with the zod schema of
// its payload (the fields besides id, node, epoch, seq, hlc, kind). The reconciler
// reads the same schemas; a later source (the spam filter's token deltas) registers its
// own kind in its own module the same way, and nothing here changes.
import { z } from "zod";
import { registerKind } from "./changes.ts";

const guid = z.string().regex(/^[0-9a-f]{32}$/).nullable();
const user = z.string().min(3).max(320);
const name = z.string().min(1).max(1024);
const flag = z.string().min(1).max(256);

/**
 * One message in one mailbox. `mailbox` is the folder's GUID from dovecot-uidlist (null
 * only for a folder Dovecot never opened: no IMAP or POP3 change can come from there),
 * `name` its IMAP name (UTF-8, `/` between levels: `INBOX`, `Sent`, `Projects/2026`),
 * `key` the Maildir file name up to `:2,` (the same on both sides, and kept by Dovecot's
 * hard-linked copies and moves), `uid` the IMAP UID when dovecot-uidlist has it.
 */
const messageFields = {
  user,
  mailbox: guid,
  name,
  key: z.string().min(1).max(255),
  uid: z.number().int().positive().nullable(),
};

export const flagsKind = z.strictObject({
  ...messageFields,
  add: z.array(flag),
  remove: z.array(flag),
  /** The whole set after the change. */
  flags: z.array(flag),
});
export const expungeKind = z.strictObject(messageFields);
export const appendKind = z.strictObject({
  ...messageFields,
  flags: z.array(flag),
  size: z.number().int().nonnegative(),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
});
/** `key` in folder `from` (GUID); the copy, or the moved message, is `newKey` in `to`. */
export const copyKind = z.strictObject({
  user,
  from: guid,
  fromName: name,
  fromUid: z.number().int().positive().nullable(),
  key: z.string().min(1).max(255),
  to: guid,
  toName: name,
  newKey: z.string().min(1).max(255),
  uid: z.number().int().positive().nullable(),
  flags: z.array(flag),
  size: z.number().int().nonnegative(),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
});
export const mailboxCreateKind = z.strictObject({ user, guid, name });
/** `from` the old name, `name` the new one (a folder's children are renamed each in its own entry). */
export const mailboxRenameKind = z.strictObject({ user, guid, from: name, name });
export const mailboxDeleteKind = z.strictObject({ user, guid, name });
export const subscribeKind = z.strictObject({ user, name });

const column = z.union([z.string().max(1024), z.number(), z.null()]);
export const accountKind = z.strictObject({
  table: z.enum(["users", "aliases", "domains"]),
  /** users: the address; aliases: "SOURCE DESTINATION"; domains: the name. */
  key: z.string().min(1).max(700),
  /** The changed columns with their new values (a password only as its hash). */
  columns: z.record(z.string(), column),
  deleted: z.literal(true).optional(),
});

/** SMTP's own lines (services/smtp/journal.ts writes them; listed for readers). */
export const deliveryKind = z.looseObject({
  ts: z.string(),
  mailbox: z.string(),
  file: z.string(),
  sha256: z.string(),
  size: z.number(),
});

export const MAIL_KINDS = ["flags", "expunge", "append", "copy", "move", "mailbox-create", "mailbox-rename", "mailbox-delete", "subscribe", "unsubscribe"] as const;
export type MailKind = (typeof MAIL_KINDS)[number];

registerKind("flags", flagsKind);
registerKind("expunge", expungeKind);
registerKind("append", appendKind);
registerKind("copy", copyKind);
registerKind("move", copyKind);
registerKind("mailbox-create", mailboxCreateKind);
registerKind("mailbox-rename", mailboxRenameKind);
registerKind("mailbox-delete", mailboxDeleteKind);
registerKind("subscribe", subscribeKind);
registerKind("unsubscribe", subscribeKind);
registerKind("account", accountKind);
registerKind("delivery", deliveryKind);
