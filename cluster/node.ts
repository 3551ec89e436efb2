// The node daemon (`mailha node run`): supervises this node's volume engine (with a
// watchdog), sends and checks heartbeats on every link, pings the tie-breaker targets,
// talks to the witness, fences the peer, runs the resource group and its monitors,
// and feeds all of it to the node state machine, which decides. Serves a control
// socket for the operator, a Prometheus endpoint, and writes the cluster event log.
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { createServer as createHttpServer } from "node:http";
import type { Socket } from "node:net";
import { join } from "node:path";
import type { MailhaConfig } from "../common/config.ts";
import { daemonRecordProblem, isAlive, startDaemon, stopDaemon, type DaemonRecord } from "../common/daemon.ts";
import { DamagedStateFileError, readJsonState, writeFileDurable } from "../common/fsutil.ts";
import { processesUsing, signalAll } from "../common/procs.ts";
import { tryRun } from "../common/exec.ts";
import { createLogger } from "../common/log.ts";
import { EventLog, Pending } from "../common/eventlog.ts";
import { nodeNetns, nodePaths, nodeStateDir } from "../common/paths.ts";
import { listPreserved, markReconciled, readEngineRecord, startEngine, stopEngine, volumeCall, volumeContext, volumeStatus, type VolumeStatus } from "../replication/client.ts";
import { controlEvents, serveControl, type ControlRequest } from "../replication/control.ts";
import { isMounted, unmountVolume } from "../replication/filesystem.ts";
import { commandAgent, labAgent, noneAgent, type FenceAgent } from "./fencing.ts";
import { encodeHeartbeat, HeartbeatReceiver, type HeartbeatCounters } from "./heartbeat.ts";
import { ClusterMachine, type Action, type Command, type Event } from "./machine.ts";
import { GROUP, GroupRunner, type ResourceContext } from "./resources.ts";
import { WitnessClient } from "./witness.ts";
import { applyDns } from "../dns/apply.ts";
import { queryCounters } from "../dns/query.ts";
import { answerCounters } from "../dns/update.ts";
import { takeLease } from "../dns/lease.ts";
import { callPeer, peerEnds, servePeerRpc } from "../common/peer-rpc.ts";
import { decideAuto, mayPruneJournal, type AutoTry } from "../reconcile/auto.ts";
import { formatHlc } from "../common/hlc.ts";
import { pruneJournal } from "../services/journal/changes.ts";
import { VictimExport } from "../reconcile/export.ts";
import { Directory } from "../services/smtp/recipients.ts";
import { mariadbPaths } from "../services/mariadb.ts";
import { readStats } from "../services/stats.ts";
import { MAILHA_BIN } from "../common/self.ts";
import { nodeControlSocket } from "./client.ts";

export { nodeControlSocket };

export function clusterEventLog(c: MailhaConfig, nodeId: string): string {
  return join(nodeStateDir(c, nodeId), "log", "cluster-events.jsonl");
}

const BIN = MAILHA_BIN;
const WATCHDOG_INTERVAL_MS = 1000;
const WATCHDOG_TIMEOUT_MS = 2000;
const WATCHDOG_MISSES_MAX = 3;
const PING_INTERVAL_MS = 1000;
const WITNESS_TIMEOUT_MS = 500;
const AUTO_RECONCILE_CHECK_MS = 3000;
const JOURNAL_PRUNE_EVERY_MS = 3_600_000;

