// The node state machine: membership (which links hear the peer), quorum (peer,
// witness lease, ping targets), and what the node does with the resource group
// (start, stop, hand over, fence the peer, demote itself). Pure and deterministic:
// events and the clock in, actions out; the node daemon wires it to UDP, timers, the
// witness and the resource agents, and the simulation wires it to a simulated world.
//
// Safety rules (the reason this file exists):
// - A node activates only with quorum: the peer heard and agreeing, or (peer dead)
//   the witness lease held, or (no witness) fencing of the peer confirmed.
// - An active node that has neither its peer nor its quorum stops the group at once
//   (self-fencing); with a witness it starts doing so `selfFenceMs` before its lease
//   can expire at the witness, so the survivor, which must wait for that expiry, never
//   overlaps it.
// - Two nodes that hear each other never both activate: the non-preferred one waits
//   while the preferred one is eligible, and a node never activates while the peer
//   reports active/activating/deactivating.

export type NodeState = "starting" | "passive" | "requesting" | "activating" | "active" | "deactivating" | "standby" | "failed" | "stop-failed";
export type PeerState = "unknown" | "up" | "late" | "dead";
export type LinkState = "up" | "down";

/** What a node tells its peer in every heartbeat. */
export interface Summary {
  readonly state: NodeState;
  readonly activeSinceMs: number | null;
  readonly quorum: boolean;
  /** Set by a node that stopped so that the peer takes over (switchover, failback, standby). */
  readonly handoffTo: string | null;
  /** The preferred node asks the active peer to give the group back (auto_failback). */
  readonly wantsFailback: boolean;
  /** The volume is connected and both disks are UpToDate. */
  readonly volumeInSync: boolean;
  /**
   * This node's volume is primary and its replication link is down: it writes without
   * the peer, whose disk must count as Outdated (the peer marks it so on hearing this).
   */
  readonly writingAlone?: boolean;
  /** While requesting: the id of this node's request to activate. */
  readonly requestId: number | null;
  /** This node agrees that the peer may activate (answers the peer's request id). */
  readonly grant: { readonly to: string; readonly id: number } | null;
}

export interface MachineOptions {
  readonly nodeId: string;
  readonly peerId: string;
  readonly preferred: string;
  readonly autoFailback: boolean;
  readonly links: readonly string[];
  readonly keepaliveMs: number;
  readonly warntimeMs: number;
  readonly deadtimeMs: number;
  readonly initdeadMs: number;
  readonly witness: boolean;
  readonly pingTargets: boolean;
  readonly fencing: "none" | "command" | "lab";
  /** Lease length granted by the witness. */
  readonly leaseMs: number;
  /** Bound on stopping the whole group; self-fencing starts this long before lease expiry. */
  readonly selfFenceMs: number;
  readonly maxRestarts: number;
  readonly restartWindowMs: number;
}

export type Command = "standby" | "online" | "takeover" | "switchover" | "failback";

export type Event =
  | { readonly t: "tick"; readonly now: number }
  /** SUMMARY is null when a later one was already heard on another link: the link is alive, the news old. */
  | { readonly t: "heartbeat"; readonly now: number; readonly link: string; readonly summary: Summary | null }
  | { readonly t: "ping"; readonly now: number; readonly ok: boolean }
  | { readonly t: "lease"; readonly now: number; readonly held: boolean; readonly expiresMs: number }
  | {
      readonly t: "volume";
      readonly now: number;
      readonly inSync: boolean;
      readonly writingAlone?: boolean;
      /** This side's role and disk state, and whether the replication link carries data (connected, syncing, verifying). */
      readonly role?: string;
      readonly disk?: string;
      readonly replicating?: boolean;
    }
  /** The answer to an `outdate-disk` action. */
  | { readonly t: "outdated"; readonly now: number; readonly ok: boolean; readonly error?: string }
  | { readonly t: "group-started"; readonly now: number; readonly ok: boolean; readonly error?: string }
  | { readonly t: "group-stopped"; readonly now: number; readonly ok: boolean; readonly error?: string }
  | { readonly t: "group-killed"; readonly now: number; readonly ok: boolean; readonly error?: string }
  | { readonly t: "monitor-failed"; readonly now: number; readonly resource: string; readonly error: string }
  | { readonly t: "resource-restarted"; readonly now: number; readonly resource: string; readonly ok: boolean }
  | { readonly t: "fenced"; readonly now: number; readonly ok: boolean; readonly detail: string }
  | { readonly t: "command"; readonly now: number; readonly req: number; readonly cmd: Command; readonly force?: boolean };

