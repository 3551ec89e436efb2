// No secret in any log: a lab run that handles every secret the cluster has (a user
// created and given a new password on stdin, IMAP, POP3 and SMTP AUTH logins with it,
// on the active node and through the passive node's proxy, failed logins, a signed DNS
// update, heartbeats, the witness, the replication link, the services' own passwords
// and Dovecot's master secret) and then reads every file under the lab's log
// directories, the cluster and volume event logs and the change journals, looking for
// each secret as it is and in the encodings a program might print it in (hex, base64,
// a JSON byte list), and looks at every command line (ps) for them too. A failure
// names the file (or process) and the secret's name, never the secret.
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { existsSync, lstatSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import nodemailer from "nodemailer";
import { ImapFlow } from "imapflow";
import { runAll, sleep } from "../../common/exec.ts";
import { parseTsigKeyFile } from "../../dns/tsig-key.ts";
import { mailha, mailhaWithInput } from "../helpers/cli.ts";
import { labUpForTests, writeTestLabConfig } from "../helpers/lab.ts";
import { config, waitNode } from "../helpers/cluster.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const USER = "sam@mailha.test";
const PASS_1 = "sam-first-Pa55word";
const PASS_2 = "sam-second-Pa55word";
const WRONG = "not-sams-Pa55word";
/** Logs bigger than this are read only up to it (a lab run writes a few MiB in all). */
const FILE_BYTES_MAX = 64 * 1024 * 1024;

interface Secret {
  readonly name: string;
  /** The forms to look for: the secret itself and its encodings. */
  readonly forms: readonly string[];
}

/** A secret's text, and the encodings of its bytes a log line could carry. */
function formsOf(text: string, bytes: Buffer = Buffer.from(text)): string[] {
  const forms = new Set([text, bytes.toString("hex"), bytes.toString("base64"), bytes.toString("base64").replace(/=+$/, ""), bytes.toString("base64url")]);
  // A Buffer that went through JSON.stringify: {"type":"Buffer","data":[104,101,...]}.
  forms.add(`[${[...bytes.subarray(0, 16)].join(",")}`);
  // A long random secret also counts when a log shows only its first 16 characters.
  for (const f of [...forms]) if (f.length >= 24 && !f.startsWith("[")) forms.add(f.slice(0, 16));
  return [...forms].filter((f) => f.length >= 8);
}

/** Every regular file under DIR (no symlinks followed), bounded in depth. */
function filesUnder(dir: string, depth = 8): string[] {
  if (!existsSync(dir) || depth < 0) return [];
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...filesUnder(p, depth - 1));
    else if (e.isFile()) out.push(p);
  }
  return out;
}

