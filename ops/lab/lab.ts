// The local lab: `up` builds the namespaces and links, starts node a's stack (MariaDB,
// Redis, Dovecot) and BIND9 on the third host from code, proves each answers and says
// how to connect; `down` stops every process it started (by PID), removes mounts, loop
// devices, namespaces, links and its directory, and works after a crash by finding
// leftovers by the lab's own names. `status` shows what is there.
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, resolve, sep } from "node:path";
import { ImapFlow } from "imapflow";
import nodemailer from "nodemailer";
import { loadConfig, type MailhaConfig } from "../../common/config.ts";
import { isAlive, startDaemon, stopDaemon, type DaemonRecord, type DaemonSpec } from "../../common/daemon.ts";
import { UsageError } from "../../common/errors.ts";
import { sleep, tryRun } from "../../common/exec.ts";
import { nodePaths, type NodePaths } from "../../common/paths.ts";
import { bindPaths, bindSpec, writeBindConfig } from "../../dns/bind.ts";
import { query } from "../../dns/query.ts";
import { upsertUser } from "../../services/accounts.ts";
import { connectMariadbAs, mariadbPaths } from "../../services/mariadb.ts";
import { pingRedis, redisPaths } from "../../services/redis.ts";
import { ensurePackages } from "../setup/packages.ts";
import { ensureMailUser } from "../setup/users.ts";
import { createVolume } from "../../replication/store.ts";
import { newGenId } from "../../replication/gi.ts";
import { mountVolume } from "../../replication/filesystem.ts";
import { FILE_NAME } from "../../replication/fuse-export.ts";
import { engineSpec, startEngine, volumeCall, volumeContext, waitForVolume } from "../../replication/client.ts";
import { nodeSpec, nodeStatus, witnessSpec } from "../../cluster/client.ts";
import { generateSecrets } from "../secrets.ts";
import { buildNetwork, labHostLinks, labNamespaces, namespaceLinks, namespacePids, nsPrefix, teardownNetwork, type LabLayout, type LinkState } from "./network.ts";

export type Progress = (step: string, detail?: Record<string, unknown>) => void;

const MARKER = ".mailha-lab";
const STATE_FILE = "lab.json";
const WITNESS_ID = "w";
const STRAY_TERM_WAIT_MS = 5000;

export interface LabState {
  readonly version: 1;
  readonly name: string;
  readonly config: string;
  readonly createdAt: string;
  readonly layout: LabLayout;
  daemons: DaemonRecord[];
}

type LabConfig = MailhaConfig & { lab: NonNullable<MailhaConfig["lab"]> };

export function requireLab(c: MailhaConfig): LabConfig {
  if (!c.lab) throw new UsageError(`${c.file} has no "lab:" section; the lab needs one (see examples/lab.yaml)`);
  return c as LabConfig;
}

export function labLayout(c: LabConfig): LabLayout {
  if (c.nodes.some((n) => n.id === WITNESS_ID)) throw new UsageError(`node id "${WITNESS_ID}" is taken by the lab's third host; rename the node`);
  return {
    name: c.lab.name,
    bridge: `mh-${c.lab.name}-br`,
    operatorAddress: c.lab.operator_address,
    prefixLen: c.lab.prefix_len,
    hosts: [
      ...c.nodes.map((n) => ({ id: n.id, role: "node" as const, netns: `${nsPrefix(c.lab.name)}${n.id}`, serviceAddress: n.service_address, replicationAddress: n.replication_address })),
      { id: WITNESS_ID, role: "witness" as const, netns: `${nsPrefix(c.lab.name)}${WITNESS_ID}`, serviceAddress: c.lab.witness_address },
    ],
  };
}

/** The state directory of one lab host. */
export function labHostPaths(c: LabConfig, hostId: string): NodePaths {
  return nodePaths(join(c.lab.dir, hostId));
}

