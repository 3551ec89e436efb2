// How commands talk to the operator: human text by default, one JSON document on
// stdout with --json; progress goes to stderr (JSON lines with --json), so stdout
// stays machine-readable.
export interface Output {
  readonly json: boolean;
  progress(step: string, detail?: Record<string, unknown>): void;
  /** The command's result: `human` renders it for people, `data` is the JSON form. */
  result(data: unknown, human: () => string): void;
}

export function createOutput(json: boolean): Output {
  return {
    json,
    progress(step, detail = {}) {
      if (json) process.stderr.write(JSON.stringify({ time: new Date().toISOString(), step, ...detail }) + "\n");
      else {
        const parts = Object.entries(detail).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(",") : typeof v === "object" ? JSON.stringify(v) : String(v)}`);
        process.stderr.write(`- ${step}${parts.length ? ` ${parts.join(" ")}` : ""}\n`);
      }
    },
    result(data, human) {
      process.stdout.write(json ? JSON.stringify(data, null, 2) + "\n" : human() + "\n");
    },
  };
}

/** Pads columns for a small text table. */
export function table(rows: readonly (readonly string[])[]): string {
  const widths: number[] = [];
  for (const r of rows) r.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  return rows.map((r) => r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!))).join("  ").trimEnd()).join("\n");
}

/** 1536 -> "1.5 KiB". */
export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let x = n;
  while (x >= 1024 && i < units.length - 1) {
    x /= 1024;
    i++;
  }
  return `${i === 0 ? x : x.toFixed(1)} ${units[i]}`;
}
