// Retraining from users' moves without a lab: the decision table (every combination of
// kind, source, target and reconciler matches a row; into Junk is spam, out of Junk
// innocent except to Trash), the reconcile windows, the cursor (only new bytes are
// read, stamps in order across segments, a cut read holds back what may be older, a
// damaged cursor reads again from the start, a restart neither repeats nor loses), and
// the feedback loop itself over a real change journal and a Maildir on disk with the
// in-memory store: a move into Junk learns spam, back out innocent, Junk to Trash
// nothing, seeded random move sequences leave one net class per message, a message
// over the tokenizer's cap is learned, the deltas are journaled before they apply.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { ChangeJournal } from "../../services/journal/changes.ts";
import "../../services/journal/kinds.ts";
import { decideFeedback, FEEDBACK_RULES, nextRecent, RECENT_EXPUNGES_MAX, REWRITE_PAIR_MS, rewrittenMove, sizeOfKey, withinReconcile, RECONCILE_SLACK_MS, type FeedbackAction } from "../../services/spam/feedback.ts";
import { chooseRound, cursorFile, EMPTY_CURSOR, readChunks, readCursor, splitLines, writeCursor, type Chunks } from "../../services/spam/feedback-cursor.ts";
import { FeedbackLoop, findMessage } from "../../services/spam/feedback-loop.ts";
import { MemorySpamStore } from "../../services/spam/store.ts";
import type { SpamDelta } from "../../services/spam/training.ts";
import { DEFAULT_LIMITS } from "../../services/spam/tokenize.ts";
import { formatHlc } from "../../common/hlc.ts";
import { rng } from "../sim/volume-sim.ts";

const log = pino({ level: "silent" });
const FOLDERS = ["INBOX", "Junk", "Trash", "Archive", "Sent", "Junk/old"];

test("the feedback table: into Junk is spam, out of Junk innocent, Junk to Trash and the rest nothing", () => {
  const d = (kind: string, fromName: string, toName: string, byReconciler = false) => decideFeedback({ kind, fromName, toName, byReconciler }).action;
  assert.equal(d("move", "INBOX", "Junk"), "spam");
  assert.equal(d("copy", "Archive", "Junk"), "spam");
  assert.equal(d("move", "Junk", "INBOX"), "innocent");
  assert.equal(d("move", "Junk", "Archive"), "innocent");
  assert.equal(d("copy", "Junk", "INBOX"), "innocent", "a COPY+EXPUNGE client's move out of Junk");
  assert.equal(d("move", "Junk", "Trash"), "none");
  assert.equal(d("move", "INBOX", "Trash"), "none");
  assert.equal(d("move", "INBOX", "Archive"), "none");
  assert.equal(d("move", "Junk", "Junk"), "none");
  assert.equal(d("move", "INBOX", "junk"), "none", "IMAP names are case-sensitive");
  assert.equal(d("move", "INBOX", "Junk", true), "none", "the reconciler's own move");
  for (const kind of ["append", "delivery", "flags", "expunge", "mailbox-rename", "spam-delta"]) assert.equal(d(kind, "INBOX", "Junk"), "none", kind);
  assert.equal(decideFeedback({ kind: "move", toName: "Junk" }).action, "none", "an entry without its source folder");
  // Every combination matches one of the rows, and the table's own invariants hold for all.
  for (const kind of ["move", "copy", "append", "flags"])
    for (const from of FOLDERS)
      for (const to of FOLDERS)
        for (const rec of [false, true]) {
          const r = decideFeedback({ kind, fromName: from, toName: to, byReconciler: rec });
          assert.ok(FEEDBACK_RULES.some((x) => x.name === r.rule));
          const mc = kind === "move" || kind === "copy";
          const want: FeedbackAction = rec || !mc ? "none" : to === "Junk" && from !== "Junk" ? "spam" : from === "Junk" && to !== "Junk" && to !== "Trash" ? "innocent" : "none";
          assert.equal(r.action, want, `${kind} ${from} -> ${to}${rec ? " (reconciler)" : ""}: ${r.rule}`);
        }
});

