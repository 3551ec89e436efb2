// The merge after a split brain, as one pure function: from the survivor's state, the
// victim's preserved state and both sides' journal events since the split, the ordered
// operations that bring the victim's changes into the survivor, and a report that names
// the rule behind every conflict and every removal. No I/O: the worker applies the plan
// through Dovecot and the database, `mailha reconcile --dry-run` prints it.
//
// Every decision is a row of a table (ordered, first match wins) that names the two
// sides only as victim and survivor and treats them alike: swapping them swaps the
// outcome. The tables are checked when this module loads, over every combination of
// their facts (each combination matches a row; the swap holds). README.md explains each
// row in plain words.
//
// Guarantees: a message that exists on either side after the split is kept unless a
// row says it goes, and then the report names it; a message the survivor still has is
// never added again (its key and UID stay; UIDVALIDITY is never touched); re-planning
// after the plan was applied gives an empty plan; operation ids are a hash of what the
// operation does, so re-planning gives the same ids and the queue drops repeats.
// Known gaps are listed in README.md ("What the merge cannot know").
//
// Bounds: MERGE_EVENTS_MAX events on each side and MERGE_MESSAGES_MAX messages in each
// side's state, asserted; the plan holds one user's mail index at a time; the folder
// rename schedule and the name-collision rounds are bounded by the user's folder count.
import { createHash } from "node:crypto";
import { compareHlc, isHlc, type Hlc } from "../common/hlc.ts";
import {
  ACCOUNT_TABLES,
  type AccountEvent,
  type BuiltinEvent,
  type Json,
  type JournalEvent,
  type KindHandler,
  type KindRegistry,
  type MailEvent,
  type MergeInput,
  type MergeOptions,
  type MessageState,
  type NewMessageEvent,
  type Operation,
  type OtherEvent,
  type Plan,
  type ReportEntry,
  type Scalar,
  type Side,
  type SideState,
  type UserMailState,
} from "./model.ts";

export const MERGE_EVENTS_MAX = 2_000_000;
export const MERGE_MESSAGES_MAX = 10_000_000;
export const DELETED_FLAG = "\\Deleted";
/** Flags a merge never writes: \Recent belongs to a session, not to the message. */
const IGNORED_FLAGS: ReadonlySet<string> = new Set(["\\Recent"]);
export const LOST_FOUND_PREFIX = "Recovered/";

const MAIL_KINDS = ["delivery", "append", "flags", "expunge", "copy", "move", "mailbox-create", "mailbox-rename", "mailbox-delete", "subscribe", "unsubscribe"] as const;
export const BUILTIN_KINDS: ReadonlySet<string> = new Set<string>([...MAIL_KINDS, "account"]);

// ---------------------------------------------------------------- small helpers

interface Stamp {
  readonly hlc: Hlc;
  readonly id: string;
}

/** Clock order; events of one side with the same stamp are ordered by id. */
function cmpStamp(a: Stamp, b: Stamp): number {
  return compareHlc(a.hlc, b.hlc) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
}
const isLater = (a: Stamp | undefined, b: Stamp | undefined): boolean => a !== undefined && (b === undefined || cmpStamp(a, b) > 0);
function latest<T extends Stamp>(a: T | undefined, b: T | undefined): T | undefined {
  return a === undefined ? b : b === undefined ? a : cmpStamp(a, b) >= 0 ? a : b;
}
const byString = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/** An own property only: a key such as "constructor" never reads Object.prototype. */
function own<T>(rec: Readonly<Record<string, T>> | undefined, key: string): T | undefined {
  return rec !== undefined && Object.hasOwn(rec, key) ? rec[key] : undefined;
}

function must<T>(x: T | undefined | null, what: string): T {
  if (x === undefined || x === null) throw new Error(`reconcile: ${what}`);
  return x;
}

function canonical(x: Json): string {
  if (x === null || typeof x !== "object") return JSON.stringify(x);
  if (Array.isArray(x)) return `[${(x as readonly Json[]).map(canonical).join(",")}]`;
  const o = x as { readonly [k: string]: Json };
  return `{${Object.keys(o)
    .sort(byString)
    .map((k) => `${JSON.stringify(k)}:${canonical(o[k]!)}`)
    .join(",")}}`;
}

/** `op-<128 bits of SHA-256 of what the operation does>`: no ':' and never all digits (BullMQ job ids). */
function opId(op: string, content: Json): string {
  return `${op}-${createHash("sha256").update(canonical(content)).digest("hex").slice(0, 32)}`;
}

const other = (s: Side): Side => (s === "victim" ? "survivor" : "victim");

// ---------------------------------------------------------------- decision tables

/** Which side's value a row takes: one of them, either (they agree), or neither (nothing changed). */
export type Pick = "victim" | "survivor" | "either" | "neither";
const swapPick = (p: Pick): Pick => (p === "victim" ? "survivor" : p === "survivor" ? "victim" : p);

export interface Row<F, O> {
  readonly name: string;
  readonly says: string;
  readonly conflict?: boolean;
  readonly when: (f: F) => boolean;
  readonly then: (f: F) => O;
}
export interface Table<F, O> {
  readonly name: string;
  readonly rows: readonly Row<F, O>[];
}
export interface Decision<O> {
  readonly rule: string;
  readonly says: string;
  readonly conflict: boolean;
  readonly out: O;
}

/** The first row that matches. */
export function decide<F, O>(t: Table<F, O>, f: F): Decision<O> {
  for (const row of t.rows) if (row.when(f)) return { rule: `${t.name}/${row.name}`, says: row.says, conflict: row.conflict === true, out: row.then(f) };
  throw new Error(`reconcile: no row of the ${t.name} table matches ${JSON.stringify(f)}`);
}

function product<T extends Record<string, readonly unknown[]>>(dims: T): { [K in keyof T]: T[K][number] }[] {
  let out: Record<string, unknown>[] = [{}];
  for (const [k, values] of Object.entries(dims)) {
    const next: Record<string, unknown>[] = [];
    for (const o of out) for (const v of values) next.push({ ...o, [k]: v });
    out = next;
    if (out.length > 65_536) throw new Error("reconcile: fact space too large to check");
  }
  return out as { [K in keyof T]: T[K][number] }[];
}

/** Every combination matches a row; the mirrored facts give the mirrored outcome by the same row. */
function assertTable<F, O>(t: Table<F, O>, space: readonly F[], mirror: (f: F) => F, mirrorOut: (o: O) => O): void {
  if (space.length === 0) throw new Error(`reconcile: the ${t.name} table has no facts to check`);
  for (const f of space) {
    const a = decide(t, f);
    const b = decide(t, mirror(f));
    if (a.rule !== b.rule || JSON.stringify(mirrorOut(a.out)) !== JSON.stringify(b.out))
      throw new Error(`reconcile: the ${t.name} table treats the sides differently for ${JSON.stringify(f)}: ${a.rule} vs ${b.rule}`);
  }
}

const bools = [false, true] as const;
const sideOrNull = ["victim", "survivor", null] as const;
const mirrorSide = (s: Side | null): Side | null => (s === null ? null : other(s));

// -- last writer: per flag, per account column, row existence, subscription

export interface LwwFacts {
  /** Changed on the victim since the split. */
  readonly victim: boolean;
  readonly survivor: boolean;
  /** When both changed: whose change is later. */
  readonly later: Side | null;
  /** When both changed: to the same value. */
  readonly agree: boolean;
}

function lastWriter(name: string, what: string): Table<LwwFacts, Pick> {
  return {
    name,
    rows: [
      { name: "unchanged", says: `${what} changed on neither side: it stays as it is`, when: (f) => !f.victim && !f.survivor, then: () => "neither" },
      { name: "changed-on-one-side", says: `${what} changed on one side only: that change is applied`, when: (f) => f.victim !== f.survivor, then: (f) => (f.victim ? "victim" : "survivor") },
      { name: "same-change-on-both", says: `${what} changed the same way on both sides: nothing to decide`, when: (f) => f.agree, then: () => "either" },
      {
        name: "later-change-wins",
        conflict: true,
        says: `${what} changed differently on both sides: the later change (by hybrid logical clock) wins`,
        when: () => true,
        then: (f) => must(f.later, "both changed, but no later side"),
      },
    ],
  };
}

export const FLAGS = lastWriter("flags", "the flag");
export const ACCOUNT_COLUMNS = lastWriter("account-columns", "the column");
export const ACCOUNT_ROWS = lastWriter("account-rows", "whether the row exists");
export const SUBSCRIPTIONS = lastWriter("subscriptions", "the subscription");

const lwwSpace: LwwFacts[] = product({ victim: bools, survivor: bools, later: sideOrNull, agree: bools }).filter(
  (f) => (f.victim && f.survivor) === (f.later !== null) && (!f.agree || (f.victim && f.survivor)),
);
const mirrorLww = (f: LwwFacts): LwwFacts => ({ victim: f.survivor, survivor: f.victim, later: mirrorSide(f.later), agree: f.agree });

// -- does a message exist after the merge

export interface ExistenceFacts {
  readonly vExpunged: boolean;
  readonly sExpunged: boolean;
  /** Changed since the split (flags, a move, its folder renamed). */
  readonly vChanged: boolean;
  readonly sChanged: boolean;
  /** The victim changed it after the survivor's expunge. */
  readonly vChangedAfter: boolean;
  readonly sChangedAfter: boolean;
}
export type Keep = "keep" | "gone";