export type Action =
  | {
      readonly t: "start-group";
      /** Promote the volume without the peer (it is dead, fenced or out of quorum). */
      readonly forcePromote: boolean;
      /** Promote even an Outdated disk: only the operator's `takeover --force` may lose the peer's newer data. */
      readonly overrideOutdated: boolean;
    }
  | { readonly t: "stop-group"; readonly reason: string }
  /** Escalation after a failed stop: SIGKILL every resource process, lazy unmount, force demote. */
  | { readonly t: "kill-group" }
  | { readonly t: "restart-resource"; readonly resource: string }
  | { readonly t: "fence-peer" }
  | { readonly t: "lease"; readonly op: "acquire" | "release" }
  /**
   * DRBD's outdate-peer at the resource level, asked of this node: mark our disk
   * Outdated, durably (answered by an `outdated` event). Given when the active peer
   * says in its heartbeats that it writes without us and our replication link is down:
   * if the peer dies now, this node must not take over with old data.
   */
  | { readonly t: "outdate-disk"; readonly reason: string }
  /**
   * The mail host's addresses the active node publishes: both nodes while the peer is
   * heard and the volume is in sync, else only this one. Given when it changes (the
   * wiring retries a failed update until the next one).
   */
  | { readonly t: "dns"; readonly peerLive: boolean }
  | { readonly t: "reply"; readonly req: number; readonly error?: string; readonly result?: unknown }
  | { readonly t: "event"; readonly ev: { readonly type: string; readonly [k: string]: unknown } };

export class ClusterMachine {
  private state: NodeState = "starting";
  private readonly startMs: number;
  private readonly heard = new Map<string, number>();
  private peerSummary: Summary | null = null;
  private peerState: PeerState = "unknown";
  private linkStates = new Map<string, LinkState>();
  private pingOk = false;
  private leaseHeld = false;
  private leaseExpiresMs = 0;
  private lastLeaseAskMs = -Infinity;
  private volumeInSync = false;
  /**
   * When the operator forced a takeover (`takeover --force`, peer dead). With a witness
   * the node starts without a valid lease and has one lease period (plus the
   * self-fencing bound) to get one before the usual rules stop it.
   */
  private forcedAtMs: number | null = null;
  /** Why the node is in its current state (shown by `mailha status`). */
  private stateReason: string | null = null;
  private volumeWritingAlone = false;
  private volume: { role?: string; disk?: string; replicating?: boolean } | null = null;
  /** An outdate-disk action is out and not answered yet (or answered and still true). */
  private outdateAsked = false;
  /** The DNS set last given (null: none since this node became active). */
  private dnsPeerLive: boolean | null = null;
  private activeSinceMs: number | null = null;
  private handoffTo: string | null = null;
  private afterStop: NodeState = "passive";
  private fencing: "idle" | "running" | "done" | "failed" = "idle";
  private peerDeadSinceMs: number | null = null;
  private quorumLostMs: number | null = null;
  private readonly failures = new Map<string, number[]>();
  private waitingReq: { req: number; cmd: Command } | null = null;
  private requestId = 0;
  private out: Action[] = [];
  private now: number;

  constructor(private readonly o: MachineOptions, nowMs: number) {
    this.startMs = nowMs;
    this.now = nowMs;
    for (const l of o.links) this.linkStates.set(l, "down");
  }

  // ---- read-only views -----------------------------------------------------------------

  get nodeState(): NodeState {
    return this.state;
  }

  get peer(): PeerState {
    return this.peerState;
  }

  get isActive(): boolean {
    return this.state === "active";
  }

  /** Whether this node holds quorum right now (the rule the safety argument relies on). */
  hasQuorum(now = this.now): boolean {
    if (this.peerState === "up" || this.peerState === "late") return true;
    if (this.o.witness) return this.leaseHeld && now < this.leaseExpiresMs;
    if (this.o.pingTargets) return this.pingOk && (this.state !== "passive" || this.fencing === "done");
    // No tie-breaker configured: an active node cannot tell isolation from a dead
    // peer and keeps running; a passive one has quorum only by fencing the peer.
    return this.state === "passive" ? this.fencing === "done" : this.state !== "starting";
  }

