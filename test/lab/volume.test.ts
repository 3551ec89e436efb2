// The replicated volume with real engines, real FUSE, loop devices and ext4, on the
// lab's two node namespaces. What a user relies on: fsynced files survive the loss of
// the primary; a pulled replication link costs a resync of what changed, not of the
// disk; a split brain is detected and handled as the policy says, keeping a copy; a
// corrupted block is found by verify; a wrong secret is refused.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import { parseDocument } from "yaml";
import { run, sleep, tryRun } from "../../common/exec.ts";
import { mailha } from "../helpers/cli.ts";
import { writeTestLabConfig, type TestLab } from "../helpers/lab.ts";

const lab: TestLab = writeTestLabConfig("v", 81);
const data = (node: string) => join(lab.dir, node, "data");
const image = (node: string) => join(lab.dir, node, "volume", "image");
const events = (node: string) => join(lab.dir, node, "log", "volume-events.jsonl");

interface Status {
  role: string;
  connection: string;
  disk: string;
  outOfSyncBytes: number;
  unackedBytes: number;
  peer: { role: string; disk: string };
  link: { up: boolean; authFailures: number };
  preserved: { path: string }[];
  export: { mounted: boolean };
  stats: { resyncedBytes: number };
  sizeBytes: number;
  image: { allocatedBytes: number };
}

async function vol(node: string, args: string[], config = lab.configFile): Promise<unknown> {
  const r = await mailha(["volume", ...args, "--config", config, "--node", node, "--json"]);
  if (r.code !== 0) throw new Error(`mailha volume ${args.join(" ")} --node ${node} failed (${r.code}): ${r.stderr.trim()} ${r.stdout.trim()}`);
  return JSON.parse(r.stdout);
}
const status = async (node: string) => (await vol(node, ["status"])) as Status;

async function waitUntil(node: string, what: string, pred: (s: Status) => boolean, timeoutMs = 30_000): Promise<Status> {
  const deadline = Date.now() + timeoutMs;
  let last: Status | null = null;
  while (Date.now() < deadline) {
    try {
      last = await status(node);
      if (pred(last)) return last;
    } catch {
      // engine restarting
    }
    await sleep(200);
  }
  throw new Error(`node ${node}: ${what} did not happen within ${timeoutMs} ms; last status ${JSON.stringify(last)}`);
}

