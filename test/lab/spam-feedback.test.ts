// Retraining from users' IMAP moves and the nightly purge, on a lab of its own, as a
// user and an operator see them: mail delivered on port 25 (nodemailer), moved with
// imapflow; a move into Junk is learned as spam within 5 s (`mailha spam stats`), back
// to INBOX as innocent, Junk to Trash changes nothing, back and forth three times
// leaves the counts of one class; the spam worker runs as the `spam` resource; its
// purge is a BullMQ job scheduler on the node's Redis with the configured pattern, a
// purge job run now is done by the worker and counted on /metrics; `mailha spam purge`
// works; `mailha spam classify` of an unknown user creates no row.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import nodemailer from "nodemailer";
import { ImapFlow } from "imapflow";
import { Queue } from "bullmq";
import { runAll, sleep } from "../../common/exec.ts";
import { nodePaths } from "../../common/paths.ts";
import { connectMariadb, mariadbPaths } from "../../services/mariadb.ts";
import { redisConnection, redisPaths } from "../../services/redis.ts";
import { mailha, mailhaWithInput } from "../helpers/cli.ts";
import { labUpForTests, writeTestLabConfig } from "../helpers/lab.ts";
import { fault, waitNode } from "../helpers/cluster.ts";
import type { DaemonRecord } from "../../common/daemon.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const USER = "sam@mailha.test";
const PASS = "sam-password-1";
const LEARN_MS_MAX = 5000;

interface Totals {
  spam_learned: number;
  innocent_learned: number;
  spam_misclassified: number;
  innocent_misclassified: number;
  spam_classified: number;
  innocent_classified: number;
}

