// The record model: MX per preference, an A per MX host, the mail host with every live
// node's address, and a zone file BIND accepts (named-checkzone, when installed).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadConfig } from "../../common/config.ts";
import { tryRun } from "../../common/exec.ts";
import { clusterRecords, renderZoneFile } from "../../dns/zone.ts";
import { ROOT } from "../helpers/cli.ts";

const c = loadConfig(join(ROOT, "examples", "lab.yaml"), { checkSecrets: false });

test("MX records carry the configured preferences and point at A records", () => {
  const rs = clusterRecords(c);
  assert.deepEqual(rs.filter((r) => r.type === "MX").map((r) => r.data), ["10 mx1.mailha.test", "20 mx2.mailha.test"]);
  assert.deepEqual(rs.filter((r) => r.name === "mx1.mailha.test").map((r) => r.data), ["10.77.0.1"]);
  assert.deepEqual(rs.filter((r) => r.name === "mail.mailha.test").map((r) => r.data), ["10.77.0.1", "10.77.0.2"]);
  assert.equal(rs.find((r) => r.name === "mail.mailha.test")!.ttl, 30, "the mail host has the short TTL");
});

test("a dead node's address leaves the mail host; MX records stay", () => {
  const rs = clusterRecords(c, ["b"]);
  assert.deepEqual(rs.filter((r) => r.name === "mail.mailha.test").map((r) => r.data), ["10.77.0.2"]);
  assert.equal(rs.filter((r) => r.type === "MX").length, 2);
});

test("the rendered zone passes named-checkzone", { skip: false }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "mailha-zone-"));
  try {
    const f = join(dir, "zone");
    writeFileSync(f, renderZoneFile(c, "10.77.0.3", 2026112201));
    const r = await tryRun("named-checkzone", ["mailha.test", f]);
    if (r === null && !(await tryRun("which", ["named-checkzone"]))) return t.skip("named-checkzone is not installed (mailha setup installs it)");
    assert.ok(r, "named-checkzone rejected the zone");
    assert.match(r.stdout, /OK/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
