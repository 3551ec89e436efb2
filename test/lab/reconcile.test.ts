// After a split brain nothing is lost: the lab scenario of issue 14, with real clients
// on both sides while they are apart (swaks deliveries, imapflow flag changes,
// expunges, a folder made and a message moved into it, account changes), then the
// links heal, the node that is not active is preserved and resynced, and `mailha
// reconcile` (run by hand here: reconcile.auto is off; the automatic path is in
// splitbrain.test.ts) merges its changes into the survivor through Dovecot. A user then sees
// every acknowledged message exactly once, flags from both sides, the expunge rules
// applied, old UIDs and UIDVALIDITY unchanged; a second run changes nothing.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { appendFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { spawn } from "node:child_process";
import { ImapFlow } from "imapflow";
import { runAll, sleep } from "../../common/exec.ts";
import { mailha, ROOT } from "../helpers/cli.ts";
import { writeTestLabConfig, type TestLab } from "../helpers/lab.ts";
import { fault, waitNode } from "../helpers/cluster.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const PW: Record<string, string> = { bob: "bob-password-1", carol: "carol-password-1", dave: "dave-password-1" };
const addr = (u: string) => `${u}@mailha.test`;

async function send(host: string, user: string, tag: string, body = `body of ${tag}`): Promise<void> {
  const r = await runAll("swaks", ["--server", host, "--to", addr(user), "--from", "sender@example.org", "--header", `Subject: ${tag}`, "--body", body]);
  assert.match(r.stdout, /\n -> \.\n<-\s+250 /, `message ${tag} to ${host} was not acknowledged (swaks exit ${r.code}):\n${r.stdout.slice(-500)}\n${r.stderr.slice(-500)}`);
}

async function imap<T>(host: string, user: string, fn: (c: ImapFlow) => Promise<T>, pass = PW[user]!): Promise<T> {
  const c = new ImapFlow({ host, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: addr(user), pass }, logger: false });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.logout().catch(() => c.close());
  }
}

interface Msg {
  folder: string;
  uid: number;
  subject: string;
  flags: string[];
}

/** Every message of USER in every folder, with its flags. */
async function mailOf(host: string, user: string, pass = PW[user]!): Promise<{ msgs: Msg[]; uidValidity: Record<string, string> }> {
  return imap(host, user, async (c) => {
    const msgs: Msg[] = [];
    const uidValidity: Record<string, string> = {};
    for (const box of await c.list()) {
      const mb = await c.mailboxOpen(box.path);
      uidValidity[box.path] = String(mb.uidValidity);
      if (mb.exists === 0) continue;
      for await (const m of c.fetch("1:*", { uid: true, flags: true, envelope: true })) msgs.push({ folder: box.path, uid: m.uid, subject: m.envelope?.subject ?? "", flags: [...(m.flags ?? [])].sort() });
    }
    return { msgs, uidValidity };
  }, pass);
}

async function uidOf(c: ImapFlow, subject: string): Promise<number> {
  const found = await c.search({ header: { subject } }, { uid: true });
  assert.ok(found && found.length === 1, `expected one message "${subject}", found ${JSON.stringify(found)}`);
  return found[0]!;
}

/** bob's spam filter totals on the active node (learned, misclassified, corpusfed, classified). */
async function spamTotals(lab: TestLab): Promise<Record<string, number>> {
  const r = await mailha(["spam", "stats", "--user", addr("bob"), "--json", "--config", lab.configFile]);
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as { totals: Record<string, number> }[])[0]!.totals;
}

const SPAM_WORDS = "viagra casino lottery winner prize bitcoin";

