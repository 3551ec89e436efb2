// SHA512-CRYPT hashes must be what Dovecot and crypt(3) compute.
import { test } from "node:test";
import assert from "node:assert/strict";
import { hashPassword, sha512Crypt, verifyPassword } from "../../services/password.ts";

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
