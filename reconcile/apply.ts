// Applying one planned operation to the survivor, through Dovecot and the account
// store, never by writing files under a running Dovecot: mail changes go over IMAP as
// the user (Dovecot's master-user login `user*reconcile`), so UIDs, MODSEQ and indexes
// stay right and connected clients (CONDSTORE/QRESYNC too) see each change; a folder
// that must keep its GUID is made with `doveadm mailbox create -g`; account rows are
// written in MariaDB and journaled as every account change is.
//
// Every operation is idempotent, so a worker killed mid-way and run again ends in the
// same state: a message is APPENDed only if no message with the same content is in
// the folder yet (the folder's contents are hashed once per worker, then tracked); a
// flag change, expunge or move whose message is gone is skipped and said so; a folder
// that exists already is not made again; a rename already done is done.
// Lookups on the survivor (a folder's directory by GUID, a message's UID by Maildir
// key) read Dovecot's own files, read only. The spam quarantine is no Dovecot folder:
// a held message is written there as SMTP writes it (tmp/, fsync, rename into new/).
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { basename, join } from "node:path";
import { ImapFlow } from "imapflow";
import type { Connection } from "mysql2/promise";
import { run } from "../common/exec.ts";
import { DATABASE } from "../services/accounts.ts";
import { MASTER_USER } from "../services/dovecot.ts";
import { journalAccountChange } from "../services/journal/accounts.ts";
import { folderName, folderPath, INBOX_DIR, listFolders, readUidlist } from "../services/journal/maildir.ts";
import { findHeld, QUARANTINE_KIND, quarantineDirOf } from "../services/spam/quarantine.ts";
import type { ChangeJournal } from "../services/journal/changes.ts";
import { userRef } from "../services/journal/scanner.ts";
import type { Operation } from "./model.ts";
import { QUARANTINE_GUID, standInGuid } from "./sides.ts";
import { mailOwner, sha256Hex, unlinkHeld, writeHeld, type QuarantineStep } from "./quarantine.ts";
import { applySpamStep, SPAM_KIND, type SpamStep } from "./spam.ts";
import { MariadbSpamStore } from "../services/spam/store.ts";
import { journalSpamDeltas, spamJournalFor } from "../services/spam/journal.ts";

/** IMAP sessions kept open at once (one per user); the oldest is closed beyond it. */
const SESSIONS_MAX = 16;

export interface ApplyContext {
  /** The survivor's data directory (its volume), for read-only lookups. */
  readonly survivorData: string;
  readonly imap: { readonly host: string; readonly port: number; readonly masterPassword: string };
  /** `doveadm -c <conf>` for folders made with a given GUID. */
  readonly dovecotConf: string;
  readonly db: Connection;
  /** Victim user -> mailbox GUID -> key -> the message file in the copy (as victimFile takes it). */
  readonly victimFiles: ReadonlyMap<string, ReadonlyMap<string, ReadonlyMap<string, string>>>;
  /** One message file of the victim's copy, wherever it lies (run.ts: VictimSource). */
  readonly victimFile: (file: string) => Promise<{ body: Buffer; mtime: Date }>;
  /** Stand-in GUIDs (folders Dovecot never opened) -> the real GUID the plan uses (sides.ts). */
  readonly standIns: ReadonlyMap<string, string>;
  /** The survivor's change journal for the quarantine's steps (default: the one beside MariaDB, as the spam filter's). */
  readonly journal?: () => Promise<Pick<ChangeJournal, "append" | "close"> | null>;
}

export type ApplyOutcome = { readonly done: true; readonly says?: string } | { readonly done: false; readonly says: string };

/** One worker's connections and caches. */
export class Applier {
  private readonly sessions = new Map<string, ImapFlow>();
  /** user\0guid -> sha256 of every message in that survivor folder. */
  private readonly contents = new Map<string, Set<string>>();

  constructor(private readonly ctx: ApplyContext) {}

  async close(): Promise<void> {
    for (const c of this.sessions.values()) await c.logout().catch(() => c.close());
    this.sessions.clear();
  }

