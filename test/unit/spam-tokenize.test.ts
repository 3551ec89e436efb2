// The spam tokenizer: DSPAM's hash, OSB tokens of a known phrase, real-looking MIME
// (multipart, base64, quoted-printable, HTML, charsets), and the bounds: malformed
// MIME, a 20 MiB message and one of 100,000 tiny parts finish within the time budget
// or say why they stopped, never throw. Headers: other filters' verdicts and X-DSPAM-*
// skipped (a delivered message tokenizes as before), Received without its date, the
// whitelist token.
import { test } from "node:test";
import assert from "node:assert/strict";
import { DEFAULT_LIMITS, ignoredHeading, osbTokens, stripHtml, tokenHash, tokenize, whitelistTokenName } from "../../services/spam/tokenize.ts";

/** DSPAM's _ds_getcrc64 written the slow, obvious way (BigInt, bit by bit). */
function referenceCrc64(s: string): string {
  const poly = 0xd800000000000000n;
  const table: bigint[] = [];
  for (let i = 0; i < 256; i++) {
    let part = BigInt(i);
    for (let j = 0; j < 8; j++) part = part & 1n ? (part >> 1n) ^ poly : part >> 1n;
    table.push(part);
  }
  let crc = 0n;
  for (const b of Buffer.from(s, "utf8")) crc = (crc >> 8n) ^ table[Number((crc ^ BigInt(b)) & 0xffn)]!;
  return crc.toString();
}

const names = async (msg: string | Buffer) => new Set([...(await tokenize(Buffer.from(msg))).tokens.values()].map((t) => t.name));

test("the token hash is DSPAM's CRC-64 (ASCII and UTF-8 bytes)", () => {
  for (const s of ["a", "hello", "Subject*free", "free+#+money", "Url*www", "héllo wörld", "x".repeat(300)]) assert.equal(tokenHash(s), referenceCrc64(s), s);
  assert.equal(tokenHash(""), "0");
});

test("OSB tokens of a known phrase: each word and its sparse bigrams with the next four", () => {
  assert.deepEqual(osbTokens(["the", "quick", "brown", "fox", "jumps", "over"]), [
    "the", "the+quick", "the+#+brown", "the+#+#+fox", "the+#+#+#+jumps",
    "quick", "quick+brown", "quick+#+fox", "quick+#+#+jumps", "quick+#+#+#+over",
    "brown", "brown+fox", "brown+#+jumps", "brown+#+#+over",
    "fox", "fox+jumps", "fox+#+over",
    "jumps", "jumps+over",
    "over",
  ]);
  assert.deepEqual(osbTokens(["a", "b"], "Subject*"), ["Subject*a", "Subject*a+b", "Subject*b"]);
});

test("headers are prefixed by their name; X-DSPAM-* is skipped; encoded words decoded", async () => {
  const n = await names("From: Bob <bob@example.com>\r\nSubject: =?utf-8?B?R3LDvMOfZSBhdXM=?=\r\nX-DSPAM-Result: Spam\r\n\r\nhi\r\n");
  assert.ok(n.has("From*Bob"));
  assert.ok(n.has("From*bob+example.com"));
  assert.ok(n.has("Subject*Grüße+aus"));
  assert.ok(![...n].some((x) => x.startsWith("X-DSPAM-")));
  assert.ok(n.has("hi"));
});

