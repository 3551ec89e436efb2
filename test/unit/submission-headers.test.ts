import { test } from "node:test";
import assert from "node:assert/strict";
import { Readable } from "node:stream";
import { completeHeaders, SCAN_MAX_BYTES } from "../../services/smtp/submission-headers.ts";

const add = { date: () => "Sun, 22 Nov 2026 09:00:00 +0000", messageId: () => "<id-1@mx1.mailha.test>" };

/** Feeds MESSAGE in chunks of CHUNK bytes through completeHeaders; returns the output. */
async function through(message: string, chunk = 7): Promise<string> {
  const parts: Buffer[] = [];
  const buf = Buffer.from(message, "latin1");
  for (let i = 0; i < buf.length; i += chunk) parts.push(buf.subarray(i, i + chunk));
  const out: Buffer[] = [];
  for await (const b of completeHeaders(Readable.from(parts), add)) out.push(b as Buffer);
  return Buffer.concat(out).toString("latin1");
}

test("adds Date and Message-ID when the header lacks them, above the header, body untouched", async () => {
  const msg = "From: bob@mailha.test\r\nSubject: hi\r\n\r\nbody line\r\n";
  for (const chunk of [1, 7, 4096]) {
    assert.equal(await through(msg, chunk), `Date: ${add.date()}\r\nMessage-ID: ${add.messageId()}\r\n${msg}`);
  }
});

test("keeps a message that has both as it is, whatever their case; adds only what is missing", async () => {
  const both = "DATE: Sat, 21 Nov 2026 10:00:00 +0000\r\nmessage-id: <x@y>\r\n\r\nDate: in the body\r\n";
  assert.equal(await through(both), both);
  const noId = "Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nSubject: s\r\n\r\nb\r\n";
  assert.equal(await through(noId), `Message-ID: ${add.messageId()}\r\n${noId}`);
});

test("a field only in the body does not count; a header without body still gets the fields", async () => {
  const msg = "Subject: s\r\n\r\nMessage-ID: <not-a-header@x>\r\nDate: no\r\n";
  assert.equal(await through(msg), `Date: ${add.date()}\r\nMessage-ID: ${add.messageId()}\r\n${msg}`);
  assert.equal(await through("Subject: only a header\r\n"), `Date: ${add.date()}\r\nMessage-ID: ${add.messageId()}\r\nSubject: only a header\r\n`);
});

test("a message that starts with its body gets an empty-line separator after the added fields", async () => {
  assert.equal(await through("just text, no header\r\nsecond line\r\n"), `Date: ${add.date()}\r\nMessage-ID: ${add.messageId()}\r\n\r\njust text, no header\r\nsecond line\r\n`);
  assert.equal(await through("\r\nbody after an empty header\r\n"), `Date: ${add.date()}\r\nMessage-ID: ${add.messageId()}\r\n\r\nbody after an empty header\r\n`);
});

test("a header too large to scan is passed on unchanged, however it is cut in chunks", async () => {
  const big = `X-Big: ${"a".repeat(SCAN_MAX_BYTES + 10)}\r\nSubject: s\r\n\r\nb\r\n`;
  for (const chunk of [4096, 65536, 200_000]) assert.ok((await through(big, chunk)) === big, `unchanged with ${chunk}-byte chunks`);
  assert.ok((await through(`X-Big: ${"a".repeat(SCAN_MAX_BYTES + 10)}\r\n`, 4096)).startsWith("X-Big: "), "a long header without body too");
  const fits = `X-Big: ${"a".repeat(SCAN_MAX_BYTES - 100)}\r\n\r\nb\r\n`;
  for (const chunk of [4096, 200_000]) assert.ok((await through(fits, chunk)).startsWith("Date: "), `scanned with ${chunk}-byte chunks when it fits`);
});

test("the source's error ends the result with it", async () => {
  const src = new Readable({ read() {} });
  const out = completeHeaders(src, add);
  src.push(Buffer.from("Subject: s\r\n"));
  setImmediate(() => src.destroy(new Error("client went away")));
  await assert.rejects(async () => {
    for await (const _ of out) void _;
  }, /client went away/);
});
