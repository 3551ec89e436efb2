// SHA512-CRYPT hashes must be what Dovecot and crypt(3) compute; services check them in
// a bounded pool of worker threads, never on their event loop.
import { test } from "node:test";
import assert from "node:assert/strict";
import { hashPassword, PasswordVerifier, sha512Crypt, VerifierBusyError, verifyPassword } from "../../services/password.ts";

test("the test vectors of the SHA-crypt specification", () => {
  // From Ulrich Drepper's "Unix crypt using SHA-256 and SHA-512", test vectors section.
  assert.equal(sha512Crypt("Hello world!", "saltstring"), "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1");
  assert.equal(
    sha512Crypt("Hello world!", "saltstringsaltstring", 10000),
    "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
  );
  assert.equal(
    sha512Crypt("we have a short salt string but not a short password", "short", 77777),
    "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0",
  );
});

test("hashPassword makes a salted hash that verifies only the right password", () => {
  const h1 = hashPassword("correct horse");
  const h2 = hashPassword("correct horse");
  assert.match(h1, /^\{SHA512-CRYPT\}\$6\$[./0-9A-Za-z]{16}\$[./0-9A-Za-z]{86}$/);
  assert.notEqual(h1, h2, "two hashes of one password must differ by salt");
  assert.equal(verifyPassword("correct horse", h1), true);
  assert.equal(verifyPassword("correct horse!", h1), false);
  assert.equal(verifyPassword("correct horse", "{PLAIN}correct horse"), false);
});

test("checks run off the event loop, in the worker pool: a 1 KiB password costs the loop nothing", async () => {
  const v = new PasswordVerifier();
  try {
    const long = "p".repeat(1024);
    const h = hashPassword(long);
    const t0 = performance.now();
    assert.equal(verifyPassword(long, h), true);
    const inline = performance.now() - t0;
    await v.verify(long, h); // the workers are up
    // The loop ticks every few ms while eight checks run in the pool; inline, the eight
    // would hold it for 8 x INLINE at once.
    let ticks = 0;
    let worst = 0;
    let last = performance.now();
    const timer = setInterval(() => {
      const now = performance.now();
      worst = Math.max(worst, now - last);
      last = now;
      ticks++;
    }, 2);
    const results = await Promise.all([...Array.from({ length: 7 }, () => v.verify(long, h)), v.verify("wrong", h)]);
    clearInterval(timer);
    assert.deepEqual(results, [true, true, true, true, true, true, true, false]);
    assert.ok(ticks > 3, `the event loop kept running (${ticks} ticks)`);
    assert.ok(worst < (8 * inline) / 2, `no tick waited for the hashes (worst gap ${worst.toFixed(1)} ms, one check inline ${inline.toFixed(1)} ms)`);
  } finally {
    await v.close();
  }
});

test("the pool is bounded: a full queue refuses at once, a stuck check ends its worker and the next check is served", async () => {
  // 3 s per check: a fresh worker (it loads the TypeScript loader) and its hash fit in it on a loaded machine.
  const v = new PasswordVerifier(1, 2, 3000);
  try {
    // rounds=999999999: minutes of hashing, stopped after 3 s.
    const slow = sha512Crypt("x", "saltsalt", 1000).replace("rounds=1000", "rounds=999999999");
    const stuck = v.verify("x", `{SHA512-CRYPT}${slow}`);
    const waiting = [v.verify("a", hashPassword("a")), v.verify("b", hashPassword("b"))];
    await assert.rejects(v.verify("c", hashPassword("c")), VerifierBusyError, "a third waiting check is refused");
    await assert.rejects(stuck, /took more than 3000 ms/);
    assert.deepEqual(await Promise.all(waiting), [true, true], "the checks behind it are served by a new worker");
  } finally {
    await v.close();
  }
});
