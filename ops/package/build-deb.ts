// `npm run package`: builds dist-deb/mailha_VERSION_amd64.deb with dpkg-deb from the
// checkout's last commit (`git archive HEAD`, so others' unsaved or uncommitted edits
// never reach a package, and the package names the commit it came from). Steps, in a
// work folder outside the checkout: the tree, `npm run build` there (the checkout's
// node_modules linked in for tsc), `npm pack`, the tarball unpacked into
// /usr/lib/mailha with `npm ci --omit=dev` (production dependencies only, from the
// lock file), then the wrapper, the units, the maintainer scripts (ops/package/debian,
// systemd, files) and `dpkg-deb --root-owner-group --build`.
// Known gap: the native modules (fuse-native, msgpackr-extract) are linux-x64 builds,
// hence amd64 only.
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createHash } from "node:crypto";
import { run } from "../../common/exec.ts";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, "..", "..");
const OUT_DIR = join(ROOT, "dist-deb");
const STEP_TIMEOUT_MS = 10 * 60_000;
const MAINTAINER_SCRIPTS = ["preinst", "postinst", "prerm", "postrm"] as const;
const UNITS = ["mailha-node.service", "mailha-witness.service"] as const;

export interface DebBuild {
  readonly file: string;
  readonly version: string;
  readonly commit: string;
  readonly sizeBytes: number;
  readonly installedSizeKb: number;
  readonly seconds: number;
}

/** Bytes under DIR (regular files and symlinks, not following them). */
function treeBytes(dir: string): number {
  let sum = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) sum += treeBytes(p);
    else sum += statSync(p, { throwIfNoEntry: false })?.size ?? 0;
  }
  return sum;
}

function md5sums(root: string, dir = root, out: string[] = []): string[] {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) {
      if (p !== join(root, "DEBIAN")) md5sums(root, p, out);
    } else if (e.isFile()) out.push(`${createHash("md5").update(readFileSync(p)).digest("hex")}  ${p.slice(root.length + 1)}`);
  }
  return out;
}

function install(src: string, dst: string, mode: number): void {
  mkdirSync(dirname(dst), { recursive: true });
  copyFileSync(src, dst);
  chmodSync(dst, mode);
}

