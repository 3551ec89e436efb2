// A seeded SMTP fuzzer against a lab of its own: random and mutated command sequences,
// long lines, NUL, bare CR and LF, pipelining floods, slow clients, oversize DATA and
// TLS handshakes cut short, on the active node's 25, 587 and 465 and the backup MX
// (node b's 25), many sessions at once. It checks what a sender and a mailbox owner
// would notice: every reply is a valid SMTP reply (three digits, continuation lines
// right), a swaks delivery in parallel keeps succeeding, the SMTP processes' memory
// stays bounded (RSS from /proc), and nothing partial is delivered (every Maildir file
// that appeared holds a complete message the fuzzer sent and saw accepted).
// Each session is generated from its own seed; a failure names it, FUZZ_SEED=N replays
// that one session alone. By default the run stops starting sessions after
// FUZZ_SECONDS (75) or FUZZ_ITERATIONS (400), whichever comes first; FUZZ_ITERATIONS=N
// alone runs N sessions whatever the time.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect as netConnect, type Socket } from "node:net";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { dirname, join } from "node:path";
import { parseDocument } from "yaml";
import { runAll, sleep } from "../../common/exec.ts";
import { mailha, mailhaWithInput } from "../helpers/cli.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const SIZE_MAX = 1024 * 1024; // this lab's mail.message_size_max_bytes: oversize DATA stays cheap
const PASS = "lab-password-alice";
const CONCURRENCY = 6;
const SESSION_MAX_MS = 30_000;
const REPLY_WAIT_MS = 15_000;
const RSS_GROWTH_MAX_BYTES = 256 * 1024 * 1024;
const TLS_READY = "220 Ready to start TLS\r\n";
const REPLAY = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : null;
const ITERATIONS = Number(process.env.FUZZ_ITERATIONS ?? 400);
const SECONDS = process.env.FUZZ_ITERATIONS && !process.env.FUZZ_SECONDS ? Infinity : Number(process.env.FUZZ_SECONDS ?? 75);

/** mulberry32: small, fast, and the same sequence for a seed everywhere. */
function rng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (lo: number, hi: number) => lo + Math.floor(next() * (hi - lo + 1));
  const pick = <T,>(xs: readonly T[]): T => xs[Math.floor(next() * xs.length)]!;
  const chance = (p: number) => next() < p;
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(0, 255)));
  return { next, int, pick, chance, bytes };
}
type Rng = ReturnType<typeof rng>;

/**
 * Whether TEXT (what the server sent, latin1) is a sequence of valid SMTP replies: lines
 * "DDD text" or "DDD-text" ending in CRLF, a continuation followed by a line of the same
 * code, no control characters, at most 512 octets per line. An unfinished last line is
 * allowed only when the fuzzer cut the connection itself. Returns the problem, or null.
 */
export function replyProblem(text: string, cutByClient: boolean): string | null {
  const lines = text.split("\r\n");
  const rest = lines.pop()!;
  if (rest && !cutByClient) return `an unterminated reply line ${JSON.stringify(rest.slice(0, 80))}`;
  let open: string | null = null;
  for (const line of lines) {
    const m = /^([2-5][0-5]\d)([ -]?)(.*)$/s.exec(line);
    if (!m) return `not a reply line: ${JSON.stringify(line.slice(0, 120))}`;
    if (/[\x00-\x1f\x7f]/.test(m[3]!)) return `a control character in ${JSON.stringify(line.slice(0, 120))}`;
    if (line.length + 2 > 512) return `a reply line of ${line.length + 2} octets`;
    if (!m[2] && m[3]) return `no space after the code: ${JSON.stringify(line.slice(0, 80))}`;
    if (open && m[1] !== open) return `a continuation of ${open} went on as ${m[1]}`;
    open = m[2] === "-" ? m[1]! : null;
  }
  if (open && !cutByClient) return `a multi-line ${open} reply that never ended`;
  return null;
}

/** One client connection: raw TCP, or TLS (implicit or after STARTTLS); every byte the server sent, per layer. */
class Wire {
  readonly layers: Buffer[][] = [[]];
  private sock: Socket | TLSSocket;
  private waiters: (() => void)[] = [];
  closed = false;
  cut = false;

  private constructor(sock: Socket | TLSSocket) {
    this.sock = sock;
    this.listen(sock);
  }

