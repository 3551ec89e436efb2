// The witness lends its lease to one node at a time, over authenticated UDP.
import { test } from "node:test";
import assert from "node:assert/strict";
import { decideLease, runWitness, WitnessClient } from "../../cluster/witness.ts";

test("one holder at a time; renewal by the holder; free again after expiry or release", () => {
  let cur = decideLease(null, { node: "a", op: "acquire" }, 0, 1000);
  assert.equal(cur.granted, true);
  const b = decideLease(cur.next, { node: "b", op: "acquire" }, 500, 1000);
  assert.equal(b.granted, false, "b is refused while a's lease runs");
  cur = decideLease(cur.next, { node: "a", op: "acquire" }, 900, 1000);
  assert.equal(cur.granted, true, "a renews");
  assert.equal(decideLease(cur.next, { node: "b", op: "acquire" }, 1800, 1000).granted, false, "the renewal moved the expiry");
  assert.equal(decideLease(cur.next, { node: "b", op: "acquire" }, 1901, 1000).granted, true, "b gets it once a's lease has expired");
  const released = decideLease(cur.next, { node: "a", op: "release" }, 1000, 1000);
  assert.equal(decideLease(released.next, { node: "b", op: "acquire" }, 1001, 1000).granted, true, "b gets it after a releases");
  const foreign = decideLease(cur.next, { node: "b", op: "release" }, 1000, 1000);
  assert.equal(foreign.next?.holder, "a", "b cannot release a's lease");
});

test("over UDP: a node with the key gets the lease, the other waits, a wrong key gets nothing", async () => {
  const key = Buffer.from("witness-test-key");
  const events: Record<string, unknown>[] = [];
  const server = await runWitness({ host: "127.0.0.1", port: 17790, key, cluster: "c", leaseMs: 400, nodes: ["a", "b"], onEvent: (e) => events.push(e) });
  const a = new WitnessClient({ host: "127.0.0.1", port: 17790, key, cluster: "c", node: "a" });
  const b = new WitnessClient({ host: "127.0.0.1", port: 17790, key, cluster: "c", node: "b" });
  const x = new WitnessClient({ host: "127.0.0.1", port: 17790, key: Buffer.from("wrong"), cluster: "c", node: "b" });
  try {
    assert.equal((await a.request("acquire", 1000))?.granted, true);
    const refused = await b.request("acquire", 1000);
    assert.equal(refused?.granted, false);
    assert.equal(refused?.holder, "a");
    assert.equal(await x.request("acquire", 300), null, "a request with a wrong key gets no answer");
    assert.equal(server.stats.forged, 1);
    await new Promise((r) => setTimeout(r, 450));
    assert.equal((await b.request("acquire", 1000))?.granted, true, "b gets the lease after a's expired");
    assert.ok(events.some((e) => e.type === "lease" && e.holder === "b"));
  } finally {
    a.close();
    b.close();
    x.close();
    server.close();
  }
});
