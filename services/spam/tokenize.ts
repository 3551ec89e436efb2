// The spam filter's tokenizer: a message in, its DSPAM tokens out (64-bit hashes with
// their frequency), bounded. Headers become `Heading*word` tokens (one window per
// physical line; the verdicts of filters skipped, see `ignoredHeading`: X-DSPAM-*,
// which mailha adds at delivery, so a delivered message gives the tokens it gave
// before, and other filters' X-Spam-*, X-Virus-*, ... which a filter must not learn
// from; a Received field without its trailing `; date`), the whole first From line
// once more as DSPAM's whitelist token (`From*Bob <bob@example.com>`, see
// `whitelistTokenName`), decoded text parts (text/plain, text/html with
// its tags stripped, base64 and quoted-printable undone, charsets through iconv-lite)
// become body tokens; URLs become `Url*part` tokens as DSPAM's ProcessorURLContext.
// Each word gives itself (a unigram, as DSPAM's `word` tokenizer) and its Orthogonal
// Sparse Bigrams with the next four words (`a+b`, `a+#+c`, `a+#+#+d`, `a+#+#+#+e`,
// as DSPAM's `osb` tokenizer). Hash: DSPAM's `_ds_getcrc64` (CRC-64, reflected
// polynomial 0xd800000000000000, initial value 0, no final xor) over the token's
// UTF-8 bytes, so ASCII tokens hash exactly as imported DSPAM data does (DSPAM did
// not convert charsets: a non-ASCII token of a non-UTF-8 message hashes differently).
// Guarantee: `tokenize` never throws and never runs past its limits (input bytes, text
// bytes, MIME parts, distinct tokens, a time budget): it returns what it got and, when
// it stopped early or the MIME was broken, a reason.
import type { Readable } from "node:stream";
import { createRequire } from "node:module";
import { Splitter } from "@zone-eu/mailsplit";
import iconv from "iconv-lite";

const require = createRequire(import.meta.url);
const libqp = require("libqp") as { decode(s: string): Buffer };
const libmime = require("libmime") as { decodeWords(s: string): string };

export interface TokenizeLimits {
  /** Raw bytes of the message read at most (the rest is not looked at). */
  readonly input_bytes_max: number;
  /** Decoded body text analysed at most (UTF-16 code units). */
  readonly text_chars_max: number;
  /** MIME parts looked at most. */
  readonly parts_max: number;
  /** Header lines tokenized at most (all parts together). */
  readonly header_lines_max: number;
  /** Distinct tokens kept at most (each one is a row read at classification). */
  readonly tokens_max: number;
  /** Wall-clock budget for parsing and tokenizing. */
  readonly time_budget_ms: number;
}

export const DEFAULT_LIMITS: TokenizeLimits = {
  input_bytes_max: 4 * 1024 * 1024,
  text_chars_max: 512 * 1024,
  parts_max: 1000,
  header_lines_max: 1000,
  tokens_max: 40_000,
  time_budget_ms: 2000,
};

/** Why the tokenizer stopped before the end or what was wrong with the message. */
export type TokenizeReason = "input-truncated" | "text-truncated" | "parts-limit" | "header-lines-limit" | "tokens-limit" | "time-limit" | "mime-error";

export interface Token {
  /** The token's name as DSPAM writes it (`Subject*free`, `free+#+money`). */
  readonly name: string;
  frequency: number;
}

export interface Tokenized {
  /** Token hash (unsigned 64-bit, decimal) -> name and frequency. */
  readonly tokens: Map<string, Token>;
  readonly reasons: TokenizeReason[];
  /** A short description of a MIME error, when there was one. */
  readonly error?: string;
  readonly parts: number;
  readonly bytesRead: number;
  readonly textChars: number;
}

// ---- the hash -------------------------------------------------------------------

const CRC_HI = new Uint32Array(256);
const CRC_LO = new Uint32Array(256);
{
  const poly = 0xd800000000000000n;
  for (let i = 0; i < 256; i++) {
    let part = BigInt(i);
    for (let j = 0; j < 8; j++) part = part & 1n ? (part >> 1n) ^ poly : part >> 1n;
    CRC_HI[i] = Number(part >> 32n);
    CRC_LO[i] = Number(part & 0xffffffffn);
  }
}

