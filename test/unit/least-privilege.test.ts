// Least privilege without root: the outbound worker takes only files of its own spool
// (a job naming /etc/passwd, a link out of the spool, a hard link, a directory is
// refused and the file is left alone), Redis's generated config (no TCP, a socket only
// the group reaches, a password), the paths clients derive their passwords from.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, linkSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { spoolFileOf } from "../../services/smtp/outbound.ts";
import { redisPaths, redisSecretFile, renderRedisConf } from "../../services/redis.ts";
import { mariadbPaths, sqlSecretFile } from "../../services/mariadb.ts";
import { nodePaths } from "../../common/paths.ts";
import { readServiceSecret, serviceSecret } from "../../services/privileges.ts";

function spool(): { dir: string; root: string } {
  const root = mkdtempSync(join(tmpdir(), "mailha-lp-"));
  const dir = join(root, "data", "outbound");
  mkdirSync(dir, { recursive: true });
  return { dir, root };
}

test("a job's file in the outbound spool is taken; one gone is 'missing' (delivered before a crash)", () => {
  const { dir, root } = spool();
  try {
    writeFileSync(join(dir, "1-a.eml"), "Subject: x\r\n\r\nhi\r\n");
    const r = spoolFileOf(dir, join(dir, "1-a.eml"));
    assert.equal(r.kind, "ok");
    assert.deepEqual(spoolFileOf(dir, join(dir, "2-gone.eml")), { kind: "missing" });
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test("a job naming /etc/passwd, a path that climbs out, a link or a hard link out of the spool is refused and the file stays", () => {
  const { dir, root } = spool();
  try {
    // A stand-in for /etc/passwd that the test may watch: outside the spool.
    const victim = join(root, "passwd");
    writeFileSync(victim, "root:x:0:0:root:/root:/bin/bash\n");
    const refused = (file: unknown, why: RegExp) => {
      const r = spoolFileOf(dir, file);
      assert.equal(r.kind, "refused", `${String(file)} must be refused, was ${r.kind}`);
      if (r.kind === "refused") assert.match(r.reason, why);
    };
    refused("/etc/passwd", /not in the outbound spool/);
    refused(victim, /not in the outbound spool/);
    refused(join(dir, "..", "passwd"), /not in the outbound spool/);
    refused(join(dir, "sub", "x.eml"), /not in the outbound spool/);
    refused("relative.eml", /not an absolute path/);
    refused(42, /not an absolute path/);
    refused(`${dir}/x\0.eml`, /not an absolute path/);
    symlinkSync(victim, join(dir, "link.eml"));
    refused(join(dir, "link.eml"), /leads outside the outbound spool/);
    symlinkSync(join(root, "nowhere"), join(dir, "dangling.eml"));
    refused(join(dir, "dangling.eml"), /leads nowhere/);
    linkSync(victim, join(dir, "hard.eml"));
    refused(join(dir, "hard.eml"), /2 hard links/);
    mkdirSync(join(dir, "adir.eml"));
    refused(join(dir, "adir.eml"), /not a regular file/);
    assert.equal(readFileSync(victim, "utf8"), "root:x:0:0:root:/root:/bin/bash\n", "the file a refused job named is untouched");
    assert.ok(existsSync("/etc/passwd"));
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test("Redis's config: no TCP port, the unix socket 0770, a password (no CONFIG for clients), the AOF fsynced at every write", () => {
  const r = redisPaths(nodePaths("/var/lib/mailha/a"));
  const conf = renderRedisConf(r, "s3cret-pw");
  assert.match(conf, /^port 0$/m);
  assert.doesNotMatch(conf, /^bind /m);
  assert.match(conf, new RegExp(`^unixsocket ${r.socket}$`, "m"));
  assert.match(conf, /^unixsocketperm 770$/m);
  assert.match(conf, /^user default on >s3cret-pw ~\* &\* \+@all -config -debug -module$/m, "the password, and no CONFIG, DEBUG or MODULE");
  assert.doesNotMatch(conf, /nopass/);
  assert.match(conf, /^appendfsync always$/m);
});

test("clients find the password of their node's MariaDB and Redis from the socket; a socket elsewhere is named in the error", () => {
  const p = nodePaths("/var/lib/mailha/a");
  assert.equal(redisSecretFile(redisPaths(p).socket), join(p.data, "etc", "redis.secret"));
  assert.equal(sqlSecretFile(mariadbPaths(p).socket, "smtp"), join(p.data, "etc", "mariadb-smtp.secret"));
  assert.throws(() => redisSecretFile("/tmp/redis.sock"), /\/tmp\/redis.sock is not a node's Redis socket/);
  assert.throws(() => sqlSecretFile("/tmp/mysql.sock", "smtp"), /\/tmp\/mysql.sock is not a node's MariaDB socket/);
});

test("a service password is made once, 0600, and read back the same; a missing one is named", () => {
  const root = mkdtempSync(join(tmpdir(), "mailha-lp-"));
  try {
    const etc = join(root, "etc");
    const a = serviceSecret(etc, "x.secret");
    assert.ok(a.length >= 20);
    assert.equal(serviceSecret(etc, "x.secret"), a);
    assert.equal(statSync(join(etc, "x.secret")).mode & 0o777, 0o600);
    assert.equal(statSync(etc).mode & 0o777, 0o700);
    assert.throws(() => readServiceSecret(join(etc, "none.secret")), /none\.secret \(missing/);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});
