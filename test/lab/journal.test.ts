// The change journal on a lab of its own, as the reconciler will read it (`mailha
// journal show --json`): the operator's account commands, and what real IMAP clients
// (imapflow) change through Dovecot (flags and keywords, COPY, MOVE, EXPUNGE, APPEND to
// Sent, CREATE, RENAME, DELETE, SUBSCRIBE) are each journaled once, with increasing
// stamps; changes made while the watcher is frozen and then killed are journaled by
// its restart's catch-up; after node a dies, b takes over and journals its own
// changes as node b, after a's, on the same volume.
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ImapFlow } from "imapflow";
import { sleep } from "../../common/exec.ts";
import { compareHlc } from "../../common/hlc.ts";
import type { DaemonRecord } from "../../common/daemon.ts";
import type { JournalEntry } from "../../services/journal/changes.ts";
import { mailha, mailhaWithInput } from "../helpers/cli.ts";
import { fault, waitNode } from "../helpers/cluster.ts";
import { labUpForTests, writeTestLabConfig } from "../helpers/lab.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const USER = "jo@mailha.test";

describe("the change journal: accounts, IMAP changes through Dovecot, a killed watcher, a failover", { skip }, () => {
  const lab = writeTestLabConfig("j", 107);
  let pass = "jo-password-1";
  let seen = 0;

  const show = async (node?: string): Promise<JournalEntry[]> => {
    const r = await mailha(["journal", "show", "--json", "--config", lab.configFile, ...(node ? ["--node", node] : [])]);
    assert.equal(r.code, 0, `journal show: ${r.stderr}`);
    return JSON.parse(r.stdout) as JournalEntry[];
  };
  /** Waits for entries after the ones already seen until PRED holds of them; returns them. */
  const next = async (what: string, pred: (es: JournalEntry[]) => boolean, ms = 15_000): Promise<JournalEntry[]> => {
    const end = Date.now() + ms;
    let es: JournalEntry[] = [];
    for (;;) {
      es = (await show()).slice(seen);
      if (pred(es) || Date.now() > end) break;
      await sleep(200);
    }
    assert.ok(pred(es), `${what}: the journal does not show it within ${ms} ms; it has after the earlier entries:\n${es.map((e) => JSON.stringify(e)).join("\n")}`);
    seen += es.length;
    return es;
  };
  const has = (kind: string, more: (e: JournalEntry) => boolean = () => true) => (es: JournalEntry[]) => es.some((e) => e.kind === kind && e.user === USER && more(e));
  const imap = async (host = lab.a) => {
    const c = new ImapFlow({ host, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: USER, pass }, logger: false });
    await c.connect();
    return c;
  };
  const watcher = (node: string): DaemonRecord => {
    const recs = JSON.parse(readFileSync(join(lab.dir, node, "run", "resources.json"), "utf8")) as DaemonRecord[];
    const r = recs.find((d) => d.name === "journal");
    assert.ok(r, `no journal watcher runs on ${node}`);
    return r;
  };

  labUpForTests(lab);

  test("user add, user passwd and alias add are journaled once each, never with the cleartext password", async () => {
    seen = (await show()).length;
    assert.equal((await mailhaWithInput(["user", "add", USER, "--config", lab.configFile], pass)).code, 0);
    pass = "jo-password-2";
    assert.equal((await mailhaWithInput(["user", "passwd", USER, "--config", lab.configFile], pass)).code, 0);
    assert.equal((await mailha(["alias", "add", "jteam@mailha.test", USER, "--config", lab.configFile])).code, 0);
    const es = (await show()).slice(seen);
    seen += es.length;
    assert.deepEqual(
      es.map((e) => [e.kind, e.table, e.key, Object.keys(e.columns as object).sort().join(",")]),
      [
        ["account", "users", USER, "active,domain,email,local_part,password"],
        ["account", "users", USER, "password"],
        ["account", "aliases", `jteam@mailha.test ${USER}`, "destination,source"],
      ],
    );
    for (const e of es) {
      assert.equal(e.node, "a");
      assert.ok(!JSON.stringify(e).includes("jo-password"), "no cleartext password in the journal");
    }
    assert.match(String((es[1]!.columns as Record<string, unknown>).password), /^\{SHA512-CRYPT\}\$6\$/);
    for (let i = 1; i < es.length; i++) assert.ok(compareHlc(es[i - 1]!.hlc, es[i]!.hlc) < 0, "stamps increase");
  });

  test("imapflow's changes through Dovecot are each journaled once, in order", async () => {
    const from = seen;
    const c = await imap();
    try {
      // A first login: Dovecot makes INBOX and the auto-subscribed folders.
      await c.mailboxOpen("INBOX");
      await c.append("INBOX", "Subject: one\r\n\r\nfirst\r\n");
      await c.append("INBOX", "Subject: two\r\n\r\nsecond\r\n");
      await c.append("INBOX", "Subject: three\r\n\r\nthird\r\n");
      const [k1, k2, k3] = (await next("three APPENDs to INBOX", (es) => es.filter((e) => e.kind === "append" && e.name === "INBOX").length === 3)).filter((e) => e.kind === "append").map((e) => e.key as string);

      await c.messageFlagsAdd("1", ["\\Seen", "\\Flagged", "Project-X"], { uid: true });
      await next("STORE +\\Seen \\Flagged Project-X", has("flags", (e) => e.key === k1 && (e.add as string[]).join() === "Project-X,\\Flagged,\\Seen"));
      await c.messageFlagsRemove("1", ["\\Flagged"], { uid: true });
      await next("STORE -\\Flagged", has("flags", (e) => e.key === k1 && (e.remove as string[]).join() === "\\Flagged"));

      await c.append("Sent", "Subject: sent\r\n\r\nmine\r\n", ["\\Seen"]);
      await next("APPEND to Sent", has("append", (e) => e.name === "Sent" && (e.flags as string[]).join() === "\\Seen"));

      // imapflow subscribes a folder it creates; SUBSCRIBE again changes nothing.
      await c.mailboxCreate("Projects");
      await c.mailboxSubscribe("Projects");
      await next("CREATE and SUBSCRIBE Projects", (es) => has("mailbox-create", (e) => e.name === "Projects" && typeof e.guid === "string")(es) && has("subscribe", (e) => e.name === "Projects")(es));
      await c.messageCopy("2", "Projects", { uid: true });
      await next("COPY to Projects", has("copy", (e) => e.key === k2 && e.toName === "Projects" && e.fromName === "INBOX"));
      await c.messageMove("3", "Projects", { uid: true });
      await next("MOVE to Projects", has("move", (e) => e.key === k3 && e.toName === "Projects" && e.fromUid === 3));
      await c.messageDelete("2", { uid: true });
      await next("EXPUNGE in INBOX", has("expunge", (e) => e.key === k2 && e.name === "INBOX" && e.uid === 2));
      await c.mailboxRename("Projects", "Archive");
      await next("RENAME Projects Archive", has("mailbox-rename", (e) => e.from === "Projects" && e.name === "Archive"));
      await c.mailboxDelete("Archive");
      await next("DELETE Archive", has("mailbox-delete", (e) => e.name === "Archive"));
    } finally {
      await c.logout().catch(() => {});
    }
    await sleep(1500);
    const es = (await show()).slice(from);
    seen = from + es.length;
    const mine = es.filter((e) => e.user === USER);
    assert.equal(mine.length, es.length, "nothing but jo's changes");
    for (let i = 1; i < es.length; i++) assert.ok(compareHlc(es[i - 1]!.hlc, es[i]!.hlc) < 0, `stamps increase (${es[i - 1]!.hlc}, ${es[i]!.hlc})`);
    const ids = new Set(es.map((e) => e.id));
    assert.equal(ids.size, es.length, "ids are unique");
    const count = (kind: string, pred: (e: JournalEntry) => boolean = () => true) => es.filter((e) => e.kind === kind && pred(e)).length;
    assert.equal(count("append", (e) => e.name === "INBOX"), 3, "each APPEND once");
    assert.equal(count("append", (e) => e.name === "Sent"), 1);
    assert.equal(count("flags"), 2, "each STORE once");
    assert.equal(count("copy"), 1);
    assert.equal(count("move"), 1);
    assert.equal(count("mailbox-create", (e) => e.name === "Projects"), 1);
    assert.equal(count("mailbox-rename"), 1);
    assert.equal(count("mailbox-delete"), 1);
    assert.equal(count("subscribe", (e) => e.name === "Projects"), 1);
    // The expunges: message 2 in INBOX, then the two in Archive when it was deleted.
    assert.deepEqual(es.filter((e) => e.kind === "expunge").map((e) => e.name).sort(), ["Archive", "Archive", "INBOX"]);
    assert.ok(es.every((e) => e.node === "a"));
  });

  test("changes made while the watcher is frozen, then killed, are journaled by its restart's catch-up", async () => {
    const w = watcher("a");
    process.kill(w.pid, "SIGSTOP");
    const c = await imap();
    try {
      await c.mailboxOpen("INBOX");
      await c.append("INBOX", "Subject: while frozen\r\n\r\nx\r\n", ["\\Draft"]);
      await c.messageFlagsAdd("1", ["\\Answered"], { uid: true });
      await c.mailboxCreate("Frozen");
    } finally {
      await c.logout().catch(() => {});
    }
    process.kill(w.pid, "SIGKILL");
    // The node daemon's monitor sees it gone and starts it again.
    await waitNode(lab, "a", "a new journal watcher", () => {
      try {
        return watcher("a").pid !== w.pid;
      } catch {
        return false;
      }
    });
    const es = await next("the catch-up after the restart", (x) => has("append", (e) => e.name === "INBOX")(x) && has("flags")(x) && has("mailbox-create")(x));
    assert.deepEqual(es.find((e) => e.kind === "append")!.flags, ["\\Draft"]);
    assert.deepEqual(es.find((e) => e.kind === "flags")!.add, ["\\Answered"]);
    assert.equal(es.find((e) => e.kind === "mailbox-create")!.name, "Frozen");
    assert.equal(es.filter((e) => e.kind === "append").length, 1, "once");
    assert.ok(es.every((e) => e.node === "a"));
  });

  test("after node a dies, b takes over and journals its own changes as node b, after a's", async () => {
    const before = await show();
    const lastOfA = before.at(-1)!;
    await fault(lab, "kill-node", "a");
    await waitNode(lab, "b", "b active", (s) => s.state === "active" && s.resources.journal === "running", 90_000);
    seen = before.length;
    assert.equal((await mailhaWithInput(["user", "add", "kim@mailha.test", "--config", lab.configFile], "kim-password-1")).code, 0);
    const c = await imap(lab.b);
    try {
      await c.mailboxOpen("INBOX");
      await c.messageFlagsAdd("1", ["\\Flagged"], { uid: true });
      await c.mailboxCreate("OnB");
    } finally {
      await c.logout().catch(() => {});
    }
    const es = await next("b's changes", (x) => x.some((e) => e.kind === "account" && e.key === "kim@mailha.test") && has("flags")(x) && has("mailbox-create", (e) => e.name === "OnB")(x));
    for (const e of es) {
      assert.equal(e.node, "b", `${e.kind} is journaled by b`);
      assert.ok(compareHlc(e.hlc, lastOfA.hlc) > 0, "after a's last entry");
    }
    assert.equal(es.filter((e) => e.kind === "flags").length, 1);
    // a's entries are still there, on b's copy of the volume.
    const all = await show();
    assert.deepEqual(all.slice(0, before.length).map((e) => e.id), before.map((e) => e.id));
  });
});