const utf8 = new TextEncoder();

/** DSPAM's `_ds_getcrc64` of BYTES as (high, low) 32-bit halves. */
function crc64Parts(bytes: Uint8Array): [number, number] {
  let hi = 0;
  let lo = 0;
  for (let k = 0; k < bytes.length; k++) {
    const t = (lo ^ bytes[k]!) & 0xff;
    lo = ((lo >>> 8) | (hi << 24)) ^ CRC_LO[t]!;
    hi = (hi >>> 8) ^ CRC_HI[t]!;
  }
  return [hi >>> 0, lo >>> 0];
}

/** DSPAM's token hash of NAME (its UTF-8 bytes), as an unsigned decimal string. */
export function tokenHash(name: string): string {
  let hi = 0;
  let lo = 0;
  let ascii = true;
  for (let k = 0; k < name.length; k++) {
    const c = name.charCodeAt(k);
    if (c >= 128) {
      ascii = false;
      break;
    }
    const t = (lo ^ c) & 0xff;
    lo = ((lo >>> 8) | (hi << 24)) ^ CRC_LO[t]!;
    hi = (hi >>> 8) ^ CRC_HI[t]!;
  }
  if (!ascii) [hi, lo] = crc64Parts(utf8.encode(name));
  return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString();
}

// ---- words ----------------------------------------------------------------------

/** DSPAM's SPARSE_DELIMITERS (body) and SPARSE_DELIMITERS_HEADING (headers). */
const BODY_DELIMS = delimiterTable(" .,;:\"/\\[]}{=+_()<>|&\n\t\r@-*~`?#$%^");
const HEADER_DELIMS = delimiterTable(" ,;:\"/\\[]}{=+()<>|&\n\t\r@*~`?#$%^");
/** DSPAM's DELIMITERS, used to cut URLs into their parts. */
const URL_DELIMS = delimiterTable(" .,;:\n\t\r@-+*");
/** DSPAM drops words of 50 bytes or more; we count UTF-16 units (the same for ASCII). */
const WORD_LENGTH_MAX = 49;
const OSB_WINDOW = 5;

function delimiterTable(chars: string): Uint8Array {
  const t = new Uint8Array(128);
  for (const c of chars) t[c.charCodeAt(0)] = 1;
  return t;
}

/** The words of TEXT between DELIMS, 1..49 characters, at most WORDS_MAX of them. */
export function splitWords(text: string, delims: Uint8Array, wordsMax = Number.MAX_SAFE_INTEGER): string[] {
  const out: string[] = [];
  let start = -1;
  for (let i = 0; i <= text.length; i++) {
    const c = i < text.length ? text.charCodeAt(i) : 32;
    const isDelim = c < 128 && delims[c] === 1;
    if (isDelim) {
      if (start >= 0) {
        const len = i - start;
        if (len <= WORD_LENGTH_MAX) {
          out.push(text.slice(start, i));
          if (out.length >= wordsMax) return out;
        }
        start = -1;
      }
    } else if (start < 0) start = i;
  }
  return out;
}

/** Collects tokens, bounded by a count of distinct tokens. */
class TokenSink {
  readonly tokens = new Map<string, Token>();
  /** The whitelist token was made (from the first From field of the top header). */
  fromSeen = false;
  full = false;
  timedOut = false;
  private adds = 0;
  constructor(
    private readonly max: number,
    private readonly deadlineMs: number,
  ) {}
  add(name: string): void {
    if (++this.adds % 4096 === 0 && Date.now() > this.deadlineMs) {
      this.full = true;
      this.timedOut = true;
    }
    if (this.full) return;
    const h = tokenHash(name);
    const t = this.tokens.get(h);
    if (t) t.frequency++;
    else if (this.tokens.size < this.max) this.tokens.set(h, { name, frequency: 1 });
    else this.full = true;
  }
}

