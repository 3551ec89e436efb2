// Least privilege as a local user would probe it on the active node: ps shows MariaDB,
// Redis and SMTP not running as root; MariaDB's root cannot be had with an empty
// password (nor reached at all by others), Redis answers nobody without its password,
// nothing listens on TCP 3306 or 6379, the sockets' directories let in only their
// daemon and the mail group; each service logs in with its own least account; mail
// still flows (delivered into Maildirs the mail uid owns, out through the queue); an
// outbound job naming a file outside the queue's spool (/etc/passwd, a mail file, a
// link out) is refused and the file is left alone; and a volume an earlier version
// left (root's datadir, root with an empty password, wider grants) starts and is fixed.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { spawn } from "node:child_process";
import { Queue, QueueEvents } from "bullmq";
import nodemailer from "nodemailer";
import { run, runAll, sleep } from "../../common/exec.ts";
import { nodePaths } from "../../common/paths.ts";
import { connectMariadb, connectMariadbAs, mariadbPaths } from "../../services/mariadb.ts";
import { redisConnection, redisPaths } from "../../services/redis.ts";
import { systemUser } from "../../services/privileges.ts";
import { mailha, ROOT } from "../helpers/cli.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";
import { config, fault, waitNode } from "../helpers/cluster.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const USER = "alice@mailha.test";
const PASS = "lab-password-alice";