export const MESSAGE_EXISTENCE: Table<ExistenceFacts, Keep> = {
  name: "message-existence",
  rows: [
    { name: "no-expunge", says: "expunged on neither side: the message stays", when: (f) => !f.vExpunged && !f.sExpunged, then: () => "keep" },
    { name: "expunged-on-both", says: "expunged on both sides: it stays expunged", when: (f) => f.vExpunged && f.sExpunged, then: () => "gone" },
    {
      name: "expunge-loses-to-later-change",
      conflict: true,
      says: "expunged on one side, but changed later on the other (flags, a move, its folder renamed): the message survives, with its flags merged, but not the \\Deleted flag the expunging side had set",
      when: (f) => (f.vExpunged && f.sChangedAfter) || (f.sExpunged && f.vChangedAfter),
      then: () => "keep",
    },
    {
      name: "expunge-wins-over-earlier-change",
      conflict: true,
      says: "expunged on one side after the other side changed it: the expunge is later, the message goes",
      when: (f) => (f.vExpunged && f.sChanged) || (f.sExpunged && f.vChanged),
      then: () => "gone",
    },
    { name: "expunged", says: "expunged on one side, untouched on the other: the message goes", when: () => true, then: () => "gone" },
  ],
};

// -- where a surviving message lives

export interface LocationFacts {
  /** The side still has the message (not expunged there). */
  readonly vHas: boolean;
  readonly sHas: boolean;
  readonly vMoved: boolean;
  readonly sMoved: boolean;
  /** When both moved it: whose move is later. */
  readonly later: Side | null;
  /** Both have it in the same folder. */
  readonly sameFolder: boolean;
}

export const MESSAGE_LOCATION: Table<LocationFacts, Pick> = {
  name: "message-location",
  rows: [
    { name: "on-one-side-only", says: "only one side still has the message: it goes where that side has it", when: (f) => f.vHas !== f.sHas, then: (f) => (f.vHas ? "victim" : "survivor") },
    { name: "not-moved", says: "moved on neither side: it stays in its folder", when: (f) => !f.vMoved && !f.sMoved, then: () => "either" },
    { name: "moved-on-one-side", says: "moved on one side only: the move is applied if the message still exists on the survivor (otherwise it comes back in the move's folder)", when: (f) => f.vMoved !== f.sMoved, then: (f) => (f.vMoved ? "victim" : "survivor") },
    { name: "moved-to-the-same-folder", says: "moved into the same folder on both sides: nothing to decide", when: (f) => f.sameFolder, then: () => "either" },
    { name: "later-move-wins", conflict: true, says: "moved into different folders on the two sides: the later move wins", when: () => true, then: (f) => must(f.later, "both moved, but no later side") },
  ],
};

// -- is a new message of one side the same as a new message of the other

export interface SameMessageFacts {
  readonly bothDeliveries: boolean;
  readonly sameQueueId: boolean;
  readonly sameContent: boolean;
  readonly sameFolder: boolean;
  /** Both have the same Message-ID field. */
  readonly sameMessageId: boolean;
}

export const NEW_MESSAGE: Table<SameMessageFacts, "one" | "two"> = {
  name: "new-message",
  rows: [
    {
      name: "same-queue-id",
      says: "delivered on both sides with the same SMTP or backup-MX queue id: one message (each side's copy differs only in its trace fields), kept once",
      when: (f) => f.bothDeliveries && f.sameQueueId,
      then: () => "one",
    },
    {
      name: "same-content-in-the-same-folder",
      says: "the same content (SHA-256) was added to the same folder on both sides (a client that repeated an APPEND on the other node, or a copy made on both): one message",
      when: (f) => f.sameContent && f.sameFolder,
      then: () => "one",
    },
    {
      name: "same-message-id-delivered-to-the-same-folder",
      says: "delivered on both sides into the same folder with the same Message-ID: one message sent twice (a client that got no 250 from the node that died and sent it again to the other; the copies differ only in their trace fields), kept once",
      when: (f) => f.bothDeliveries && f.sameMessageId && f.sameFolder,
      then: () => "one",
    },
    { name: "distinct", says: "a message of its own: added to the survivor (a new UID there)", when: () => true, then: () => "two" },
  ],
};

// -- does a folder exist after the merge

export type FolderStatus = "present" | "deleted" | "none";

export interface FolderFacts {
  /** present: the side has it now; deleted: its journal deleted it; none: never had it (new on the other side). */
  readonly v: FolderStatus;
  readonly s: FolderStatus;
  /** The victim renamed it after the survivor deleted it. */
  readonly vRenamedAfter: boolean;
  readonly sRenamedAfter: boolean;
  /** A message that survives the merge lives in it. */
  readonly needed: boolean;
}

export const FOLDER_EXISTENCE: Table<FolderFacts, Keep> = {
  name: "folder-existence",
  rows: [
    { name: "present-on-both", says: "both sides have the folder: it stays", when: (f) => f.v === "present" && f.s === "present", then: () => "keep" },
    {
      name: "new-on-one-side",
      says: "created on one side since the split (the other never had it): it is created on the survivor with the same GUID",
      when: (f) => (f.v === "present" && f.s === "none") || (f.v === "none" && f.s === "present"),
      then: () => "keep",
    },
    {
      name: "delete-loses-to-later-rename",
      conflict: true,
      says: "deleted on one side, renamed later on the other: the folder stays, with the later name; its messages count as changed by the rename, so they stay too",
      when: (f) => (f.v === "deleted" && f.s === "present" && f.sRenamedAfter) || (f.s === "deleted" && f.v === "present" && f.vRenamedAfter),
      then: () => "keep",
    },
    {
      name: "delete-loses-to-mail",
      conflict: true,
      says: "deleted on one side, but mail that survives lives in it (mail the deleting side never saw: delivered, appended or moved in on the other side, or changed there after the delete): the folder comes back, with that mail only",
      when: (f) => (f.v === "deleted" || f.s === "deleted") && f.needed,
      then: () => "keep",
    },
    { name: "known-only-from-mail", says: "neither side has the folder any more, but a surviving message is in it: it is created again", when: (f) => f.needed, then: () => "keep" },
    { name: "deleted", says: "deleted, and nothing that survives is in it: it goes (on the survivor too)", when: () => true, then: () => "gone" },
  ],
};

// -- a folder's name

export interface NameFacts {
  readonly vHas: boolean;
  readonly sHas: boolean;
  readonly vRenamed: boolean;
  readonly sRenamed: boolean;
  readonly later: Side | null;
  /** Both have it under the same name (true when neither renamed it: the name from before the split). */
  readonly sameName: boolean;
}

export const FOLDER_NAME: Table<NameFacts, Pick> = {
  name: "folder-name",
  rows: [
    { name: "from-the-journal", says: "neither side has the folder now: it takes the last name a journal gave it", when: (f) => !f.vHas && !f.sHas, then: () => "neither" },
    { name: "on-one-side-only", says: "only one side has the folder: its name there", when: (f) => f.vHas !== f.sHas, then: (f) => (f.vHas ? "victim" : "survivor") },
    { name: "same-name", says: "the same name on both sides: it keeps it", when: (f) => f.sameName, then: () => "either" },
    { name: "renamed-on-one-side", says: "renamed on one side only: the new name is applied", when: (f) => f.vRenamed !== f.sRenamed, then: (f) => (f.vRenamed ? "victim" : "survivor") },
    { name: "later-rename-wins", conflict: true, says: "renamed differently on both sides: the later rename wins, the other is reported", when: () => true, then: (f) => must(f.later, "both renamed, but no later side") },
  ],
};

// -- two folders that end up with one name

export interface CollisionFacts {
  /** One of them is new since the split. */
  readonly newFolder: boolean;
}

export const NAME_COLLISION: Table<CollisionFacts, "merge" | "fall-back"> = {
  name: "name-collision",
  rows: [
    {
      name: "new-folder-merges",
      conflict: true,
      says: "a folder created since the split has the name of another folder: they become one folder (the one that existed before the split, or else the survivor's), holding the messages of both",
      when: (f) => f.newFolder,
      then: () => "merge",
    },
    {
      name: "older-name-stays",
      conflict: true,
      says: "two folders were renamed to the same name: the one that had the name first keeps it; the other keeps its name from the other side (or that name with '~' and the start of its GUID, if that is taken too)",
      when: () => true,
      then: () => "fall-back",
    },
  ],
};

// -- mail of a user who does not exist after the merge

export interface UserGoneFacts {
  /** A message new since the split (delivered, appended or copied on the victim), which the survivor does not have. */
  readonly newMessage: boolean;
  readonly lostFound: boolean;
}

export const USER_GONE: Table<UserGoneFacts, "lost-found" | "stranded" | "skip"> = {
  name: "user-gone",
  rows: [
    {
      name: "to-lost-found",
      says: "mail the victim accepted for a user who does not exist after the merge: it goes to the postmaster's folder Recovered/<address> (the account is not brought back: it was deleted on purpose)",
      when: (f) => f.newMessage && f.lostFound,
      then: () => "lost-found",
    },
    { name: "stranded", says: "mail for a user who does not exist after the merge, and no postmaster to hold it: it stays in the victim's preserved copy only", when: (f) => f.newMessage, then: () => "stranded" },
    { name: "skipped", says: "changes to the mail of a user who does not exist after the merge: not applied (that user's mail directory on the survivor stays as it is)", when: () => true, then: () => "skip" },
  ],
};

/** Every table, by name and rows (for the documentation and its test). */
export const TABLES: readonly { readonly name: string; readonly rows: readonly { readonly name: string; readonly says: string }[] }[] = [
  MESSAGE_EXISTENCE,
  MESSAGE_LOCATION,
  FLAGS,
  NEW_MESSAGE,
  FOLDER_EXISTENCE,
  FOLDER_NAME,
  NAME_COLLISION,
  SUBSCRIPTIONS,
  ACCOUNT_ROWS,
  ACCOUNT_COLUMNS,
  USER_GONE,
];

