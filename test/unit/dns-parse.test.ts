// DNS answers from the network are untrusted input: a name that runs past the end of
// the packet, a compression loop or a label too long is a malformed answer (never a
// hang); an answer is taken only from the server's address and port; a decode error in
// a socket handler never escapes; the DNS lease is held only with an answer the server
// signed (TSIG over our request's MAC and the answer, time within the fudge).
// The fake server here signs its answers the way BIND9 does (RFC 8945 4.3), written
// from the RFC and not from dns/update.ts, so the two implementations check each other.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { createSocket, type Socket } from "node:dgram";
import { once } from "node:events";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Worker } from "node:worker_threads";
import dnsPacket from "dns-packet";
import type { MailhaConfig } from "../../common/config.ts";
import { takeLease } from "../../dns/lease.ts";
import { query } from "../../dns/query.ts";
import { sendUpdate } from "../../dns/update.ts";
import { renderTsigKeyFile } from "../../dns/tsig-key.ts";

const KEY_NAME = "mailha-test-key";
const SECRET = Buffer.alloc(32, 7);

/** Runs update.ts's parseAnswer on PACKET in a worker: a hang is reported, not suffered. */
async function parseInWorker(packet: Buffer, timeoutMs = 3000): Promise<"hang" | { threw: string } | { result: unknown }> {
  const api = import.meta.resolve("tsx/esm/api");
  const mod = new URL("../../dns/update.ts", import.meta.url).href;
  const code = `const { parentPort, workerData } = require("node:worker_threads");
import(${JSON.stringify(api)}).then((a) => { a.register(); return import(${JSON.stringify(mod)}); }).then((m) => {
  parentPort.postMessage("loaded");
  try { parentPort.postMessage({ result: JSON.parse(JSON.stringify(m.parseAnswer(Buffer.from(workerData), null, null))) }); }
  catch (err) { parentPort.postMessage({ threw: String(err && err.message) }); }
});`;
  const w = new Worker(code, { eval: true, workerData: new Uint8Array(packet) });
  try {
    return await new Promise((resolve, reject) => {
      let t: NodeJS.Timeout | null = null;
      w.on("message", (m) => {
        if (m === "loaded") t = setTimeout(() => resolve("hang"), timeoutMs);
        else {
          if (t) clearTimeout(t);
          resolve(m as { threw: string } | { result: unknown });
        }
      });
      w.on("error", reject);
    });
  } finally {
    await w.terminate();
  }
}

function header(id: number, flags: number, qd: number, an: number, ns: number, ar: number): Buffer {
  const b = Buffer.alloc(12);
  [id, flags, qd, an, ns, ar].forEach((v, i) => b.writeUInt16BE(v, i * 2));
  return b;
}
const RESPONSE_UPDATE = 0x8000 | (5 << 11);

test("malformed names in an answer are refused at once, never a hang", async () => {
  const cases: [string, Buffer][] = [
    ["a name running past the end", Buffer.concat([header(1, RESPONSE_UPDATE, 1, 0, 0, 0), Buffer.from([5, 0x61, 0x62])])],
    ["a label length past the end", Buffer.concat([header(1, RESPONSE_UPDATE, 1, 0, 0, 0), Buffer.from([63])])],
    ["a compression pointer to itself", Buffer.concat([header(1, RESPONSE_UPDATE, 0, 1, 0, 0), Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0])])],
    ["two pointers to each other", Buffer.concat([header(1, RESPONSE_UPDATE, 1, 0, 0, 0), Buffer.from([0xc0, 14, 0xc0, 12, 0, 6, 0, 1])])],
    ["a record cut after its name", Buffer.concat([header(1, RESPONSE_UPDATE, 0, 1, 0, 0), Buffer.from([0])])],
    ["an rdata length past the end", Buffer.concat([header(1, RESPONSE_UPDATE, 0, 1, 0, 0), Buffer.from([0, 0, 1, 0, 1, 0, 0, 0, 0, 0xff, 0xff])])],
    ["a header of 5 bytes", Buffer.from([0, 1, 0x80, 0, 0])],
  ];
  for (const [what, pkt] of cases) {
    const r = await parseInWorker(pkt);
    assert.notEqual(r, "hang", `${what}: parseAnswer hung`);
    assert.ok("threw" in (r as object), `${what}: expected a refusal, got ${JSON.stringify(r)}`);
    assert.match((r as { threw: string }).threw, /malformed/, what);
  }
});

/** A UDP socket on loopback that hands each request to ANSWER. */
async function fakeServer(answer: (req: Buffer, from: { address: string; port: number }, sock: Socket) => void): Promise<{ port: number; close(): void }> {
  const sock = createSocket("udp4");
  sock.on("message", (m, r) => answer(m, r, sock));
  sock.bind(0, "127.0.0.1");
  await once(sock, "listening");
  return { port: sock.address().port, close: () => sock.close() };
}

const op = [{ op: "add" as const, name: "x.mailha.test", type: "A" as const, ttl: 60, data: "10.0.0.1" }];