describe("retraining from IMAP moves, the spam worker, the nightly purge", { skip }, () => {
  const lab = writeTestLabConfig("sf", 127);
  after(async () => {
    const keep = process.env.SF_KEEP_LOGS; // a folder to keep the worker's log and the journal in (for a failing run)
    if (!keep) return;
    for (const f of ["spam.log", "journal.log"]) cpSync(join(lab.dir, "a", "log", f), join(keep, f), { force: true });
    writeFileSync(join(keep, "journal.txt"), (await cli(["journal", "show"])).stdout);
  });
  labUpForTests(lab);
  const paths = nodePaths(join(lab.dir, "a"));
  const cli = (args: string[]) => mailha([...args, "--config", lab.configFile]);
  let im: ImapFlow;

  /** The counts as `mailha spam stats --user --json` shows them. */
  const stats = async (): Promise<Totals> => {
    const r = await cli(["spam", "stats", "--user", USER, "--json"]);
    assert.equal(r.code, 0, `spam stats: ${r.stderr}`);
    return (JSON.parse(r.stdout) as { totals: Totals }[])[0]!.totals;
  };
  /** The same counts straight from MariaDB (cheap enough to poll every 200 ms). */
  const dbTotals = async (node = "a"): Promise<Totals | null> => {
    const db = await connectMariadb(mariadbPaths(nodePaths(join(lab.dir, node))).socket, "mailha");
    try {
      const [rows] = await db.query("SELECT s.* FROM dspam_stats s JOIN dspam_virtual_uids u USING (uid) WHERE u.username = ?", [USER]);
      for (const r of rows as Record<string, unknown>[]) delete r.uid;
      const r = (rows as Record<string, number | string>[])[0];
      return r ? (Object.fromEntries(Object.entries(r).map(([k, v]) => [k, Number(v)])) as unknown as Totals) : null;
    } finally {
      await db.end();
    }
  };
  /** Waits (from the move's OK) until PRED holds of the counts; returns how long it took. */
  const learned = async (what: string, pred: (t: Totals) => boolean, ms = LEARN_MS_MAX + 5000, node = "a"): Promise<{ ms: number; totals: Totals }> => {
    const t0 = Date.now();
    let t: Totals | null = null;
    while (Date.now() - t0 < ms) {
      t = await dbTotals(node).catch(() => null);
      if (t && pred(t)) return { ms: Date.now() - t0, totals: t };
      await sleep(200);
    }
    assert.fail(`${what}: not learned within ${ms} ms; the counts are ${JSON.stringify(t)}`);
  };
  /** The spam worker's status (`mailha spam status --json`). */
  const status = async () => {
    const r = await cli(["spam", "status", "--json"]);
    assert.equal(r.code, 0, `spam status: ${r.stderr}`);
    return JSON.parse(r.stdout) as {
      worker: { feedback: { enabled: boolean; counts: Record<string, number> }; purge: { scheduled: boolean; last?: { outcome: { ran: boolean } } }; digest?: { scheduled: boolean } } | null;
      purge: { scheduler: { pattern: string | null; next: string | null } | null };
      digest: { scheduler: { pattern: string | null; next: string | null } | null };
    };
  };
  /** Waits until the worker has read N more move/copy entries than BEFORE. */
  const entriesRead = async (before: number, n: number, ms = 60_000) => {
    const t0 = Date.now();
    let s: Awaited<ReturnType<typeof status>> | null = null;
    while (Date.now() - t0 < ms) {
      s = await status();
      if ((s.worker?.feedback.counts.entries ?? 0) >= before + n) return s;
      await sleep(300);
    }
    assert.fail(`the spam worker did not read ${n} more moves within ${ms} ms (after ${before}): ${JSON.stringify(s?.worker?.feedback)}`);
  };
  const uidOf = async (subject: string): Promise<number> => {
    const s = await im.search({ subject }, { uid: true });
    assert.ok(s && s.length === 1, `one message "${subject}" in ${im.mailbox && im.mailbox.path}`);
    return s[0]!;
  };
  /** Moves the message SUBJECT from FROM to TO with IMAP MOVE. */
  const move = async (subject: string, from: string, to: string) => {
    await im.mailboxOpen(from);
    const r = await im.messageMove(String(await uidOf(subject)), to, { uid: true });
    assert.ok(r, `MOVE ${subject} ${from} -> ${to}`);
  };

  after(async () => {
    await im?.logout().catch(() => {});
  });

  before(async () => {
    assert.equal((await mailhaWithInput(["user", "add", USER, "--config", lab.configFile], PASS)).code, 0);
    const tx = nodemailer.createTransport({ host: lab.a, port: 25, secure: false, ignoreTLS: true });
    try {
      for (const [i, words] of [
        [1, "cheap casino lottery winner claim your prize now"],
        [2, "discount pharmacy bitcoin offer limited time"],
        [3, "quarterly budget meeting agenda and minutes"],
      ] as const) {
        const info = await tx.sendMail({ from: `sender${i}@example.net`, to: USER, subject: `message ${i}`, text: `${words}\n`.repeat(20) });
        assert.match(info.response, /^250/);
      }
    } finally {
      tx.close();
    }
    im = new ImapFlow({ host: lab.a, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: USER, pass: PASS }, logger: false });
    await im.connect();
    const st = await im.status("INBOX", { messages: true });
    assert.equal(st && st.messages, 3, "the three messages are in INBOX (classified innocent at delivery: the filter knows nothing yet)");
    // Junk and Trash exist before the first move, as for any user who had mail filed
    // there: a move into a folder made by that very MOVE is journaled only by the
    // watcher's next sweep (up to 30 s; services/journal/README.md).
    for (const f of ["Junk", "Trash"]) if (!(await im.list()).some((m) => m.path === f)) await im.mailboxCreate(f);
    await sleep(3000);
  });

  test("the spam worker runs on the active node as the `spam` resource, with retraining on and the purge scheduled", async () => {
    const r = await cli(["status", "--json"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /"spam": "running"/, "the spam resource runs");
    const s = await status();
    assert.equal(s.worker?.feedback.enabled, true);
    assert.equal(s.worker?.purge.scheduled, true);
    assert.equal(s.worker?.digest?.scheduled, true, "the quarantine's notices are scheduled too");
    assert.equal(s.digest.scheduler?.pattern, "0 7 * * *");
    assert.equal(s.purge.scheduler?.pattern, "30 3 * * *", "the job scheduler has spam.purge_cron's pattern");
    assert.ok(s.purge.scheduler?.next && Date.parse(s.purge.scheduler.next) > Date.now(), "its next run is in the future");
    // The same, read by BullMQ from the node's Redis as any client would.
    const q = new Queue("spam-purge", { connection: redisConnection(redisPaths(paths).socket) });
    try {
      const all = await q.getJobSchedulers();
      assert.deepEqual(all.map((j) => [j.key, j.pattern]).sort(), [["spam-purge-nightly", "30 3 * * *"], ["spam-quarantine-digest", "0 7 * * *"]], "the purge and the quarantine's notices (spam.quarantine_digest_cron)");
    } finally {
      await q.close();
    }
  });

  test("a move into Junk is learned as spam within 5 s; back to INBOX as innocent", async () => {
    const t0 = (await dbTotals())!;
    assert.ok(t0, "the delivery made the user known to the filter");
    await move("message 1", "INBOX", "Junk");
    const toJunk = await learned("message 1 moved into Junk", (t) => t.spam_misclassified === t0.spam_misclassified + 1);
    assert.ok(toJunk.ms <= LEARN_MS_MAX, `learned after ${toJunk.ms} ms (at most ${LEARN_MS_MAX})`);
    assert.equal(toJunk.totals.spam_learned, t0.spam_learned + 1, "one more spam learned (a missed spam: DSPAM's TOE correction)");
    const shown = await stats();
    assert.deepEqual([shown.spam_learned, shown.spam_misclassified], [t0.spam_learned + 1, t0.spam_misclassified + 1], "mailha spam stats shows it");

    await move("message 1", "Junk", "INBOX");
    const back = await learned("message 1 moved back to INBOX", (t) => t.spam_learned === t0.spam_learned && t.spam_misclassified === t0.spam_misclassified);
    assert.ok(back.ms <= LEARN_MS_MAX, `learned after ${back.ms} ms`);
    assert.deepEqual(await stats(), t0, "back where it was: innocent, as delivery classified it");
  });

  test("Junk to Trash learns nothing; back and forth three times leaves the counts of one class", async () => {
    const t0 = (await dbTotals())!;
    await move("message 2", "INBOX", "Junk");
    await learned("message 2 moved into Junk", (t) => t.spam_learned === t0.spam_learned + 1);
    const spam = (await dbTotals())!;
    const before = (await status()).worker!.feedback.counts.entries ?? 0;
    await move("message 2", "Junk", "Trash");
    await entriesRead(before, 1);
    assert.deepEqual(await stats(), spam, "Junk to Trash: the counts are as they were (still spam)");

    // A user who changes their mind: into Junk and out again, three times.
    const t1 = (await dbTotals())!;
    for (let i = 1; i <= 3; i++) {
      await move("message 3", "INBOX", "Junk");
      const s = await learned(`message 3 into Junk (${i})`, (t) => t.spam_learned === t1.spam_learned + 1);
      assert.ok(s.ms <= LEARN_MS_MAX, `into Junk (${i}): learned after ${s.ms} ms`);
      assert.equal(s.totals.innocent_learned, t1.innocent_learned - 1, "its innocent learning undone");
      await move("message 3", "Junk", "INBOX");
      const h = await learned(`message 3 back (${i})`, (t) => t.spam_learned === t1.spam_learned);
      assert.ok(h.ms <= LEARN_MS_MAX, `back to INBOX (${i}): learned after ${h.ms} ms`);
    }
    assert.deepEqual(await stats(), t1, "three times into Junk and out: innocent once, as it was");
    await move("message 3", "INBOX", "Junk");
    await learned("message 3 into Junk for good", (t) => t.spam_learned === t1.spam_learned + 1 && t.innocent_learned === t1.innocent_learned - 1 && t.spam_misclassified === t1.spam_misclassified + 1);
  });

  test("the purge: a job run now is done by the worker and shown on /metrics; mailha spam purge works", async () => {
    const q = new Queue("spam-purge", { connection: redisConnection(redisPaths(paths).socket) });
    try {
      // A job added now, as the scheduler adds it, waited for (at most 30 s): its state and its job.
      const runNow = async (name: string) => {
        const job = await q.add(name, {}, { removeOnComplete: 10 });
        let state = "";
        for (let i = 0; i < 100 && state !== "completed" && state !== "failed"; i++) {
          await sleep(300);
          state = await job.getState();
        }
        return { state, done: await q.getJob(job.id!) };
      };
      const purged = await runNow("purge");
      assert.equal(purged.state, "completed", `the purge job is ${purged.state}: ${purged.done?.failedReason ?? ""}`);
      // The quarantine's notices, a job of the same queue: done by the worker (nobody here has held spam: no notice).
      const digest = await runNow("digest");
      assert.equal(digest.state, "completed", `the digest job is ${digest.state}: ${digest.done?.failedReason ?? ""}`);
      assert.deepEqual(digest.done?.returnvalue, [], "no user with held spam: no notice");
    } finally {
      await q.close();
    }
    let metrics = "";
    for (let i = 0; i < 30 && !/service="spam",name="purge_runs"\} [1-9]/.test(metrics); i++) {
      await sleep(1000);
      metrics = (await runAll("curl", ["-s", `http://${lab.a}:9647/metrics`])).stdout;
    }
    assert.match(metrics, /mailha_service_value\{node="a",service="spam",name="purge_runs"\} [1-9]/);
    assert.match(metrics, /mailha_service_value\{node="a",service="spam",name="purge_last_end_s"\} [1-9]/);
    assert.match(metrics, /mailha_service_value\{node="a",service="spam",name="feedback_spam"\} [1-9]/);
    const s = await status();
    assert.equal(s.worker?.purge.last?.outcome.ran, true);
    const r = await cli(["spam", "purge", "--json"]);
    assert.equal(r.code, 0, r.stderr);
    const counts = JSON.parse(r.stdout) as Record<string, number>;
    assert.equal(counts.signatures, 0, "nothing is 14 days old here");
    assert.equal(typeof counts.hapaxes, "number");
  });

  test("mailha spam classify of a user the filter has not seen writes nothing", async () => {
    const dir = mkdtempSync(join(tmpdir(), "mailha-sf-"));
    try {
      writeFileSync(join(dir, "m.eml"), "From: x@example.net\r\nSubject: casino prize\r\n\r\ncheap casino lottery\r\n");
      const r = await cli(["spam", "classify", "--user", "nobody-yet@mailha.test", join(dir, "m.eml"), "--json"]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal((JSON.parse(r.stdout) as { known: boolean }).known, false);
      const st = await cli(["spam", "stats", "--user", "nobody-yet@mailha.test", "--json"]);
      assert.equal(st.code, 2, "no dspam_virtual_uids row was made");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  test("a move the worker had not learned when node a died is learned by b's worker after the takeover (the cursor is on the volume)", async () => {
    const t0 = (await dbTotals())!;
    const recs = JSON.parse(readFileSync(join(lab.dir, "a", "run", "resources.json"), "utf8")) as DaemonRecord[];
    const worker = recs.find((d) => d.name === "spam");
    assert.ok(worker, "a spam worker runs on a");
    process.kill(worker.pid, "SIGSTOP"); // it reads nothing more on a
    await move("message 1", "INBOX", "Junk");
    await im.logout().catch(() => {});
    await sleep(6000); // the watcher journals the move (on the volume, both disks)
    assert.deepEqual(await dbTotals(), t0, "a's frozen worker learned nothing");
    await fault(lab, "kill-node", "a");
    await waitNode(lab, "b", "b active with its spam worker", (s) => s.state === "active" && s.resources.spam === "running", 120_000);
    const r = await learned("the move made before a died, on b", (t) => t.spam_learned === t0.spam_learned + 1, 60_000, "b");
    assert.equal(r.totals.spam_misclassified, t0.spam_misclassified + 1, "learned once");
    assert.deepEqual(await stats(), r.totals, "mailha spam stats (on b now) shows it");
  });
});
