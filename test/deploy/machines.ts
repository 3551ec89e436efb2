// Booted Debian machines for the deploy test: each is a systemd-nspawn container (systemd
// as PID 1, sshd, the host's node 20) on a copy of one cached root (root.ts), in its own
// network namespace with a veth to the host bridge mhdep0 (10.201.0.0/24), reached over
// ssh with a key this harness makes. apt inside goes through a caching proxy on the
// bridge address (apt-proxy.ts), the machines' only way off their network.
// Everything it makes is named mhdep* or lives under BASE_DIR, so cleanup finds
// leftovers of a crashed run by name; `cleanupLeftovers` runs before every boot and in
// destroy(), and is idempotent.
// Known gaps: a container is effectively root on the host (no device or capability
// limits without registration: test use only); loop devices are the host's own, shared
// with anything else on this machine; kill() is a power loss for the processes, but
// the host's page cache survives it (written data is not lost the way a disk loses it).
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, rmSync, rmdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { run, runAll, sleep, tryRun } from "../../common/exec.ts";
import { CACHE_DIR, hostDebianSources, prepareRoot } from "./root.ts";
import { startAptProxy, type AptProxy, type AptProxyStats } from "./apt-proxy.ts";

/** Machine roots, the ssh key, known hosts, logs: all of one run, removed by destroy(). */
export const BASE_DIR = "/var/tmp/mailha-deploy";
export const BRIDGE = "mhdep0";
const NET = "10.201.0";
export const HOST_ADDRESS = `${NET}.1`;
const PREFIX_LEN = 24;
const FIRST_MACHINE_OCTET = 11;
const APT_PROXY_PORT = 3142;
const NAME_RE = /^[a-z][a-z0-9]{0,7}$/;
const MACHINES_MAX = 8;
const BOOT_TIMEOUT_MS = 60_000;
const SSH_TIMEOUT_MS = 120_000;
const STOP_TIMEOUT_MS = 15_000;
const OWNER_FILE = "owner.pid";

export const netnsName = (name: string) => `mhdep-${name}`;
const hostVeth = (name: string) => `mhdepv-${name}`;
const peerVeth = (name: string) => `mhdepp-${name}`;
const cgroupName = (name: string) => `mhdep-${name}`;

export interface ExecResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export interface SshOptions {
  /** Written to the command's standard input, which is then closed. */
  readonly input?: string;
  readonly timeoutMs?: number;
}

export interface Machine {
  readonly name: string;
  readonly address: string;
  readonly netns: string;
  /** The machine's root directory on the host. */
  readonly root: string;
  /** Runs CMD with the remote shell as root. Never throws for a non-zero exit. */
  ssh(cmd: string, opts?: SshOptions): Promise<ExecResult>;
  /** SIGKILL of the machine's init (systemd, PID 1 inside): a power loss; says how long until it was gone and which FUSE connections it had to abort. */
  kill(): Promise<{ seconds: number; abortedFuse: string[] }>;
  /** Boots the machine (again); resolves when ssh answers, with the seconds that took. */
  start(): Promise<number>;
  /** Takes the host end of the machine's veth down: its cable is pulled. */
  cutNetwork(): Promise<void>;
  restoreNetwork(): Promise<void>;
  isRunning(): boolean;
}

export interface CleanupReport {
  readonly killed: number[];
  readonly loops: string[];
  readonly mounts: string[];
  readonly namespaces: string[];
  readonly links: string[];
  readonly cgroups: string[];
  readonly removedBaseDir: boolean;
  /** Milliseconds per step, to see where a slow cleanup spends its time. */
  readonly stepMs: Readonly<Record<string, number>>;
}

export interface Machines {
  readonly machines: readonly Machine[];
  readonly byName: Readonly<Record<string, Machine>>;
  /** ssh -F FILE NAME: Host entries for every machine (by name and by address). */
  readonly sshConfigFile: string;
  readonly keyFile: string;
  readonly knownHostsFile: string;
  readonly hostAddress: string;
  readonly aptProxyUrl: string;
  readonly aptProxyStats: AptProxyStats;
  readonly timings: { readonly rootBuildSeconds: number; readonly cloneSeconds: number; readonly bootToSshSeconds: Readonly<Record<string, number>> };
  destroy(): Promise<CleanupReport>;
}

