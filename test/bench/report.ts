// BENCHMARKS.md: each benchmark owns one `## NAME` section and rewrites only that.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ROOT } from "../helpers/cli.ts";

/** Replaces (or appends) the `## NAME` section of BENCHMARKS.md. */
export function writeSection(name: string, body: string[]): void {
  const file = join(ROOT, "BENCHMARKS.md");
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch {
    text = "# Benchmarks\n\nFigures from `npm run bench`, as ratios against a baseline measured in the same run: the machine is shared and noisy, so absolute numbers mean little.\n";
  }
  const head = `## ${name}`;
  const section = `${head}\n\n${body.join("\n")}\n`;
  const start = text.indexOf(`${head}\n`);
  if (start < 0) text = `${text.trimEnd()}\n\n${section}`;
  else {
    const next = text.indexOf("\n## ", start + head.length);
    text = text.slice(0, start) + section + (next < 0 ? "" : `\n${text.slice(next + 1)}`);
  }
  writeFileSync(file, text);
}
