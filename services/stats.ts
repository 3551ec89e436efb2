// Counters a service process hands to its node daemon's metrics page: each process
// writes `<state>/stats/<name>.json` (a flat object of numbers) every few seconds, by
// temp file and rename (a cache: never fsynced, a torn or missing one reads as absent).
// The folder belongs to the mail uid, so a service that gave up root still writes it.
import { chownSync, mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { NodePaths } from "../common/paths.ts";

export const STATS_EVERY_MS = 5000;
const FILES_MAX = 32;

export function statsDir(paths: NodePaths): string {
  return join(paths.state, "stats");
}

/** Makes the folder (root, before a service drops root): owned by OWNER when given. */
export function prepareStatsDir(paths: NodePaths, owner?: { uid: number; gid: number }): void {
  const d = statsDir(paths);
  mkdirSync(d, { recursive: true, mode: 0o755 });
  if (owner) chownSync(d, owner.uid, owner.gid);
}

/** Writes READ()'s numbers as NAME every STATS_EVERY_MS until stopped. */
export function publishStats(paths: NodePaths, name: string, read: () => Record<string, number>): () => void {
  const file = join(statsDir(paths), `${name}.json`);
  const write = () => {
    try {
      writeFileSync(`${file}.tmp`, JSON.stringify(read()));
      renameSync(`${file}.tmp`, file);
    } catch {
      // no folder (yet), or not ours: the metrics page shows nothing for it
    }
  };
  write();
  const t = setInterval(write, STATS_EVERY_MS);
  t.unref();
  return () => clearInterval(t);
}

/** Every service's numbers, by name; a file that is not a flat object of numbers is left out. */
export function readStats(paths: NodePaths): Record<string, Record<string, number>> {
  const out: Record<string, Record<string, number>> = {};
  let names: string[] = [];
  try {
    names = readdirSync(statsDir(paths)).filter((f) => /^[a-z0-9-]{1,32}\.json$/.test(f)).slice(0, FILES_MAX);
  } catch {
    return out;
  }
  for (const f of names) {
    try {
      const v = JSON.parse(readFileSync(join(statsDir(paths), f), "utf8")) as unknown;
      if (!v || typeof v !== "object" || Array.isArray(v)) continue;
      const nums = Object.entries(v as Record<string, unknown>).filter((e): e is [string, number] => typeof e[1] === "number" && Number.isFinite(e[1]) && /^[a-z0-9_]{1,64}$/.test(e[0]));
      out[f.slice(0, -5)] = Object.fromEntries(nums);
    } catch {
      // torn or gone
    }
  }
  return out;
}