  summary(): Summary {
    return {
      state: this.state,
      activeSinceMs: this.activeSinceMs,
      quorum: this.hasQuorum(),
      handoffTo: this.handoffTo,
      wantsFailback: this.o.autoFailback && this.o.nodeId === this.o.preferred && this.state === "passive" && this.peerSummary?.state === "active" && this.volumeInSync,
      volumeInSync: this.volumeInSync,
      writingAlone: this.volumeWritingAlone,
      requestId: this.state === "requesting" ? this.requestId : null,
      grant: this.grantFor(),
    };
  }

  /** The grant this node gives to a peer's activation request, if it may. */
  private grantFor(): Summary["grant"] {
    const p = this.peerSummary;
    if (!p || p.state !== "requesting" || p.requestId === null) return null;
    if (!(this.peerState === "up" || this.peerState === "late")) return null;
    const mayGrant = this.state === "starting" || this.state === "passive" || this.state === "standby" || this.state === "failed" || (this.state === "requesting" && !this.hasPriority());
    return mayGrant ? { to: this.o.peerId, id: p.requestId } : null;
  }

  /** Who goes first when both nodes want to activate: the one handed the group, then the preferred node. */
  private hasPriority(): boolean {
    const p = this.peerSummary;
    if (p?.handoffTo === this.o.nodeId) return true;
    if (this.handoffTo === this.o.peerId) return false;
    if (this.o.preferred === this.o.nodeId) return true;
    if (this.o.preferred === this.o.peerId) return false;
    return this.o.nodeId < this.o.peerId;
  }

  status() {
    return {
      node: this.o.nodeId,
      state: this.state,
      stateReason: this.stateReason,
      peer: { node: this.o.peerId, state: this.peerState, summary: this.peerSummary },
      links: Object.fromEntries(this.linkStates),
      quorum: this.hasQuorum(),
      witness: this.o.witness ? { held: this.leaseHeld, expiresInMs: this.leaseHeld ? Math.max(0, this.leaseExpiresMs - this.now) : 0 } : null,
      ping: this.o.pingTargets ? { ok: this.pingOk } : null,
      activeSinceMs: this.activeSinceMs,
      handoffTo: this.handoffTo,
      fencing: this.fencing,
      volumeInSync: this.volumeInSync,
    };
  }

  // ---- the one entry point -----------------------------------------------------------------

  handle(ev: Event): Action[] {
    this.out = [];
    this.now = Math.max(this.now, ev.now);
    switch (ev.t) {
      case "tick":
        break;
      case "heartbeat":
        this.heard.set(ev.link, ev.now);
        if (ev.summary) this.peerSummary = ev.summary;
        break;
      case "ping":
        this.pingOk = ev.ok;
        break;
      case "lease":
        this.leaseHeld = ev.held;
        this.leaseExpiresMs = ev.held ? ev.expiresMs : 0;
        if (!ev.held) this.emit({ type: "lease-refused" });
        break;
      case "volume":
        this.volumeWritingAlone = !!ev.writingAlone;
        this.volumeInSync = ev.inSync;
        if (ev.role !== undefined || ev.disk !== undefined) {
          this.volume = { role: ev.role, disk: ev.disk, replicating: ev.replicating };
          // Outdated now, or the link carries data again: a later loss asks again.
          if (ev.disk !== "consistent" || ev.replicating) this.outdateAsked = false;
        }
        break;
      case "outdated":
        if (ev.ok) this.emit({ type: "volume-outdated", reason: "the active peer writes while the replication link is down" });
        else {
          this.outdateAsked = false; // asked again at the next event that still calls for it
          this.emit({ type: "volume-outdate-failed", error: ev.error });
        }
        break;
      case "group-started":
        this.onGroupStarted(ev.ok, ev.error);
        break;
      case "group-stopped":
        this.onGroupStopped(ev.ok, ev.error);
        break;
      case "group-killed":
        if (this.state === "deactivating") this.onGroupStopped(ev.ok, ev.error);
        else if (this.state === "stop-failed" && ev.ok) {
          this.releaseLease();
          this.setState("failed", "resources killed after a failed stop");
        } else if (!ev.ok) this.emit({ type: "kill-failed", error: ev.error });
        break;
      case "monitor-failed":
        this.onMonitorFailed(ev.resource, ev.error);
        break;
      case "resource-restarted":
        if (!ev.ok) this.migrate(`${ev.resource} could not be restarted`);
        break;
      case "fenced":
        this.fencing = ev.ok ? "done" : "failed";
        this.emit({ type: ev.ok ? "peer-fenced" : "fencing-failed", detail: ev.detail });
        break;
      case "command":
        this.onCommand(ev.req, ev.cmd, !!ev.force);
        break;
    }
    this.updateMembership();
    this.decide();
    this.decideOutdate();
    this.decideDns();
    return this.out;
  }