  async apply(op: Operation): Promise<ApplyOutcome> {
    switch (op.op) {
      case "account-set":
        return this.accountSet(op);
      case "account-delete":
        return this.accountDelete(op);
      case "mailbox-create": {
        if (this.folderDir(op.user, op.guid) !== null) return { done: true, says: "the folder exists already" };
        await run("doveadm", ["-c", this.ctx.dovecotConf, "mailbox", "create", "-u", op.user, "-g", op.guid, op.name], { timeoutMs: 60_000 });
        return { done: true };
      }
      case "mailbox-rename": {
        const cur = this.folderName(op.user, op.guid);
        if (cur === null) return { done: false, says: `the folder ${op.from} (${op.guid}) is gone on the survivor` };
        if (cur === op.name) return { done: true, says: "renamed already" };
        await (await this.session(op.user)).mailboxRename(cur, op.name);
        return { done: true };
      }
      case "mailbox-delete": {
        const cur = this.folderName(op.user, op.guid);
        if (cur === null) return { done: true, says: "deleted already" };
        await (await this.session(op.user)).mailboxDelete(cur);
        return { done: true };
      }
      case "subscribe": {
        const c = await this.session(op.user);
        await (op.subscribed ? c.mailboxSubscribe(op.name) : c.mailboxUnsubscribe(op.name));
        return { done: true };
      }
      case "set-flags": {
        const at = await this.openAt(op.user, op.mailbox, op.key);
        if (!at) return { done: false, says: `message ${op.key} is no longer on the survivor` };
        if (op.add.length) await at.c.messageFlagsAdd(String(at.uid), [...op.add], { uid: true });
        if (op.remove.length) await at.c.messageFlagsRemove(String(at.uid), [...op.remove], { uid: true });
        return { done: true };
      }
      case "expunge": {
        const at = await this.openAt(op.user, op.mailbox, op.key);
        if (!at) return { done: true, says: "expunged already" };
        await at.c.messageDelete(String(at.uid), { uid: true });
        this.contents.get(`${op.user}\0${op.mailbox}`)?.delete(op.sha256);
        return { done: true };
      }
      case "move": {
        const at = await this.openAt(op.user, op.from, op.key);
        if (!at) return { done: false, says: `message ${op.key} is no longer in the source folder on the survivor` };
        const to = this.folderName(op.user, op.to);
        if (to === null) return { done: false, says: `the destination folder ${op.to} is missing on the survivor` };
        await at.c.messageMove(String(at.uid), to, { uid: true });
        this.contents.delete(`${op.user}\0${op.to}`);
        return { done: true };
      }
      case "add-message":
      case "restore-message": {
        const file = this.ctx.victimFiles.get(op.source.user)?.get(op.source.mailbox)?.get(op.source.key);
        if (!file) return { done: false, says: `message ${op.source.key} is not in the victim's copy` };
        const name = this.folderName(op.user, op.mailbox);
        if (name === null) return { done: false, says: `folder ${op.mailbox} of ${op.user} is missing on the survivor` };
        const have = this.contentsOf(op.user, op.mailbox);
        if (have.has(op.sha256)) return { done: true, says: "the message is there already" };
        const { body, mtime } = await this.ctx.victimFile(file);
        if (createHash("sha256").update(body).digest("hex") !== op.sha256) return { done: false, says: `message ${op.source.key} in the victim's copy does not have the planned content` };
        const flags = op.flags.filter((f) => f !== "\\Recent");
        await (await this.session(op.user)).append(name, body, flags, mtime);
        have.add(op.sha256);
        return { done: true };
      }
      case "extension": {
        if (op.kind === QUARANTINE_KIND) return this.quarantine(op.payload as unknown as QuarantineStep);
        if (op.kind !== SPAM_KIND) return { done: false, says: `no applier for ${op.kind} operations` };
        // The spam tables live in the account store's MariaDB (services/spam/store.ts).
        const step = op.payload as unknown as SpamStep;
        const journal = await spamJournalFor(this.ctx.db);
        try {
          // Journaled on the survivor too, before it is applied: a later split keeps it.
          const r = await applySpamStep(new MariadbSpamStore(this.ctx.db), step, journal ? (d) => journalSpamDeltas(journal, step.user, [d]) : undefined);
          return r.changed ? { done: true } : { done: true, says: "the survivor has this training already" };
        } finally {
          await journal?.close();
        }
      }
    }
  }

  // ---- the spam quarantine (reconcile/quarantine.ts) ---------------------------------