describe("least privilege on the active node", { skip }, () => {
  const lab = writeTestLabConfig("pv", 121);
  const np = nodePaths(join(lab.dir, "a"));
  const sql = mariadbPaths(np);
  const rds = redisPaths(np);
  const ns = `mailha-${lab.name}-a`;
  let mailUid = 0;
  let mailGid = 0;

  /** `ps` as a user runs it: the user name (or uid) of every process whose command line has NEEDLE. */
  const usersOf = async (needle: string) =>
    (await run("ps", ["-eo", "user:32=,args="])).stdout
      .split("\n")
      .filter((l) => l.includes(needle) && !l.includes("ps -eo"))
      .map((l) => l.trim().split(/\s+/)[0]!);
  const asMailUid = (cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env) => runAll("setpriv", [`--reuid=${mailUid}`, `--regid=${mailGid}`, "--clear-groups", cmd, ...args], { env, timeoutMs: 10_000 });
  const asNobody = (cmd: string, args: string[]) => runAll("runuser", ["-u", "nobody", "--", cmd, ...args], { timeoutMs: 10_000 });
  const redisAuth = () => ({ ...process.env, REDISCLI_AUTH: readFileSync(rds.secret, "utf8").trim() });

  before(async () => {
    const r = await mailha(["lab", "up", "--config", lab.configFile]);
    assert.equal(r.code, 0, `lab up failed:\n${r.stderr}`);
    mailUid = config(lab).mail.mail_uid;
    mailGid = config(lab).mail.mail_gid;
  });
  after(async () => {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });

  test("ps shows mariadbd as mysql, redis-server as redis and the SMTP service as the mail user, none as root", async () => {
    const mail = systemUser("mailha")?.uid === mailUid ? "mailha" : String(mailUid);
    assert.deepEqual(await usersOf(`--datadir=${sql.datadir}`), ["mysql"], "mariadbd of node a runs as mysql");
    assert.deepEqual(await usersOf(`redis-server unixsocket:${rds.socket}`), ["redis"], "redis-server of node a runs as redis");
    assert.deepEqual(await usersOf(`smtp run --config ${lab.configFile} --node a`), [mail], `mailha smtp run runs as ${mail} (uid ${mailUid})`);
    assert.match(readFileSync(join(np.log, "smtp.log"), "utf8"), /"msg":"smtp dropped root: runs as the mail uid"/);
    // The passive node's proxy and backup MX (on b) bind their ports, then drop root too.
    assert.deepEqual(await usersOf(`passive run --config ${lab.configFile} --node b`), [mail], `b's passive services run as ${mail}`);
  });

  test("nothing listens on TCP 3306 or 6379 in node a's namespace", async () => {
    const listening = (await run("ip", ["netns", "exec", ns, "ss", "-Hltn"])).stdout;
    assert.ok(listening.includes(":25 "), `ss sees SMTP on 25 (so it looks in the right place):\n${listening}`);
    assert.doesNotMatch(listening, /:3306\b/, "MariaDB listens on TCP");
    assert.doesNotMatch(listening, /:6379\b/, "Redis listens on TCP");
  });

  test("the sockets: MariaDB's directory mysql:mail 0750, Redis's socket redis:mail 0770 in a setgid directory; the passwords 0600 root's", () => {
    const mysql = systemUser("mysql")!;
    const redis = systemUser("redis")!;
    const d = statSync(sql.runDir);
    assert.deepEqual([d.uid, d.gid, d.mode & 0o7777], [mysql.uid, mailGid, 0o750], `${sql.runDir}: owner, group, mode`);
    const rd = statSync(rds.runDir);
    assert.deepEqual([rd.uid, rd.gid, rd.mode & 0o7777], [redis.uid, mailGid, 0o2750], `${rds.runDir}: owner, group, mode`);
    const s = statSync(rds.socket);
    assert.ok(s.isSocket());
    assert.deepEqual([s.uid, s.gid, s.mode & 0o777], [redis.uid, mailGid, 0o770], `${rds.socket}: owner, group, mode`);
    assert.equal(statSync(sql.datadir).uid, mysql.uid, "the datadir on the volume is mysql's");
    assert.equal(statSync(rds.dir).uid, redis.uid, "Redis's directory on the volume is redis's");
    for (const f of readdirSync(sql.secretsDir).filter((x) => x.endsWith(".secret"))) {
      const st = statSync(join(sql.secretsDir, f));
      assert.deepEqual([st.uid, st.mode & 0o777], [0, 0o600], `${f} is root's, 0600`);
    }
    assert.equal(statSync(rds.conf).mode & 0o777, 0o600, "redis.conf (it holds the password) is 0600");
  });

  test("MariaDB's root: not for another user with an empty password, nor for anyone who is not the OS root", async () => {
    const sel = ["-uroot", `--socket=${sql.socket}`, "-e", "SELECT 1"];
    const nobody = await asNobody("mariadb", sel);
    assert.notEqual(nobody.code, 0);
    assert.match(nobody.stderr, /Can't connect to local server through socket .*\(13\)/, "nobody may not even reach the socket");
    const mail = await asMailUid("mariadb", sel);
    assert.notEqual(mail.code, 0, "the mail uid (which reaches the socket) logged in as MariaDB's root");
    assert.match(mail.stderr, /Access denied for user 'root'@'localhost'/);
    const empty = await asMailUid("mariadb", ["-uroot", "--password=", `--socket=${sql.socket}`, "-e", "SELECT 1"]);
    assert.match(empty.stderr, /Access denied for user 'root'@'localhost'/, "root with an empty password");
    const db = await connectMariadb(sql.socket);
    try {
      const [shown] = await db.query("SHOW CREATE USER 'root'@'localhost'");
      assert.equal(Object.values((shown as Record<string, string>[])[0]!)[0], "CREATE USER `root`@`localhost` IDENTIFIED VIA unix_socket");
      const [roots] = await db.query("SELECT CONCAT(user, '@', host) AS a FROM mysql.global_priv WHERE user IN ('root', '') ORDER BY a");
      assert.deepEqual((roots as { a: string }[]).map((r) => r.a), ["root@localhost"], "no other root and no anonymous account");
      const [net] = await db.query("SELECT @@skip_networking AS off");
      assert.equal((net as { off: number }[])[0]!.off, 1);
    } finally {
      await db.end();
    }
  });

  test("each service has its own least account: SMTP and Dovecot read, the account commands write rows, none makes tables", async () => {
    const smtp = await connectMariadbAs(sql.socket, "smtp", "mailha");
    try {
      const [rows] = await smtp.query("SELECT COUNT(*) AS n FROM users WHERE email = ?", [USER]);
      assert.equal((rows as { n: number }[])[0]!.n, 1);
      await assert.rejects(smtp.query("UPDATE users SET active = 0"), /UPDATE command denied/);
      await assert.rejects(smtp.query("SELECT * FROM domains"), /SELECT command denied/);
    } finally {
      await smtp.end();
    }
    const dovecot = await connectMariadbAs(sql.socket, "dovecot", "mailha");
    try {
      await assert.rejects(dovecot.query("SELECT * FROM aliases"), /SELECT command denied/);
    } finally {
      await dovecot.end();
    }
    const accounts = await connectMariadbAs(sql.socket, "accounts", "mailha");
    try {
      await accounts.query("SELECT COUNT(*) FROM domains");
      await assert.rejects(accounts.query("CREATE TABLE x (id INT)"), /CREATE command denied/);
      await assert.rejects(accounts.query("SELECT * FROM mysql.global_priv"), /denied/);
    } finally {
      await accounts.end();
    }
  });

  test("redis-cli without the password gets NOAUTH; with it, PONG (and no CONFIG); nobody cannot reach the socket", async () => {
    const noPw = await runAll("redis-cli", ["-s", rds.socket, "PING"], { timeoutMs: 10_000 });
    assert.match(noPw.stdout + noPw.stderr, /NOAUTH Authentication required/);
    const wrong = await runAll("redis-cli", ["-s", rds.socket, "PING"], { env: { ...process.env, REDISCLI_AUTH: "not-the-password" }, timeoutMs: 10_000 });
    assert.match(wrong.stdout + wrong.stderr, /WRONGPASS|invalid username-password/);
    const ok = await runAll("redis-cli", ["-s", rds.socket, "PING"], { env: redisAuth(), timeoutMs: 10_000 });
    assert.equal(ok.stdout.trim(), "PONG");
    const cfg = await runAll("redis-cli", ["-s", rds.socket, "CONFIG", "SET", "dir", "/etc"], { env: redisAuth(), timeoutMs: 10_000 });
    assert.match(cfg.stdout + cfg.stderr, /NOPERM/, "even with the password, CONFIG SET dir is refused");
    const mail = await asMailUid("redis-cli", ["-s", rds.socket, "PING"]);
    assert.match(mail.stdout + mail.stderr, /NOAUTH/, "the mail group reaches the socket, and still needs the password");
    const nobody = await asNobody("redis-cli", ["-s", rds.socket, "PING"]);
    assert.match(nobody.stdout + nobody.stderr, /Permission denied/);
  });

  test("mail flows as the mail uid: a delivery lands in a Maildir the mail uid owns, a message for another domain goes out and leaves the spool", async () => {
    const sinkDir = join(dirname(lab.configFile), "sink");
    const sink = spawn("nsenter", [`--net=/run/netns/mailha-${lab.name}-w`, process.execPath, "--import", "tsx", join(ROOT, "test", "helpers", "sink.ts"), lab.w, sinkDir], { cwd: ROOT, stdio: ["ignore", "pipe", "inherit"] });
    try {
      await new Promise<void>((resolve) => sink.stdout!.once("data", () => resolve()));
      const tx = nodemailer.createTransport({ host: lab.a, port: 587, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: USER, pass: PASS } });
      await tx.sendMail({ from: USER, to: USER, subject: "to myself", text: "local" });
      await tx.sendMail({ from: USER, to: "someone@sink.test", subject: "out to the sink as the mail uid", text: "remote" });
      tx.close();
      const inbox = join(np.data, "mail", "mailha.test", "alice", "Maildir", "new");
      const mine = readdirSync(inbox).map((f) => statSync(join(inbox, f)));
      assert.ok(mine.length >= 1 && mine.every((st) => st.uid === mailUid && st.gid === mailGid), "delivered files are the mail uid's");
      for (let i = 0; i < 100 && !(existsSync(sinkDir) && readdirSync(sinkDir).some((f) => f.endsWith(".eml"))); i++) await sleep(200);
      const got = existsSync(sinkDir) ? readdirSync(sinkDir).filter((f) => f.endsWith(".eml")).map((f) => readFileSync(join(sinkDir, f), "utf8")) : [];
      assert.ok(got.some((m) => m.includes("out to the sink as the mail uid")), "the sink received the message the queue (running as the mail uid) sent");
      const outbound = join(np.data, "outbound");
      for (let i = 0; i < 50 && readdirSync(outbound).length; i++) await sleep(100);
      assert.deepEqual(readdirSync(outbound), [], "the queue removed its spool file after the delivery");
    } finally {
      sink.kill("SIGTERM");
    }
  });

  test("an outbound job naming /etc/passwd, a mail file or a link out of the spool is refused and the file stays", async () => {
    const secret = join(np.data, "mail", "mailha.test", "alice", "Maildir", "cur", "planted:2,S");
    writeFileSync(secret, "Subject: private\r\n\r\nnot for the queue\r\n");
    const link = join(np.data, "outbound", "planted-link.eml");
    symlinkSync(secret, link);
    const passwd = readFileSync("/etc/passwd", "utf8");
    const connection = redisConnection(rds.socket);
    const queue = new Queue("outbound", { connection });
    const events = new QueueEvents("outbound", { connection });
    try {
      await events.waitUntilReady();
      for (const file of ["/etc/passwd", secret, `${np.data}/outbound/../mail/mailha.test/alice/Maildir/cur/planted:2,S`, link]) {
        const job = await queue.add("deliver", { id: `planted-${Date.now()}`, from: USER, to: ["someone@sink.test"], file, queuedAt: Date.now(), isBounce: false }, { attempts: 3 });
        await assert.rejects(job.waitUntilFinished(events, 15_000), /refused: /, `a job naming ${file} must fail`);
        const state = await queue.getJobState(job.id!);
        assert.equal(state, "failed", `${file}: failed for good, not retried`);
      }
    } finally {
      await events.close();
      await queue.close();
    }
    assert.equal(readFileSync("/etc/passwd", "utf8"), passwd);
    assert.equal(readFileSync(secret, "utf8"), "Subject: private\r\n\r\nnot for the queue\r\n", "the mail file a job named is untouched");
    assert.ok(existsSync(link), "the planted link is left as it was");
    const log = readFileSync(join(np.log, "smtp.log"), "utf8");
    assert.match(log, /"reason":"\/etc\/passwd is not in the outbound spool [^"]*","msg":"outbound job refused/);
    assert.match(log, /planted-link\.eml leads outside the outbound spool/);
    rmSync(link);
  });

  test("a volume an earlier version left (root's datadir, root with an empty password and over TCP, wider grants) starts and is fixed", async () => {
    const db = await connectMariadb(sql.socket);
    try {
      await db.query("ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('')");
      await db.query("CREATE USER 'root'@'127.0.0.1'");
      await db.query("CREATE USER ''@'localhost'");
      await db.query("GRANT SELECT ON mailha.* TO 'dovecot'@'localhost'");
    } finally {
      await db.end();
    }
    await run("chown", ["-R", "root:root", sql.datadir, rds.dir, join(np.data, "outbound"), join(np.data, "journal")]);
    const { at } = await fault(lab, "kill-service", "a", "mariadb");
    await sleep(500);
    // The monitor notices the kill within its interval and restarts MariaDB, which fixes root.
    const fixedLines = () => readFileSync(join(np.log, "node.log"), "utf8").split("\n").filter((l) => l.includes("unix_socket only now") && JSON.parse(l).time >= Date.parse(at));
    for (let i = 0; i < 180 && fixedLines().length === 0; i++) await sleep(500);
    await waitNode(lab, "a", "running the group again after MariaDB was killed", (s) => s.state === "active" && Object.values(s.resources).every((r) => r === "running"), 90_000);
    const log = fixedLines();
    assert.equal(log.length, 1, "the node says it fixed MariaDB's root");
    const check = await connectMariadb(sql.socket);
    try {
      const [roots] = await check.query("SELECT CONCAT(user, '@', host) AS a FROM mysql.global_priv WHERE user IN ('root', '') ORDER BY a");
      assert.deepEqual((roots as { a: string }[]).map((r) => r.a), ["root@localhost"]);
      const [grants] = await check.query("SHOW GRANTS FOR 'dovecot'@'localhost'");
      assert.deepEqual((grants as Record<string, string>[]).map((g) => Object.values(g)[0]!).filter((g) => !g.startsWith("GRANT USAGE")), ["GRANT SELECT ON `mailha`.`users` TO `dovecot`@`localhost`"]);
    } finally {
      await check.end();
    }
    const empty = await asMailUid("mariadb", ["-uroot", "--password=", `--socket=${sql.socket}`, "-e", "SELECT 1"]);
    assert.match(empty.stderr, /Access denied for user 'root'@'localhost'/);
    assert.equal(statSync(sql.datadir).uid, systemUser("mysql")!.uid, "the datadir is mysql's again");
    assert.equal(statSync(rds.dir).uid, systemUser("redis")!.uid, "Redis's directory is redis's again");
    // And mail still goes in, through SMTP as the mail uid.
    const sw = await runAll("swaks", ["--server", lab.a, "--to", USER, "--from", "x@example.net", "--header", "Subject: after the upgrade"], { timeoutMs: 30_000 });
    assert.match(sw.stdout, /250 2\.0\.0 Ok: delivered/, sw.stdout);
  });
});