// Checked at load: complete and symmetric.
for (const t of [FLAGS, ACCOUNT_COLUMNS, ACCOUNT_ROWS, SUBSCRIPTIONS]) assertTable(t, lwwSpace, mirrorLww, swapPick);
assertTable(
  MESSAGE_EXISTENCE,
  product({ vExpunged: bools, sExpunged: bools, vChanged: bools, sChanged: bools, vChangedAfter: bools, sChangedAfter: bools }),
  (f) => ({ vExpunged: f.sExpunged, sExpunged: f.vExpunged, vChanged: f.sChanged, sChanged: f.vChanged, vChangedAfter: f.sChangedAfter, sChangedAfter: f.vChangedAfter }),
  (o) => o,
);
assertTable(
  MESSAGE_LOCATION,
  product({ vHas: bools, sHas: bools, vMoved: bools, sMoved: bools, later: sideOrNull, sameFolder: bools }).filter(
    (f) => (f.vHas || f.sHas) && (!f.vMoved || f.vHas) && (!f.sMoved || f.sHas) && (f.vMoved && f.sMoved) === (f.later !== null),
  ),
  (f) => ({ vHas: f.sHas, sHas: f.vHas, vMoved: f.sMoved, sMoved: f.vMoved, later: mirrorSide(f.later), sameFolder: f.sameFolder }),
  swapPick,
);
assertTable(NEW_MESSAGE, product({ bothDeliveries: bools, sameQueueId: bools, sameContent: bools, sameFolder: bools, sameMessageId: bools }), (f) => f, (o) => o);
assertTable(
  FOLDER_EXISTENCE,
  product({ v: ["present", "deleted", "none"] as const, s: ["present", "deleted", "none"] as const, vRenamedAfter: bools, sRenamedAfter: bools, needed: bools }),
  (f) => ({ v: f.s, s: f.v, vRenamedAfter: f.sRenamedAfter, sRenamedAfter: f.vRenamedAfter, needed: f.needed }),
  (o) => o,
);
assertTable(
  FOLDER_NAME,
  product({ vHas: bools, sHas: bools, vRenamed: bools, sRenamed: bools, later: sideOrNull, sameName: bools }).filter(
    (f) => (!f.vRenamed || f.vHas) && (!f.sRenamed || f.sHas) && (f.vRenamed && f.sRenamed) === (f.later !== null) && (f.vRenamed || f.sRenamed || !f.vHas || !f.sHas || f.sameName),
  ),
  (f) => ({ vHas: f.sHas, sHas: f.vHas, vRenamed: f.sRenamed, sRenamed: f.vRenamed, later: mirrorSide(f.later), sameName: f.sameName }),
  swapPick,
);
assertTable(NAME_COLLISION, product({ newFolder: bools }), (f) => f, (o) => o);
assertTable(USER_GONE, product({ newMessage: bools, lostFound: bools }), (f) => f, (o) => o);

// ---------------------------------------------------------------- extension kinds

export const NO_KINDS: KindRegistry = new Map();

/** A registry with KIND handled by HANDLER (a new map; registries are values). */
export function registerKind(registry: KindRegistry, kind: string, handler: KindHandler): KindRegistry {
  if (!/^[a-z][a-z0-9-]{0,63}$/.test(kind)) throw new Error(`reconcile: bad event kind "${kind}"`);
  if (BUILTIN_KINDS.has(kind)) throw new Error(`reconcile: "${kind}" is a built-in kind`);
  if (registry.has(kind)) throw new Error(`reconcile: kind "${kind}" is already registered`);
  return new Map([...registry, [kind, handler]]);
}

// ---------------------------------------------------------------- input checks

const REQUIRED: Readonly<Record<string, readonly string[]>> = {
  delivery: ["user", "mailbox", "key", "sha256"],
  append: ["user", "mailbox", "key", "sha256"],
  flags: ["user", "mailbox", "key"],
  expunge: ["user", "mailbox", "key"],
  copy: ["user", "from", "to", "key", "newKey", "sha256"],
  move: ["user", "from", "to", "key", "newKey", "sha256"],
  "mailbox-create": ["user", "guid", "name"],
  "mailbox-rename": ["user", "guid", "name"],
  "mailbox-delete": ["user", "guid"],
  subscribe: ["user", "name"],
  unsubscribe: ["user", "name"],
  account: ["table", "key"],
};
const LISTS: Readonly<Record<string, readonly string[]>> = { delivery: ["flags"], append: ["flags"], flags: ["add", "remove"] };

function checkEvent(e: JournalEvent, side: Side): void {
  const bad = (why: string): never => {
    throw new Error(`reconcile: ${side} event ${JSON.stringify((e as { id?: unknown }).id ?? null)}: ${why}`);
  };
  if (typeof e !== "object" || e === null) bad("not an object");
  if (typeof e.id !== "string" || e.id === "") bad("no id");
  if (!isHlc(e.hlc)) bad(`malformed hlc ${JSON.stringify(e.hlc)}`);
  if (typeof e.kind !== "string" || e.kind === "") bad("no kind");
  const rec = e as unknown as Record<string, unknown>;
  for (const f of REQUIRED[e.kind] ?? []) if (typeof rec[f] !== "string" || rec[f] === "") bad(`${e.kind} without ${f}`);
  for (const f of LISTS[e.kind] ?? []) if (!Array.isArray(rec[f]) || !(rec[f] as unknown[]).every((x) => typeof x === "string")) bad(`${e.kind}: ${f} is not a list of strings`);
  if (e.kind === "account") {
    if (!(ACCOUNT_TABLES as readonly string[]).includes(rec.table as string)) bad(`unknown table ${JSON.stringify(rec.table)}`);
    if (typeof rec.columns !== "object" || rec.columns === null) bad("account without columns");
  }
}

function checkState(st: SideState, side: Side): void {
  let n = 0;
  for (const user of Object.keys(st.mail)) {
    for (const mb of Object.values(st.mail[user]!.mailboxes)) {
      n += Object.keys(mb.messages).length;
      if (n > MERGE_MESSAGES_MAX) throw new Error(`reconcile: the ${side}'s state has more than ${MERGE_MESSAGES_MAX} messages`);
    }
  }
}

interface SideEvents {
  readonly mail: Map<string, MailEvent[]>;
  readonly account: AccountEvent[];
  readonly other: Map<string, OtherEvent[]>;
  readonly counts: Map<string, number>;
}

const isBuiltin = (e: JournalEvent): e is BuiltinEvent => BUILTIN_KINDS.has(e.kind);

function splitEvents(events: readonly JournalEvent[], side: Side): SideEvents {
  if (events.length > MERGE_EVENTS_MAX) throw new Error(`reconcile: the ${side} has ${events.length} events, more than ${MERGE_EVENTS_MAX}`);
  const ids = new Set<string>();
  for (const e of events) {
    checkEvent(e, side);
    if (ids.has(e.id)) throw new Error(`reconcile: ${side} event id ${e.id} appears twice`);
    ids.add(e.id);
  }
  const out: SideEvents = { mail: new Map(), account: [], other: new Map(), counts: new Map() };
  for (const e of [...events].sort(cmpStamp)) {
    out.counts.set(e.kind, (out.counts.get(e.kind) ?? 0) + 1);
    // What the reconcile worker did shows in the survivor's state; its own events are not changes to merge.
    if (e.origin !== undefined) continue;
    if (!isBuiltin(e)) {
      const list = out.other.get(e.kind) ?? [];
      list.push(e);
      out.other.set(e.kind, list);
    } else if (e.kind === "account") out.account.push(e);
    else {
      const list = out.mail.get(e.user) ?? [];
      list.push(e);
      out.mail.set(e.user, list);
    }
  }
  return out;
}

// ---------------------------------------------------------------- the plan being built

type Phase = "accounts" | "folders" | "subscriptions" | "flags" | "moves" | "adds" | "expunges" | "deletes" | "extensions";
const PHASES: readonly Phase[] = ["accounts", "folders", "subscriptions", "flags", "moves", "adds", "expunges", "deletes", "extensions"];

type EntryInput = Omit<ReportEntry, "victimEvents" | "survivorEvents"> & { victimEvents?: readonly string[]; survivorEvents?: readonly string[] };
type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;
type OpInput = DistributiveOmit<Operation, "id">;

class PlanBuilder {
  private readonly phases = new Map<Phase, Operation[]>(PHASES.map((p) => [p, []]));
  private readonly ids = new Set<string>();
  private readonly at = new Map<string, { user: string; name: string }>();
  readonly entries: ReportEntry[] = [];
  complete = true;

  /** IDENTITY: what names the operation when some of its fields are only for display (default: all of them). */
  add(phase: Phase, op: OpInput, where?: { user: string; name: string }, identity: Json = op as unknown as Json): Operation {
    const full = { id: opId(op.op, identity), ...op } as Operation;
    if (this.ids.has(full.id)) throw new Error(`reconcile: two operations with id ${full.id} (${canonical(op as unknown as Json)})`);
    this.ids.add(full.id);
    this.phases.get(phase)!.push(full);
    if (where) this.at.set(full.id, where);
    return full;
  }

  entry(e: EntryInput): void {
    this.entries.push({ ...e, victimEvents: e.victimEvents ?? [], survivorEvents: e.survivorEvents ?? [] });
    if (e.outcome === "stranded") this.complete = false;
  }

  finish(v: SideEvents, s: SideEvents): Plan {
    const ops = PHASES.flatMap((p) => this.phases.get(p)!);
    const events: Record<string, { victim: number; survivor: number }> = {};
    for (const k of [...new Set([...v.counts.keys(), ...s.counts.keys()])].sort(byString)) events[k] = { victim: v.counts.get(k) ?? 0, survivor: s.counts.get(k) ?? 0 };
    const byOp: Record<string, number> = {};
    const mailboxes: Record<string, Record<string, Record<string, number>>> = {};
    for (const op of ops) {
      byOp[op.op] = (byOp[op.op] ?? 0) + 1;
      const w = this.at.get(op.id);
      if (!w) continue;
      const u = (mailboxes[w.user] ??= {});
      const m = (u[w.name] ??= {});
      m[op.op] = (m[op.op] ?? 0) + 1;
    }
    return { ops, report: { complete: this.complete, events, ops: byOp, mailboxes, entries: this.entries } };
  }
}

// ---------------------------------------------------------------- accounts

