// The resource group and its agents. Each agent has start, stop, monitor and kill,
// each bounded by a timeout; the group starts them left to right and stops them right
// to left: volume primary -> filesystem -> mariadb -> redis -> dovecot -> smtp ->
// journal -> spam (by layer: the journal stops after dovecot, smtp and spam). A start that fails
// stops what was started. A start can be aborted (self-fencing during
// activation): between two resources, or at once where a resource waits (a daemon's
// readiness, the replication link); the kill or stop that asked for it then handles
// every resource. The data of every service lives on the replicated volume, mounted at
// the node's data directory.
import { tryRun } from "../common/exec.ts";
import { dirname, join } from "node:path";
import { smtpEhloWorks } from "../services/smtp/probe.ts";
import { ImapFlow } from "imapflow";
import nodemailer from "nodemailer";
import type { Logger } from "pino";
import type { MailhaConfig } from "../common/config.ts";
import { isAlive, killDaemon, startDaemon, stopDaemon, type DaemonRecord } from "../common/daemon.ts";
import type { NodePaths } from "../common/paths.ts";
import { probeLine } from "../common/probe.ts";
import { addDomain, grantAccount, migrate, SQL_ACCOUNTS, upsertUser, type SqlAccount } from "../services/accounts.ts";
import { migrateSpam } from "../services/spam/store.ts";
import { skipUids, UID_GAP } from "../services/uid-gap.ts";
import { dovecotPaths, dovecotSpec, MASTER_USER, writeDovecotConfig, type DovecotOptions } from "../services/dovecot.ts";
import { hashPassword } from "../services/password.ts";
import { connectMariadb, initMariadbDatadir, mariadbPaths, mariadbSpec, pingMariadb, prepareMariadbFiles, secureRootAccount } from "../services/mariadb.ts";
import { pingRedis, prepareRedisFiles, redisPaths, redisSpec } from "../services/redis.ts";
import { serviceSecret } from "../services/privileges.ts";
import { ensureSelfSignedCert } from "../services/tls.ts";
import { isMounted, mountVolume, unmountVolume } from "../replication/filesystem.ts";
import { FILE_NAME } from "../replication/fuse-export.ts";
import { volumeCall, volumeStatus, waitForVolume, type VolumeContext } from "../replication/client.ts";
import { writeNodeMarker } from "../services/journal/accounts.ts";
import { readWatchStatus, watchStatusFile } from "../services/journal/maildir-watch.ts";
import { readSpamWorkerStatus, spamWorkerStatusFile } from "../services/spam/worker-status.ts";
import { MAILHA_BIN } from "../common/self.ts";

export type ResourceState = "stopped" | "starting" | "running" | "stopping" | "failed";

export interface ResourceContext {
  readonly config: MailhaConfig;
  readonly nodeId: string;
  readonly paths: NodePaths;
  readonly vol: VolumeContext;
  readonly log: Logger;
  /** Promote the volume even though the peer's state is unknown (it was confirmed gone). */
  forcePromote: boolean;
  /** With forcePromote: promote even an Outdated disk (the operator's `takeover --force`). */
  overrideOutdated: boolean;
  /** Set while a stop or a kill is waiting for a start to give up: long waits end early. */
  abortRequested: boolean;
  /** Daemons started by agents, persisted so a restarted node daemon can clean up. */
  readonly daemons: Map<string, DaemonRecord>;
  saveDaemons(): void;
}

export interface ResourceAgent {
  readonly name: string;
  /** Stop order: higher layers stop first, one layer at a time, in parallel within it. */
  readonly layer: number;
  readonly startTimeoutMs: number;
  readonly stopTimeoutMs: number;
  readonly monitorTimeoutMs: number;
  start(ctx: ResourceContext): Promise<void>;
  stop(ctx: ResourceContext): Promise<void>;
  /** Throws when the resource does not work as a user needs it. */
  monitor(ctx: ResourceContext): Promise<void>;
  /** Hard stop after a failed stop: SIGKILL, lazy unmount. */
  kill(ctx: ResourceContext): Promise<void>;
}

