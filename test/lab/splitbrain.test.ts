// A split brain in the full lab, as an operator meets it: the replication link is cut,
// the active node takes mail alone, dies, the other is forced to take over and takes
// mail too; when the first comes back, the side that is not active is copied durably
// before the resync overwrites it, so every message it acknowledged is still in its
// preserved copy. Both the automatic path (links healed, the cluster decides) and the
// documented manual one (`volume resolve --discard-local`, `volume connect`).
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { runAll } from "../../common/exec.ts";
import { mountPreservedCopy } from "../../replication/filesystem.ts";
import { mailha, mailhaWithInput } from "../helpers/cli.ts";
import { writeTestLabConfig, type TestLab } from "../helpers/lab.ts";
import { fault, status, waitNode } from "../helpers/cluster.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const USER = "bob@mailha.test";

interface Preserved {
  path: string;
  reason: string;
  reconciledAtMs?: number | null;
}

async function vol(lab: TestLab, node: string, args: string[]): Promise<unknown> {
  const r = await mailha(["volume", ...args, "--node", node, "--config", lab.configFile, "--json"]);
  assert.equal(r.code, 0, `volume ${args.join(" ")} on ${node}: ${r.stderr}`);
  return r.stdout.trim() ? (JSON.parse(r.stdout) as unknown) : null;
}

async function send(lab: TestLab, node: string, tag: string): Promise<void> {
  const addr = node === "a" ? lab.a : lab.b;
  const r = await runAll("swaks", ["--server", addr, "--to", USER, "--from", "sender@example.org", "--header", `Subject: ${tag}`, "--body", `body of ${tag}`]);
  assert.match(r.stdout, /\n -> \.\n<-\s+250 /, `message ${tag} to ${node} was not acknowledged:\n${r.stdout.slice(-600)}`);
}

/** The Subject tags of bob's messages in a mounted tree. */
function tagsIn(root: string): string[] {
  const out: string[] = [];
  for (const sub of ["new", "cur"]) {
    const d = join(root, "mail", "mailha.test", "bob", "Maildir", sub);
    let names: string[] = [];
    try {
      names = readdirSync(d);
    } catch {
      continue;
    }
    for (const f of names) {
      const m = /^Subject: (.+)$/m.exec(readFileSync(join(d, f), "utf8"));
      if (m) out.push(m[1]!.trim());
    }
  }
  return out.sort();
}

/** Mounts a preserved copy read-only (its journal replayed on a working image) and returns the tags in it. */
async function tagsInCopy(lab: TestLab, copy: string): Promise<string[]> {
  const view = await mountPreservedCopy(copy, join(lab.dir, `inspect-${Date.now()}`));
  try {
    return tagsIn(view.mountpoint);
  } finally {
    await view.close();
    rmSync(view.mountpoint, { recursive: true, force: true });
  }
}

/**
 * Cut ACTIVE's replication link, N messages to it, kill it, force the other to take
 * over, N messages there. Returns the tags sent to each.
 */
async function diverge(lab: TestLab, active: string, round: string, n = 5): Promise<{ onOld: string[]; onNew: string[] }> {
  const other = active === "a" ? "b" : "a";
  await fault(lab, "cut-link", active, "replication");
  await waitNode(lab, other, "marking its disk Outdated", (s) => s.volume?.disk === "outdated", 15_000);
  const onOld = Array.from({ length: n }, (_, i) => `${round}-${active}-${i}`);
  for (const t of onOld) await send(lab, active, t);
  await fault(lab, "kill-node", active);
  await waitNode(lab, other, "refusing to take over with its Outdated disk", (s) => s.state === "failed", 30_000);
  const forced = await mailha(["takeover", "--force", "--node", other, "--config", lab.configFile]);
  assert.equal(forced.code, 0, `takeover --force: ${forced.stderr}`);
  await waitNode(lab, other, "active on its forced copy", (s) => s.state === "active", 90_000);
  const onNew = Array.from({ length: n }, (_, i) => `${round}-${other}-${i}`);
  for (const t of onNew) await send(lab, other, t);
  return { onOld, onNew };
}

async function waitFor<T>(fn: () => Promise<T>, ms: number): Promise<T | undefined> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn().catch(() => undefined);
    if (v || Date.now() > end) return v;
    await new Promise((r) => setTimeout(r, 1000));
  }
}