function assertSafeDir(dir: string): void {
  const abs = resolve(dir);
  if (abs.split(sep).filter(Boolean).length < 2) throw new UsageError(`lab.dir ${dir} is too close to / to be removed safely; use a directory like /var/lib/mailha-lab`);
}

/** Daemons that drop privileges (Dovecot, the mail uid) must be able to reach lab.dir. */
function assertTraversable(dir: string): void {
  for (let d = dirname(resolve(dir)); ; d = dirname(d)) {
    if (existsSync(d) && (statSync(d).mode & 0o001) === 0)
      throw new UsageError(`lab.dir ${dir} lies under ${d}, which others cannot enter (mode 0${(statSync(d).mode & 0o777).toString(8)}); Dovecot and the mail uid need to: chmod o+x ${d}, or choose another lab.dir`);
    if (d === dirname(d)) break;
  }
}

function readState(dir: string): LabState | null {
  const f = join(dir, STATE_FILE);
  if (!existsSync(f)) return null;
  try {
    return JSON.parse(readFileSync(f, "utf8")) as LabState;
  } catch {
    return null;
  }
}

function writeState(dir: string, s: LabState): void {
  writeFileSync(join(dir, STATE_FILE), JSON.stringify(s, null, 2));
}

export interface CheckResult {
  readonly check: string;
  readonly ok: boolean;
  readonly detail: string;
}

export interface UpResult {
  readonly name: string;
  readonly seconds: number;
  readonly layout: LabLayout;
  readonly daemons: { name: string; pid: number }[];
  readonly checks: CheckResult[];
  readonly connect: Record<string, string>;
}

/** Builds the lab. On failure everything made so far is removed, unless keepOnFailure. */
export interface UpOptions {
  readonly keepOnFailure?: boolean;
  /** Build network and volumes only (node a primary with ext4 mounted), no mail services. */
  readonly noServices?: boolean;
}

