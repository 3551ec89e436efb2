// The trace fields on a delivered message: the Received field's `for` names the
// recipient of a one-recipient message and nobody in a message for several (so that a
// Bcc recipient is not shown to the others).
import { test } from "node:test";
import assert from "node:assert/strict";
import { traceFields } from "../../services/smtp/trace.ts";

const base = { from: "x@example.net", helo: "client.example", remoteAddress: "192.0.2.7", by: "mx1.mailha.test", protocol: "ESMTP", id: "abc123", date: new Date(Date.UTC(2026, 11, 1, 12, 0, 0)) };

test("one recipient: named in the Received field", () => {
  assert.equal(
    traceFields({ ...base, rcpts: ["alice@mailha.test"] }),
    "Return-Path: <x@example.net>\r\nReceived: from client.example ([192.0.2.7])\r\n\tby mx1.mailha.test (mailha) with ESMTP id abc123\r\n\tfor <alice@mailha.test>; Tue, 01 Dec 2026 12:00:00 +0000\r\n",
  );
});

test("several recipients (some of them Bcc): none is named", () => {
  const t = traceFields({ ...base, rcpts: ["alice@mailha.test", "hidden@mailha.test"] });
  assert.equal(t, "Return-Path: <x@example.net>\r\nReceived: from client.example ([192.0.2.7])\r\n\tby mx1.mailha.test (mailha) with ESMTP id abc123; Tue, 01 Dec 2026 12:00:00 +0000\r\n");
  assert.ok(!t.includes("hidden"));
});

test("no HELO name: unknown; the null sender: an empty Return-Path", () => {
  assert.match(traceFields({ ...base, from: "", helo: false, rcpts: ["a@b"] }), /^Return-Path: <>\r\nReceived: from unknown \(\[192\.0\.2\.7\]\)/);
});