export async function runNode(o: { config: MailhaConfig; nodeId: string }): Promise<void> {
  const c = o.config;
  const me = c.nodes.find((n) => n.id === o.nodeId)!;
  const peer = c.nodes.find((n) => n.id !== o.nodeId)!;
  const stateDir = nodeStateDir(c, o.nodeId);
  const paths = nodePaths(stateDir);
  for (const d of [paths.run, paths.log, paths.etc, paths.data]) mkdirSync(d, { recursive: true });
  const vol = volumeContext(c, o.nodeId);
  const log = createLogger(`node@${o.nodeId}`);
  const key = Buffer.from(readFileSync(c.heartbeat.key_file, "utf8").trim());
  const inc = Date.now();
  const events = new EventLog(clusterEventLog(c, o.nodeId), o.nodeId, log, "clusterEvent");
  const emit = (ev: Record<string, unknown>) => events.emit(ev);

  // ---- leftovers of a previous incarnation (a crash of this daemon = a reboot) -----
  const daemonsFile = join(paths.run, "resources.json");
  const daemons = new Map<string, DaemonRecord>();
  let leftovers: DaemonRecord[] = [];
  try {
    leftovers =
      readJsonState<DaemonRecord[]>(daemonsFile, (v) => (Array.isArray(v) ? (v.map(daemonRecordProblem).find((x) => x !== null) ?? null) : "not a list"), "the processes holding the volume are killed instead") ?? [];
  } catch (err) {
    if (!(err instanceof DamagedStateFileError)) throw err;
    // Which daemons ran is lost: the ones that matter hold files on the volume.
    const holders = isMounted(vol.mountpoint) ? await processesUsing(vol.mountpoint) : [];
    signalAll(holders, "SIGKILL");
    emit({ type: "state-file-damaged", file: err.file, problem: err.problem, killed: holders.map((h) => h.pid) });
  }
  for (const rec of leftovers) {
    if (isAlive(rec)) {
      try {
        process.kill(rec.pid, "SIGKILL");
      } catch {
        // gone
      }
      emit({ type: "orphan-killed", daemon: rec.name, pid: rec.pid });
    }
  }
  writeFileDurable(daemonsFile, "[]", 0o644);
  if (isMounted(vol.mountpoint)) {
    await unmountVolume(vol.stateDir, vol.mountpoint, { lazy: true }).catch(() => {});
    emit({ type: "orphan-unmounted", mountpoint: vol.mountpoint });
  }

  // ---- the volume engine, supervised ---------------------------------------------------
  const engineRunning = () => {
    const r = readEngineRecord(vol);
    return !!r && isAlive(r);
  };
  if (!engineRunning()) await startEngine(vol);
  // A previous incarnation may have left the volume primary: this node starts passive.
  await volumeCall(vol, "secondary", {}, 10_000).catch((err: Error) => emit({ type: "volume-demote-failed", error: err.message }));
  let lastVolume: VolumeStatus | null = null;
  let watchdogMisses = 0;

  // ---- the state machine -----------------------------------------------------------------
  const m = new ClusterMachine(
    {
      nodeId: me.id,
      peerId: peer.id,
      preferred: c.cluster.preferred_node,
      autoFailback: c.cluster.auto_failback,
      links: me.heartbeat_links.map((l) => l.name),
      keepaliveMs: c.timers.keepalive_ms,
      warntimeMs: c.timers.warntime_ms,
      deadtimeMs: c.timers.deadtime_ms,
      initdeadMs: c.timers.initdead_ms,
      witness: !!c.quorum.witness || !!c.quorum.dns_lease,
      pingTargets: c.quorum.ping_targets.length > 0,
      fencing: c.fencing.agent,
      leaseMs: c.quorum.witness?.lease_ms ?? c.quorum.dns_lease?.lease_ms ?? 0,
      selfFenceMs: c.manager.self_fence_ms,
      maxRestarts: c.manager.max_restarts,
      restartWindowMs: c.manager.restart_window_ms,
    },
    Date.now(),
  );
  const pending = new Pending<{ error?: string; result?: unknown }>();
  let stopping = false;

  const ctx: ResourceContext = {
    config: c,
    nodeId: o.nodeId,
    paths,
    vol,
    log,
    forcePromote: false,
    overrideOutdated: false,
    abortRequested: false,
    daemons,
    saveDaemons: () => writeFileDurable(daemonsFile, JSON.stringify([...daemons.values()]), 0o644),
  };
  const runner = new GroupRunner(GROUP, ctx, emit);
  const fence: FenceAgent =
    c.fencing.agent === "command" ? commandAgent(c.fencing.command!, c.fencing.timeout_ms) : c.fencing.agent === "lab" ? labAgent((id) => nodeNetns(c, id)!) : noneAgent();
  const witness = c.quorum.witness ? new WitnessClient({ host: c.quorum.witness.address, port: c.quorum.witness.port, key, cluster: c.cluster.name, node: me.id, localAddress: me.service_address }) : null;

  // Set once the reconcile wiring below exists: stops an automatic reconcile run (its
  // child reads and writes on the volume) before the group leaves this node.
  let stopReconcile = (): void => {};
  /** The mail host's live set the machine last asked for (its `dns` action). */
  let dnsWanted: string[] | null = null;
  let dnsApplied: string | null = null;
  let dnsBusy = false;

  function dispatch(ev: Event): void {
    for (const a of m.handle(ev)) act(a);
  }

  // ---- the passive node's services (proxy, backup MX): whenever the group is not here --
  const passiveSpec = {
    name: "passive",
    command: process.execPath,
    args: [BIN, "passive", "run", "--config", c.file, "--node", o.nodeId],
    logFile: join(paths.log, "passive.log"),
    ready: async () => existsSync(join(paths.run, "passive.ready")),
    readyTimeoutMs: 15_000,
    stopTimeoutMs: 10_000,
  };
  let passiveOp: Promise<void> = Promise.resolve();
  const passiveWanted = () => !stopping && !["activating", "active", "deactivating", "stop-failed"].includes(m.nodeState);
  const reconcilePassive = (): Promise<void> => {
    passiveOp = passiveOp.then(async () => {
      const rec = daemons.get("passive");
      const running = !!rec && isAlive(rec);
      if (passiveWanted() && !running) {
        try {
          rmSync(join(paths.run, "passive.ready"), { force: true });
          const r = await startDaemon(passiveSpec);
          daemons.set("passive", r);
          ctx.saveDaemons();
          emit({ type: "passive-services", running: true, pid: r.pid });
        } catch (err) {
          emit({ type: "passive-services-failed", error: (err as Error).message.split("\n")[0] });
        }
      } else if (!passiveWanted() && rec) {
        await stopDaemon(rec);
        daemons.delete("passive");
        ctx.saveDaemons();
        emit({ type: "passive-services", running: false });
      }
    });
    return passiveOp;
  };

  function act(a: Action): void {
    switch (a.t) {
      case "event":
        emit(a.ev);
        break;
      case "reply":
        pending.settle(a.req, { error: a.error, result: a.result });
        break;
      case "start-group":
        emit({ type: "group-starting", forcePromote: a.forcePromote });
        // The proxy holds the service ports: it goes first.
        void reconcilePassive().then(async () => {
          // The machine may have given up meanwhile (self-fencing, a stop): a start
          // queued behind that kill must not run.
          if (m.nodeState !== "activating") return;
          const r = await runner.start(a.forcePromote, a.overrideOutdated);
          dispatch({ t: "group-started", now: Date.now(), ok: r.ok, error: r.error });
        });
        break;
      case "stop-group":
        stopReconcile();
        runner.requestAbort();
        void runner.stop().then((r) => {
          dispatch({ t: "group-stopped", now: Date.now(), ok: r.ok, error: r.error });
          void reconcilePassive();
        });
        break;
      case "kill-group":
        stopReconcile();
        runner.requestAbort();
        // Fencing ourselves (or giving up a group that would not stop): freeze the
        // volume's I/O first, so nothing written from here on counts as durable and
        // the peer's copy wins the resync after we come back.
        void volumeCall(vol, "freeze", {}, 1000)
          .catch((err: Error) => emit({ type: "volume-freeze-failed", error: err.message }))
          .then(() => runner.kill())
          .then((r) => dispatch({ t: "group-killed", now: Date.now(), ok: r.ok, error: r.error }));
        break;
      case "restart-resource":
        void runner.restart(a.resource).then((ok) => dispatch({ t: "resource-restarted", now: Date.now(), resource: a.resource, ok }));
        break;
      case "outdate-disk":
        void volumeCall(vol, "outdate", {}, 5000).then(
          () => dispatch({ t: "outdated", now: Date.now(), ok: true }),
          (err: Error) => dispatch({ t: "outdated", now: Date.now(), ok: false, error: err.message }),
        );
        break;
      case "dns":
        dnsWanted = a.peerLive ? c.nodes.map((n) => n.id) : [me.id];
        void updateDns(dnsWanted);
        break;
      case "fence-peer":
        void fence.fence(peer.id).then((r) => dispatch({ t: "fenced", now: Date.now(), ok: r.ok, detail: r.detail }));
        break;
      case "lease":
        if (c.quorum.dns_lease) {
          // The DNS lease: a compare-and-set TXT record on the zone's primary server.
          const leaseMs = c.quorum.dns_lease.lease_ms;
          const sent = Date.now();
          void takeLease(c, me.id, a.op === "release" ? 0 : leaseMs).then(
            (r) => a.op === "acquire" && dispatch({ t: "lease", now: Date.now(), held: r.won, expiresMs: sent + leaseMs }),
            (err: Error) => emit({ type: "dns-lease-error", error: err.message }),
          );
          break;
        }
        if (!witness) break;
        if (a.op === "release") void witness.request("release", WITNESS_TIMEOUT_MS);
        else {
          const sent = Date.now();
          void witness.request("acquire", WITNESS_TIMEOUT_MS).then((ans) => {
            if (ans) dispatch({ t: "lease", now: Date.now(), held: ans.granted, expiresMs: sent + c.quorum.witness!.lease_ms });
          });
        }
        break;
    }
  }

  // ---- heartbeats ----------------------------------------------------------------------------
  const receiver = new HeartbeatReceiver(key, c.cluster.name, peer.id, { deadtimeMs: c.timers.deadtime_ms });
  const sockets: { name: string; sock: UdpSocket; peerAddress: string }[] = [];
  for (const l of me.heartbeat_links) {
    const peerLink = peer.heartbeat_links.find((x) => x.name === l.name)!;
    const sock = createSocket({ type: "udp4", reuseAddr: true });
    sock.on("message", (msg) => {
      const v = receiver.accept(msg, Date.now());
      if (v.verdict === "ok") {
        if (v.hb.link !== l.name) return; // a packet for another link: ignore, it counts there
        // The summary only when no later round was heard on any link (null: old news).
        dispatch({ t: "heartbeat", now: Date.now(), link: l.name, summary: v.summary });
      } else log.warn({ link: l.name, verdict: v.verdict }, "heartbeat dropped");
    });
    sock.on("error", (err) => log.error({ err, link: l.name }, "heartbeat socket error"));
    await new Promise<void>((resolve) => sock.bind(c.heartbeat.port, l.address, () => resolve()));
    sockets.push({ name: l.name, sock, peerAddress: peerLink.address });
  }
  let seq = 0;
  const sendHeartbeats = () => {
    const summary = m.summary();
    seq++;
    for (const s of sockets) {
      const pkt = encodeHeartbeat({ v: 1, cluster: c.cluster.name, node: me.id, inc, seq, ts: Date.now(), link: s.name, summary }, key);
      s.sock.send(pkt, c.heartbeat.port, s.peerAddress, () => {});
    }
  };

  // ---- timers ----------------------------------------------------------------------------------
  const timers: NodeJS.Timeout[] = [];
  timers.push(setInterval(sendHeartbeats, c.timers.keepalive_ms));
  timers.push(setInterval(() => dispatch({ t: "tick", now: Date.now() }), Math.max(20, Math.floor(c.timers.keepalive_ms / 2))));
  if (c.quorum.ping_targets.length) {
    timers.push(
      setInterval(() => {
        void Promise.all(c.quorum.ping_targets.map((t) => tryRun("ping", ["-c", "1", "-W", "1", "-n", t], { timeoutMs: 2000 }))).then((rs) =>
          dispatch({ t: "ping", now: Date.now(), ok: rs.some((x) => x !== null) }),
        );
      }, PING_INTERVAL_MS),
    );
  }
  timers.push(setInterval(() => void reconcilePassive(), 1000));

  // ---- DNS: the active node keeps the mail host pointing at the healthy nodes ----------
  async function updateDns(live: string[]): Promise<void> {
    // Records managed by hand (dns.updates: false): both A records stay; nothing to send.
    if (!c.dns.updates) {
      dnsApplied = live.join(",");
      return;
    }
    if (dnsBusy) return;
    dnsBusy = true;
    try {
      const r = await applyDns(c, live);
      if (r.rcode === "NOERROR") {
        dnsApplied = live.join(",");
        emit({ type: "dns", live, verified: r.verified });
      } else emit({ type: "dns-update-failed", live, rcode: r.rcode, tsigError: r.tsigError });
    } catch (err) {
      emit({ type: "dns-update-failed", live, error: (err as Error).message });
    } finally {
      dnsBusy = false;
    }
  }
  // The machine says which set (the `dns` action); a failed update is tried again.
  timers.push(
    setInterval(() => {
      if (m.nodeState !== "active" || !dnsWanted) return;
      if (dnsWanted.join(",") !== dnsApplied) void updateDns(dnsWanted);
    }, 1000),
  );
  let monitoring = false;
  timers.push(
    setInterval(() => {
      if (monitoring || m.nodeState !== "active") return;
      monitoring = true;
      void runner
        .monitor((f) => {
          if (m.nodeState === "active") dispatch({ t: "monitor-failed", now: Date.now(), resource: f.resource, error: f.error });
        })
        .finally(() => (monitoring = false));
    }, c.manager.monitor_interval_ms),
  );
  /** The volume's state into the state machine (which also decides the outdate step). */
  function takeVolumeStatus(s: VolumeStatus): void {
    lastVolume = s;
    const inSync = s.connection === "connected" && s.disk === "uptodate" && s.peer.disk === "uptodate";
    const replicating = s.connection === "connected" || s.connection === "sync-source" || s.connection === "sync-target" || s.connection === "verifying";
    dispatch({ t: "volume", now: Date.now(), inSync, writingAlone: s.role === "primary" && !replicating, role: s.role, disk: s.disk, replicating });
  }
  // Between watchdog rounds, the engine's own events (connection, role, disk) bring a
  // fresh status at once, so a lost replication link reaches the peer (writingAlone
  // in our heartbeats) and its outdate step within a heartbeat, not a second or two.
  let refreshing = false;
  const refreshVolume = () => {
    if (refreshing) return;
    refreshing = true;
    void volumeStatus(vol, WATCHDOG_TIMEOUT_MS)
      .then(takeVolumeStatus, () => {}) // failures are the watchdog's to count
      .finally(() => (refreshing = false));
  };
  const VOLUME_TRIGGERS = new Set(["connection", "peer-lost", "role", "disk", "peer-disk"]);
  let volumeEventsStop: (() => void) | null = null;
  const subscribeVolumeEvents = (): void => {
    if (stopping) return;
    // Resubscribes once a second at most while the engine is away (it restarts).
    volumeEventsStop = controlEvents(
      vol.paths.controlSocket,
      (ev) => VOLUME_TRIGGERS.has(String(ev.type)) && refreshVolume(),
      () => {
        volumeEventsStop = null;
        if (!stopping) setTimeout(subscribeVolumeEvents, 1000);
      },
    );
  };
  subscribeVolumeEvents();

  let watching = false;
  timers.push(
    setInterval(() => {
      if (watching) return;
      watching = true;
      void volumeStatus(vol, WATCHDOG_TIMEOUT_MS)
        .then(
          (s) => {
            watchdogMisses = 0;
            takeVolumeStatus(s);
          },
          async () => {
            watchdogMisses++;
            if (watchdogMisses < WATCHDOG_MISSES_MAX && engineRunning()) return;
            // Hung or dead: kill the engine (never its clients) and start a new one.
            const rec = readEngineRecord(vol);
            if (rec && isAlive(rec)) {
              try {
                process.kill(rec.pid, "SIGKILL");
              } catch {
                // gone
              }
            }
            emit({ type: "volume-engine-restart", reason: watchdogMisses >= WATCHDOG_MISSES_MAX ? `no answer ${watchdogMisses} times` : "not running" });
            watchdogMisses = 0;
            if (m.nodeState === "active") dispatch({ t: "monitor-failed", now: Date.now(), resource: "volume", error: "volume engine hung or died" });
            await startEngine(vol).catch((err: Error) => emit({ type: "volume-engine-start-failed", error: err.message }));
          },
        )
        .finally(() => (watching = false));
    }, WATCHDOG_INTERVAL_MS),
  );

  // ---- the peer channel: the recipient list, this node's split-brain copies -------------
  const victimExport = new VictimExport({
    runDir: paths.run,
    listCopies: async () => [...(await listPreserved(vol))].sort((x, y) => x.atMs - y.atMs),
    markReconciled: (path) => markReconciled(vol, path),
  });
  const peerRpc = await servePeerRpc({
    host: me.service_address,
    port: c.manager.peer_port,
    key,
    cluster: c.cluster.name,
    self: me.id,
    peer: peer.id,
    log,
    handlers: {
      // The passive node's backup MX checks recipients against this list.
      recipients: async () => {
        if (m.nodeState !== "active") throw new Error(`node ${me.id} is not active`);
        const dir = new Directory(mariadbPaths(paths).socket, c.mail.domains);
        try {
          return { result: { recipients: await dir.allRecipients() } };
        } finally {
          void dir.close();
        }
      },
      "preserved-list": async () => ({ result: await victimExport.pending() }),
      "victim-open": async (args) => ({ result: await victimExport.openCopy(String(args.copy)) }),
      "victim-file": async (args) => {
        const f = await victimExport.file(String(args.copy), String(args.file));
        return { result: { mtimeMs: f.mtimeMs }, body: f.body };
      },
      "victim-close": async (args) => {
        const r = await victimExport.close({ path: String(args.copy), reconciled: args.reconciled === true });
        if (r.marked) emit({ type: "preserved-reconciled", path: String(args.copy) });
        return { result: r };
      },
    },
  });

  // ---- after a split brain: the survivor merges the victim's copy (reconcile.auto) ------
  const autoRec = {
    running: null as { copy: string; pid: number; sinceMs: number; child: ChildProcess } | null,
    tries: {} as Record<string, AutoTry>,
    waiting: null as { copy: string; says: string } | null,
    last: null as { copy: string; ok: boolean; atMs: number; says: string } | null,
    checking: false,
    /** The peer's copies not reconciled yet, as last heard (null: not asked or no answer). */
    peerCopies: null as string[] | null,
  };
  const reconcileLog = join(paths.log, "reconcile.log");
  stopReconcile = () => {
    if (autoRec.running) autoRec.running.child.kill("SIGTERM");
  };
  function startReconcile(copy: string, attempt: number): void {
    const fd = openSync(reconcileLog, "a", 0o600);
    const child = spawn(process.execPath, [BIN, "reconcile", "--config", c.file, "--node", me.id, "--json"], { stdio: ["ignore", fd, fd] });
    closeSync(fd);
    autoRec.running = { copy, pid: child.pid ?? 0, sinceMs: Date.now(), child };
    autoRec.waiting = null;
    emit({ type: "reconcile-started", copy, attempt, pid: child.pid, log: reconcileLog });
    child.once("exit", (code, signal) => {
      autoRec.running = null;
      const ok = code === 0;
      const says = ok ? "merged" : `mailha reconcile exited ${signal ?? code}; see ${reconcileLog}`;
      autoRec.last = { copy, ok, atMs: Date.now(), says };
      if (ok) {
        delete autoRec.tries[copy];
        // Merged and marked on the peer: not pending any more (the next check confirms it).
        if (autoRec.peerCopies) autoRec.peerCopies = autoRec.peerCopies.filter((p) => p !== copy);
        emit({ type: "reconcile-done", copy });
      } else {
        autoRec.tries[copy] = { attempts: attempt, lastMs: Date.now(), error: says };
        emit({ type: "reconcile-failed", copy, attempt, error: says });
      }
    });
  }
  timers.push(
    setInterval(() => {
      if (autoRec.running && m.nodeState !== "active") {
        // The group leaves this node: the run stops with it (the next active node reruns it).
        stopReconcile();
        return;
      }
      if (autoRec.checking || stopping || m.nodeState !== "active") return;
      autoRec.checking = true;
      void callPeer(peerEnds(c, me.id), "preserved-list", {}, { timeoutMs: 3000 })
        .then(
          (a) => (Array.isArray(a.result) ? (a.result as { path?: unknown }[]).map((x) => String(x.path)) : null),
          () => null,
        )
        .then((copies) => {
          autoRec.peerCopies = copies;
          const s = lastVolume;
          const v = decideAuto({
            now: Date.now(),
            enabled: c.reconcile.auto,
            active: m.nodeState === "active" && !stopping,
            volumeInSync: !!s && s.connection === "connected" && s.disk === "uptodate" && s.peer.disk === "uptodate",
            peerCopies: copies,
            running: !!autoRec.running,
            tries: autoRec.tries,
            attemptsMax: c.reconcile.attempts_max,
            retryMs: c.reconcile.retry_ms,
          });
          if (v.t === "start") startReconcile(v.copy, v.attempt);
          else if (v.t === "operator") {
            if (autoRec.waiting?.copy !== v.copy || autoRec.waiting.says !== v.says) emit({ type: "reconcile-waits", copy: v.copy, says: v.says });
            autoRec.waiting = { copy: v.copy, says: v.says };
          } else if (v.why === "nothing-to-do") autoRec.waiting = null;
        })
        .finally(() => (autoRec.checking = false));
    }, AUTO_RECONCILE_CHECK_MS),
  );

  // ---- the change journal: pruned on the active node while in sync, nothing to merge -----
  let lastPrune = 0;
  timers.push(
    setInterval(() => {
      if (Date.now() - lastPrune < JOURNAL_PRUNE_EVERY_MS || m.nodeState !== "active") return;
      const s = lastVolume;
      void listPreserved(vol)
        .then((own) => {
          const may = mayPruneJournal({
            active: m.nodeState === "active" && !stopping,
            volumeInSync: !!s && s.connection === "connected" && s.disk === "uptodate" && s.peer.disk === "uptodate",
            peerCopies: autoRec.peerCopies,
            localCopies: own.filter((p) => !p.reconciledAtMs).length,
            running: !!autoRec.running,
          });
          if (!may.ok) return;
          lastPrune = Date.now();
          const r = pruneJournal(paths.data, formatHlc({ wallMs: Date.now() - c.reconcile.journal_keep_ms, counter: 0, node: me.id }));
          if (r.removed.length) emit({ type: "journal-pruned", removed: r.removed.length, kept: r.kept });
        })
        .catch((err: Error) => emit({ type: "journal-prune-failed", error: err.message }));
    }, 60_000),
  );

  // ---- operator interface ----------------------------------------------------------------------
  const status = () => ({
    ...m.status(),
    pid: process.pid,
    incarnation: inc,
    resources: Object.fromEntries(runner.states),
    heartbeats: receiver.counters,
    volume: lastVolume,
    timers: c.timers,
    peerChannel: { ...peerRpc.counters } as Record<string, number>,
    // Answers this daemon dropped and counted (forged, foreign, malformed, ...).
    dnsAnswers: { updates: { ...answerCounters }, queries: { ...queryCounters } },
    witnessAnswers: witness ? { ...witness.dropped } : null,
    // The services' own counters (services/stats.ts), the configured limits, queue sizes.
    services: readStats(paths),
    limits: { ...c.limits, mail_message_recipients_max: c.mail.message_recipients_max, mail_message_size_max_bytes: c.mail.message_size_max_bytes },
    queues: queueSizes(paths.data),
    reconcile: {
      auto: c.reconcile.auto,
      running: autoRec.running ? { copy: autoRec.running.copy, pid: autoRec.running.pid, sinceMs: autoRec.running.sinceMs } : null,
      waiting: autoRec.waiting,
      last: autoRec.last,
      peerCopies: autoRec.peerCopies,
      tries: autoRec.tries,
    },
  });

  const control = await serveControl(nodeControlSocket(c, o.nodeId), async (req: ControlRequest, sock: Socket) => {
    switch (req.op) {
      case "status":
        return status();
      case "events":
        events.subscribe(sock);
        return undefined;
      case "command": {
        const cmd = String(req.args?.cmd) as Command;
        if (!["standby", "online", "takeover", "switchover", "failback"].includes(cmd)) throw new Error(`unknown command ${cmd}`);
        const [r, answer] = pending.open();
        dispatch({ t: "command", now: Date.now(), req: r, cmd, force: req.args?.force === true });
        const { error, result } = await answer;
        if (error) throw new Error(error);
        return result;
      }
      default:
        throw new Error(`unknown operation "${req.op}"`);
    }
  });

  const metrics = createHttpServer((req, res) => {
    if (req.url !== "/metrics") {
      res.writeHead(404).end("see /metrics\n");
      return;
    }
    res.writeHead(200, { "content-type": "text/plain; version=0.0.4" }).end(renderMetrics(o.nodeId, status()));
  });
  await new Promise<void>((resolve) => metrics.listen(c.manager.metrics_port, me.service_address, () => resolve()));


  emit({ type: "node-started", pid: process.pid, incarnation: inc, links: me.heartbeat_links.map((l) => l.name), witness: !!witness, fencing: fence.name });

  const shutdown = async (sig: string) => {
    if (stopping) return;
    stopping = true;
    emit({ type: "node-stopping", signal: sig, state: m.nodeState });
    for (const t of timers) clearInterval(t);
    volumeEventsStop?.();
    if (m.nodeState !== "passive" && m.nodeState !== "standby" && m.nodeState !== "starting") {
      runner.requestAbort();
      const r = await runner.stop();
      if (!r.ok) await runner.kill();
    }
    await reconcilePassive().catch(() => {});
    if (witness) await witness.request("release", WITNESS_TIMEOUT_MS).catch(() => null);
    for (const s of sockets) s.sock.close();
    witness?.close();
    stopReconcile();
    await victimExport.close().catch(() => {});
    control.close();
    metrics.close();
    peerRpc.close();
    await stopEngine(vol).catch(() => {});
    process.exit(0);
  };
  process.on("SIGHUP", () => {});
  process.on("SIGTERM", () => void shutdown("SIGTERM"));
  process.on("SIGINT", () => void shutdown("SIGINT"));
  await new Promise<never>(() => {});
}