export async function labUp(configFile: string, progress: Progress, opts: UpOptions = {}): Promise<UpResult> {
  const t0 = Date.now();
  let c = requireLab(loadConfig(configFile, { checkSecrets: false }));
  if (process.getuid?.() !== 0) throw new UsageError("the lab needs root (network namespaces, mounts): run it with sudo");
  assertSafeDir(c.lab.dir);
  assertTraversable(c.lab.dir);
  const layout = labLayout(c);
  const present = await labNamespaces(c.lab.name);
  if (present.length > 0) throw new UsageError(`lab "${c.lab.name}" is already up (namespaces: ${present.join(", ")}); run: mailha lab down --config ${configFile}`);

  progress("packages", { note: "checking Debian packages" });
  const pk = await ensurePackages((line) => progress("packages", { note: line }));
  if (pk.installed.length) progress("packages", { installed: pk.installed });
  const mu = await ensureMailUser(c.mail.mail_uid, c.mail.mail_gid);
  if (mu.created) progress("users", { created: mu.name, uid: c.mail.mail_uid, gid: c.mail.mail_gid });

  mkdirSync(c.lab.dir, { recursive: true, mode: 0o755 });
  chmodSync(c.lab.dir, 0o755); // daemons drop privileges (dovecot, mail uid) and must traverse it
  writeFileSync(join(c.lab.dir, MARKER), `mailha lab ${c.lab.name}\n`);
  const secrets = generateSecrets(c);
  if (secrets.some((s) => s.created)) progress("secrets", { created: secrets.filter((s) => s.created).map((s) => s.path) });
  c = requireLab(loadConfig(configFile));

  const state: LabState = { version: 1, name: c.lab.name, config: resolve(configFile), createdAt: new Date().toISOString(), layout, daemons: [] };
  writeState(c.lab.dir, state);
  const start = async (spec: DaemonSpec) => {
    progress("start", { daemon: spec.name });
    const rec = await startDaemon(spec);
    state.daemons.push(rec);
    writeState(c.lab.dir, state);
    progress("ready", { daemon: spec.name, pid: rec.pid });
  };

  try {
    progress("network", { namespaces: layout.hosts.map((h) => h.netns) });
    await buildNetwork(layout);

    const w = layout.hosts.find((h) => h.id === WITNESS_ID)!;
    const wPaths = labHostPaths(c, WITNESS_ID);
    const bp = bindPaths(wPaths.state, c.dns.zone);
    writeBindConfig(c, bp, w.serviceAddress);
    await start(bindSpec(`named@${WITNESS_ID}`, c, bp, w.serviceAddress, w.netns));

    const active = c.nodes.find((n) => n.id === c.cluster.preferred_node)!;
    const np = labHostPaths(c, active.id);
    for (const n of c.nodes) for (const d of Object.values(labHostPaths(c, n.id))) mkdirSync(d, { recursive: true });

    // The replicated volume: created on both nodes (the preferred one holds the data),
    // both engines started, the preferred node promoted, ext4 mounted on its data dir.
    const vols = c.nodes.map((n) => volumeContext(c, n.id));
    for (const v of vols) {
      if (!existsSync(v.paths.volumeDir)) createVolume(v.paths.volumeDir, { nodeId: v.nodeId, sizeBytes: c.volume.size, primary: v.nodeId === active.id, newId: () => newGenId(), allocation: c.volume.allocation });
    }

    if (opts.noServices) {
      // The volume alone: both engines, the preferred node primary, ext4 mounted.
      for (const v of vols) {
        const spec = engineSpec(v);
        progress("start", { daemon: spec.name });
        const rec = await startEngine(v);
        state.daemons.push(rec);
        writeState(c.lab.dir, state);
        progress("ready", { daemon: spec.name, pid: rec.pid });
      }
      const va = vols.find((v) => v.nodeId === active.id)!;
      await waitForVolume(va, (s) => s.peer.node !== null && (s.connection === "connected" || s.connection === "sync-source"), 30_000, "connecting to the peer");
      await volumeCall(va, "primary", {});
      const vs = await waitForVolume(va, (s) => s.connection === "connected" && s.export.mounted, 120_000, "the initial sync");
      progress("volume", { primary: active.id, connection: vs.connection, disk: vs.disk, peer_disk: vs.peer.disk });
      const fs = await mountVolume(va.stateDir, join(va.paths.exportDir, FILE_NAME), va.mountpoint, { mkfsIfBlank: vs.fresh });
      progress("filesystem", { loop: fs.loop, mountpoint: fs.mountpoint, created: fs.created, fsck: fs.fsck });
      return { name: c.lab.name, seconds: (Date.now() - t0) / 1000, layout, daemons: state.daemons.map((d) => ({ name: d.name, pid: d.pid })), checks: [], connect: connectHints(c, np, configFile) };
    }

    // The cluster: the witness on w, a node daemon on each node. The daemons start
    // their volume engines, agree who is active, and run the resource group there.
    if (c.quorum.witness) await start(witnessSpec(c, w.netns));
    for (const n of c.nodes) await start(nodeSpec(c, n.id));
    progress("cluster", { waiting_for: `node ${active.id} to become active` });
    const deadline = Date.now() + 180_000;
    for (;;) {
      const st = await nodeStatus(c, active.id).catch(() => null);
      if (st?.state === "active") break;
      if (st?.state === "failed") throw new Error(`node ${active.id} failed to start the resource group; see ${join(np.log, "cluster-events.jsonl")}`);
      if (Date.now() > deadline) throw new Error(`node ${active.id} did not become active within 180 s (state ${st?.state ?? "unknown"})`);
      await sleep(200);
    }
    progress("cluster", { active: active.id });
    const db = await connectMariadbAs(mariadbPaths(np).socket, "accounts");
    try {
      await upsertUser(db, c.lab.test_user.address, c.lab.test_user.password);
      if (c.lab.pop3_user) await upsertUser(db, c.lab.pop3_user.address, c.lab.pop3_user.password);
    } finally {
      await db.end();
    }

    progress("checks");
    const checks = await labCheck(c);
    const failed = checks.filter((x) => !x.ok);
    if (failed.length) throw new Error(`lab checks failed:\n${failed.map((f) => `  ${f.check}: ${f.detail}`).join("\n")}`);
    return {
      name: c.lab.name,
      seconds: (Date.now() - t0) / 1000,
      layout,
      daemons: state.daemons.map((d) => ({ name: d.name, pid: d.pid })),
      checks,
      connect: connectHints(c, np, configFile),
    };
  } catch (err) {
    if (!opts.keepOnFailure) {
      progress("rollback", { error: (err as Error).message.split("\n")[0] });
      await labDown(configFile, () => {});
    }
    throw err;
  }
}

