// Password hashes Dovecot understands: SHA512-CRYPT (the $6$ scheme of crypt(3), as
// specified by Ulrich Drepper), stored as "{SHA512-CRYPT}$6$salt$hash". Written here
// from the specification so that account tools need no native module.
// A service that checks passwords (SMTP AUTH) does it off its event loop, in a small
// pool of worker threads (PasswordVerifier): a bounded queue, a time limit per check.
// The cost grows with the square of the password's length, so callers bound that too.
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";

const ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ROUNDS_DEFAULT = 5000;
const ROUNDS_MIN = 1000;
const ROUNDS_MAX = 999_999_999;
const SALT_MAX = 16;

// The byte order in which the 64-byte digest is encoded, three bytes at a time.
const ORDER: readonly (readonly [number, number, number])[] = [
  [0, 21, 42], [22, 43, 1], [44, 2, 23], [3, 24, 45], [25, 46, 4], [47, 5, 26], [6, 27, 48],
  [28, 49, 7], [50, 8, 29], [9, 30, 51], [31, 52, 10], [53, 11, 32], [12, 33, 54], [34, 55, 13],
  [56, 14, 35], [15, 36, 57], [37, 58, 16], [59, 17, 38], [18, 39, 60], [40, 61, 19], [62, 20, 41],
];

function sha512(...parts: Buffer[]): Buffer {
  const h = createHash("sha512");
  for (const p of parts) h.update(p);
  return h.digest();
}

/** `len` bytes made of `block` repeated. */
function repeatTo(block: Buffer, len: number): Buffer {
  const out = Buffer.alloc(len);
  for (let i = 0; i < len; i += block.length) block.copy(out, i, 0, Math.min(block.length, len - i));
  return out;
}

function encode24(b2: number, b1: number, b0: number, n: number): string {
  let w = (b2 << 16) | (b1 << 8) | b0;
  let s = "";
  for (let i = 0; i < n; i++) {
    s += ITOA64[w & 0x3f];
    w >>>= 6;
  }
  return s;
}

/** crypt(3) SHA-512: returns "$6$[rounds=N$]salt$hash". */
export function sha512Crypt(password: string, salt: string, rounds = ROUNDS_DEFAULT): string {
  const r = Math.min(ROUNDS_MAX, Math.max(ROUNDS_MIN, Math.floor(rounds)));
  const p = Buffer.from(password, "utf8");
  const s = Buffer.from(salt.slice(0, SALT_MAX), "utf8");

  const b = sha512(p, s, p);
  const a = createHash("sha512").update(p).update(s);
  a.update(repeatTo(b, p.length));
  for (let n = p.length; n > 0; n >>= 1) a.update(n & 1 ? b : p);
  const aDigest = a.digest();

  const dp = sha512(...Array.from({ length: p.length }, () => p));
  const pBytes = repeatTo(dp, p.length);
  const ds = sha512(...Array.from({ length: 16 + aDigest[0]! }, () => s));
  const sBytes = repeatTo(ds, s.length);

  let c = aDigest;
  for (let i = 0; i < r; i++) {
    const h = createHash("sha512");
    h.update(i & 1 ? pBytes : c);
    if (i % 3) h.update(sBytes);
    if (i % 7) h.update(pBytes);
    h.update(i & 1 ? c : pBytes);
    c = h.digest();
  }

  let out = "";
  for (const [x, y, z] of ORDER) out += encode24(c[x]!, c[y]!, c[z]!, 4);
  out += encode24(0, 0, c[63]!, 2);
  const roundsPart = rounds === ROUNDS_DEFAULT ? "" : `rounds=${r}$`;
  return `$6$${roundsPart}${s.toString("utf8")}$${out}`;
}

/** A fresh salted hash in Dovecot's "{SHA512-CRYPT}..." form. */
export function hashPassword(password: string): string {
  let salt = "";
  for (const byte of randomBytes(SALT_MAX)) salt += ITOA64[byte & 0x3f];
  return `{SHA512-CRYPT}${sha512Crypt(password, salt)}`;
}

/** Checks a password against a "{SHA512-CRYPT}$6$..." hash. */
export function verifyPassword(password: string, stored: string): boolean {
  const m = /^\{SHA512-CRYPT\}\$6\$(?:rounds=(\d+)\$)?([^$]{0,16})\$([./0-9A-Za-z]{86})$/.exec(stored);
  if (!m) return false;
  const again = sha512Crypt(password, m[2]!, m[1] ? Number(m[1]) : ROUNDS_DEFAULT);
  const want = Buffer.from(stored.slice("{SHA512-CRYPT}".length));
  const got = Buffer.from(again);
  return want.length === got.length && timingSafeEqual(want, got);
}