/**
 * Every word of WORDS as a unigram, and its sparse bigrams with the next four
 * (`w0+w1`, `w0+#+w2`, `w0+#+#+w3`, `w0+#+#+#+w4`), each prefixed with PREFIX
 * (only those of the first FIRST_WORDS words).
 */
export function osbTokens(words: readonly string[], prefix = "", firstWords = words.length): string[] {
  const out: string[] = [];
  for (let i = 0; i < Math.min(firstWords, words.length); i++) {
    const w = words[i]!;
    out.push(prefix + w);
    let gap = "";
    for (let d = 1; d < OSB_WINDOW && i + d < words.length; d++) {
      out.push(`${prefix}${w}+${gap}${words[i + d]!}`);
      gap += "#+";
    }
  }
  return out;
}

/** Adds the tokens of WORDS to SINK, a window of words at a time (bounded by the sink). */
function addWords(sink: TokenSink, words: readonly string[], prefix: string): void {
  for (let i = 0; i < words.length && !sink.full; i++) {
    for (const t of osbTokens(words.slice(i, i + OSB_WINDOW), prefix, 1)) sink.add(t);
  }
}

// ---- headers --------------------------------------------------------------------

/** A header field's raw text ("binary" string from mailsplit) as Unicode. */
function headerText(line: string): string {
  const b = Buffer.from(line, "binary");
  const s = b.toString("utf8");
  return s.includes("\ufffd") ? b.toString("latin1") : s;
}

/**
 * Header fields whose words are never tokens: verdicts of filters and the state of
 * the mail client that kept the message, not the message itself. A filter that
 * learned them would learn another filter's decision (an X-Spam-Status: Yes is the
 * label, not a property of the mail) or, for X-DSPAM-*, its own: mailha adds X-DSPAM-*
 * at delivery, and retraining a delivered message must see the tokens the
 * classification saw. DSPAM skips X-DSPAM-* and what its `IgnoreHeader` lines name;
 * this list is those lines' usual content (dspam.conf's examples: X-Spam-Status,
 * X-Spam-Scanned, X-Virus-Scanner-Result, ...) made a rule:
 * - X-DSPAM-*, X-Spam-* (SpamAssassin's Status, Level, Flag, Checker-Version, Report;
 *   also the bare X-Spam), X-Bogosity (bogofilter), X-Razor*, X-Pyzor*, X-SpamCop-*,
 *   X-*SpamCheck* and X-MailScanner* (MailScanner), X-Junk*;
 * - X-Virus-*, X-Antivirus*, X-AV-* (virus scanners' verdicts);
 * - Status, X-Status, X-Keywords, X-UID, X-Mozilla-Status* (a mail client's flags and
 *   keywords of the mailbox it was kept in; the SpamAssassin corpus carries them
 *   from its collectors' mailboxes, mostly in one class, so they leak the label).
 */
const IGNORED_HEADING = /^(?:x-dspam-|x-spam|x-bogosity|x-razor|x-pyzor|x-spamcop|x-[a-z0-9-]*spamcheck|x-mailscanner|x-junk|x-virus|x-antivirus|x-av-|status$|x-status$|x-keywords$|x-uid$|x-mozilla-status)/i;

/** True when the words of header field HEADING are not tokenized (see IGNORED_HEADING). */
export function ignoredHeading(heading: string): boolean {
  return IGNORED_HEADING.test(heading);
}

/**
 * DSPAM's auto-whitelist token (`Feature whitelist`): `From*` and the From field's
 * first line as written (one leading space dropped), at most 255 characters, as
 * DSPAM's tokenizer makes it (so its hash is DSPAM's for the same line). The
 * classifier whitelists a message whose token has been learned innocent often
 * enough (classify.ts). Words have no spaces or `<@>"` in them, so the name does not
 * collide with a `From*word` token unless the line is a single bare word.
 */
export function whitelistTokenName(fromValue: string): string {
  const line = (fromValue.startsWith(" ") ? fromValue.slice(1) : fromValue).split(/\r?\n/, 1)[0] ?? "";
  return `From*${line.replace(/\r$/, "")}`.slice(0, 255);
}

