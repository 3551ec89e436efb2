// A small caching HTTP proxy for apt inside the deploy test machines, which have no
// route off their bridge. It forwards GET requests only to the host's own Debian
// sources (from /etc/apt/sources.list*, given by the caller) and refuses everything
// else. Pool files and by-hash indexes never change under one name, so they are kept
// on disk for good (bounded by size, oldest dropped first); other index files
// (InRelease, Release) for INDEX_TTL_MS. A .deb the host's own apt cache (or the root
// builder's debootstrap cache) already holds is served from there without a download.
// apt checks every file against the signed Release, so a bad cache entry fails loudly
// in apt rather than installing something else.
// Bounds: UPSTREAM_MAX concurrent downloads with a queue of QUEUE_MAX, FILE_BYTES_MAX per
// file, cacheBytesMax in all, UPSTREAM_IDLE_MS without data aborts a download.
import { createReadStream, createWriteStream, existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync, type WriteStream } from "node:fs";
import http from "node:http";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { dirname, join } from "node:path";
import type { AptSource } from "./root.ts";

const UPSTREAM_MAX = 8;
const QUEUE_MAX = 128;
const FILE_BYTES_MAX = 1024 * 1024 * 1024;
const UPSTREAM_IDLE_MS = 60_000;
const INDEX_TTL_MS = 10 * 60_000;
const CONNECTIONS_MAX = 128;

export interface AptProxyOptions {
  readonly address: string;
  readonly port: number;
  readonly sources: readonly AptSource[];
  readonly cacheDir: string;
  readonly cacheBytesMax?: number;
  /** Folders of .deb files named the way apt names them (epoch as %3a). */
  readonly localDebDirs?: readonly string[];
  readonly log?: (line: string) => void;
}

export interface AptProxyStats {
  requests: number;
  refused: number;
  cacheHits: number;
  localDebHits: number;
  upstreamFetches: number;
  upstreamBytes: number;
  servedBytes: number;
  errors: number;
}

export interface AptProxy {
  /** http://ADDRESS:PORT, for Acquire::http::Proxy. */
  readonly url: string;
  /** The source lines a machine's /etc/apt/sources.list should hold (http:// URIs; the proxy upgrades to the host's scheme). */
  readonly sourcesList: string;
  readonly stats: AptProxyStats;
  close(): Promise<void>;
}

interface Upstream {
  readonly host: string;
  readonly prefix: string;
  readonly origin: string;
}

/** Local .deb files by their pool name (pool names carry no epoch; apt's cache names do). */
function indexLocalDebs(dirs: readonly string[]): Map<string, string> {
  const m = new Map<string, string>();
  for (const d of dirs) {
    if (!existsSync(d)) continue;
    for (const f of readdirSync(d)) {
      if (!f.endsWith(".deb")) continue;
      const pool = f.replace(/^([^_]+_)\d+%3a/, "$1");
      if (!m.has(pool)) m.set(pool, join(d, f));
    }
  }
  return m;
}

