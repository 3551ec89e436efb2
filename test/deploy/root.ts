// Prepares the Debian root the deploy test machines boot from: `debootstrap --variant=
// minbase bookworm` from the host's own Debian mirror (read from /etc/apt/sources.list*
// at run time), with systemd, sshd and the host's node binary, cached under
// /var/cache/mailha-test/roots/HASH where HASH covers the whole recipe, so a changed
// recipe (packages, mirror, node binary, customisation version) builds a new root.
// Known gap: the cache key does not cover the mirror's contents; a root built months ago
// keeps its package versions until the recipe changes or the cache is removed.
import { createHash } from "node:crypto";
import { createReadStream, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync, copyFileSync, chmodSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { run } from "../../common/exec.ts";

export const CACHE_DIR = "/var/cache/mailha-test";
const ROOTS_DIR = join(CACHE_DIR, "roots");
const DEBS_DIR = join(CACHE_DIR, "debootstrap-debs");
const COMPLETE = ".mailha-root.json";
const SUITE = "bookworm";
/** Bump when the customisation below changes; part of the cache key. */
const CUSTOMISE_VERSION = 3;
const DEBOOTSTRAP_TIMEOUT_MS = 20 * 60_000;
const LOCK_WAIT_MS = 25 * 60_000;
/** Loop device nodes each machine gets in its /dev. */
export const LOOP_NODES = 64;

export const ROOT_PACKAGES: readonly string[] = ["systemd", "systemd-sysv", "openssh-server", "dbus", "iproute2", "procps", "kmod", "ca-certificates"];

/** One `deb` source of the host's apt configuration. */
export interface AptSource {
  readonly uri: string;
  readonly suites: readonly string[];
  readonly components: readonly string[];
  readonly signedBy?: string;
}

/** The host's Debian sources for SUITE (its archive, -updates and -security), in file order. */
export function hostDebianSources(etc = "/etc/apt"): AptSource[] {
  const files: string[] = [];
  if (existsSync(join(etc, "sources.list"))) files.push(join(etc, "sources.list"));
  const d = join(etc, "sources.list.d");
  if (existsSync(d)) for (const f of readdirSync(d).sort()) if (f.endsWith(".list") || f.endsWith(".sources")) files.push(join(d, f));
  const all: AptSource[] = [];
  for (const f of files) all.push(...(f.endsWith(".sources") ? parseDeb822(readFileSync(f, "utf8")) : parseOneLine(readFileSync(f, "utf8"))));
  const debianKeyring = (s: AptSource) => s.signedBy === undefined || s.signedBy.includes("debian-archive-keyring");
  return all
    .filter((s) => debianKeyring(s) && s.components.includes("main"))
    .map((s) => ({ ...s, suites: s.suites.filter((x) => x === SUITE || x.startsWith(`${SUITE}-`)) }))
    .filter((s) => s.suites.length > 0);
}

function parseDeb822(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    let last = "";
    for (const line of stanza.split("\n")) {
      if (line.startsWith("#") || !line.trim()) continue;
      if (/^\s/.test(line) && last) {
        fields.set(last, `${fields.get(last)} ${line.trim()}`);
        continue;
      }
      const m = /^([A-Za-z-]+):\s*(.*)$/.exec(line);
      if (m) fields.set((last = m[1]!.toLowerCase()), m[2]!.trim());
    }
    if (!(fields.get("types") ?? "").split(/\s+/).includes("deb")) continue;
    if (/^(no|false)$/i.test(fields.get("enabled") ?? "yes")) continue;
    const words = (k: string) => (fields.get(k) ?? "").split(/\s+/).filter(Boolean);
    const signedBy = fields.get("signed-by");
    for (const uri of words("uris")) out.push({ uri: uri.replace(/\/+$/, ""), suites: words("suites"), components: words("components"), ...(signedBy ? { signedBy } : {}) });
  }
  return out;
}

