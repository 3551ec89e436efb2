// The automatic reconcile's decision: named cases, then seeded random inputs checked
// against the rules in words (a run starts only on the active node, in sync, switched
// on, one at a time, for the oldest copy, within its attempts and after the wait).
import { test } from "node:test";
import assert from "node:assert/strict";
import { decideAuto, mayPruneJournal, type AutoInput } from "../../reconcile/auto.ts";

const base: AutoInput = { now: 100_000, enabled: true, active: true, volumeInSync: true, peerCopies: ["/v/p1", "/v/p2"], running: false, tries: {}, attemptsMax: 3, retryMs: 10_000 };

test("named cases", () => {
  assert.deepEqual(decideAuto(base), { t: "start", copy: "/v/p1", attempt: 1 });
  assert.deepEqual(decideAuto({ ...base, running: true }), { t: "none", why: "running" });
  assert.deepEqual(decideAuto({ ...base, active: false }), { t: "none", why: "not-active" });
  assert.deepEqual(decideAuto({ ...base, peerCopies: null }), { t: "none", why: "peer-unknown" });
  assert.deepEqual(decideAuto({ ...base, peerCopies: [] }), { t: "none", why: "nothing-to-do" });
  assert.deepEqual(decideAuto({ ...base, volumeInSync: false }), { t: "none", why: "volume-not-in-sync" });
  const off = decideAuto({ ...base, enabled: false });
  assert.equal(off.t, "operator");
  assert.match(off.t === "operator" ? off.says : "", /reconcile\.auto is off.*mailha reconcile --dry-run/);
  assert.deepEqual(decideAuto({ ...base, tries: { "/v/p1": { attempts: 1, lastMs: 95_000, error: "x" } } }), { t: "none", why: "retry-later" });
  assert.deepEqual(decideAuto({ ...base, tries: { "/v/p1": { attempts: 1, lastMs: 80_000, error: "x" } } }), { t: "start", copy: "/v/p1", attempt: 2 });
  const gave = decideAuto({ ...base, tries: { "/v/p1": { attempts: 3, lastMs: 0, error: "IMAP refused" } } });
  assert.equal(gave.t, "operator");
  assert.match(gave.t === "operator" ? gave.says : "", /failed 3 times \(last: IMAP refused\).*mailha reconcile/);
  assert.throws(() => decideAuto({ ...base, attemptsMax: 0 }));
});

test("seeded random inputs follow the rules", () => {
  let seed = Number(process.env.AUTO_SEED ?? 1);
  const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  for (let i = 0; i < 5000; i++) {
    const s0 = seed;
    const copies = rnd() < 0.2 ? null : Array.from({ length: Math.floor(rnd() * 3) }, (_, k) => `/v/p${k}`);
    const tries: Record<string, { attempts: number; lastMs: number }> = {};
    if (copies?.[0] && rnd() < 0.5) tries[copies[0]] = { attempts: Math.floor(rnd() * 5), lastMs: Math.floor(rnd() * 100_000) };
    const inp: AutoInput = { now: 100_000, enabled: rnd() < 0.8, active: rnd() < 0.8, volumeInSync: rnd() < 0.8, peerCopies: copies, running: rnd() < 0.2, tries, attemptsMax: 1 + Math.floor(rnd() * 4), retryMs: Math.floor(rnd() * 30_000) };
    const v = decideAuto(inp);
    const ctx = `seed ${s0}: ${JSON.stringify(inp)} -> ${JSON.stringify(v)}`;
    if (v.t === "start") {
      const t = inp.tries[v.copy] ?? { attempts: 0, lastMs: 0 };
      assert.ok(inp.enabled && inp.active && inp.volumeInSync && !inp.running, ctx);
      assert.equal(v.copy, inp.peerCopies![0], ctx);
      assert.ok(t.attempts < inp.attemptsMax, ctx);
      assert.ok(t.attempts === 0 || inp.now - t.lastMs >= inp.retryMs, ctx);
      assert.equal(v.attempt, t.attempts + 1, ctx);
    } else if (v.t === "operator") {
      assert.ok(inp.active && !inp.running && inp.peerCopies && inp.peerCopies.length > 0, ctx);
    } else {
      // Nothing starts, and nothing waits for the operator, only when a rule says why.
      const ready = inp.enabled && inp.active && inp.volumeInSync && !inp.running && !!inp.peerCopies?.length;
      if (ready) assert.equal(v.why, "retry-later", ctx);
    }
  }
});

test("the journal is pruned only on the active node, in sync, with nothing left to merge", () => {
  const ok = { active: true, volumeInSync: true, peerCopies: [] as string[], localCopies: 0, running: false };
  assert.equal(mayPruneJournal(ok).ok, true);
  assert.match(mayPruneJournal({ ...ok, active: false }).why, /not active/);
  assert.match(mayPruneJournal({ ...ok, volumeInSync: false }).why, /not in sync/);
  assert.match(mayPruneJournal({ ...ok, running: true }).why, /reconcile runs/);
  assert.match(mayPruneJournal({ ...ok, peerCopies: null }).why, /not known/);
  assert.match(mayPruneJournal({ ...ok, peerCopies: ["/v/p1"] }).why, /not reconciled/);
  assert.match(mayPruneJournal({ ...ok, localCopies: 1 }).why, /not reconciled/);
});
