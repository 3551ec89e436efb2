// `mailha volume ...`: create, run the engine, start/stop it, ask it for status,
// change its role, verify, resolve a split brain, stream its events, and mount or
// unmount the file system on it.
import { Command, Option } from "commander";
import { loadConfig } from "../../common/config.ts";
import { EXIT_FAILURE } from "../../common/errors.ts";
import { createVolume } from "../../replication/store.ts";
import { newGenId } from "../../replication/gi.ts";
import { runEngine } from "../../replication/engine.ts";
import { controlEvents } from "../../replication/control.ts";
import { mountVolume, unmountVolume } from "../../replication/filesystem.ts";
import { FILE_NAME } from "../../replication/fuse-export.ts";
import { join } from "node:path";
import type { PreservedCopy } from "../../replication/types.ts";
import { dropPreserved, listPreserved, resolveNode, startEngine, stopEngine, volumeCall, volumeContext, volumeStatus, type VolumeStatus } from "../../replication/client.ts";
import { createOutput, formatBytes } from "./output.ts";

interface Common {
  config: string;
  node?: string;
  json?: boolean;
}

export { formatBytes } from "./output.ts";

export function formatVolumeStatus(s: VolumeStatus): string {
  const lines = [
    `volume on node ${s.node}: ${s.role}, ${s.connection}, disk ${s.disk} (protocol ${s.protocol}, ${formatBytes(s.sizeBytes)})`,
    `  peer ${s.peer.node ?? "?"}: ${s.peer.role}, disk ${s.peer.disk}; link ${s.link.up ? "up" : "down"} (authentication failures: ${s.link.authFailures})`,
    `  out of sync: ${formatBytes(s.outOfSyncBytes)}; not yet acknowledged by the peer: ${formatBytes(s.unackedBytes)}${s.protocol === "A" && s.unackedBytes > 0 ? " (at risk under protocol A)" : ""}`,
    `  generations: current ${s.gi.current || "-"}, bitmap ${s.gi.bitmap || "-"}, history ${s.gi.history.map((h) => h || "-").join(" ")}`,
  ];
  if (s.resync) {
    const pct = s.resync.totalBytes ? Math.floor((100 * s.resync.doneBytes) / s.resync.totalBytes) : 100;
    lines.push(`  resync (${s.resync.side}${s.resync.full ? ", full" : ""}): ${pct}% of ${formatBytes(s.resync.totalBytes)}, ${formatBytes(s.resync.bytesPerS)}/s, ${s.resync.etaS ?? "?"} s left`);
  }
  if (s.verify) lines.push(`  verify: ${s.verify.checked}/${s.verify.extents} extents, ${s.verify.mismatched} differ`);
  if (s.lastHandshake) lines.push(`  last handshake: ${s.lastHandshake.kind} (${s.lastHandshake.reason})`);
  if (s.export.mounted) lines.push(`  export: ${s.export.file}${s.export.inUse ? " (in use)" : ""}`);
  if (s.image) {
    lines.push(
      s.image.allocatedBytes >= s.sizeBytes
        ? "  image: fully allocated on this node's disk"
        : `  image: sparse, ${formatBytes(s.image.allocatedBytes)} of ${formatBytes(s.sizeBytes)} allocated on this node's disk (keep room for the rest there)`,
    );
  }
  const l = s.latency;
  const ms = (us: number) => `${(us / 1000).toFixed(2)} ms`;
  if (l && (l.flush.count > 0 || l.localSync.count > 0)) {
    lines.push(`  latency (recent, p50/p99): write ${ms(l.write.p50Us)}/${ms(l.write.p99Us)}, flush ${ms(l.flush.p50Us)}/${ms(l.flush.p99Us)}, local fdatasync ${ms(l.localSync.p50Us)}/${ms(l.localSync.p99Us)}`);
  }
  if (s.preserving) {
    const pct = s.preserving.totalBytes ? Math.floor((100 * s.preserving.doneBytes) / s.preserving.totalBytes) : 100;
    lines.push(`  preserving a copy of this side before it is overwritten (${s.preserving.reason}): ${pct}% of ${formatBytes(s.preserving.totalBytes)} (${s.preserving.method === "reflink" ? "reflink" : "sparse copy"}), ${Math.round((Date.now() - s.preserving.startedMs) / 1000)} s so far`);
  }
  if (s.preserveError) lines.push(`  copy failed, StandAlone until \`mailha volume connect\`: ${s.preserveError}`);
  for (const p of s.preserved) lines.push(`  preserved copy: ${formatPreserved(p)}`);
  return lines.join("\n");
}

export function formatPreserved(p: PreservedCopy): string {
  const state = p.reconciledAtMs ? `reconciled ${new Date(p.reconciledAtMs).toISOString()}` : "not reconciled yet";
  const disk = p.diskBytes !== undefined ? `, ${formatBytes(p.diskBytes)} on disk${p.method === "reflink" ? " (reflink, shared blocks)" : ""}` : "";
  return `${p.path} (${new Date(p.atMs).toISOString()}, ${p.reason}, ${formatBytes(p.changedBlocks * 4096)} changed${disk}; ${state})`;
}

