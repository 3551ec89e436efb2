// `mailha init`: what it writes for two servers passes `mailha config check` (the real
// command, the real config loader), in every DNS mode and tie-breaker; bad answers are
// refused naming the flag, nothing written; an existing config is never overwritten
// without --force, and the secrets never are.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadConfig } from "../../common/config.ts";
import { checkAnswers, renderInitConfig, type InitAnswers } from "../../ops/init.ts";
import { mailha } from "../helpers/cli.ts";

const dir = mkdtempSync(join(tmpdir(), "mailha-init-"));
after(() => rmSync(dir, { recursive: true, force: true }));

const base: InitAnswers = {
  cluster: "shop",
  nodes: [
    { id: "a", address: "192.0.2.10", tunnel: "10.99.0.1" },
    { id: "b", address: "198.51.100.20", tunnel: "10.99.0.2" },
  ],
  domains: ["example.org"],
  dns: { updates: true, server: "192.0.2.53", zone: "example.org" },
  tieBreaker: { kind: "witness", address: "203.0.113.5" },
  secretsDir: "/etc/mailha/secrets",
  stateDir: "/var/lib/mailha",
  volumeSize: "20GiB",
};

test("the rendered config is what the answers say (tunnel links, witness, DNS updates)", () => {
  const text = renderInitConfig(base);
  assert.match(text, /replication_address: 10\.99\.0\.1/);
  assert.match(text, /\{ name: tunnel, address: 10\.99\.0\.2 \}/);
  assert.match(text, /witness: \{ address: 203\.0\.113\.5/);
  assert.match(text, /^  updates: true/m);
  const noTunnel = renderInitConfig({ ...base, nodes: [{ id: "a", address: "192.0.2.10" }, { id: "b", address: "198.51.100.20" }], dns: { updates: false, zone: "example.org" }, tieBreaker: { kind: "none" } });
  assert.match(noTunnel, /NOT encrypted/, "without a tunnel the config says what that means");
  assert.match(noTunnel, /replication_address: 192\.0\.2\.10/);
  assert.doesNotMatch(noTunnel, /tsig_key_file/);
});

test("bad answers name the flag to fix", () => {
  const p = checkAnswers({ ...base, cluster: "Shop!", nodes: [{ id: "a", address: "1.2.3" }, { id: "a", address: "198.51.100.20", tunnel: "10.99.0.2" }], dns: { updates: false, zone: "example.org" }, tieBreaker: { kind: "dns-lease" } });
  for (const flag of ["--cluster", "--node a: \"1.2.3\"", "different ids", "tunnel address for both", "--dns-lease"]) assert.ok(p.some((x) => x.includes(flag)), `${flag} in ${JSON.stringify(p)}`);
});

test("mailha init writes a config that mailha config check passes, with its secrets 0600; a second run refuses without --force and keeps the secrets", async () => {
  for (const [name, flags] of [
    ["updates-witness", ["--node", "a=192.0.2.10/10.99.0.1", "--node", "b=198.51.100.20/10.99.0.2", "--dns-server", "192.0.2.53", "--witness", "203.0.113.5"]],
    ["updates-lease", ["--node", "a=192.0.2.10", "--node", "b=198.51.100.20", "--dns-server", "192.0.2.53", "--dns-lease"]],
    ["manual-none", ["--node", "a=192.0.2.10", "--node", "b=198.51.100.20", "--dns-manual", "--no-tie-breaker", "--domain", "example.net"]],
  ] as const) {
    const file = join(dir, name, "mailha.yaml");
    const secrets = join(dir, name, "secrets");
    const args = ["init", "-o", file, "--cluster", "shop", "--domain", "example.org", ...flags, "--secrets-dir", secrets, "--json"];
    const r = await mailha(args);
    assert.equal(r.code, 0, `${name}: ${r.stderr}`);
    const check = await mailha(["config", "check", file]);
    assert.equal(check.code, 0, `${name}: config check: ${check.stdout}${check.stderr}`);
    assert.equal(check.stdout.trim(), "ok");
    const c = loadConfig(file);
    assert.deepEqual(c.nodes.map((n) => n.id), ["a", "b"]);
    for (const s of JSON.parse(r.stdout).secrets as { path: string }[]) assert.equal(statSync(s.path).mode & 0o777, 0o600, `${s.path} is 0600`);
    assert.equal(existsSync(join(secrets, "tsig.key")), c.dns.updates, "a TSIG key only when mailha sends updates");
    const hb = readFileSync(join(secrets, "heartbeat.key"), "utf8");
    const again = await mailha(args);
    assert.equal(again.code, 2, "an existing config is not overwritten");
    assert.match(again.stderr, /exists; nothing written/);
    assert.equal((await mailha([...args, "--force"])).code, 0);
    assert.equal(readFileSync(join(secrets, "heartbeat.key"), "utf8"), hb, "--force keeps the secrets");
  }
});

test("without a terminal, missing answers are named, nothing written", async () => {
  const file = join(dir, "missing", "mailha.yaml");
  const r = await mailha(["init", "-o", file, "--cluster", "shop"]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /needs --node \(twice\), --domain, --dns-server or --dns-manual/);
  assert.equal(existsSync(file), false);
});