function parseOneLine(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*/, "").trim();
    const m = /^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s+(.+)$/.exec(line);
    if (!m) continue;
    const signedBy = /signed-by=(\S+)/.exec(m[1] ?? "")?.[1];
    out.push({ uri: m[2]!.replace(/\/+$/, ""), suites: [m[3]!], components: m[4]!.split(/\s+/), ...(signedBy ? { signedBy } : {}) });
  }
  return out;
}

/** The host's archive mirror for SUITE itself (what debootstrap uses). */
export function hostMirror(sources = hostDebianSources()): string {
  const s = sources.find((x) => x.suites.includes(SUITE));
  if (!s) throw new Error(`no Debian ${SUITE} source with component main in /etc/apt/sources.list*; the deploy test machines need the host's mirror`);
  return s.uri;
}

export interface RootRecipe {
  readonly suite: string;
  readonly variant: "minbase";
  readonly packages: readonly string[];
  readonly mirror: string;
  readonly nodeSha256: string;
  readonly customise: number;
}

export interface PreparedRoot {
  readonly dir: string;
  readonly hash: string;
  readonly recipe: RootRecipe;
  /** Seconds spent building now; 0 when the cached root was used. */
  readonly builtSeconds: number;
  readonly nodeVersion: string;
}

async function sha256File(file: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest("hex");
}

export async function rootRecipe(): Promise<RootRecipe> {
  return { suite: SUITE, variant: "minbase", packages: ROOT_PACKAGES, mirror: hostMirror(), nodeSha256: await sha256File(process.execPath), customise: CUSTOMISE_VERSION };
}

export function recipeHash(r: RootRecipe): string {
  return createHash("sha256").update(JSON.stringify(r)).digest("hex").slice(0, 16);
}

const pidAlive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
};