interface AccountOutcome {
  /** Does this users row exist after the merge. */
  readonly userExists: (address: string) => boolean;
}

function mergeAccounts(input: MergeInput, vEvents: readonly AccountEvent[], sEvents: readonly AccountEvent[], out: PlanBuilder): AccountOutcome {
  const group = (evs: readonly AccountEvent[]) => {
    const m = new Map<string, AccountEvent[]>();
    for (const e of evs) {
      const k = `${e.table}\u0000${e.key}`;
      const list = m.get(k) ?? [];
      list.push(e);
      m.set(k, list);
    }
    return m;
  };
  const vBy = group(vEvents);
  const sBy = group(sEvents);
  const users = new Set(Object.keys(own(input.survivor.accounts, "users") ?? {}));
  for (const table of ACCOUNT_TABLES) {
    const vRows = own(input.victim.accounts, table) ?? {};
    const sRows = own(input.survivor.accounts, table) ?? {};
    const keys = new Set([...Object.keys(vRows), ...Object.keys(sRows)]);
    for (const e of [...vEvents, ...sEvents]) if (e.table === table) keys.add(e.key);
    for (const key of [...keys].sort(byString)) {
      const vEv = vBy.get(`${table}\u0000${key}`) ?? [];
      const sEv = sBy.get(`${table}\u0000${key}`) ?? [];
      if (vEv.length === 0) continue; // survivor's row stands (account-rows/unchanged or changed-on-one-side)
      const vRow = own(vRows, key);
      const sRow = own(sRows, key);
      const ids = { victimEvents: vEv.map((e) => e.id), survivorEvents: sEv.map((e) => e.id) };
      const vLast = vEv[vEv.length - 1];
      const sLast = sEv[sEv.length - 1];
      const both = vLast !== undefined && sLast !== undefined;
      const life = decide(ACCOUNT_ROWS, { victim: true, survivor: sLast !== undefined, later: both ? (isLater(vLast, sLast) ? "victim" : "survivor") : null, agree: both && (vRow !== undefined) === (sRow !== undefined) });
      const exists = life.out === "victim" ? vRow !== undefined : life.out === "survivor" ? sRow !== undefined : sRow !== undefined || vRow !== undefined;
      if (life.conflict && (vRow !== undefined) !== (sRow !== undefined))
        out.entry({ rule: life.rule, outcome: "conflict", says: `${life.says}: the row ${exists ? "exists" : "is deleted"}`, table, row: key, ...ids });
      if (!exists) {
        if (sRow !== undefined) {
          out.add("accounts", { op: "account-delete", table, key });
          out.entry({ rule: life.rule, outcome: "removed", says: "the row was deleted on the victim, later than any change on the survivor: deleted", table, row: key, ...ids });
        }
        if (table === "users") users.delete(key);
        continue;
      }
      if (table === "users") users.add(key);
      if (sRow === undefined) {
        out.add("accounts", { op: "account-set", table, key, columns: { ...must(vRow, `victim row ${table}/${key} missing`) }, create: true });
        continue;
      }
      const changed: Record<string, Scalar> = {};
      // A side's writes before its own delete of the row were wiped by that delete.
      const lastWrite = (evs: readonly AccountEvent[], col: string) => {
        let w: AccountEvent | undefined;
        for (const e of evs) if (e.deleted) w = undefined;
        else if (Object.hasOwn(e.columns, col)) w = e;
        return w;
      };
      for (const col of [...new Set([...Object.keys(vRow ?? {}), ...Object.keys(sRow)])].sort(byString)) {
        const vw = lastWrite(vEv, col);
        const sw = lastWrite(sEv, col);
        const vVal: Scalar | undefined = vRow !== undefined ? own(vRow, col) : vw?.columns[col];
        const sVal = own(sRow, col);
        const d = decide(ACCOUNT_COLUMNS, { victim: vw !== undefined, survivor: sw !== undefined, later: vw && sw ? (isLater(vw, sw) ? "victim" : "survivor") : null, agree: vw !== undefined && sw !== undefined && vVal === sVal });
        const value = d.out === "victim" ? vVal : sVal;
        if (d.conflict && vVal !== sVal) out.entry({ rule: d.rule, outcome: "conflict", says: `${d.says}: ${d.out}'s value`, table, row: key, column: col, victimEvents: [vw!.id], survivorEvents: [sw!.id] });
        if (value !== undefined && value !== sVal) changed[col] = value;
      }
      if (Object.keys(changed).length) out.add("accounts", { op: "account-set", table, key, columns: changed, create: false });
    }
  }
  return { userExists: (a) => users.has(a) };
}

// ---------------------------------------------------------------- one user's mail: the two journals replayed

interface Loc {
  readonly mailbox: string;
  readonly key: string;
}
const locKey = (l: Loc): string => `${l.mailbox}\u0000${l.key}`;

function messageAt(st: UserMailState | undefined, loc: Loc): MessageState | undefined {
  return own(own(st?.mailboxes, loc.mailbox)?.messages, loc.key);
}

/** What one side did to one message since the split. */
interface Half {
  readonly side: Side;
  /** pre: existed before the split; new: delivered, appended or copied since; unjournaled: in the state, in no journal. */
  readonly origin: "pre" | "new" | "unjournaled";
  readonly start: Loc;
  created?: Stamp & { readonly via: "delivery" | "append" | "copy"; readonly queueId?: string; readonly flags: readonly string[] };
  sha256?: string;
  loc: Loc;
  lastMove?: Stamp;
  readonly flagChanges: Map<string, Stamp & { readonly value: boolean }>;
  /** The last change that keeps it alive against an expunge on the other side. */
  lastTouch?: Stamp;
  expunged?: Stamp;
  status: "present" | "expunged" | "missing";
  state?: MessageState;
  readonly events: string[];
}

function newHalf(side: Side, origin: Half["origin"], loc: Loc): Half {
  return { side, origin, start: loc, loc, flagChanges: new Map(), status: "missing", events: [] };
}

interface FolderHistory {
  created?: Stamp & { readonly name: string };
  renamed?: Stamp & { readonly name: string };
  deleted?: Stamp;
  readonly events: string[];
}

interface SideMail {
  readonly side: Side;
  readonly state: UserMailState | undefined;
  readonly halves: Half[];
  /** Halves of pre-split messages, by their pre-split location. */
  readonly pre: Map<string, Half>;
  readonly folders: Map<string, FolderHistory>;
  readonly subs: Map<string, Stamp & { readonly value: boolean }>;
}

function replay(side: Side, user: string, events: readonly MailEvent[], state: UserMailState | undefined, out: PlanBuilder): SideMail {
  const m: SideMail = { side, state, halves: [], pre: new Map(), folders: new Map(), subs: new Map() };
  const live = new Map<string, Half>();
  const liveIn = new Map<string, Set<Half>>();
  const vacated = new Set<string>();
  const folder = (guid: string): FolderHistory => {
    let f = m.folders.get(guid);
    if (!f) m.folders.set(guid, (f = { events: [] }));
    return f;
  };
  const inconsistent = (e: MailEvent, what: string) =>
    out.entry({ rule: "journal/inconsistent", outcome: "note", says: `the ${side}'s journal ${what}; the event is ignored`, user, ...(side === "victim" ? { victimEvents: [e.id] } : { survivorEvents: [e.id] }) });
  const place = (h: Half, e: MailEvent): boolean => {
    const k = locKey(h.loc);
    if (live.has(k) || vacated.has(k)) {
      inconsistent(e, `puts a message where one already was (${h.loc.key})`);
      return false;
    }
    live.set(k, h);
    let set = liveIn.get(h.loc.mailbox);
    if (!set) liveIn.set(h.loc.mailbox, (set = new Set()));
    set.add(h);
    return true;
  };
  const leave = (h: Half) => {
    const k = locKey(h.loc);
    live.delete(k);
    liveIn.get(h.loc.mailbox)?.delete(h);
    vacated.add(k);
  };
  /** The message at LOC on this side: one the journal made or moved there, or a pre-split one seen for the first time. */
  const at = (loc: Loc): Half | undefined => {
    const k = locKey(loc);
    const h = live.get(k);
    if (h) return h;
    if (vacated.has(k)) return undefined;
    const p = newHalf(side, "pre", loc);
    m.pre.set(k, p);
    m.halves.push(p);
    live.set(k, p);
    let set = liveIn.get(loc.mailbox);
    if (!set) liveIn.set(loc.mailbox, (set = new Set()));
    set.add(p);
    return p;
  };
  for (const e of events) {
    const stamp: Stamp = { hlc: e.hlc, id: e.id };
    switch (e.kind) {
      case "delivery":
      case "append":
      case "copy": {
        const h =
          e.kind === "copy"
            ? newHalf(side, "new", { mailbox: e.to, key: e.newKey })
            : newHalf(side, "new", { mailbox: (e as NewMessageEvent).mailbox, key: (e as NewMessageEvent).key });
        const queueId = e.kind === "delivery" ? (e as NewMessageEvent).queueId : undefined;
        h.created = { ...stamp, via: e.kind, ...(queueId !== undefined ? { queueId } : {}), flags: [...(e.flags ?? [])] };
        h.sha256 = e.sha256;
        h.events.push(e.id);
        if (place(h, e)) m.halves.push(h);
        break;
      }
      case "flags": {
        const h = at({ mailbox: e.mailbox, key: e.key });
        if (!h) {
          inconsistent(e, `changes flags of a message it had already expunged or moved (${e.key})`);
          break;
        }
        for (const f of e.add) h.flagChanges.set(f, { ...stamp, value: true });
        for (const f of e.remove) h.flagChanges.set(f, { ...stamp, value: false });
        h.lastTouch = stamp;
        h.events.push(e.id);
        break;
      }
      case "expunge": {
        const h = at({ mailbox: e.mailbox, key: e.key });
        if (!h) {
          inconsistent(e, `expunges a message it had already expunged or moved (${e.key})`);
          break;
        }
        h.expunged = stamp;
        h.status = "expunged";
        h.events.push(e.id);
        leave(h);
        break;
      }
      case "move": {
        const h = at({ mailbox: e.from, key: e.key });
        if (!h) {
          inconsistent(e, `moves a message it had already expunged or moved (${e.key})`);
          break;
        }
        leave(h);
        h.loc = { mailbox: e.to, key: e.newKey };
        h.lastMove = stamp;
        h.lastTouch = stamp;
        h.sha256 ??= e.sha256;
        h.events.push(e.id);
        place(h, e);
        break;
      }
      case "mailbox-create":
      case "mailbox-rename": {
        const f = folder(e.guid);
        if (e.kind === "mailbox-create") f.created = { ...stamp, name: e.name };
        else f.renamed = { ...stamp, name: e.name };
        f.events.push(e.id);
        // A rename shows the folder is wanted: it counts as a change of every message in it.
        if (e.kind === "mailbox-rename") for (const h of liveIn.get(e.guid) ?? []) h.lastTouch = stamp;
        break;
      }
      case "mailbox-delete": {
        const f = folder(e.guid);
        f.deleted = stamp;
        f.events.push(e.id);
        // Dovecot expunges a folder's messages first and the journal has those; any still here go with it.
        for (const h of [...(liveIn.get(e.guid) ?? [])]) {
          h.expunged = stamp;
          h.status = "expunged";
          h.events.push(e.id);
          leave(h);
        }
        break;
      }
      case "subscribe":
      case "unsubscribe":
        m.subs.set(e.name, { ...stamp, value: e.kind === "subscribe" });
        break;
    }
  }
  for (const h of live.values()) {
    const msg = messageAt(state, h.loc);
    h.status = msg ? "present" : "missing";
    if (msg) {
      h.state = msg;
      h.sha256 ??= msg.sha256;
    }
  }
  return m;
}