  /** Applies STEP, then journals it on the survivor (its state is what a later split starts from; planning again skips it). */
  private async quarantine(step: QuarantineStep): Promise<ApplyOutcome> {
    const r = await this.quarantineStep(step);
    if (!r.done) return r;
    const journal = await (this.ctx.journal ?? (() => spamJournalFor(this.ctx.db)))();
    if (!journal) return { done: false, says: "the survivor's change journal is not ready: the quarantine step was applied, not journaled (run again)" };
    try {
      await journal.append(QUARANTINE_KIND, { user: step.user, key: step.key, action: step.action, sha256: step.sha256, reason: "reconcile" });
    } finally {
      await journal.close();
    }
    return r;
  }

  private async quarantineStep(step: QuarantineStep): Promise<ApplyOutcome> {
    const mailRoot = join(this.ctx.survivorData, "mail");
    const qdir = quarantineDirOf(mailRoot, step.user);
    const held = findHeld(mailRoot, step.user, step.key);
    switch (step.action) {
      case "hold": {
        if (held) return { done: true, says: "the survivor holds this message already" };
        const file = this.ctx.victimFiles.get(step.user)?.get(QUARANTINE_GUID)?.get(step.key);
        if (!file) return { done: true, says: `message ${step.key} is not in the victim's quarantine (nothing to hold)` };
        const { body } = await this.ctx.victimFile(file);
        if (sha256Hex(body) !== step.sha256) return { done: false, says: `message ${step.key} in the victim's quarantine does not have the journaled content` };
        writeHeld(qdir, basename(file), body, mailOwner(mailRoot));
        return { done: true };
      }
      case "delete":
        if (!held) return { done: true, says: "not held on the survivor" };
        unlinkHeld(held.file);
        return { done: true };
      case "release": {
        if (!held) return { done: true, says: "not held on the survivor" };
        const inbox = this.inboxGuid(step.user);
        const have = this.contentsOf(step.user, inbox);
        const body = readFileSync(held.file);
        const sha = sha256Hex(body);
        if (!have.has(sha)) {
          await (await this.session(step.user)).append("INBOX", body, [], statSync(held.file).mtime);
          have.add(sha);
        }
        unlinkHeld(held.file);
        return { done: true };
      }
    }
  }

  private inboxGuid(user: string): string {
    return readUidlist(folderPath(this.maildir(user), INBOX_DIR)).guid ?? standInGuid(user, "INBOX");
  }

  // ---- accounts --------------------------------------------------------------------

  private async accountSet(op: Extract<Operation, { op: "account-set" }>): Promise<ApplyOutcome> {
    const db = this.ctx.db;
    const c = op.columns;
    if (op.table === "domains") {
      await db.query(`INSERT IGNORE INTO ${DATABASE}.domains (name) VALUES (?)`, [op.key]);
    } else if (op.table === "aliases") {
      const [source, destination] = op.key.split(" ");
      const [rows] = await db.query(`SELECT id FROM ${DATABASE}.domains WHERE name = ?`, [source!.split("@")[1]]);
      const d = (rows as { id: number }[])[0];
      if (!d) return { done: false, says: `the domain of alias ${source} does not exist on the survivor` };
      await db.query(`INSERT IGNORE INTO ${DATABASE}.aliases (source, destination, domain_id) VALUES (?, ?, ?)`, [source, destination, d.id]);
    } else {
      const [rows] = await db.query(`SELECT 1 FROM ${DATABASE}.users WHERE email = ?`, [op.key]);
      if ((rows as unknown[]).length === 0) {
        const local = String(c.local_part ?? op.key.split("@")[0]);
        const domain = String(c.domain ?? op.key.split("@")[1]);
        const [drows] = await db.query(`SELECT id FROM ${DATABASE}.domains WHERE name = ?`, [domain]);
        const d = (drows as { id: number }[])[0];
        if (!d) return { done: false, says: `the domain ${domain} of user ${op.key} does not exist on the survivor` };
        if (typeof c.password !== "string") return { done: false, says: `user ${op.key} has no password hash in the victim's journal` };
        await db.query(`INSERT INTO ${DATABASE}.users (email, local_part, domain_id, password, active) VALUES (?, ?, ?, ?, ?)`, [op.key, local, d.id, c.password, Number(c.active ?? 1)]);
      } else {
        const sets: string[] = [];
        const vals: (string | number | null)[] = [];
        for (const col of ["password", "active"] as const) {
          if (!Object.hasOwn(c, col)) continue;
          sets.push(`${col} = ?`);
          vals.push(c[col] ?? null);
        }
        if (sets.length) await db.query(`UPDATE ${DATABASE}.users SET ${sets.join(", ")} WHERE email = ?`, [...vals, op.key]);
      }
    }
    await journalAccountChange(db, { table: op.table, key: op.key, columns: { ...c } });
    return { done: true };
  }