/** Files the services share through the volume (passwords, TLS), created once. */
function dataSecret(ctx: ResourceContext, name: string): string {
  return serviceSecret(join(ctx.paths.data, "etc"), name);
}

export const MONITOR_LOCAL_PART = "mailha-monitor";

async function startDaemonResource(ctx: ResourceContext, spec: Parameters<typeof startDaemon>[0]): Promise<void> {
  const prev = ctx.daemons.get(spec.name);
  if (prev && isAlive(prev)) return;
  const rec = await startDaemon({ ...spec, shouldAbort: () => ctx.abortRequested });
  ctx.daemons.set(spec.name, rec);
  ctx.saveDaemons();
}

async function stopDaemonResource(ctx: ResourceContext, name: string, sig: "stop" | "kill"): Promise<void> {
  const rec = ctx.daemons.get(name);
  if (!rec) return;
  if (sig === "kill") await killDaemon(rec);
  else await stopDaemon(rec);
  ctx.daemons.delete(name);
  ctx.saveDaemons();
}

const volumeAgent: ResourceAgent = {
  name: "volume",
  layer: 0,
  startTimeoutMs: 55_000,
  stopTimeoutMs: 30_000,
  monitorTimeoutMs: 5000,
  async start(ctx) {
    // With the peer alive, promote through the replication link (the peer agrees and
    // keeps receiving); wait for it to be connected first. A forced promotion is for a
    // peer confirmed gone.
    if (!ctx.forcePromote) await waitForVolume(ctx.vol, (s) => s.peer.node !== null && s.connection !== "connecting", 25_000, "the replication link to connect", () => ctx.abortRequested);
    else if (!ctx.overrideOutdated) {
      // Taking over from a dead peer: never with a disk that was outdated while the
      // peer wrote without us; that would silently drop what it acknowledged.
      const s = await volumeStatus(ctx.vol);
      if (s.disk === "outdated" || s.disk === "inconsistent")
        throw new Error(`the volume here is ${s.disk}: the peer had newer data when it was lost; bring the peer back, or accept losing its data with \`mailha takeover --force\``);
    }
    await volumeCall(ctx.vol, "primary", { force: ctx.forcePromote }, 25_000);
  },
  async stop(ctx) {
    const s = await volumeStatus(ctx.vol);
    if (s.role === "secondary") return;
    await volumeCall(ctx.vol, "secondary", {}, 25_000);
  },
  async monitor(ctx) {
    const s = await volumeStatus(ctx.vol);
    if (s.role !== "primary") throw new Error(`volume is ${s.role}`);
    if (!s.export.mounted) throw new Error("volume export is not mounted");
    if (s.disk !== "uptodate") throw new Error(`volume disk is ${s.disk}`);
  },
  async kill(ctx) {
    // The file system was unmounted lazily and its loop device detached: the export
    // is released once the killed processes are gone. Wait for that (bounded), then
    // demote, so this node never stays primary behind the survivor's back.
    for (let i = 0; i < 30; i++) {
      const s = await volumeStatus(ctx.vol, 1000).catch(() => null);
      if (!s || s.role === "secondary" || !s.export.inUse) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    await volumeCall(ctx.vol, "secondary", {}, 5000);
  },
};

const filesystemAgent: ResourceAgent = {
  name: "filesystem",
  layer: 1,
  startTimeoutMs: 120_000,
  stopTimeoutMs: 60_000,
  monitorTimeoutMs: 5000,
  async start(ctx) {
    if (isMounted(ctx.vol.mountpoint)) return;
    const s = await volumeStatus(ctx.vol);
    const r = await mountVolume(ctx.vol.stateDir, join(ctx.vol.paths.exportDir, FILE_NAME), ctx.vol.mountpoint, { mkfsIfBlank: s.fresh });
    ctx.log.info({ loop: r.loop, fsck: r.fsck, created: r.created }, "file system mounted");
  },
  async stop(ctx) {
    await unmountVolume(ctx.vol.stateDir, ctx.vol.mountpoint, {
      killHolders: (victims, signal) => ctx.log.warn({ victims, signal }, "file system busy: stopping the processes that hold it"),
    });
  },
  async monitor(ctx) {
    if (!isMounted(ctx.vol.mountpoint)) throw new Error(`${ctx.vol.mountpoint} is not mounted`);
  },
  async kill(ctx) {
    await unmountVolume(ctx.vol.stateDir, ctx.vol.mountpoint, { lazy: true }).catch(() => {});
  },
};

const mariadbAgent: ResourceAgent = {
  name: "mariadb",
  layer: 2,
  startTimeoutMs: 90_000,
  stopTimeoutMs: 35_000,
  monitorTimeoutMs: 5000,
  async start(ctx) {
    const mp = mariadbPaths(ctx.paths);
    // mysql's datadir (also on a volume an earlier version left root's); the socket's
    // directory open to the mail gid (SMTP, after it dropped root).
    prepareMariadbFiles(mp, ctx.config.mail.mail_gid);
    await initMariadbDatadir(mp);
    await startDaemonResource(ctx, mariadbSpec("mariadb", mp));
    const db = await connectMariadb(mp.socket);
    try {
      const secured = await secureRootAccount(db);
      if (secured.length) ctx.log.info({ changes: secured }, "MariaDB root logs in by unix_socket only now");
      await migrate(db);
      await migrateSpam(db); // the spam filter's DSPAM-compatible tables (services/spam/store.ts)
      for (const a of Object.keys(SQL_ACCOUNTS) as SqlAccount[]) await grantAccount(db, a, dataSecret(ctx, SQL_ACCOUNTS[a].secret));
      for (const d of ctx.config.mail.domains) await addDomain(db, d);
      await upsertUser(db, `${MONITOR_LOCAL_PART}@${ctx.config.mail.domains[0]}`, dataSecret(ctx, "monitor.secret"));
    } finally {
      await db.end();
    }
  },
  async stop(ctx) {
    await stopDaemonResource(ctx, "mariadb", "stop");
  },
  async monitor(ctx) {
    if (!(await pingMariadb(mariadbPaths(ctx.paths).socket))) throw new Error("MariaDB does not answer SELECT 1");
  },
  async kill(ctx) {
    await stopDaemonResource(ctx, "mariadb", "kill");
  },
};

const redisAgent: ResourceAgent = {
  name: "redis",
  layer: 2,
  startTimeoutMs: 30_000,
  stopTimeoutMs: 20_000,
  monitorTimeoutMs: 3000,
  async start(ctx) {
    const rp = redisPaths(ctx.paths);
    prepareRedisFiles(rp, ctx.config.mail.mail_gid);
    await startDaemonResource(ctx, redisSpec("redis", rp));
  },
  async stop(ctx) {
    await stopDaemonResource(ctx, "redis", "stop");
  },
  async monitor(ctx) {
    if (!(await pingRedis(redisPaths(ctx.paths).socket))) throw new Error("Redis does not answer PING");
  },
  async kill(ctx) {
    await stopDaemonResource(ctx, "redis", "kill");
  },
};

function dovecotOptions(ctx: ResourceContext): DovecotOptions {
  const me = ctx.config.nodes.find((n) => n.id === ctx.nodeId)!;
  const peer = ctx.config.nodes.find((n) => n.id !== ctx.nodeId)!;
  return {
    instance: `mailha-${ctx.config.cluster.name}-${ctx.nodeId}`,
    listenAddress: me.service_address,
    mailUid: ctx.config.mail.mail_uid,
    mailGid: ctx.config.mail.mail_gid,
    postmaster: `postmaster@${ctx.config.mail.domains[0]}`,
    mariadbSocket: mariadbPaths(ctx.paths).socket,
    sqlUser: SQL_ACCOUNTS.dovecot.user,
    sqlPassword: dataSecret(ctx, SQL_ACCOUNTS.dovecot.secret),
    // The reconciler's login (`user*reconcile`); its secret is on the volume, its hash in Dovecot's passwd-file.
    master: { user: MASTER_USER, passwordHash: hashPassword(dataSecret(ctx, "dovecot-master.secret")) },
    tls: { cert: join(ctx.paths.data, "etc", "tls", "tls.crt"), key: join(ctx.paths.data, "etc", "tls", "tls.key") },
    trustedProxies: [peer.service_address],
  };
}

const dovecotAgent: ResourceAgent = {
  name: "dovecot",
  layer: 3,
  startTimeoutMs: 30_000,
  stopTimeoutMs: 15_000,
  monitorTimeoutMs: 8000,
  async start(ctx) {
    // TLS material lives on the volume: both nodes present the same certificate.
    await ensureSelfSignedCert(join(ctx.paths.data, "etc", "tls"), [ctx.config.mail.host, ...ctx.config.mail.mx.map((m) => m.name)]);
    const o = dovecotOptions(ctx);
    const dp = dovecotPaths(ctx.paths);
    writeDovecotConfig(o, dp);
    // Dotlocks left by a Dovecot that died with the other node are stale by
    // definition (no Dovecot runs on this volume yet); Dovecot itself would wait two
    // minutes on each before breaking it.
    const stale = await tryRun("find", [dp.mailRoot, "-name", "dovecot-uidlist.lock", "-type", "f", "-print", "-delete"], { timeoutMs: 60_000 });
    const removed = stale?.stdout.split("\n").filter(Boolean).length ?? 0;
    if (removed) ctx.log.info({ removed }, "removed stale Dovecot dotlocks");
    // A forced takeover of an Outdated disk: the other side may have given UIDs we never saw.
    if (ctx.forcePromote && ctx.overrideOutdated) {
      const folders = skipUids(dp.mailRoot);
      ctx.log.info({ folders, gap: UID_GAP }, "forced takeover of an outdated disk: next UIDs raised, so no UID the other side gave is given again");
      ctx.overrideOutdated = false; // once per takeover: a later restart of Dovecot is not one
    }
    await startDaemonResource(ctx, dovecotSpec("dovecot", o, dp));
  },
  async stop(ctx) {
    await stopDaemonResource(ctx, "dovecot", "stop");
  },
  async monitor(ctx) {
    const me = ctx.config.nodes.find((n) => n.id === ctx.nodeId)!;
    const client = new ImapFlow({
      host: me.service_address,
      port: 143,
      secure: false,
      doSTARTTLS: true,
      tls: { rejectUnauthorized: false },
      auth: { user: `${MONITOR_LOCAL_PART}@${ctx.config.mail.domains[0]}`, pass: dataSecret(ctx, "monitor.secret") },
      logger: false,
      connectionTimeout: 4000,
      greetingTimeout: 4000,
      socketTimeout: 10_000,
    });
    // A late failure (after the monitor's own timeout) must not be an unhandled event.
    client.on("error", () => {});
    await client.connect();
    try {
      await client.noop();
    } finally {
      await client.logout().catch(() => {});
    }
    if (!(await probeLine({ connect: { host: me.service_address, port: 110 }, expect: "+OK", timeoutMs: 3000 }))) throw new Error("POP3 does not greet");
  },
  async kill(ctx) {
    await stopDaemonResource(ctx, "dovecot", "kill");
  },
};

const BIN = MAILHA_BIN;

const SMTP_POOL_THREADS = 64;

const smtpAgent: ResourceAgent = {
  name: "smtp",
  layer: 3,
  startTimeoutMs: 30_000,
  stopTimeoutMs: 15_000,
  monitorTimeoutMs: 5000,
  async start(ctx) {
    const me = ctx.config.nodes.find((n) => n.id === ctx.nodeId)!;
    await startDaemonResource(ctx, {
      name: "smtp",
      command: process.execPath,
      args: [BIN, "smtp", "run", "--config", ctx.config.file, "--node", ctx.nodeId],
      // Every delivery's fsyncs hold a libuv pool thread until the journal commit; with
      // the default 4 threads, 4 deliveries at a time share a commit and the rest queue.
      env: { ...process.env, UV_THREADPOOL_SIZE: String(SMTP_POOL_THREADS) },
      logFile: join(ctx.paths.log, "smtp.log"),
      ready: () => smtpEhloWorks(me.service_address, 25, 1000),
      readyTimeoutMs: 20_000,
      stopTimeoutMs: 10_000,
    });
  },
  async stop(ctx) {
    await stopDaemonResource(ctx, "smtp", "stop");
  },
  async monitor(ctx) {
    const me = ctx.config.nodes.find((n) => n.id === ctx.nodeId)!;
    if (!(await smtpEhloWorks(me.service_address, 25))) throw new Error("SMTP on port 25 does not answer EHLO");
    // Submission as a user sees it: implicit TLS on 465 and AUTH against the accounts.
    const tx = nodemailer.createTransport({
      host: me.service_address,
      port: 465,
      secure: true,
      tls: { rejectUnauthorized: false },
      auth: { user: `${MONITOR_LOCAL_PART}@${ctx.config.mail.domains[0]}`, pass: dataSecret(ctx, "monitor.secret") },
      connectionTimeout: 2000,
      greetingTimeout: 2000,
      socketTimeout: 3000,
    });
    try {
      await tx.verify();
    } catch (err) {
      throw new Error(`submission on 465 (TLS + AUTH) fails: ${(err as Error).message.split("\n")[0]}`);
    } finally {
      tx.close();
    }
  },
  async kill(ctx) {
    await stopDaemonResource(ctx, "smtp", "kill");
  },
};

/** A watcher that has not written its status for this long is taken as hung. */
const JOURNAL_STATUS_STALE_MS = 30_000;
/** When this node daemon last started the watcher (its monitor gives it time to load). */
let journalStartedAtMs = 0;

/** `mailha journal watch` (services/journal/README.md), a child of the node daemon. */
function journalSpec(ctx: ResourceContext): Parameters<typeof startDaemon>[0] {
  return {
    name: "journal",
    command: process.execPath,
    args: [BIN, "journal", "watch", "--config", ctx.config.file, "--node", ctx.nodeId],
    logFile: join(ctx.paths.log, "journal.log"),
    // Not waited for: its catch-up at start journals whatever happens before it
    // watches, so the group (and a takeover) does not wait for it to load.
    ready: async () => true,
    readyTimeoutMs: 20_000,
    // Its last round journals what Dovecot and SMTP did before they stopped (at most 5 s).
    stopTimeoutMs: 10_000,
  };
}

/**
 * The change journal's Dovecot source. It needs only the file system, so its layer is
 * that of mariadb and redis: started last (after smtp), it stops after dovecot and smtp
 * and so sees their last changes. It also names this node beside MariaDB's socket, for
 * the account entries (services/journal/accounts.ts).
 */
const journalAgent: ResourceAgent = {
  name: "journal",
  layer: 2,
  startTimeoutMs: 30_000,
  stopTimeoutMs: 15_000,
  monitorTimeoutMs: 3000,
  async start(ctx) {
    writeNodeMarker(dirname(mariadbPaths(ctx.paths).socket), ctx.nodeId);
    journalStartedAtMs = Date.now();
    await startDaemonResource(ctx, journalSpec(ctx));
  },
  async stop(ctx) {
    await stopDaemonResource(ctx, "journal", "stop");
  },
  async monitor(ctx) {
    const rec = ctx.daemons.get("journal");
    if (!rec || !isAlive(rec)) throw new Error("the journal watcher is not running");
    const s = readWatchStatus(watchStatusFile(ctx.paths.run));
    const at = Math.max(Date.parse(s?.at ?? "") || 0, journalStartedAtMs);
    const age = Date.now() - at;
    if (!(age < JOURNAL_STATUS_STALE_MS)) throw new Error(`the journal watcher has not reported for ${Math.round(age / 1000)} s`);
  },
  async kill(ctx) {
    await stopDaemonResource(ctx, "journal", "kill");
  },
};

/** A spam worker that has not written its status for this long is taken as hung (it writes every second). */
const SPAM_STATUS_STALE_MS = 60_000;
let spamStartedAtMs = 0;

/**
 * The spam worker (`mailha spam worker`, services/spam/worker.ts): retraining from the
 * journal's moves into and out of Junk, and the nightly purge job on Redis. After the
 * journal (it reads what the watcher journals); layer 3, so it stops before MariaDB,
 * Redis and the journal it uses.
 */
const spamAgent: ResourceAgent = {
  name: "spam",
  layer: 3,
  startTimeoutMs: 30_000,
  stopTimeoutMs: 15_000,
  monitorTimeoutMs: 3000,
  async start(ctx) {
    spamStartedAtMs = Date.now();
    await startDaemonResource(ctx, {
      name: "spam",
      command: process.execPath,
      args: [BIN, "spam", "worker", "--config", ctx.config.file, "--node", ctx.nodeId],
      logFile: join(ctx.paths.log, "spam.log"),
      // Not waited for: nothing in the group needs it, and its loop catches up from its cursor.
      ready: async () => true,
      readyTimeoutMs: 20_000,
      // A round in progress ends first (bounded), then the purge job's worker closes.
      stopTimeoutMs: 10_000,
    });
  },
  async stop(ctx) {
    await stopDaemonResource(ctx, "spam", "stop");
  },
  async monitor(ctx) {
    const rec = ctx.daemons.get("spam");
    if (!rec || !isAlive(rec)) throw new Error("the spam worker is not running");
    const s = readSpamWorkerStatus(spamWorkerStatusFile(ctx.paths.run));
    const at = Math.max(Date.parse(s?.at ?? "") || 0, spamStartedAtMs);
    const age = Date.now() - at;
    if (!(age < SPAM_STATUS_STALE_MS)) throw new Error(`the spam worker has not reported for ${Math.round(age / 1000)} s`);
  },
  async kill(ctx) {
    await stopDaemonResource(ctx, "spam", "kill");
  },
};

/** The ordered group; the dns step joins at the end with issue 6. */
export const GROUP: readonly ResourceAgent[] = [volumeAgent, filesystemAgent, mariadbAgent, redisAgent, dovecotAgent, smtpAgent, journalAgent, spamAgent];

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(t);
        reject(e instanceof Error ? e : new Error(String(e)));
      },
    );
  });
}