describe("no secret in any log", { skip }, () => {
  const lab = writeTestLabConfig("sl", 123);
  const data = (node: string) => join(lab.dir, node, "data");

  labUpForTests(lab);

  test("a run that handles every secret writes none of them into a log", async (t) => {
    // Accounts: the password on stdin, then changed.
    const add = await mailhaWithInput(["user", "add", USER, "--config", lab.configFile], `${PASS_1}\n`);
    assert.equal(add.code, 0, `user add: ${add.stderr}`);
    const pw = await mailhaWithInput(["user", "passwd", USER, "--password-stdin", "--config", lab.configFile], `${PASS_2}\n`);
    assert.equal(pw.code, 0, `user passwd: ${pw.stderr}`);

    // Logins on the active node and through the passive node's proxy; mail sent with SMTP AUTH.
    for (const host of [lab.a, lab.b]) {
      const im = new ImapFlow({ host, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: USER, pass: PASS_2 }, logger: false });
      await im.connect();
      await im.mailboxOpen("INBOX");
      await im.logout();
      const tx = nodemailer.createTransport({ host, port: 465, secure: true, tls: { rejectUnauthorized: false }, auth: { user: USER, pass: PASS_2 } });
      await tx.sendMail({ from: USER, to: USER, subject: `secrets test via ${host}`, text: "hello" });
      tx.close();
      const pop = await runAll("curl", ["-sk", "--ssl-reqd", `pop3://${host}/`, "-u", `${USER}:${PASS_2}`], { timeoutMs: 30_000 });
      assert.equal(pop.code, 0, `POP3 login on ${host}: ${pop.stderr}`);
    }
    // Failed logins, with the old and with a wrong password: IMAP, SMTP AUTH, POP3.
    for (const bad of [PASS_1, WRONG]) {
      const im = new ImapFlow({ host: lab.a, port: 993, secure: true, tls: { rejectUnauthorized: false }, auth: { user: USER, pass: bad }, logger: false });
      await assert.rejects(im.connect(), "an IMAP login with a wrong password succeeded");
      const tx = nodemailer.createTransport({ host: lab.a, port: 587, secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, auth: { user: USER, pass: bad } });
      await assert.rejects(tx.verify(), "an SMTP AUTH with a wrong password succeeded");
      tx.close();
      const pop = await runAll("curl", ["-sk", "--ssl-reqd", `pop3://${lab.a}/`, "-u", `${USER}:${bad}`], { timeoutMs: 30_000 });
      assert.notEqual(pop.code, 0, "a POP3 login with a wrong password succeeded");
    }
    // A signed DNS update (TSIG), read back.
    const dns = await mailha(["dns", "apply", "--config", lab.configFile]);
    assert.equal(dns.code, 0, `dns apply: ${dns.stderr}`);
    // Heartbeats, the witness and the replication link have run all along; give the
    // logs a moment to reach the disk, and check the cluster is still whole.
    await sleep(2000);
    await waitNode(lab, "a", "a active with its peer up", (s) => s.state === "active" && s.peer.state === "up", 30_000);

    // Every secret the lab made, and the passwords used.
    const c = config(lab);
    const secrets: Secret[] = [
      { name: "heartbeat key", forms: formsOf(readFileSync(c.heartbeat.key_file, "utf8").trim()) },
      { name: "replication secret", forms: formsOf(readFileSync(c.volume.secret_file, "utf8").trim()) },
    ];
    const tsig = parseTsigKeyFile(readFileSync(c.dns.tsig_key_file!, "utf8"));
    secrets.push({ name: "TSIG key", forms: formsOf(tsig.secret.toString("base64"), tsig.secret) });
    // The services' own passwords (MariaDB accounts, Redis, Dovecot's master, the monitor) on the volume.
    const serviceSecrets = filesUnder(join(data("a"), "etc"), 1).filter((f) => f.endsWith(".secret"));
    assert.ok(serviceSecrets.some((f) => f.endsWith("dovecot-master.secret")), `no dovecot-master.secret among ${serviceSecrets.join(", ")}`);
    for (const f of serviceSecrets) secrets.push({ name: `${relative(data("a"), f)} (active node's data)`, forms: formsOf(readFileSync(f, "utf8").trim()) });
    for (const [name, p] of [["the user's first password", PASS_1], ["the user's password", PASS_2], ["a wrong password", WRONG], ["the lab test user's password", c.lab!.test_user.password]] as const) {
      secrets.push({ name, forms: formsOf(p) });
    }

    // Every log: the log folders of a, b and w, the event logs, the change journals.
    const logs = new Set<string>();
    for (const host of ["a", "b", "w"]) for (const f of filesUnder(join(lab.dir, host, "log"))) logs.add(f);
    for (const node of ["a", "b"]) {
      for (const f of filesUnder(join(data(node), "journal"))) logs.add(f);
      for (const f of filesUnder(join(data(node), "log"))) logs.add(f);
    }
    for (const f of filesUnder(lab.dir, 3)) if (/\.(log|jsonl)$/.test(f)) logs.add(f);
    assert.ok([...logs].some((f) => f.endsWith("cluster-events.jsonl")), `no cluster event log among ${logs.size} files`);
    assert.ok([...logs].some((f) => /smtp/.test(f)), "no SMTP log found");
    assert.ok([...logs].some((f) => /dovecot/.test(f)), "no Dovecot log found");

    const scan = () => {
      const found: string[] = [];
      let naming = 0;
      let bytes = 0;
      for (const f of logs) {
        if (!existsSync(f) || lstatSync(f).size === 0) continue;
        const text = readFileSync(f).subarray(0, FILE_BYTES_MAX).toString("latin1");
        bytes += text.length;
        if (text.includes(USER)) naming++;
        for (const s of secrets) if (s.forms.some((form) => text.includes(form))) found.push(`${relative(lab.dir, f)}: ${s.name}`);
      }
      return { found, naming, bytes };
    };
    // The scan finds a secret a log holds in another form (so it would find a real one).
    const canary = join(lab.dir, "a", "log", "canary.log");
    logs.add(canary);
    writeFileSync(canary, `{"msg":"handshake","secret":"${readFileSync(c.volume.secret_file, "utf8").trim().slice(0, 16)}..."}\n`);
    assert.deepEqual(scan().found.filter((f) => f.includes("canary")), ["a/log/canary.log: replication secret"]);
    rmSync(canary);
    const r = scan();
    t.diagnostic(`${logs.size} logs, ${r.bytes} bytes read, ${secrets.length} secrets looked for`);
    // The logs read are those that record the logins (where a password would show).
    assert.ok(r.naming >= 2, `only ${r.naming} of the ${logs.size} logs read name ${USER}`);
    assert.deepEqual(r.found, [], `secrets written into logs (${logs.size} files read):\n  ${r.found.join("\n  ")}`);

    // Nor on a command line, where every local user sees it (ps).
    const inPs: string[] = [];
    for (const pid of readdirSync("/proc").filter((d) => /^\d+$/.test(d))) {
      let cmd: string;
      try {
        cmd = readFileSync(`/proc/${pid}/cmdline`, "latin1").replace(/\0/g, " ");
      } catch {
        continue;
      }
      for (const s of secrets) if (s.forms.some((form) => cmd.includes(form))) inPs.push(`pid ${pid} (${cmd.split(" ")[0]}): ${s.name}`);
    }
    assert.deepEqual(inPs, [], `secrets on command lines:\n  ${inPs.join("\n  ")}`);
  });
});