export async function startAptProxy(o: AptProxyOptions): Promise<AptProxy> {
  const log = o.log ?? (() => {});
  const cacheBytesMax = o.cacheBytesMax ?? 4 * 1024 * 1024 * 1024;
  const upstreams: Upstream[] = o.sources.map((s) => {
    const u = new URL(s.uri);
    return { host: u.host, prefix: u.pathname.replace(/\/+$/, ""), origin: `${u.protocol}//${u.host}` };
  });
  const localDebs = indexLocalDebs(o.localDebDirs ?? []);
  const stats: AptProxyStats = { requests: 0, refused: 0, cacheHits: 0, localDebHits: 0, upstreamFetches: 0, upstreamBytes: 0, servedBytes: 0, errors: 0 };
  mkdirSync(o.cacheDir, { recursive: true });
  const cache = new DiskCache(o.cacheDir, cacheBytesMax);

  let active = 0;
  const queue: (() => void)[] = [];
  const acquire = (): Promise<boolean> => {
    if (active < UPSTREAM_MAX) {
      active++;
      return Promise.resolve(true);
    }
    if (queue.length >= QUEUE_MAX) return Promise.resolve(false);
    return new Promise((r) => queue.push(() => r(true)));
  };
  const release = () => {
    const next = queue.shift();
    if (next) next();
    else active--;
  };

  const refuse = (res: http.ServerResponse, code: number, why: string) => {
    stats.refused++;
    log(`apt proxy: refused (${code}) ${why}`);
    res.writeHead(code, { "content-type": "text/plain" }).end(`${why}\n`);
  };

  const serveFile = (res: http.ServerResponse, file: string, size: number) => {
    res.writeHead(200, { "content-length": String(size), "content-type": "application/octet-stream" });
    stats.servedBytes += size;
    createReadStream(file).on("error", () => res.destroy()).pipe(res);
  };

  const server = http.createServer((req, res) => {
    handle(req, res).catch((e: Error) => {
      stats.errors++;
      log(`apt proxy: ${req.url}: ${e.message}`);
      if (!res.headersSent) res.writeHead(500, { "content-type": "text/plain" }).end(`${e.message}\n`);
      else res.destroy();
    });
  });

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    stats.requests++;
    if (req.method !== "GET") return refuse(res, 405, `method ${req.method}`);
    let url: URL;
    try {
      url = new URL(req.url ?? "");
    } catch {
      return refuse(res, 400, `not a proxy request: ${req.url}`);
    }
    if (url.protocol !== "http:" || url.search || /%2f|%00|%5c/i.test(url.pathname) || url.pathname.includes("/../")) return refuse(res, 403, `not allowed: ${req.url}`);
    const up = upstreams.find((u) => u.host === url.host && url.pathname.startsWith(`${u.prefix}/`));
    if (!up) return refuse(res, 403, `not one of the host's Debian sources: ${url.host}${url.pathname}`);
    const rel = url.pathname.slice(1);
    const immutable = /\/pool\//.test(url.pathname) || /\/by-hash\//.test(url.pathname);
    const cacheFile = join(o.cacheDir, url.host, rel);

    const hit = cache.lookup(cacheFile, immutable ? Infinity : INDEX_TTL_MS);
    if (hit !== null) {
      stats.cacheHits++;
      return serveFile(res, cacheFile, hit);
    }
    if (url.pathname.endsWith(".deb")) {
      const local = localDebs.get(decodeURIComponent(url.pathname.split("/").pop()!));
      if (local && existsSync(local)) {
        stats.localDebHits++;
        return serveFile(res, local, statSync(local).size);
      }
    }
    if (!(await acquire())) return refuse(res, 503, "too many downloads queued");
    try {
      await fetchUpstream(`${up.origin}${url.pathname}`, res, cacheFile);
    } finally {
      release();
    }
  };

  const fetchUpstream = (target: string, res: http.ServerResponse, cacheFile: string) =>
    new Promise<void>((resolve) => {
      stats.upstreamFetches++;
      const get = target.startsWith("https:") ? https.get : http.get;
      const upReq = get(target, { headers: { "user-agent": "mailha-test-apt-proxy" } }, (upRes) => {
        const status = upRes.statusCode ?? 502;
        const len = Number(upRes.headers["content-length"] ?? NaN);
        const headers: http.OutgoingHttpHeaders = {};
        for (const h of ["content-type", "content-length", "last-modified", "location"]) if (upRes.headers[h] !== undefined) headers[h] = upRes.headers[h];
        if (len > FILE_BYTES_MAX) {
          upRes.destroy();
          refuse(res, 502, `${target} is ${len} bytes, above the bound of ${FILE_BYTES_MAX}`);
          return resolve();
        }
        res.writeHead(status, headers);
        let tmp: WriteStream | null = null;
        let tmpName = "";
        if (status === 200) {
          mkdirSync(dirname(cacheFile), { recursive: true });
          tmpName = `${cacheFile}.part-${process.pid}-${Math.random().toString(36).slice(2)}`;
          tmp = createWriteStream(tmpName);
          tmp.on("error", () => (tmp = null));
        }
        let bytes = 0;
        upRes.on("data", (chunk: Buffer) => {
          bytes += chunk.length;
          stats.upstreamBytes += chunk.length;
          stats.servedBytes += chunk.length;
          if (bytes > FILE_BYTES_MAX) {
            upRes.destroy(new Error("file above the size bound"));
            return;
          }
          tmp?.write(chunk);
          if (!res.write(chunk)) {
            upRes.pause();
            res.once("drain", () => upRes.resume());
          }
        });
        upRes.on("end", () => {
          res.end();
          const complete = Number.isNaN(len) || bytes === len;
          if (tmp) {
            const t = tmp;
            t.end(() => {
              try {
                if (complete) {
                  renameSync(tmpName, cacheFile);
                  cache.added(cacheFile, bytes);
                } else rmSync(tmpName, { force: true });
              } catch (e) {
                stats.errors++;
                log(`apt proxy: caching ${cacheFile}: ${(e as Error).message}`);
              }
              resolve();
            });
          } else resolve();
        });
        upRes.on("error", () => {
          stats.errors++;
          tmp?.destroy();
          if (tmpName) rmSync(tmpName, { force: true });
          res.destroy();
          resolve();
        });
      });
      upReq.setTimeout(UPSTREAM_IDLE_MS, () => upReq.destroy(new Error(`no data from ${target} for ${UPSTREAM_IDLE_MS} ms`)));
      upReq.on("error", (e) => {
        stats.errors++;
        log(`apt proxy: ${target}: ${e.message}`);
        if (!res.headersSent) res.writeHead(502, { "content-type": "text/plain" }).end(`${e.message}\n`);
        else res.destroy();
        resolve();
      });
      res.on("close", () => {
        // The client went away: stop the download (it is not cached half-done).
        if (!res.writableFinished) upReq.destroy();
      });
    });

  server.maxConnections = CONNECTIONS_MAX;
  server.keepAliveTimeout = 30_000;
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(o.port, o.address, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  const url = `http://${o.address}:${addr.port}`;
  return {
    url,
    sourcesList: oneLineSources(o.sources),
    stats,
    close: () =>
      new Promise<void>((r) => {
        server.close(() => r());
        server.closeAllConnections();
      }),
  };
}