/** Builds the package; LOG gets one line per step. */
export async function buildDeb(log: (line: string) => void = () => {}): Promise<DebBuild> {
  const t0 = Date.now();
  const commit = (await run("git", ["rev-parse", "HEAD"], { cwd: ROOT })).stdout.trim();
  const work = join(tmpdir(), `mailha-deb-${process.pid}`);
  rmSync(work, { recursive: true, force: true });
  const src = join(work, "src");
  const stage = join(work, "stage");
  mkdirSync(src, { recursive: true });
  try {
    log(`tree of commit ${commit.slice(0, 12)} (git archive HEAD)`);
    await run("sh", ["-c", `git -C "${ROOT}" archive --format=tar HEAD | tar -x -C "${src}"`], { timeoutMs: STEP_TIMEOUT_MS });
    const pkg = JSON.parse(readFileSync(join(src, "package.json"), "utf8")) as { version: string };
    if (!/^\d+\.\d+\.\d+$/.test(pkg.version)) throw new Error(`package.json's version "${pkg.version}" is not MAJOR.MINOR.PATCH`);
    // Every commit its own, increasing version (dpkg orders them by the commit's time), so
    // a package built from a later commit is an upgrade to apt and to mailha deploy.
    const when = (await run("git", ["log", "-1", "--format=%cd", "--date=format-local:%Y%m%d%H%M%S", "HEAD"], { cwd: ROOT, env: { ...process.env, TZ: "UTC" } })).stdout.trim();
    const version = `${pkg.version}+git${when}.${commit.slice(0, 7)}`;
    symlinkSync(join(ROOT, "node_modules"), join(src, "node_modules"));
    log("npm run build");
    await run("npm", ["run", "build"], { cwd: src, timeoutMs: STEP_TIMEOUT_MS });
    log("npm pack");
    const packed = JSON.parse((await run("npm", ["pack", "--ignore-scripts", "--json", "--pack-destination", work], { cwd: src, timeoutMs: STEP_TIMEOUT_MS })).stdout) as { filename: string }[];
    const tarball = join(work, packed[0]!.filename);
    const lib = join(stage, "usr", "lib", "mailha");
    mkdirSync(lib, { recursive: true });
    await run("tar", ["-x", "-z", "-f", tarball, "-C", lib, "--strip-components=1"]);
    // Production dependencies from the lock file; the root's own scripts (prepare =
    // build) must not run here, the dependencies' install scripts may.
    copyFileSync(join(src, "package-lock.json"), join(lib, "package-lock.json"));
    await run("npm", ["pkg", "delete", "scripts"], { cwd: lib });
    log("npm ci --omit=dev");
    await run("npm", ["ci", "--omit=dev", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"], { cwd: lib, timeoutMs: STEP_TIMEOUT_MS });
    rmSync(join(lib, "package-lock.json"));
    rmSync(join(lib, "node_modules", ".package-lock.json"), { force: true });
    if (!existsSync(join(lib, "dist", "ops", "cli", "main.js")) || !existsSync(join(lib, "dist", "build-stamp.json"))) throw new Error("the packed tree has no dist/ops/cli/main.js or dist/build-stamp.json: did npm run build run?");
    writeFileSync(join(lib, "BUILD"), `mailha ${version}, commit ${commit}, built ${new Date().toISOString()}\n`);

    install(join(HERE, "files", "launcher.mjs"), join(lib, "launcher.mjs"), 0o644);
    install(join(HERE, "files", "mailha"), join(stage, "usr", "bin", "mailha"), 0o755);
    for (const u of UNITS) install(join(HERE, "systemd", u), join(stage, "lib", "systemd", "system", u), 0o644);
    const doc = join(stage, "usr", "share", "doc", "mailha");
    install(join(HERE, "files", "README.Debian"), join(doc, "README.Debian"), 0o644);
    install(join(HERE, "files", "node.env.example"), join(doc, "examples", "node.env"), 0o644);
    for (const f of readdirSync(join(src, "examples"))) if (f.endsWith(".yaml")) install(join(src, "examples", f), join(doc, "examples", f), 0o644);
    writeFileSync(join(doc, "copyright"), `mailha ${version}, commit ${commit}\nLicense: MIT (package.json); the bundled npm packages under /usr/lib/mailha/node_modules carry their own licenses.\n`);

    const debian = join(stage, "DEBIAN");
    mkdirSync(debian);
    const installedSizeKb = Math.ceil(treeBytes(stage) / 1024);
    writeFileSync(
      join(debian, "control"),
      readFileSync(join(HERE, "debian", "control.in"), "utf8").replace("@VERSION@", version).replace("@INSTALLED_SIZE_KB@", String(installedSizeKb)).replace("@COMMIT@", commit.slice(0, 12)),
    );
    const nodeCheck = readFileSync(join(HERE, "debian", "node-check.sh"), "utf8");
    for (const s of MAINTAINER_SCRIPTS) {
      writeFileSync(join(debian, s), readFileSync(join(HERE, "debian", s), "utf8").replace("#NODE_CHECK#\n", nodeCheck), { mode: 0o755 });
      chmodSync(join(debian, s), 0o755);
    }
    writeFileSync(join(debian, "md5sums"), md5sums(stage).join("\n") + "\n");

    mkdirSync(OUT_DIR, { recursive: true });
    const file = join(OUT_DIR, `mailha_${version}_amd64.deb`);
    log(`dpkg-deb --build -> ${file}`);
    await run("dpkg-deb", ["--root-owner-group", "-Zxz", "--build", stage, file], { timeoutMs: STEP_TIMEOUT_MS });
    return { file, version, commit, sizeBytes: statSync(file).size, installedSizeKb, seconds: (Date.now() - t0) / 1000 };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const b = await buildDeb((l) => process.stderr.write(`mailha package: ${l}\n`));
  process.stdout.write(`${b.file}: ${(b.sizeBytes / 1e6).toFixed(1)} MB (installed ${(b.installedSizeKb / 1024).toFixed(0)} MiB), mailha ${b.version} from commit ${b.commit.slice(0, 12)}, built in ${b.seconds.toFixed(0)} s\n`);
}