export function volumeCommand(defaultConfig: string): Command {
  const vol = new Command("volume").description("the replicated volume of one node (userspace DRBD: FUSE + loop + ext4)");
  const common = (cmd: Command) =>
    cmd
      .addOption(new Option("-c, --config <file>", "cluster configuration file").default(defaultConfig))
      .addOption(new Option("-n, --node <id>", "the node to act for (default: the node whose address is local)"))
      .addOption(new Option("--json", "print the result as JSON"));
  const ctx = (o: Common) => {
    const c = loadConfig(o.config);
    return volumeContext(c, resolveNode(c, o.node));
  };

  common(vol.command("create").description("create this node's backing image, metadata, bitmap and activity log"))
    .option("--primary", "this side holds the data from the start (the other side will be fully synced from it)")
    .action((o: Common & { primary?: boolean }) => {
      const v = ctx(o);
      const out = createOutput(!!o.json);
      const allocation = v.config.volume.allocation;
      const meta = createVolume(v.paths.volumeDir, {
        nodeId: v.nodeId,
        sizeBytes: v.config.volume.size,
        primary: !!o.primary,
        newId: () => newGenId(),
        allocation,
        onProgress: (done, total) => out.progress("allocating", { written: formatBytes(done), of: formatBytes(total), percent: Math.floor((done / total) * 100) }),
      });
      out.result({ ...meta, allocation }, () => `volume created in ${v.paths.volumeDir}: ${formatBytes(meta.sizeBytes)} (${allocation === "full" ? "fully allocated" : "sparse"}), disk ${meta.disk}${o.primary ? ", holds the data" : ""}`);
    });

  common(vol.command("run").description("run the volume engine in the foreground (what `volume start` starts)")).action(async (o: Common) => {
    const v = ctx(o);
    await runEngine({ config: v.config, nodeId: v.nodeId, stateDir: v.stateDir });
  });

  common(vol.command("start").description("start the volume engine as a daemon (its own session, in the node's namespace in the lab)")).action(async (o: Common) => {
    const v = ctx(o);
    const rec = await startEngine(v);
    createOutput(!!o.json).result({ pid: rec.pid, log: rec.logFile }, () => `volume engine of node ${v.nodeId} started (pid ${rec.pid}, log ${rec.logFile})`);
  });

  common(vol.command("stop").description("stop the volume engine (SIGTERM, then SIGKILL)")).action(async (o: Common) => {
    const v = ctx(o);
    const outcome = await stopEngine(v);
    createOutput(!!o.json).result({ outcome }, () => `volume engine of node ${v.nodeId}: ${outcome}`);
  });

  common(vol.command("status").description("role, connection, disk states, out-of-sync bytes, resync progress, protocol, generations")).action(async (o: Common) => {
    const s = await volumeStatus(ctx(o));
    createOutput(!!o.json).result(s, () => formatVolumeStatus(s));
  });

  common(vol.command("primary").description("become primary and export the volume; refused while the peer is primary or the disk is not UpToDate"))
    .option("--force", "promote a Consistent, Outdated or Inconsistent disk (only when the peer is known to be down or fenced)")
    .action(async (o: Common & { force?: boolean }) => {
      const r = await volumeCall(ctx(o), "primary", { force: !!o.force });
      createOutput(!!o.json).result(r, () => `primary; exported at ${(r as { export: string | null }).export}`);
    });

  common(vol.command("secondary").description("demote (refused while the loop device or the file system uses the export)")).action(async (o: Common) => {
    const r = await volumeCall(ctx(o), "secondary");
    createOutput(!!o.json).result(r, () => "secondary");
  });

  for (const [name, desc] of [
    ["connect", "allow the link to the peer again (after disconnect or a split brain)"],
    ["disconnect", "drop the link to the peer and stay StandAlone"],
    ["outdate", "mark this (disconnected, secondary) disk Outdated, as fencing does"],
  ] as const) {
    common(vol.command(name).description(desc)).action(async (o: Common) => {
      const r = await volumeCall(ctx(o), name);
      createOutput(!!o.json).result(r, () => JSON.stringify(r));
    });
  }

  common(vol.command("verify").description("online verify: compare per-extent hashes with the peer; differing extents are marked out of sync and resynced from the primary"))
    .option("--no-wait", "return once started")
    .option("--timeout <ms>", "how long to wait for the result", "600000")
    .action(async (o: Common & { wait: boolean; timeout: string }) => {
      const v = ctx(o);
      const out = createOutput(!!o.json);
      const since = new Date().toISOString();
      await volumeCall(v, "verify");
      if (!o.wait) return out.result({ started: true }, () => "verify started");
      const ev = await waitForEvent(v.paths.controlSocket, v.paths.eventLog, "verify-finished", since, Number(o.timeout));
      const mism = (ev.mismatched as number[]) ?? [];
      out.result(ev, () => (mism.length ? `verify: ${mism.length} of ${ev.extents} extents differ: ${mism.join(", ")} (marked out of sync; resync started)` : `verify: all ${ev.extents} extents identical`));
      if (mism.length) process.exitCode = EXIT_FAILURE;
    });

  common(vol.command("resolve").description("resolve a split brain by hand; then both sides reconnect"))
    .option("--keep-local", "this node's data wins")
    .option("--discard-local", "this node's changes are overwritten by the peer's (a durable copy of this side is kept first, under every policy: `volume preserved list`)")
    .action(async (o: Common & { keepLocal?: boolean; discardLocal?: boolean }) => {
      if (!!o.keepLocal === !!o.discardLocal) throw new (await import("../../common/errors.ts")).UsageError("say exactly one of --keep-local or --discard-local");
      const r = await volumeCall(ctx(o), "resolve", { keep: o.keepLocal ? "local" : "peer" });
      createOutput(!!o.json).result(r, () => `will ${o.keepLocal ? "keep this node's data" : "discard this node's changes"} at the next handshake`);
    });

  const preserved = vol.command("preserved").description("the copies kept of this node's side before a resync overwrote it after a split brain");
  common(preserved.command("list").description("each copy: path, time, why, changed bytes, space on disk, whether it is reconciled")).action(async (o: Common) => {
    const list = await listPreserved(ctx(o));
    createOutput(!!o.json).result(list, () => (list.length ? list.map(formatPreserved).join("\n") : "no preserved copies"));
  });
  common(preserved.command("drop").description("remove a copy (its path or folder name); refused while it holds changes not yet reconciled").argument("<copy>", "the copy's path or folder name, as `preserved list` shows it"))
    .option("--force", "drop a copy whose changes are not reconciled (they are lost)")
    .action(async (copy: string, o: Common & { force?: boolean }) => {
      const r = await dropPreserved(ctx(o), copy, !!o.force);
      createOutput(!!o.json).result(r, () => `dropped ${r.dropped}${r.reconciled ? "" : " (its changes were never reconciled)"}`);
    });

  common(vol.command("events").description("stream the volume's state changes as JSON lines (like drbdsetup events2)"))
    .option("--no-follow", "print the event log so far and exit")
    .action(async (o: Common & { follow: boolean }) => {
      const v = ctx(o);
      const { existsSync, readFileSync } = await import("node:fs");
      if (!o.follow) {
        if (existsSync(v.paths.eventLog)) process.stdout.write(readFileSync(v.paths.eventLog, "utf8"));
        return;
      }
      await new Promise<void>((resolve, reject) => {
        controlEvents(v.paths.controlSocket, (ev) => process.stdout.write(JSON.stringify(ev) + "\n"), (err) => (err ? reject(err) : resolve()));
      });
    });

  common(vol.command("mount").description("the filesystem step: loop device (direct I/O) on the export, fsck -p, mount ext4 on the node's data directory"))
    .option("--mountpoint <dir>", "where to mount (default: the node's data directory)")
    .action(async (o: Common & { mountpoint?: string }) => {
      const v = ctx(o);
      const s = await volumeStatus(v);
      if (s.role !== "primary" || !s.export.file) throw new Error(`node ${v.nodeId} is ${s.role}: only the primary exports the volume`);
      const r = await mountVolume(v.stateDir, join(v.paths.exportDir, FILE_NAME), o.mountpoint ?? v.mountpoint, { mkfsIfBlank: s.fresh });
      createOutput(!!o.json).result(r, () => `${r.created ? "created ext4 and " : ""}mounted ${r.loop} on ${r.mountpoint} (fsck: ${r.fsck})`);
    });

  common(vol.command("umount").description("unmount the file system and detach the loop device"))
    .option("--mountpoint <dir>", "where it is mounted (default: the node's data directory)")
    .option("--lazy", "lazy unmount (when the engine died under it)")
    .action(async (o: Common & { mountpoint?: string; lazy?: boolean }) => {
      const v = ctx(o);
      const r = await unmountVolume(v.stateDir, o.mountpoint ?? v.mountpoint, { lazy: o.lazy });
      createOutput(!!o.json).result(r, () => `${r.unmounted ? "unmounted" : "was not mounted"}${r.detached ? `, detached ${r.detached}` : ""}`);
    });

  return vol;
}

/** Waits for an event of TYPE after SINCE: from the live stream, or already in the log. */
async function waitForEvent(socket: string, eventLog: string, type: string, since: string, timeoutMs: number): Promise<Record<string, unknown>> {
  const { existsSync, readFileSync } = await import("node:fs");
  return new Promise((resolve, reject) => {
    let stop = () => {};
    const t = setTimeout(() => {
      stop();
      reject(new Error(`no ${type} event within ${timeoutMs} ms`));
    }, timeoutMs);
    const done = (ev: Record<string, unknown>) => {
      clearTimeout(t);
      stop();
      resolve(ev);
    };
    stop = controlEvents(socket, (ev) => ev.type === type && String(ev.time) >= since && done(ev), () => {});
    if (existsSync(eventLog)) {
      for (const line of readFileSync(eventLog, "utf8").split("\n")) {
        if (!line) continue;
        const ev = JSON.parse(line) as Record<string, unknown>;
        if (ev.type === type && String(ev.time) >= since) return done(ev);
      }
    }
  });
}