/** A pre-split message this side's journal never mentions: where it was, untouched (or gone without a trace). */
function untouchedHalf(m: SideMail, loc: Loc): Half {
  const h = newHalf(m.side, "pre", loc);
  const msg = messageAt(m.state, loc);
  if (msg) {
    h.status = "present";
    h.state = msg;
    h.sha256 = msg.sha256;
    // Its folder renamed on this side counts as a change of it.
    const ren = m.folders.get(loc.mailbox)?.renamed;
    if (ren) h.lastTouch = ren;
  }
  return h;
}

function stateHalf(side: Side, loc: Loc, msg: MessageState): Half {
  const h = newHalf(side, "unjournaled", loc);
  h.status = "present";
  h.state = msg;
  h.sha256 = msg.sha256;
  return h;
}

// ---------------------------------------------------------------- one user's mail: messages

/** One message as the merge sees it: what each side did to it. */
interface Logical {
  readonly id: string;
  readonly kind: "pre" | "new" | "unjournaled" | "survivor-only";
  readonly v: Half | undefined;
  s: Half | undefined;
  keep?: Decision<Keep>;
  /** The folder it belongs in, before folders that merge into another are resolved. */
  folder?: string;
  flags?: readonly string[];
}

function assemble(user: string, V: SideMail, S: SideMail, out: PlanBuilder): { list: Logical[]; candidates: Half[] } {
  const list: Logical[] = [];
  const candidates: Half[] = [];
  // Pre-split messages one journal or both mention.
  for (const k of [...new Set([...V.pre.keys(), ...S.pre.keys()])].sort(byString)) {
    const vp = V.pre.get(k);
    const sp = S.pre.get(k);
    const loc = must(vp ?? sp, "pre-split half").start;
    if (vp === undefined && messageAt(V.state, loc) === undefined) {
      // The victim never had it: a message the reconcile added earlier (then changed on the survivor), or unjournaled.
      candidates.push(must(sp, "survivor half"));
      continue;
    }
    const v = vp ?? untouchedHalf(V, loc);
    const s = sp ?? untouchedHalf(S, loc);
    // The same message on both sides before the split: one content.
    v.sha256 ??= s.sha256;
    s.sha256 ??= v.sha256;
    list.push({ id: `pre ${loc.mailbox} ${loc.key}`, kind: "pre", v, s });
  }
  // New messages: one message if both sides have it (new-message table), else one each.
  const created = (h: Half) => must(h.created, "new half without creation");
  const vNew = V.halves.filter((h) => h.origin === "new").sort((a, b) => cmpStamp(created(a), created(b)));
  const sNew = S.halves.filter((h) => h.origin === "new").sort((a, b) => cmpStamp(created(a), created(b)));
  const partner = new Map<Half, { s: Half; rule: string }>();
  const taken = new Set<Half>();
  const zip = (keyOf: (h: Half) => string | undefined) => {
    const groups = new Map<string, Half[]>();
    for (const h of sNew) {
      const k = taken.has(h) ? undefined : keyOf(h);
      if (k !== undefined) groups.set(k, [...(groups.get(k) ?? []), h]);
    }
    for (const vh of vNew) {
      const k = partner.has(vh) ? undefined : keyOf(vh);
      const sh = k === undefined ? undefined : groups.get(k)?.shift();
      if (!sh) continue;
      const d = decide(NEW_MESSAGE, {
        bothDeliveries: created(vh).via === "delivery" && created(sh).via === "delivery",
        sameQueueId: created(vh).queueId !== undefined && created(vh).queueId === created(sh).queueId,
        sameContent: vh.sha256 === sh.sha256,
        sameFolder: vh.start.mailbox === sh.start.mailbox,
        sameMessageId: vh.state?.messageId !== undefined && vh.state.messageId === sh.state?.messageId,
      });
      if (d.out !== "one") throw new Error(`reconcile: paired ${vh.events[0]} and ${sh.events[0]} but ${d.rule} says two messages`);
      partner.set(vh, { s: sh, rule: d.rule });
      taken.add(sh);
    }
  };
  zip((h) => (created(h).via === "delivery" ? created(h).queueId : undefined));
  zip((h) => `${h.start.mailbox}\u0000${h.sha256 ?? ""}`);
  zip((h) => (created(h).via === "delivery" && h.state?.messageId !== undefined ? `${h.start.mailbox}\u0000mid\u0000${h.state.messageId}` : undefined));
  for (const vh of vNew) {
    const p = partner.get(vh);
    list.push({ id: `new ${created(vh).id}`, kind: "new", v: vh, s: p?.s });
    if (p && p.rule === "new-message/same-queue-id")
      out.entry({ rule: p.rule, outcome: "note", says: "delivered on both sides with the same queue id: kept once", user, mailbox: vh.start.mailbox, sha256: vh.sha256, ...(created(vh).queueId !== undefined ? { queueId: created(vh).queueId } : {}), victimEvents: vh.events, survivorEvents: p.s.events });
  }
  for (const sh of sNew) if (!taken.has(sh)) list.push({ id: `survivor ${created(sh).id}`, kind: "survivor-only", v: undefined, s: sh });

  // Messages in a state that no journal explains.
  const explained: Record<Side, Set<string>> = { victim: new Set(), survivor: new Set() };
  for (const l of list) for (const h of [l.v, l.s]) if (h?.status === "present") explained[h.side].add(locKey(h.loc));
  for (const h of candidates) if (h.status === "present") explained.survivor.add(locKey(h.loc));
  for (const [m, into] of [
    [V, "victim"],
    [S, "survivor"],
  ] as const) {
    const otherState = (m === V ? S : V).state;
    for (const guid of Object.keys(m.state?.mailboxes ?? {}).sort(byString)) {
      const msgs = m.state!.mailboxes[guid]!.messages;
      for (const key of Object.keys(msgs).sort(byString)) {
        const loc = { mailbox: guid, key };
        // Untouched on both sides since the split: nothing to decide.
        if (explained[into].has(locKey(loc)) || messageAt(otherState, loc) !== undefined) continue;
        const h = stateHalf(into, loc, msgs[key]!);
        if (into === "victim") {
          list.push({ id: `unjournaled ${guid} ${key}`, kind: "unjournaled", v: h, s: undefined });
          out.entry({ rule: "journal/unjournaled", outcome: "note", says: "a message in the victim's copy that neither journal mentions: kept (added to the survivor unless it has the same content there)", user, mailbox: guid, key, sha256: h.sha256 });
        } else candidates.push(h);
      }
    }
  }

  return { list, candidates };
}

/**
 * A survivor message no journal explains may be one an earlier pass of this plan added
 * (or moved, or restored): it is the survivor copy of a message that stays, that the
 * victim has and the survivor otherwise lacks, when it has the same content (the
 * victim's, or that of the survivor copy it replaces), preferably in the same folder and
 * with the same flags. The other such messages stay as they are.
 */
