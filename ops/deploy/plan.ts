// What `mailha deploy` would change on one server, from its facts: pure, so that a
// dry run prints exactly what a real run does, and re-running on a server that is right
// plans nothing. Preflight problems come first (an error on any server stops the deploy
// before anything changes anywhere); then the actions, in the order they run: the
// package, the files (config, secrets, the node's env file), the volume, the unit.
import type { HostFacts } from "./facts.ts";

export type HostRole = "node" | "witness";

export interface DesiredFile {
  readonly path: string;
  readonly sha256: string;
  readonly mode: number;
}

export interface Desired {
  readonly role: HostRole;
  /** The node id, or "witness". */
  readonly name: string;
  readonly pkgVersion: string;
  readonly files: readonly DesiredFile[];
  readonly unit: string;
  /** Ports the host's services bind (TCP and UDP alike): must be free before the first start. */
  readonly ports: readonly number[];
  /** Nodes only: the volume's size, whether this is the preferred node, whether the peer has its volume already. */
  readonly volume?: { readonly sizeBytes: number; readonly preferred: boolean; readonly peerHasVolume: boolean };
}

export interface Observed {
  readonly facts: HostFacts;
  /** This machine's clock half-way through the round trip, and the round trip (ms). */
  readonly localMidMs: number;
  readonly rttMs: number;
}

export type Severity = "error" | "warning" | "note";
export interface Problem {
  readonly severity: Severity;
  readonly message: string;
}

export type Action =
  | { readonly kind: "install-package"; readonly from: string | null; readonly to: string }
  | { readonly kind: "write-file"; readonly path: string; readonly mode: number; readonly why: "missing" | "changed" }
  | { readonly kind: "create-volume"; readonly primary: boolean }
  | { readonly kind: "enable-unit"; readonly unit: string }
  | { readonly kind: "start-unit"; readonly unit: string };

export interface HostPlan {
  readonly problems: readonly Problem[];
  readonly actions: readonly Action[];
  /** The unit runs and will keep running the old code or config: `mailha deploy upgrade` restarts it after a switchover. */
  readonly restartNeeded: boolean;
}

export const NODE_MIN = [20, 10] as const;
/** Clocks further apart than this: refused (leases, journals' stamps); past CLOCK_WARN_MS a warning. */
export const CLOCK_SKEW_MAX_MS = 1000;
export const CLOCK_WARN_MS = 250;
const GIB = 1024 ** 3;

export function nodeVersionOk(v: string | null): boolean {
  const m = v ? /^v?(\d+)\.(\d+)/.exec(v) : null;
  if (!m) return false;
  const [maj, min] = [Number(m[1]), Number(m[2])];
  return maj > NODE_MIN[0] || (maj === NODE_MIN[0] && min >= NODE_MIN[1]);
}

const fmtGiB = (n: number) => `${(n / GIB).toFixed(1)} GiB`;

/** The server's problems and what deploy changes there. */
export function planHost(d: Desired, o: Observed): HostPlan {
  const f = o.facts;
  const problems: Problem[] = [];
  const err = (message: string) => problems.push({ severity: "error", message });
  const warn = (message: string) => problems.push({ severity: "warning", message });
  const note = (message: string) => problems.push({ severity: "note", message });

  if (!f.debian) err("not a Debian system (no /etc/debian_version): mailha is built and tested for Debian 12 (bookworm)");
  else if (!/^12(\.|$)/.test(f.debian)) err(`Debian ${f.debian}: mailha is built and tested for Debian 12 (bookworm)`);
  if (!nodeVersionOk(f.node)) err(`${f.node ? `Node ${f.node}` : "no Node"}: mailha needs Node ${NODE_MIN.join(".")} or later on PATH or in /usr/local/bin (Debian 12's nodejs is 18: install Node 20, e.g. from NodeSource)`);
  if (f.clockMs === null) err("could not read the server's clock");
  else {
    const skew = Math.abs(f.clockMs - o.localMidMs);
    const bound = skew - o.rttMs / 2;
    if (bound > CLOCK_SKEW_MAX_MS) err(`its clock is ${Math.round(skew)} ms off this machine's (more than ${CLOCK_SKEW_MAX_MS} ms): run NTP (systemd-timesyncd or chrony) on both servers`);
    else if (bound > CLOCK_WARN_MS) warn(`its clock is ${Math.round(skew)} ms off this machine's: check NTP`);
  }
  const unit = f.units.get(d.unit) ?? { enabled: "not-found", active: "inactive" };
  const running = unit.active === "active";
  if (!running) {
    const busy = d.ports.filter((p) => f.listening.has(p));
    if (busy.length) err(`port${busy.length > 1 ? "s" : ""} ${busy.join(", ")} already in use (\`ss -ltnup\` says by what): mailha's services need ${busy.length > 1 ? "them" : "it"}`);
  }
  if (d.volume) {
    if (!f.volumeCreated) {
      const need = d.volume.sizeBytes * 1.05 + GIB;
      if (f.freeBytes === null) err("could not read the free space where the volume goes");
      else if (f.freeBytes < need) err(`${fmtGiB(f.freeBytes)} free where the volume goes, ${fmtGiB(need)} needed (volume.size ${fmtGiB(d.volume.sizeBytes)} and room around it)`);
      else if (f.freeBytes < 2 * d.volume.sizeBytes + GIB) warn(`${fmtGiB(f.freeBytes)} free: after a split brain the preserved copy may need up to the volume's size again (${fmtGiB(d.volume.sizeBytes)})`);
    }
    note(f.drbdModule ? "the kernel DRBD module is present (the kernel driver is for a later version; the userspace engine is used)" : "no kernel DRBD module: the userspace engine (FUSE and a loop device) is used");
  }

  const actions: Action[] = [];
  if (f.pkg !== d.pkgVersion) actions.push({ kind: "install-package", from: f.pkg, to: d.pkgVersion });
  for (const file of d.files) {
    const have = f.files.get(file.path) ?? null;
    if (have !== file.sha256) actions.push({ kind: "write-file", path: file.path, mode: file.mode, why: have ? "changed" : "missing" });
  }
  if (d.volume && !f.volumeCreated) actions.push({ kind: "create-volume", primary: d.volume.preferred && !d.volume.peerHasVolume });
  if (unit.enabled !== "enabled") actions.push({ kind: "enable-unit", unit: d.unit });
  if (!running) actions.push({ kind: "start-unit", unit: d.unit });
  const restartNeeded = running && actions.some((a) => a.kind === "install-package" || a.kind === "write-file");
  if (restartNeeded) note(`${d.unit} runs: what changes takes effect when it restarts (\`mailha deploy upgrade\` restarts the nodes one at a time, with a switchover)`);
  return { problems, actions, restartNeeded };
}

/** One line for an action, as the dry run prints it. */
export function describeAction(a: Action): string {
  switch (a.kind) {
    case "install-package":
      return a.from ? `upgrade mailha ${a.from} -> ${a.to}` : `install mailha ${a.to} (and the Debian packages it depends on)`;
    case "write-file":
      return `write ${a.path} (${a.why}, mode ${a.mode.toString(8).padStart(4, "0")})`;
    case "create-volume":
      return `create the replicated volume${a.primary ? " (this side holds the data; the other is synced from it)" : ""}`;
    case "enable-unit":
      return `enable ${a.unit}`;
    case "start-unit":
      return `start ${a.unit}`;
  }
}
