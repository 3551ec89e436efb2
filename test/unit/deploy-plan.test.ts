// What `mailha deploy` plans from a server's facts: a fresh server gets every step, a
// server that is right gets none (a second deploy changes nothing), preflight errors
// name what is wrong (Debian, Node, clock, ports, disk), a running node is never
// restarted by deploy (it says an upgrade restarts it), and the facts script's output
// parses.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { factsScript, parseFacts, type FactsQuery, type HostFacts } from "../../ops/deploy/facts.ts";
import { clusterHealthy } from "../../ops/deploy/run.ts";
import { nodeVersionOk, planHost, type Desired } from "../../ops/deploy/plan.ts";

const GIB = 1024 ** 3;
const desired: Desired = {
  role: "node",
  name: "a",
  pkgVersion: "0.1.0-1",
  files: [
    { path: "/etc/mailha/mailha.yaml", sha256: "a".repeat(64), mode: 0o644 },
    { path: "/etc/mailha/secrets/heartbeat.key", sha256: "b".repeat(64), mode: 0o600 },
  ],
  unit: "mailha-node.service",
  ports: [25, 143, 694],
  volume: { sizeBytes: 4 * GIB, preferred: true, peerHasVolume: false },
};
const fresh: HostFacts = { debian: "12.8", node: "v20.19.1", pkg: null, freeBytes: 100 * GIB, listening: new Set([22]), clockMs: 1_000_000, drbdModule: false, files: new Map(), units: new Map(), volumeCreated: false };
const right: HostFacts = { ...fresh, pkg: "0.1.0-1", files: new Map(desired.files.map((f) => [f.path, f.sha256])), units: new Map([["mailha-node.service", { enabled: "enabled", active: "active" }]]), volumeCreated: true, listening: new Set([22, 25, 143, 694]) };
const at = (facts: HostFacts) => ({ facts, localMidMs: 1_000_000, rttMs: 20 });

test("a fresh server: package, every file, the volume (primary on the preferred node), enable, start", () => {
  const p = planHost(desired, at(fresh));
  assert.deepEqual(p.actions.map((a) => a.kind), ["install-package", "write-file", "write-file", "create-volume", "enable-unit", "start-unit"]);
  assert.deepEqual(p.actions.find((a) => a.kind === "create-volume"), { kind: "create-volume", primary: true });
  assert.deepEqual(p.problems.map((x) => x.severity), ["note"], "only the DRBD note");
  assert.equal(p.restartNeeded, false);
  const other = planHost({ ...desired, volume: { ...desired.volume!, preferred: true, peerHasVolume: true } }, at(fresh));
  assert.deepEqual(other.actions.find((a) => a.kind === "create-volume"), { kind: "create-volume", primary: false }, "a replaced server next to a peer with data is synced from it");
});

test("a server that is right: nothing to do, and its ports in use by mailha itself are fine", () => {
  const p = planHost(desired, at(right));
  assert.deepEqual(p.actions, []);
  assert.ok(!p.problems.some((x) => x.severity === "error"));
});

test("preflight errors name what is wrong", () => {
  const bad = planHost(desired, { facts: { ...fresh, debian: "11.9", node: "v18.19.0", freeBytes: 3 * GIB, listening: new Set([25, 694]), clockMs: 1_000_000 + 5000 }, localMidMs: 1_000_000, rttMs: 20 });
  const errors = bad.problems.filter((x) => x.severity === "error").map((x) => x.message);
  for (const want of [/Debian 11\.9/, /Node v18\.19\.0/, /clock is 5000 ms off/, /ports 25, 694 already in use/, /free where the volume goes/]) assert.ok(errors.some((e) => want.test(e)), `${want} in ${JSON.stringify(errors)}`);
  assert.match(planHost(desired, at({ ...fresh, debian: null })).problems[0]!.message, /not a Debian system/);
  assert.ok(planHost(desired, at({ ...fresh, freeBytes: 6 * GIB })).problems.some((x) => x.severity === "warning" && /preserved copy/.test(x.message)), "room for a preserved copy is a warning");
  assert.ok(!planHost(desired, { facts: { ...fresh, clockMs: 1_000_000 + 400 }, localMidMs: 1_000_000, rttMs: 600 }).problems.some((x) => x.severity !== "note"), "the round trip bounds what can be told about the clock");
});

