#!/usr/bin/env node
// Entry point of the `mailha` command. Runs the compiled product, dist/ops/cli/main.js,
// when it is there and up to date: dist/build-stamp.json (written by `npm run build`)
// is not older than any source file in the folders it names. In a checkout whose
// sources changed since the last build (or that was never built) it runs the
// TypeScript sources through tsx instead, so stale compiled code never runs; on a
// terminal it says so in one line on stderr (not to pipes and log files: tests and
// scripts read the command's own stderr, and stdout is never touched, so --json is not
// disturbed). MAILHA_FROM_SOURCES=1 asks for the sources through tsx; =0 demands dist/
// (exit 2 when it is not up to date). An installed package has no sources: it runs
// dist/. Every daemon is started through this file too (common/self.ts MAILHA_BIN), so
// they all make the same choice. The check costs one stat per source file (about 1.5 ms).
import { readFileSync, readdirSync, statSync } from "node:fs";

const ROOT = new URL("../../", import.meta.url);
const COMPILED = new URL("dist/ops/cli/main.js", ROOT);
const SOURCES = new URL("ops/cli/main.ts", ROOT);

/** The newest .ts file under `dir` (recursively), or null when there is none. */
function newestSource(dir, best) {
  let entries;
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return best;
  }
  for (const e of entries) {
    const p = `${dir}/${e.name}`;
    if (e.isDirectory()) best = newestSource(p, best);
    else if (e.name.endsWith(".ts") && !e.name.endsWith(".d.ts")) {
      const m = statSync(p).mtimeMs;
      if (!best || m > best.mtime_ms) best = { file: p, mtime_ms: m };
    }
  }
  return best;
}

/** Why dist/ must not be run (a sentence), or null when it is up to date. */
function staleReason() {
  let stamp;
  try {
    stamp = JSON.parse(readFileSync(new URL("dist/build-stamp.json", ROOT), "utf8"));
    statSync(COMPILED);
  } catch {
    return "dist/ is not built";
  }
  const root = decodeURIComponent(ROOT.pathname).replace(/\/$/, "");
  let best = null;
  for (const d of stamp.dirs) best = newestSource(`${root}/${d}`, best);
  for (const f of stamp.files) {
    try {
      const m = statSync(`${root}/${f}`).mtimeMs;
      if (!best || m > best.mtime_ms) best = { file: `${root}/${f}`, mtime_ms: m };
    } catch {
      // an installed package has no tsconfig
    }
  }
  if (best && best.mtime_ms > stamp.started_ms) return `dist/ is older than ${best.file.slice(root.length + 1)}`;
  return null;
}

async function fromSources() {
  const { register } = await import("tsx/esm/api");
  register();
  await import(SOURCES.href);
}

const wanted = process.env.MAILHA_FROM_SOURCES;
if (wanted === "1") {
  await fromSources();
} else {
  const why = staleReason();
  if (why === null) {
    await import(COMPILED.href);
  } else if (wanted === "0") {
    process.stderr.write(`mailha: ${why} and MAILHA_FROM_SOURCES=0 asks for the compiled product: run npm run build\n`);
    process.exit(2);
  } else {
    if (process.stderr.isTTY) process.stderr.write(`mailha: ${why}; running the TypeScript sources through tsx (npm run build compiles them)\n`);
    await fromSources();
  }
}