/**
 * The tokens of one header field LINE (folded lines included), DSPAM-style.
 * Received: the trailing `; date-time` (RFC 5322 3.6.7) is left out: the relays,
 * addresses and software are what the field says about the mail; its timestamps
 * make hour-and-minute tokens that only tell when a corpus was collected (and tie
 * with real evidence in the significance order). TOP: the message's own header (the
 * whitelist token is made from its first From field only).
 */
function addHeaderField(sink: TokenSink, field: string, top: boolean): number {
  const colon = field.indexOf(":");
  if (colon <= 0) return 0;
  const heading = field.slice(0, colon);
  if (/[ \t]/.test(heading) || ignoredHeading(heading)) return 0;
  let value = field.slice(colon + 1);
  if (top && heading === "From" && !sink.fromSeen) {
    sink.fromSeen = true;
    sink.add(whitelistTokenName(value));
  }
  if (heading.toLowerCase() === "received") {
    const semi = value.lastIndexOf(";");
    if (semi >= 0) value = value.slice(0, semi);
  }
  if (/=\?[^?]+\?[bBqQ]\?/.test(value)) {
    try {
      value = libmime.decodeWords(value);
    } catch {
      // keep the raw value
    }
  }
  const lines = value.split(/\r?\n/);
  for (const l of lines) addWords(sink, splitWords(l, HEADER_DELIMS), `${heading}*`);
  return lines.length;
}

// ---- bodies ---------------------------------------------------------------------

const ENTITIES: Record<string, string> = {
  nbsp: " ", amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", copy: "\u00a9", reg: "\u00ae", trade: "\u2122",
  euro: "\u20ac", pound: "\u00a3", yen: "\u00a5", cent: "\u00a2", hellip: "\u2026", mdash: "\u2014", ndash: "\u2013",
  laquo: "\u00ab", raquo: "\u00bb", middot: "\u00b7", bull: "\u2022", rsquo: "\u2019", lsquo: "\u2018", ldquo: "\u201c", rdquo: "\u201d",
};

function decodeEntities(s: string): string {
  return s.replace(/&(#x[0-9a-f]{1,6}|#[0-9]{1,7}|[a-z]{2,8});/gi, (m, e: string) => {
    if (e[0] === "#") {
      const n = e[1] === "x" || e[1] === "X" ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10);
      return n > 0 && n <= 0x10ffff ? String.fromCodePoint(n) : " ";
    }
    return ENTITIES[e.toLowerCase()] ?? m;
  });
}

/**
 * HTML as DSPAM's `_ds_strip_html` leaves it: tags removed (script and style with
 * their content, comments too), the addresses of href/src/action attributes kept as
 * text, entities decoded. Linear: no backtracking regular expression on the input.
 */
export function stripHtml(html: string): string {
  const out: string[] = [];
  let i = 0;
  const n = html.length;
  while (i < n) {
    const lt = html.indexOf("<", i);
    if (lt < 0) {
      out.push(html.slice(i));
      break;
    }
    out.push(html.slice(i, lt));
    const next = html.charCodeAt(lt + 1);
    const isTag = (next >= 65 && next <= 90) || (next >= 97 && next <= 122) || next === 47 || next === 33;
    if (!isTag) {
      out.push("<");
      i = lt + 1;
      continue;
    }
    if (html.startsWith("<!--", lt)) {
      const end = html.indexOf("-->", lt + 4);
      i = end < 0 ? n : end + 3;
      out.push(" ");
      continue;
    }
    const gt = html.indexOf(">", lt);
    const tag = html.slice(lt, gt < 0 ? n : gt + 1);
    i = gt < 0 ? n : gt + 1;
    const name = /^<\/?([a-zA-Z0-9]{1,10})/.exec(tag)?.[1]?.toLowerCase() ?? "";
    if ((name === "script" || name === "style") && tag[1] !== "/") {
      const end = html.toLowerCase().indexOf(`</${name}`, i);
      i = end < 0 ? n : end;
      out.push(" ");
      continue;
    }
    const url = /\s(?:href|src|action|background)\s*=\s*(?:"([^"]{0,2000})"|'([^']{0,2000})'|([^\s>]{1,2000}))/i.exec(tag);
    out.push(" ");
    if (url) out.push(`${url[1] ?? url[2] ?? url[3] ?? ""} `);
  }
  return decodeEntities(out.join(""));
}

