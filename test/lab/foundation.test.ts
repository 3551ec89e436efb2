// The lab from a user's side: `mailha lab up` brings up real MariaDB, Redis, Dovecot
// and BIND9; real clients use them (mysql2, BullMQ, imapflow, nsupdate, dig); `mailha
// lab down` leaves nothing behind, also after a crash.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync, rmSync, unlinkSync } from "node:fs";
import { join, dirname } from "node:path";
import { Queue, Worker, QueueEvents } from "bullmq";
import { ImapFlow } from "imapflow";
import { run, tryRun } from "../../common/exec.ts";
import { connectMariadb, mariadbPaths } from "../../services/mariadb.ts";
import { redisConnection, redisPaths } from "../../services/redis.ts";
import { nodePaths } from "../../common/paths.ts";
import { addDomain, upsertUser } from "../../services/accounts.ts";
import { mailha } from "../helpers/cli.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";

const lab = writeTestLabConfig("t", 79);
const np = nodePaths(join(lab.dir, "a"));
const tsigKey = () => join(lab.dir, "secrets", "tsig.key");

async function leftovers(): Promise<string[]> {
  const found: string[] = [];
  const ns = (await run("ip", ["netns", "list"])).stdout.split("\n").filter((l) => l.startsWith(`mailha-${lab.name}-`));
  if (ns.length) found.push(`namespaces: ${ns.join(", ")}`);
  const links = (await run("ip", ["-o", "link", "show"])).stdout.split("\n").filter((l) => l.includes(` mh-${lab.name}-`));
  if (links.length) found.push(`links: ${links.length}`);
  const mounts = readFileSync("/proc/self/mounts", "utf8").split("\n").filter((l) => l.includes(lab.dir));
  if (mounts.length) found.push(`mounts: ${mounts.join("; ")}`);
  const loops = ((await tryRun("losetup", ["-n", "-O", "BACK-FILE"]))?.stdout ?? "").split("\n").filter((l) => l.includes(lab.dir));
  if (loops.length) found.push(`loop devices: ${loops.join(", ")}`);
  const procs = (await run("ps", ["-eo", "pid,args"])).stdout.split("\n").filter((l) => l.includes(lab.dir));
  if (procs.length) found.push(`processes: ${procs.join(" | ")}`);
  if (existsSync(lab.dir)) found.push(`directory ${lab.dir}`);
  return found;
}

