// The reconciliation's world in memory: a replica that does what users, SMTP and the
// operator do (deliver, append, flag, expunge, move, copy, folders, subscriptions,
// account rows) to its copy of the state and writes the journal events with its own
// hybrid logical clock; a pure `applyPlan` that plays a plan on a state the way the
// worker would through Dovecot (new keys and UIDs for added messages, refusing an
// operation that does not fit the state); the projection two merged states are
// compared by; and seeded random histories for the property tests.
import { HlcClock } from "../../common/hlc.ts";
import type { AccountTable, JournalEvent, MailboxState, MessageState, Operation, Scalar, SideState, UserMailState } from "../../reconcile/model.ts";
import { rng } from "./volume-sim.ts";

type Mutable<T> = T extends readonly (infer U)[] ? Mutable<U>[] : T extends object ? { -readonly [K in keyof T]: Mutable<T[K]> } : T;
export type MutState = Mutable<SideState>;

export const clone = <T>(x: T): T => JSON.parse(JSON.stringify(x)) as T;

export function emptyState(): MutState {
  return { mail: {}, accounts: { domains: {}, users: {}, aliases: {} } };
}

const own = <T>(rec: Record<string, T>, k: string): T | undefined => (Object.hasOwn(rec, k) ? rec[k] : undefined);

function userMail(st: MutState, user: string): Mutable<UserMailState> {
  return (st.mail[user] ??= { mailboxes: {}, subscriptions: [] });
}

export class SimError extends Error {}

/** One node's side of the split: its state and the journal it writes. */
export class Replica {
  readonly state: MutState;
  readonly events: JournalEvent[] = [];
  readonly clock: HlcClock;
  private seq = 0;
  private keys = 0;

  constructor(
    readonly node: string,
    base: SideState,
    now: () => number,
  ) {
    this.state = clone(base) as MutState;
    this.clock = new HlcClock(node, now);
  }

  private emit(kind: string, fields: Record<string, unknown>): JournalEvent {
    const e = { id: `${this.node}:1:${++this.seq}`, hlc: this.clock.tick(), kind, ...fields } as JournalEvent;
    this.events.push(e);
    return e;
  }

  /** A Maildir base name of this node's. */
  newKey(): string {
    return `${this.node}-k${++this.keys}`;
  }

  mailbox(user: string, guid: string): Mutable<MailboxState> {
    const mb = own(userMail(this.state, user).mailboxes, guid);
    if (!mb) throw new SimError(`${this.node}: ${user} has no mailbox ${guid}`);
    return mb;
  }

  guidOf(user: string, name: string): string {
    const hit = Object.entries(userMail(this.state, user).mailboxes).find(([, mb]) => mb.name === name);
    if (!hit) throw new SimError(`${this.node}: ${user} has no mailbox named ${name}`);
    return hit[0];
  }

  private put(user: string, guid: string, key: string, msg: Mutable<MessageState>): void {
    const mb = this.mailbox(user, guid);
    if (Object.hasOwn(mb.messages, key)) throw new SimError(`${this.node}: ${key} exists`);
    const uid = Math.max(0, ...Object.values(mb.messages).map((m) => m.uid ?? 0)) + 1;
    mb.messages[key] = { ...msg, uid };
  }

  message(user: string, guid: string, key: string): Mutable<MessageState> {
    const m = own(this.mailbox(user, guid).messages, key);
    if (!m) throw new SimError(`${this.node}: no message ${key} in ${guid}`);
    return m;
  }

  deliver(user: string, guid: string, o: { sha256: string; queueId?: string; flags?: string[]; messageId?: string }): string {
    const key = this.newKey();
    this.put(user, guid, key, { sha256: o.sha256, flags: [...(o.flags ?? [])], ...(o.queueId !== undefined ? { queueId: o.queueId } : {}), ...(o.messageId !== undefined ? { messageId: o.messageId } : {}) });
    this.emit("delivery", { user, mailbox: guid, key, sha256: o.sha256, ...(o.queueId !== undefined ? { queueId: o.queueId } : {}), flags: [...(o.flags ?? [])] });
    return key;
  }