  static open(host: string, port: number, tls: boolean): Promise<Wire> {
    return new Promise((resolve, reject) => {
      const sock = tls ? tlsConnect({ host, port, rejectUnauthorized: false }) : netConnect({ host, port });
      const t = setTimeout(() => {
        sock.destroy();
        reject(new Error(`no connection to ${host}:${port} within 10 s`));
      }, 10_000);
      sock.once(tls ? "secureConnect" : "connect", () => {
        clearTimeout(t);
        resolve(new Wire(sock));
      });
      sock.once("error", (err) => {
        clearTimeout(t);
        reject(err);
      });
    });
  }

  private listen(sock: Socket | TLSSocket) {
    sock.on("data", (d: Buffer) => {
      if (sock !== this.sock) return;
      this.layers.at(-1)!.push(d);
      for (const w of this.waiters.splice(0)) w();
    });
    sock.on("error", () => {});
    sock.on("close", () => {
      if (sock !== this.sock) return;
      this.closed = true;
      for (const w of this.waiters.splice(0)) w();
    });
  }

  text(layer = this.layers.length - 1): string {
    return Buffer.concat(this.layers[layer]!).toString("latin1");
  }

  /** Complete replies received on the current layer so far. */
  replies(): string[] {
    const out: string[] = [];
    let cur = "";
    for (const line of this.text().split("\r\n").slice(0, -1)) {
      cur += `${line}\n`;
      if (!/^\d{3}-/.test(line)) {
        out.push(cur.trimEnd());
        cur = "";
      }
    }
    return out;
  }

  /** Waits for N complete replies on this layer (or the close, or the time). */
  async until(n: number, ms = REPLY_WAIT_MS): Promise<string[]> {
    const end = Date.now() + ms;
    while (this.replies().length < n && !this.closed && Date.now() < end) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.max(1, end - Date.now()));
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return this.replies();
  }

  /** Waits until nothing has arrived for QUIETMS (or the close, or MAXMS). */
  async settle(quietMs = 300, maxMs = 5000): Promise<void> {
    const end = Date.now() + maxMs;
    let seen = -1;
    while (!this.closed && Date.now() < end) {
      const now = this.layers.at(-1)!.reduce((n, b) => n + b.length, 0);
      if (now === seen) return;
      seen = now;
      await sleep(quietMs);
    }
  }

  write(b: string | Buffer): void {
    if (!this.closed) this.sock.write(typeof b === "string" ? Buffer.from(b, "latin1") : b);
  }

  /** After a 220 to STARTTLS: the TLS handshake over this connection; false if it failed. */
  starttls(): Promise<boolean> {
    const raw = this.sock as Socket;
    return new Promise((resolve) => {
      const s = tlsConnect({ socket: raw, rejectUnauthorized: false });
      const t = setTimeout(() => {
        s.destroy();
        resolve(false);
      }, 10_000);
      s.once("secureConnect", () => {
        clearTimeout(t);
        this.layers.push([]);
        this.sock = s;
        this.listen(s);
        resolve(true);
      });
      s.once("error", () => {
        clearTimeout(t);
        resolve(false);
      });
    });
  }

  /** The raw socket under a STARTTLS still to come, for a handshake cut short. */
  rawSocket(): Socket {
    return this.sock as Socket;
  }

  destroy(cutByClient: boolean): void {
    if (cutByClient && !this.closed) this.cut = true;
    this.sock.destroy();
    this.closed = true;
  }
}

interface Target {
  readonly name: string;
  readonly host: string;
  readonly port: number;
  readonly tls: boolean;
  readonly submission: boolean;
}

/** A message the fuzzer sent and saw answered 250, by its marker. */
interface Accepted {
  readonly marker: string;
  readonly message: string;
  readonly mailboxes: readonly string[];
}

/** What one session saw: the problem found (null if none) and the messages accepted. */
interface SessionResult {
  readonly problem: string | null;
  readonly accepted: Accepted[];
  readonly kind: string;
}

const RCPTS = ["alice@mailha.test", "bob@mailha.test"];

