// The quarantine's notice to its users (DSPAM's dspam_notify, the quarantine summary):
// a user whose spam is held (spam_action quarantine) gets a plain-text message in their
// INBOX listing what was held since the last notice (when, sender, subject, its key, when
// it expires, a mailto link that asks for its release: release.ts) so a false positive is not silently gone
// after `spam.quarantine_days`. Sent by the spam worker on `spam.quarantine_digest_cron`
// (a repeatable BullMQ job beside the purge) and by `mailha spam quarantine digest`.
// What each user was told is kept on the volume (`<data>/spam/quarantine-digest.json`:
// the keys already listed and still held), so a message is listed once; the notice is
// written into the INBOX before that file, so a crash between the two lists it again
// (never not at all). The notice goes straight into the Maildir (SMTP's Maildir delivery,
// services/smtp/maildir.ts), not through an SMTP session: it is never classified, and
// the Maildir scanner journals it as any delivery. Bounds: at most DIGEST_ITEMS_MAX messages listed per notice (the rest
// counted), subjects and senders cleaned of control characters and cut to a line.
import { mkdirSync } from "node:fs";
import { hostname } from "node:os";
import { dirname, join } from "node:path";
import { Readable } from "node:stream";
import { isObject, readJsonState, writeFileDurable } from "../../common/fsutil.ts";
import { deliver } from "../smtp/maildir.ts";
import { listHeld, type Held } from "./quarantine.ts";
import { RELEASE_LOCAL_PART } from "./release.ts";

export const DIGEST_ITEMS_MAX = 200;
const TEXT_MAX = 70;
export const DIGEST_FIELD = "X-Mailha-Digest";

export interface DigestOptions {
  /** `<data>/mail` of the active node's volume. */
  readonly mailRoot: string;
  /** `<data>` of the volume: where what each user was told is kept. */
  readonly dataDir: string;
  /** The owner of the mail files (config mail.mail_uid / mail_gid). */
  readonly uid: number;
  readonly gid: number;
  readonly quarantineDays: number;
  /** Only this user's (an address); default: everyone with held mail. */
  readonly user?: string;
  readonly now?: Date;
}

export interface DigestSent {
  readonly user: string;
  /** Messages listed in this notice (held since the last one). */
  readonly listed: number;
  /** Messages held for the user in all. */
  readonly held: number;
  /** The notice's file in the INBOX (null: nothing new, no notice). */
  readonly file: string | null;
}

/** Where what each user was told is kept. */
export function digestStateFile(dataDir: string): string {
  return join(dataDir, "spam", "quarantine-digest.json");
}

interface DigestState {
  v: 1;
  /** User -> the keys of held messages already listed to them (those still held). */
  told: Record<string, string[]>;
}

const checkState = (v: unknown): string | null => (!isObject(v) || v.v !== 1 || !isObject(v.told) || Object.values(v.told).some((k) => !Array.isArray(k) || k.some((x) => typeof x !== "string")) ? "not a quarantine digest state (v 1, told: user -> keys)" : null);

function readState(dataDir: string): DigestState {
  return readJsonState<DigestState>(digestStateFile(dataDir), checkState, "remove it: every user then gets one notice listing all they have held") ?? { v: 1, told: {} };
}