  /** The outdate-peer rule (see the `outdate-disk` action); asked once until answered. */
  private decideOutdate(): void {
    const v = this.volume;
    const p = this.peerSummary;
    if (this.outdateAsked || !v || v.replicating || v.role !== "secondary" || v.disk !== "consistent") return;
    if (this.peerState !== "up" || p?.state !== "active" || p.writingAlone !== true) return;
    this.outdateAsked = true;
    this.out.push({ t: "outdate-disk", reason: "the active peer writes while the replication link is down" });
  }

  /** The live set of the mail host while active (see the `dns` action). */
  private decideDns(): void {
    if (this.state !== "active" && this.state !== "activating") {
      this.dnsPeerLive = null;
      return;
    }
    // Starting the group without the peer (a takeover): its address leaves the mail host
    // at once, before the group is up; otherwise the set follows once active.
    const forced = this.out.some((a) => a.t === "start-group" && a.forcePromote);
    if (this.state === "activating" && !forced) return;
    const peerLive = !forced && (this.peerState === "up" || this.peerState === "late") && this.volumeInSync;
    if (peerLive === this.dnsPeerLive) return;
    this.dnsPeerLive = peerLive;
    this.out.push({ t: "dns", peerLive });
  }

  // ---- membership ------------------------------------------------------------------------------

  private updateMembership(): void {
    const now = this.now;
    let newest = -Infinity;
    for (const l of this.o.links) {
      const t = this.heard.get(l) ?? -Infinity;
      newest = Math.max(newest, t);
      const s: LinkState = now - t <= this.o.deadtimeMs ? "up" : "down";
      if (this.linkStates.get(l) !== s) {
        this.linkStates.set(l, s);
        this.emit({ type: "link", link: l, state: s });
      }
    }
    const silent = now - newest;
    let ps: PeerState;
    if (newest === -Infinity) ps = now - this.startMs >= this.o.initdeadMs ? "dead" : "unknown";
    else if (silent > this.o.deadtimeMs) ps = "dead";
    else if (silent > this.o.warntimeMs) ps = "late";
    else ps = "up";
    if (ps !== this.peerState) {
      const prev = this.peerState;
      this.peerState = ps;
      this.emit({ type: "peer", state: ps, prev, silentMs: Number.isFinite(silent) ? silent : null });
      if (ps === "dead") {
        this.peerDeadSinceMs = now;
        this.fencing = "idle";
      }
      if (ps === "up" || ps === "late") {
        this.peerDeadSinceMs = null;
        this.fencing = "idle";
      }
    }
    if (this.state === "starting" && (ps !== "unknown")) this.setState("passive");
  }

  // ---- decisions ---------------------------------------------------------------------------------