/** A message with MARKER: header, a body with dot lines and 8-bit text, an end line. */
function message(r: Rng, marker: string, sizeBytes: number): string {
  let body = "";
  const lines = [".", "..", ".x", "x.", " . ", "caf\xe9 8-bit", "tab\there", "-".repeat(r.int(0, 990)), "From the start of a line"];
  while (body.length < sizeBytes) body += `${r.pick(lines)}\r\n`;
  return `From: fuzz@example.net\r\nTo: alice@mailha.test\r\nSubject: fuzz ${marker}\r\nDate: ${new Date().toUTCString()}\r\nMessage-ID: <${marker}@fuzz.test>\r\nX-Fuzz-Id: ${marker}\r\n\r\n${body}END ${marker}\r\n`;
}

const dotStuff = (m: string) => m.replace(/^\./gm, "..");

/** The random vocabulary: one command line, valid or not, with its line end. */
function command(r: Rng): string {
  const addr = () =>
    r.pick([
      "<alice@mailha.test>", "<bob@mailha.test>", "<postmaster>", "<Postmaster@mailha.test>", "<nobody@mailha.test>", "<someone@example.org>", "<>", '<"x y"@mailha.test>',
      "alice@mailha.test", "<alice@mailha.test", "<@relay.example:alice@mailha.test>", `<${"l".repeat(r.int(60, 400))}@mailha.test>`, "<a\x00b@mailha.test>", "<caf\xe9@mailha.test>",
      "<alice@[10.0.0.1]>", "<alice@xn--bcher-kva.test>", "<a@b@c>", "<.a@mailha.test>",
    ]);
  const line = r.pick([
    () => `EHLO ${r.pick(["fuzz.example", "[10.1.2.3]", "", "a b", "x".repeat(r.int(200, 600)), "caf\xe9.example"])}`,
    () => `HELO ${r.pick(["fuzz.example", ""])}`,
    () => `MAIL FROM:${addr()}${r.pick(["", " SIZE=100", ` SIZE=${SIZE_MAX * 4}`, " BODY=8BITMIME", " SMTPUTF8", " RET=FULL ENVID=x", " SIZE", " FOO=BAR"])}`,
    () => `RCPT TO:${addr()}${r.pick(["", " NOTIFY=SUCCESS", " NOTIFY=NEVER,DELAY", " ORCPT=rfc822;x@y"])}`,
    () => "DATA",
    () => "RSET",
    () => "NOOP",
    () => `VRFY ${r.pick(["alice", "", "x".repeat(300)])}`,
    () => "EXPN team",
    () => "HELP",
    () => "QUIT",
    () => "STARTTLS",
    () => `AUTH PLAIN ${Buffer.from(`\0${r.pick(["alice@mailha.test", "bob@mailha.test", "x"])}\0${r.pick([PASS, "wrong", ""])}`).toString("base64")}`,
    () => `AUTH ${r.pick(["LOGIN", "PLAIN", "CRAM-MD5", "XOAUTH2", ""])}`,
    () => r.pick(["*", "=", Buffer.from("alice@mailha.test").toString("base64"), "!!notbase64!!"]),
    () => `BDAT ${r.int(0, 50)}${r.pick(["", " LAST"])}`,
    () => `XCLIENT ADDR=${r.pick(["1.2.3.4", "::1", "[UNAVAILABLE]"])}`,
    () => "XFORWARD NAME=spoof.example",
    () => r.bytes(r.int(1, 60)).toString("latin1"),
    () => "",
    () => "x".repeat(r.pick([1000, 4096, 16 * 1024, 20_000, 100_000])),
  ])();
  let out = line;
  if (r.chance(0.15)) out = out.replace(/[a-z]/gi, (c) => (r.chance(0.5) ? c.toUpperCase() : c.toLowerCase()));
  if (r.chance(0.1) && out.length) {
    const at = r.int(0, out.length);
    out = out.slice(0, at) + r.pick(["\x00", "\r", "\n", "\xff", " ", ":", "<", ">"]) + out.slice(at);
  }
  if (r.chance(0.05)) out = out.slice(0, r.int(0, out.length));
  return out + r.pick(["\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\n", "\r", "\r\r\n", ""]);
}

/** Writes CHUNKS one by one with pauses: a slow client (bounded: at most about 3 s). */
async function trickle(w: Wire, data: string, r: Rng): Promise<void> {
  const pieces = Math.min(data.length, r.int(2, 40));
  const step = Math.ceil(data.length / pieces);
  for (let i = 0; i < data.length && !w.closed; i += step) {
    w.write(data.slice(i, i + step));
    await sleep(r.int(1, 70));
  }
}