export interface BootOptions {
  readonly names: readonly string[];
  readonly log?: (line: string) => void;
  readonly bootTimeoutMs?: number;
  /**
   * How each machine gets its root: "overlay" (default: an overlayfs over the cached root,
   * nothing copied, only the changes written) or "copy" (`cp -a --reflink=auto`).
   */
  readonly clone?: "overlay" | "copy";
}

/** The cgroup hierarchies a container's own cgroup must be made in (hybrid or unified). */
function cgroupRoots(): string[] {
  if (existsSync("/sys/fs/cgroup/cgroup.controllers")) return ["/sys/fs/cgroup"];
  return ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"].filter((d) => existsSync(join(d, "cgroup.procs")));
}

const pidAlive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
};

function procIds(): number[] {
  return readdirSync("/proc")
    .filter((x) => /^\d+$/.test(x))
    .map(Number);
}

function readProc(pid: number, file: string): string {
  try {
    return readFileSync(`/proc/${pid}/${file}`, "utf8");
  } catch {
    return "";
  }
}

/** Inode of a network namespace file (/run/netns/NAME), or null. */
function netnsInode(ns: string): number | null {
  try {
    return statSync(`/run/netns/${ns}`).ino;
  } catch {
    return null;
  }
}

/** PIDs of processes in network namespace NS (by inode, as `ip netns pids` does). */
function pidsInNetns(ns: string): number[] {
  const ino = netnsInode(ns);
  if (ino === null) return [];
  const out: number[] = [];
  for (const pid of procIds()) {
    try {
      if (readlinkSync(`/proc/${pid}/ns/net`) === `net:[${ino}]`) out.push(pid);
    } catch {
      // gone, or a kernel thread
    }
  }
  return out;
}

/** The container's init: PID 1 of its own PID namespace, in the machine's netns. */
function initPid(ns: string): number | null {
  for (const pid of pidsInNetns(ns)) {
    const m = /^NSpid:\s+(.+)$/m.exec(readProc(pid, "status"));
    const ids = m ? m[1]!.trim().split(/\s+/) : [];
    if (ids.length >= 2 && ids[ids.length - 1] === "1") return pid;
  }
  return null;
}

/** systemd-nspawn processes whose command line names a root under BASE_DIR. */
function nspawnPids(): number[] {
  return procIds().filter((pid) => {
    const argv = readProc(pid, "cmdline").split("\0");
    return argv[0]?.endsWith("systemd-nspawn") && argv.some((a) => a.startsWith(BASE_DIR));
  });
}

/** Names in `ip netns` and `ip link` that carry this harness's prefix. */
async function ourNamespaces(): Promise<string[]> {
  const r = await tryRun("ip", ["-j", "netns", "list"]);
  if (!r || !r.stdout.trim()) return [];
  return (JSON.parse(r.stdout) as { name: string }[]).map((x) => x.name).filter((x) => x.startsWith("mhdep-"));
}

async function ourLinks(): Promise<string[]> {
  const r = await tryRun("ip", ["-j", "link", "show"]);
  if (!r) return [];
  return (JSON.parse(r.stdout) as { ifname: string }[]).map((x) => x.ifname).filter((x) => x.startsWith("mhdep"));
}

function ourCgroups(): string[] {
  const out: string[] = [];
  for (const r of cgroupRoots()) if (existsSync(r)) for (const e of readdirSync(r)) if (e.startsWith("mhdep-")) out.push(join(r, e));
  return out;
}

/** Removes a cgroup directory and every one below it, deepest first. Bounded retries. */
async function removeCgroupTree(dir: string): Promise<void> {
  for (let attempt = 0; attempt < 50; attempt++) {
    if (!existsSync(dir)) return;
    const dirs: string[] = [];
    const walk = (d: string) => {
      dirs.push(d);
      for (const e of readdirSync(d, { withFileTypes: true })) if (e.isDirectory()) walk(join(d, e.name));
    };
    try {
      walk(dir);
      for (const d of dirs.reverse()) rmdirSync(d);
      return;
    } catch {
      await sleep(100); // processes still leaving it
    }
  }
  throw new Error(`cgroup ${dir} could not be removed (processes still in it?)`);
}

const FUSECTL = "/sys/fs/fuse/connections";

/** Marks that the harness mounted fusectl (cleanup unmounts it again). */
const FUSECTL_MARK = join(BASE_DIR, "fusectl-mounted");