/** `mailha spam train` of small generated messages (one file each, named by TAG) for USER (bob). */
async function spamTrain(lab: TestLab, cls: "spam" | "ham", tags: string[], user = "bob"): Promise<{ code: number; stdout: string; stderr: string }> {
  const dir = mkdtempSync(join(tmpdir(), "mailha-spam-train-"));
  try {
    const vocab = cls === "spam" ? SPAM_WORDS : "meeting agenda minutes project budget review";
    for (const t of tags) writeFileSync(join(dir, `${t}.eml`), `From: x@example.net\r\nSubject: ${t}\r\nMessage-ID: <${t}@example.net>\r\n\r\n${t === "both" ? "the same message on both sides" : vocab} ${t}\r\n`);
    const r = await mailha(["spam", "train", `--${cls}`, "--user", addr(user), dir, "--json", "--config", lab.configFile]);
    assert.equal(r.code, 0, `spam train --${cls}: ${r.stderr}`);
    return r;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function cli(lab: TestLab, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return mailha([...args, "--config", lab.configFile]);
}

describe("split brain: the victim's changes are reconciled into the survivor", { skip }, () => {
  const lab = writeTestLabConfig("r", 113);
  // The manual path: the operator looks first (`--dry-run`), then runs the merge.
  appendFileSync(lab.configFile, "\nreconcile:\n  auto: false\n");
  let before0: { msgs: Msg[]; uidValidity: Record<string, string> };

  before(async () => {
    const r = await cli(lab, ["lab", "up"]);
    assert.equal(r.code, 0, `lab up failed:\n${r.stderr}`);
    for (const u of ["bob", "carol"]) assert.equal((await cli(lab, ["user", "add", addr(u), "--password", PW[u]!])).code, 0);
    for (const t of ["pre-1", "pre-2", "pre-3", "pre-4"]) await send(lab.a, "bob", t);
    await imap(lab.a, "bob", async (c) => {
      await c.mailboxOpen("INBOX");
    });
    await sleep(1500); // the journal's watcher sees Dovecot's first look
    before0 = await mailOf(lab.a, "bob");
  });
  after(async () => {
    if (process.env.KEEP_LAB) return console.log(`lab kept: ${lab.configFile}`);
    await cli(lab, ["lab", "down"]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });

  test("automatic heal, then `mailha reconcile`: every acknowledged message once, flags from both sides, expunges by the rules, UIDs kept", async (t) => {
    // carol's spam is held in quarantine; one message is held before the split.
    assert.equal((await cli(lab, ["spam", "prefs", "--user", addr("carol"), "--set", "spam_action=quarantine"])).code, 0);
    await spamTrain(lab, "spam", Array.from({ length: 10 }, (_, i) => `qs-${i}`), "carol");
    await spamTrain(lab, "ham", Array.from({ length: 10 }, (_, i) => `qh-${i}`), "carol");
    await send(lab.a, "carol", "q-pre", SPAM_WORDS);
    const heldOf = async (node: string) => {
      const r = await cli(lab, ["spam", "quarantine", "list", "--user", addr("carol"), "--json"]);
      assert.equal(r.code, 0, `quarantine list on ${node}: ${r.stderr}`);
      return JSON.parse(r.stdout) as { key: string; subject: string }[];
    };
    const qPre = (await heldOf("a")).find((h) => h.subject === "q-pre");
    assert.ok(qPre, "carol's spam is held before the split");

    // --- apart: a keeps serving alone, then dies; b is forced to take over.
    await fault(lab, "cut-link", "a", "replication");
    await waitNode(lab, "b", "marking its disk Outdated", (s) => s.volume?.disk === "outdated", 15_000);
    // bob's spam filter where the sides part (every delivery is classified, and learned
    // in DSPAM's warm-up: the counts move with mail too).
    const spamAtSplit = await spamTotals(lab);
    for (const [u, tag] of [["bob", "a-1"], ["bob", "a-2"], ["carol", "a-3"]] as const) await send(lab.a, u, tag);
    // The quarantine on a: a new message held, and the one held before the split released (into a's
    // INBOX: a's watcher journals it as an append a few seconds later).
    await send(lab.a, "carol", "q-a", SPAM_WORDS);
    assert.ok((await heldOf("a")).some((h) => h.subject === "q-a"), "q-a is held on a");
    const rel = await cli(lab, ["spam", "quarantine", "release", "--user", addr("carol"), qPre.key, "--no-train"]);
    assert.equal(rel.code, 0, rel.stderr);
    await imap(lab.a, "bob", async (c) => {
      await c.mailboxOpen("INBOX");
      await c.messageFlagsAdd(String(await uidOf(c, "pre-1")), ["\\Flagged"], { uid: true });
      await c.messageFlagsAdd(String(await uidOf(c, "pre-2")), ["\\Seen"], { uid: true });
      await c.mailboxCreate("Projects");
      await c.messageMove(String(await uidOf(c, "pre-3")), "Projects", { uid: true });
    });
    assert.equal((await cli(lab, ["user", "add", addr("dave"), "--password", PW.dave!])).code, 0);
    // The spam filter learns on a: three spam messages for bob, and one ("both") as spam.
    assert.equal((await spamTrain(lab, "spam", ["s-1", "s-2", "s-3", "both"])).code, 0);
    const spamOnA = await spamTotals(lab);
    await sleep(2500); // journaled by a's watcher
    await fault(lab, "kill-node", "a");
    await waitNode(lab, "b", "refusing its Outdated disk", (s) => s.state === "failed", 30_000);
    assert.equal((await cli(lab, ["takeover", "--force", "--node", "b"])).code, 0);
    await waitNode(lab, "b", "active", (s) => s.state === "active", 90_000);
    for (const [u, tag] of [["bob", "b-1"], ["carol", "b-2"]] as const) await send(lab.b, u, tag);
    await sleep(1000);
    await imap(lab.b, "bob", async (c) => {
      await c.mailboxOpen("INBOX");
      await c.messageFlagsAdd(String(await uidOf(c, "pre-1")), ["\\Answered"], { uid: true });
      await c.messageDelete(String(await uidOf(c, "pre-2")), { uid: true }); // later than a's \Seen: stays expunged
      await c.messageDelete(String(await uidOf(c, "pre-4")), { uid: true });
    });
    // And on b: two ham messages, and "both" as ham, later than a's training of it.
    assert.equal((await spamTrain(lab, "ham", ["h-1", "h-2", "both"])).code, 0);
    const spamOnB = await spamTotals(lab);
    const pw = await cli(lab, ["user", "passwd", addr("carol"), "--password", "carol-password-2"]);
    assert.equal(pw.code, 0, pw.stderr);
    await sleep(2500);

    // --- the links come back: a is preserved and resynced without an operator.
    await fault(lab, "boot-node", "a");
    await fault(lab, "heal");
    await waitNode(lab, "a", "preserved and resynced from b", (x) => x.volume?.connection === "connected" && x.volume.outOfSyncBytes === 0 && x.volume.disk === "uptodate", 120_000);

    const dry = await cli(lab, ["reconcile", "--dry-run", "--json"]);
    assert.equal(dry.code, 0, dry.stderr);
    const plan = JSON.parse(dry.stdout) as { plan: { ops: { op: string }[]; report: { complete: boolean; entries: { rule: string; outcome: string; says: string }[] } } };
    t.diagnostic(`plan: ${JSON.stringify(plan.plan.report.entries)}`);
    const kinds = plan.plan.ops.map((o) => o.op);
    assert.equal(kinds.filter((k) => k === "add-message").length, 4, `three messages a accepted and the one it released from quarantine must be added: ${kinds.join(", ")}`);
    assert.equal(kinds.filter((k) => k === "extension").length >= 2, true, `the quarantine's hold and release are extension operations: ${kinds.join(", ")}`);
    assert.ok(kinds.includes("mailbox-create") && kinds.includes("move") && kinds.includes("set-flags") && kinds.includes("account-set"), `plan: ${kinds.join(", ")}`);
    assert.ok(plan.plan.report.complete);

    // Until it is merged: status says what to run, and failback is refused.
    const st = await cli(lab, ["status"]);
    assert.match(st.stdout, /split-brain copy of a not reconciled: .*reconcile\.auto is off.*mailha reconcile/);
    // The copy cannot be dropped while it holds changes not merged.
    const copies = JSON.parse((await cli(lab, ["volume", "preserved", "list", "--node", "a", "--json"])).stdout) as { path: string }[];
    const drop = await cli(lab, ["volume", "preserved", "drop", copies.at(-1)!.path, "--node", "a"]);
    assert.equal(drop.code, 1, "dropping an unreconciled copy must be refused");
    assert.match(drop.stderr, /not yet reconciled.*--force/);
    const fb = await cli(lab, ["failback"]);
    assert.notEqual(fb.code, 0, "failback must be refused while the reconcile is pending");
    assert.match(fb.stderr, /failback refused while a reconcile is pending/);

    const r = await cli(lab, ["reconcile"]);
    assert.equal(r.code, 0, `reconcile: ${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, /applied (\d+) of \1/);

    // --- what users see on the survivor.
    const bob = await mailOf(lab.b, "bob");
    const where = (subject: string) => bob.msgs.filter((m) => m.subject === subject);
    for (const s of ["a-1", "a-2", "b-1", "pre-1"]) assert.equal(where(s).length, 1, `bob must have "${s}" exactly once: ${JSON.stringify(where(s))}`);
    assert.deepEqual(where("pre-3").map((m) => m.folder), ["Projects"], "the message a moved is in the folder a made");
    assert.equal(where("pre-2").length, 0, "expunged on b after a flagged it: stays expunged");
    assert.equal(where("pre-4").length, 0, "expunged on b, untouched on a: stays expunged");
    const p1 = where("pre-1")[0]!;
    assert.ok(p1.flags.includes("\\Flagged") && p1.flags.includes("\\Answered"), `pre-1 has the flags of both sides: ${p1.flags.join(" ")}`);
    assert.equal(p1.uid, before0.msgs.find((m) => m.subject === "pre-1")!.uid, "a message from before the split keeps its UID");
    assert.equal(bob.uidValidity.INBOX, before0.uidValidity.INBOX, "UIDVALIDITY of INBOX never changes");
    // carol's password changed on b, after nothing changed it on a: b's stands.
    const carol = await mailOf(lab.b, "carol", "carol-password-2");
    for (const s of ["a-3", "b-2"]) assert.equal(carol.msgs.filter((m) => m.subject === s).length, 1, `carol must have "${s}" once`);
    // carol's quarantine: what a held is held on b; what a released is in b's INBOX, once.
    const heldOnB = (await heldOf("b")).map((h) => h.subject);
    assert.ok(heldOnB.includes("q-a"), `q-a, held on a while apart, is held on b: ${heldOnB.join(", ")}`);
    assert.ok(!heldOnB.includes("q-pre"), "q-pre, released on a, is no longer held on b");
    assert.deepEqual(carol.msgs.filter((m) => m.subject === "q-pre").map((m) => m.folder), ["INBOX"], "q-pre is in carol's INBOX on b, once");
    assert.equal(carol.msgs.filter((m) => m.subject === "q-a").length, 0, "q-a is not in any of carol's folders");
    // The spam filter's counts: a's learning (its deliveries' and its training) added to
    // b's, exactly; "both" learned once (as ham, b's later word: a's spam of it undone).
    const merged = await spamTotals(lab);
    const want = Object.fromEntries(Object.keys(merged).map((k) => [k, spamOnB[k]! + spamOnA[k]! - spamAtSplit[k]! - (k === "spam_learned" || k === "spam_corpusfed" ? 1 : 0)]));
    assert.deepEqual(merged, want, `bob's spam filter after the merge (at the split ${JSON.stringify(spamAtSplit)}, on a ${JSON.stringify(spamOnA)}, on b ${JSON.stringify(spamOnB)})`);
    assert.ok(merged.spam_learned! >= 3 && merged.innocent_learned! >= 3, "both sides' training is in");
    // dave, added on a during the split, exists on b with the password given on a.
    await imap(lab.b, "dave", async (c) => assert.ok(await c.status("INBOX", { messages: true })));

    // A second run has nothing to do; planning against the same copy again is empty.
    const again = await cli(lab, ["reconcile"]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /nothing to do/);
    const list = JSON.parse((await cli(lab, ["volume", "preserved", "list", "--node", "a", "--json"])).stdout) as { path: string; reconciledAtMs?: number }[];
    assert.ok(list.at(-1)!.reconciledAtMs, "the copy is marked reconciled");
    const replan = await cli(lab, ["reconcile", "--dry-run", "--json", "--copy", list.at(-1)!.path]);
    assert.equal(replan.code, 0, replan.stderr);
    const ops = (JSON.parse(replan.stdout) as { plan: { ops: { op: string; id: string }[] } }).plan.ops;
    assert.deepEqual(ops.map((o) => o.op), [], "re-planning after the merge gives nothing to do");
    assert.doesNotMatch((await cli(lab, ["status"])).stdout, /not reconciled/);
  });

  test("a reconcile killed mid-way (SIGKILL) and run again ends with every message once", async () => {
    // This time b (active now) diverges and a is forced to take over.
    await fault(lab, "cut-link", "b", "replication");
    await waitNode(lab, "a", "marking its disk Outdated", (s) => s.volume?.disk === "outdated", 15_000);
    const tags = Array.from({ length: 40 }, (_, i) => `k-${i}`);
    for (const tg of tags) await send(lab.b, "bob", tg);
    await sleep(1000);
    await fault(lab, "kill-node", "b");
    await waitNode(lab, "a", "refusing its Outdated disk", (s) => s.state === "failed", 30_000);
    assert.equal((await cli(lab, ["takeover", "--force", "--node", "a"])).code, 0);
    await waitNode(lab, "a", "active", (s) => s.state === "active", 90_000);
    await fault(lab, "boot-node", "b");
    await fault(lab, "heal");
    await waitNode(lab, "b", "preserved and resynced from a", (x) => x.volume?.connection === "connected" && x.volume.outOfSyncBytes === 0 && x.volume.disk === "uptodate", 120_000);
    // Killed once some of the 40 are applied.
    const child = spawn(process.execPath, [join(ROOT, "ops", "bin", "mailha.mjs"), "reconcile", "--json", "--config", lab.configFile], { stdio: ["ignore", "ignore", "pipe"] });
    let err = "";
    await new Promise<void>((resolve) => {
      child.stderr.on("data", (d: Buffer) => {
        err += d.toString();
        const m = [...err.matchAll(/"done":(\d+)/g)].at(-1);
        if (m && Number(m[1]) >= 10) {
          child.kill("SIGKILL");
          resolve();
        }
      });
      child.on("exit", () => resolve());
    });
    await new Promise((r) => child.once("close", r));
    assert.match(err, /"step":"applying"/, `the first run never applied anything:\n${err.slice(-800)}`);
    const st = await cli(lab, ["status"]);
    assert.match(st.stdout, /reconcile on a: interrupted|not reconciled/, "status shows the interrupted run");
    const again = await cli(lab, ["reconcile"]);
    assert.equal(again.code, 0, `${again.stdout}\n${again.stderr}`);
    const bob = await mailOf(lab.a, "bob");
    for (const tg of tags) assert.equal(bob.msgs.filter((m) => m.subject === tg).length, 1, `"${tg}" must be on a exactly once after the interrupted and the second run`);
  });
});