test("multipart: quoted-printable Latin-1, base64 HTML with tags stripped and URLs as Url* tokens; attachments skipped", async () => {
  const html = Buffer.from('<html><style>p{color:red}</style><p>Buy <b>cheap</b> pills &amp; more <a href="http://spam.example/offer">now</a></p></html>').toString("base64");
  const msg = [
    "From: a@b.example", "Subject: offer", "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="OUT"', "",
    "--OUT", 'Content-Type: multipart/alternative; boundary="IN"', "",
    "--IN", "Content-Type: text/plain; charset=iso-8859-1", "Content-Transfer-Encoding: quoted-printable", "", "Caf=E9 cr=E8me br=FBl=E9e", "",
    "--IN", "Content-Type: text/html; charset=utf-8", "Content-Transfer-Encoding: base64", "", html, "",
    "--IN--",
    "--OUT", "Content-Type: text/plain", "Content-Disposition: attachment; filename=x.txt", "", "secretattachmentword", "",
    "--OUT", "Content-Type: text/plain; charset=koi8-r", "Content-Transfer-Encoding: base64", "", Buffer.from([0xf0, 0xd2, 0xc9, 0xd7, 0xc5, 0xd4]).toString("base64"), "",
    "--OUT--", "",
  ].join("\r\n");
  const t = await tokenize(Buffer.from(msg));
  assert.deepEqual(t.reasons, []);
  const n = new Set([...t.tokens.values()].map((x) => x.name));
  for (const w of ["Café", "crème", "brûlée", "Buy", "cheap", "pills", "Buy+cheap", "Url*http", "Url*//spam", "Привет"]) assert.ok(n.has(w), w);
  assert.ok(!n.has("color"), "style content is not text");
  assert.ok(!n.has("secretattachmentword"), "attachments are not tokenized");
  assert.ok(!n.has("b"), "tags are not text");
});

test("stripHtml keeps link addresses and decodes entities", () => {
  assert.equal(stripHtml('<a href="http://x.example/">A&nbsp;&lt;b&gt;</a>').replace(/\s+/g, " ").trim(), "http://x.example/ A <b>");
  assert.equal(stripHtml("1 < 2 <!-- hidden --> ok").replace(/\s+/g, " "), "1 < 2 ok");
});

test("malformed MIME never throws: missing boundary, bad base64, truncated headers, binary junk", async () => {
  const cases = [
    "Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\nfoo",
    "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!@@@###not base64 at all",
    "Subject: no body and no blank line",
    "Content-Type: multipart/mixed; boundary=A\r\n\r\n--A\r\nContent-Type: multipart/mixed; boundary=A\r\n\r\n--A\r\n--A--",
    "Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nhello there",
    "",
  ];
  for (const c of cases) {
    const t = await tokenize(Buffer.from(c));
    assert.ok(t.tokens instanceof Map);
  }
  const junk = Buffer.alloc(300_000);
  for (let i = 0; i < junk.length; i++) junk[i] = (i * 7919) & 0xff;
  const t = await tokenize(junk);
  assert.ok(t.tokens.size >= 0);
  const h = await tokenize(Buffer.from("Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nhello there"));
  assert.ok([...h.tokens.values()].some((x) => x.name === "hello+there"));
});

test("a 20 MiB message finishes within the bound and says it was truncated", async () => {
  const line = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor\r\n";
  const big = Buffer.from(`Subject: big\r\nContent-Type: text/plain\r\n\r\n${line.repeat(Math.ceil((20 * 1024 * 1024) / line.length))}`);
  assert.ok(big.length >= 20 * 1024 * 1024);
  const t0 = Date.now();
  const t = await tokenize(big);
  const ms = Date.now() - t0;
  assert.ok(ms < DEFAULT_LIMITS.time_budget_ms + 1500, `took ${ms} ms`);
  assert.ok(t.reasons.includes("input-truncated"));
  assert.ok(t.bytesRead <= DEFAULT_LIMITS.input_bytes_max);
  assert.ok(t.tokens.size > 0);
});

test("a message of 100,000 tiny parts stops at the parts bound", async () => {
  const parts: string[] = ["Subject: parts", "Content-Type: multipart/mixed; boundary=B", ""];
  for (let i = 0; i < 100_000; i++) parts.push("--B", "Content-Type: text/plain", "", `w${i}`);
  parts.push("--B--", "");
  const msg = Buffer.from(parts.join("\r\n"));
  const t0 = Date.now();
  const t = await tokenize(msg, { ...DEFAULT_LIMITS, input_bytes_max: msg.length });
  const ms = Date.now() - t0;
  assert.ok(ms < DEFAULT_LIMITS.time_budget_ms + 1500, `took ${ms} ms`);
  assert.ok(t.reasons.includes("parts-limit") || t.reasons.includes("time-limit"), `reasons ${t.reasons.join(",")}`);
  assert.ok(t.parts <= DEFAULT_LIMITS.parts_max + 1);
});