function connectHints(c: LabConfig, np: NodePaths, configFile: string): Record<string, string> {
  const a = c.nodes.find((n) => n.id === c.cluster.preferred_node)!;
  const w = c.lab.witness_address;
  return {
    imap: `openssl s_client -quiet -starttls imap -connect ${a.service_address}:143   (login ${c.lab.test_user.address} / ${c.lab.test_user.password})`,
    send: `swaks --server ${a.service_address} --to ${c.lab.test_user.address}`,
    read: `curl -sk --ssl-reqd 'imap://${a.service_address}/INBOX;UID=1' -u '${c.lab.test_user.address}:${c.lab.test_user.password}'`,
    pop3: `curl -sk --ssl-reqd pop3://${a.service_address}/ -u '${c.lab.test_user.address}:${c.lab.test_user.password}'`,
    dns: `dig @${w} ${c.mail.domains[0]} MX`,
    sql: `mariadb --socket=${mariadbPaths(np).socket} mailha   (as root: MariaDB's root logs in by unix_socket only)`,
    redis: `REDISCLI_AUTH="$(cat ${redisPaths(np).secret})" redis-cli -s ${redisPaths(np).socket}`,
    third_host_shell: `ip netns exec ${nsPrefix(c.lab.name)}${WITNESS_ID} bash`,
    status: `mailha lab status --config ${configFile}`,
    down: `mailha lab down --config ${configFile}`,
  };
}

/** The node that runs the group now (the preferred one when nobody says). */
export async function activeNode(c: LabConfig) {
  for (const n of c.nodes) {
    const st = await nodeStatus(c, n.id, 1000).catch(() => null);
    if (st?.state === "active") return n;
  }
  return c.nodes.find((n) => n.id === c.cluster.preferred_node)!;
}