  append(user: string, guid: string, sha256: string, flags: string[] = []): string {
    const key = this.newKey();
    this.put(user, guid, key, { sha256, flags: [...flags] });
    this.emit("append", { user, mailbox: guid, key, sha256, flags: [...flags] });
    return key;
  }

  flag(user: string, guid: string, key: string, add: string[], remove: string[] = []): void {
    const m = this.message(user, guid, key);
    m.flags = [...new Set([...m.flags, ...add])].filter((f) => !remove.includes(f)).sort();
    this.emit("flags", { user, mailbox: guid, key, add, remove });
  }

  expunge(user: string, guid: string, key: string): void {
    this.message(user, guid, key);
    delete this.mailbox(user, guid).messages[key];
    this.emit("expunge", { user, mailbox: guid, key });
  }

  move(user: string, from: string, key: string, to: string): string {
    const m = this.message(user, from, key);
    const newKey = this.newKey();
    delete this.mailbox(user, from).messages[key];
    this.put(user, to, newKey, { ...m });
    this.emit("move", { user, from, to, key, newKey, sha256: m.sha256 });
    return newKey;
  }

  copy(user: string, from: string, key: string, to: string): string {
    const m = this.message(user, from, key);
    const newKey = this.newKey();
    this.put(user, to, newKey, { ...m, flags: [...m.flags] });
    this.emit("copy", { user, from, to, key, newKey, sha256: m.sha256, flags: [...m.flags] });
    return newKey;
  }

  createMailbox(user: string, name: string, guid: string): string {
    const u = userMail(this.state, user);
    if (Object.values(u.mailboxes).some((mb) => mb.name === name)) throw new SimError(`${this.node}: ${name} exists`);
    u.mailboxes[guid] = { name, uidValidity: 1000 + this.seq, messages: {} };
    this.emit("mailbox-create", { user, guid, name });
    return guid;
  }

  renameMailbox(user: string, guid: string, name: string): void {
    const u = userMail(this.state, user);
    if (Object.values(u.mailboxes).some((mb) => mb.name === name)) throw new SimError(`${this.node}: ${name} exists`);
    this.mailbox(user, guid).name = name;
    this.emit("mailbox-rename", { user, guid, name });
  }

  /** As Dovecot does it: the messages are expunged first (journaled), then the folder goes. */
  deleteMailbox(user: string, guid: string): void {
    for (const key of Object.keys(this.mailbox(user, guid).messages).sort()) this.expunge(user, guid, key);
    delete userMail(this.state, user).mailboxes[guid];
    this.emit("mailbox-delete", { user, guid });
  }

  subscribe(user: string, name: string, on: boolean): void {
    const u = userMail(this.state, user);
    u.subscriptions = on ? [...new Set([...u.subscriptions, name])].sort() : u.subscriptions.filter((n) => n !== name);
    this.emit(on ? "subscribe" : "unsubscribe", { user, name });
  }

  /** Writes COLUMNS into the row (creating it), or deletes it (null). */
  account(table: AccountTable, key: string, columns: Record<string, Scalar> | null): void {
    const rows = this.state.accounts[table];
    if (columns === null) {
      delete rows[key];
      this.emit("account", { table, key, columns: {}, deleted: true });
    } else {
      rows[key] = { ...(own(rows, key) ?? {}), ...columns };
      this.emit("account", { table, key, columns });
    }
  }

  /** Any other event kind (an extension's). */
  other(kind: string, payload: unknown): JournalEvent {
    return this.emit(kind, { payload });
  }

  final(): SideState {
    return clone(this.state);
  }
}

/**
 * The plan played on a copy of SURVIVOR as the worker would play it; VICTIM is the
 * preserved copy the files come from. Throws SimError on an operation that does not fit.
 */
