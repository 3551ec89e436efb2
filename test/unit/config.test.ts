// The cluster config: a good file loads; each kind of bad file is refused with the key
// path, what was expected and what was found; secret files must be 0600 and ours.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, chownSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseDocument } from "yaml";
import { loadConfig, parseConfig } from "../../common/config.ts";
import { ConfigError } from "../../common/errors.ts";
import { ROOT, mailha } from "../helpers/cli.ts";

const LAB = readFileSync(join(ROOT, "examples", "lab.yaml"), "utf8");
let dir: string;

/** lab.yaml with its secrets pointed at DIR and one edit applied to the parsed document. */
function variant(edit: (doc: ReturnType<typeof parseDocument>) => void = () => {}): string {
  const doc = parseDocument(LAB);
  doc.setIn(["heartbeat", "key_file"], join(dir, "hb.key"));
  doc.setIn(["volume", "secret_file"], join(dir, "repl.secret"));
  doc.setIn(["dns", "tsig_key_file"], join(dir, "tsig.key"));
  edit(doc);
  return doc.toString();
}

function problemsOf(text: string): { path: string; expected: string; found: string }[] {
  try {
    parseConfig(text, "test.yaml");
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${err}`);
    return [...err.problems];
  }
  assert.fail("the config was accepted");
}

before(() => {
  dir = mkdtempSync(join(tmpdir(), "mailha-config-"));
  for (const f of ["hb.key", "repl.secret", "tsig.key"]) writeFileSync(join(dir, f), 'key "k" { algorithm hmac-sha256; secret "AAAA"; };\n', { mode: 0o600 });
});
after(() => rmSync(dir, { recursive: true, force: true }));

describe("cluster config", () => {
  test("the shipped examples are valid", () => {
    const lab = parseConfig(variant(), "lab.yaml");
    assert.equal(lab.nodes.length, 2);
    assert.equal(lab.volume.size, 256 * 1024 * 1024);
    assert.equal(lab.volume.protocol, "C");
    const hosters = loadConfig(join(ROOT, "examples", "two-hosters.yaml"), { checkSecrets: false });
    assert.equal(hosters.fencing.agent, "command");
    assert.equal(hosters.volume.size, 20 * 1024 ** 3);
  });

  test("defaults fill what a file leaves out", () => {
    const c = parseConfig(variant((d) => { d.deleteIn(["timers"]); d.deleteIn(["volume", "protocol"]); d.deleteIn(["volume", "split_brain_policy"]); }), "t.yaml");
    assert.equal(c.timers.deadtime_ms, 2000);
    assert.equal(c.volume.protocol, "C");
    assert.equal(c.volume.split_brain_policy, "preserve");
    assert.equal(c.volume.allocation, "full");
  });

  test("volume.allocation: full or sparse, anything else named with the choices", () => {
    assert.equal(parseConfig(variant((d) => d.setIn(["volume", "allocation"], "sparse")), "t.yaml").volume.allocation, "sparse");
    const p = problemsOf(variant((d) => d.setIn(["volume", "allocation"], "thin")));
    assert.equal(p[0]!.path, "volume.allocation");
    assert.match(p[0]!.expected, /"full", "sparse"/);
  });

  test("operator faults for the failover test: names and commands are checked", () => {
    const ok = parseConfig(variant((d) => d.setIn(["failover_test", "faults", "pull-cable"], { inject: "echo in", recover: "echo out" })), "t.yaml");
    assert.equal(ok.failover_test.faults["pull-cable"]?.timeout_ms, 60_000);
    assert.deepEqual(parseConfig(variant(), "t.yaml").failover_test.faults, {});
    const badName = problemsOf(variant((d) => d.setIn(["failover_test", "faults", "Pull Cable"], { inject: "x" })));
    assert.equal(badName[0]?.path, "failover_test.faults.Pull Cable");
    assert.match(badName[0]!.expected, /fault name/);
    const noInject = problemsOf(variant((d) => d.setIn(["failover_test", "faults", "pull"], { recover: "x" })));
    assert.equal(noInject[0]?.path, "failover_test.faults.pull.inject");
    assert.match(noInject[0]!.expected, /shell command that injects/);
  });

  test("mail.message_recipients_max: 1000 by default, a positive integer up to 100,000", () => {
    assert.equal(parseConfig(variant(), "t.yaml").mail.message_recipients_max, 1000);
    assert.equal(parseConfig(variant((d) => d.setIn(["mail", "message_recipients_max"], 50)), "t.yaml").mail.message_recipients_max, 50);
    for (const bad of [0, 1.5, 200_000, "many"]) {
      const p = problemsOf(variant((d) => d.setIn(["mail", "message_recipients_max"], bad)));
      assert.equal(p[0]?.path, "mail.message_recipients_max", `${bad} is refused`);
      assert.match(p[0]!.expected, /a number of recipients \(an integer from 1 to 100000\)/);
    }
  });

  test("a missing key is named", () => {
    const p = problemsOf(variant((d) => d.deleteIn(["dns", "zone"])));
    assert.deepEqual(p.map((x) => x.path), ["dns.zone"]);
    assert.match(p[0]!.found, /missing/);
    assert.match(p[0]!.expected, /DNS name/);
  });

  test("DNS managed by hand (dns.updates: false) needs no server and no key; with updates both are named when missing; the DNS lease needs updates", () => {
    const manual = parseConfig(variant((d) => { d.setIn(["dns", "updates"], false); d.deleteIn(["dns", "server"]); d.deleteIn(["dns", "tsig_key_file"]); d.deleteIn(["quorum", "witness"]); }), "test.yaml");
    assert.equal(manual.dns.updates, false);
    assert.equal(manual.dns.server, undefined);
    const p = problemsOf(variant((d) => { d.deleteIn(["dns", "server"]); d.deleteIn(["dns", "tsig_key_file"]); }));
    assert.deepEqual(p.map((x) => x.path), ["dns.server", "dns.tsig_key_file"]);
    assert.match(p[0]!.expected, /dns\.updates: false/);
    const lease = problemsOf(variant((d) => { d.setIn(["dns", "updates"], false); d.deleteIn(["quorum", "witness"]); d.setIn(["quorum", "dns_lease"], { lease_ms: 60000 }); }));
    assert.deepEqual(lease.map((x) => x.path), ["quorum.dns_lease"]);
  });

  test("a wrong type names the expectation and the value found", () => {
    const p = problemsOf(variant((d) => d.setIn(["timers", "deadtime_ms"], "two seconds")));
    assert.equal(p[0]!.path, "timers.deadtime_ms");
    assert.match(p[0]!.expected, /milliseconds/);
    assert.equal(p[0]!.found, '"two seconds"');
  });

  test("a bad address inside a list gives its index", () => {
    const p = problemsOf(variant((d) => d.setIn(["nodes", 1, "replication_address"], "10.78.0")));
    assert.equal(p[0]!.path, "nodes[1].replication_address");
    assert.match(p[0]!.expected, /IPv4/);
  });

  test("an enum lists the allowed values", () => {
    const p = problemsOf(variant((d) => d.setIn(["volume", "split_brain_policy"], "keep-both")));
    assert.equal(p[0]!.path, "volume.split_brain_policy");
    assert.match(p[0]!.expected, /"preserve"/);
    assert.match(p[0]!.expected, /"disconnect"/);
  });

  test("a misspelt key is reported with the known keys", () => {
    const p = problemsOf(variant((d) => d.setIn(["timers", "deadtime"], 500)));
    assert.equal(p[0]!.path, "timers.deadtime");
    assert.match(p[0]!.expected, /deadtime_ms/);
  });

  test("every problem is reported at once", () => {
    const p = problemsOf(variant((d) => { d.setIn(["volume", "protocol"], "B"); d.setIn(["heartbeat", "port"], 70000); d.deleteIn(["mail", "host"]); }));
    assert.deepEqual(p.map((x) => x.path).sort(), ["heartbeat.port", "mail.host", "volume.protocol"]);
  });

  test("rules between keys: timers in order, preferred node exists, sizes", () => {
    assert.equal(problemsOf(variant((d) => d.setIn(["timers", "deadtime_ms"], 200)))[0]!.path, "timers.deadtime_ms");
    assert.equal(problemsOf(variant((d) => d.setIn(["cluster", "preferred_node"], "c")))[0]!.path, "cluster.preferred_node");
    assert.equal(problemsOf(variant((d) => d.setIn(["mail", "mx", 1, "node"], "z")))[0]!.path, "mail.mx[1].node");
    assert.equal(problemsOf(variant((d) => d.setIn(["volume", "size"], "1MiB")))[0]!.path, "volume.size");
    assert.equal(problemsOf(variant((d) => d.setIn(["nodes", 1, "id"], "a")))[0]!.path, "nodes[1].id");
    assert.equal(problemsOf(variant((d) => d.setIn(["fencing", "agent"], "command")))[0]!.path, "fencing.command");
  });

  test("YAML syntax errors give a line", () => {
    const p = problemsOf("cluster:\n  name: [unclosed\n");
    assert.match(p[0]!.path, /line/);
    assert.equal(p[0]!.expected, "valid YAML");
  });

  test("a missing secret file is named with the way to make it", () => {
    const p = problemsOf(variant((d) => d.setIn(["volume", "secret_file"], join(dir, "absent.secret"))));
    assert.equal(p[0]!.path, "volume.secret_file");
    assert.match(p[0]!.expected, /mailha secret generate/);
  });

  test("a secret file readable by others is refused", () => {
    chmodSync(join(dir, "hb.key"), 0o644);
    try {
      const p = problemsOf(variant());
      assert.equal(p[0]!.path, "heartbeat.key_file");
      assert.match(p[0]!.expected, /0600/);
      assert.equal(p[0]!.found, "mode 0644");
    } finally {
      chmodSync(join(dir, "hb.key"), 0o600);
    }
  });

  test("a secret file owned by another user is refused", { skip: process.getuid?.() !== 0 ? "needs root to chown" : false }, () => {
    chownSync(join(dir, "tsig.key"), 65534, 65534);
    try {
      const p = problemsOf(variant());
      assert.equal(p[0]!.path, "dns.tsig_key_file");
      assert.match(p[0]!.expected, /owned by the user running mailha/);
      assert.equal(p[0]!.found, "owner uid 65534");
    } finally {
      chownSync(join(dir, "tsig.key"), 0, 0);
    }
  });

  test("mailha config check: ok / problems with exit 2 / --json", async () => {
    const good = join(dir, "good.yaml");
    writeFileSync(good, variant());
    const ok = await mailha(["config", "check", good]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(ok.stdout.trim(), "ok");

    const bad = join(dir, "bad.yaml");
    writeFileSync(bad, variant((d) => d.setIn(["volume", "protocol"], "B")));
    const r = await mailha(["config", "check", bad]);
    assert.equal(r.code, 2);
    assert.match(r.stdout, /volume\.protocol: expected one of "C", "A", found "B"/);

    const j = await mailha(["config", "check", bad, "--json"]);
    assert.equal(j.code, 2);
    const body = JSON.parse(j.stdout) as { ok: boolean; problems: { path: string }[] };
    assert.equal(body.ok, false);
    assert.deepEqual(body.problems.map((x) => x.path), ["volume.protocol"]);

    const missing = await mailha(["config", "check", join(dir, "nope.yaml")]);
    assert.equal(missing.code, 2);
    assert.match(missing.stdout, /readable YAML file/);
  });

  test("mailha: unknown subcommands and options exit 2; --help exits 0", async () => {
    assert.equal((await mailha(["frobnicate"])).code, 2);
    assert.equal((await mailha(["config", "check", "--bogus"])).code, 2);
    const h = await mailha(["--help"]);
    assert.equal(h.code, 0);
    assert.match(h.stdout, /Exit codes/);
    for (const sub of [["lab", "up"], ["lab", "down"], ["lab", "status"], ["config", "check"], ["secret", "generate"], ["setup"]]) {
      const r = await mailha([...sub, "--help"]);
      assert.equal(r.code, 0, sub.join(" "));
      assert.match(r.stdout, /Usage: mailha/);
    }
  });

  test("mailha secret generate makes 0600 files and never overwrites", async () => {
    const d2 = mkdtempSync(join(dir, "gen-"));
    const f = join(d2, "c.yaml");
    writeFileSync(f, variant((d) => { d.setIn(["heartbeat", "key_file"], "s/hb.key"); d.setIn(["volume", "secret_file"], "s/r.secret"); d.setIn(["dns", "tsig_key_file"], "s/tsig.key"); }));
    const r = await mailha(["secret", "generate", "--config", f, "--json"]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual((JSON.parse(r.stdout) as { created: boolean }[]).map((x) => x.created), [true, true, true]);
    const before = readFileSync(join(d2, "s", "tsig.key"), "utf8");
    assert.match(before, /algorithm hmac-sha256/);
    const again = await mailha(["secret", "generate", "--config", f, "--json"]);
    assert.deepEqual((JSON.parse(again.stdout) as { created: boolean }[]).map((x) => x.created), [false, false, false]);
    assert.equal(readFileSync(join(d2, "s", "tsig.key"), "utf8"), before);
    assert.equal((await mailha(["config", "check", f])).code, 0);
  });
});
