// The spam quarantine after a split brain (services/spam/quarantine.ts): what the victim
// held, released or deleted since the split, brought into the survivor. The events are
// the victim's `quarantine` kind: a hold is SMTP's delivery line into the quarantine
// (sides.ts toEvents), a release or a delete is the line the command journaled first.
// Rule, per (user, message key), the victim's last event decides (QUARANTINE_RULES):
// - hold: the message is copied into the survivor's quarantine (its bytes from the
//   victim's copy, checked against the journaled hash); it was acknowledged there, so
//   it must not be lost;
// - release: the user took it out of quarantine on the victim: if the survivor still
//   holds it (held before the split), it goes into the survivor's INBOX unless the
//   INBOX has that content already (the victim's INBOX copy, merged as mail), then it
//   leaves the survivor's quarantine;
// - delete: the survivor's held copy is deleted too.
// A message the survivor acted on later than the victim's last action keeps the
// survivor's state (its later word; keys are unique per delivery, so this is a message
// held before the split, or one a merge brought). The Applier journals each step it
// applied on the survivor (the same kind, after acting: a step is idempotent by state),
// so planning again finds the survivor later and plans nothing.
// `plan` is pure (a KindHandler of rules.ts); the Applier (apply.ts) runs the steps.
import { createHash } from "node:crypto";
import { chownSync, closeSync, existsSync, fsyncSync, mkdirSync, openSync, renameSync, statSync, unlinkSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import { fsyncPath } from "../common/fsutil.ts";
import { compareHlc } from "../common/hlc.ts";
import type { Json, KindContext, KindHandler, KindStep, OtherEvent } from "./model.ts";

export type QuarantineStepAction = "hold" | "release" | "delete";

/** What one step carries. */
export interface QuarantineStep {
  readonly user: string;
  readonly key: string;
  readonly action: QuarantineStepAction;
  readonly sha256: string;
}

/** The victim's last action on a message -> what the survivor does. */
export const QUARANTINE_RULES: Readonly<Record<QuarantineStepAction, string>> = {
  hold: "copy the message into the survivor's quarantine (unless it is there)",
  release: "move the survivor's held copy into its INBOX (unless the INBOX has that content), then out of quarantine",
  delete: "delete the survivor's held copy",
};

function parts(e: OtherEvent): QuarantineStep | null {
  const x = (e.payload ?? {}) as Record<string, unknown>;
  if (typeof x.user !== "string" || typeof x.key !== "string" || typeof x.sha256 !== "string") return null;
  if (x.action !== "hold" && x.action !== "release" && x.action !== "delete") return null;
  return { user: x.user.toLowerCase(), key: x.key, action: x.action, sha256: x.sha256 };
}

export const quarantineHandler: KindHandler = {
  plan(ctx: KindContext): readonly KindStep[] {
    const survivorLast = new Map<string, string>();
    for (const e of ctx.survivor) {
      const p = parts(e);
      if (!p) continue;
      const k = `${p.user}\0${p.key}`;
      const prev = survivorLast.get(k);
      if (!prev || compareHlc(e.hlc, prev) > 0) survivorLast.set(k, e.hlc);
    }
    const last = new Map<string, { e: OtherEvent; step: QuarantineStep; ids: string[] }>();
    for (const e of ctx.victim) {
      const p = parts(e);
      if (!p) continue;
      const k = `${p.user}\0${p.key}`;
      const g = last.get(k);
      if (!g) last.set(k, { e, step: p, ids: [e.id] });
      else {
        g.ids.push(e.id);
        if (compareHlc(e.hlc, g.e.hlc) >= 0) {
          g.e = e;
          // A release or delete names the held bytes: keep the hash the hold had if any.
          g.step = { ...p, sha256: p.sha256 || g.step.sha256 };
        }
      }
    }
    const steps: KindStep[] = [];
    for (const [k, g] of [...last].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
      if (!(g.step.action in QUARANTINE_RULES)) throw new Error(`reconcile: no quarantine rule for ${g.step.action}`);
      const s = survivorLast.get(k);
      if (s && compareHlc(s, g.e.hlc) > 0) continue;
      steps.push({ sources: g.ids, payload: g.step as unknown as Json });
    }
    return steps;
  },
};

/**
 * Writes BODY as NAME into the quarantine directory QDIR (tmp/, fsync, rename into
 * new/, fsync), made with owner UID:GID when missing. False when a message with KEY is
 * there already (nothing written).
 */
export function writeHeld(qdir: string, name: string, body: Buffer, owner: { uid: number; gid: number }): boolean {
  for (const d of [dirname(qdir), qdir, join(qdir, "new"), join(qdir, "tmp")]) {
    if (!existsSync(d)) {
      mkdirSync(d, { mode: 0o700 });
      chownSync(d, owner.uid, owner.gid);
      fsyncPath(dirname(d));
    }
  }
  const dest = join(qdir, "new", name);
  if (existsSync(dest)) return false;
  const tmp = join(qdir, "tmp", `${name}.reconcile`);
  const fd = openSync(tmp, "w", 0o600);
  try {
    for (let off = 0; off < body.length; ) off += writeSync(fd, body, off, body.length - off);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  chownSync(tmp, owner.uid, owner.gid);
  renameSync(tmp, dest);
  fsyncPath(join(qdir, "new"));
  return true;
}

/** Removes FILE (a held message) durably; false when it was gone. */
export function unlinkHeld(file: string): boolean {
  try {
    unlinkSync(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw err;
  }
  fsyncPath(dirname(file));
  return true;
}

export const sha256Hex = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** The owner mail files get under MAILROOT (its own owner). */
export function mailOwner(mailRoot: string): { uid: number; gid: number } {
  const st = statSync(mailRoot);
  return { uid: st.uid, gid: st.gid };
}