test("reconcile windows: a user's change inside a run that touched the user (and the slack after it) is the reconciler's", () => {
  const w = [{ startMs: 1000, endMs: 5000, users: ["jo@x.test"] }];
  assert.equal(withinReconcile("jo@x.test", 999, w), false);
  assert.equal(withinReconcile("jo@x.test", 1000, w), true);
  assert.equal(withinReconcile("jo@x.test", 5000 + RECONCILE_SLACK_MS, w), true);
  assert.equal(withinReconcile("jo@x.test", 5001 + RECONCILE_SLACK_MS, w), false);
  assert.equal(withinReconcile("kim@x.test", 3000, w), false, "another user's move in the same minutes is feedback");
});

const entryLine = (hlc: string, kind = "move", extra: Record<string, unknown> = {}) => JSON.stringify({ id: `a:1:${hlc}`, node: "a", epoch: 1, seq: 1, hlc, kind, ...extra }) + "\n";
const h = (ms: number, node = "a") => formatHlc({ wallMs: ms, counter: 0, node });

test("the cursor: whole lines only, HLC order across segments, a cut read holds back what may be older", () => {
  const buf = Buffer.from(entryLine(h(1_800_000_000_001)) + "not json\n" + entryLine(h(1_800_000_000_002)) + '{"partial":');
  const { lines, used } = splitLines(buf, 100);
  assert.equal(lines.length, 3);
  assert.equal(lines[1]!.entry, null, "a malformed line is passed over");
  assert.equal(lines[0]!.start, 100);
  assert.equal(used, buf.length - '{"partial":'.length, "the partial last line is left for later");

  const seg = (name: string, stamps: number[], more = false, from = 0) => {
    const b = Buffer.from(stamps.map((s) => entryLine(h(s), s % 2 ? "move" : "flags")).join(""));
    const l = splitLines(b, from).lines;
    return { name, from, end: from + b.length, more, lines: l };
  };
  const read: Chunks = { chunks: [seg("s1", [11, 13, 15, 17]), seg("s2", [12, 14, 16])], present: ["s1", "s2", "s3"] };
  const kinds = new Set(["move"]);
  const all = chooseRound({ v: 1, segments: { gone: 5, s3: 7 } }, read, kinds, 100);
  assert.deepEqual(all.entries.map((e) => e.hlc), [h(11), h(13), h(15), h(17)]);
  assert.deepEqual(all.cursor.segments, { s1: read.chunks[0]!.end, s2: read.chunks[1]!.end, s3: 7 }, "a pruned segment leaves the cursor");
  const two = chooseRound(EMPTY_CURSOR, read, kinds, 2);
  assert.deepEqual(two.entries.map((e) => e.hlc), [h(11), h(13)]);
  assert.equal(two.cursor.segments.s1, read.chunks[0]!.lines[2]!.start, "s1 stops at its first entry not taken");
  // s1's read was cut after 13: s2's 15 (or anything after 13) may come after what s1 still holds.
  const cut: Chunks = { chunks: [seg("s1", [11, 13], true), seg("s2", [12, 15, 17])], present: ["s1", "s2"] };
  const c = chooseRound(EMPTY_CURSOR, cut, kinds, 100);
  assert.deepEqual(c.entries.map((e) => e.hlc), [h(11), h(13)], "nothing after the cut segment's last stamp");
  assert.equal(c.cursor.segments.s2, cut.chunks[1]!.lines[1]!.start);
});

function tmp(): string {
  return mkdtempSync(join(tmpdir(), "mailha-spamfb-"));
}