export function applyPlan(survivor: SideState, ops: readonly Operation[], victim: SideState, extensions: Operation[] = []): SideState {
  const st = clone(survivor) as MutState;
  let n = 0;
  const mbOf = (user: string, guid: string) => {
    const mb = own(st.mail[user]?.mailboxes ?? {}, guid);
    if (!mb) throw new SimError(`${user} has no mailbox ${guid}`);
    return mb;
  };
  const msgOf = (user: string, guid: string, key: string) => {
    const m = own(mbOf(user, guid).messages, key);
    if (!m) throw new SimError(`${user} has no message ${key} in ${guid}`);
    return m;
  };
  const nameTaken = (user: string, name: string) => Object.values(st.mail[user]?.mailboxes ?? {}).some((mb) => mb.name === name);
  const put = (user: string, guid: string, msg: Mutable<MessageState>) => {
    const mb = mbOf(user, guid);
    const uid = Math.max(0, ...Object.values(mb.messages).map((m) => m.uid ?? 0)) + 1;
    // A new Maildir name, as Dovecot would choose: never one that exists (earlier passes made some).
    let key = `r${++n}-${guid.slice(0, 6)}`;
    for (let i = 0; Object.hasOwn(mb.messages, key); i++) {
      if (i > 10_000) throw new SimError("no free key");
      key = `r${++n}-${guid.slice(0, 6)}`;
    }
    mb.messages[key] = { ...msg, uid };
  };
  for (const op of ops) {
    switch (op.op) {
      case "account-set": {
        const rows = st.accounts[op.table];
        if (op.create !== !Object.hasOwn(rows, op.key)) throw new SimError(`account-set ${op.table}/${op.key}: create=${op.create} but the row ${op.create ? "exists" : "does not exist"}`);
        rows[op.key] = { ...(own(rows, op.key) ?? {}), ...op.columns };
        break;
      }
      case "account-delete":
        if (!Object.hasOwn(st.accounts[op.table], op.key)) throw new SimError(`account-delete of a missing row ${op.key}`);
        delete st.accounts[op.table][op.key];
        break;
      case "mailbox-create": {
        const u = userMail(st, op.user);
        if (Object.hasOwn(u.mailboxes, op.guid)) throw new SimError(`mailbox-create: ${op.guid} exists`);
        if (nameTaken(op.user, op.name)) throw new SimError(`mailbox-create: the name ${op.name} is taken`);
        u.mailboxes[op.guid] = { name: op.name, uidValidity: 900_000 + n++, messages: {} };
        break;
      }
      case "mailbox-rename": {
        const mb = mbOf(op.user, op.guid);
        if (mb.name !== op.from) throw new SimError(`mailbox-rename: ${op.guid} is ${mb.name}, not ${op.from}`);
        if (nameTaken(op.user, op.name)) throw new SimError(`mailbox-rename: the name ${op.name} is taken`);
        mb.name = op.name;
        break;
      }
      case "mailbox-delete":
        mbOf(op.user, op.guid);
        delete st.mail[op.user]!.mailboxes[op.guid];
        break;
      case "subscribe": {
        const u = userMail(st, op.user);
        u.subscriptions = op.subscribed ? [...new Set([...u.subscriptions, op.name])].sort() : u.subscriptions.filter((x) => x !== op.name);
        break;
      }
      case "set-flags": {
        const m = msgOf(op.user, op.mailbox, op.key);
        m.flags = [...new Set([...m.flags, ...op.add])].filter((f) => !op.remove.includes(f)).sort();
        break;
      }
      case "move": {
        const m = msgOf(op.user, op.from, op.key);
        if (m.sha256 !== op.sha256) throw new SimError(`move: ${op.key} has other content`);
        delete mbOf(op.user, op.from).messages[op.key];
        put(op.user, op.to, { ...m });
        break;
      }
      case "add-message":
      case "restore-message": {
        const src = own(own(victim.mail[op.source.user]?.mailboxes ?? {}, op.source.mailbox)?.messages ?? {}, op.source.key);
        if (!src) throw new SimError(`${op.op}: the victim has no ${op.source.key} in ${op.source.mailbox}`);
        if (src.sha256 !== op.sha256) throw new SimError(`${op.op}: ${op.source.key} has other content`);
        put(op.user, op.mailbox, { sha256: src.sha256, flags: [...op.flags].sort(), ...(src.queueId !== undefined ? { queueId: src.queueId } : {}) });
        break;
      }
      case "expunge": {
        const m = msgOf(op.user, op.mailbox, op.key);
        if (m.sha256 !== op.sha256) throw new SimError(`expunge: ${op.key} has other content`);
        delete mbOf(op.user, op.mailbox).messages[op.key];
        break;
      }
      case "extension":
        extensions.push(op);
        break;
    }
  }
  return st;
}

