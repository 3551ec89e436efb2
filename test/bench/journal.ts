// The journal benchmark: what journaling Dovecot's changes costs IMAP clients. An
// imapflow load of STOREs (SESSIONS sessions x STORES flag changes on random messages of
// a MESSAGES-message INBOX) with the watcher on and off in the same run, in turns:
// (lab) on the lab's active node, Maildir on the replicated volume, the `journal`
// resource frozen (SIGSTOP: it does nothing) for "off"; (local) a private Dovecot on
// the local disk, three ways: no source, the watcher (a child process), and Dovecot's
// mail_log plugin (the other source considered: every change as a log line). Also: the
// watcher's CPU per 1,000 STOREs, and the journal entries it wrote per STORE (several
// STOREs on one message between two scans are one entry: the net change; a STORE that
// changes nothing is none). Rates are the best turn; ratios the median of adjacent
// pairs (the machine is shared: a pair shares its drift).
// Run: `node --import tsx test/bench/journal.ts` (prints `NAME VALUE UNIT` lines).
// BENCH_ROUNDS (5), BENCH_JOURNAL_SESSIONS/STORES/MESSAGES, BENCH_JOURNAL_LAB_ONLY or
// _LOCAL_ONLY, BENCH_JOURNAL_DEBOUNCE_MS (the local watcher's), BENCH_JOURNAL_PROFILE=DIR
// (the local watcher's CPU profile).
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { ImapFlow } from "imapflow";
import { run, sleep } from "../../common/exec.ts";
import type { DaemonRecord } from "../../common/daemon.ts";
import { mailha, ROOT } from "../helpers/cli.ts";
import { waitNode } from "../helpers/cluster.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";
import { createLogger } from "../../common/log.ts";
import { writeSection } from "./report.ts";
import { ChangeJournal } from "../../services/journal/changes.ts";
import { MaildirWatcher } from "../../services/journal/maildir-watch.ts";