  private decide(): void {
    const now = this.now;
    const peerAlive = this.peerState === "up" || this.peerState === "late";
    const p = peerAlive ? this.peerSummary : null;

    if (this.o.witness && (this.state === "active" || this.state === "activating" || this.state === "stop-failed") && now - this.lastLeaseAskMs >= this.o.leaseMs / 4) this.askLease();

    switch (this.state) {
      case "activating": {
        // Starting on a lease that will not be renewed: give up in time (the group
        // runner stops between resources).
        if (!peerAlive && this.o.witness && this.leaseExpiresMs - now <= this.o.selfFenceMs) {
          if (this.inForcedGrace(now)) return;
          const forced = this.forcedAtMs !== null;
          this.selfFence(forced ? "takeover --force: the witness did not grant the lease" : "witness lease about to expire during activation");
          this.finishWaiting(forced ? "takeover --force aborted: the witness did not grant the lease in time (does the peer still hold it?)" : "activation aborted: the witness lease could not be renewed");
        }
        return;
      }
      case "active": {
        const q = this.hasQuorum(now);
        if (!q && this.inForcedGrace(now)) return;
        if (!q) {
          this.quorumLostMs ??= now;
          this.selfFence("lost the peer and quorum");
          return;
        }
        // With a witness, stop in time: the lease must not expire while we still run.
        if (!peerAlive && this.o.witness && this.leaseExpiresMs - now <= this.o.selfFenceMs && !this.inForcedGrace(now)) {
          this.quorumLostMs ??= now;
          this.selfFence("witness lease about to expire without renewal");
          return;
        }
        this.quorumLostMs = null;
        if (p && (p.state === "active" || p.state === "activating")) {
          // Both active (a healed partition): the one that became active last steps down.
          const mine = this.activeSinceMs ?? 0;
          const theirs = p.activeSinceMs ?? 0;
          if (mine > theirs || (mine === theirs && this.o.nodeId > this.o.peerId)) this.stop("the peer is active too; the later one steps down", "passive", null);
          return;
        }
        if (p && p.wantsFailback && p.volumeInSync && this.o.autoFailback) this.stop("auto_failback to the preferred node", "passive", this.o.peerId);
        return;
      }
      case "passive": {
        if (p) {
          if (p.state === "active" || p.state === "activating") {
            this.handoffTo = null; // the peer took what we handed over
            return;
          }
          if (p.state === "deactivating") return;
          if (p.state === "stop-failed") {
            // The peer's group may still run: only fencing makes it safe to take over.
            if (this.o.fencing !== "none" && this.fencing === "idle") this.fencePeer();
            return;
          }
          if (this.handoffTo === this.o.peerId) return; // we handed over: wait for the peer to take it
          if (p.state === "requesting" && !this.hasPriority()) return; // the peer goes first
          const peerHandsToMe = p.handoffTo === this.o.nodeId;
          const peerIneligible = p.state === "standby" || p.state === "failed";
          const iAmPreferred = this.o.preferred === this.o.nodeId;
          if (peerHandsToMe || peerIneligible || (iAmPreferred && p.handoffTo === null)) {
            this.requestId++;
            this.setState("requesting", peerHandsToMe ? "handed over by the peer" : peerIneligible ? `the peer is ${p.state}` : "preferred node");
          }
          return;
        }
        if (this.peerState !== "dead") return;
        // The peer is dead: take over only when it is safe.
        if (this.o.pingTargets && !this.pingOk) return; // isolated ourselves
        if (this.o.witness) {
          // Only a lease asked for after the peer was declared dead counts.
          const fresh = this.peerDeadSinceMs !== null && this.leaseExpiresMs - this.o.leaseMs >= this.peerDeadSinceMs;
          const lasting = this.leaseExpiresMs - now > this.o.selfFenceMs + 2 * this.o.keepaliveMs;
          if (!(this.leaseHeld && fresh && lasting)) {
            if (now - this.lastLeaseAskMs >= this.o.keepaliveMs * 2) this.askLease();
            return;
          }
          // Lease held: the old active has stopped (it self-fences before its lease
          // ends). Fencing, when configured, makes sure of it.
          if (this.o.fencing !== "none" && this.fencing === "idle") return this.fencePeer();
          if (this.fencing === "running") return;
          // Unfenced, the peer may have been active without the lease (it had quorum
          // through us): wait out its self-fencing bound, plus a deadtime for the
          // difference between its detection and ours.
          if (this.fencing !== "done" && now - (this.peerDeadSinceMs ?? now) < this.o.selfFenceMs + this.o.deadtimeMs) return;
          this.activate(true, this.fencing === "done" ? "peer dead; witness lease held; peer fenced" : "peer dead; witness lease held; its self-fencing bound has passed");
          return;
        }
        if (this.o.fencing === "none") return; // nothing makes a takeover safe
        if (this.fencing === "idle") return this.fencePeer();
        if (this.fencing === "done") this.activate(true, "peer dead and fenced");
        return;
      }
      case "requesting": {
        // Activation while the peer is alive needs its grant (in its heartbeat), so two
        // nodes that see each other never start the group at the same time.
        if (!p) return this.withdraw("the peer went away during the request");
        if (p.state === "active" || p.state === "activating" || p.state === "deactivating" || p.state === "stop-failed") return this.withdraw(`the peer is ${p.state}`);
        if (p.state === "requesting" && !this.hasPriority()) return this.withdraw("the peer asked too and goes first");
        if (p.grant?.to === this.o.nodeId && p.grant.id === this.requestId) this.activate(false, "granted by the peer");
        return;
      }
      default:
        return;
    }
  }

