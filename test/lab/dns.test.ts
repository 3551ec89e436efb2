// DNS from the operator's side, against the lab's BIND9: the records mailha renders
// and applies are what dig shows; a dead node's address leaves the mail host and comes
// back; BIND refuses an unsigned update and one signed with a wrong key, and mailha
// names the refusal; the rendered nsupdate input works with nsupdate itself.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { parseDocument } from "yaml";
import { run } from "../../common/exec.ts";
import { loadConfig } from "../../common/config.ts";
import { sendUpdate } from "../../dns/update.ts";
import { readLease, takeLease } from "../../dns/lease.ts";
import { mailha } from "../helpers/cli.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;

describe("dns", { skip }, () => {
  const lab = writeTestLabConfig("d", 99);
  const dig = async (name: string, type: string) => (await run("dig", ["+short", `@${lab.w}`, name, type])).stdout.trim().split("\n").filter(Boolean).sort();
  before(async () => {
    const r = await mailha(["lab", "up", "--no-services", "--config", lab.configFile]);
    assert.equal(r.code, 0, r.stderr);
  });
  after(async () => {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });

  test("applied records are what dig shows; the mail host loses a dead node's address and gets it back", async () => {
    const gone = await mailha(["dns", "apply", "--live", "b", "--config", lab.configFile, "--json"]);
    assert.equal(gone.code, 0, gone.stderr);
    assert.equal((JSON.parse(gone.stdout) as { verified: boolean }).verified, true);
    assert.deepEqual(await dig("mail.mailha.test", "A"), [lab.b], "only b's address while a is dead");
    assert.deepEqual(await dig("mailha.test", "MX"), ["10 mx1.mailha.test.", "20 mx2.mailha.test."], "MX records stay");
    const back = await mailha(["dns", "apply", "--config", lab.configFile]);
    assert.equal(back.code, 0, back.stderr);
    assert.match(back.stdout, /applied and verified/);
    assert.deepEqual(await dig("mail.mailha.test", "A"), [lab.a, lab.b].sort());
    assert.deepEqual(await dig("mx1.mailha.test", "A"), [lab.a]);
  });

  test("BIND refuses unsigned and wrongly signed updates; mailha says which", async () => {
    const c = loadConfig(lab.configFile);
    const unsigned = await sendUpdate(lab.w, 53, "mailha.test", [], [{ op: "add", name: "evil.mailha.test", type: "A", ttl: 60, data: "10.99.0.66" }], null);
    assert.equal(unsigned.rcode, "REFUSED");
    const wrongKey = join(dirname(lab.configFile), "wrong.key");
    const realName = /key "([^"]+)"/.exec(readFileSync(c.dns.tsig_key_file!, "utf8"))![1];
    writeFileSync(wrongKey, `key "${realName}" {\n\talgorithm hmac-sha256;\n\tsecret "${Buffer.alloc(32, 9).toString("base64")}";\n};\n`, { mode: 0o600 });
    const doc = parseDocument(readFileSync(lab.configFile, "utf8"));
    doc.setIn(["dns", "tsig_key_file"], wrongKey);
    const wrongCfg = join(dirname(lab.configFile), "wrong.yaml");
    writeFileSync(wrongCfg, doc.toString());
    const r = await mailha(["dns", "apply", "--config", wrongCfg]);
    assert.equal(r.code, 1);
    assert.match(r.stdout, /refused the update: NOTAUTH \(BADSIG\)/);
    assert.deepEqual(await dig("evil.mailha.test", "A"), [], "nothing was changed");
  });

  test("the rendered nsupdate input works with nsupdate and the key file", async () => {
    const r = await mailha(["dns", "render", "--live", "a", "--json", "--config", lab.configFile]);
    const { nsupdate } = JSON.parse(r.stdout) as { nsupdate: string };
    await run("nsupdate", ["-k", loadConfig(lab.configFile).dns.tsig_key_file!], { input: nsupdate });
    assert.deepEqual(await dig("mail.mailha.test", "A"), [lab.a]);
  });

  test("dns check: ok when right, names the wrong record, advises SPF and PTR", async () => {
    const c = loadConfig(lab.configFile);
    await mailha(["dns", "apply", "--config", lab.configFile]);
    const good = await mailha(["dns", "check", "--resolver", lab.w, "--json", "--config", lab.configFile]);
    assert.equal(good.code, 0, good.stdout);
    const rows = JSON.parse(good.stdout) as { check: string; status: string; detail: string }[];
    assert.ok(rows.filter((r) => r.check.startsWith("authoritative")).every((r) => r.status === "ok"));
    assert.match(rows.find((r) => r.check === "SPF mailha.test")!.detail, /v=spf1 mx -all/);
    assert.equal(rows.find((r) => r.check === `PTR ${lab.a}`)!.status, "warn");
    await run("nsupdate", ["-k", c.dns.tsig_key_file!], { input: `server ${lab.w}\nzone mailha.test\nupdate delete mail.mailha.test. A ${lab.a}\nupdate add mailha.test. 300 TXT "v=spf1 mx -all"\nsend\n` });
    const bad = await mailha(["dns", "check", "--resolver", lab.w, "--config", lab.configFile]);
    assert.equal(bad.code, 1, "a missing record is a failure");
    assert.match(bad.stdout, /FAIL authoritative mail\.mailha\.test A: expected .* run mailha dns apply/);
    assert.match(bad.stdout, /OK   SPF mailha\.test: v=spf1 mx -all/);
  });

  test("the DNS lease: with two concurrent takers exactly one wins, every time", async () => {
    const c = loadConfig(lab.configFile);
    let wins = { a: 0, b: 0 };
    for (let round = 0; round < 25; round++) {
      // Each round starts from an expired lease, then both nodes race for it.
      const before = await readLease(c);
      if (before?.value) await new Promise((r) => setTimeout(r, Math.max(0, before.value!.expiresMs - Date.now() + 5)));
      const [x, y] = await Promise.all([takeLease(c, "a", 50), takeLease(c, "b", 50)]);
      assert.equal(Number(x.won) + Number(y.won), 1, `round ${round}: ${JSON.stringify([x, y])}`);
      const holder = (await readLease(c))!.value!.node;
      assert.equal(holder, x.won ? "a" : "b", "the record names the winner");
      wins = { a: wins.a + Number(x.won), b: wins.b + Number(y.won) };
    }
    const held = await takeLease(c, "a", 60_000);
    const other = await takeLease(c, "b", 60_000);
    assert.ok(!(held.won && other.won), "a lease that has not expired cannot be taken");
  });
});