/** One-line sources (one suite per line) with http:// URIs. */
function oneLineSources(sources: readonly AptSource[]): string {
  const lines: string[] = [];
  for (const s of sources) {
    const u = new URL(s.uri);
    for (const suite of s.suites) lines.push(`deb http://${u.host}${u.pathname.replace(/\/+$/, "")} ${suite} ${s.components.join(" ")}`);
  }
  return `${lines.join("\n")}\n`;
}

/** The proxy's files on disk, with a running total so the size bound holds. */
class DiskCache {
  private total = 0;
  constructor(
    private readonly dir: string,
    private readonly bytesMax: number,
  ) {
    for (const f of walk(dir)) {
      if (f.includes(".part-")) rmSync(f, { force: true });
      else this.total += statSync(f).size;
    }
  }

  /** The size of FILE if it is cached and younger than maxAgeMs, else null. */
  lookup(file: string, maxAgeMs: number): number | null {
    try {
      const st = statSync(file);
      if (!st.isFile()) return null;
      if (Date.now() - st.mtimeMs > maxAgeMs) return null;
      return st.size;
    } catch {
      return null;
    }
  }

  added(_file: string, bytes: number): void {
    this.total += bytes;
    if (this.total <= this.bytesMax) return;
    const files = [...walk(this.dir)].map((f) => ({ f, st: statSync(f) })).sort((a, b) => a.st.mtimeMs - b.st.mtimeMs);
    for (const { f, st } of files) {
      if (this.total <= this.bytesMax * 0.8) break;
      rmSync(f, { force: true });
      this.total -= st.size;
    }
  }
}

function* walk(dir: string): Generator<string> {
  if (!existsSync(dir)) return;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) yield* walk(p);
    else if (e.isFile()) yield p;
  }
}
