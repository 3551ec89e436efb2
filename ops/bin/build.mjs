#!/usr/bin/env node
// `npm run build`: compiles the TypeScript sources into dist/ (tsc -p tsconfig.build.json),
// writes the top-level command listing (dist/ops/cli/commands.json, see ops/cli/main.ts)
// and last dist/build-stamp.json, which ops/bin/mailha.mjs reads to know that the
// compiled code is not older than the sources. The stamp holds the time the build
// STARTED: a source saved while tsc runs is newer than the stamp, so the next start
// sees it as stale instead of silently running code compiled before the change.
import { spawnSync } from "node:child_process";
import { mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const TSCONFIG = "tsconfig.build.json";
const started_ms = Date.now();

const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
const r = spawnSync(process.execPath, [tsc, "-p", join(ROOT, TSCONFIG)], { cwd: ROOT, stdio: "inherit" });
if (r.status !== 0) {
  process.stderr.write(`mailha build: tsc failed (exit ${r.status ?? r.signal}); dist/ has no new stamp\n`);
  process.exit(1);
}

// The top-level command listing that `mailha --help` shows without loading every command module.
const listing = spawnSync(process.execPath, [join(ROOT, "dist", "ops", "cli", "main.js")], {
  cwd: ROOT,
  stdio: "inherit",
  env: { ...process.env, MAILHA_COMMANDS_OUT: join(ROOT, "dist", "ops", "cli", "commands.json") },
});
if (listing.status !== 0) {
  process.stderr.write(`mailha build: writing the command listing failed (exit ${listing.status ?? listing.signal}); dist/ has no new stamp\n`);
  process.exit(1);
}

// The folders compiled are the ones the bin checks: one list, the build tsconfig's.
const { include } = JSON.parse(readFileSync(join(ROOT, TSCONFIG), "utf8"));
const stamp = { started_ms, started: new Date(started_ms).toISOString(), dirs: include, files: ["tsconfig.json", TSCONFIG] };
mkdirSync(join(ROOT, "dist"), { recursive: true });
const tmp = join(ROOT, "dist", `build-stamp.json.${process.pid}`);
writeFileSync(tmp, JSON.stringify(stamp, null, 2) + "\n");
renameSync(tmp, join(ROOT, "dist", "build-stamp.json"));
