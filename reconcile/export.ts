// The victim's side of a reconciliation, served where the copy lies: after a split
// brain the preserved copy is on the victim's own disk, and on two servers at two
// hosters the survivor cannot mount it. The victim's node daemon answers the survivor's
// reconciler over the peer channel (cluster/peer-rpc.ts): `victim-open` mounts the copy
// read-only here and returns what sides.ts read from it (mail state with hashes, the
// journal); `victim-file` returns one message file of it, and only a file that the
// open listed (never a path the caller makes up); `victim-close` unmounts it and, when
// the survivor says every change is merged, marks the copy reconciled.
// Bounds: one copy open at a time (a second open of another copy closes the first); an
// open copy left idle for IDLE_CLOSE_MS is closed; a file answer is at most
// FILE_BYTES_MAX.
import { readFileSync, rmSync, statSync, mkdirSync } from "node:fs";
import { join, relative, isAbsolute } from "node:path";
import type { JournalEntry } from "../services/journal/changes.ts";
import { mountPreservedCopy, unmountStale, type PreservedView } from "../replication/filesystem.ts";
import type { PreservedCopy } from "../replication/types.ts";
import type { UserMailState } from "./model.ts";
import { readEntries, readMail, type MailRead } from "./sides.ts";

const IDLE_CLOSE_MS = 30 * 60_000;
export const FILE_BYTES_MAX = 256 * 1024 * 1024;

/** A MailRead that crosses the wire: files as paths relative to the copy's root. */
export interface VictimSide {
  readonly copy: string;
  readonly mail: Record<string, UserMailState>;
  /** user -> mailbox GUID -> key -> relative path of the message file. */
  readonly files: Record<string, Record<string, Record<string, string>>>;
  readonly messages: number;
  readonly entries: JournalEntry[];
}

export function toWire(copy: string, root: string, m: MailRead, entries: JournalEntry[]): VictimSide {
  const files: VictimSide["files"] = {};
  for (const [user, boxes] of m.files) {
    const u: Record<string, Record<string, string>> = (files[user] = {});
    for (const [guid, keys] of boxes) {
      const b: Record<string, string> = (u[guid] = {});
      for (const [key, path] of keys) b[key] = relative(root, path);
    }
  }
  return { copy, mail: m.mail, files, messages: m.messages, entries };
}

export function fromWire(s: VictimSide): MailRead {
  const files = new Map<string, Map<string, Map<string, string>>>();
  for (const [user, boxes] of Object.entries(s.files)) {
    const u = new Map<string, Map<string, string>>();
    for (const [guid, keys] of Object.entries(boxes)) u.set(guid, new Map(Object.entries(keys)));
    files.set(user, u);
  }
  return { mail: s.mail, files, messages: s.messages };
}

export interface ExportContext {
  /** This node's run directory (the view is mounted under it). */
  readonly runDir: string;
  /** This node's preserved copies. */
  readonly listCopies: () => Promise<PreservedCopy[]>;
  readonly markReconciled: (path: string) => Promise<void>;
}

/** The victim's export: one open copy at a time, for the survivor's reconciler. */
export class VictimExport {
  private open: { copy: string; view: PreservedView; side: VictimSide; allowed: Set<string>; idle: NodeJS.Timeout } | null = null;
  private busy: Promise<unknown> = Promise.resolve();

  constructor(private readonly ctx: ExportContext) {}

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.busy.then(fn, fn);
    this.busy = p.catch(() => {});
    return p;
  }

  private mountpoint(): string {
    return join(this.ctx.runDir, "victim-export");
  }

  private async copyOf(path: string): Promise<PreservedCopy> {
    const p = (await this.ctx.listCopies()).find((x) => x.path === path);
    if (!p) throw new Error(`no preserved copy ${path} on this node`);
    return p;
  }

  /** The copies the survivor may ask for (not reconciled yet). */
  async pending(): Promise<{ path: string; atMs: number; reason: string }[]> {
    return (await this.ctx.listCopies()).filter((p) => !p.reconciledAtMs).map((p) => ({ path: p.path, atMs: p.atMs, reason: p.reason }));
  }

  openCopy(path: string): Promise<VictimSide> {
    return this.serial(async () => {
      await this.copyOf(path);
      if (this.open?.copy === path) {
        this.touch();
        return this.open.side;
      }
      await this.closeNow();
      const mnt = this.mountpoint();
      mkdirSync(mnt, { recursive: true });
      await unmountStale(mnt);
      const view = await mountPreservedCopy(path, mnt);
      try {
        const mail = await readMail(view.mountpoint);
        const entries = await readEntries(view.mountpoint);
        const side = toWire(path, view.mountpoint, mail, entries);
        const allowed = new Set<string>();
        for (const boxes of Object.values(side.files)) for (const keys of Object.values(boxes)) for (const f of Object.values(keys)) allowed.add(f);
        this.open = { copy: path, view, side, allowed, idle: setTimeout(() => void this.close(), IDLE_CLOSE_MS) };
        this.open.idle.unref();
        return side;
      } catch (err) {
        await view.close().catch(() => {});
        throw err;
      }
    });
  }

  private touch(): void {
    if (!this.open) return;
    this.open.idle.refresh();
  }

  /** One message file of the open copy, with its time (APPEND keeps it as INTERNALDATE). */
  async file(path: string, rel: string): Promise<{ body: Buffer; mtimeMs: number }> {
    const o = this.open;
    if (!o || o.copy !== path) throw new Error(`the copy ${path} is not open here (open it first)`);
    if (isAbsolute(rel) || !o.allowed.has(rel)) throw new Error(`${JSON.stringify(rel.slice(0, 200))} is not a message of the open copy`);
    this.touch();
    const full = join(o.view.mountpoint, rel);
    const st = statSync(full);
    if (st.size > FILE_BYTES_MAX) throw new Error(`${rel} is over ${FILE_BYTES_MAX} bytes`);
    return { body: readFileSync(full), mtimeMs: st.mtimeMs };
  }

  /** Unmounts the open copy; RECONCILED: the survivor merged all of it, mark the copy so. */
  close(o: { path?: string; reconciled?: boolean } = {}): Promise<{ marked: boolean }> {
    return this.serial(async () => {
      if (o.path) await this.copyOf(o.path);
      await this.closeNow();
      if (o.reconciled && o.path) {
        await this.ctx.markReconciled(o.path);
        return { marked: true };
      }
      return { marked: false };
    });
  }

  private async closeNow(): Promise<void> {
    const o = this.open;
    this.open = null;
    if (!o) return;
    clearTimeout(o.idle);
    await o.view.close();
    rmSync(this.mountpoint(), { recursive: true, force: true });
  }
}