/** Proves the lab works, with real clients: SQL, Redis, an IMAP login, a DNS answer. */
export async function labCheck(c: LabConfig): Promise<CheckResult[]> {
  const active = await activeNode(c);
  const np = labHostPaths(c, active.id);
  const checks: CheckResult[] = [];
  const attempt = async (check: string, fn: () => Promise<string>) => {
    try {
      checks.push({ check, ok: true, detail: await fn() });
    } catch (err) {
      checks.push({ check, ok: false, detail: (err as Error).message.split("\n")[0] ?? String(err) });
    }
  };
  await attempt("mariadb", async () => {
    const db = await connectMariadbAs(mariadbPaths(np).socket, "accounts", "mailha");
    try {
      const [rows] = await db.query("SELECT COUNT(*) AS n FROM users");
      return `${(rows as { n: number }[])[0]?.n} user(s) in mailha.users`;
    } finally {
      await db.end();
    }
  });
  await attempt("redis", async () => {
    if (!(await pingRedis(redisPaths(np).socket))) throw new Error("no PONG");
    return "AUTH and PING answered PONG (appendfsync always)";
  });
  await attempt("imap", async () => {
    const client = new ImapFlow({
      host: active.service_address,
      port: 143,
      secure: false,
      doSTARTTLS: true,
      tls: { rejectUnauthorized: false },
      auth: { user: c.lab.test_user.address, pass: c.lab.test_user.password },
      logger: false,
    });
    client.on("error", () => {});
    await client.connect();
    try {
      const st = await client.status("INBOX", { messages: true, uidValidity: true });
      if (!st) throw new Error("STATUS INBOX failed");
      return `${c.lab.test_user.address} logged in at ${active.service_address}:143 (STARTTLS); INBOX holds ${st.messages} message(s)`;
    } finally {
      await client.logout();
    }
  });
  await attempt("smtp", async () => {
    const tx = nodemailer.createTransport({ host: active.service_address, port: 25, secure: false, tls: { rejectUnauthorized: false } });
    const info = await tx.sendMail({ from: "lab-check@example.net", to: c.lab.test_user.address, subject: "mailha lab check", text: "delivered by mailha lab check\n" });
    return `${active.service_address}:25 accepted a message for ${c.lab.test_user.address}: ${info.response}`;
  });
  await attempt("dns", async () => {
    const r = await query(c.lab.witness_address, c.dns.port, c.mail.domains[0]!, "MX");
    if (r.rcode !== "NOERROR" || r.answers.length === 0) throw new Error(`MX query answered ${r.rcode} with ${r.answers.length} record(s)`);
    const mx = r.answers.map((a) => (a.type === "MX" ? `${a.data.preference} ${a.data.exchange}` : a.type)).sort();
    return `${c.lab.witness_address} answers ${c.mail.domains[0]} MX: ${mx.join(", ")}`;
  });
  return checks;
}

export interface DownResult {
  readonly name: string;
  readonly stopped: { name: string; pid: number; outcome: string }[];
  readonly strayProcessesKilled: number;
  readonly unmounted: string[];
  readonly loopDevicesDetached: string[];
  readonly namespacesRemoved: string[];
  readonly linksRemoved: string[];
  readonly dirRemoved: boolean;
}

/**
 * Removes everything the lab made. Reads the config only for the lab's name and
 * directory (so a broken or secret-less config does not block cleanup).
 */
export async function labDown(configFile: string, progress: Progress): Promise<DownResult> {
  const c = requireLab(loadConfig(configFile, { checkSecrets: false }));
  if (process.getuid?.() !== 0) throw new UsageError("the lab needs root: run it with sudo");
  assertSafeDir(c.lab.dir);
  const dir = resolve(c.lab.dir);
  const state = readState(dir);
  const stopped: DownResult["stopped"] = [];
  const stop = async (rec: DaemonRecord) => {
    const outcome = await stopDaemon(rec);
    stopped.push({ name: rec.name, pid: rec.pid, outcome });
    progress("stop", { daemon: rec.name, pid: rec.pid, outcome });
  };
  const daemons = [...(state?.daemons ?? [])].reverse();
  // Services first, then the file systems on the volumes, then the volume engines.
  for (const rec of daemons.filter((d) => !d.name.startsWith("volume@"))) await stop(rec);
  const unmounted = await unmountUnder(dir, (m) => !m.type.startsWith("fuse"));
  const loops = await detachLoopsUnder(dir);
  for (const rec of daemons.filter((d) => d.name.startsWith("volume@"))) await stop(rec);
  // Anything else still running in a lab namespace (a crash left it, or a test).
  let strays = 0;
  const namespaces = await labNamespaces(c.lab.name);
  for (let round = 0; round < 2; round++) {
    const sig = round === 0 ? "SIGTERM" : "SIGKILL";
    let any = false;
    for (const ns of namespaces) {
      for (const pid of await namespacePids(ns)) {
        if (pid === process.pid) continue;
        any = true;
        if (round === 0) strays++;
        try {
          process.kill(pid, sig);
        } catch {
          // gone
        }
      }
    }
    if (!any) break;
    const deadline = Date.now() + STRAY_TERM_WAIT_MS;
    while (Date.now() < deadline && (await Promise.all(namespaces.map(namespacePids))).some((p) => p.length > 0)) await sleep(100);
  }
  if (strays) progress("stop", { stray_processes: strays });
  unmounted.push(...(await unmountUnder(dir, () => true)));
  loops.push(...(await detachLoopsUnder(dir)));
  const net = await teardownNetwork(c.lab.name);
  progress("network", { removed_namespaces: net.namespaces, removed_links: net.links });
  let dirRemoved = false;
  if (existsSync(join(dir, MARKER))) {
    rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
    dirRemoved = true;
  }
  return { name: c.lab.name, stopped, strayProcessesKilled: strays, unmounted, loopDevicesDetached: loops, namespacesRemoved: net.namespaces, linksRemoved: net.links, dirRemoved };
}

