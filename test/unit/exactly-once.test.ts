// The backup MX's drain is exactly-once. The trace field that carries its queue id is
// believed only on the first line of a message from the peer and removed from every
// message, however the message is cut into chunks; the delivered index reads the ids
// back from every node's delivery journal, within its stated bounds.
import { test } from "node:test";
import assert from "node:assert/strict";
import { appendFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { stripPeerField } from "../../services/smtp/backup-mx.ts";
import { DeliveredIndex } from "../../services/smtp/delivered-index.ts";
import { Journal, journalDir } from "../../services/smtp/journal.ts";
import { compareHlc } from "../../common/hlc.ts";

const ID = "1767000000000-0123456789ab";
const FIELD = `X-Mailha-Backup-Queue-Id: ${ID}\r\n`;

/** The filter's output and its queue id, the input fed in chunks of CHUNK bytes. */
async function filter(text: string, trusted: boolean, chunk = 1 << 16): Promise<{ out: string; id: string | null }> {
  const buf = Buffer.from(text, "latin1");
  const parts: Buffer[] = [];
  for (let i = 0; i < buf.length; i += chunk) parts.push(buf.subarray(i, i + chunk));
  const f = stripPeerField(Readable.from(parts, { objectMode: false }), trusted);
  const got: Buffer[] = [];
  for await (const c of f) got.push(c as Buffer);
  return { out: Buffer.concat(got).toString("latin1"), id: await f.queueId };
}

const body = "Subject: hello\r\nFrom: x@example.net\r\n\r\nX-Mailha-Backup-Queue-Id: this is body text\r\nbye\r\n";

test("from the peer, the field on the first line is the queue id and is not stored", async () => {
  for (const chunk of [1, 3, 7, 1 << 16]) {
    const r = await filter(FIELD + body, true, chunk);
    assert.equal(r.id, ID, `chunks of ${chunk}`);
    assert.equal(r.out, body, `chunks of ${chunk}: the field is gone, the body untouched`);
  }
});

test("anyone else's field is removed and names nothing, wherever it is in the header, folded or not", async () => {
  const forged = `Received: from somewhere\r\n${FIELD}Subject: hi\r\nx-mailha-backup-queue-id :\r\n\t${ID}\r\n folded on\r\nTo: a@b\r\n\r\n${FIELD}`;
  const want = `Received: from somewhere\r\nSubject: hi\r\nTo: a@b\r\n\r\n${FIELD}`;
  for (const chunk of [1, 5, 1 << 16]) {
    assert.deepEqual(await filter(forged, false, chunk), { out: want, id: null }, `untrusted, chunks of ${chunk}`);
    assert.deepEqual(await filter(forged, true, chunk), { out: want, id: null }, `from the peer but not on the first line, chunks of ${chunk}`);
  }
  assert.deepEqual(await filter(FIELD + body, false), { out: body, id: null }, "on the first line, but not from the peer");
  assert.deepEqual(await filter(`X-Mailha-Backup-Queue-Id: ../../etc\r\n${body}`, true), { out: body, id: null }, "a malformed id names nothing");
});

test("a long header line passes through without being held whole; a message without a blank line is all header", async () => {
  const long = `X-Long: ${"y".repeat(5000)}\r\n`;
  assert.deepEqual(await filter(long + FIELD + "\r\nbody\r\n", true, 100), { out: `${long}\r\nbody\r\n`, id: null });
  const longField = `X-Mailha-Backup-Queue-Id: ${"z".repeat(3000)}\r\n`;
  assert.deepEqual(await filter(longField + body, true, 100), { out: body, id: null }, "a long trace field is dropped whole");
  assert.deepEqual(await filter(`Subject: x\r\n${FIELD}`, false, 4), { out: "Subject: x\r\n", id: null });
  assert.deepEqual(await filter("", true), { out: "", id: null }, "an empty message");
});

test("the filter carries smtp-server's sizeExceeded flag", async () => {
  const src = Readable.from([Buffer.from(body)], { objectMode: false });
  src.once("end", () => ((src as Readable & { sizeExceeded?: boolean }).sizeExceeded = true));
  const f = stripPeerField(src, false);
  for await (const _ of f) {
    // drain
  }
  assert.equal((f as Readable & { sizeExceeded?: boolean }).sizeExceeded, true);
});

const entry = (mailbox: string, file: string, peerQueueId?: string) => ({ mailbox, file, sha256: "0".repeat(64), size: 10, ...(peerQueueId ? { peerQueueId } : {}) });

test("the index reads every node's journal: a message is delivered when all its mailboxes have it", async () => {
  const data = mkdtempSync(join(tmpdir(), "mailha-index-"));
  try {
    const a = new Journal(data, "a");
    await a.append([entry("alice@mailha.test", "1", "q-a1"), entry("bob@mailha.test", "2", "q-a1")]);
    await a.append([entry("carol@mailha.test", "3")]);
    await a.close();
    const b = new Journal(data, "b");
    await b.append([entry("alice@mailha.test", "4", "q-b1")]);
    await b.close();
    appendFileSync(join(journalDir(data), "deliveries-b.jsonl"), '{"id":"b:1:9","peerQueueId":"q-torn","mail'); // a crash in mid-write
    const ix = new DeliveredIndex(journalDir(data));
    const r = await ix.load();
    assert.equal(r.files, 2);
    assert.equal(r.ids, 2);
    assert.ok(r.hlcMax && /-b$/.test(r.hlcMax) && compareHlc(r.hlcMax, "0000000000000-00000-a") > 0, "the newest stamp at the journals' ends");
    assert.deepEqual(await ix.remaining("q-a1", ["alice@mailha.test", "bob@mailha.test"]), [], "delivered by a");
    assert.deepEqual(await ix.remaining("q-b1", ["alice@mailha.test"]), [], "delivered by b, read from b's journal");
    assert.deepEqual(await ix.remaining("q-a1", ["alice@mailha.test", "dave@mailha.test"]), ["dave@mailha.test"], "a mailbox it has not reached yet");
    assert.deepEqual(await ix.remaining("q-torn", ["alice@mailha.test"]), ["alice@mailha.test"], "a torn line was never acknowledged");
    ix.record("q-new", ["dave@mailha.test"]);
    assert.deepEqual(await ix.remaining("q-new", ["dave@mailha.test"]), [], "a new delivery counts at once");
    assert.equal(ix.claim("q-new"), true);
    assert.equal(ix.claim("q-new"), false, "one delivery of a message at a time");
    ix.release("q-new");
    assert.equal(ix.claim("q-new"), true);
  } finally {
    rmSync(data, { recursive: true, force: true });
  }
});

test("the index keeps at most its bound of ids (the newest), and reads only each journal's tail", async () => {
  const data = mkdtempSync(join(tmpdir(), "mailha-index-"));
  try {
    const j = new Journal(data, "a");
    for (let i = 0; i < 50; i++) await j.append([entry("alice@mailha.test", `f${i}`, `q${i}`)]);
    await j.close();
    const few = new DeliveredIndex(journalDir(data), 10);
    await few.load();
    assert.equal(few.size, 10);
    assert.deepEqual(await few.remaining("q49", ["alice@mailha.test"]), [], "the newest is kept");
    assert.deepEqual(await few.remaining("q0", ["alice@mailha.test"]), ["alice@mailha.test"], "the oldest is forgotten");
    few.record("q50", ["alice@mailha.test"]);
    assert.equal(few.size, 10, "recording stays within the bound");
    const tail = new DeliveredIndex(journalDir(data), 1000, 2000);
    const r = await tail.load();
    assert.ok(r.ids > 0 && r.ids < 50, `only the last 2000 bytes are read (${r.ids} ids)`);
    assert.deepEqual(await tail.remaining("q49", ["alice@mailha.test"]), []);
    const none = new DeliveredIndex(join(data, "no-such-dir"));
    assert.equal((await none.load()).files, 0, "no journal yet: nothing delivered");
  } finally {
    rmSync(data, { recursive: true, force: true });
  }
});