describe("the lab", { skip: process.getuid?.() !== 0 ? "needs root" : false }, () => {
  before(async () => {
    const r = await mailha(["lab", "up", "--config", lab.configFile, "--json"]);
    assert.equal(r.code, 0, `mailha lab up failed:\n${r.stderr}\n${r.stdout}`);
    const body = JSON.parse(r.stdout) as { checks: { check: string; ok: boolean }[] };
    assert.deepEqual(body.checks.map((c) => [c.check, c.ok]), [["mariadb", true], ["redis", true], ["imap", true], ["smtp", true], ["dns", true]]);
  });

  after(async () => {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });

  test("lab status shows three hosts, both networks and running daemons", async () => {
    const r = await mailha(["lab", "status", "--config", lab.configFile, "--json"]);
    assert.equal(r.code, 0, r.stderr);
    const s = JSON.parse(r.stdout) as {
      up: boolean;
      hosts: { id: string; links: { dev: string; state: string; addresses: string[] }[]; processes: { command: string }[] }[];
      daemons: { name: string; alive: boolean }[];
    };
    assert.equal(s.up, true);
    const a = s.hosts.find((h) => h.id === "a")!;
    assert.deepEqual(a.links.map((l) => [l.dev, l.state]).sort(), [["rep0", "UP"], ["svc0", "UP"]]);
    const w = s.hosts.find((h) => h.id === "w")!;
    assert.deepEqual(w.links.map((l) => l.dev), ["svc0"], "the third host is not on the replication network");
    const commands = (id: string) => new Set(s.hosts.find((h) => h.id === id)!.processes.map((p) => p.command));
    for (const c of ["mariadbd", "redis-server", "dovecot", "node"]) assert.ok(commands("a").has(c), `${c} runs in node a's namespace (a is active)`);
    assert.ok(commands("w").has("named"), "named runs on the third host");
    assert.deepEqual([...commands("b")], ["node"], "passive node b runs only its node daemon and volume engine");
    assert.deepEqual(s.daemons.map((d) => d.name).sort(), ["named@w", "node@a", "node@b", "witness@w"]);
    assert.ok(s.daemons.every((d) => d.alive));
  });

  test("the replication network joins a and b only", async () => {
    const ping = (ns: string, to: string) => tryRun("ip", ["netns", "exec", ns, "ping", "-c", "1", "-W", "1", to]);
    assert.ok(await ping(`mailha-${lab.name}-a`, "10.80.0.2"), "a reaches b over the replication link");
    assert.equal(await ping(`mailha-${lab.name}-w`, "10.80.0.2"), null, "w must not reach the replication network");
    assert.ok(await ping(`mailha-${lab.name}-w`, lab.a), "w reaches a over the service network");
  });

  test("mysql2 writes and reads MariaDB", async () => {
    const db = await connectMariadb(mariadbPaths(np).socket);
    try {
      await db.query("CREATE DATABASE IF NOT EXISTS t");
      await db.query("CREATE TABLE IF NOT EXISTS t.notes (id INT PRIMARY KEY, body TEXT)");
      await db.query("REPLACE INTO t.notes VALUES (1, ?)", ["written by the test"]);
      const [rows] = await db.query("SELECT body FROM t.notes WHERE id = 1");
      assert.deepEqual(rows, [{ body: "written by the test" }]);
    } finally {
      await db.end();
    }
  });

  test("BullMQ adds and processes a job on Redis", async () => {
    const connection = redisConnection(redisPaths(np).socket);
    const queue = new Queue("foundation", { connection });
    const events = new QueueEvents("foundation", { connection });
    const worker = new Worker("foundation", async (job) => ({ doubled: (job.data as { n: number }).n * 2 }), { connection });
    try {
      await events.waitUntilReady();
      const job = await queue.add("double", { n: 21 });
      const result = await job.waitUntilFinished(events, 10_000);
      assert.deepEqual(result, { doubled: 42 });
    } finally {
      await worker.close();
      await events.close();
      await queue.close();
    }
  });

  test("a user created in MariaDB logs in to Dovecot with imapflow; a wrong password is refused", async () => {
    const db = await connectMariadb(mariadbPaths(np).socket);
    try {
      await addDomain(db, "mailha.test");
      await upsertUser(db, "bob@mailha.test", "bobs-secret-pw");
    } finally {
      await db.end();
    }
    const login = async (pass: string) => {
      const client = new ImapFlow({ host: lab.a, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: "bob@mailha.test", pass }, logger: false });
      await client.connect();
      const mb = await client.mailboxOpen("INBOX");
      const uidValidity = mb.uidValidity;
      const boxes = (await client.list()).map((b) => b.path).sort();
      await client.logout();
      return { uidValidity, boxes };
    };
    const ok = await login("bobs-secret-pw");
    assert.ok(ok.uidValidity > 0n);
    assert.deepEqual(ok.boxes, ["Drafts", "INBOX", "Junk", "Sent", "Trash"]);
    await assert.rejects(login("wrong-password"), /auth|fail/i);
  });

  test("BIND accepts a TSIG-signed update, refuses unsigned and wrongly signed ones, and dig sees the result", async () => {
    const script = (name: string, ip: string) => `server ${lab.w}\nzone mailha.test\nupdate add ${name}.mailha.test 60 A ${ip}\nsend\n`;
    await run("nsupdate", ["-k", tsigKey()], { input: script("signed", "10.79.0.50") });
    const dig = async (name: string) => (await run("dig", ["+short", `@${lab.w}`, `${name}.mailha.test`, "A"])).stdout.trim();
    assert.equal(await dig("signed"), "10.79.0.50");

    await assert.rejects(run("nsupdate", [], { input: script("unsigned", "10.79.0.51") }), /REFUSED/);
    assert.equal(await dig("unsigned"), "");

    const wrongKey = join(dirname(lab.configFile), "wrong.key");
    const { writeFileSync } = await import("node:fs");
    const realName = /key "([^"]+)"/.exec(readFileSync(tsigKey(), "utf8"))![1];
    writeFileSync(wrongKey, `key "${realName}" {\n\talgorithm hmac-sha256;\n\tsecret "${Buffer.alloc(32, 7).toString("base64")}";\n};\n`, { mode: 0o600 });
    await assert.rejects(run("nsupdate", ["-k", wrongKey], { input: script("forged", "10.79.0.52") }), /NOTAUTH|BADSIG|tsig verify failure|REFUSED/i);
    assert.equal(await dig("forged"), "");
  });

  test("lab up refuses to build a second copy of a running lab", async () => {
    const r = await mailha(["lab", "up", "--config", lab.configFile]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /already up/);
  });

  test("lab down leaves nothing; a second down is harmless", async () => {
    const r = await mailha(["lab", "down", "--config", lab.configFile, "--json"]);
    assert.equal(r.code, 0, r.stderr);
    const body = JSON.parse(r.stdout) as { stopped: { outcome: string }[]; dirRemoved: boolean };
    assert.equal(body.stopped.length, 4);
    assert.ok(body.stopped.every((s) => s.outcome === "stopped"), JSON.stringify(body.stopped));
    assert.deepEqual(await leftovers(), []);
    const again = await mailha(["lab", "down", "--config", lab.configFile]);
    assert.equal(again.code, 0);
    assert.match(again.stdout, /not up; nothing to remove/);
  });

  test("lab down after a crash (state file lost, a daemon killed) still finds and removes everything", async () => {
    const up = await mailha(["lab", "up", "--config", lab.configFile]);
    assert.equal(up.code, 0, up.stderr);
    const state = JSON.parse(readFileSync(join(lab.dir, "lab.json"), "utf8")) as { daemons: { name: string; pid: number }[] };
    process.kill(state.daemons.find((d) => d.name === "node@a")!.pid, "SIGKILL");
    unlinkSync(join(lab.dir, "lab.json"));
    const st = await mailha(["lab", "status", "--config", lab.configFile]);
    assert.equal(st.code, 1, "status must say the lab is not fully up");
    const down = await mailha(["lab", "down", "--config", lab.configFile, "--json"]);
    assert.equal(down.code, 0, down.stderr);
    assert.ok((JSON.parse(down.stdout) as { strayProcessesKilled: number }).strayProcessesKilled >= 3);
    assert.deepEqual(await leftovers(), []);
  });
});