  /** Not active any more: give the lease back and never rely on it again. */
  private releaseLease(): void {
    if (!this.o.witness) return;
    this.out.push({ t: "lease", op: "release" });
    this.leaseHeld = false;
    this.leaseExpiresMs = 0;
  }

  private withdraw(why: string): void {
    this.setState("passive", why);
    this.finishWaiting(`activation withdrawn: ${why}`);
  }

  private askLease(): void {
    this.lastLeaseAskMs = this.now;
    this.out.push({ t: "lease", op: "acquire" });
  }

  private fencePeer(): void {
    this.fencing = "running";
    this.emit({ type: "fencing", peer: this.o.peerId });
    this.out.push({ t: "fence-peer" });
  }

  /** A forced takeover still without a valid witness lease, within its grace. */
  private inForcedGrace(now: number): boolean {
    const leaseValid = this.leaseHeld && this.leaseExpiresMs - now > this.o.selfFenceMs;
    return this.forcedAtMs !== null && !leaseValid && now - this.forcedAtMs < this.o.leaseMs + this.o.selfFenceMs;
  }

  private activate(forcePromote: boolean, why: string, overrideOutdated = false): void {
    this.forcedAtMs = overrideOutdated ? this.now : null;
    this.handoffTo = null;
    this.setState("activating", why);
    this.out.push({ t: "start-group", forcePromote, overrideOutdated });
  }

  private stop(reason: string, after: NodeState, handoffTo: string | null): void {
    this.afterStop = after;
    this.handoffTo = handoffTo;
    this.setState("deactivating", reason);
    this.out.push({ t: "stop-group", reason });
  }

  private selfFence(reason: string): void {
    this.emit({ type: "self-fence", reason });
    // An isolated node stops the hard way (SIGKILL, lazy unmount, demote): fast and
    // bounded, which is what the survivor counts on. What was acknowledged is already
    // durable. The lease is released only once the group is down (onGroupStopped).
    this.afterStop = "passive";
    this.handoffTo = null;
    this.setState("deactivating", reason);
    this.out.push({ t: "kill-group" });
  }

  private migrate(reason: string): void {
    if (this.state !== "active") return;
    this.emit({ type: "migrate", reason });
    this.stop(reason, "failed", this.o.peerId);
  }

  private onGroupStarted(ok: boolean, error?: string): void {
    if (this.state !== "activating") return;
    if (ok) {
      this.activeSinceMs = this.now;
      this.setState("active", "resource group started");
      this.finishWaiting();
    } else {
      this.emit({ type: "group-start-failed", error });
      // The group runner has stopped what it started; let the peer have it.
      this.handoffTo = this.o.peerId;
      this.setState("failed", error ?? "start failed");
      this.finishWaiting(`the resource group failed to start: ${error}`);
    }
  }

  private onGroupStopped(ok: boolean, error?: string): void {
    if (this.state !== "deactivating") return;
    this.activeSinceMs = null;
    if (ok) this.releaseLease();
    this.quorumLostMs = null;
    if (ok) {
      this.setState(this.afterStop, "resource group stopped");
      this.finishWaiting();
    } else {
      // A stop that fails escalates: the resources are killed hard here, and the peer,
      // seeing stop-failed, fences this node if it can. The lease is kept (renewed)
      // until the kill is done, so the peer cannot take over before.
      this.emit({ type: "stop-failed", error });
      this.setState("stop-failed", error ?? "stop failed");
      this.out.push({ t: "kill-group" });
      this.finishWaiting(`the resource group failed to stop: ${error}`);
    }
  }