function claim(list: Logical[], candidates: Half[]): void {
  const bySha = new Map<string, Half[]>();
  for (const h of candidates.sort((a, b) => byString(locKey(a.loc), locKey(b.loc)))) if (h.sha256 !== undefined) bySha.set(h.sha256, [...(bySha.get(h.sha256) ?? []), h]);
  const claimed = new Set<Half>();
  // The flags the message will have: those a pass gave the copy it wrote or moved.
  const expected = new Map<Logical, string>();
  const flagsKey = (fs: readonly string[]) => canonical(fs.filter((f) => !IGNORED_FLAGS.has(f)).sort(byString));
  const sameFlags = (h: Half, l: Logical) => flagsKey(h.state?.flags ?? []) === expected.get(l);
  // Messages whose survivor copy left its place (moved by a pass) were there first: they choose first.
  const moved = (l: Logical) => (l.s?.status === "missing" ? 0 : 1);
  const claimers = [...list]
    .sort((a, b) => moved(a) - moved(b) || byString(a.id, b.id))
    .filter((l) => l.v?.status === "present" && l.s?.status !== "present" && existence(l).out === "keep");
  // Tiers, each exhausted by every message before the next: same folder and flags, same folder, same flags, any.
  for (const l of claimers) expected.set(l, flagsKey(mergeFlags(l, existence(l)).flags));
  const tiers: readonly ((h: Half, l: Logical) => boolean)[] = [
    (h, l) => h.loc.mailbox === l.v!.loc.mailbox && sameFlags(h, l),
    (h, l) => h.loc.mailbox === l.v!.loc.mailbox,
    (h, l) => sameFlags(h, l),
    () => true,
  ];
  // What a pass wrote has the content of the survivor copy that left its place without a
  // journal line (a move), else the victim's (an add or a restore).
  const done = new Set<Logical>();
  for (const fits of tiers) {
    for (const l of claimers) {
      if (done.has(l)) continue;
      const v = l.v!;
      const sha = l.s?.status === "missing" ? l.s.sha256 : v.sha256;
      const c = (sha === undefined ? [] : (bySha.get(sha) ?? [])).find((h) => !claimed.has(h) && fits(h, l));
      if (!c) continue;
      claimed.add(c);
      done.add(l);
      l.s = adopt(l.s, c);
    }
  }
  for (const h of candidates) if (!claimed.has(h)) list.push({ id: `unexplained ${h.loc.mailbox} ${h.loc.key}`, kind: "survivor-only", v: undefined, s: h });
}

/**
 * The survivor copy C found for a message whose survivor half OLD is gone (moved or
 * restored by an earlier pass): C's place and state, with what the survivor's journal
 * did to the message before, so that re-planning decides as the first plan did.
 */
function adopt(old: Half | undefined, c: Half): Half {
  if (!old) return c;
  const h: Half = { ...c, flagChanges: new Map(old.flagChanges), events: [...old.events, ...c.events] };
  for (const [f, ch] of c.flagChanges) if (!h.flagChanges.has(f) || cmpStamp(ch, h.flagChanges.get(f)!) > 0) h.flagChanges.set(f, ch);
  const touch = latest(old.lastTouch, c.lastTouch);
  const move = latest(old.lastMove, c.lastMove);
  const created = old.created ?? c.created;
  if (touch) h.lastTouch = touch;
  if (move) h.lastMove = move;
  if (created) h.created = created;
  return h;
}

const has = (h: Half | undefined): h is Half => h !== undefined && h.status !== "expunged";

function existence(l: Logical): Decision<Keep> {
  const { v, s } = l;
  const vE = v?.status === "expunged";
  const sE = s?.status === "expunged";
  return decide(MESSAGE_EXISTENCE, {
    vExpunged: vE,
    sExpunged: sE,
    vChanged: v?.lastTouch !== undefined,
    sChanged: s?.lastTouch !== undefined,
    vChangedAfter: sE && isLater(v?.lastTouch, s!.expunged),
    sChangedAfter: vE && isLater(s?.lastTouch, v!.expunged),
  });
}

/** Existence, folder (before merges of folders) and flags of one message. */
function decideMessage(l: Logical, user: string, out: PlanBuilder): void {
  const { v, s } = l;
  const keep = existence(l);
  l.keep = keep;
  const sha = v?.sha256 ?? s?.sha256;
  const ids = { victimEvents: v?.events ?? [], survivorEvents: s?.events ?? [] };
  if (keep.out === "gone") {
    if (s?.status === "present") out.entry({ rule: keep.rule, outcome: "removed", says: `${keep.says}: expunged on the survivor`, user, mailbox: s.loc.mailbox, key: s.loc.key, sha256: sha, ...ids });
    else if (v?.status === "present" && (keep.conflict || l.kind === "new"))
      out.entry({ rule: keep.rule, outcome: "not-carried-over", says: `${keep.says}: the victim's copy is not brought over`, user, mailbox: v.loc.mailbox, key: v.loc.key, sha256: sha, ...ids });
    else if (keep.conflict) out.entry({ rule: keep.rule, outcome: "conflict", says: keep.says, user, sha256: sha, ...ids });
    return;
  }
  if (keep.conflict) out.entry({ rule: keep.rule, outcome: "conflict", says: keep.says, user, sha256: sha, ...ids });

  const vHas = has(v);
  const sHas = has(s);
  const vMoved = vHas && v.lastMove !== undefined;
  const sMoved = sHas && s.lastMove !== undefined;
  const where = decide(MESSAGE_LOCATION, {
    vHas,
    sHas,
    vMoved,
    sMoved,
    later: vMoved && sMoved ? (isLater(v.lastMove, s.lastMove) ? "victim" : "survivor") : null,
    sameFolder: vHas && sHas && v.loc.mailbox === s.loc.mailbox,
  });
  const from = where.out === "victim" ? v : where.out === "survivor" ? s : sHas ? s : v;
  l.folder = must(from, "a kept message that neither side has").loc.mailbox;
  if (where.conflict && vHas && sHas && v.loc.mailbox !== s.loc.mailbox)
    out.entry({ rule: where.rule, outcome: "conflict", says: where.says, user, mailbox: l.folder, sha256: sha, victimEvents: v.events, survivorEvents: s.events });

  const merged = mergeFlags(l, keep);
  for (const c of merged.conflicts)
    out.entry({ rule: c.d.rule, outcome: "conflict", says: `${c.d.says}: ${c.flag} ${c.value ? "set" : "cleared"}`, user, mailbox: l.folder, sha256: sha, flag: c.flag, victimEvents: [c.v], survivorEvents: [c.s] });
  l.flags = merged.flags;
}

/** The message's flags after the merge, flag by flag (flags table); a losing expunge's own \Deleted does not come back. */
function mergeFlags(l: Logical, keep: Decision<Keep>): { flags: string[]; conflicts: { flag: string; value: boolean; d: Decision<Pick>; v: string; s: string }[] } {
  const { v, s } = l;
  const ignoreDeleted: Side | null = keep.rule === "message-existence/expunge-loses-to-later-change" ? (v?.status === "expunged" ? "victim" : "survivor") : null;
  const change = (h: Half | undefined, f: string): (Stamp & { value: boolean }) | undefined => {
    if (!h || (f === DELETED_FLAG && h.side === ignoreDeleted)) return undefined;
    const c = h.flagChanges.get(f);
    if (c) return c;
    return h.created && h.created.flags.includes(f) ? { hlc: h.created.hlc, id: h.created.id, value: true } : undefined;
  };
  const valueOf = (h: Half | undefined, f: string, c: { value: boolean } | undefined): boolean => (h?.status === "present" ? h.state!.flags.includes(f) : (c?.value ?? false));
  const names = new Set<string>();
  for (const h of [v, s]) {
    if (!h) continue;
    for (const f of h.state?.flags ?? []) names.add(f);
    for (const f of h.flagChanges.keys()) names.add(f);
    for (const f of h.created?.flags ?? []) names.add(f);
  }
  const flags: string[] = [];
  const conflicts: { flag: string; value: boolean; d: Decision<Pick>; v: string; s: string }[] = [];
  for (const f of [...names].sort(byString)) {
    if (IGNORED_FLAGS.has(f)) continue;
    const vc = change(v, f);
    const sc = change(s, f);
    const vVal = valueOf(v, f, vc);
    const sVal = valueOf(s, f, sc);
    const d = decide(FLAGS, { victim: vc !== undefined, survivor: sc !== undefined, later: vc && sc ? (isLater(vc, sc) ? "victim" : "survivor") : null, agree: vc !== undefined && sc !== undefined && vVal === sVal });
    const base = s?.status === "present" ? sVal : v?.status === "present" ? vVal : false;
    const value = d.out === "victim" || d.out === "either" ? vVal : d.out === "survivor" ? sVal : base;
    if (d.conflict) conflicts.push({ flag: f, value, d, v: vc!.id, s: sc!.id });
    if (value) flags.push(f);
  }
  return { flags, conflicts };
}

// ---------------------------------------------------------------- one user's mail: folders

interface FolderDecision {
  readonly guid: string;
  readonly v: FolderStatus;
  readonly s: FolderStatus;
  readonly keep: boolean;
  readonly preSplit: boolean;
  name: string;
  /** The side whose name it took, and when that name was given (undefined: before the split). */
  nameFrom: Side | null;
  claim?: Stamp;
  /** The folder it merges into. */
  into?: string;
}

/** The journal event that gave a folder its name on one side: its last rename or its create, unless that side deleted it afterwards. */
function namedBy(h: FolderHistory | undefined): (Stamp & { readonly name: string }) | undefined {
  const n = h?.renamed ?? h?.created;
  return n !== undefined && !isLater(h?.deleted, n) ? n : undefined;
}