/** Makes sure fusectl is mounted; false where FUSE or fusectl is not there. */
function fusectlReady(): boolean {
  if (!existsSync(FUSECTL)) return false;
  if (readdirSync(FUSECTL).length === 0) {
    if (!existsSync(BASE_DIR)) return false; // no machines of ours: nothing to abort
    try {
      execFileSync("mount", ["-t", "fusectl", "none", FUSECTL], { stdio: "ignore", timeout: 10_000 });
      writeFileSync(FUSECTL_MARK, "");
    } catch {
      return false; // mounted already (no connections), or not possible here
    }
  }
  return true;
}

/** The FUSE connections (fusectl names: the mount's device minor) that these processes' mount tables name. */
function fuseMountsOf(pids: readonly number[]): Set<string> {
  const mounted = new Set<string>();
  for (const pid of pids) {
    let text: string;
    try {
      text = readFileSync(`/proc/${pid}/mountinfo`, "utf8");
    } catch {
      continue;
    }
    for (const line of text.split("\n")) {
      const f = line.split(" ");
      const dash = f.indexOf("-");
      if (dash > 0 && /^fuse/.test(f[dash + 1] ?? "")) mounted.add(String(Number(f[2]!.split(":")[1])));
    }
  }
  return mounted;
}

function abortFuse(conns: Iterable<string>): string[] {
  const aborted: string[] = [];
  for (const conn of conns) {
    try {
      writeFileSync(join(FUSECTL, conn, "abort"), "1");
      aborted.push(conn);
    } catch {
      // gone meanwhile
    }
  }
  return aborted;
}

/** FUSE connections that no process's mount table names any more (a mount in a machine's namespace that died with it). */
function orphanFuse(): string[] {
  if (!fusectlReady()) return [];
  const mounted = fuseMountsOf(procIds());
  return readdirSync(FUSECTL).filter((c) => !mounted.has(c));
}

/** The host's loop devices: name, and the backing file's inode and MAJOR:MINOR (null when losetup cannot read them). */
async function listLoops(): Promise<{ name: string; ino: string | null; dev: string | null }[]> {
  const r = await tryRun("losetup", ["-J", "--list", "-O", "NAME,BACK-INO,BACK-MAJ:MIN"], { timeoutMs: 30_000 });
  if (!r || !r.stdout.trim()) return [];
  const list = (JSON.parse(r.stdout) as { loopdevices: { name: string; "back-ino": string | number | null; "back-maj:min": string | null }[] }).loopdevices;
  return list.map((l) => ({ name: l.name, ino: l["back-ino"] === null ? null : String(l["back-ino"]), dev: l["back-maj:min"] === null ? null : l["back-maj:min"].replace(/\s/g, "") }));
}

/** Loop devices whose backing file lies under BASE_DIR (matched by device and inode). */
async function ourLoops(): Promise<string[]> {
  if (!existsSync(BASE_DIR)) return [];
  // The backing file's path is the one seen inside the machine, so match its file system
  // (the host's, or a machine's overlay) and inode instead.
  const devs = new Set([BASE_DIR, ...mountsUnder(BASE_DIR)].map((d) => devString(statSync(d).dev)));
  const candidates = (await listLoops()).filter((l) => l.ino !== null && l.dev !== null && devs.has(l.dev));
  const out: string[] = [];
  for (const l of candidates) {
    const f = await tryRun("find", [BASE_DIR, "-inum", l.ino!, "-print", "-quit"], { timeoutMs: 60_000 });
    if (f && f.stdout.trim()) out.push(l.name);
  }
  return out;
}

const FUSE_LOOPS_FILE = "fuse-loops.json";

/**
 * Notes the loop devices backed by a file on one of these FUSE connections (a node's
 * volume export, mounted in its machine), while that can still be read: once the FUSE
 * server is gone, losetup can no longer say what backs them, and cleanup detaches them
 * from this list.
 */
async function recordFuseLoops(conns: ReadonlySet<string>): Promise<void> {
  if (conns.size === 0 || !existsSync(BASE_DIR)) return;
  const onThem = new Set([...conns].map((c) => `0:${c}`));
  const found = (await listLoops()).filter((l) => l.dev !== null && onThem.has(l.dev)).map((l) => l.name);
  if (found.length) writeFileSync(join(BASE_DIR, FUSE_LOOPS_FILE), JSON.stringify([...new Set([...recordedFuseLoops(), ...found])]));
}

