// State files the daemons read back at start, damaged as a power loss or a bad disk
// leaves them (empty, cut short, not JSON, the wrong shape): a durable write never
// leaves half a file or a temp file; the volume's metadata and bitmap stop the engine
// with a message naming the file and what to do (also through `mailha volume run`, not
// a stack trace); the activity log is rebuilt; the engine's and the node daemon's
// records are rebuilt or dropped, with a warning.
import { test, describe, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { parseDocument } from "yaml";
import pino from "pino";
import { DamagedStateFileError, readJsonState, writeFileDurable } from "../../common/fsutil.ts";
import { daemonRecordProblem, findRunningDaemon } from "../../common/daemon.ts";
import { loadConfig } from "../../common/config.ts";
import { createVolume, FileStore, loadMetaFile, volumeFiles } from "../../replication/store.ts";
import { loadActivityLog } from "../../replication/engine.ts";
import { readEngineRecord, volumeContext } from "../../replication/client.ts";
import { mailha } from "../helpers/cli.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";

const base = mkdtempSync(join(tmpdir(), "mailha-state-"));
after(() => rmSync(base, { recursive: true, force: true }));
const MiB = 1024 * 1024;
const quiet = pino({ level: "silent" });

/** The ways a file comes back damaged. */
const DAMAGES: readonly { name: string; apply: (file: string) => void; problem: RegExp }[] = [
  { name: "empty", apply: (f) => writeFileSync(f, ""), problem: /\(empty\)/ },
  { name: "cut short", apply: (f) => truncateSync(f, Math.floor(readFileSync(f).length / 2)), problem: /not valid JSON/ },
  { name: "garbage", apply: (f) => writeFileSync(f, Buffer.from([0, 0xff, 0x13, 0x37, 0])), problem: /not valid JSON/ },
  { name: "the wrong shape", apply: (f) => writeFileSync(f, JSON.stringify({ version: 1, hello: "world" })), problem: /not the expected content/ },
];

/** Runs FN with stderr captured; returns what it wrote. */
function stderrOf(fn: () => void): string {
  const orig = process.stderr.write.bind(process.stderr);
  let out = "";
  process.stderr.write = ((chunk: string | Uint8Array) => ((out += String(chunk)), true)) as typeof process.stderr.write;
  try {
    fn();
  } finally {
    process.stderr.write = orig;
  }
  return out;
}

function newVolume(name: string, primary = true): string {
  const dir = join(base, name);
  createVolume(dir, { nodeId: "a", sizeBytes: 16 * MiB, primary, newId: () => "0123456789abcdef", allocation: "sparse" });
  return dir;
}

describe("durable writes and checked reads", () => {
  test("writeFileDurable replaces the file whole and leaves no temp file; a failed write leaves the old one", () => {
    const dir = join(base, "durable");
    mkdirSync(dir);
    const f = join(dir, "state.json");
    writeFileDurable(f, "old");
    writeFileDurable(f, JSON.stringify({ a: 1 }));
    assert.equal(readFileSync(f, "utf8"), '{"a":1}');
    assert.deepEqual(readdirSync(dir), ["state.json"]);
    // A directory in the way: the rename fails; the temp file goes, nothing else changes.
    mkdirSync(join(dir, "busy"));
    writeFileSync(join(dir, "busy", "x"), "");
    assert.throws(() => writeFileDurable(join(dir, "busy"), "new"));
    assert.deepEqual(readdirSync(dir).sort(), ["busy", "state.json"]);
  });

  test("readJsonState: absent is null; every damage names the file, the problem and the remedy", () => {
    const f = join(base, "record.json");
    assert.equal(readJsonState(f, daemonRecordProblem, "remove it"), null);
    for (const d of DAMAGES) {
      writeFileSync(f, JSON.stringify({ name: "x", pid: 1, startTicks: "1", argv: [], logFile: "/l", stopTimeoutMs: 1 }));
      d.apply(f);
      assert.throws(
        () => readJsonState(f, daemonRecordProblem, "remove it"),
        (err: Error) => err instanceof DamagedStateFileError && err.message.startsWith(`${f} is damaged`) && d.problem.test(err.message) && err.message.endsWith("remove it"),
        d.name,
      );
    }
  });
});

describe("the volume's files", () => {
  for (const d of DAMAGES) {
    test(`metadata ${d.name}: the store refuses it, naming the file and what to do`, () => {
      const dir = newVolume(`meta-${d.name.replace(/ /g, "-")}`);
      d.apply(volumeFiles(dir).meta);
      const expect = (err: Error) =>
        err instanceof DamagedStateFileError && err.file === volumeFiles(dir).meta && d.problem.test(err.message) && /mailha volume create/.test(err.message) && err.message.includes(dir);
      assert.throws(() => new FileStore(dir), expect);
      assert.throws(() => loadMetaFile(volumeFiles(dir).meta), expect);
    });
  }

  test("metadata with a bad field: the field is named", () => {
    const dir = newVolume("meta-field");
    const f = volumeFiles(dir).meta;
    writeFileSync(f, JSON.stringify({ ...JSON.parse(readFileSync(f, "utf8")), disk: "shiny" }));
    assert.throws(() => new FileStore(dir), /disk "shiny" is not a disk state/);
  });

  test("a bitmap of the wrong length: refused, naming the file", () => {
    const dir = newVolume("bitmap");
    truncateSync(volumeFiles(dir).bitmap, 100);
    assert.throws(() => new FileStore(dir), (err: Error) => err instanceof DamagedStateFileError && err.file === volumeFiles(dir).bitmap && /100 bytes long, not 512/.test(err.message));
  });

  test("a torn activity log after a clean stop: rewritten empty, the bitmap untouched", () => {
    const dir = newVolume("al-clean");
    writeFileSync(volumeFiles(dir).al, Buffer.alloc(4096, 0x41));
    const store = new FileStore(dir);
    try {
      const meta = store.loadMeta();
      const bitmap = store.loadBitmap();
      const r = loadActivityLog(store, meta, bitmap, quiet);
      assert.deepEqual(r, { extents: [], damaged: "no activity-log record in it (wrong magic)", allOutOfSync: false });
      assert.equal(bitmap.count, 0);
      assert.deepEqual(store.loadAL(), []);
    } finally {
      store.close();
    }
  });

  test("a torn activity log after a crash as primary: every block marked out of sync, durably", () => {
    const dir = newVolume("al-crash");
    const f = volumeFiles(dir);
    writeFileSync(f.meta, JSON.stringify({ ...JSON.parse(readFileSync(f.meta, "utf8")), role: "primary", cleanShutdown: false }));
    truncateSync(f.al, 10);
    let store = new FileStore(dir);
    try {
      const bitmap = store.loadBitmap();
      const r = loadActivityLog(store, store.loadMeta(), bitmap, quiet);
      assert.equal(r.allOutOfSync, true);
      assert.match(r.damaged!, /10 bytes, not 4096/);
      assert.equal(bitmap.count, bitmap.blocks);
    } finally {
      store.close();
    }
    store = new FileStore(dir);
    try {
      assert.equal(store.loadBitmap().count, (16 * MiB) / 4096, "the all-out-of-sync bitmap was not saved");
      assert.deepEqual(store.loadAL(), []);
    } finally {
      store.close();
    }
  });
});

describe("records of running daemons", () => {
  const lab = writeTestLabConfig("st", 250);
  after(() => rmSync(dirname(lab.configFile), { recursive: true, force: true }));

  test("a damaged engine record is removed when no engine runs (warning), and a live engine is found by its arguments", async () => {
    assert.equal((await mailha(["secret", "generate", "--config", lab.configFile])).code, 0);
    const v = volumeContext(loadConfig(lab.configFile), "a");
    mkdirSync(dirname(v.engineRecord), { recursive: true });
    writeFileSync(v.engineRecord, '{"name":"volume@a","pid":12');
    let rec: unknown = "not called";
    const warned = stderrOf(() => (rec = readEngineRecord(v)));
    assert.equal(rec, null);
    assert.equal(existsSync(v.engineRecord), false);
    assert.match(warned, /volume-engine\.json was damaged \(not valid JSON.*removed: no engine of this node runs/);

    // The rebuild: a process with the daemon's arguments is found (PID and start time).
    const args = ["-c", "sleep 30; :", `mailha-state-test-${process.pid}`];
    const child = spawn("/bin/sh", args, { stdio: "ignore" });
    try {
      for (let i = 0; i < 50 && !findRunningDaemon({ name: "x", args, logFile: "/l", stopTimeoutMs: 1 }); i++) await new Promise((r) => setTimeout(r, 20));
      const found = findRunningDaemon({ name: "x", args, logFile: "/l", stopTimeoutMs: 1 });
      assert.equal(found?.pid, child.pid);
      assert.equal(daemonRecordProblem(found), null);
    } finally {
      child.kill("SIGKILL");
    }
  });

  test("mailha node stop with a damaged record: says the daemon is absent, with a warning", async () => {
    const rec = join(lab.dir, "a", "run", "node-daemon.json");
    mkdirSync(dirname(rec), { recursive: true });
    writeFileSync(rec, "\0\0\0\0");
    const r = await mailha(["node", "stop", "--node", "a", "--config", lab.configFile]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /node daemon of a: absent/);
    assert.match(r.stderr, /node-daemon\.json was damaged \(not valid JSON.*no node daemon of this node runs/);
  });

  test("an empty or cut-short secret file (a crash while it was written) is a configuration problem naming it", async () => {
    const c = loadConfig(lab.configFile);
    const key = readFileSync(c.heartbeat.key_file);
    try {
      for (const body of ["", "0123abc\n"]) {
        writeFileSync(c.heartbeat.key_file, body);
        const r = await mailha(["config", "check", lab.configFile]);
        assert.equal(r.code, 2, `config check passed a heartbeat key of ${body.length} bytes`);
        assert.match(r.stdout, new RegExp(`heartbeat\\.key_file: expected a heartbeat key of at least 16 characters in ${c.heartbeat.key_file.replace(/[.]/g, "\\.")}`));
      }
    } finally {
      writeFileSync(c.heartbeat.key_file, key);
    }
  });

  test("mailha volume run on a damaged metadata file: exits with the file named and what to do, no stack trace", async () => {
    const doc = parseDocument(readFileSync(lab.configFile, "utf8"));
    doc.setIn(["volume", "allocation"], "sparse");
    doc.setIn(["volume", "size"], "16MiB");
    writeFileSync(lab.configFile, doc.toString());
    const created = await mailha(["volume", "create", "--primary", "--node", "a", "--config", lab.configFile]);
    assert.equal(created.code, 0, created.stderr);
    const meta = join(lab.dir, "a", "volume", "meta.json");
    truncateSync(meta, 37);
    const r = await mailha(["volume", "run", "--node", "a", "--config", lab.configFile], 30_000);
    assert.equal(r.code, 1, `volume run on a damaged meta.json exited ${r.code}: ${r.stderr}`);
    assert.match(r.stderr, new RegExp(`^mailha: ${meta.replace(/[.]/g, "\\.")} is damaged \\(not valid JSON`));
    assert.match(r.stderr, /mailha volume create/);
    assert.doesNotMatch(r.stderr, /^\s+at /m, "a stack trace instead of a message");
  });
});