test("a stream input is read only up to the bound", async () => {
  async function* gen() {
    yield Buffer.from("Subject: s\r\n\r\n");
    for (let i = 0; i < 1000; i++) yield Buffer.from("word ".repeat(2000));
  }
  const t = await tokenize(gen(), { ...DEFAULT_LIMITS, input_bytes_max: 100_000 });
  assert.ok(t.reasons.includes("input-truncated"));
  assert.ok(t.bytesRead <= 100_000);
});

test("other filters' verdicts and a mail client's flags are not tokens (X-Spam-*, X-Virus-*, X-Keywords, Status, ...)", async () => {
  const leaks = [
    "X-Spam-Status: Yes, hits=12.3 required=5.0 tests=BAYES_99",
    "X-Spam-Level: ************",
    "X-Spam-Flag: YES",
    "X-Spam-Checker-Version: SpamAssassin 2.40",
    "X-Spam: high",
    "X-Virus-Scanned: by amavisd-milter",
    "X-Bogosity: Spam, tests=bogofilter",
    "X-MailScanner-SpamCheck: spam, SpamAssassin (score=9)",
    "X-Keywords: Junk",
    "X-Status: RO",
    "Status: RO",
    "X-UID: 42",
    "X-Mozilla-Status: 0001",
  ];
  const n = await names(`From: a@b.example\r\nSubject: hello\r\n${leaks.join("\r\n")}\r\n\r\nbody\r\n`);
  for (const l of leaks) {
    const heading = l.slice(0, l.indexOf(":"));
    assert.ok(![...n].some((x) => x.startsWith(`${heading}*`)), `${heading} was tokenized`);
  }
  assert.ok(n.has("Subject*hello"));
  assert.ok(n.has("body"));
});

test("a delivered message (with mailha's X-DSPAM-* fields) gives exactly the tokens it gave before delivery", async () => {
  const before = "Return-Path: <x@y.example>\r\nFrom: \"Bob\" <bob@example.com>\r\nTo: u@mailha.test\r\nSubject: lunch?\r\nContent-Type: text/plain\r\n\r\nshall we meet at noon\r\n";
  const dspam = "X-DSPAM-Result: Innocent\r\nX-DSPAM-Processed: Wed, 02 Dec 2026 10:00:00 GMT\r\nX-DSPAM-Confidence: 0.9900\r\nX-DSPAM-Probability: 0.0023\r\nX-DSPAM-Signature: 1,674d8a1b2c3d4e5f6a7b\r\n";
  const i = before.indexOf("Subject:");
  const delivered = before.slice(0, i) + dspam + before.slice(i);
  const a = await tokenize(Buffer.from(before));
  const b = await tokenize(Buffer.from(delivered));
  assert.deepEqual([...b.tokens.entries()].sort(), [...a.tokens.entries()].sort());
});

test("Received: relays and addresses are tokens, the trailing date is not; the From line is the whitelist token", async () => {
  const n = await names("Received: from mx.example.org (mx.example.org [192.0.2.7])\r\n\tby mail.mailha.test with ESMTP id ABC123; Tue, 3 Sep 2002 15:02:38 -0500\r\nFrom: Bob Smith <bob@example.com>\r\n\r\nhi\r\n");
  assert.ok(n.has("Received*mx.example.org"));
  assert.ok(n.has("Received*192.0.2.7"));
  assert.ok(n.has("Received*ESMTP"));
  assert.ok(![...n].some((x) => /^Received\*.*(Sep|15\+02|-0500)/.test(x)), "the date of a Received field is not tokenized");
  assert.equal(whitelistTokenName(" Bob Smith <bob@example.com>"), "From*Bob Smith <bob@example.com>");
  assert.ok(n.has("From*Bob Smith <bob@example.com>"));
  assert.ok(n.has("From*Bob+Smith"));
  // Only the message's own From, once (not a From of an attached message's header).
  const fwd = await names('From: a@b.example\r\nContent-Type: multipart/mixed; boundary="Z"\r\n\r\n--Z\r\nContent-Type: text/plain\r\nFrom: c@d.example\r\n\r\nx\r\n--Z--\r\n');
  assert.ok(fwd.has("From*a@b.example"));
  assert.ok(!fwd.has("From*c@d.example"));
  assert.ok(ignoredHeading("x-dspam-result") && ignoredHeading("X-Spam-Status") && !ignoredHeading("X-Mailer") && !ignoredHeading("Subject"));
});