function writeFsynced(path: string, bytes: Buffer): void {
  const fd = openSync(path, "w");
  try {
    writeSync(fd, bytes);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  const d = openSync(dirname(path), "r");
  try {
    fsyncSync(d);
  } finally {
    closeSync(d);
  }
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

async function imagesIdentical(): Promise<boolean> {
  await run("sync", []);
  await waitUntil("a", "writes acknowledged", (s) => s.unackedBytes === 0 && s.connection === "connected");
  await waitUntil("b", "in sync", (s) => s.connection === "connected" && s.disk === "uptodate");
  const [x, y] = await Promise.all(["a", "b"].map(async (n) => (await run("sha256sum", [image(n)], { timeoutMs: 60_000 })).stdout.split(" ")[0]));
  return x === y;
}

function eventsOf(node: string, type: string): Record<string, unknown>[] {
  return readFileSync(events(node), "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>).filter((e) => e.type === type);
}

async function labUp(): Promise<void> {
  const r = await mailha(["lab", "up", "--no-services", "--config", lab.configFile]);
  assert.equal(r.code, 0, `lab up failed:\n${r.stderr}`);
}
async function labDown(): Promise<void> {
  const r = await mailha(["lab", "down", "--config", lab.configFile]);
  assert.equal(r.code, 0, `lab down failed:\n${r.stderr}`);
}
const pullLink = (node: string) => run("ip", ["-n", `mailha-${lab.name}-${node}`, "link", "set", "rep0", "down"]);
const plugLink = (node: string) => run("ip", ["-n", `mailha-${lab.name}-${node}`, "link", "set", "rep0", "up"]);

function setPolicy(policy: string): void {
  const doc = parseDocument(readFileSync(lab.configFile, "utf8"));
  doc.setIn(["volume", "split_brain_policy"], policy);
  writeFileSync(lab.configFile, doc.toString());
}

describe("the replicated volume", { skip: process.getuid?.() !== 0 ? "needs root" : false }, () => {
  after(async () => {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });

  describe("with a fresh lab for each case", () => {
    before(labUp);
    after(labDown);

    test("both images are fully allocated (the default), and status says so", async () => {
      for (const n of ["a", "b"]) {
        const st = await status(n);
        assert.ok(st.image.allocatedBytes >= st.sizeBytes, `node ${n}: ${st.image.allocatedBytes} of ${st.sizeBytes} bytes allocated`);
      }
      const human = await mailha(["volume", "status", "--config", lab.configFile, "--node", "b"]);
      assert.match(human.stdout, /image: fully allocated on this node's disk/);
    });

    test("every fsynced file survives a SIGKILL of the primary's engine and the promotion of the peer", async () => {
      const files = new Map<string, string>();
      mkdirSync(join(data("a"), "mail"), { recursive: true });
      for (let i = 0; i < 200; i++) {
        const body = randomBytes(1024 + ((i * 7919) % 60_000));
        writeFsynced(join(data("a"), "mail", `msg-${i}`), body);
        files.set(`msg-${i}`, sha(body));
      }
      const engineA = JSON.parse(readFileSync(join(lab.dir, "a", "run", "volume-engine.json"), "utf8")) as { pid: number };
      process.kill(engineA.pid, "SIGKILL");
      await vol("a", ["umount", "--lazy"]);
      await waitUntil("b", "noticing the peer is gone", (s) => !s.link.up);
      const refused = await mailha(["volume", "primary", "--config", lab.configFile, "--node", "b"]);
      assert.equal(refused.code, 1, "promoting a Consistent disk with the peer's state unknown needs --force");
      await vol("b", ["primary", "--force"]);
      await vol("b", ["mount"]);
      const seen = new Map(readdirSync(join(data("b"), "mail")).map((f) => [f, sha(readFileSync(join(data("b"), "mail", f)))]));
      for (const [name, hash] of files) assert.equal(seen.get(name), hash, `${name} was fsynced on a before the crash but is ${seen.has(name) ? "different" : "missing"} on b`);

      // a comes back as secondary and is brought up to date from b.
      await vol("a", ["start"]);
      await waitUntil("a", "resync from b", (s) => s.connection === "connected" && s.disk === "uptodate" && s.role === "secondary", 60_000);
      writeFsynced(join(data("b"), "mail", "after-failover"), Buffer.from("written on b"));
      // b is primary now: compare with roles swapped.
      await run("sync", []);
      await waitUntil("b", "writes acknowledged", (s) => s.unackedBytes === 0 && s.connection === "connected");
      await waitUntil("a", "in sync", (s) => s.connection === "connected" && s.disk === "uptodate");
      const [x, y] = await Promise.all(["a", "b"].map(async (n) => (await run("sha256sum", [image(n)], { timeoutMs: 60_000 })).stdout.split(" ")[0]));
      assert.equal(x, y, "after a rejoined, both images must be identical");
    });
  });

  describe("a pulled replication link", () => {
    before(labUp);
    after(labDown);

    test("is resynced by changed blocks only (at most 1.1 x what changed), leaving identical images", async () => {
      writeFsynced(join(data("a"), "before"), randomBytes(256 * 1024));
      assert.ok(await imagesIdentical(), "images must be identical before the link is pulled");
      await pullLink("a");
      await waitUntil("a", "noticing the link is gone", (s) => !s.link.up && s.connection === "connecting");
      const written = 8 * 1024 * 1024;
      writeFsynced(join(data("a"), "while-degraded"), randomBytes(written));
      await run("sync", []);
      const degraded = await status("a");
      assert.equal(degraded.role, "primary", "the primary keeps serving without its peer");
      assert.ok(degraded.outOfSyncBytes >= written, `out-of-sync bytes (${degraded.outOfSyncBytes}) must cover the ${written} bytes written`);
      const before = (await status("a")).stats.resyncedBytes;
      await plugLink("a");
      await waitUntil("a", "resync finished", (s) => s.link.up && s.connection === "connected" && s.outOfSyncBytes === 0, 60_000);
      const resynced = (await status("a")).stats.resyncedBytes - before;
      const metadataAllowance = 2 * 1024 * 1024;
      assert.ok(resynced <= 1.1 * written + metadataAllowance, `resynced ${resynced} bytes for ${written} bytes changed: more than 1.1 x (+ ${metadataAllowance} metadata)`);
      assert.ok(resynced >= written, `resynced ${resynced} bytes but ${written} changed`);
      assert.ok(await imagesIdentical(), "images must be identical after the resync");
      const finished = eventsOf("a", "resync-finished").at(-1)!;
      assert.equal(finished.side, "source");
    });

    test("verify finds a block corrupted in b's image and the resync repairs it", async () => {
      // Scribble 4 KiB into b's backing image behind the engine's back, at 100 MiB.
      const offset = 100 * 1024 * 1024;
      const fd = openSync(image("b"), "r+");
      writeSync(fd, randomBytes(4096), 0, 4096, offset);
      fsyncSync(fd);
      closeSync(fd);
      const r = await mailha(["volume", "verify", "--config", lab.configFile, "--node", "a", "--json"]);
      assert.equal(r.code, 1, `verify must report the difference with exit code 1: ${r.stderr}`);
      const ev = JSON.parse(r.stdout) as { mismatched: number[] };
      assert.deepEqual(ev.mismatched, [Math.floor(offset / (4 * 1024 * 1024))]);
      await waitUntil("a", "repair resync", (s) => s.connection === "connected" && s.outOfSyncBytes === 0);
      assert.ok(await imagesIdentical(), "after the repair both images must be identical");
      const again = await mailha(["volume", "verify", "--config", lab.configFile, "--node", "a", "--json"]);
      assert.equal(again.code, 0, "a second verify finds nothing");
    });

    test("a wrong replication secret is refused and counted", async () => {
      const wrong = join(dirname(lab.configFile), "wrong.yaml");
      const secret = join(dirname(lab.configFile), "wrong.secret");
      writeFileSync(secret, randomBytes(32).toString("hex") + "\n", { mode: 0o600 });
      const doc = parseDocument(readFileSync(lab.configFile, "utf8"));
      doc.setIn(["volume", "secret_file"], secret);
      writeFileSync(wrong, doc.toString());
      await vol("b", ["stop"]);
      await waitUntil("a", "noticing b is gone", (s) => !s.link.up);
      await vol("b", ["start"], wrong);
      const s = await waitUntil("a", "an authentication failure", (x) => x.link.authFailures > 0);
      assert.equal(s.link.up, false, "a peer with the wrong secret must not be connected");
      assert.ok(eventsOf("a", "auth-failed").length > 0, "the refusal is in a's event log");
      await vol("b", ["stop"], wrong);
      await vol("b", ["start"]);
      await waitUntil("a", "reconnecting with the right secret", (x) => x.link.up && x.connection === "connected", 30_000);
    });
  });

  describe("a split brain", () => {
    before(labUp);
    after(labDown);

    async function splitBrain(bytesA: number, bytesB: number): Promise<void> {
      await pullLink("a");
      await waitUntil("b", "noticing the link is gone", (s) => !s.link.up);
      await waitUntil("a", "noticing the link is gone", (s) => !s.link.up);
      await vol("b", ["primary", "--force"]);
      await vol("b", ["mount"]);
      writeFsynced(join(data("a"), `only-on-a-${bytesA}`), randomBytes(bytesA));
      writeFsynced(join(data("b"), `only-on-b-${bytesB}`), randomBytes(bytesB));
      await vol("b", ["umount"]);
      await vol("b", ["secondary"]);
    }

    test("preserve (the default): detected, the side with fewer changes is overwritten, its copy kept", async () => {
      await splitBrain(4 * 1024 * 1024, 512 * 1024);
      await plugLink("a");
      await waitUntil("a", "resolution", (s) => s.link.up && s.connection === "connected" && s.peer.disk === "uptodate", 60_000);
      for (const n of ["a", "b"]) {
        const sb = eventsOf(n, "split-brain").at(-1);
        assert.ok(sb, `node ${n} must log the split brain`);
        assert.equal(sb!.victim, "b");
      }
      const b = await status("b");
      assert.equal(b.preserved.length, 1, "b's image must have been copied before it was overwritten");
      // The copy holds what b wrote during the split brain.
      const copy = join(b.preserved[0]!.path, "image");
      const mnt = join(lab.dir, "inspect");
      mkdirSync(mnt, { recursive: true });
      const loop = (await run("losetup", ["--find", "--show", "--read-only", copy])).stdout.trim();
      try {
        await run("mount", ["-o", "ro,noload", loop, mnt]);
        try {
          assert.ok(readdirSync(mnt).includes(`only-on-b-${512 * 1024}`), "the preserved copy contains b's file");
        } finally {
          await run("umount", [mnt]);
        }
      } finally {
        await tryRun("losetup", ["-d", loop]);
      }
      assert.ok(await imagesIdentical(), "after the resync both images must be identical (a's data)");
      assert.ok(readdirSync(data("a")).includes(`only-on-a-${4 * 1024 * 1024}`));
    });

    test("disconnect: both sides stay StandAlone until `volume resolve`", async () => {
      setPolicy("disconnect");
      await vol("a", ["umount"]);
      await vol("a", ["secondary"]);
      for (const n of ["a", "b"]) {
        await vol(n, ["stop"]);
        await vol(n, ["start"]);
      }
      await waitUntil("a", "reconnect", (s) => s.connection === "connected");
      await vol("a", ["primary"]);
      await vol("a", ["mount"]);
      await splitBrain(256 * 1024, 128 * 1024);
      await plugLink("a");
      await waitUntil("a", "standalone after the split brain", (s) => s.connection === "standalone", 30_000);
      await waitUntil("b", "standalone after the split brain", (s) => s.connection === "standalone", 30_000);
      assert.equal(eventsOf("a", "split-brain").at(-1)!.victim, null);
      await vol("b", ["resolve", "--discard-local"]);
      await vol("a", ["connect"]);
      await waitUntil("a", "resync after the resolution", (s) => s.connection === "connected" && s.peer.disk === "uptodate", 60_000);
      assert.ok(await imagesIdentical(), "after the resolution both images must be identical");
    });
  });
});