test("the cursor on disk: durable round trip, a damaged file reads as the start, only new bytes are read", async () => {
  const d = tmp();
  try {
    const f = cursorFile(d);
    assert.deepEqual(readCursor(f), EMPTY_CURSOR);
    writeCursor(f, { v: 1, segments: { "changes-a-1-0.jsonl": 42 } });
    assert.deepEqual(readCursor(f), { v: 1, segments: { "changes-a-1-0.jsonl": 42 } });
    writeFileSync(f, '{"v":1,"segm');
    let damaged = "";
    assert.deepEqual(readCursor(f, (e) => (damaged = e.problem)), EMPTY_CURSOR);
    assert.match(damaged, /not valid JSON/);
    writeFileSync(f, '{"v":1,"segments":{"x":-1}}');
    assert.deepEqual(readCursor(f, () => {}), EMPTY_CURSOR);

    const j = new ChangeJournal(d, "a");
    await j.append("subscribe", { user: "jo@x.test", name: "A" });
    const r1 = readChunks(join(d, "journal"), EMPTY_CURSOR);
    assert.equal(r1.chunks.length, 1);
    const c1 = chooseRound(EMPTY_CURSOR, r1, new Set(["move"]), 10).cursor;
    assert.equal(readChunks(join(d, "journal"), c1).chunks.length, 0, "nothing new: nothing read");
    await j.append("subscribe", { user: "jo@x.test", name: "B" });
    const r2 = readChunks(join(d, "journal"), c1);
    assert.equal(r2.chunks[0]!.lines.length, 1, "only the new line");
    assert.equal(r2.chunks[0]!.lines[0]!.entry!.name, "B");
    await j.close();
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

/** A volume with one user's Maildir and a watcher-like journal writing move entries. */
class Volume {
  readonly data = tmp();
  readonly mailRoot = join(this.data, "mail");
  readonly run = join(this.data, "run");
  readonly maildir = join(this.mailRoot, "x.test", "jo", "Maildir");
  clock = 1_800_000_000_000;
  readonly journal = new ChangeJournal(this.data, "a", { now: () => this.clock });
  readonly store = new MemorySpamStore();
  readonly journaled: { user: string; deltas: readonly SpamDelta[]; appliedBefore: boolean }[] = [];
  readonly where = new Map<string, string>();

  constructor() {
    mkdirSync(this.run, { recursive: true });
    for (const f of ["INBOX", "Junk", "Trash", "Archive"]) for (const sub of ["cur", "new", "tmp"]) mkdirSync(join(this.dir(f), sub), { recursive: true });
  }
  dir(folder: string): string {
    return folder === "INBOX" ? this.maildir : join(this.maildir, `.${folder}`);
  }
  deliver(key: string, body: string | Buffer): void {
    writeFileSync(join(this.dir("INBOX"), "cur", `${key}:2,S`), body);
    this.where.set(key, "INBOX");
  }
  /** Moves KEY (the file, then the journal entry, as the watcher would). */
  async move(key: string, to: string): Promise<void> {
    const from = this.where.get(key)!;
    renameSync(join(this.dir(from), "cur", `${key}:2,S`), join(this.dir(to), "cur", `${key}:2,S`));
    this.where.set(key, to);
    this.clock += 1000;
    await this.journal.append("move", { user: "jo@x.test", from: null, fromName: from, fromUid: 1, key, to: null, toName: to, newKey: key, uid: 2, flags: ["\\Seen"], size: 1, sha256: "0".repeat(64) });
  }
  loop(o: { entriesMax?: number } = {}): FeedbackLoop {
    return new FeedbackLoop({
      dataDir: this.data,
      mailRoot: this.mailRoot,
      runDir: this.run,
      cursorFile: cursorFile(this.data),
      store: this.store,
      journal: async (user, deltas) => {
        this.journaled.push({ user, deltas, appliedBefore: deltas.some((d) => JSON.stringify(this.store.ledgers.get(`${d.uid}:${d.key}`) ?? null) === JSON.stringify(d.ledger.after)) });
      },
      log,
      ...o,
    });
  }
  async drain(l: FeedbackLoop): Promise<number> {
    let n = 0;
    for (let i = 0; i < 100; i++) {
      const r = await l.round(() => this.clock);
      if (r.t === "failed") throw new Error(r.error);
      if (r.t !== "done") break;
      n += r.handled;
      if (!r.more) break;
    }
    return n;
  }
  async totals() {
    return this.store.totals(await this.store.uidFor("jo@x.test"));
  }
  async close(): Promise<void> {
    await this.journal.close();
    rmSync(this.data, { recursive: true, force: true });
  }
}

const spamBody = (i: number) => `From: offers@spam.example\r\nTo: jo@x.test\r\nSubject: casino winner ${i}\r\nMessage-ID: <s${i}@spam.example>\r\n\r\n${"cheap casino lottery prize claim ".repeat(20)}${i}\r\n`;

test("the loop: into Junk learns spam, out innocent, Junk to Trash nothing; journaled before applied; a restart repeats nothing", async () => {
  const v = new Volume();
  try {
    v.deliver("m1", spamBody(1));
    const l = v.loop();
    assert.deepEqual(await l.round(() => v.clock), { t: "idle" }, "nothing journaled yet");
    await v.move("m1", "Junk");
    assert.equal(await v.drain(l), 1);
    let t = await v.totals();
    assert.equal(t.spam_learned + t.spam_misclassified > 0, true, `learned as spam: ${JSON.stringify(t)}`);
    assert.equal(t.innocent_learned, 0);
    assert.equal(v.journaled.length, 1, "the delta was journaled");
    assert.equal(v.journaled[0]!.appliedBefore, false, "journaled before it was applied");
    assert.equal(v.journaled[0]!.user, "jo@x.test");
    await v.move("m1", "INBOX");
    await v.drain(l);
    t = await v.totals();
    assert.deepEqual([t.spam_learned, t.innocent_learned], [0, 1], "moved back: innocent, the spam undone");
    await v.move("m1", "Junk");
    await v.drain(l);
    const before = await v.totals();
    await v.move("m1", "Trash");
    await v.drain(l);
    assert.deepEqual(await v.totals(), before, "Junk to Trash learns nothing");
    assert.equal(l.counts.none, 1);
    // A restart: a new loop reads the cursor and finds nothing new.
    const l2 = v.loop();
    assert.deepEqual(await l2.round(() => v.clock), { t: "idle" });
    // A lost cursor (a crash before it was written): everything again, and nothing changes.
    rmSync(cursorFile(v.data));
    const l3 = v.loop();
    await v.drain(l3);
    assert.equal(l3.counts.entries, 4);
    assert.deepEqual(await v.totals(), before, "repeats are harmless");
    assert.deepEqual([l3.counts.unchanged, l3.counts.innocent, l3.counts.spam], [1, 1, 1], "replayed in order: it ends as it was");
  } finally {
    await v.close();
  }
});

test("seeded random move sequences: each message ends as one net class, the one its last feedback said", async () => {
  for (let seed = 1; seed <= 6; seed++) {
    const r = rng(seed * 977);
    const v = new Volume();
    try {
      const keys = ["k1", "k2", "k3"];
      keys.forEach((k, i) => v.deliver(k, spamBody(seed * 10 + i)));
      const expect = new Map<string, FeedbackAction>();
      const l = v.loop({ entriesMax: 1 + Math.floor(r() * 4) });
      for (let step = 0; step < 25; step++) {
        const k = keys[Math.floor(r() * keys.length)]!;
        const cur = v.where.get(k)!;
        const to = ["INBOX", "Junk", "Trash", "Archive"].filter((f) => f !== cur)[Math.floor(r() * 3)]!;
        const a = decideFeedback({ kind: "move", fromName: cur, toName: to }).action;
        await v.move(k, to);
        if (a !== "none") expect.set(k, a);
        if (r() < 0.3) await v.drain(l);
      }
      await v.drain(l);
      const t = await v.totals();
      const uid = await v.store.uidFor("jo@x.test");
      const spam = [...expect.values()].filter((a) => a === "spam").length;
      const ham = [...expect.values()].filter((a) => a === "innocent").length;
      assert.deepEqual([t.spam_learned, t.innocent_learned], [spam, ham], `seed ${seed}: one net class per message that had feedback`);
      for (const [k, a] of expect) {
        const body = spamBody(seed * 10 + keys.indexOf(k));
        const key = `sha256:${createHash("sha256").update(body).digest("hex").slice(0, 56)}`;
        assert.equal(v.store.ledgers.get(`${uid}:${key}`)?.applied.cls, a, `seed ${seed}: ${k} ends as ${a}`);
      }
      for (const [tk, c] of v.store.tokens) if (tk.startsWith(`${uid}:`)) assert.ok(c.spam_hits + c.innocent_hits <= expect.size, `seed ${seed}: a token counted more than once per message`);
    } finally {
      await v.close();
    }
  }
});

test("a message over the tokenizer's cap is learned; one gone from the Maildir is counted missing; a reconcile run is not feedback", async () => {
  const v = new Volume();
  try {
    const big = Buffer.concat([Buffer.from(spamBody(7)), Buffer.alloc(DEFAULT_LIMITS.input_bytes_max + 1024 * 1024, "casino ")]);
    v.deliver("big", big);
    await v.move("big", "Junk");
    const l = v.loop();
    await v.drain(l);
    assert.equal(l.counts.spam, 1, "the big message is learned");
    // Gone before the loop came to it.
    v.deliver("gone", spamBody(8));
    await v.move("gone", "Junk");
    rmSync(join(v.dir("Junk"), "cur", "gone:2,S"));
    await v.drain(l);
    assert.equal(l.counts.missing, 1);
    // While a reconcile run holds its lock, the loop waits.
    writeFileSync(join(v.run, "reconcile.lock"), `${process.pid}\n`);
    v.deliver("rec", spamBody(9));
    await v.move("rec", "Junk");
    assert.equal((await l.round(() => v.clock)).t, "paused");
    // The run's report names jo and its minutes: the move inside them is the reconciler's.
    rmSync(join(v.run, "reconcile.lock"));
    mkdirSync(join(v.data, "reconcile"), { recursive: true });
    const start = new Date(v.clock - 5000);
    writeFileSync(join(v.data, "reconcile", `report-${start.toISOString().replace(/[:.]/g, "-")}.json`), JSON.stringify({ seconds: 10, plan: { report: { mailboxes: { "jo@x.test": { Junk: { move: 1 } } } } } }));
    await v.drain(l);
    assert.equal(l.counts.reconciler, 1);
    assert.equal(l.counts.spam, 1, "nothing learned from it");
    assert.ok(existsSync(cursorFile(v.data)));
  } finally {
    await v.close();
  }
});

test("findMessage: the new key in the target folder, else wherever it went; never outside the mail root", () => {
  const v = new Volume();
  try {
    v.deliver("m9", "Subject: x\r\n\r\ny\r\n");
    assert.equal(findMessage(v.mailRoot, { user: "jo@x.test", fromName: "Junk", toName: "Archive", key: "m9", newKey: "m9" }), join(v.dir("INBOX"), "cur", "m9:2,S"));
    assert.equal(findMessage(v.mailRoot, { user: "../../etc@x.test", fromName: "INBOX", toName: "Junk", key: "m9", newKey: "m9" }), null);
    assert.equal(findMessage(v.mailRoot, { user: "jo@x.test", fromName: "INBOX", toName: "Junk", key: "nope", newKey: "nope" }), null);
  } finally {
    void v.close();
  }
});

test("rewrittenMove: an append right after an expunge of the same user and size is the move Dovecot made by rewriting", async () => {
  const prev = { node: "a", user: "jo@x.test", name: "Junk", key: "1796183593.M231244P28024Q2.vm,S=1641", wallMs: 1000 };
  const e = { kind: "append", node: "a", user: "jo@x.test", name: "INBOX", size: 1641, wallMs: 1000 };
  assert.deepEqual(rewrittenMove([prev], e), { fromName: "Junk", toName: "INBOX", expunge: prev });
  assert.equal(rewrittenMove([], e), null, "an APPEND of its own");
  assert.equal(rewrittenMove([prev], { ...e, size: 99 }), null, "another message (its size)");
  assert.equal(rewrittenMove([prev], { ...e, user: "kim@x.test" }), null);
  assert.equal(rewrittenMove([prev], { ...e, node: "b" }), null);
  assert.equal(rewrittenMove([prev], { ...e, wallMs: 1000 + REWRITE_PAIR_MS + 1 }), null, "too long after");
  assert.equal(rewrittenMove([prev], { ...e, kind: "flags" }), null);
  const other = { ...prev, user: "kim@x.test", key: "k,S=5" };
  assert.deepEqual(rewrittenMove([prev, other], e)?.expunge, prev, "another user's expunge in between");
  assert.deepEqual(nextRecent([prev, other], null, prev), [other], "a paired expunge leaves");
  assert.deepEqual(nextRecent([prev], { ...other, wallMs: 1000 + REWRITE_PAIR_MS + 1 }, null).map((x) => x.user), ["kim@x.test"], "a stale one goes");
  assert.equal(nextRecent([], null, null).length, 0);
  assert.ok(nextRecent(Array.from({ length: 100 }, (_, i) => ({ ...prev, key: `k${i}` })), null, null).length <= RECENT_EXPUNGES_MAX);
  assert.equal(sizeOfKey("1796183624.M2685P28211.vm,S=1541,W=1541"), 1541);
  assert.equal(sizeOfKey("plain"), null);

  // The loop: out of Junk by expunge + append (a new key), also when a round ends between the two.
  for (const entriesMax of [1, 100]) {
    const v = new Volume();
    try {
      v.deliver("r1", spamBody(50));
      await v.move("r1", "Junk");
      const l = v.loop({ entriesMax });
      await v.drain(l);
      assert.equal(l.counts.spam, 1);
      renameSync(join(v.dir("Junk"), "cur", "r1:2,S"), join(v.dir("INBOX"), "cur", "r1b,W=9:2,S"));
      v.clock += 1000;
      await v.journal.appendMany([
        { kind: "expunge", payload: { user: "jo@x.test", mailbox: null, name: "Junk", key: "r1", uid: 2 } },
        { kind: "move", payload: { user: "kim@x.test", from: null, fromName: "INBOX", fromUid: 1, key: "kk", to: null, toName: "Archive", newKey: "kk", uid: 2, flags: [], size: 1, sha256: "0".repeat(64) } },
        { kind: "append", payload: { user: "jo@x.test", mailbox: null, name: "INBOX", key: "r1b,W=9", uid: 3, flags: ["\\Seen"], size: 9, sha256: "0".repeat(64) } },
      ]);
      if (entriesMax === 1) {
        await l.round(() => v.clock); // the expunge alone
        await l.round(() => v.clock); // another user's move
        await v.loop({ entriesMax }).round(() => v.clock); // a restart in between: the append, with the expunge from the cursor
      } else await v.drain(l);
      const t = await v.totals();
      assert.deepEqual([t.spam_learned, t.innocent_learned], [0, 1], `entriesMax ${entriesMax}: moved out of Junk by rewriting: innocent`);
      // A client's own APPEND (Sent) is not feedback.
      await v.journal.append("append", { user: "jo@x.test", mailbox: null, name: "Junk", key: "sent1", uid: 4, flags: [], size: 9, sha256: "0".repeat(64) });
      await v.drain(v.loop());
      assert.deepEqual(await v.totals(), t);
    } finally {
      await v.close();
    }
  }
});