export interface GroupResult {
  readonly ok: boolean;
  readonly error?: string;
}

/** Runs group operations one at a time, in order. */
export class GroupRunner {
  readonly states = new Map<string, ResourceState>();
  private chain: Promise<unknown> = Promise.resolve();
  private abort = false;

  constructor(
    private readonly agents: readonly ResourceAgent[],
    private readonly ctx: ResourceContext,
    private readonly onEvent: (ev: Record<string, unknown>) => void,
  ) {
    for (const a of agents) this.states.set(a.name, "stopped");
  }

  private enqueue<T>(fn: () => Promise<T>): Promise<T> {
    this.busy++;
    const p = this.chain.then(fn, fn).finally(() => this.busy--);
    this.chain = p.catch(() => {});
    return p;
  }
  /** Operations (start, stop, restart, kill) queued or running. */
  private busy = 0;

  private set(name: string, s: ResourceState, extra: Record<string, unknown> = {}): void {
    this.states.set(name, s);
    this.onEvent({ type: "resource", resource: name, state: s, ...extra });
  }

  /**
   * Stops a start in progress: at the next resource boundary, or sooner where the
   * resource waits (a daemon's readiness, the replication link). The stop or kill that
   * asked for it runs next and covers every resource, so the start leaves what it
   * started to that (a self-fencing node must not stop gracefully first).
   */
  requestAbort(): void {
    this.abort = true;
    this.ctx.abortRequested = true;
  }