  private onMonitorFailed(resource: string, error: string): void {
    if (this.state !== "active") return;
    const list = (this.failures.get(resource) ?? []).filter((t) => this.now - t < this.o.restartWindowMs);
    list.push(this.now);
    this.failures.set(resource, list);
    this.emit({ type: "monitor-failed", resource, error, failuresInWindow: list.length });
    if (list.length <= this.o.maxRestarts) this.out.push({ t: "restart-resource", resource });
    else this.migrate(`${resource} failed ${list.length} times in ${this.o.restartWindowMs} ms`);
  }

  private onCommand(req: number, cmd: Command, force: boolean): void {
    const busy = this.state === "activating" || this.state === "deactivating";
    const peerAlive = this.peerState === "up" || this.peerState === "late";
    switch (cmd) {
      case "standby":
        if (this.state === "active") {
          this.stop("operator: standby", "standby", peerAlive ? this.o.peerId : null);
          this.waitingReq = { req, cmd };
          return;
        }
        if (busy || this.state === "stop-failed") return this.reply(req, `busy (${this.state}); try again`);
        this.setState("standby", "operator: standby");
        return this.reply(req, undefined, { state: this.state });
      case "online":
        if (this.state === "stop-failed") {
          // Clean up first: the group may still run here.
          this.waitingReq = { req, cmd };
          this.stop("operator: online after a failed stop (stopping again)", "passive", null);
          return;
        }
        if (this.state === "standby" || this.state === "failed") {
          this.failures.clear();
          this.handoffTo = null;
          this.setState("passive", "operator: online");
        }
        return this.reply(req, undefined, { state: this.state });
      case "takeover":
        if (this.state === "active") return this.reply(req, undefined, { state: "active" });
        if (busy) return this.reply(req, `busy (${this.state}); try again`);
        if (peerAlive && this.peerSummary && (this.peerSummary.state === "active" || this.peerSummary.state === "deactivating"))
          return this.reply(req, "the peer is active: use `mailha switchover` for a planned move");
        if (!force && !peerAlive && !this.hasQuorumForTakeover()) return this.reply(req, "no quorum for a takeover (peer dead, no witness lease / fencing); --force if you know the peer is down");
        this.waitingReq = { req, cmd };
        if (peerAlive) {
          this.requestId++;
          this.setState("requesting", "operator: takeover");
        } else this.activate(true, `operator: takeover${force ? " --force" : ""}`, force);
        return;
      case "switchover":
      case "failback": {
        if (this.state !== "active") return this.reply(req, `this node is ${this.state}, not active: run it on the active node`);
        if (!peerAlive) return this.reply(req, "the peer is not up: a switchover needs both nodes");
        if (this.peerSummary?.state !== "passive") return this.reply(req, `the peer is ${this.peerSummary?.state ?? "unknown"}, not passive`);
        if (cmd === "failback" && this.o.nodeId === this.o.preferred) return this.reply(req, `already on the preferred node ${this.o.preferred}`);
        if (!this.volumeInSync) return this.reply(req, "refused: the volume is not in sync with the peer yet (see mailha volume status)");
        this.waitingReq = { req, cmd };
        this.stop(`operator: ${cmd}`, "passive", this.o.peerId);
        return;
      }
    }
  }

  private hasQuorumForTakeover(): boolean {
    if (this.o.witness) return this.leaseHeld && this.now < this.leaseExpiresMs;
    return this.fencing === "done";
  }

  private finishWaiting(error?: string): void {
    const w = this.waitingReq;
    if (!w) return;
    this.waitingReq = null;
    this.reply(w.req, error, error ? undefined : { state: this.state });
  }

  private setState(s: NodeState, why?: string): void {
    if (s === this.state) return;
    const prev = this.state;
    this.state = s;
    this.stateReason = why ?? null;
    if (s !== "activating" && s !== "active") this.forcedAtMs = null;
    this.emit({ type: "state", state: s, prev, reason: why ?? null });
  }

  private reply(req: number, error?: string, result?: unknown): void {
    this.out.push(error === undefined ? { t: "reply", req, result } : { t: "reply", req, error });
  }

  private emit(ev: { type: string; [k: string]: unknown }): void {
    this.out.push({ t: "event", ev });
  }
}