/** TEXT on one line, without control characters, at most N characters. */
function oneLine(text: string, n = TEXT_MAX): string {
  const s = text.replace(/[\s\u0000-\u001f\u007f-\u009f\u2028\u2029]+/g, " ").trim();
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

const day = (iso: string): string => iso.slice(0, 16).replace("T", " ");

/**
 * The notice for USER listing FRESH (held since the last notice) of TOTAL held: an RFC
 * 5322 message, text/plain in UTF-8, CRLF line ends.
 */
export function digestMessage(user: string, fresh: readonly Held[], total: number, o: { now: Date; quarantineDays: number; host?: string }): Buffer {
  const host = o.host ?? hostname();
  const domain = user.slice(user.lastIndexOf("@") + 1);
  const listed = fresh.slice(0, DIGEST_ITEMS_MAX);
  const n = fresh.length;
  const subject = `${n} message${n === 1 ? "" : "s"} held as spam for you`;
  const expires = (h: Held) => day(new Date(Date.parse(h.held) + o.quarantineDays * 86_400_000).toISOString());
  const body: string[] = [
    `Since the last notice, ${n === 1 ? "this message was" : `these ${n} messages were`} taken for spam and held for you.`,
    "They are not in any of your folders. Each is deleted " + `${o.quarantineDays} days after it was held.`,
    "",
  ];
  for (const h of listed) {
    body.push(`Held:    ${day(h.held)} UTC (deleted after ${expires(h)} UTC)`);
    body.push(`From:    ${oneLine(h.from) || "(none)"}`);
    body.push(`Subject: ${oneLine(h.subject) || "(none)"}`);
    body.push(`Key:     ${h.key}`);
    body.push(`Release: mailto:${RELEASE_LOCAL_PART}@${domain}?subject=${encodeURIComponent(`release ${h.key}`)}`);
    body.push("");
  }
  if (n > listed.length) body.push(`... and ${n - listed.length} more held since the last notice.`, "");
  body.push(
    `In all, ${total} message${total === 1 ? " is" : "s are"} held for you.`,
    "",
    "If one of them is mail you wanted, send a message from your own account to",
    `${RELEASE_LOCAL_PART}@${domain} with the subject "release KEY" (its Release link`,
    "fills that in; several keys may follow one \"release\"). It then arrives in your",
    "inbox within seconds, and the filter learns it was not spam. Or ask your mail",
    `administrator: mailha spam quarantine release --user ${user} KEY`,
    "",
    "-- ",
    `mailha on ${host}`,
  );
  const stamp = o.now.getTime();
  const head = [
    `From: Mail quarantine <postmaster@${domain}>`,
    `To: <${user}>`,
    `Subject: ${subject}`,
    `Date: ${o.now.toUTCString().replace("GMT", "+0000")}`,
    `Message-ID: <quarantine-digest.${stamp}.${Math.random().toString(36).slice(2, 10)}@${host}>`,
    "Auto-Submitted: auto-generated",
    `${DIGEST_FIELD}: quarantine; held=${n}`,
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=utf-8",
    "Content-Transfer-Encoding: 8bit",
  ];
  return Buffer.from(`${head.join("\r\n")}\r\n\r\n${body.join("\r\n")}\r\n`, "utf8");
}

/** Sends each user (or O.user) with spam held since their last notice a notice into their INBOX; see the header. */
export async function sendDigests(o: DigestOptions): Promise<DigestSent[]> {
  const now = o.now ?? new Date();
  const state = readState(o.dataDir);
  const held = listHeld(o.mailRoot, o.user);
  const byUser = new Map<string, Held[]>();
  for (const h of held) {
    const l = byUser.get(h.user);
    if (l) l.push(h);
    else byUser.set(h.user, [h]);
  }
  const sent: DigestSent[] = [];
  for (const [user, hs] of byUser) {
    const told = new Set(state.told[user] ?? []);
    const fresh = hs.filter((h) => !told.has(h.key));
    let file: string | null = null;
    if (fresh.length) {
      const notice = digestMessage(user, fresh, hs.length, { now, quarantineDays: o.quarantineDays });
      // SMTP's own Maildir delivery (written, fsynced, owned by the mail user, then in new/).
      file = (await deliver(Readable.from([notice]), [user], { mailRoot: o.mailRoot, uid: o.uid, gid: o.gid, headers: "", sizeMax: notice.length })).files[0]!;
    }
    // Only keys still held are kept: the state stays as small as the quarantine.
    state.told[user] = hs.map((h) => h.key);
    sent.push({ user, listed: fresh.length, held: hs.length, file });
  }
  // Users with nothing held any more are forgotten (when all users were looked at).
  const looked = o.user ? [o.user.toLowerCase()] : Object.keys(state.told);
  for (const u of looked) if (!byUser.has(u)) delete state.told[u];
  mkdirSync(dirname(digestStateFile(o.dataDir)), { recursive: true });
  writeFileDurable(digestStateFile(o.dataDir), JSON.stringify(state));
  return sent;
}