describe("split brain: the side that is overwritten is preserved first", { skip }, () => {
  const lab = writeTestLabConfig("s", 109);
  const data = (n: string) => join(lab.dir, n, "data");

  before(async () => {
    const r = await mailha(["lab", "up", "--config", lab.configFile]);
    assert.equal(r.code, 0, `lab up failed:\n${r.stderr}`);
    const u = await mailhaWithInput(["user", "add", USER, "--config", lab.configFile], "bob-password-1");
    assert.equal(u.code, 0, u.stderr);
  });
  after(async () => {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });

  test("automatic: when the links come back, the node that is not active is copied, then resynced; its acknowledged mail is in the copy, and the active node merges it by itself", async () => {
    const { onOld, onNew } = await diverge(lab, "a", "auto");
    await fault(lab, "boot-node", "a");
    await fault(lab, "heal");
    const s = await waitNode(lab, "a", "being preserved and resynced from b", (x) => x.volume?.connection === "connected" && x.volume.outOfSyncBytes === 0 && x.volume.disk === "uptodate", 120_000);
    assert.equal(s.state, "passive", "a comes back passive: b keeps serving");
    const list = (await vol(lab, "a", ["preserved", "list"])) as Preserved[];
    assert.equal(list.length, 1, `a must have kept one copy of its side, has ${JSON.stringify(list)}`);
    assert.match(list[0]!.reason, /split brain/);
    const inCopy = await tagsInCopy(lab, list[0]!.path);
    for (const t of onOld) assert.ok(inCopy.includes(t), `message ${t}, acknowledged by a during the split, is missing from a's preserved copy (it has ${inCopy.join(", ")})`);
    for (const t of onNew) assert.ok(!inCopy.includes(t), `a's copy cannot hold ${t}, which only b accepted`);
    const live = tagsIn(data("b"));
    for (const t of onNew) assert.ok(live.includes(t), `message ${t} accepted by b is missing on b`);
    // The copy shows in status, with its path.
    const shown = await mailha(["volume", "status", "--node", "a", "--config", lab.configFile]);
    assert.match(shown.stdout, new RegExp(`preserved copy: ${list[0]!.path.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} `));
    // Nobody runs anything: b (active, in sync again) reads a's copy on a over the peer
    // channel and merges it; every message a acknowledged arrives in b's Maildir, once.
    const until = Date.now() + 180_000;
    let merged: string[] = [];
    while (Date.now() < until) {
      merged = tagsIn(data("b"));
      if (onOld.every((t) => merged.includes(t))) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    for (const t of [...onOld, ...onNew]) assert.equal(merged.filter((x) => x === t).length, 1, `message ${t} must be on b exactly once after the automatic reconcile (b has ${merged.join(", ")})`);
    const marked = await waitFor(async () => ((await vol(lab, "a", ["preserved", "list"])) as Preserved[])[0]?.reconciledAtMs, 60_000);
    assert.ok(marked, "a's copy is marked reconciled once b merged it");
    const cluster = readFileSync(join(lab.dir, "b", "log", "cluster-events.jsonl"), "utf8");
    assert.match(cluster, /"type":"reconcile-started"/);
    assert.match(cluster, /"type":"reconcile-done"/);
    const st = await mailha(["status", "--config", lab.configFile]);
    assert.doesNotMatch(st.stdout, /not reconciled/, `status after the automatic reconcile:\n${st.stdout}`);
    const events = readFileSync(join(lab.dir, "a", "log", "volume-events.jsonl"), "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    const preservedAt = events.findIndex((e) => e.type === "preserved");
    const resyncAt = events.findIndex((e, i) => i > preservedAt && e.type === "resync-started" && e.side === "target");
    assert.ok(preservedAt >= 0 && resyncAt > preservedAt, "the copy is complete (preserved event) before the resync starts");
    assert.equal(events[resyncAt]!.preserved, list[0]!.path);
  });

  test("manual: `volume resolve --discard-local` on the side to overwrite, `volume connect` on the other; a copy is kept first and merged", async () => {
    // b is active now; this time b diverges and a is forced to take over.
    const { onOld, onNew } = await diverge(lab, "b", "manual");
    await fault(lab, "boot-node", "b");
    // The operator keeps b StandAlone before the links come back, to decide by hand.
    await vol(lab, "b", ["disconnect"]);
    await fault(lab, "heal");
    const before = ((await vol(lab, "b", ["preserved", "list"])) as Preserved[]).length;
    await vol(lab, "b", ["resolve", "--discard-local"]);
    await vol(lab, "a", ["connect"]);
    await waitNode(lab, "b", "being preserved and resynced from a", (x) => x.volume?.connection === "connected" && x.volume.outOfSyncBytes === 0 && x.volume.disk === "uptodate", 120_000);
    const list = (await vol(lab, "b", ["preserved", "list"])) as Preserved[];
    assert.equal(list.length, before + 1, "b kept a copy before it was overwritten");
    const inCopy = await tagsInCopy(lab, list.at(-1)!.path);
    for (const t of onOld) assert.ok(inCopy.includes(t), `message ${t}, acknowledged by b during the split, is missing from b's preserved copy`);
    const live = tagsIn(data("a"));
    for (const t of onNew) assert.ok(live.includes(t), `message ${t} accepted by a is missing on a`);
    // Resolved by hand, merged by a itself: what b acknowledged arrives on a, once.
    const until = Date.now() + 180_000;
    let merged: string[] = [];
    while (Date.now() < until) {
      merged = tagsIn(data("a"));
      if (onOld.every((t) => merged.includes(t))) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    for (const t of [...onOld, ...onNew]) assert.equal(merged.filter((x) => x === t).length, 1, `message ${t} must be on a exactly once after the merge (a has ${merged.join(", ")})`);
    assert.ok(await waitFor(async () => ((await vol(lab, "b", ["preserved", "list"])) as Preserved[]).at(-1)?.reconciledAtMs, 60_000), "b's copy is marked reconciled");
    // --force drops it, files and all.
    const dropped = (await vol(lab, "b", ["preserved", "drop", list.at(-1)!.path, "--force"])) as { dropped: string };
    assert.equal(dropped.dropped, list.at(-1)!.path);
    assert.equal(((await vol(lab, "b", ["preserved", "list"])) as Preserved[]).length, before);
    assert.throws(() => readdirSync(list.at(-1)!.path), /ENOENT/);
    assert.ok((await status(lab, "a"))?.state === "active");
  });
});