function decideFolders(user: string, V: SideMail, S: SideMail, list: readonly Logical[], out: PlanBuilder): Map<string, FolderDecision> {
  const guids = new Set<string>([...Object.keys(V.state?.mailboxes ?? {}), ...Object.keys(S.state?.mailboxes ?? {}), ...V.folders.keys(), ...S.folders.keys()]);
  const needed = new Set<string>();
  for (const l of list) {
    if (l.keep?.out !== "keep") continue;
    const f = must(l.folder, "kept message without folder");
    needed.add(f);
    guids.add(f);
  }
  const status = (m: SideMail, g: string): FolderStatus => (own(m.state?.mailboxes, g) ? "present" : m.folders.get(g)?.deleted ? "deleted" : "none");
  const decisions = new Map<string, FolderDecision>();
  for (const guid of [...guids].sort(byString)) {
    const vh = V.folders.get(guid);
    const sh = S.folders.get(guid);
    const v = status(V, guid);
    const s = status(S, guid);
    const ids = { victimEvents: vh?.events ?? [], survivorEvents: sh?.events ?? [] };
    const e = decide(FOLDER_EXISTENCE, {
      v,
      s,
      vRenamedAfter: v === "present" && s === "deleted" && isLater(vh?.renamed, sh?.deleted),
      sRenamedAfter: s === "present" && v === "deleted" && isLater(sh?.renamed, vh?.deleted),
      needed: needed.has(guid),
    });
    // A side's name is the one its journal gave (the worker's renames on the survivor are not the user's), else the state's.
    const vName = v === "present" ? (namedBy(vh)?.name ?? own(V.state?.mailboxes, guid)?.name) : undefined;
    const sName = s === "present" ? (namedBy(sh)?.name ?? own(S.state?.mailboxes, guid)?.name) : undefined;
    const d: FolderDecision = { guid, v, s, keep: e.out === "keep", preSplit: !vh?.created && !sh?.created, name: sName ?? vName ?? "", nameFrom: null };
    decisions.set(guid, d);
    if (e.conflict) out.entry({ rule: e.rule, outcome: "conflict", says: e.says, user, mailbox: guid, name: sName ?? vName, ...ids });
    else if (e.rule === "folder-existence/known-only-from-mail") out.entry({ rule: e.rule, outcome: "note", says: e.says, user, mailbox: guid, ...ids });
    if (!d.keep) {
      if (s === "present") out.entry({ rule: e.rule, outcome: "removed", says: "deleted on the victim: the folder is deleted on the survivor", user, mailbox: guid, name: sName, ...ids });
      continue;
    }
    const vRen = v === "present" ? namedBy(vh) : undefined;
    const sRen = s === "present" ? namedBy(sh) : undefined;
    const n = decide(FOLDER_NAME, {
      vHas: v === "present",
      sHas: s === "present",
      vRenamed: vRen !== undefined,
      sRenamed: sRen !== undefined,
      later: vRen && sRen ? (isLater(vRen, sRen) ? "victim" : "survivor") : null,
      sameName: v === "present" && s === "present" && (vName === sName || (vRen === undefined && sRen === undefined)),
    });
    if (n.out === "neither") {
      const last = [vh?.created, vh?.renamed, sh?.created, sh?.renamed].reduce(latest, undefined);
      d.name = last?.name ?? `Recovered folder ${guid.slice(0, 8)}`;
      d.claim = last;
    } else {
      d.nameFrom = n.out === "victim" ? "victim" : n.out === "survivor" ? "survivor" : s === "present" ? "survivor" : "victim";
      d.name = must(d.nameFrom === "victim" ? vName : sName, `folder ${guid} without a name`);
      d.claim = d.nameFrom === "victim" ? vRen : sRen;
    }
    if (n.conflict && vName !== sName) out.entry({ rule: n.rule, outcome: "conflict", says: `${n.says}: "${d.name}" (not "${d.nameFrom === "victim" ? sName : vName}")`, user, mailbox: guid, name: d.name, ...ids });
  }
  resolveCollisions(user, decisions, V, S, out);
  return decisions;
}

/** Two kept folders never share a name: a new one merges into the other, or a rename falls back (name-collision table). */
function resolveCollisions(user: string, decisions: Map<string, FolderDecision>, V: SideMail, S: SideMail, out: PlanBuilder): void {
  const kept = () => [...decisions.values()].filter((d) => d.keep && d.into === undefined);
  const rounds = kept().length + 2;
  for (let round = 0; round < rounds; round++) {
    const byName = new Map<string, FolderDecision[]>();
    for (const d of kept()) byName.set(d.name, [...(byName.get(d.name) ?? []), d]);
    const clashes = [...byName].filter(([, ds]) => ds.length > 1).sort(([a], [b]) => byString(a, b));
    if (clashes.length === 0) return;
    for (const [name, ds] of clashes) {
      const older = (a: FolderDecision, b: FolderDecision) => (a.claim === undefined ? (b.claim === undefined ? byString(a.guid, b.guid) : -1) : b.claim === undefined ? 1 : cmpStamp(a.claim, b.claim) || byString(a.guid, b.guid));
      const pre = ds.filter((d) => d.preSplit).sort(older);
      const fresh = ds.filter((d) => !d.preSplit);
      const survivorHolds = fresh.filter((d) => d.s === "present").sort(older);
      const keeper = must(pre[0] ?? survivorHolds[0] ?? [...fresh].sort(older)[0], "collision without folders");
      for (const d of ds) {
        if (d === keeper) continue;
        const ids = { victimEvents: V.folders.get(d.guid)?.events ?? [], survivorEvents: S.folders.get(d.guid)?.events ?? [] };
        const c = decide(NAME_COLLISION, { newFolder: !d.preSplit });
        if (c.out === "merge") {
          d.into = keeper.guid;
          out.entry({ rule: c.rule, outcome: "conflict", says: `${c.says}: "${name}" (${d.guid} into ${keeper.guid})`, user, mailbox: d.guid, name, ...ids });
          continue;
        }
        const taken = new Set(kept().filter((x) => x !== d).map((x) => x.name));
        const otherSide = d.nameFrom === null ? null : other(d.nameFrom);
        const otherHist = otherSide === "victim" ? V : otherSide === "survivor" ? S : undefined;
        const h = otherHist?.folders.get(d.guid);
        const otherName = otherHist && own(otherHist.state?.mailboxes, d.guid) ? (namedBy(h)?.name ?? own(otherHist.state?.mailboxes, d.guid)?.name) : undefined;
        const choices = [otherName, `${name}~${d.guid.slice(0, 8)}`, `${name}~${d.guid}`];
        const fallback = must(
          choices.find((x) => x !== undefined && x !== name && !taken.has(x)),
          `no free name for folder ${d.guid} of ${user}`,
        );
        out.entry({ rule: c.rule, outcome: "conflict", says: `${c.says}: "${name}" stays with ${keeper.guid}, ${d.guid} is "${fallback}"`, user, mailbox: d.guid, name: fallback, ...ids });
        d.name = fallback;
        d.nameFrom = otherSide;
        d.claim = undefined;
      }
    }
  }
  throw new Error(`reconcile: folder names of ${user} still collide after ${rounds} rounds`);
}

function folderOf(decisions: ReadonlyMap<string, FolderDecision>, guid: string): FolderDecision {
  let d = must(decisions.get(guid), `no decision for folder ${guid}`);
  for (let i = 0; d.into !== undefined; i++) {
    if (i > decisions.size) throw new Error(`reconcile: folder ${guid} merges into itself`);
    d = must(decisions.get(d.into), `no decision for folder ${d.into}`);
  }
  return d;
}

/** Creates and renames in an order in which every target name is free (a folder in the way is first moved aside). */
function scheduleFolders(user: string, decisions: ReadonlyMap<string, FolderDecision>, survivor: UserMailState | undefined, out: PlanBuilder): void {
  const current = new Map<string, string>();
  for (const [g, mb] of Object.entries(survivor?.mailboxes ?? {})) current.set(g, mb.name);
  const wanted = new Map<string, string>();
  for (const d of decisions.values()) if (d.keep && d.into === undefined) wanted.set(d.guid, d.name);
  const pending = [...wanted.keys()].filter((g) => current.get(g) !== wanted.get(g)).sort(byString);
  const holder = new Map<string, string>();
  for (const [g, n] of current) holder.set(n, g);
  const emit = (g: string, name: string) => {
    const was = current.get(g);
    if (was === undefined) out.add("folders", { op: "mailbox-create", user, guid: g, name }, { user, name });
    else {
      out.add("folders", { op: "mailbox-rename", user, guid: g, from: was, name }, { user, name });
      holder.delete(was);
    }
    current.set(g, name);
    holder.set(name, g);
  };
  const rounds = 2 * (pending.length + current.size) + 2;
  for (let round = 0; pending.length > 0; round++) {
    if (round > rounds) throw new Error(`reconcile: folder renames of ${user} do not converge`);
    const ready = pending.filter((g) => {
      const h = holder.get(wanted.get(g)!);
      return h === undefined || h === g;
    });
    for (const g of ready) {
      emit(g, wanted.get(g)!);
      pending.splice(pending.indexOf(g), 1);
    }
    if (ready.length > 0) continue;
    // Every target is held by a folder that is itself renamed or going away: move one aside.
    const g = pending[0]!;
    const h = holder.get(wanted.get(g)!)!;
    if (wanted.get(h) === current.get(h)) throw new Error(`reconcile: folder ${h} of ${user} keeps the name ${current.get(h)} that ${g} needs`);
    let temp = `${current.get(h)}~${h.slice(0, 8)}`;
    for (let i = 0; holder.has(temp) || [...wanted.values()].includes(temp); i++) {
      if (i > 8) throw new Error(`reconcile: no temporary name for folder ${h} of ${user}`);
      temp += "~";
    }
    emit(h, temp);
    if (!pending.includes(h) && wanted.has(h)) pending.push(h);
  }
}

// ---------------------------------------------------------------- one user's mail: the operations

interface Stray {
  readonly user: string;
  readonly l: Logical;
}