/** The session scripts. Each returns the messages it saw accepted (250 after DATA). */
const scripts: Record<string, (w: Wire, r: Rng, t: Target, marker: (i: number) => string) => Promise<Accepted[]>> = {
  /** A polite transaction (with STARTTLS and AUTH on submission): must end in 250. */
  async clean(w, r, t, marker) {
    const expect = async (n: number, re: RegExp, what: string) => {
      const got = await w.until(n);
      if (got.length < n) throw new Error(`no reply to ${what} (got ${JSON.stringify(got.at(-1))})`);
      if (!re.test(got[n - 1]!)) throw new Error(`${what}: ${JSON.stringify(got[n - 1])}`);
    };
    let n = 1;
    await expect(n, /^220/, "the greeting");
    w.write("EHLO fuzz.example\r\n");
    await expect(++n, /^250/, "EHLO");
    if (t.submission && !t.tls) {
      if (/AUTH/.test(w.replies()[n - 1]!)) throw new Error("587 offered AUTH before STARTTLS");
      w.write("STARTTLS\r\n");
      await expect(++n, /^220/, "STARTTLS");
      if (!(await w.starttls())) throw new Error("the STARTTLS handshake failed");
      n = 0;
      w.write("EHLO fuzz.example\r\n");
      await expect(++n, /^250/, "EHLO inside TLS");
    }
    if (t.submission) {
      w.write(`AUTH PLAIN ${Buffer.from(`\0alice@mailha.test\0${PASS}`).toString("base64")}\r\n`);
      // 454: the fuzzer's own failed logins from this address hold its logins back a while.
      await expect(++n, /^(235|454 4\.7\.0)/, "AUTH");
      if (/^454/.test(w.replies()[n - 1]!)) return [];
    }
    const accepted: Accepted[] = [];
    for (let k = 0, msgs = r.int(1, 3); k < msgs; k++) {
      const to = r.chance(0.3) ? RCPTS : [r.pick(RCPTS)];
      const id = marker(k);
      const m = message(r, id, r.pick([10, 200, 5000, 60_000, SIZE_MAX / 2]));
      const cmds = [`MAIL FROM:<${t.submission ? "alice@mailha.test" : "fuzz@example.net"}>`, ...to.map((x) => `RCPT TO:<${x}>`), "DATA"].map((c) => `${c}\r\n`).join("");
      if (r.chance(0.5)) w.write(cmds); // pipelined
      else for (const c of cmds.split(/(?<=\r\n)/)) w.write(c);
      n += to.length + 2;
      await expect(n, /^354/, "DATA");
      const data = `${dotStuff(m)}.\r\n`;
      if (r.chance(0.2)) await trickle(w, data, r);
      else w.write(data);
      await expect(++n, /^250/, `the end of message ${id}`);
      accepted.push({ marker: id, message: m, mailboxes: to });
      if (r.chance(0.3)) {
        w.write("RSET\r\n");
        await expect(++n, /^250/, "RSET");
      }
    }
    w.write("QUIT\r\n");
    await w.until(n + 1);
    return accepted;
  },

  /** Random and mutated commands, interactive or batched, some slowly; DATA bodies with a marker and an end line. */
  async random(w, r, t, marker) {
    await w.until(1);
    let k = 0;
    const auth = t.submission && t.tls && r.chance(0.5);
    if (auth) w.write(`EHLO f\r\nAUTH PLAIN ${Buffer.from(`\0alice@mailha.test\0${PASS}`).toString("base64")}\r\n`);
    for (let i = 0, steps = r.int(3, 40); i < steps && !w.closed; i++) {
      let out = command(r);
      if (/^DATA/i.test(out) && r.chance(0.7)) {
        const id = `r${marker(k++)}`;
        const m = message(r, id, r.pick([0, 100, 3000]));
        let body = dotStuff(m);
        if (r.chance(0.3)) {
          const at = r.int(0, body.length);
          // (never a lone "." line: that would end the message early, as the client asked)
          body = body.slice(0, at) + r.pick(["\x00", "\n", "\r", "x".repeat(1200), "\r\n..\r\n"]) + body.slice(at);
        }
        out += body + (r.chance(0.9) ? ".\r\n" : "");
      }
      if (r.chance(0.2)) await trickle(w, out, r);
      else w.write(out);
      if (r.chance(0.5)) await w.settle(r.int(20, 200), 3000);
    }
    await w.settle(300, 8000);
    if (!w.closed) {
      w.write("\r\nQUIT\r\n");
      await w.settle(300, 5000);
    }
    return [];
  },

  /** Thousands of pipelined commands in one write: every one answered (or the session ended with a 421). */
  async flood(w, r, t) {
    await w.until(1);
    const n = r.int(300, 3000);
    const vocab = t.submission ? ["NOOP", "RSET", "HELP", "VRFY x"] : ["NOOP", "RSET", "MAIL FROM:<f@example.net>", "RCPT TO:<alice@mailha.test>", "RCPT TO:<nobody@mailha.test>", "HELP"];
    w.write(`EHLO flood\r\n${Array.from({ length: n }, () => `${r.pick(vocab)}\r\n`).join("")}`);
    const got = await w.until(n + 2, 60_000);
    if (got.length < n + 2 && !(w.closed && /^421/.test(got.at(-1) ?? ""))) throw new Error(`${n} pipelined commands, ${got.length - 2} replies (last ${JSON.stringify(got.at(-1))})`);
    w.write("QUIT\r\n");
    await w.until(n + 3, 5000);
    return [];
  },

  /** A message over the size limit: refused with 552, never stored. */
  async oversize(w, r, t, marker) {
    await w.until(1);
    let n = 1;
    if (t.submission) {
      if (!t.tls) {
        w.write("EHLO big\r\nSTARTTLS\r\n");
        await w.until(3);
        if (!(await w.starttls())) throw new Error("the STARTTLS handshake failed");
        n = 0;
      }
      w.write(`EHLO big\r\nAUTH PLAIN ${Buffer.from(`\0alice@mailha.test\0${PASS}`).toString("base64")}\r\n`);
      n += 2;
      const auth = await w.until(n);
      if (/^454/.test(auth[n - 1] ?? "")) return []; // held back by the fuzzer's own failed logins
    } else {
      w.write("EHLO big\r\n");
      n += 1;
    }
    w.write(`MAIL FROM:<${t.submission ? "alice@mailha.test" : "big@example.net"}>\r\nRCPT TO:<alice@mailha.test>\r\nDATA\r\n`);
    n += 3;
    const got = await w.until(n);
    if (!/^354/.test(got[n - 1] ?? "")) throw new Error(`DATA before the oversize message: ${JSON.stringify(got.at(-1))}`);
    const id = `o${marker(0)}`;
    const m = dotStuff(message(r, id, SIZE_MAX + r.int(1, SIZE_MAX / 2)));
    for (let i = 0; i < m.length && !w.closed; i += 65536) w.write(m.slice(i, i + 65536));
    w.write(".\r\n");
    const end = await w.until(n + 1, 60_000);
    if (!/^552/.test(end[n] ?? "")) throw new Error(`an oversize message was answered ${JSON.stringify(end[n])}`);
    w.write("QUIT\r\n");
    await w.until(n + 2, 5000);
    return [];
  },

  /** A TLS handshake cut short: bytes of a ClientHello, or a handshake dropped midway, after STARTTLS or on 465. */
  async tlsCut(w, r, t) {
    if (!t.tls) {
      await w.until(1);
      w.write("EHLO cut\r\n");
      const ehlo = await w.until(2);
      if (!/STARTTLS/.test(ehlo[1] ?? "")) return []; // no TLS here (the backup MX without a certificate)
      w.write("STARTTLS\r\n");
      const got = await w.until(3);
      if (!/^220/.test(got[2] ?? "")) return [];
      const raw = w.rawSocket();
      if (r.chance(0.5)) {
        raw.write(Buffer.concat([Buffer.from([0x16, 0x03, 0x01, r.int(0, 2), r.int(0, 255), 0x01]), r.bytes(r.int(0, 300))]));
        await sleep(r.int(0, 300));
      } else {
        const s = tlsConnect({ socket: raw, rejectUnauthorized: false });
        s.on("error", () => {});
        await sleep(r.int(0, 30));
        s.destroy();
      }
      w.destroy(true);
      return [];
    }
    // 465: the Wire is already in TLS; wait for its greeting (a client that talks first is
    // an early talker, refused), then open a raw connection beside it and cut that one.
    await w.until(1);
    const raw = netConnect({ host: t.host, port: t.port });
    raw.on("error", () => {});
    await new Promise<void>((resolve) => raw.once("connect", () => resolve()).once("error", () => resolve()));
    if (r.chance(0.5)) raw.write(Buffer.concat([Buffer.from([0x16, 0x03, 0x01]), r.bytes(r.int(0, 200))]));
    await sleep(r.int(0, 300));
    raw.destroy();
    w.write("NOOP\r\n");
    const got = await w.until(2);
    if (!/^250/.test(got[1] ?? "")) throw new Error(`a NOOP beside the cut handshake: ${JSON.stringify(got.at(-1))}`);
    w.write("QUIT\r\n");
    await w.until(3, 5000);
    return [];
  },
};