type NodeStatus = ReturnType<ClusterMachine["status"]> & {
  resources: Record<string, string>;
  heartbeats: { [k: string]: number } | HeartbeatCounters;
  volume: VolumeStatus | null;
  peerChannel?: Record<string, number>;
  dnsAnswers?: { updates: Record<string, number>; queries: Record<string, number> };
  witnessAnswers?: Record<string, number> | null;
  services?: Record<string, Record<string, number>>;
  limits?: Record<string, number>;
  queues?: Record<string, number>;
};

/** Sizes an operator watches grow: the outbound queue's messages, the change journal's bytes (on the mounted volume). */
function queueSizes(data: string): Record<string, number> {
  const count = (d: string) => {
    try {
      return readdirSync(d).filter((f) => !f.startsWith(".")).length;
    } catch {
      return 0;
    }
  };
  let journalBytes = 0;
  try {
    for (const f of readdirSync(join(data, "journal"))) journalBytes += statSync(join(data, "journal", f)).size;
  } catch {
    // not mounted here
  }
  return { outbound_files: count(join(data, "outbound")), journal_bytes: journalBytes };
}

/** Prometheus text format: roles, links, quorum, volume, resources, heartbeat counters. */
export function renderMetrics(node: string, s: NodeStatus): string {
  const lines: string[] = [];
  const g = (name: string, help: string, samples: [Record<string, string>, number][]) => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} gauge`);
    for (const [labels, v] of samples) {
      const l = Object.entries({ node, ...labels }).map(([k, x]) => `${k}="${x}"`).join(",");
      lines.push(`${name}{${l}} ${v}`);
    }
  };
  const states = ["starting", "passive", "requesting", "activating", "active", "deactivating", "standby", "failed", "stop-failed"];
  g("mailha_node_state", "1 for the node's current state", states.map((x) => [{ state: x }, s.state === x ? 1 : 0]));
  g("mailha_node_active", "1 when this node runs the resource group", [[{}, s.state === "active" ? 1 : 0]]);
  g("mailha_peer_up", "1 while the peer is heard on some link", [[{ peer: s.peer.node }, s.peer.state === "up" || s.peer.state === "late" ? 1 : 0]]);
  g("mailha_link_up", "1 while the peer is heard on this link", Object.entries(s.links).map(([l, x]) => [{ link: l }, x === "up" ? 1 : 0]));
  g("mailha_quorum", "1 while this node holds quorum", [[{}, s.quorum ? 1 : 0]]);
  if (s.volume) {
    g("mailha_volume_primary", "1 when the volume is primary here", [[{}, s.volume.role === "primary" ? 1 : 0]]);
    g("mailha_volume_out_of_sync_bytes", "bytes that may differ from the peer", [[{}, s.volume.outOfSyncBytes]]);
    g("mailha_volume_unacked_bytes", "written bytes the peer has not acknowledged", [[{}, s.volume.unackedBytes]]);
    g("mailha_volume_connected", "1 while the replication link is connected", [[{}, s.volume.connection === "connected" || s.volume.connection === "sync-source" || s.volume.connection === "sync-target" ? 1 : 0]]);
  }
  g("mailha_resource_running", "1 while the resource runs here", Object.entries(s.resources).map(([r, x]) => [{ resource: r }, x === "running" ? 1 : 0]));
  lines.push("# HELP mailha_heartbeat_packets_total heartbeat packets received, by verdict", "# TYPE mailha_heartbeat_packets_total counter");
  for (const [k, v] of Object.entries(s.heartbeats)) if (k !== "received") lines.push(`mailha_heartbeat_packets_total{node="${node}",verdict="${k}"} ${v}`);
  const counter = (name: string, help: string, label: string, samples: Record<string, number> | null | undefined) => {
    if (!samples) return;
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} counter`);
    for (const [k, v] of Object.entries(samples)) lines.push(`${name}{node="${node}",${label}="${k}"} ${v}`);
  };
  counter("mailha_peer_channel_requests_total", "requests on the node-to-node channel, by outcome (served, refused handshakes, malformed)", "outcome", s.peerChannel);
  const { received: _u, ...updates } = s.dnsAnswers?.updates ?? {};
  const { received: _q, ...queries } = s.dnsAnswers?.queries ?? {};
  counter("mailha_dns_update_answers_total", "answers to this node's RFC 2136 updates, by verdict", "verdict", s.dnsAnswers ? updates : null);
  counter("mailha_dns_query_answers_total", "answers to this node's DNS queries, by verdict", "verdict", s.dnsAnswers ? queries : null);
  counter("mailha_witness_answers_dropped_total", "witness answers dropped, by reason", "reason", s.witnessAnswers);
  if (s.limits) g("mailha_limit", "configured bounds (config limits: and mail:)", Object.entries(s.limits).map(([k, v]) => [{ limit: k }, v]));
  if (s.queues) g("mailha_queue_size", "outbound queue files and change-journal bytes on the volume", Object.entries(s.queues).map(([k, v]) => [{ queue: k }, v]));
  if (s.services) {
    lines.push("# HELP mailha_service_value the services' own counters and gauges (refusals at the limits, open connections, spooled mail)", "# TYPE mailha_service_value untyped");
    for (const [svc, vals] of Object.entries(s.services)) for (const [k, v] of Object.entries(vals)) lines.push(`mailha_service_value{node="${node}",service="${svc}",name="${k}"} ${v}`);
  }
  return lines.join("\n") + "\n";
}
