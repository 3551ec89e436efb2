// Durable file writes: what is written to the replicated volume must survive the
// node losing power right after (an unsynced file can come back empty on the peer).
// State files a daemon reads back at start are replaced atomically (temp file, fsync,
// rename, fsync of the directory), so a power loss leaves the old or the new file,
// never half of one; reading one checks it and names the file and the remedy when it
// is damaged anyway (a disk error, an edit by hand), instead of a parser's stack trace.
import { closeSync, existsSync, fsync, fsyncSync, openSync, readFileSync, renameSync, unlinkSync, writeSync } from "node:fs";
import { dirname } from "node:path";

/** fsync of a file or directory by path. */
export function fsyncPath(path: string): void {
  const fd = openSync(path, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * fsync of an open file in libuv's pool: the caller's event loop keeps serving while
 * the disks flush (the one step of a delivery that waits for them).
 */
export function fsyncAsync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fsync(fd, (err) => (err ? reject(err) : resolve())));
}

/** fsyncAsync by path; opening and closing are cheap and run inline. */
export async function fsyncPathAsync(path: string): Promise<void> {
  const fd = openSync(path, "r");
  try {
    await fsyncAsync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Writes FILE atomically and durably: temp file, fsync, rename, fsync of the directory.
 * A write that fails (a full disk) removes its temp file and leaves FILE as it was.
 */
export function writeFileDurable(file: string, data: string | Buffer, mode = 0o600): void {
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    const fd = openSync(tmp, "w", mode);
    try {
      const buf = typeof data === "string" ? Buffer.from(data) : data;
      for (let off = 0; off < buf.length; ) off += writeSync(fd, buf, off, buf.length - off);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, file);
  } catch (err) {
    try {
      unlinkSync(tmp);
    } catch {
      // not made, or already renamed
    }
    throw err;
  }
  fsyncPath(dirname(file));
}

/** A state file that exists but cannot be used: says which file, what is wrong with it and what to do. */
export class DamagedStateFileError extends Error {
  constructor(
    readonly file: string,
    readonly problem: string,
    readonly remedy: string,
  ) {
    super(`${file} is damaged (${problem}): ${remedy}`);
    this.name = "DamagedStateFileError";
  }
}

/** What is wrong with a parsed value (a short phrase), or null when it has the expected shape. */
export type ShapeCheck = (v: unknown) => string | null;

const SNIPPET_CHARS = 40;

/**
 * Reads a JSON state file: null when it does not exist; throws DamagedStateFileError
 * (naming the file, the problem and REMEDY) when it is empty, cut short, not JSON or
 * not of the shape CHECK expects. Callers whose file can be rebuilt catch that error,
 * log a warning and rebuild.
 */
export function readJsonState<T>(file: string, check: ShapeCheck, remedy: string): T | null {
  if (!existsSync(file)) return null;
  const text = readFileSync(file, "utf8");
  if (text.trim() === "") throw new DamagedStateFileError(file, text.length === 0 ? "empty" : "only white space", remedy);
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    const head = JSON.stringify(text.slice(0, SNIPPET_CHARS));
    throw new DamagedStateFileError(file, `not valid JSON (${(err as Error).message}; ${text.length} bytes starting ${head})`, remedy);
  }
  const problem = check(v);
  if (problem !== null) throw new DamagedStateFileError(file, `not the expected content: ${problem}`, remedy);
  return v as T;
}

/** Shape-check helpers for ShapeCheck functions. */
export const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

/** The first of PROBLEMS that is a string, else null: `firstProblem(cond ? null : "x is missing", ...)`. */
export function firstProblem(...problems: (string | null)[]): string | null {
  return problems.find((p) => p !== null) ?? null;
}
