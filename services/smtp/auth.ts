// SMTP AUTH, bounded: what one login attempt may cost the service and how fast one
// client address may guess.
// - A password over PASSWORD_BYTES_MAX (or a user name over USERNAME_BYTES_MAX) is
//   refused before any lookup or hashing: SHA512-CRYPT's cost grows with the square of
//   the password's length (a 12 KB one took ~450 ms of the event loop).
// - Hashing runs in the worker pool (services/password.ts), never on the event loop.
// - An unknown user costs what a known one does: the password is checked against a hash
//   of the same scheme and rounds, and the answer is the same 535.
// - Failed logins are penalised per client address (an IPv6 client by its /64), as
//   Dovecot's auth penalty: after N failures an attempt from the address waits
//   PENALTY_INITIAL_MS x 2^(N-1), at most PENALTY_MAX_MS, and attempts made at once wait
//   their turn one after the other; an attempt that would wait more than
//   PENALTY_WAIT_MAX_MS is answered 454 at once. A success clears the address's record,
//   PENALTY_FORGET_MS without a failure forgets it, and the table holds at most
//   PENALTY_ADDRESSES_MAX addresses (the least recently failed go first).
//   Known gap: one who holds a valid account clears the record of his address with
//   each successful login of it (Dovecot does the same); the penalty then slows his
//   guesses for other accounts only between two such logins.

export const PASSWORD_BYTES_MAX = 1024;
export const USERNAME_BYTES_MAX = 320;
export const PENALTY_INITIAL_MS = 500;
export const PENALTY_MAX_MS = 15_000;
export const PENALTY_WAIT_MAX_MS = 30_000;
export const PENALTY_FORGET_MS = 15 * 60_000;
export const PENALTY_ADDRESSES_MAX = 10_000;

export type AuthVerdict = "ok" | "invalid" | "throttled" | "unavailable";

interface Record {
  failures: number;
  /** When the next attempt from the address may be checked. */
  nextAt: number;
  lastFailureAt: number;
}

/** The key a client address is penalised under: IPv4 as it is, IPv6 by its /64. */
export function penaltyKey(address: string): string {
  const v4 = /^(?:::ffff:)?(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (v4) return v4[1]!;
  if (!address.includes(":")) return address;
  const [head = "", tail = ""] = address.toLowerCase().split("::");
  const h = head ? head.split(":") : [];
  const t = tail ? tail.split(":") : [];
  const groups = address.includes("::") ? [...h, ...Array<string>(Math.max(0, 8 - h.length - t.length)).fill("0"), ...t] : h;
  return `${groups.slice(0, 4).map((g) => g.replace(/^0+(?=.)/, "")).join(":")}::/64`;
}

/** The per-address penalty table; pure apart from the clock values it is given. */
export class AuthPenalty {
  private readonly table = new Map<string, Record>();

  constructor(private readonly max = PENALTY_ADDRESSES_MAX) {}

  /** The delay after N failures. */
  static delayMs(failures: number): number {
    return failures <= 0 ? 0 : Math.min(PENALTY_MAX_MS, PENALTY_INITIAL_MS * 2 ** Math.min(failures - 1, 30));
  }

  /** How long an attempt from ADDRESS waits before it is checked (its turn is taken); null when too long. */
  admit(address: string, now: number): number | null {
    const key = penaltyKey(address);
    const r = this.table.get(key);
    if (!r) return 0;
    if (now - r.lastFailureAt > PENALTY_FORGET_MS) {
      this.table.delete(key);
      return 0;
    }
    const at = Math.max(now, r.nextAt);
    if (at - now > PENALTY_WAIT_MAX_MS) return null;
    // The next attempt from here waits for this one, and its own delay after it.
    r.nextAt = at + AuthPenalty.delayMs(r.failures);
    return at - now;
  }

  failed(address: string, now: number): void {
    const key = penaltyKey(address);
    const r = this.table.get(key) ?? { failures: 0, nextAt: now, lastFailureAt: now };
    this.table.delete(key); // re-inserted: the least recently failed stay first in line to go
    r.failures++;
    r.lastFailureAt = now;
    r.nextAt = Math.max(r.nextAt, now + AuthPenalty.delayMs(r.failures));
    this.table.set(key, r);
    while (this.table.size > this.max) this.table.delete(this.table.keys().next().value!);
  }

  succeeded(address: string): void {
    this.table.delete(penaltyKey(address));
  }

  get size(): number {
    return this.table.size;
  }
}

export interface AuthOptions {
  /** The stored hash of USER, or null when there is no such (active) user. */
  readonly lookup: (user: string) => Promise<string | null>;
  /** The password check, off the event loop. */
  readonly verify: (password: string, stored: string) => Promise<boolean>;
  /** A hash of a random password in the users' scheme and rounds: what an unknown user is checked against. */
  readonly dummyHash: string;
  readonly penalty?: AuthPenalty;
  readonly now?: () => number;
  readonly sleep?: (ms: number) => Promise<void>;
}

export class SmtpAuth {
  readonly penalty: AuthPenalty;
  private readonly now: () => number;
  private readonly sleep: (ms: number) => Promise<void>;

  constructor(private readonly o: AuthOptions) {
    this.penalty = o.penalty ?? new AuthPenalty();
    this.now = o.now ?? Date.now;
    this.sleep = o.sleep ?? ((ms) => new Promise((r) => setTimeout(r, ms)));
  }

  /** One login attempt of USER with PASSWORD from client ADDRESS. */
  async check(address: string, user: string, password: string): Promise<AuthVerdict> {
    const wait = this.penalty.admit(address, this.now());
    if (wait === null) return "throttled";
    if (wait > 0) await this.sleep(wait);
    if (Buffer.byteLength(password) > PASSWORD_BYTES_MAX || Buffer.byteLength(user) > USERNAME_BYTES_MAX) {
      this.penalty.failed(address, this.now());
      return "invalid";
    }
    let ok: boolean;
    let known: boolean;
    try {
      const stored = await this.o.lookup(user);
      known = stored !== null;
      ok = await this.o.verify(password, stored ?? this.o.dummyHash);
    } catch {
      return "unavailable"; // the account store or the pool: a 454, not counted
    }
    if (ok && known) {
      this.penalty.succeeded(address);
      return "ok";
    }
    this.penalty.failed(address, this.now());
    return "invalid";
  }
}
