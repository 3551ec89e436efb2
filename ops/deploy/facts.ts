// What a server has, read in one ssh round trip: a shell script printing `key=value`
// lines (Debian and Node versions, the installed mailha package, free space where the
// state goes, listening ports, the clock, the kernel DRBD module, the content hashes of
// the files deploy writes, the units' state, whether the volume exists), and the pure
// parser of its output. Nothing here changes the server.
import { shellQuote } from "./ssh.ts";

export interface HostFacts {
  readonly debian: string | null;
  /** `v20.19.1`, or null when there is no node on PATH or in /usr/local/bin. */
  readonly node: string | null;
  /** The installed mailha package's version (dpkg), null when not installed. */
  readonly pkg: string | null;
  /** Bytes free on the file system that holds (or will hold) the state directory. */
  readonly freeBytes: number | null;
  /** TCP and UDP ports something listens on. */
  readonly listening: ReadonlySet<number>;
  /** The server's clock (ms) when it answered. */
  readonly clockMs: number | null;
  readonly drbdModule: boolean;
  /** sha256 of each file asked about, null when absent. */
  readonly files: ReadonlyMap<string, string | null>;
  /** systemctl is-enabled / is-active of each unit asked about. */
  readonly units: ReadonlyMap<string, { enabled: string; active: string }>;
  readonly volumeCreated: boolean;
}

export interface FactsQuery {
  readonly stateDir: string;
  /** The volume's metadata file (its presence means `volume create` ran). */
  readonly volumeMeta: string;
  readonly files: readonly string[];
  readonly units: readonly string[];
}

/** The script that prints the facts for Q. */
export function factsScript(q: FactsQuery): string {
  const lines = [
    "set -u",
    'echo "debian=$(cat /etc/debian_version 2>/dev/null)"',
    'n=""; if command -v node >/dev/null 2>&1; then n=$(node --version 2>/dev/null); elif [ -x /usr/local/bin/node ]; then n=$(/usr/local/bin/node --version 2>/dev/null); fi; echo "node=$n"',
    "echo \"pkg=$(dpkg-query -W -f='${Status} ${Version}' mailha 2>/dev/null | sed -n 's/^install ok installed //p')\"",
    `d=${shellQuote(q.stateDir)}; while [ ! -e "$d" ] && [ "$d" != / ]; do d=$(dirname "$d"); done; echo "free=$(df -B1 --output=avail "$d" 2>/dev/null | tail -1 | tr -d ' ')"`,
    "echo \"listening=$( (ss -Hltnu 2>/dev/null || true) | awk '{print $5}' | sed 's/.*://' | sort -un | tr '\\n' ',')\"",
    'echo "drbd=$( (modinfo drbd >/dev/null 2>&1 || [ -d /sys/module/drbd ]) && echo yes || echo no)"',
    `echo "volume=$( [ -e ${shellQuote(q.volumeMeta)} ] && echo yes || echo no)"`,
    ...q.files.map((f) => `echo "file:${f}=$(sha256sum ${shellQuote(f)} 2>/dev/null | cut -c1-64)"`),
    ...q.units.map((u) => `echo "unit:${u}=$(systemctl is-enabled ${shellQuote(u)} 2>/dev/null || true) $(systemctl is-active ${shellQuote(u)} 2>/dev/null || true)"`),
    'echo "clock=$(date +%s%3N)"',
  ];
  return lines.join("\n");
}

/** Parses the script's output (unknown lines are ignored; a missing value is null). */
export function parseFacts(text: string, q: FactsQuery): HostFacts {
  const kv = new Map<string, string>();
  for (const line of text.split("\n")) {
    const i = line.indexOf("=");
    if (i > 0) kv.set(line.slice(0, i), line.slice(i + 1).trim());
  }
  const get = (k: string): string | null => {
    const v = kv.get(k);
    return v === undefined || v === "" ? null : v;
  };
  const num = (k: string): number | null => {
    const v = get(k);
    return v !== null && /^\d+$/.test(v) ? Number(v) : null;
  };
  const files = new Map<string, string | null>();
  for (const f of q.files) {
    const v = get(`file:${f}`);
    files.set(f, v && /^[0-9a-f]{64}$/.test(v) ? v : null);
  }
  const units = new Map<string, { enabled: string; active: string }>();
  for (const u of q.units) {
    const [enabled = "", active = ""] = (kv.get(`unit:${u}`) ?? "").split(/\s+/);
    units.set(u, { enabled: enabled || "not-found", active: active || "inactive" });
  }
  return {
    debian: get("debian"),
    node: get("node"),
    pkg: get("pkg"),
    freeBytes: num("free"),
    listening: new Set((get("listening") ?? "").split(",").filter((x) => /^\d+$/.test(x)).map(Number)),
    clockMs: num("clock"),
    drbdModule: get("drbd") === "yes",
    files,
    units,
    volumeCreated: get("volume") === "yes",
  };
}