/** Mounts under DIR (deepest first), from the host's mount table. */
export function mountsUnder(dir: string): { mountpoint: string; type: string }[] {
  const lines = readFileSync("/proc/self/mounts", "utf8").split("\n");
  const unescape = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  return lines
    .map((l) => ({ mountpoint: unescape(l.split(" ")[1] ?? ""), type: l.split(" ")[2] ?? "" }))
    .filter((m) => m.mountpoint === dir || m.mountpoint.startsWith(dir + "/"))
    .sort((a, b) => b.mountpoint.length - a.mountpoint.length);
}

async function unmountUnder(dir: string, which: (m: { mountpoint: string; type: string }) => boolean): Promise<string[]> {
  const done: string[] = [];
  for (const m of mountsUnder(dir).filter(which)) {
    if (!(await tryRun("umount", [m.mountpoint], { timeoutMs: 60_000 }))) await tryRun("umount", ["-l", m.mountpoint]);
    done.push(m.mountpoint);
  }
  return done;
}

/** Loop devices whose backing file lies under DIR. */
export async function loopsUnder(dir: string): Promise<string[]> {
  const r = await tryRun("losetup", ["-J", "-l"]);
  if (!r || !r.stdout.trim()) return [];
  const list = (JSON.parse(r.stdout) as { loopdevices?: { name: string; "back-file": string | null }[] }).loopdevices ?? [];
  return list.filter((l) => l["back-file"] && (l["back-file"].startsWith(dir + "/") || l["back-file"].replace(/ \(deleted\)$/, "").startsWith(dir + "/"))).map((l) => l.name);
}

async function detachLoopsUnder(dir: string): Promise<string[]> {
  const loops = await loopsUnder(dir);
  for (const l of loops) await tryRun("losetup", ["-d", l]);
  return loops;
}

export interface StatusResult {
  readonly name: string;
  readonly up: boolean;
  readonly hosts: {
    id: string;
    netns: string;
    present: boolean;
    links: LinkState[];
    processes: { pid: number; command: string }[];
  }[];
  readonly daemons: { name: string; pid: number; alive: boolean }[];
  readonly hostLinks: string[];
}

function commandOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, "utf8").trim();
  } catch {
    return "?";
  }
}

export async function labStatus(configFile: string): Promise<StatusResult> {
  const c = requireLab(loadConfig(configFile, { checkSecrets: false }));
  const layout = labLayout(c);
  const present = new Set(await labNamespaces(c.lab.name));
  const state = readState(resolve(c.lab.dir));
  const hosts = await Promise.all(
    layout.hosts.map(async (h) => ({
      id: h.id,
      netns: h.netns,
      present: present.has(h.netns),
      links: present.has(h.netns) ? await namespaceLinks(h.netns) : [],
      processes: present.has(h.netns) ? (await namespacePids(h.netns)).map((pid) => ({ pid, command: commandOf(pid) })) : [],
    })),
  );
  const daemons = (state?.daemons ?? []).map((d) => ({ name: d.name, pid: d.pid, alive: isAlive(d) }));
  const up = hosts.every((h) => h.present) && daemons.length > 0 && daemons.every((d) => d.alive);
  return { name: c.lab.name, up, hosts, daemons, hostLinks: await labHostLinks(c.lab.name) };
}