test("a running node is not restarted by deploy: new package or config planned, restart left to deploy upgrade", () => {
  const p = planHost({ ...desired, pkgVersion: "0.2.0-1" }, at(right));
  assert.deepEqual(p.actions.map((a) => a.kind), ["install-package"]);
  assert.equal(p.restartNeeded, true);
  assert.ok(p.problems.some((x) => /deploy upgrade/.test(x.message)));
});

test("Node versions: 20.10 and later", () => {
  assert.deepEqual(["v20.10.0", "v20.9.0", "v22.1.0", "v18.20.4", null, "garbage"].map(nodeVersionOk), [true, false, true, false, false, false]);
});

test("the facts script's output parses; missing values are null", () => {
  const q: FactsQuery = { stateDir: "/var/lib/mailha", volumeMeta: "/var/lib/mailha/volume/meta.json", files: ["/etc/mailha/mailha.yaml", "/etc/mailha/secrets/heartbeat.key"], units: ["mailha-node.service"] };
  const f = parseFacts(["debian=12.8", "node=v20.19.1", "pkg=", "free=123456789", "listening=22,25,", "drbd=no", "volume=yes", `file:/etc/mailha/mailha.yaml=${"c".repeat(64)}`, "file:/etc/mailha/secrets/heartbeat.key=", "unit:mailha-node.service=enabled inactive", "clock=1796180000123", "junk line"].join("\n"), q);
  assert.equal(f.debian, "12.8");
  assert.equal(f.pkg, null);
  assert.equal(f.freeBytes, 123456789);
  assert.deepEqual([...f.listening], [22, 25]);
  assert.equal(f.volumeCreated, true);
  assert.equal(f.files.get("/etc/mailha/mailha.yaml"), "c".repeat(64));
  assert.equal(f.files.get("/etc/mailha/secrets/heartbeat.key"), null);
  assert.deepEqual(f.units.get("mailha-node.service"), { enabled: "enabled", active: "inactive" });
  assert.equal(f.clockMs, 1796180000123);
});

test("healthy: one active, one passive, both in sync", () => {
  const h = (node: string, state: string, inSync = true) => ({ node, state, inSync, quorum: true, volume: "connected", outOfSyncBytes: 0 });
  assert.equal(clusterHealthy([h("a", "active"), h("b", "passive")]), true);
  assert.equal(clusterHealthy([h("a", "active"), h("b", "passive", false)]), false);
  assert.equal(clusterHealthy([h("a", "active"), h("b", "active")]), false);
  assert.equal(clusterHealthy([h("a", "active"), null]), false);
});

test("the facts script runs in bash on this machine and reads it (Debian, Node, the clock, the ports)", () => {
  const q: FactsQuery = { stateDir: "/var/lib/mailha-no-such/state", volumeMeta: "/nonexistent/meta.json", files: ["/etc/hostname", "/nonexistent/file"], units: ["mailha-no-such.service"] };
  const r = spawnSync("bash", ["-c", factsScript(q)], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  const f = parseFacts(r.stdout, q);
  assert.match(f.debian ?? "", /^\d+/);
  assert.equal(f.node, process.version);
  assert.ok(f.freeBytes! > 0, "free space of the nearest existing parent");
  assert.ok(Math.abs(f.clockMs! - Date.now()) < 5000);
  assert.match(f.files.get("/etc/hostname") ?? "", /^[0-9a-f]{64}$/);
  assert.equal(f.files.get("/nonexistent/file"), null);
  assert.equal(f.volumeCreated, false);
  assert.notEqual(f.units.get("mailha-no-such.service")?.active, "active");
});