const KINDS: [string, number][] = [["clean", 3], ["random", 6], ["flood", 1], ["oversize", 1], ["tlsCut", 1]];

describe("SMTP under a seeded fuzzer", { skip }, () => {
  const lab = writeTestLabConfig("z", 111);
  const maildir = (user: string) => join(lab.dir, "a", "data", "mail", "mailha.test", user, "Maildir", "new");
  const files = () => RCPTS.flatMap((a) => (existsSync(maildir(a.split("@")[0]!)) ? readdirSync(maildir(a.split("@")[0]!)).map((f) => ({ mailbox: a, path: join(maildir(a.split("@")[0]!), f) })) : []));
  const targets: Target[] = [
    { name: "a:25", host: lab.a, port: 25, tls: false, submission: false },
    { name: "a:587", host: lab.a, port: 587, tls: false, submission: true },
    { name: "a:465", host: lab.a, port: 465, tls: true, submission: true },
    { name: "b:25 (backup MX)", host: lab.b, port: 25, tls: false, submission: false },
  ];

  before(async () => {
    const doc = parseDocument(readFileSync(lab.configFile, "utf8"));
    doc.setIn(["mail", "message_size_max_bytes"], SIZE_MAX);
    writeFileSync(lab.configFile, doc.toString());
    const r = await mailha(["lab", "up", "--config", lab.configFile]);
    assert.equal(r.code, 0, `lab up failed:\n${r.stderr}`);
    assert.equal((await mailhaWithInput(["user", "add", "bob@mailha.test", "--config", lab.configFile], "bob-password-1")).code, 0);
    // Two logins at once start the password workers, so their memory is in the baseline.
    await Promise.all(["alice@mailha.test", "bob@mailha.test"].map((u) => runAll("swaks", ["--server", lab.a, "--port", "465", "--tls-on-connect", "--auth", "PLAIN", "--auth-user", u, "--auth-password", u.startsWith("bob") ? "bob-password-1" : PASS, "--quit-after", "AUTH"])));
    // The backup MX takes mail once it has the active node's recipient list (with bob);
    // swaks marks a refusal with "<**".
    for (let i = 0; i < 60; i++) {
      const sw = await runAll("swaks", ["--server", lab.b, "--to", "bob@mailha.test", "--from", "warmup@example.net", "--quit-after", "RCPT"]);
      if (!/<\*\*/.test(sw.stdout)) break;
      await sleep(500);
    }
  });
  after(async () => {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  });

  /** The pid of the process whose command line has ARGS in order (the SMTP service, the passive node's services). */
  const pidOf = (args: string[]): number | null => {
    for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
      try {
        const argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
        const i = argv.indexOf(args[0]!);
        if (i >= 0 && args.every((a, k) => argv[i + k] === a)) return Number(pid);
      } catch {
        // gone meanwhile
      }
    }
    return null;
  };
  /** Resident set size of PID in bytes; null once it is gone. */
  const rssOf = (pid: number): number | null => {
    try {
      const kb = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1];
      return kb ? Number(kb) * 1024 : null;
    } catch {
      return null;
    }
  };

  test("every reply is valid, other clients are served, memory stays bounded, nothing partial is delivered", async () => {
    const base = REPLAY ?? Math.floor(Math.random() * 1e9);
    const seeds = REPLAY !== null ? [REPLAY] : Array.from({ length: ITERATIONS }, (_, i) => base + i);
    process.stdout.write(`# fuzz: ${REPLAY !== null ? `replaying session ${REPLAY}` : `sessions ${base}..${base + seeds.length - 1} (at most ${SECONDS} s)`}; replay one with FUZZ_SEED=N\n`);
    const pids = { smtp: pidOf(["smtp", "run", "--config", lab.configFile, "--node", "a"]), passive: pidOf(["passive", "run", "--config", lab.configFile, "--node", "b"]) };
    assert.ok(pids.smtp && pids.passive, `the SMTP processes were found (${JSON.stringify(pids)})`);
    const rss0 = { smtp: rssOf(pids.smtp)!, passive: rssOf(pids.passive)! };
    const rssMax = { ...rss0 };
    const gone = new Set<string>();
    const before = new Set(files().map((f) => f.path));

    const failures: string[] = [];
    const accepted: Accepted[] = [];
    const kinds = new Map<string, number>();
    const t0 = Date.now();
    let stop = false;
    // Other clients meanwhile: swaks delivers to alice every 2 s and must succeed each time.
    const swaksSubjects: string[] = [];
    const swaks = (async () => {
      for (let i = 0; !stop && i < 1000; i++) {
        const subject = `swaks during the fuzz ${i}`;
        const ts = Date.now();
        const sw = await runAll("swaks", ["--server", lab.a, "--to", "alice@mailha.test", "--from", "other@example.net", "--h-Subject", subject, "--timeout", "60"], { timeoutMs: 90_000 });
        if (/<- {1,2}250 2\.0\.0 Ok: delivered/.test(sw.stdout)) swaksSubjects.push(subject);
        else failures.push(`a swaks delivery during the fuzz failed after ${Date.now() - ts} ms: ${sw.stdout.split("\n").slice(-6).join(" / ")}`);
        await sleep(2000);
      }
    })();
    const sampler = setInterval(() => {
      for (const k of ["smtp", "passive"] as const) {
        const rss = rssOf(pids[k]!);
        if (rss === null) gone.add(k);
        else rssMax[k] = Math.max(rssMax[k], rss);
      }
    }, 250);

    const runSession = async (seed: number): Promise<SessionResult> => {
      const r = rng(seed);
      const t = targets[seed % targets.length]!;
      const total = KINDS.reduce((n, [, w]) => n + w, 0);
      let x = r.next() * total;
      const kind = KINDS.find(([, w]) => (x -= w) < 0)![0];
      let w: Wire;
      try {
        w = await Wire.open(t.host, t.port, t.tls);
      } catch (err) {
        return { kind, problem: `${t.name}: could not connect: ${(err as Error).message}`, accepted: [] };
      }
      let problem: string | null = null;
      let got: Accepted[] = [];
      const guard = new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`the session took more than ${SESSION_MAX_MS} ms`)), SESSION_MAX_MS).unref());
      try {
        got = await Promise.race([scripts[kind]!(w, r, t, (i) => `${seed}-${i}`), guard]);
      } catch (err) {
        problem = (err as Error).message;
      }
      w.destroy(!w.closed);
      for (let layer = 0; layer < w.layers.length && !problem; layer++) {
        // After smtp-server's 220 to STARTTLS the connection carries TLS, not replies.
        let text = w.text(layer);
        const tls = text.indexOf(TLS_READY);
        if (tls >= 0) text = text.slice(0, tls + TLS_READY.length);
        const p = replyProblem(text, w.cut || layer < w.layers.length - 1);
        if (p) problem = `${layer ? "inside TLS: " : ""}${p}`;
      }
      return { kind, problem: problem && `${t.name}, ${kind} session: ${problem}`, accepted: got };
    };

    let next = 0;
    const worker = async () => {
      while (next < seeds.length && Date.now() - t0 < SECONDS * 1000) {
        const seed = seeds[next++]!;
        const res = await runSession(seed);
        kinds.set(res.kind, (kinds.get(res.kind) ?? 0) + 1);
        accepted.push(...res.accepted);
        if (res.problem) failures.push(`session seed ${seed}: ${res.problem} (replay: FUZZ_SEED=${seed})`);
      }
    };
    await Promise.all(Array.from({ length: Math.min(CONCURRENCY, seeds.length) }, worker));
    stop = true;
    await swaks;
    clearInterval(sampler);
    const sessions = [...kinds.values()].reduce((a, b) => a + b, 0);
    process.stdout.write(`# fuzz: ${sessions} sessions in ${Math.round((Date.now() - t0) / 1000)} s (${[...kinds].map(([k, n]) => `${k} ${n}`).join(", ")}), ${accepted.length} messages accepted, ${swaksSubjects.length} swaks deliveries; RSS max smtp ${Math.round(rssMax.smtp / 2 ** 20)} MiB (from ${Math.round(rss0.smtp / 2 ** 20)}), passive ${Math.round(rssMax.passive / 2 ** 20)} MiB (from ${Math.round(rss0.passive / 2 ** 20)})\n`);

    // The backup MX forwards what it took; then every new file is accounted for.
    const spool = join(lab.dir, "b", "spool");
    for (let i = 0; i < 150 && existsSync(spool) && readdirSync(spool).some((f) => f.endsWith(".json")); i++) await sleep(200);
    const spoolLeft = existsSync(spool) ? readdirSync(spool).filter((f) => f.endsWith(".json")).length : 0;
    if (spoolLeft) failures.push(`${spoolLeft} messages are still in the backup MX's spool 30 s after the fuzz`);
    const fresh = files().filter((f) => !before.has(f.path));
    const byMarker = new Map(accepted.map((a) => [a.marker, a]));
    const seen = new Map<string, number>();
    for (const f of fresh) {
      const text = readFileSync(f.path, "latin1");
      const marker = /^X-Fuzz-Id: (\S+)\r$/m.exec(text)?.[1];
      if (!marker) {
        if (!swaksSubjects.some((s) => text.includes(`Subject: ${s}\r\n`))) failures.push(`${f.path} is neither a fuzz message nor a swaks delivery:\n${text.slice(0, 300)}`);
        continue;
      }
      seen.set(`${marker} ${f.mailbox}`, (seen.get(`${marker} ${f.mailbox}`) ?? 0) + 1);
      const sent = byMarker.get(marker);
      if (sent) {
        if (!text.endsWith(sent.message)) failures.push(`${f.path}: message ${marker} is not stored whole (${text.length} bytes, sent ${sent.message.length})`);
      } else if (marker.startsWith("o")) failures.push(`${f.path}: the oversize message ${marker} was stored`);
      else if (!text.endsWith(`\r\nEND ${marker}\r\n`)) failures.push(`${f.path}: message ${marker} was stored without its end`);
    }
    for (const a of accepted)
      for (const m of a.mailboxes) {
        const n = seen.get(`${a.marker} ${m}`) ?? 0;
        if (n !== 1) failures.push(`message ${a.marker}, answered 250, is in ${m}'s Maildir ${n} times`);
      }
    for (const k of ["smtp", "passive"] as const) {
      if (gone.has(k)) failures.push(`the ${k} process (pid ${pids[k]}) ended during the fuzz`);
      if (rssMax[k] - rss0[k] > RSS_GROWTH_MAX_BYTES) failures.push(`the ${k} process grew from ${Math.round(rss0[k] / 2 ** 20)} MiB to ${Math.round(rssMax[k] / 2 ** 20)} MiB`);
    }
    for (const a of RCPTS) {
      const tmp = join(dirname(maildir(a.split("@")[0]!)), "tmp");
      const left = existsSync(tmp) ? readdirSync(tmp) : [];
      if (left.length) failures.push(`${a}'s Maildir tmp/ holds ${left.length} files after the fuzz`);
    }
    if (!swaksSubjects.length) failures.push("no swaks delivery succeeded during the fuzz");
    if (failures.length) {
      // What the services said about it: their errors, for the report.
      for (const f of [join(lab.dir, "a", "log", "smtp.log"), join(lab.dir, "b", "log", "passive.log")]) {
        const errors = existsSync(f) ? readFileSync(f, "utf8").split("\n").filter((l) => /"level":(50|60)|^\w*Error|^\s+at /.test(l)).slice(-15) : [];
        process.stdout.write(`# ${f}, last errors:\n${errors.map((l) => `#   ${l.slice(0, 400)}`).join("\n")}\n`);
      }
    }
    assert.deepEqual(failures.slice(0, 30), [], `${failures.length} problems`);
  });
});