/** DSPAM's ProcessorURLContext: `Url*` tokens for each URL, blanked out of TEXT. */
function takeUrls(sink: TokenSink, text: string): string {
  return text.replace(/(?:https?:\/\/|www\.)[^\s<>"']{1,2000}/gi, (url) => {
    for (const part of splitWords(url, URL_DELIMS, 200)) sink.add(`Url*${part}`);
    return " ";
  });
}

/** Bytes of a part's body, transfer-decoded. */
function transferDecode(raw: Buffer, encoding: string): Buffer {
  try {
    if (encoding === "base64") return Buffer.from(raw.toString("latin1").replace(/[^A-Za-z0-9+/=]/g, ""), "base64");
    if (encoding === "quoted-printable") return libqp.decode(raw.toString("latin1"));
  } catch {
    // fall through: the raw bytes
  }
  return raw;
}

/** BYTES in CHARSET as Unicode (UTF-8 when unknown, Latin-1 when that fails). */
function charsetDecode(bytes: Buffer, charset: string): string {
  const cs = charset.trim().toLowerCase().replace(/^"|"$/g, "");
  try {
    if (cs && cs !== "us-ascii" && cs !== "utf-8" && cs !== "utf8" && iconv.encodingExists(cs)) return iconv.decode(bytes, cs);
  } catch {
    // fall through
  }
  const s = bytes.toString("utf8");
  return s.includes("\ufffd") && !cs.startsWith("utf") ? bytes.toString("latin1") : s;
}

// ---- the message ----------------------------------------------------------------

export type MessageInput = Buffer | Readable | AsyncIterable<Buffer | string>;

/** Reads at most MAX bytes of INPUT (a stream is left where it was stopped). */
export async function readBounded(input: MessageInput, max: number, deadlineMs: number): Promise<{ buf: Buffer; truncated: boolean; timedOut: boolean }> {
  if (Buffer.isBuffer(input)) return { buf: input.length > max ? input.subarray(0, max) : input, truncated: input.length > max, timedOut: false };
  const chunks: Buffer[] = [];
  let size = 0;
  let truncated = false;
  let timedOut = false;
  for await (const c of input as AsyncIterable<Buffer | string>) {
    const b = typeof c === "string" ? Buffer.from(c, "binary") : c;
    if (size + b.length > max) {
      chunks.push(b.subarray(0, max - size));
      size = max;
      truncated = true;
      break;
    }
    chunks.push(b);
    size += b.length;
    if (Date.now() > deadlineMs) {
      timedOut = true;
      break;
    }
  }
  return { buf: Buffer.concat(chunks, size), truncated, timedOut };
}

interface PartState {
  readonly contentType: string;
  readonly encoding: string;
  readonly charset: string;
  readonly attachment: boolean;
  readonly chunks: Buffer[];
  size: number;
}

/**
 * The tokens of MESSAGE (at most LIMITS). Never throws: a broken message gives the
 * tokens read so far and the reason `mime-error`; a limit gives its reason.
 */