/**
 * What must match when the merge runs in either direction: account rows; for each user
 * that exists, the folders (by name, with the GUID for folders from before the split),
 * the messages of each folder by identity (queue id, else content) and sorted flags,
 * and the subscriptions. Keys and UIDs are not compared (new messages get the
 * survivor's), nor lost+found (each direction recovers the other side's mail).
 */
export function project(st: SideState, preSplitGuids: ReadonlySet<string>): string {
  const users = new Set(Object.keys(st.accounts.users));
  const out: string[] = [];
  for (const table of ["domains", "users", "aliases"] as const)
    for (const key of Object.keys(st.accounts[table]).sort()) {
      const row = st.accounts[table][key]!;
      out.push(`row ${table} ${key} ${JSON.stringify(Object.keys(row).sort().map((c) => [c, row[c]]))}`);
    }
  for (const user of Object.keys(st.mail).sort()) {
    if (!users.has(user)) continue;
    const u = st.mail[user]!;
    for (const [guid, mb] of Object.entries(u.mailboxes)) {
      if (mb.name.startsWith("Recovered/")) continue;
      out.push(`folder ${user} ${mb.name} ${preSplitGuids.has(guid) ? guid : "new"}`);
      for (const m of Object.values(mb.messages)) out.push(`message ${user} ${mb.name} ${m.queueId ?? m.sha256} ${[...m.flags].sort().join(" ")}`);
    }
    for (const s of u.subscriptions) out.push(`subscribed ${user} ${s}`);
  }
  return out.sort().join("\n");
}

/** Every message identity (queue id, else content) of USER across all folders, and in the Recovered/ folders of everyone. */
export function countIdentity(st: SideState, user: string, identity: string): number {
  let n = 0;
  for (const [who, u] of Object.entries(st.mail))
    for (const mb of Object.values(u.mailboxes)) {
      if (who !== user && mb.name !== `Recovered/${user}`) continue;
      for (const m of Object.values(mb.messages)) if ((m.queueId ?? m.sha256) === identity) n++;
    }
  return n;
}

// ---------------------------------------------------------------- random histories

export const SIM_USERS = ["alice@mailha.test", "bob@mailha.test", "carol@mailha.test"] as const;
export const POSTMASTER = "postmaster@mailha.test";
const NAMES = ["Archive", "Sent", "Drafts", "Lists.Work", "Trash", "Projects", "Receipts", "Travel", "Old", "Archive/2026"];
const FLAG_POOL = ["\\Seen", "\\Flagged", "\\Answered", "$Junk", "$Label1"];

/** A message delivered or appended since the split, for the check that it survives exactly once. */
export interface TruthItem {
  readonly user: string;
  /** The queue id for deliveries, the content for appends. */
  readonly identity: string;
  readonly sides: readonly ("a" | "b")[];
  /** Its content hash on each side that has it. */
  readonly shas: readonly string[];
  /** A copy of it was made on some side: it may legitimately be there more than once. */
  copies: number;
}