const WORKER_ROLE = "mailha-password-verify";
/** Worker threads that hash at once (the machine's cores serve the rest of the service too). */
export const VERIFY_WORKERS = 2;
/** Checks waiting for a worker; beyond it a check is refused at once (the caller answers 4xx). */
export const VERIFY_QUEUE_MAX = 64;
/** One check longer than this (an absurd rounds= in a stored hash) ends its worker. */
export const VERIFY_TIMEOUT_MS = 5000;

interface VerifyJob {
  readonly id: number;
  readonly password: string;
  readonly stored: string;
  readonly done: (err: Error | null, ok?: boolean) => void;
}

/** Thrown when VERIFY_QUEUE_MAX checks are already waiting. */
export class VerifierBusyError extends Error {}

/**
 * The module itself, run in a worker thread: compiled (dist/), this very file; from the
 * sources, through tsx, which the worker registers first.
 */
function workerUrl(): URL {
  const self = new URL(import.meta.url);
  if (!self.pathname.endsWith(".ts")) return self;
  const code = `import { register } from ${JSON.stringify(import.meta.resolve("tsx/esm/api"))}; register(); await import(${JSON.stringify(import.meta.url)});`;
  return new URL(`data:text/javascript,${encodeURIComponent(code)}`);
}

/** verifyPassword in a pool of worker threads: the caller's event loop never hashes. */
export class PasswordVerifier {
  private readonly idle: Worker[] = [];
  private readonly busy = new Map<Worker, { job: VerifyJob; timer: NodeJS.Timeout }>();
  private readonly queue: VerifyJob[] = [];
  private workers = 0;
  private seq = 0;
  private closed = false;

  constructor(
    private readonly size = VERIFY_WORKERS,
    private readonly queueMax = VERIFY_QUEUE_MAX,
    private readonly timeoutMs = VERIFY_TIMEOUT_MS,
  ) {}

  verify(password: string, stored: string): Promise<boolean> {
    if (this.closed) return Promise.reject(new Error("the password verifier is closed"));
    if (this.queue.length >= this.queueMax) return Promise.reject(new VerifierBusyError(`${this.queueMax} password checks are waiting already`));
    return new Promise((resolve, reject) => {
      this.queue.push({ id: ++this.seq, password, stored, done: (err, ok) => (err ? reject(err) : resolve(ok === true)) });
      this.dispatch();
    });
  }

  private spawn(): Worker {
    const w = new Worker(workerUrl(), { workerData: { role: WORKER_ROLE } });
    w.unref();
    this.workers++;
    w.on("message", (m: { id: number; ok: boolean }) => {
      const b = this.busy.get(w);
      if (!b || b.job.id !== m.id) return;
      clearTimeout(b.timer);
      this.busy.delete(w);
      this.idle.push(w);
      b.job.done(null, m.ok);
      this.dispatch();
    });
    const gone = (err: Error) => {
      const b = this.busy.get(w);
      this.busy.delete(w);
      const i = this.idle.indexOf(w);
      if (i >= 0) this.idle.splice(i, 1);
      this.workers--;
      if (b) {
        clearTimeout(b.timer);
        b.job.done(err);
      }
      this.dispatch();
    };
    w.once("error", gone);
    w.once("exit", (code) => gone(new Error(`password worker exited (${code})`)));
    return w;
  }

  private dispatch(): void {
    while (!this.closed && this.queue.length) {
      const w = this.idle.pop() ?? (this.workers < this.size ? this.spawn() : null);
      if (!w) return;
      const job = this.queue.shift()!;
      const timer = setTimeout(() => {
        // The worker is stuck in one hash: it goes, a new one takes its place.
        this.busy.delete(w);
        this.workers--;
        w.removeAllListeners();
        w.on("error", () => {});
        void w.terminate();
        job.done(new Error(`a password check took more than ${this.timeoutMs} ms`));
        this.dispatch();
      }, this.timeoutMs);
      timer.unref();
      this.busy.set(w, { job, timer });
      w.postMessage({ id: job.id, password: job.password, stored: job.stored });
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const j of this.queue.splice(0)) j.done(new Error("the password verifier is closed"));
    const all = [...this.idle, ...this.busy.keys()];
    for (const [, b] of this.busy) {
      clearTimeout(b.timer);
      b.job.done(new Error("the password verifier is closed"));
    }
    this.busy.clear();
    this.idle.length = 0;
    for (const w of all) w.removeAllListeners().on("error", () => {});
    await Promise.all(all.map((w) => w.terminate()));
  }
}

// In a worker thread of a PasswordVerifier: answer each check.
if (!isMainThread && (workerData as { role?: string } | null)?.role === WORKER_ROLE) {
  parentPort!.on("message", (m: { id: number; password: string; stored: string }) => {
    parentPort!.postMessage({ id: m.id, ok: verifyPassword(m.password, m.stored) });
  });
}