export async function tokenize(message: MessageInput, limits: TokenizeLimits = DEFAULT_LIMITS): Promise<Tokenized> {
  const deadline = Date.now() + limits.time_budget_ms;
  const reasons = new Set<TokenizeReason>();
  const sink = new TokenSink(limits.tokens_max, deadline);
  let read: { buf: Buffer; truncated: boolean; timedOut: boolean };
  try {
    read = await readBounded(message, limits.input_bytes_max, deadline);
  } catch (e) {
    return { tokens: sink.tokens, reasons: ["mime-error"], error: `reading the message: ${(e as Error).message}`, parts: 0, bytesRead: 0, textChars: 0 };
  }
  if (read.truncated) reasons.add("input-truncated");
  if (read.timedOut) reasons.add("time-limit");

  const bodyText: string[] = [];
  let textChars = 0;
  let parts = 0;
  let headerLines = 0;
  let current: PartState | null = null;
  let stop = false;
  let error: string | undefined;
  // Raw bytes kept per text part: enough for text_chars_max after decoding.
  const partRawMax = limits.text_chars_max * 4 + 1024;

  const finishPart = (): void => {
    const p = current;
    current = null;
    if (!p || p.attachment || p.size === 0 || textChars >= limits.text_chars_max) return;
    let text = charsetDecode(transferDecode(Buffer.concat(p.chunks, p.size), p.encoding), p.charset);
    if (p.contentType === "text/html") text = stripHtml(text);
    if (textChars + text.length > limits.text_chars_max) {
      text = text.slice(0, limits.text_chars_max - textChars);
      reasons.add("text-truncated");
    }
    textChars += text.length;
    bodyText.push(text);
  };

  await new Promise<void>((resolve) => {
    let done = false;
    const splitter = new Splitter({ maxChildNodes: limits.parts_max + 2, maxHeadSize: 256 * 1024 });
    const events = splitter as unknown as NodeJS.EventEmitter;
    const finish = (): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      resolve();
    };
    const halt = (reason: TokenizeReason): void => {
      reasons.add(reason);
      stop = true;
      splitter.destroy();
      finish();
    };
    const timer = setTimeout(() => halt("time-limit"), Math.max(1, deadline - Date.now()));
    events.on("data", (data: { type: string; node?: unknown; value?: Buffer } & Record<string, unknown>) => {
      if (stop) return;
      if (Date.now() > deadline) return halt("time-limit");
      if (data.type === "node") {
        finishPart();
        parts++;
        if (parts > limits.parts_max) return halt("parts-limit");
        const node = data as unknown as { headers: { lines: false | { key: string; line: string }[]; getList?: () => { key: string; line: string }[] } | false; contentType: string | false; encoding: string | false; charset: string | false; disposition: string | false; multipart: string | false };
        const list = node.headers ? (node.headers.getList?.() ?? (node.headers.lines || [])) : [];
        for (const h of list) {
          if (headerLines >= limits.header_lines_max) {
            reasons.add("header-lines-limit");
            break;
          }
          headerLines += addHeaderField(sink, headerText(h.line), parts === 1);
        }
        const ct = node.contentType || "text/plain";
        if (!node.multipart && ct.startsWith("text/")) {
          current = { contentType: ct, encoding: (node.encoding || "").toLowerCase(), charset: node.charset || "", attachment: node.disposition === "attachment", chunks: [], size: 0 };
        }
      } else if (data.type === "body" && current && data.value) {
        const p: PartState = current;
        if (p.size < partRawMax) {
          const v = p.size + data.value.length > partRawMax ? data.value.subarray(0, partRawMax - p.size) : data.value;
          p.chunks.push(v);
          p.size += v.length;
        }
      }
      if (sink.full) halt(sink.timedOut ? "time-limit" : "tokens-limit");
    });
    events.on("error", (e: Error) => {
      error = e.message;
      reasons.add(/child nodes/i.test(e.message) ? "parts-limit" : "mime-error");
      stop = true;
      finish();
    });
    events.on("end", finish);
    try {
      // In slices, so a limit stops the parser within one slice of its cause.
      const slice = 64 * 1024;
      for (let off = 0; off < read.buf.length && !stop; off += slice) splitter.write(read.buf.subarray(off, off + slice));
      if (!stop) splitter.end();
    } catch (e) {
      error = (e as Error).message;
      reasons.add("mime-error");
      stop = true;
      finish();
    }
  });
  try {
    finishPart();
    if (Date.now() <= deadline) {
      const text = takeUrls(sink, bodyText.join("\n"));
      addWords(sink, splitWords(text, BODY_DELIMS, 200_000), "");
    } else reasons.add("time-limit");
  } catch (e) {
    error ??= (e as Error).message;
    reasons.add("mime-error");
  }
  if (sink.timedOut) reasons.add("time-limit");
  else if (sink.full) reasons.add("tokens-limit");
  return { tokens: sink.tokens, reasons: [...reasons], error, parts, bytesRead: read.buf.length, textChars };
}