/** A directory lock with the holder's pid; a dead holder's lock is taken over. Bounded wait. */
async function withLock<T>(lockDir: string, fn: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + LOCK_WAIT_MS;
  for (;;) {
    try {
      mkdirSync(lockDir);
      writeFileSync(join(lockDir, "pid"), String(process.pid));
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      const pid = Number(existsSync(join(lockDir, "pid")) ? readFileSync(join(lockDir, "pid"), "utf8") : "0");
      if (!pid || !pidAlive(pid)) {
        rmSync(lockDir, { recursive: true, force: true });
        continue;
      }
      if (Date.now() > deadline) throw new Error(`the root cache ${lockDir} is held by pid ${pid} for too long`);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  try {
    return await fn();
  } finally {
    rmSync(lockDir, { recursive: true, force: true });
  }
}

/** The cached root for the current recipe, built first if missing. */
export async function prepareRoot(log: (line: string) => void = () => {}): Promise<PreparedRoot> {
  const recipe = await rootRecipe();
  const hash = recipeHash(recipe);
  const dir = join(ROOTS_DIR, hash);
  mkdirSync(ROOTS_DIR, { recursive: true });
  return withLock(join(ROOTS_DIR, ".lock"), async () => {
    let builtSeconds = 0;
    if (!existsSync(join(dir, COMPLETE))) {
      const t0 = Date.now();
      log(`building the machines' root ${hash} (debootstrap ${SUITE} from ${recipe.mirror})`);
      await buildRoot(dir, recipe);
      builtSeconds = (Date.now() - t0) / 1000;
      log(`root ${hash} built in ${builtSeconds.toFixed(1)} s`);
      pruneOtherRoots(hash);
    }
    const { stdout } = await run("chroot", [dir, "/usr/local/bin/node", "--version"]);
    return { dir, hash, recipe, builtSeconds, nodeVersion: stdout.trim() };
  });
}

/** Bounded cache: only the current recipe's root is kept. */
function pruneOtherRoots(keep: string): void {
  for (const e of readdirSync(ROOTS_DIR)) {
    if (e === keep || e === ".lock") continue;
    rmSync(join(ROOTS_DIR, e), { recursive: true, force: true });
  }
}

async function buildRoot(dir: string, recipe: RootRecipe): Promise<void> {
  const tmp = `${dir}.build`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(DEBS_DIR, { recursive: true });
  await run("debootstrap", [`--variant=${recipe.variant}`, `--cache-dir=${DEBS_DIR}`, `--include=${recipe.packages.join(",")}`, recipe.suite, tmp, recipe.mirror], { timeoutMs: DEBOOTSTRAP_TIMEOUT_MS });
  customise(tmp);
  const { stdout } = await run("chroot", [tmp, "/usr/local/bin/node", "--version"]);
  if (!stdout.startsWith("v20.")) throw new Error(`node in the machines' root reports ${stdout.trim()}, not v20`);
  writeFileSync(join(tmp, COMPLETE), JSON.stringify({ ...recipe, builtAt: new Date().toISOString() }, null, 2));
  rmSync(dir, { recursive: true, force: true });
  renameSync(tmp, dir);
}

/** What every machine shares; per-machine identity is written at clone time (machines.ts). */
function customise(root: string): void {
  copyFileSync(process.execPath, join(root, "usr/local/bin/node"));
  chmodSync(join(root, "usr/local/bin/node"), 0o755);
  // Identity is per clone: no machine-id, no host keys, in the shared root.
  writeFileSync(join(root, "etc/machine-id"), "");
  rmSync(join(root, "var/lib/dbus/machine-id"), { force: true });
  for (const f of readdirSync(join(root, "etc/ssh"))) if (f.startsWith("ssh_host_")) rmSync(join(root, "etc/ssh", f));
  writeFileSync(
    join(root, "etc/ssh/sshd_config.d/mailha-test.conf"),
    "# deploy test machines: key login as root only, one ed25519 host key, no DNS lookups\nHostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\n",
  );
  writeFileSync(join(root, "etc/apt/apt.conf.d/50mailha-test"), 'Acquire::Languages "none";\nAcquire::http::Timeout "60";\nAcquire::Retries "2";\n');
  // No DNS server is reachable from a machine; resolution fails at once instead of waiting.
  writeFileSync(join(root, "etc/resolv.conf"), "# deploy test machine: no DNS; peers are in /etc/hosts\noptions timeout:1 attempts:1\n");
  writeFileSync(join(root, "etc/fstab"), "# deploy test machine: nothing to mount\n");
  // No udev in a container: make loop device nodes at boot, so `losetup -f` finds the
  // free device the host's /dev/loop-control hands out (a number no one can predict).
  writeFileSync(join(root, "usr/local/sbin/mailha-test-loop-nodes"), `#!/bin/sh\n# deploy test machine: /dev/loop0..${LOOP_NODES - 1} (no udev here)\ni=0\nwhile [ $i -lt ${LOOP_NODES} ]; do\n  [ -e /dev/loop$i ] || mknod -m 0660 /dev/loop$i b 7 $i\n  i=$((i + 1))\ndone\n`, { mode: 0o755 });
  writeFileSync(
    join(root, "etc/systemd/system/mailha-test-loop-nodes.service"),
    "[Unit]\nDescription=Loop device nodes for the deploy test machine\nDefaultDependencies=no\nBefore=sysinit.target\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/local/sbin/mailha-test-loop-nodes\n\n[Install]\nWantedBy=sysinit.target\n",
  );
  mkdirSync(join(root, "etc/systemd/system/sysinit.target.wants"), { recursive: true });
  symlinkSync("/etc/systemd/system/mailha-test-loop-nodes.service", join(root, "etc/systemd/system/sysinit.target.wants/mailha-test-loop-nodes.service"));
  for (const f of readdirSync(join(root, "var/cache/apt/archives"))) if (f.endsWith(".deb")) rmSync(join(root, "var/cache/apt/archives", f));
}