function mergeUser(user: string, input: MergeInput, vEvents: readonly MailEvent[], sEvents: readonly MailEvent[], userExists: boolean, lostFound: boolean, out: PlanBuilder, strays: Stray[]): void {
  const vState = own(input.victim.mail, user);
  const sState = own(input.survivor.mail, user);
  const V = replay("victim", user, vEvents, vState, out);
  const S = replay("survivor", user, sEvents, sState, out);
  const { list, candidates } = assemble(user, V, S, out);
  claim(list, candidates);
  for (const l of list) decideMessage(l, user, out);
  const folders = decideFolders(user, V, S, list, out);

  if (!userExists) {
    let skipped = 0;
    const kept = list.filter((l) => l.keep?.out === "keep" && l.s?.status === "present" && l.s.origin === "new").length;
    for (const l of list) {
      if (l.keep?.out !== "keep" || l.s?.status === "present" || l.v?.status !== "present") continue;
      const d = decide(USER_GONE, { newMessage: l.kind === "new" || l.kind === "unjournaled", lostFound });
      if (d.out === "lost-found") strays.push({ user, l });
      else if (d.out === "stranded") out.entry({ rule: d.rule, outcome: "stranded", says: d.says, user, mailbox: l.v.loc.mailbox, key: l.v.loc.key, sha256: l.v.sha256, victimEvents: l.v.events });
      else skipped++;
    }
    if (vEvents.length > 0 || skipped > 0 || kept > 0)
      out.entry({
        rule: "user-gone/skipped",
        outcome: "skipped",
        says: `${USER_GONE.rows[2]!.says} (${vEvents.length} victim changes not applied, ${skipped} old messages the survivor no longer has not restored; ${kept} messages delivered on the survivor since the split stay in that mail directory)`,
        user,
        victimEvents: vEvents.map((e) => e.id),
      });
    return;
  }

  scheduleFolders(user, folders, sState, out);
  const nameOf = (guid: string) => folderOf(folders, guid).name;

  // Subscriptions (by name, as IMAP has them).
  const vSubs = new Set(vState?.subscriptions ?? []);
  const sSubs = new Set(sState?.subscriptions ?? []);
  for (const name of [...new Set([...V.subs.keys(), ...S.subs.keys()])].sort(byString)) {
    const vc = V.subs.get(name);
    const sc = S.subs.get(name);
    const d = decide(SUBSCRIPTIONS, { victim: vc !== undefined, survivor: sc !== undefined, later: vc && sc ? (isLater(vc, sc) ? "victim" : "survivor") : null, agree: vc !== undefined && sc !== undefined && vSubs.has(name) === sSubs.has(name) });
    const value = d.out === "victim" || d.out === "either" ? vSubs.has(name) : sSubs.has(name);
    if (d.conflict && vSubs.has(name) !== sSubs.has(name)) out.entry({ rule: d.rule, outcome: "conflict", says: d.says, user, name, victimEvents: [vc!.id], survivorEvents: [sc!.id] });
    if (value !== sSubs.has(name)) out.add("subscriptions", { op: "subscribe", user, name, subscribed: value });
  }

  // Messages.
  for (const l of [...list].sort((a, b) => byString(a.id, b.id))) {
    const s = l.s?.status === "present" ? l.s : undefined;
    if (l.keep?.out === "gone") {
      if (!s) continue;
      const f = folders.get(s.loc.mailbox);
      // A folder the plan deletes takes its messages with it.
      if (f && !f.keep) continue;
      out.add("expunges", { op: "expunge", user, mailbox: s.loc.mailbox, key: s.loc.key, sha256: must(s.sha256, "message without content hash") }, { user, name: nameOf(s.loc.mailbox) });
      continue;
    }
    const target = folderOf(folders, must(l.folder, "kept message without folder")).guid;
    const flags = must(l.flags, "kept message without flags");
    const where = { user, name: nameOf(target) };
    if (s) {
      const now = new Set(s.state!.flags.filter((f) => !IGNORED_FLAGS.has(f)));
      const want = new Set(flags);
      const add = flags.filter((f) => !now.has(f));
      const remove = [...now].filter((f) => !want.has(f)).sort(byString);
      if (add.length || remove.length) out.add("flags", { op: "set-flags", user, mailbox: s.loc.mailbox, key: s.loc.key, add, remove }, where);
      if (s.loc.mailbox !== target) out.add("moves", { op: "move", user, from: s.loc.mailbox, to: target, key: s.loc.key, sha256: must(s.sha256, "message without content hash") }, where);
      continue;
    }
    const src = l.v?.status === "present" ? l.v : undefined;
    if (!src) {
      // Gone from both sides' files: an expunge (a POP3 DELE, say) that no journal had
      // recorded when the state was read, or mail that arrived after the survivor was
      // read. Nothing can be restored from nowhere; the plan stays complete.
      out.entry({ rule: l.keep!.rule, outcome: "note", says: "the journals say the message should stay, but neither side has its file (an expunge not journaled yet, or mail that arrived while the survivor was read): nothing to do", user, mailbox: target, sha256: l.v?.sha256 ?? l.s?.sha256, victimEvents: l.v?.events ?? [], survivorEvents: l.s?.events ?? [] });
      continue;
    }
    const restore = l.kind === "pre" || l.s !== undefined;
    const qid = src.state?.queueId;
    out.add(
      "adds",
      { op: restore ? "restore-message" : "add-message", user, mailbox: target, source: { user, mailbox: src.loc.mailbox, key: src.loc.key }, sha256: must(src.sha256, "message without content hash"), flags, ...(qid !== undefined ? { queueId: qid } : {}) },
      where,
    );
    if (restore)
      out.entry({ rule: l.keep!.rule, outcome: "note", says: "the survivor no longer has this message, and it stays: restored from the victim's copy (a new UID)", user, mailbox: target, key: src.loc.key, sha256: src.sha256, victimEvents: src.events, survivorEvents: l.s?.events ?? [] });
  }

  // Folders last: deleted (and merged-away) folders after their messages moved out.
  for (const d of [...folders.values()].sort((a, b) => byString(a.guid, b.guid))) {
    if (d.s !== "present" || (d.keep && d.into === undefined)) continue;
    const name = own(sState?.mailboxes, d.guid)!.name;
    // The name is for the reader; a temporary rename earlier in the plan must not change the id.
    out.add("deletes", { op: "mailbox-delete", user, guid: d.guid, name }, { user, name }, { op: "mailbox-delete", user, guid: d.guid });
  }
}

// ---------------------------------------------------------------- lost+found

/** Dovecot GUIDs are 128-bit hex: this one is derived from the address, the same on every plan. */
export function lostFoundGuid(address: string): string {
  return createHash("sha256").update(`mailha lost+found\u0000${address}`).digest("hex").slice(0, 32);
}

/** Mail for users who do not exist after the merge, into the postmaster's Recovered/<address> (user-gone/to-lost-found). */
function planLostFound(strays: readonly Stray[], input: MergeInput, pm: string | undefined, out: PlanBuilder): void {
  const byUser = new Map<string, Logical[]>();
  for (const st of strays) byUser.set(st.user, [...(byUser.get(st.user) ?? []), st.l]);
  if (byUser.size === 0) return;
  if (pm === undefined) throw new Error("reconcile: mail for lost+found without a postmaster");
  const d = decide(USER_GONE, { newMessage: true, lostFound: true });
  for (const [user, ls] of [...byUser].sort(([a], [b]) => byString(a, b))) {
    const pmState = own(input.survivor.mail, pm);
    const name = `${LOST_FOUND_PREFIX}${user}`;
    let guid = lostFoundGuid(user);
    const byName = Object.entries(pmState?.mailboxes ?? {}).find(([, mb]) => mb.name === name)?.[0];
    if (own(pmState?.mailboxes, guid) === undefined) {
      if (byName !== undefined) guid = byName;
      else out.add("folders", { op: "mailbox-create", user: pm, guid, name }, { user: pm, name });
    }
    const there = new Map<string, number>();
    for (const m of Object.values(own(pmState?.mailboxes, guid)?.messages ?? {})) there.set(m.sha256, (there.get(m.sha256) ?? 0) + 1);
    for (const l of [...ls].sort((a, b) => byString(a.id, b.id))) {
      const v = l.v!;
      const sha = must(v.sha256, "message without content hash");
      out.entry({ rule: d.rule, outcome: "redirected", says: d.says, user, mailbox: v.loc.mailbox, key: v.loc.key, sha256: sha, victimEvents: v.events });
      const n = there.get(sha) ?? 0;
      if (n > 0) {
        there.set(sha, n - 1);
        continue;
      }
      const qid = v.state?.queueId;
      out.add("adds", { op: "add-message", user: pm, mailbox: guid, source: { user, mailbox: v.loc.mailbox, key: v.loc.key }, sha256: sha, flags: must(l.flags, "flags"), ...(qid !== undefined ? { queueId: qid } : {}) }, { user: pm, name });
    }
  }
}

// ---------------------------------------------------------------- the merge

/**
 * The plan that merges the victim's changes since the split into the survivor. Pure:
 * the same input gives the same plan, with the same operation ids.
 */
export function merge(input: MergeInput, options: MergeOptions = {}): Plan {
  const kinds = options.kinds ?? NO_KINDS;
  checkState(input.victim, "victim");
  checkState(input.survivor, "survivor");
  const v = splitEvents(input.victimEvents, "victim");
  const s = splitEvents(input.survivorEvents, "survivor");
  const out = new PlanBuilder();

  const accounts = mergeAccounts(input, v.account, s.account, out);

  const users = new Set<string>([...Object.keys(input.victim.mail), ...Object.keys(input.survivor.mail), ...v.mail.keys(), ...s.mail.keys()]);
  const strays: Stray[] = [];
  const pm = options.lostFound?.user;
  const lostFound = pm !== undefined && accounts.userExists(pm);
  for (const user of [...users].sort(byString)) mergeUser(user, input, v.mail.get(user) ?? [], s.mail.get(user) ?? [], accounts.userExists(user), lostFound, out, strays);
  planLostFound(strays, input, lostFound ? pm : undefined, out);

  for (const [kind, handler] of [...kinds].sort(([a], [b]) => byString(a, b))) {
    const victim = v.other.get(kind) ?? [];
    const known = new Set(victim.map((e) => e.id));
    const steps = handler.plan({ victim, survivor: s.other.get(kind) ?? [], victimState: input.victim, survivorState: input.survivor });
    for (const st of steps) {
      if (st.sources.length === 0 || !st.sources.every((id) => known.has(id))) throw new Error(`reconcile: the ${kind} handler names sources that are not victim ${kind} events`);
      out.add("extensions", { op: "extension", kind, sources: [...st.sources].sort(byString), payload: st.payload });
    }
  }
  for (const [kind, evs] of [...v.other].sort(([a], [b]) => byString(a, b))) {
    if (kinds.has(kind)) continue;
    out.entry({ rule: "journal/unknown-kind", outcome: "stranded", says: `${evs.length} victim events of a kind no handler is registered for: not merged`, victimEvents: evs.slice(0, 20).map((e) => e.id) });
  }
  return out.finish(v, s);
}
