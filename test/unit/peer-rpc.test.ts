// The node-to-node channel over real TLS sockets on loopback: the peer with the key is
// answered (a JSON result and a raw body); a wrong key, another node's identity or bytes
// that are not TLS are refused and counted; a malformed request is counted and the
// server keeps serving; an answer over the caller's bound is an error, not a crash.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { createConnection } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { pino } from "pino";
import { callPeer, peerKey, servePeerRpc } from "../../common/peer-rpc.ts";

const key = randomBytes(32);
const log = pino({ level: "silent" });

async function withServer(fn: (port: number, counters: { refused: number; malformed: number; served: number }) => Promise<void>): Promise<void> {
  const srv = await servePeerRpc({
    host: "127.0.0.1",
    port: 0,
    key,
    cluster: "c1",
    self: "b",
    peer: "a",
    log,
    handlers: {
      echo: async (args) => ({ result: { args } }),
      file: async (args) => ({ result: { name: "f" }, body: Buffer.alloc(Number(args.n), 0x61) }),
      fail: async () => {
        throw new Error("the copy is not there");
      },
    },
  });
  try {
    await fn(srv.port, srv.counters);
  } finally {
    srv.close();
  }
}

const from = (port: number, over: Partial<{ key: Buffer; self: string; cluster: string }> = {}) => ({ host: "127.0.0.1", port, key: over.key ?? key, cluster: over.cluster ?? "c1", self: over.self ?? "a", peer: "b" });

test("the peer with the key gets its answer, a body, and the server's error in words", async () => {
  await withServer(async (port, counters) => {
    const a = await callPeer(from(port), "echo", { x: 1, s: "é" });
    assert.deepEqual(a.result, { args: { x: 1, s: "é" } });
    const f = await callPeer(from(port), "file", { n: 300_000 });
    assert.equal(f.body?.length, 300_000);
    assert.ok(f.body!.every((b) => b === 0x61));
    await assert.rejects(callPeer(from(port), "fail"), /the copy is not there/);
    await assert.rejects(callPeer(from(port), "nosuch"), /unknown operation/);
    assert.equal(counters.served, 3);
    assert.equal(counters.malformed, 1);
  });
});

test("a wrong key, a third node's identity, another cluster, or bytes that are not TLS are refused and counted", async () => {
  await withServer(async (port, counters) => {
    await assert.rejects(callPeer(from(port, { key: randomBytes(32) }), "echo"));
    await assert.rejects(callPeer(from(port, { self: "c" }), "echo"));
    await assert.rejects(callPeer(from(port, { cluster: "c2" }), "echo"));
    const raw = createConnection({ host: "127.0.0.1", port });
    raw.on("error", () => {});
    raw.write(Buffer.concat([Buffer.from('{"op":"echo"}\n'), randomBytes(500)]));
    await new Promise((r) => raw.once("close", r));
    assert.ok(counters.refused >= 4, `refused ${counters.refused}`);
    assert.equal(counters.served, 0);
    // Still serving the peer.
    assert.deepEqual((await callPeer(from(port), "echo", {})).result, { args: {} });
  });
});

test("a request that is not a JSON line, or too long, is dropped and counted; an oversize answer is refused by the caller", async () => {
  await withServer(async (port, counters) => {
    const psk = peerKey(key, "c1");
    const send = (bytes: Buffer) =>
      new Promise<void>((resolve) => {
        const s = tlsConnect({ host: "127.0.0.1", port, ciphers: "ECDHE-PSK-CHACHA20-POLY1305", maxVersion: "TLSv1.2", checkServerIdentity: () => undefined, pskCallback: () => ({ psk, identity: "c1/a" }) });
        s.on("error", () => resolve());
        s.once("secureConnect", () => s.write(bytes));
        s.once("close", () => resolve());
        s.resume();
      });
    await send(Buffer.from("not json\n"));
    await send(Buffer.alloc(70 * 1024, 0x7b));
    assert.equal(counters.malformed, 2);
    await assert.rejects(callPeer(from(port), "file", { n: 2_000_000 }, { maxBytes: 1_000_000 }), /over|bad body length/);
    assert.equal((await callPeer(from(port), "file", { n: 10 })).body?.length, 10);
  });
});