/** Of the RECORDED loops, those still backed by a dead FUSE file (no longer readable, or on an orphaned connection). */
async function deadFuseLoops(recorded: readonly string[], orphans: readonly string[]): Promise<string[]> {
  if (recorded.length === 0) return [];
  const dead = new Set(orphans.map((c) => `0:${c}`));
  return (await listLoops()).filter((l) => recorded.includes(l.name) && (l.dev === null || dead.has(l.dev))).map((l) => l.name);
}

function recordedFuseLoops(): string[] {
  try {
    return (JSON.parse(readFileSync(join(BASE_DIR, FUSE_LOOPS_FILE), "utf8")) as string[]).filter((d) => /^\/dev\/loop\d+$/.test(d));
  } catch {
    return [];
  }
}

/** MAJOR:MINOR of a Linux dev_t, as losetup prints it. */
function devString(dev: number): string {
  const major = Math.floor(dev / 256) & 0xfff;
  const minor = (dev & 0xff) | (Math.floor(dev / 4096) & 0xfff00);
  return `${major}:${minor}`;
}

async function detachLoop(dev: string): Promise<boolean> {
  // A device the container made has no node in the host's /dev (no udev): make one.
  let node = dev;
  let tmpNode: string | null = null;
  if (!existsSync(dev)) {
    const minor = Number(/loop(\d+)$/.exec(dev)?.[1] ?? NaN);
    if (!Number.isInteger(minor)) return false;
    tmpNode = join(CACHE_DIR, `loop-node-${minor}`);
    mkdirSync(CACHE_DIR, { recursive: true });
    rmSync(tmpNode, { force: true });
    await run("mknod", [tmpNode, "b", "7", String(minor)]);
    node = tmpNode;
  }
  try {
    for (let attempt = 0; attempt < 20; attempt++) {
      if (await tryRun("losetup", ["-d", node])) return true;
      await sleep(200);
    }
    return false;
  } finally {
    if (tmpNode) rmSync(tmpNode, { force: true });
  }
}

function mountsUnder(dir: string): string[] {
  const out: string[] = [];
  for (const line of readFileSync("/proc/self/mountinfo", "utf8").split("\n")) {
    const mp = line.split(" ")[4];
    if (mp && (mp === dir || mp.startsWith(`${dir}/`))) out.push(mp.replace(/\\040/g, " "));
  }
  return out.sort((a, b) => b.length - a.length);
}

/**
 * Removes everything of this harness, from this run or an earlier crashed one: the
 * machines' processes, loop devices backed by their files, mounts under BASE_DIR,
 * namespaces, links, cgroups (deepest first) and BASE_DIR. Safe when nothing is there.
 */
export async function cleanupLeftovers(): Promise<CleanupReport> {
  const stepMs: Record<string, number> = {};
  let tStep = Date.now();
  const step = (name: string) => {
    stepMs[name] = Date.now() - tStep;
    tStep = Date.now();
  };
  const killed: number[] = [];
  const namespaces = await ourNamespaces();
  await recordFuseLoops(fuseMountsOf(namespaces.flatMap((ns) => pidsInNetns(ns))));
  for (const ns of namespaces) {
    for (const pid of pidsInNetns(ns)) {
      try {
        process.kill(pid, "SIGKILL");
        killed.push(pid);
      } catch {
        // already gone
      }
    }
  }
  const deadline = Date.now() + STOP_TIMEOUT_MS;
  while (Date.now() < deadline && (nspawnPids().length > 0 || namespaces.some((ns) => pidsInNetns(ns).length > 0))) await sleep(100);
  for (const pid of nspawnPids()) {
    try {
      process.kill(pid, "SIGKILL");
      killed.push(pid);
    } catch {
      // gone
    }
  }
  step("processes");
  // A machine killed with its node running leaves ext4 on a loop device over a FUSE file
  // whose server is gone: the loop's I/O waits forever (losetup -a hangs). Aborting the
  // FUSE connections nothing mounts any more fails that I/O, so the loops can go.
  const orphans = orphanFuse();
  abortFuse(orphans);
  const loops: string[] = [];
  for (const l of new Set([...(await ourLoops()), ...(await deadFuseLoops(recordedFuseLoops(), orphans))])) if (await detachLoop(l)) loops.push(l);
  step("loops");
  const mounts = mountsUnder(BASE_DIR);
  for (const m of mounts) if (!(await tryRun("umount", [m]))) await tryRun("umount", ["-l", m]);
  for (const ns of namespaces) await tryRun("ip", ["netns", "del", ns]);
  const links = await ourLinks();
  for (const l of links) await tryRun("ip", ["link", "del", l]);
  step("mounts and network");
  const cgroups = ourCgroups();
  for (const c of cgroups) await removeCgroupTree(c);
  step("cgroups");
  if (existsSync(FUSECTL_MARK)) await tryRun("umount", [FUSECTL]);
  const removedBaseDir = existsSync(BASE_DIR);
  rmSync(BASE_DIR, { recursive: true, force: true });
  step("files");
  return { killed, loops, mounts, namespaces, links, cgroups, removedBaseDir, stepMs };
}

