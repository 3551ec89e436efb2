import { test } from "node:test";
import assert from "node:assert/strict";
import { Readable } from "node:stream";
import { closeSync, mkdtempSync, openSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { completeHeaders, SCAN_MAX_BYTES } from "../../services/smtp/submission-headers.ts";
import { copyChecked } from "../../services/smtp/maildir.ts";

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

test("an empty header gets the fields before its blank line; a message not starting with a field is left alone", async () => {
  assert.equal(await through("\r\nbody after an empty header\r\n"), `Date: ${add.date()}\r\nMessage-ID: ${add.messageId()}\r\n\r\nbody after an empty header\r\n`);
  for (const odd of ["just text, no header\r\nsecond line\r\n", "From bob@mailha.test Sun Nov 22 09:00:00 2026\r\nSubject: s\r\n\r\nb\r\n", "Bad Name: x\r\n\r\nb\r\n"]) {
    assert.equal(await through(odd), odd, JSON.stringify(odd.slice(0, 20)));
  }
});

test("the size limit counts the client's bytes, not the prepended trace fields or the added ones", async () => {
  const dir = mkdtempSync(join(tmpdir(), "mailha-size-"));
  try {
    const msg = "Subject: s\r\n\r\n" + "x".repeat(100) + "\r\n"; // no Date, no Message-ID
    const trace = "Received: from test\r\n";
    const copy = async (limit: number) => {
      const fd = openSync(join(dir, `m${limit}`), "w");
      try {
        return await copyChecked(completeHeaders(Readable.from([Buffer.from(msg)]), add), fd, trace, limit);
      } finally {
        closeSync(fd);
      }
    };
    const r = await copy(msg.length);
    assert.equal(r.size, trace.length + `Date: ${add.date()}\r\nMessage-ID: ${add.messageId()}\r\n`.length + msg.length, "the file holds all of it");
    await assert.rejects(copy(msg.length - 1), (e: { responseCode?: number }) => e.responseCode === 552);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
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
