// The hybrid logical clock that orders the two sides' changes after a split brain: it
// never goes backwards on one node, moves past what it has seen from a peer, refuses a
// peer's stamp from too far in the future, survives counter overflow, and its stamps
// sort as strings exactly as their parts do.
import { test } from "node:test";
import assert from "node:assert/strict";
import { HLC_DRIFT_MAX_MS, HlcClock, compareHlc, formatHlc, isHlc, maxHlc, parseHlc } from "../../common/hlc.ts";
import { rng } from "../sim/volume-sim.ts";

const T = 1_800_000_000_000;

test("stamps keep growing when the wall clock goes backwards or stands still", () => {
  const times = [T, T + 5, T + 5, T - 3_000, T - 3_000, T + 1, T + 6, T + 10];
  let i = 0;
  const c = new HlcClock("a", () => times[Math.min(i++, times.length - 1)]!);
  const stamps = times.map(() => c.tick());
  for (let k = 1; k < stamps.length; k++) assert.ok(compareHlc(stamps[k]!, stamps[k - 1]!) > 0, `${stamps[k]} is not after ${stamps[k - 1]}`);
  assert.equal(parseHlc(stamps[3]!).wallMs, T + 5, "with the clock 3 s back, the stamp keeps the last wall time and counts up");
  assert.equal(parseHlc(stamps[7]!).wallMs, T + 10, "once the wall clock is ahead again, the stamp follows it");
  assert.equal(parseHlc(stamps[7]!).counter, 0);
});

test("after seeing a peer's stamp, the next local stamp is later than it", () => {
  const now = T;
  const a = new HlcClock("a", () => now);
  const peerAhead = formatHlc({ wallMs: T + 10_000, counter: 7, node: "b" });
  assert.equal(a.observe(peerAhead), true);
  const next = a.tick();
  assert.ok(compareHlc(next, peerAhead) > 0, `${next} is not after the peer's ${peerAhead}`);
  assert.deepEqual(parseHlc(next), { wallMs: T + 10_000, counter: 8, node: "a" });
  // A peer stamp in the past changes nothing.
  assert.equal(a.observe(formatHlc({ wallMs: T - 1, counter: 99, node: "b" })), true);
  assert.ok(compareHlc(a.tick(), next) > 0);
});

test("a peer's stamp more than the drift bound ahead is refused and does not drag the clock", () => {
  const a = new HlcClock("a", () => T);
  const edge = formatHlc({ wallMs: T + HLC_DRIFT_MAX_MS, counter: 0, node: "b" });
  const beyond = formatHlc({ wallMs: T + HLC_DRIFT_MAX_MS + 1, counter: 0, node: "b" });
  const b = new HlcClock("b", () => T);
  assert.equal(b.observe(beyond), false, `a stamp ${HLC_DRIFT_MAX_MS + 1} ms ahead must be refused`);
  assert.equal(parseHlc(b.tick()).wallMs, T, "the refused stamp did not move the clock");
  assert.equal(a.observe(edge), true, `a stamp exactly ${HLC_DRIFT_MAX_MS} ms ahead is accepted`);
  assert.ok(compareHlc(a.tick(), edge) > 0);
});

test("counter overflow within one millisecond moves the wall part on by one, still in order", () => {
  const a = new HlcClock("a", () => T);
  a.observe(formatHlc({ wallMs: T, counter: 99_998, node: "b" }));
  const s1 = a.tick();
  const s2 = a.tick();
  const s3 = a.tick();
  assert.deepEqual([parseHlc(s1), parseHlc(s2), parseHlc(s3)], [
    { wallMs: T, counter: 99_999, node: "a" },
    { wallMs: T + 1, counter: 0, node: "a" },
    { wallMs: T + 1, counter: 1, node: "a" },
  ]);
  assert.ok(compareHlc(s1, s2) < 0 && compareHlc(s2, s3) < 0);
});

test("100 000 stamps in one millisecond are all distinct and in order", () => {
  const a = new HlcClock("a", () => T);
  let prev = a.tick();
  for (let i = 0; i < 100_000; i++) {
    const s = a.tick();
    if (compareHlc(s, prev) <= 0) assert.fail(`stamp ${s} after ${prev}`);
    prev = s;
  }
  assert.equal(parseHlc(prev).wallMs, T + 1);
});

test("format and parse round-trip, and string order is the order of (wall time, counter, node)", () => {
  const r = rng(7);
  const nodes = ["a", "b", "node-1", "n_2", "z9"];
  const parts = Array.from({ length: 400 }, () => ({ wallMs: Math.floor(r() * 3) + T, counter: Math.floor(r() * 4) * 33_333, node: nodes[Math.floor(r() * nodes.length)]! }));
  for (const p of parts) {
    const s = formatHlc(p);
    assert.ok(isHlc(s));
    assert.deepEqual(parseHlc(s), p);
  }
  const tuple = (x: { wallMs: number; counter: number; node: string }, y: typeof x) => x.wallMs - y.wallMs || x.counter - y.counter || (x.node < y.node ? -1 : x.node > y.node ? 1 : 0);
  for (let i = 0; i + 1 < parts.length; i++) {
    const [x, y] = [parts[i]!, parts[i + 1]!];
    assert.equal(Math.sign(compareHlc(formatHlc(x), formatHlc(y))), Math.sign(tuple(x, y)), `${formatHlc(x)} vs ${formatHlc(y)}`);
  }
  assert.equal(maxHlc(formatHlc(parts[0]!), formatHlc(parts[1]!)), [formatHlc(parts[0]!), formatHlc(parts[1]!)].sort()[1]);
});

test("malformed input is refused with an error that names it", () => {
  for (const bad of ["", "yesterday", "1800000000000-00000-", "1800000000000-0000-a", "180000000000-00000-a", "1800000000000-00000-A", "1800000000000-00000-a b"])
    assert.throws(() => parseHlc(bad), new RegExp(`malformed stamp "${bad.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}"`));
  assert.equal(isHlc(42), false);
  assert.throws(() => formatHlc({ wallMs: -1, counter: 0, node: "a" }), /wall time out of range: -1/);
  assert.throws(() => formatHlc({ wallMs: T, counter: 100_000, node: "a" }), /counter out of range: 100000/);
  assert.throws(() => formatHlc({ wallMs: T, counter: 0, node: "Bad" }), /bad node id "Bad"/);
  assert.throws(() => new HlcClock("no spaces"), /bad node id "no spaces"/);
  assert.throws(() => new HlcClock("a", () => T).observe("garbage"), /malformed stamp "garbage"/);
});

test("a clock restarted from its last stamp continues after it", () => {
  const last = new HlcClock("a", () => T + 500).tick();
  const restarted = new HlcClock("a", () => T, last);
  assert.ok(compareHlc(restarted.tick(), last) > 0);
});

test("a clock restarted after its wall clock was set back by more than the drift bound still continues after its own last stamp", () => {
  const last = new HlcClock("a", () => T).tick();
  const restarted = new HlcClock("a", () => T - 2 * HLC_DRIFT_MAX_MS, last);
  assert.ok(compareHlc(restarted.tick(), last) > 0, "a node's own stamps must never go backwards, across a restart too");
});