test("an answer from another port than the server's is ignored, even with the right id", async () => {
  const intruder = createSocket("udp4");
  intruder.bind(0, "127.0.0.1");
  await once(intruder, "listening");
  const srv = await fakeServer((req, from, sock) => {
    // The intruder answers first (it saw the id), the server a little later.
    intruder.send(Buffer.concat([header(req.readUInt16BE(0), RESPONSE_UPDATE, 0, 0, 0, 0)]), from.port, from.address);
    setTimeout(() => sock.send(header(req.readUInt16BE(0), RESPONSE_UPDATE | 5, 0, 0, 0, 0), from.port, from.address), 100);
  });
  try {
    const r = await sendUpdate("127.0.0.1", srv.port, "mailha.test", [], op, null, { timeoutMs: 1000, tries: 1 });
    assert.equal(r.rcode, "REFUSED", "the server's own answer counts, not the intruder's NOERROR");
  } finally {
    srv.close();
    intruder.close();
  }
});

test("a query answer that does not decode is dropped inside the handler; the real one follows", async () => {
  const srv = await fakeServer((req, from, sock) => {
    const q = dnsPacket.decode(req);
    const garbage = Buffer.concat([req.subarray(0, 2), Buffer.from([0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, 0x3f])]);
    sock.send(garbage, from.port, from.address);
    const good = dnsPacket.encode({ type: "response", id: q.id, flags: dnsPacket.AUTHORITATIVE_ANSWER, questions: q.questions, answers: [{ type: "A", name: q.questions![0]!.name, ttl: 60, data: "10.1.2.3" }] });
    setTimeout(() => sock.send(good, from.port, from.address), 50);
  });
  try {
    const a = await query("127.0.0.1", srv.port, "mail.mailha.test", "A", 1000, 1);
    assert.equal(a.rcode, "NOERROR");
    assert.deepEqual(a.answers.map((x) => (x as { data: unknown }).data), ["10.1.2.3"]);
  } finally {
    srv.close();
  }
});

// ---- the lease: a server that answers like BIND9, or an impostor ----------------------

function wire(name: string): Buffer {
  const parts = name.replace(/\.$/, "").toLowerCase().split(".").filter(Boolean);
  return Buffer.concat([...parts.map((p) => Buffer.concat([Buffer.from([p.length]), Buffer.from(p)])), Buffer.from([0])]);
}
const u16 = (n: number) => Buffer.from([n >> 8, n & 0xff]);

/** RFC 8945 4.3: the answer's MAC covers the request MAC, the answer and the TSIG variables. */
function signAnswer(answer: Buffer, requestMac: Buffer, secret: Buffer, timeSigned: number): Buffer {
  const time = Buffer.alloc(6);
  time.writeUIntBE(timeSigned, 0, 6);
  const vars = Buffer.concat([wire(KEY_NAME), u16(255), Buffer.alloc(4), wire("hmac-sha256"), time, u16(300), u16(0), u16(0)]);
  const mac = createHmac("sha256", secret).update(u16(requestMac.length)).update(requestMac).update(answer).update(vars).digest();
  const rdata = Buffer.concat([wire("hmac-sha256"), time, u16(300), u16(mac.length), mac, answer.subarray(0, 2), u16(0), u16(0)]);
  const out = Buffer.concat([answer, wire(KEY_NAME), u16(250), u16(255), Buffer.alloc(4), u16(rdata.length), rdata]);
  out.writeUInt16BE(answer.readUInt16BE(10) + 1, 10);
  return out;
}

type UpdateAnswerMode = "unsigned" | "wrong-key" | "stale" | "signed";

async function leaseServer(mode: UpdateAnswerMode) {
  return fakeServer((req, from, sock) => {
    const opcode = (req.readUInt16BE(2) >> 11) & 0xf;
    if (opcode === 0) {
      // The lease record is absent: NOERROR, no answers.
      const q = dnsPacket.decode(req);
      sock.send(dnsPacket.encode({ type: "response", id: q.id, flags: dnsPacket.AUTHORITATIVE_ANSWER, questions: q.questions, answers: [] }), from.port, from.address);
      return;
    }
    // The request ends with its TSIG: ... MAC (32 bytes), original id, error, other length.
    const requestMac = req.subarray(req.length - 6 - 32, req.length - 6);
    const zoneEnd = 12 + wire("mailha.test").length + 4;
    const answer = Buffer.concat([header(req.readUInt16BE(0), RESPONSE_UPDATE, 1, 0, 0, 0), req.subarray(12, zoneEnd)]);
    const now = Math.floor(Date.now() / 1000);
    const out =
      mode === "unsigned" ? answer : mode === "wrong-key" ? signAnswer(answer, requestMac, Buffer.alloc(32, 9), now) : mode === "stale" ? signAnswer(answer, requestMac, SECRET, now - 3600) : signAnswer(answer, requestMac, SECRET, now);
    sock.send(out, from.port, from.address);
  });
}

function leaseConfig(port: number): MailhaConfig {
  const dir = mkdtempSync(join(tmpdir(), "mailha-lease-"));
  const keyFile = join(dir, "tsig.key");
  writeFileSync(keyFile, renderTsigKeyFile(KEY_NAME, SECRET), { mode: 0o600 });
  return { dns: { updates: true, server: "127.0.0.1", port, zone: "mailha.test", tsig_key_file: keyFile } } as unknown as MailhaConfig;
}

test("the DNS lease is held only with an answer the server signed over our request, in time", async () => {
  for (const mode of ["unsigned", "wrong-key", "stale", "signed"] as const) {
    const srv = await leaseServer(mode);
    try {
      const r = await takeLease(leaseConfig(srv.port), "a", 5000, Date.now(), { timeoutMs: 300, tries: 1 }).catch((err: Error) => ({ won: false, reason: err.message }));
      assert.equal(r.won, mode === "signed", `answer ${mode}: won=${r.won} (${r.reason})`);
    } finally {
      srv.close();
    }
  }
});
