// SMTP AUTH is bounded: an overlong password is refused before any hashing, an unknown
// user costs what a known one does, and failed logins from one address wait longer and
// longer (a bounded table, cleared by a success, forgotten after a while).
import { test } from "node:test";
import assert from "node:assert/strict";
import { hashPassword, PasswordVerifier } from "../../services/password.ts";
import { AuthPenalty, PASSWORD_BYTES_MAX, PENALTY_FORGET_MS, PENALTY_INITIAL_MS, PENALTY_MAX_MS, penaltyKey, SmtpAuth } from "../../services/smtp/auth.ts";

const BOB = hashPassword("bob-password-1");
const DUMMY = hashPassword("no one's password");

/** An SmtpAuth on a fake clock whose sleeps are recorded (and advance the clock). */
function fake(verify: (p: string, h: string) => Promise<boolean> = async (p, h) => h === BOB && p === "bob-password-1") {
  let now = 1_000_000;
  const waits: number[] = [];
  const checked: string[] = [];
  const auth = new SmtpAuth({
    lookup: async (u) => (u === "bob@mailha.test" ? BOB : null),
    verify: (p, h) => {
      checked.push(h);
      return verify(p, h);
    },
    dummyHash: DUMMY,
    now: () => now,
    sleep: async (ms) => {
      waits.push(ms);
      now += ms;
    },
  });
  return { auth, waits, checked, advance: (ms: number) => (now += ms) };
}

test("a password over 1 KiB is refused before any lookup or hashing", async () => {
  const f = fake();
  assert.equal(await f.auth.check("192.0.2.1", "bob@mailha.test", "p".repeat(PASSWORD_BYTES_MAX + 1)), "invalid");
  assert.deepEqual(f.checked, [], "nothing was hashed");
  assert.equal(await f.auth.check("192.0.2.9", "bob@mailha.test", "p".repeat(PASSWORD_BYTES_MAX)), "invalid", "1 KiB itself is checked");
  assert.equal(f.checked.length, 1);
});

test("an unknown user is checked against a hash like a user's: the same work, the same answer", async () => {
  const f = fake();
  assert.equal(await f.auth.check("192.0.2.1", "nobody@mailha.test", "guess"), "invalid");
  assert.equal(await f.auth.check("192.0.2.2", "bob@mailha.test", "guess"), "invalid");
  assert.deepEqual(f.checked, [DUMMY, BOB], "one hash each, the unknown one against the dummy");
  assert.equal(/rounds=/.test(DUMMY), /rounds=/.test(BOB), "of the same rounds");
  // Timed, with the real pool: the medians of a few tries are alike.
  const v = new PasswordVerifier();
  try {
    const real = new SmtpAuth({ lookup: async (u) => (u === "bob@mailha.test" ? BOB : null), verify: (p, h) => v.verify(p, h), dummyHash: DUMMY, sleep: async () => {} });
    const median = async (user: string) => {
      const t: number[] = [];
      for (let i = 0; i < 7; i++) {
        const t0 = performance.now();
        await real.check(`198.51.100.${i}`, user, "a wrong password");
        t.push(performance.now() - t0);
      }
      return t.sort((a, b) => a - b)[3]!;
    };
    await median("bob@mailha.test"); // the workers are up
    const [known, unknown] = [await median("bob@mailha.test"), await median("nobody@mailha.test")];
    assert.ok(unknown > known / 2 && unknown < known * 2, `known ${known.toFixed(1)} ms, unknown ${unknown.toFixed(1)} ms`);
  } finally {
    await v.close();
  }
});

test("failed logins from one address wait longer each time, up to the bound; others are not held up; a success clears it", async () => {
  const f = fake();
  for (let i = 0; i < 8; i++) assert.equal(await f.auth.check("192.0.2.1", "bob@mailha.test", `wrong ${i}`), "invalid");
  assert.deepEqual(f.waits, [0, 1, 2, 4, 8, 16, 30, 30].map((x) => Math.min(PENALTY_MAX_MS, x * PENALTY_INITIAL_MS)).filter((x) => x > 0));
  f.waits.length = 0;
  assert.equal(await f.auth.check("192.0.2.2", "bob@mailha.test", "bob-password-1"), "ok");
  assert.deepEqual(f.waits, [], "another address logs in at once");
  assert.equal(await f.auth.check("192.0.2.1", "bob@mailha.test", "bob-password-1"), "ok");
  assert.deepEqual(f.waits, [PENALTY_MAX_MS], "the right password waits its turn too");
  f.waits.length = 0;
  assert.equal(await f.auth.check("192.0.2.1", "bob@mailha.test", "wrong"), "invalid");
  assert.deepEqual(f.waits, [], "after the success the address starts over");
});

test("attempts made at once from one address wait one after the other; beyond the longest wait they get 454 at once", () => {
  const p = new AuthPenalty();
  const t = 5_000_000;
  for (let i = 0; i < 6; i++) p.failed("192.0.2.1", t);
  const waits = Array.from({ length: 4 }, () => p.admit("192.0.2.1", t));
  assert.deepEqual(waits, [PENALTY_MAX_MS, 2 * PENALTY_MAX_MS, null, null], "the third would wait more than 30 s");
});

test("the table forgets a quiet address and holds a bounded number of them", () => {
  const p = new AuthPenalty(100);
  p.failed("192.0.2.1", 0);
  assert.ok(p.admit("192.0.2.1", 1)! > 0);
  assert.equal(p.admit("192.0.2.1", PENALTY_FORGET_MS + 10), 0, "forgotten after the quiet time");
  for (let i = 0; i < 1000; i++) p.failed(`10.0.${i >> 8}.${i & 255}`, 1000 + i);
  assert.equal(p.size, 100, "at most the bound");
  assert.equal(p.admit("10.0.0.0", 2000), 0, "the least recently failed went first");
  assert.ok(p.admit("10.0.3.231", 2000)! > 0, "the latest is kept");
});

test("an IPv6 client is penalised by its /64, an IPv4-mapped one by its IPv4 address", () => {
  assert.equal(penaltyKey("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
  assert.equal(penaltyKey("2001:0db8:0001:0002:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64");
  assert.equal(penaltyKey("2001:db8::5"), "2001:db8:0:0::/64");
  assert.equal(penaltyKey("::ffff:192.0.2.7"), "192.0.2.7");
  assert.equal(penaltyKey("192.0.2.7"), "192.0.2.7");
});