  private async accountDelete(op: Extract<Operation, { op: "account-delete" }>): Promise<ApplyOutcome> {
    const db = this.ctx.db;
    if (op.table === "users") await db.query(`DELETE FROM ${DATABASE}.users WHERE email = ?`, [op.key]);
    else if (op.table === "aliases") {
      const [source, destination] = op.key.split(" ");
      await db.query(`DELETE FROM ${DATABASE}.aliases WHERE source = ? AND destination = ?`, [source, destination]);
    } else await db.query(`DELETE FROM ${DATABASE}.domains WHERE name = ?`, [op.key]);
    await journalAccountChange(db, { table: op.table, key: op.key, columns: {}, deleted: true });
    return { done: true };
  }

  // ---- the survivor's mailboxes, read only --------------------------------------------

  private maildir(user: string): string {
    const [local, domain] = [user.slice(0, user.lastIndexOf("@")), user.slice(user.lastIndexOf("@") + 1)];
    return userRef(join(this.ctx.survivorData, "mail"), domain, local).maildir;
  }

  /**
   * The directory of the survivor folder with GUID (or a stand-in's name), or null. A
   * folder that had no GUID when the plan was made (a stand-in, named by its name) gets
   * one from Dovecot at this run's first IMAP operation in it: it is still found by its
   * stand-in, so the run's later operations in it find it too.
   */
  private folderDir(user: string, guid: string): string | null {
    const md = this.maildir(user);
    for (const dir of listFolders(md)) {
      const path = folderPath(md, dir);
      const byName = standInGuid(user, folderName(dir));
      const g = readUidlist(path).guid ?? byName;
      if (g === guid || this.ctx.standIns.get(g) === guid || byName === guid || this.ctx.standIns.get(byName) === guid) return dir;
    }
    return null;
  }

  private folderName(user: string, guid: string): string | null {
    const d = this.folderDir(user, guid);
    return d === null ? null : folderName(d);
  }

  private contentsOf(user: string, guid: string): Set<string> {
    const k = `${user}\0${guid}`;
    let set = this.contents.get(k);
    if (set) return set;
    set = new Set();
    const dir = this.folderDir(user, guid);
    if (dir !== null) {
      const path = folderPath(this.maildir(user), dir);
      for (const sub of ["cur", "new"]) {
        let names: string[] = [];
        try {
          names = readdirSync(join(path, sub)).filter((f) => !f.startsWith("."));
        } catch {
          continue;
        }
        for (const f of names) {
          try {
            set.add(createHash("sha256").update(readFileSync(join(path, sub, f))).digest("hex"));
          } catch {
            // gone meanwhile
          }
        }
      }
    }
    this.contents.set(k, set);
    return set;
  }

  /** Opens the folder holding KEY and returns its current UID there, or null when it is gone. */
  private async openAt(user: string, guid: string, key: string): Promise<{ c: ImapFlow; uid: number } | null> {
    const dir = this.folderDir(user, guid);
    if (dir === null) return null;
    const c = await this.session(user);
    await c.mailboxOpen(folderName(dir));
    // Dovecot assigns UIDs when it syncs the folder, which opening it just did.
    const uid = readUidlist(folderPath(this.maildir(user), dir)).uids.get(key);
    return uid === undefined ? null : { c, uid };
  }

  private async session(user: string): Promise<ImapFlow> {
    const have = this.sessions.get(user);
    if (have?.usable) return have;
    if (this.sessions.size >= SESSIONS_MAX) {
      const [oldest, c] = this.sessions.entries().next().value as [string, ImapFlow];
      this.sessions.delete(oldest);
      await c.logout().catch(() => c.close());
    }
    const c = new ImapFlow({
      host: this.ctx.imap.host,
      port: this.ctx.imap.port,
      secure: false,
      doSTARTTLS: true,
      tls: { rejectUnauthorized: false },
      auth: { user: `${user}*${MASTER_USER}`, pass: this.ctx.imap.masterPassword },
      logger: false,
    });
    await c.connect();
    this.sessions.set(user, c);
    return c;
  }
}
