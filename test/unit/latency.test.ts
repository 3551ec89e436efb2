// The latency figures of `volume status`: percentiles over the recent samples only.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Latency } from "../../replication/latency.ts";

test("p50, p99 and max come from the recent samples; old ones roll off", () => {
  const l = new Latency();
  assert.deepEqual(l.summary(), { count: 0, p50Us: 0, p99Us: 0, maxUs: 0 });
  for (let i = 1; i <= 100; i++) l.add(i * 10);
  assert.deepEqual(l.summary(), { count: 100, p50Us: 510, p99Us: 1000, maxUs: 1000 });
  // 4096 fast samples push the slow ones out of the ring; the count keeps growing.
  for (let i = 0; i < 4096; i++) l.add(5);
  assert.deepEqual(l.summary(), { count: 4196, p50Us: 5, p99Us: 5, maxUs: 5 });
});
