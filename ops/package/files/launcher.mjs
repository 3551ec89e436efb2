// The mailha Debian package's entry point (/usr/bin/mailha execs node with this file):
// refuses a Node.js older than the package needs, in one sentence, then runs the
// product's own bin (ops/bin/mailha.mjs, which every daemon is started through too).
const NEED = [20, 10];
const [major = 0, minor = 0] = process.versions.node.split(".").map(Number);
if (major < NEED[0] || (major === NEED[0] && minor < NEED[1])) {
  process.stderr.write(`mailha: needs Node.js >= ${NEED.join(".")}, but ${process.execPath} is ${process.version}; install Node 20 at /usr/local/bin/node (or set MAILHA_NODEJS)\n`);
  process.exit(2);
}
await import("./ops/bin/mailha.mjs");