  start(forcePromote: boolean, overrideOutdated = false): Promise<GroupResult> {
    this.abort = false;
    this.ctx.abortRequested = false;
    return this.enqueue(async () => {
      this.ctx.forcePromote = forcePromote;
      this.ctx.overrideOutdated = overrideOutdated;
      const started: ResourceAgent[] = [];
      for (const a of this.agents) {
        if (this.abort) return { ok: false, error: "activation aborted" };
        this.set(a.name, "starting");
        const t0 = Date.now();
        try {
          await withTimeout(a.start(this.ctx), a.startTimeoutMs, `start of ${a.name}`);
          started.push(a);
          this.set(a.name, "running", { ms: Date.now() - t0 });
        } catch (err) {
          if (this.abort) {
            this.set(a.name, "stopped", { aborted: true });
            return { ok: false, error: "activation aborted" };
          }
          this.set(a.name, "failed", { error: (err as Error).message });
          await this.stopList([...started].reverse());
          return { ok: false, error: `${a.name}: ${(err as Error).message}` };
        }
      }
      return { ok: true };
    });
  }

  stop(): Promise<GroupResult> {
    return this.enqueue(() => this.stopList([...this.agents].reverse()));
  }

  /** Stops LIST layer by layer (highest first), the resources of a layer in parallel. */
  private async stopList(list: readonly ResourceAgent[]): Promise<GroupResult> {
    let firstError: string | undefined;
    const layers = [...new Set(list.map((a) => a.layer))].sort((x, y) => y - x);
    for (const layer of layers) {
      await Promise.all(
        list
          .filter((a) => a.layer === layer)
          .map(async (a) => {
            this.set(a.name, "stopping");
            try {
              await withTimeout(a.stop(this.ctx), a.stopTimeoutMs, `stop of ${a.name}`);
              this.set(a.name, "stopped");
            } catch (err) {
              this.set(a.name, "failed", { error: (err as Error).message });
              firstError ??= `${a.name}: ${(err as Error).message}`;
            }
          }),
      );
    }
    return firstError ? { ok: false, error: firstError } : { ok: true };
  }

