// Where the `mailha` command itself is, for the children this code starts (the node,
// SMTP, the journal watcher, the volume engine, the passive services, the witness,
// reconcile): one place, the same whether the sources run through tsx or compiled
// from dist/ (the package root is found from this file, not from a fixed depth).
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const LEVELS_MAX = 6;

function packageRoot(from: string): string {
  let dir = from;
  for (let i = 0; i < LEVELS_MAX; i++) {
    if (existsSync(join(dir, "package.json")) && existsSync(join(dir, "ops", "bin", "mailha.mjs"))) return dir;
    dir = dirname(dir);
  }
  throw new Error(`mailha: cannot find the package root above ${from}`);
}

/** The package's root directory (package.json, ops/bin/). */
export const PACKAGE_ROOT = packageRoot(dirname(fileURLToPath(import.meta.url)));
/** The `mailha` command: `spawn(process.execPath, [MAILHA_BIN, ...args])`. */
export const MAILHA_BIN = join(PACKAGE_ROOT, "ops", "bin", "mailha.mjs");