export interface RandomCase {
  readonly base: SideState;
  readonly a: Replica;
  readonly b: Replica;
  readonly truth: readonly TruthItem[];
  readonly preSplitGuids: ReadonlySet<string>;
  readonly steps: number;
}

export function randomCase(seed: number): RandomCase {
  const r = rng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  const chance = (p: number) => r() < p;
  const hex = () => Array.from({ length: 32 }, () => "0123456789abcdef"[Math.floor(r() * 16)]).join("");
  let g = 0;

  const base = emptyState();
  base.accounts.domains["mailha.test"] = { name: "mailha.test" };
  base.accounts.aliases["info@mailha.test>alice@mailha.test"] = { source: "info@mailha.test", destination: "alice@mailha.test" };
  const preSplitGuids = new Set<string>();
  for (const user of [...SIM_USERS, POSTMASTER]) {
    base.accounts.users[user] = { password: "h0", active: 1, quota: 1000 };
    const u = userMail(base, user);
    const names = ["INBOX", ...NAMES.filter(() => chance(0.25))];
    for (const name of names) {
      const guid = hex();
      preSplitGuids.add(guid);
      const messages: Record<string, Mutable<MessageState>> = {};
      const count = Math.floor(r() * 6);
      for (let i = 0; i < count; i++) messages[`base-${++g}`] = { sha256: `base-sha-${g}`, flags: FLAG_POOL.filter(() => chance(0.3)).sort(), uid: i + 1 };
      u.mailboxes[guid] = { name, uidValidity: 1_700_000_000 + g, messages };
    }
    u.subscriptions = names.filter(() => chance(0.6)).sort();
  }

  let t = 1_800_000_000_000;
  const skew = { a: Math.floor(r() * 4000) - 2000, b: Math.floor(r() * 4000) - 2000 };
  const a = new Replica("a", base, () => t + skew.a);
  const b = new Replica("b", base, () => t + skew.b);
  const truth: TruthItem[] = [];
  const byIdentity = new Map<string, TruthItem>();
  const note = (user: string, identity: string, sides: ("a" | "b")[], shas: string[]) => {
    const item = { user, identity, sides, shas, copies: 0 };
    truth.push(item);
    byIdentity.set(`${user} ${identity}`, item);
  };

  const alive = (x: Replica, user: string) => Object.hasOwn(x.state.accounts.users, user);
  const folders = (x: Replica, user: string) => Object.keys(x.state.mail[user]?.mailboxes ?? {}).sort();
  const inbox = (x: Replica, user: string) => x.guidOf(user, "INBOX");
  const messages = (x: Replica, user: string) => folders(x, user).flatMap((guid) => Object.keys(x.mailbox(user, guid).messages).sort().map((key) => ({ guid, key })));

  const steps = 5 + Math.floor(r() * 45);
  for (let step = 0; step < steps; step++) {
    t += Math.floor(r() * 3000);
    const side = chance(0.5) ? "a" : "b";
    const x = side === "a" ? a : b;
    const user = chance(0.1) ? POSTMASTER : pick(SIM_USERS);
    const roll = r() * 100;
    if (roll < 6) {
      // Account changes; a deleted user can come back.
      const who = pick(SIM_USERS);
      const q = r();
      if (!alive(x, who)) x.account("users", who, { password: `p${++g}`, active: 1, quota: 1000 });
      else if (q < 0.45) x.account("users", who, { password: `p${++g}` });
      else if (q < 0.65) x.account("users", who, { active: chance(0.5) ? 0 : 1, quota: 500 + Math.floor(r() * 1000) });
      else if (q < 0.85) x.account("users", who, null);
      else {
        const key = `team@mailha.test>${who}`;
        x.account("aliases", key, Object.hasOwn(x.state.accounts.aliases, key) ? null : { source: "team@mailha.test", destination: who });
      }
      continue;
    }
    if (!alive(x, user)) continue;
    const msgs = messages(x, user);
    const fs = folders(x, user);
    if (roll < 20) {
      const guid = chance(0.7) ? inbox(x, user) : pick(fs);
      const id = ++g;
      note(user, `q-${side}-${id}`, [side], [`m-${id}`]);
      x.deliver(user, guid, { sha256: `m-${id}`, queueId: `q-${side}-${id}`, flags: chance(0.2) ? ["$Junk"] : [] });
    } else if (roll < 26) {
      const id = ++g;
      note(user, `m-${id}`, [side], [`m-${id}`]);
      x.append(user, pick(fs), `m-${id}`, ["\\Seen"]);
    } else if (roll < 29) {
      // The same message on both sides: a backup-MX retry (same queue id, other trace
      // fields), or a client that repeated its APPEND on the other node.
      const y = side === "a" ? b : a;
      if (!alive(y, user)) continue;
      const id = ++g;
      if (chance(0.5)) {
        note(user, `dq-${id}`, ["a", "b"], [`m-${id}-a`, `m-${id}-b`]);
        x.deliver(user, inbox(x, user), { sha256: `m-${id}-${x.node}`, queueId: `dq-${id}` });
        y.deliver(user, inbox(y, user), { sha256: `m-${id}-${y.node}`, queueId: `dq-${id}` });
      } else {
        const shared = fs.filter((guid) => preSplitGuids.has(guid) && Object.hasOwn(y.state.mail[user]?.mailboxes ?? {}, guid));
        if (!shared.length) continue;
        const guid = pick(shared);
        note(user, `m-${id}`, ["a", "b"], [`m-${id}`]);
        x.append(user, guid, `m-${id}`, ["\\Seen"]);
        y.append(user, guid, `m-${id}`, ["\\Seen"]);
      }
    } else if (roll < 47) {
      if (!msgs.length) continue;
      const m = pick(msgs);
      const add = FLAG_POOL.filter(() => chance(0.3));
      const remove = FLAG_POOL.filter((f) => !add.includes(f) && chance(0.25));
      if (!add.length && !remove.length) continue;
      x.flag(user, m.guid, m.key, add, remove);
    } else if (roll < 56) {
      if (!msgs.length) continue;
      const m = pick(msgs);
      if (chance(0.5)) x.flag(user, m.guid, m.key, ["\\Deleted"]);
      x.expunge(user, m.guid, m.key);
    } else if (roll < 66) {
      if (!msgs.length || fs.length < 2) continue;
      const m = pick(msgs);
      x.move(user, m.guid, m.key, pick(fs.filter((f) => f !== m.guid)));
    } else if (roll < 72) {
      if (!msgs.length) continue;
      const m = pick(msgs);
      const src = x.message(user, m.guid, m.key);
      const item = byIdentity.get(`${user} ${src.queueId ?? src.sha256}`);
      if (item) item.copies++;
      x.copy(user, m.guid, m.key, pick(fs));
    } else if (roll < 78) {
      const taken = new Set(fs.map((guid) => x.mailbox(user, guid).name));
      const free = NAMES.filter((n) => !taken.has(n));
      if (free.length) x.createMailbox(user, pick(free), hex());
    } else if (roll < 84) {
      const taken = new Set(fs.map((guid) => x.mailbox(user, guid).name));
      const free = NAMES.filter((n) => !taken.has(n));
      const renamable = fs.filter((guid) => x.mailbox(user, guid).name !== "INBOX");
      if (free.length && renamable.length) x.renameMailbox(user, pick(renamable), pick(free));
    } else if (roll < 90) {
      const deletable = fs.filter((guid) => x.mailbox(user, guid).name !== "INBOX");
      if (deletable.length) x.deleteMailbox(user, pick(deletable));
    } else {
      const names = ["INBOX", ...NAMES];
      const name = pick(names);
      x.subscribe(user, name, !(x.state.mail[user]?.subscriptions ?? []).includes(name));
    }
  }
  return { base, a, b, truth, preSplitGuids, steps };
}