  /**
   * The hard way (self-fencing, a failed stop): every daemon gets SIGKILL at once (no
   * order is needed to kill), then the file system is detached and the volume demoted
   * once its export is released.
   */
  kill(): Promise<GroupResult> {
    return this.enqueue(async () => {
      let firstError: string | undefined;
      const killOne = async (a: ResourceAgent) => {
        try {
          await withTimeout(a.kill(this.ctx), 10_000, `kill of ${a.name}`);
          this.set(a.name, "stopped", { killed: true });
        } catch (err) {
          this.set(a.name, "failed", { killed: true, error: (err as Error).message });
          firstError ??= `${a.name}: ${(err as Error).message}`;
        }
      };
      const rest = [...this.agents].filter((a) => a.layer <= 1).sort((x, y) => y.layer - x.layer);
      await Promise.all(this.agents.filter((a) => a.layer > 1).map(killOne));
      for (const a of rest) await killOne(a);
      return firstError ? { ok: false, error: firstError } : { ok: true };
    });
  }


  /** Restarts one resource and everything started after it. */
  restart(name: string): Promise<boolean> {
    return this.enqueue(async () => {
      const i = this.agents.findIndex((a) => a.name === name);
      if (i < 0) return false;
      const tail = this.agents.slice(i);
      const stopped = await this.stopList([...tail].reverse());
      if (!stopped.ok) return false;
      for (const a of tail) {
        this.set(a.name, "starting");
        try {
          await withTimeout(a.start(this.ctx), a.startTimeoutMs, `start of ${a.name}`);
          this.set(a.name, "running");
        } catch (err) {
          this.set(a.name, "failed", { error: (err as Error).message });
          return false;
        }
      }
      return true;
    });
  }

  /** Runs every monitor (not queued: monitors must not wait behind a long start). */
  /**
   * Monitors the running resources bottom-up and reports the first failure at once:
   * what sits above a failed resource is restarted with it, and its own monitor (an
   * IMAP login that waits for a dead database, say) would only delay the report.
   */
  async monitor(onFailure: (f: { resource: string; error: string }) => void): Promise<void> {
    // While a restart (or any group operation) runs, a resource it is cycling would
    // fail its monitor and count as a new failure: monitors wait for the next round.
    for (const a of this.agents) {
      if (this.busy > 0) return;
      if (this.states.get(a.name) !== "running") continue;
      try {
        await withTimeout(a.monitor(this.ctx), a.monitorTimeoutMs, `monitor of ${a.name}`);
      } catch (err) {
        if (this.busy === 0) onFailure({ resource: a.name, error: (err as Error).message });
        return;
      }
    }
  }

}