const SESSIONS = Number(process.env.BENCH_JOURNAL_SESSIONS ?? 4);
const STORES = Number(process.env.BENCH_JOURNAL_STORES ?? 2000);
const MESSAGES = Number(process.env.BENCH_JOURNAL_MESSAGES ?? 2000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const LOCAL_PORT = 11_443;

interface Target {
  readonly host: string;
  readonly port: number;
  readonly starttls: boolean;
  readonly user: string;
  readonly pass: string;
}

async function session(t: Target): Promise<ImapFlow> {
  const c = new ImapFlow({ host: t.host, port: t.port, secure: false, doSTARTTLS: t.starttls, tls: { rejectUnauthorized: false }, auth: { user: t.user, pass: t.pass }, logger: false });
  c.on("error", () => {});
  await c.connect();
  await c.mailboxOpen("INBOX");
  return c;
}

/** MESSAGES small messages into INBOX, SESSIONS appends at a time. */
async function populate(t: Target): Promise<void> {
  const cs = await Promise.all(Array.from({ length: SESSIONS }, () => session(t)));
  let next = 0;
  await Promise.all(cs.map(async (c) => {
    while (next < MESSAGES) {
      const i = next++;
      await c.append("INBOX", `From: bench@example.net\r\nSubject: message ${i}\r\n\r\n${"x".repeat(200)}\r\n`);
    }
  }));
  await Promise.all(cs.map((c) => c.logout()));
}

/** STORES flag changes per session on random UIDs; returns STOREs per second. */
async function storeLoad(t: Target, seed: number): Promise<number> {
  const cs = await Promise.all(Array.from({ length: SESSIONS }, () => session(t)));
  // mulberry32: 32-bit integer steps (a float LCG loses its low bits and falls into short cycles).
  let x = seed >>> 0;
  const rand = () => {
    x = (x + 0x6d2b79f5) >>> 0;
    let t = Math.imul(x ^ (x >>> 15), 1 | x);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4_294_967_296;
  };
  const flags = ["\\Flagged", "\\Seen", "\\Answered", "$Label1"];
  const t0 = process.hrtime.bigint();
  await Promise.all(cs.map(async (c) => {
    for (let i = 0; i < STORES; i++) {
      const uid = String(1 + Math.floor(rand() * MESSAGES));
      const f = [flags[Math.floor(rand() * flags.length)]!];
      if (rand() < 0.5) await c.messageFlagsAdd(uid, f, { uid: true });
      else await c.messageFlagsRemove(uid, f, { uid: true });
    }
  }));
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  await Promise.all(cs.map((c) => c.logout()));
  return (SESSIONS * STORES) / seconds;
}

/** CPU (user + system) of a process so far, in ms. */
function cpuMs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = f.slice(f.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
}

/** The bytes of the change segments under DATA, for "has the watcher caught up". */
function journalBytes(data: string): number {
  const dir = join(data, "journal");
  if (!existsSync(dir)) return 0;
  return readdirSync(dir).filter((f) => f.startsWith("changes-")).reduce((n, f) => n + statSync(join(dir, f)).size, 0);
}

function flagEntries(data: string): number {
  const dir = join(data, "journal");
  if (!existsSync(dir)) return 0;
  let n = 0;
  for (const f of readdirSync(dir).filter((x) => x.startsWith("changes-") && x.endsWith(".jsonl"))) n += (readFileSync(join(dir, f), "utf8").match(/"kind":"flags"/g) ?? []).length;
  return n;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

/** Waits until the journal has not grown for QUIET_MS (bounded). */
async function settled(data: string, quietMs = 1500, maxMs = 120_000): Promise<void> {
  const end = Date.now() + maxMs;
  let last = journalBytes(data);
  let since = Date.now();
  while (Date.now() < end) {
    await sleep(200);
    const now = journalBytes(data);
    if (now !== last) {
      last = now;
      since = Date.now();
    } else if (Date.now() - since >= quietMs) return;
  }
  throw new Error(`the journal in ${data} kept growing for ${maxMs} ms`);
}

interface Figures {
  off: number;
  on: number;
  /** The median of on/off over adjacent turns (the machine is shared: pairs cancel its drift). */
  ratio: number;
  cpuMsPer1000: number;
  /** The watcher's CPU while the clients change things, in % of one core. */
  cpuShare: number;
  entriesPerStore: number;
}

/** Turns of off and on; the watcher process PID is frozen for "off". */
async function turns(t: Target, data: string, watcherPid: () => number): Promise<Figures> {
  const f: Figures = { off: 0, on: 0, ratio: 0, cpuMsPer1000: 0, cpuShare: 0, entriesPerStore: 0 };
  const shares: number[] = [];
  const ratios: number[] = [];
  const cpus: number[] = [];
  // A first turn of each, not counted: JIT, caches.
  await storeLoad(t, 99);
  await settled(data);
  const offTurn = async (seed: number) => {
    process.kill(watcherPid(), "SIGSTOP");
    const rate = await storeLoad(t, seed);
    process.kill(watcherPid(), "SIGCONT");
    await settled(data);
    return rate;
  };
  const onTurn = async (seed: number) => {
    const cpu0 = cpuMs(watcherPid());
    const e0 = flagEntries(data);
    const rate = await storeLoad(t, seed);
    await settled(data);
    const cpu = cpuMs(watcherPid()) - cpu0;
    cpus.push((cpu * 1000) / (SESSIONS * STORES));
    shares.push((100 * cpu) / ((SESSIONS * STORES * 1000) / rate));
    f.entriesPerStore = (flagEntries(data) - e0) / (SESSIONS * STORES);
    return rate;
  };
  for (let r = 0; r < ROUNDS; r++) {
    // Alternating which goes first, so a trend of the machine favours neither.
    let off: number;
    let on: number;
    if (r % 2 === 0) {
      off = await offTurn(2 * r + 1);
      on = await onTurn(2 * r + 2);
    } else {
      on = await onTurn(2 * r + 2);
      off = await offTurn(2 * r + 1);
    }
    f.off = Math.max(f.off, off);
    f.on = Math.max(f.on, on);
    ratios.push(on / off);
    process.stderr.write(`- turn ${r + 1}/${ROUNDS}: off ${off.toFixed(0)}/s, on ${on.toFixed(0)}/s, watcher ${cpus.at(-1)!.toFixed(1)} ms CPU per 1000 STOREs\n`);
  }
  f.ratio = median(ratios);
  f.cpuMsPer1000 = median(cpus);
  f.cpuShare = median(shares);
  return f;
}

// ---------------------------------------------------------------- the lab (replicated volume)

const SMTP_SESSIONS = Number(process.env.BENCH_JOURNAL_SMTP_SESSIONS ?? 10);
const SMTP_MESSAGES = Number(process.env.BENCH_JOURNAL_SMTP_MESSAGES ?? 1000);

/** smtp-source to HOST:25, SMTP_MESSAGES of 2 KB over SMTP_SESSIONS; a 250 there means on both disks. Messages/s. */
async function smtpLoad(host: string, rcpt: string): Promise<number> {
  const t0 = process.hrtime.bigint();
  const r = await run("smtp-source", ["-s", String(SMTP_SESSIONS), "-m", String(SMTP_MESSAGES), "-l", "2000", "-f", "bench@example.net", "-t", rcpt, `${host}:25`], { timeoutMs: 900_000 });
  if (r.stderr.trim()) throw new Error(`smtp-source: ${r.stderr.slice(0, 300)}`);
  return SMTP_MESSAGES / (Number(process.hrtime.bigint() - t0) / 1e9);
}

/** SMTP deliveries with the Dovecot-change watcher frozen ("off") and running, adjacent turns. */
async function smtpTurns(host: string, rcpt: string, data: string, watcherPid: () => number): Promise<{ off: number; on: number; ratio: number }> {
  await smtpLoad(host, rcpt); // warm-up, not counted
  await settled(data);
  const ratios: number[] = [];
  let bestOff = 0;
  let bestOn = 0;
  const offTurn = async () => {
    process.kill(watcherPid(), "SIGSTOP");
    try {
      return await smtpLoad(host, rcpt);
    } finally {
      process.kill(watcherPid(), "SIGCONT");
      await settled(data);
    }
  };
  const onTurn = async () => {
    const rate = await smtpLoad(host, rcpt);
    await settled(data);
    return rate;
  };
  for (let r = 0; r < ROUNDS; r++) {
    let off: number;
    let on: number;
    if (r % 2 === 0) {
      off = await offTurn();
      on = await onTurn();
    } else {
      on = await onTurn();
      off = await offTurn();
    }
    bestOff = Math.max(bestOff, off);
    bestOn = Math.max(bestOn, on);
    ratios.push(on / off);
    process.stderr.write(`- smtp turn ${r + 1}/${ROUNDS}: watcher off ${off.toFixed(0)}/s, on ${on.toFixed(0)}/s\n`);
  }
  return { off: bestOff, on: bestOn, ratio: median(ratios) };
}

async function labFigures(): Promise<Figures & { smtp: { off: number; on: number; ratio: number } }> {
  const lab = writeTestLabConfig("bj", 125);
  try {
    const up = await mailha(["lab", "up", "--config", lab.configFile]);
    if (up.code !== 0) throw new Error(`lab up failed: ${up.stderr}`);
    // Measured in the cluster's normal state: both disks in sync.
    await waitNode(lab, "a", "the volume in sync", (st) => st.volume?.connection === "connected" && st.volume.outOfSyncBytes === 0 && st.volume.peer.disk === "uptodate", 120_000);
    const t: Target = { host: lab.a, port: 143, starttls: true, user: "bench@mailha.test", pass: "bench-password-1" };
    const add = await mailha(["user", "add", t.user, "--password", t.pass, "--config", lab.configFile]);
    if (add.code !== 0) throw new Error(`user add: ${add.stderr}`);
    const data = join(lab.dir, "a", "data");
    process.stderr.write(`- lab: ${MESSAGES} messages into INBOX\n`);
    await populate(t);
    await settled(data);
    const pid = () => (JSON.parse(readFileSync(join(lab.dir, "a", "run", "resources.json"), "utf8")) as DaemonRecord[]).find((d) => d.name === "journal")!.pid;
    const imap = await turns(t, data, pid);
    process.stderr.write(`- lab: SMTP, ${SMTP_MESSAGES} messages over ${SMTP_SESSIONS} sessions per turn\n`);
    const smtp = await smtpTurns(lab.a, t.user, data, pid);
    return { ...imap, smtp };
  } finally {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- a private Dovecot on the local disk

function dovecotConf(dir: string, mailLog: boolean): string {
  return `instance_name = mailha-bench-journal
base_dir = ${dir}/run
state_dir = ${dir}/state
log_path = ${dir}/dovecot.log
info_log_path = ${dir}/dovecot-info.log
protocols = imap
listen = 127.0.0.1
default_login_user = dovenull
default_internal_user = dovecot
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~/Maildir
first_valid_uid = 5000
last_valid_uid = 5000
mail_fsync = always
mmap_disable = yes
maildir_very_dirty_syncs = no
${mailLog ? "mail_plugins = $mail_plugins notify mail_log\n" : ""}passdb {
  driver = static
  args = password=bench-password-1
}
userdb {
  driver = static
  args = uid=5000 gid=5000 home=${dir}/data/mail/%d/%n
}
service imap-login {
  inet_listener imap {
    port = ${LOCAL_PORT}
  }
  inet_listener imaps {
    port = 0
  }
}
plugin {
  mail_log_events = delete undelete expunge copy mailbox_delete mailbox_rename flag_change save mailbox_create
  mail_log_fields = uid box msgid size flags
}
`;
}

async function startDovecot(dir: string, mailLog: boolean): Promise<ChildProcess> {
  writeFileSync(join(dir, "dovecot.conf"), dovecotConf(dir, mailLog));
  const p = spawn("dovecot", ["-F", "-c", join(dir, "dovecot.conf")], { stdio: "ignore", detached: true });
  for (let i = 0; i < 100; i++) {
    if (await run("bash", ["-c", `exec 3<>/dev/tcp/127.0.0.1/${LOCAL_PORT}`]).then(() => true, () => false)) return p;
    await sleep(100);
  }
  throw new Error(`Dovecot did not start: ${readFileSync(join(dir, "dovecot.log"), "utf8").slice(-800)}`);
}

async function stopDovecot(p: ChildProcess): Promise<void> {
  const gone = new Promise((r) => p.once("exit", r));
  process.kill(p.pid!, "SIGTERM");
  await Promise.race([gone, sleep(5000)]);
  try {
    process.kill(-p.pid!, "SIGKILL");
  } catch {
    // stopped
  }
}

const WATCHER = `
  import { ChangeJournal } from "./services/journal/changes.ts";
  import { MaildirWatcher } from "./services/journal/maildir-watch.ts";
  import { createLogger } from "./common/log.ts";
  const j = new ChangeJournal(process.env.DATA, "a");
  const w = new MaildirWatcher({ dataDir: process.env.DATA, journal: j, log: createLogger("bench-journal"), debounceMs: Number(process.env.BENCH_JOURNAL_DEBOUNCE_MS) || undefined });
  await w.start();
  process.stdout.write("started\\n");
  process.on("SIGTERM", () => void w.close().then(() => j.close()).then(() => process.exit(0)));
`;

async function localFigures(): Promise<Figures & { mailLog: number; mailLogRatio: number; mailLogLinesPerStore: number; catchUpUnchangedMs: number; catchUpChangedMs: number; catchUpEntries: number }> {
  const dir = mkdtempSync(join("/var/tmp", "mailha-bench-journal-"));
  let dovecot: ChildProcess | null = null;
  let watcher: ChildProcess | null = null;
  try {
    chmodSync(dir, 0o755); // Dovecot's processes and the mail uid must enter it
    for (const d of ["run", "state", "data/mail"]) mkdirSync(join(dir, d), { recursive: true });
    chownSync(join(dir, "data", "mail"), 5000, 5000);
    const t: Target = { host: "127.0.0.1", port: LOCAL_PORT, starttls: false, user: "bench@bench.test", pass: "bench-password-1" };
    dovecot = await startDovecot(dir, false);
    process.stderr.write(`- local disk: ${MESSAGES} messages into INBOX\n`);
    await populate(t);
    // BENCH_JOURNAL_PROFILE=DIR: the watcher writes a CPU profile there when it ends.
    const prof = process.env.BENCH_JOURNAL_PROFILE ? ["--cpu-prof", "--cpu-prof-dir", process.env.BENCH_JOURNAL_PROFILE] : [];
    watcher = spawn(process.execPath, [...prof, "--import", "tsx", "--input-type=module", "-e", WATCHER], { cwd: ROOT, env: { ...process.env, DATA: join(dir, "data") }, stdio: ["ignore", "pipe", "ignore"] });
    await new Promise<void>((resolve, reject) => {
      watcher!.stdout!.on("data", (d) => String(d).includes("started") && resolve());
      watcher!.once("exit", (code) => reject(new Error(`the watcher exited (${code})`)));
    });
    const w = watcher;
    const f = await turns(t, join(dir, "data"), () => w.pid!);
    // mail_log: Dovecot again with the plugin, the watcher frozen.
    process.kill(w.pid!, "SIGSTOP");
    await stopDovecot(dovecot);
    dovecot = await startDovecot(dir, true);
    const info = join(dir, "dovecot-info.log");
    // Against plain Dovecot in adjacent turns too (a restart between them).
    let mailLog = 0;
    let lines = 0;
    const ratios: number[] = [];
    for (let r = 0; r < ROUNDS; r++) {
      await stopDovecot(dovecot);
      dovecot = await startDovecot(dir, false);
      const plain = await storeLoad(t, 200 + r);
      await stopDovecot(dovecot);
      dovecot = await startDovecot(dir, true);
      const before = existsSync(info) ? readFileSync(info, "utf8").split("\n").length : 0;
      const rate = await storeLoad(t, 100 + r);
      mailLog = Math.max(mailLog, rate);
      ratios.push(rate / plain);
      await sleep(500);
      lines = (readFileSync(info, "utf8").split("\n").length - before) / (SESSIONS * STORES);
      process.stderr.write(`- mail_log turn ${r + 1}/${ROUNDS}: plain ${plain.toFixed(0)}/s, mail_log ${rate.toFixed(0)}/s\n`);
    }
    // The catch-up at a start: with nothing changed since the last watcher stopped,
    // and after a turn of STOREs nobody watched.
    process.kill(w.pid!, "SIGCONT");
    process.kill(w.pid!, "SIGTERM");
    await Promise.race([new Promise((r) => w.once("exit", r)), sleep(15_000)]);
    const catchUp = async () => {
      const j = new ChangeJournal(join(dir, "data"), "a");
      const cw = new MaildirWatcher({ dataDir: join(dir, "data"), journal: j, log: createLogger("bench-journal", "warn") });
      const e0 = flagEntries(join(dir, "data"));
      const t0 = process.hrtime.bigint();
      await cw.start();
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      await cw.close();
      await j.close();
      return { ms, entries: flagEntries(join(dir, "data")) - e0 };
    };
    const unchanged = await catchUp();
    await storeLoad(t, 300);
    const changed = await catchUp();
    process.stderr.write(`- catch-up: unchanged ${unchanged.ms.toFixed(0)} ms, after ${SESSIONS * STORES} STOREs ${changed.ms.toFixed(0)} ms (${changed.entries} entries)\n`);
    return { ...f, mailLog, mailLogRatio: median(ratios), mailLogLinesPerStore: lines, catchUpUnchangedMs: unchanged.ms, catchUpChangedMs: changed.ms, catchUpEntries: changed.entries };
  } finally {
    if (watcher?.pid) {
      try {
        process.kill(watcher.pid, "SIGCONT");
        process.kill(watcher.pid, "SIGTERM");
        await Promise.race([new Promise((r) => watcher!.once("exit", r)), sleep(10_000)]);
        process.kill(watcher.pid, "SIGKILL");
      } catch {
        // gone
      }
    }
    if (dovecot) await stopDovecot(dovecot);
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function runJournalBench(): Promise<void> {
  process.stderr.write(`journal benchmark: ${SESSIONS} imapflow sessions x ${STORES} STOREs on a ${MESSAGES}-message INBOX, best of ${ROUNDS} turns\n`);
  if (process.env.BENCH_JOURNAL_LAB_ONLY) {
    const lab = await labFigures();
    console.log(`journal.imap_store.off ${lab.off.toFixed(0)} stores/s\njournal.imap_store.on ${lab.on.toFixed(0)} stores/s\njournal.imap_store.ratio ${lab.ratio.toFixed(3)} ratio\njournal.imap_store.watcher_cpu_share ${lab.cpuShare.toFixed(1)} percent_of_a_core\njournal.smtp.off ${lab.smtp.off.toFixed(0)} per_s\njournal.smtp.on ${lab.smtp.on.toFixed(0)} per_s\njournal.smtp.ratio ${lab.smtp.ratio.toFixed(3)} ratio`);
    return;
  }
  const local = await localFigures();
  if (process.env.BENCH_JOURNAL_LOCAL_ONLY) {
    console.log(`journal.imap_store.local.off ${local.off.toFixed(0)} stores/s\njournal.imap_store.local.watch ${local.on.toFixed(0)} stores/s\njournal.imap_store.local.watcher_cpu ${local.cpuMsPer1000.toFixed(1)} ms_per_1000_stores`);
    return;
  }
  const lab = await labFigures();
  const lines = [
    `journal.imap_store.off ${lab.off.toFixed(0)} stores/s`,
    `journal.imap_store.on ${lab.on.toFixed(0)} stores/s`,
    `journal.imap_store.ratio ${lab.ratio.toFixed(3)} ratio`,
    `journal.imap_store.watcher_cpu ${lab.cpuMsPer1000.toFixed(1)} ms_per_1000_stores`,
    `journal.imap_store.watcher_cpu_share ${lab.cpuShare.toFixed(1)} percent_of_a_core`,
    `journal.imap_store.entries ${lab.entriesPerStore.toFixed(3)} per_store`,
    `journal.smtp.off ${lab.smtp.off.toFixed(0)} per_s`,
    `journal.smtp.on ${lab.smtp.on.toFixed(0)} per_s`,
    `journal.smtp.ratio ${lab.smtp.ratio.toFixed(3)} ratio`,
    `journal.imap_store.local.off ${local.off.toFixed(0)} stores/s`,
    `journal.imap_store.local.watch ${local.on.toFixed(0)} stores/s`,
    `journal.imap_store.local.watch_ratio ${local.ratio.toFixed(3)} ratio`,
    `journal.imap_store.local.watcher_cpu ${local.cpuMsPer1000.toFixed(1)} ms_per_1000_stores`,
    `journal.imap_store.local.watcher_cpu_share ${local.cpuShare.toFixed(1)} percent_of_a_core`,
    `journal.imap_store.local.mail_log ${local.mailLog.toFixed(0)} stores/s`,
    `journal.imap_store.local.mail_log_ratio ${local.mailLogRatio.toFixed(3)} ratio`,
    `journal.imap_store.local.mail_log_lines ${local.mailLogLinesPerStore.toFixed(3)} per_store`,
    `journal.catchup.unchanged ${local.catchUpUnchangedMs.toFixed(0)} ms`,
    `journal.catchup.after_stores ${local.catchUpChangedMs.toFixed(0)} ms`,
    `journal.catchup.entries ${local.catchUpEntries} entries`,
  ];
  for (const l of lines) console.log(l);
  writeSection("journal", [
    `Command: \`npm run bench -- journal\` (run ${new Date().toISOString().slice(0, 10)}; IMAP: ${SESSIONS} imapflow sessions x ${STORES} STOREs on a ${MESSAGES}-message INBOX; SMTP: smtp-source -s ${SMTP_SESSIONS} -m ${SMTP_MESSAGES} -l 2000; ${ROUNDS} turns each way).`,
    "What journaling Dovecot's changes costs. In the lab (active node, Maildir on the replicated volume, protocol C) the `journal` resource is frozen (SIGSTOP) for \"off\" and running for \"on\", in adjacent turns that alternate which goes first; the ratio is the median of on/off over the pairs (the machine is shared: a pair shares its drift), the rates the best turn. SMTP's own delivery journal is part of every delivery (on in both). Target: the watcher costs at most 5% of either (ratio >= 0.95). Local: a private Dovecot on the local disk without a source, with the watcher, and with Dovecot's mail_log plugin (the other source considered).",
    "",
    "| load | watcher off | watcher on | on/off |",
    "|---|---|---|---|",
    `| IMAP STOREs (lab) | ${lab.off.toFixed(0)}/s | ${lab.on.toFixed(0)}/s | ${lab.ratio.toFixed(3)} |`,
    `| SMTP deliveries (lab) | ${lab.smtp.off.toFixed(0)}/s | ${lab.smtp.on.toFixed(0)}/s | ${lab.smtp.ratio.toFixed(3)} |`,
    `| IMAP STOREs (local disk) | ${local.off.toFixed(0)}/s | ${local.on.toFixed(0)}/s | ${local.ratio.toFixed(3)} |`,
    "",
    "```",
    ...lines,
    "```",
  ]);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  await runJournalBench();
  process.exit(0);
}
