// A lab of the tests' own (name "t", its own addresses and directory), so a test run
// never touches a lab the operator has up. Written from examples/lab.yaml.
import { after, before } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { parseDocument } from "yaml";
import { mailha, ROOT } from "./cli.ts";

export interface TestLab {
  readonly configFile: string;
  readonly dir: string;
  readonly name: string;
  readonly a: string;
  readonly b: string;
  readonly w: string;
}

export function writeTestLabConfig(name = "t", net = 79): TestLab {
  const base = mkdtempSync(join(tmpdir(), `mailha-lab-${name}-`));
  chmodSync(base, 0o755); // Dovecot and the mail uid must traverse it
  const dir = join(base, "lab");
  const svc = (i: number) => `10.${net}.0.${i}`;
  const rep = (i: number) => `10.${net + 1}.0.${i}`;
  const doc = parseDocument(readFileSync(join(ROOT, "examples", "lab.yaml"), "utf8"));
  doc.setIn(["cluster", "name"], `test-${name}`);
  doc.setIn(["lab", "name"], name);
  doc.setIn(["lab", "dir"], dir);
  doc.setIn(["paths", "state_dir"], dir);
  doc.setIn(["lab", "witness_address"], svc(3));
  doc.setIn(["lab", "operator_address"], svc(254));
  for (const [i, id] of ["a", "b"].entries()) {
    doc.setIn(["nodes", i, "id"], id);
    doc.setIn(["nodes", i, "service_address"], svc(i + 1));
    doc.setIn(["nodes", i, "replication_address"], rep(i + 1));
    doc.setIn(["nodes", i, "heartbeat_links", 0, "address"], svc(i + 1));
    doc.setIn(["nodes", i, "heartbeat_links", 1, "address"], rep(i + 1));
  }
  doc.setIn(["quorum", "ping_targets"], [svc(3)]);
  doc.setIn(["quorum", "witness", "address"], svc(3));
  doc.setIn(["dns", "server"], svc(3));
  doc.setIn(["mail", "outbound", "resolvers"], [svc(3)]);
  for (const [k, f] of [["heartbeat", "key_file"], ["volume", "secret_file"], ["dns", "tsig_key_file"]] as const) {
    doc.setIn([k, f], join(dir, "secrets", String(doc.getIn([k, f])).split("/").pop()!));
  }
  const configFile = join(base, "lab.yaml");
  writeFileSync(configFile, doc.toString());
  return { configFile, dir, name, a: svc(1), b: svc(2), w: svc(3) };
}

/**
 * Hooks for a describe() block that runs on LAB: `lab up` before its tests (a failure
 * fails them with lab up's stderr), `lab down` and removal of the config's folder after.
 */
export function labUpForTests(lab: TestLab): void {
  before(async () => {
    const r = await mailha(["lab", "up", "--config", lab.configFile]);
    assert.equal(r.code, 0, `lab up failed:\n${r.stderr}`);
  });
  after(async () => {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });
}