/** Refuses to start while another live process owns BASE_DIR (another deploy test run). */
function assertNoOtherRun(): void {
  const f = join(BASE_DIR, OWNER_FILE);
  if (!existsSync(f)) return;
  const pid = Number(readFileSync(f, "utf8"));
  if (pid && pid !== process.pid && pidAlive(pid)) throw new Error(`another deploy test run (pid ${pid}) is using ${BASE_DIR} and ${BRIDGE}; wait for it or stop it`);
}

async function assertSubnetFree(): Promise<void> {
  const { stdout } = await run("ip", ["-j", "-4", "addr", "show"]);
  for (const dev of JSON.parse(stdout) as { ifname: string; addr_info?: { local: string }[] }[]) {
    for (const a of dev.addr_info ?? []) if (a.local.startsWith(`${NET}.`)) throw new Error(`${a.local} is already on ${dev.ifname}; the deploy test machines need ${NET}.0/${PREFIX_LEN} to themselves`);
  }
}

const ip = (...args: string[]) => run("ip", args, { timeoutMs: 10_000 });

function execSsh(configFile: string, host: string, cmd: string, opts: SshOptions = {}): Promise<ExecResult> {
  return new Promise((resolve) => {
    const child = spawn("ssh", ["-F", configFile, host, "--", cmd], { stdio: [opts.input === undefined ? "ignore" : "pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout!.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    if (opts.input !== undefined) {
      child.stdin!.on("error", () => {});
      child.stdin!.end(opts.input);
    }
    const timeoutMs = opts.timeoutMs ?? SSH_TIMEOUT_MS;
    const t = setTimeout(() => {
      stderr += `\n(ssh ${host}: killed after ${timeoutMs} ms)`;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.on("error", (e) => {
      clearTimeout(t);
      resolve({ code: -1, stdout, stderr: `${stderr}${e.message}` });
    });
    child.on("close", (code) => {
      clearTimeout(t);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

/** Boots the named machines (a copy of the cached root each) and starts the apt proxy. */
export async function bootMachines(opts: BootOptions): Promise<Machines> {
  const log = opts.log ?? (() => {});
  const names = opts.names;
  if (names.length === 0 || names.length > MACHINES_MAX) throw new Error(`between 1 and ${MACHINES_MAX} machines, not ${names.length}`);
  for (const n of names) if (!NAME_RE.test(n)) throw new Error(`machine name "${n}" must match ${NAME_RE}`);
  if (new Set(names).size !== names.length) throw new Error(`machine names repeat: ${names.join(", ")}`);
  if (process.getuid?.() !== 0) throw new Error("the deploy test machines need root (namespaces, cgroups, systemd-nspawn)");
  for (const tool of ["debootstrap", "systemd-nspawn", "ssh", "ssh-keygen"]) {
    if (!(await tryRun("sh", ["-c", `command -v ${tool}`]))) throw new Error(`${tool} is missing: run \`mailha setup\` (it installs debootstrap, systemd-container, openssh-client)`);
  }
  assertNoOtherRun();
  const left = await cleanupLeftovers();
  if (left.killed.length || left.namespaces.length || left.links.length || left.cgroups.length || left.loops.length) log(`removed leftovers of an earlier run: ${JSON.stringify(left)}`);
  await assertSubnetFree();

  const root = await prepareRoot(log);
  mkdirSync(BASE_DIR, { recursive: true, mode: 0o700 });
  chmodSync(BASE_DIR, 0o700);
  writeFileSync(join(BASE_DIR, OWNER_FILE), String(process.pid));
  const keyDir = join(BASE_DIR, "ssh");
  mkdirSync(keyDir, { mode: 0o700 });
  const keyFile = join(keyDir, "id_ed25519");
  await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "mailha-deploy-test", "-f", keyFile]);
  chmodSync(keyFile, 0o600);
  const pubKey = readFileSync(`${keyFile}.pub`, "utf8");
  const knownHostsFile = join(keyDir, "known_hosts");
  const sshConfigFile = join(keyDir, "config");
  const logDir = join(BASE_DIR, "logs");
  mkdirSync(logDir);

  const machines: MachineImpl[] = [];
  let proxy: AptProxy | null = null;
  const destroy = async (): Promise<CleanupReport> => {
    for (const m of machines) m.forget();
    if (proxy) await proxy.close();
    proxy = null;
    return cleanupLeftovers();
  };

  try {
    // Network: the bridge with the host's address, one namespace and veth per machine.
    await ip("link", "add", BRIDGE, "type", "bridge");
    await ip("addr", "add", `${HOST_ADDRESS}/${PREFIX_LEN}`, "dev", BRIDGE);
    await ip("link", "set", BRIDGE, "up");
    const addresses = names.map((_, i) => `${NET}.${FIRST_MACHINE_OCTET + i}`);
    for (const [i, n] of names.entries()) {
      const ns = netnsName(n);
      await ip("netns", "add", ns);
      await ip("-n", ns, "link", "set", "lo", "up");
      await ip("link", "add", hostVeth(n), "type", "veth", "peer", "name", peerVeth(n));
      await ip("link", "set", peerVeth(n), "netns", ns);
      await ip("-n", ns, "link", "set", peerVeth(n), "name", "eth0");
      await ip("-n", ns, "addr", "add", `${addresses[i]}/${PREFIX_LEN}`, "dev", "eth0");
      await ip("-n", ns, "link", "set", "eth0", "up");
      await ip("link", "set", hostVeth(n), "master", BRIDGE);
      await ip("link", "set", hostVeth(n), "up");
    }

    proxy = await startAptProxy({ address: HOST_ADDRESS, port: APT_PROXY_PORT, sources: hostDebianSources(), cacheDir: join(CACHE_DIR, "apt-proxy"), localDebDirs: ["/var/cache/apt/archives", join(CACHE_DIR, "debootstrap-debs")], log });

    // One copy of the root per machine, each with its own identity.
    const tClone = Date.now();
    const hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", `${HOST_ADDRESS}\tmhdep-host`, ...names.map((n, i) => `${addresses[i]}\t${n}`)].join("\n") + "\n";
    const known: string[] = [];
    const sshConfig: string[] = ["# deploy test machines only (written by test/deploy/machines.ts)"];
    for (const [i, n] of names.entries()) {
      const home = join(BASE_DIR, "machines", n);
      const dir = join(home, "root");
      mkdirSync(home, { recursive: true });
      if ((opts.clone ?? "overlay") === "overlay") {
        for (const d of ["upper", "work", "root"]) mkdirSync(join(home, d));
        await run("mount", ["-t", "overlay", `mhdep-${n}`, "-o", `lowerdir=${root.dir},upperdir=${join(home, "upper")},workdir=${join(home, "work")}`, dir]);
      } else await run("cp", ["-a", "--reflink=auto", root.dir, dir], { timeoutMs: 300_000 });
      const machineId = randomBytes(16).toString("hex");
      writeFileSync(join(dir, "etc/machine-id"), `${machineId}\n`);
      writeFileSync(join(dir, "var/lib/dbus/machine-id"), `${machineId}\n`);
      await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", `root@${n}`, "-f", join(dir, "etc/ssh/ssh_host_ed25519_key")]);
      const hostKey = readFileSync(join(dir, "etc/ssh/ssh_host_ed25519_key.pub"), "utf8").split(" ").slice(0, 2).join(" ");
      known.push(`${n},${addresses[i]} ${hostKey}`);
      writeFileSync(join(dir, "etc/hostname"), `${n}\n`);
      writeFileSync(join(dir, "etc/hosts"), hosts);
      mkdirSync(join(dir, "root/.ssh"), { recursive: true, mode: 0o700 });
      writeFileSync(join(dir, "root/.ssh/authorized_keys"), pubKey, { mode: 0o600 });
      writeFileSync(join(dir, "etc/apt/sources.list"), proxy.sourcesList);
      rmSync(join(dir, "etc/apt/sources.list.d"), { recursive: true, force: true });
      mkdirSync(join(dir, "etc/apt/sources.list.d"));
      writeFileSync(join(dir, "etc/apt/apt.conf.d/01mailha-test-proxy"), `Acquire::http::Proxy "${proxy.url}";\n`);
      sshConfig.push(
        `Host ${n} ${addresses[i]}`,
        `  HostName ${addresses[i]}`,
        "  User root",
        `  IdentityFile ${keyFile}`,
        "  IdentitiesOnly yes",
        // The host keys are known (made above), so checking stays on, with no prompts.
        "  StrictHostKeyChecking yes",
        `  UserKnownHostsFile ${knownHostsFile}`,
        "  GlobalKnownHostsFile /dev/null",
        "  BatchMode yes",
        "  ConnectTimeout 5",
        "  ServerAliveInterval 5",
        "  ServerAliveCountMax 3",
        "  LogLevel ERROR",
      );
      machines.push(new MachineImpl(n, addresses[i]!, dir, sshConfigFile, logDir, opts.bootTimeoutMs ?? BOOT_TIMEOUT_MS));
    }
    writeFileSync(knownHostsFile, `${known.join("\n")}\n`, { mode: 0o600 });
    writeFileSync(sshConfigFile, `${sshConfig.join("\n")}\n`, { mode: 0o600 });
    const cloneSeconds = (Date.now() - tClone) / 1000;

    const boot = await Promise.all(machines.map((m) => m.start()));
    const bootToSshSeconds: Record<string, number> = {};
    for (const [i, m] of machines.entries()) bootToSshSeconds[m.name] = boot[i]!;
    log(`machines ${names.join(", ")} answer ssh (${JSON.stringify(bootToSshSeconds)} s)`);
    const p = proxy;
    return {
      machines,
      byName: Object.fromEntries(machines.map((m) => [m.name, m])),
      sshConfigFile,
      keyFile,
      knownHostsFile,
      hostAddress: HOST_ADDRESS,
      aptProxyUrl: p.url,
      aptProxyStats: p.stats,
      timings: { rootBuildSeconds: root.builtSeconds, cloneSeconds, bootToSshSeconds },
      destroy,
    };
  } catch (e) {
    const logs = machines.map((m) => m.logTail()).filter(Boolean).join("\n");
    await destroy().catch(() => {});
    throw logs ? new Error(`${(e as Error).message}\n${logs}`) : e;
  }
}

class MachineImpl implements Machine {
  readonly netns: string;
  private child: ChildProcess | null = null;
  private exited: Promise<void> = Promise.resolve();
  private boots = 0;

  constructor(
    readonly name: string,
    readonly address: string,
    readonly root: string,
    private readonly sshConfigFile: string,
    private readonly logDir: string,
    private readonly bootTimeoutMs: number,
  ) {
    this.netns = netnsName(name);
  }

  ssh(cmd: string, opts?: SshOptions): Promise<ExecResult> {
    return execSsh(this.sshConfigFile, this.name, cmd, opts);
  }

  isRunning(): boolean {
    return this.child !== null;
  }

  private logFile(): string {
    return join(this.logDir, `${this.name}.console.log`);
  }

  logTail(): string {
    try {
      const lines = readFileSync(this.logFile(), "utf8").split("\n").slice(-15);
      return `--- ${this.name}'s console (last lines) ---\n${lines.join("\n")}`;
    } catch {
      return "";
    }
  }

  async start(): Promise<number> {
    if (this.child) throw new Error(`machine ${this.name} is already running`);
    const cgroups = cgroupRoots().map((r) => join(r, cgroupName(this.name)));
    for (const c of cgroups) {
      await removeCgroupTree(c); // stale subgroups of the last boot
      mkdirSync(c);
    }
    const args = [
      "-b",
      "--register=no",
      "--keep-unit",
      "-D",
      this.root,
      "-M",
      netnsName(this.name),
      `--hostname=${this.name}`,
      `--network-namespace-path=/run/netns/${this.netns}`,
      "--bind=/dev/fuse",
      "--bind=/dev/loop-control",
      "--console=passive",
      "--resolv-conf=off",
      "--timezone=off",
      "--link-journal=no",
    ];
    // With --keep-unit the container takes its caller's cgroup: the shell moves itself
    // into the machine's own cgroups first, then becomes systemd-nspawn.
    const script = `${cgroups.map((c) => `echo $$ > ${c}/cgroup.procs`).join(" && ")} && exec systemd-nspawn "$@"`;
    const out = openSync(this.logFile(), "a");
    this.boots++;
    writeFileSync(this.logFile(), `\n=== boot ${this.boots} at ${new Date().toISOString()} ===\n`, { flag: "a" });
    const t0 = Date.now();
    const child = spawn("sh", ["-c", script, "sh", ...args], { stdio: ["ignore", out, out], detached: true });
    closeSync(out);
    this.child = child;
    this.exited = new Promise((r) => child.once("exit", () => r()));
    child.once("exit", () => {
      if (this.child === child) this.child = null;
    });
    const deadline = t0 + this.bootTimeoutMs;
    for (;;) {
      if (this.child !== child) throw new Error(`machine ${this.name}: systemd-nspawn exited during boot\n${this.logTail()}`);
      const r = await execSsh(this.sshConfigFile, this.name, "true", { timeoutMs: 5_000 });
      if (r.code === 0) return (Date.now() - t0) / 1000;
      if (Date.now() > deadline) throw new Error(`machine ${this.name} did not answer ssh within ${this.bootTimeoutMs} ms of boot (last: ${r.stderr.trim()})\n${this.logTail()}`);
      await sleep(100);
    }
  }

  async kill(): Promise<{ seconds: number; abortedFuse: string[] }> {
    const pid = initPid(this.netns);
    if (pid === null) throw new Error(`machine ${this.name} has no init process to kill`);
    const fuse = fuseMountsOf(pidsInNetns(this.netns));
    await recordFuseLoops(fuse);
    const t0 = Date.now();
    process.kill(pid, "SIGKILL");
    // A node's own FUSE server can die stuck behind I/O on its own export (ext4 on a loop
    // over it): its /dev/fuse never closes, so the connection never aborts and the
    // namespace never empties. A power loss fails that I/O; so does aborting it here.
    let abortedFuse: string[] = [];
    let done = await Promise.race([this.exited.then(() => true), sleep(1_000).then(() => false)]);
    if (!done && fusectlReady()) {
      abortedFuse = abortFuse(fuse);
      done = await Promise.race([this.exited.then(() => true), sleep(STOP_TIMEOUT_MS).then(() => false)]);
    }
    if (!done) throw new Error(`machine ${this.name}: systemd-nspawn did not exit within ${STOP_TIMEOUT_MS} ms of its init's SIGKILL (FUSE connections aborted: ${abortedFuse.join(", ") || "none"})`);
    const deadline = Date.now() + STOP_TIMEOUT_MS;
    while (pidsInNetns(this.netns).length > 0 && Date.now() < deadline) await sleep(50);
    return { seconds: (Date.now() - t0) / 1000, abortedFuse };
  }

  cutNetwork(): Promise<void> {
    return ip("link", "set", hostVeth(this.name), "down").then(() => {});
  }

  restoreNetwork(): Promise<void> {
    return ip("link", "set", hostVeth(this.name), "up").then(() => {});
  }

  /** destroy(): the cleanup kills the processes; stop tracking them here. */
  forget(): void {
    this.child?.removeAllListeners("exit");
    this.child?.unref();
    this.child = null;
  }
}

/** What a finished run must not leave behind, as lines a person can read (empty: clean). */
export async function leftovers(): Promise<string[]> {
  const out: string[] = [];
  const ns = await ourNamespaces();
  if (ns.length) out.push(`network namespaces: ${ns.join(", ")}`);
  const links = await ourLinks();
  if (links.length) out.push(`links: ${links.join(", ")}`);
  const loops = await ourLoops();
  if (loops.length) out.push(`loop devices: ${loops.join(", ")}`);
  const mounts = mountsUnder(BASE_DIR);
  if (mounts.length) out.push(`mounts: ${mounts.join(", ")}`);
  const procs = nspawnPids();
  if (procs.length) out.push(`systemd-nspawn processes: ${procs.join(", ")}`);
  const cg = ourCgroups();
  if (cg.length) out.push(`cgroups: ${cg.join(", ")}`);
  if (existsSync(BASE_DIR)) out.push(`directory: ${BASE_DIR}`);
  const r = await runAll("ss", ["-Hltn", `src ${HOST_ADDRESS}`]);
  if (r.stdout.trim()) out.push(`listening sockets on ${HOST_ADDRESS}: ${r.stdout.trim()}`);
  return out;
}
