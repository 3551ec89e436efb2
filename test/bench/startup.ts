// The start-up benchmark: how long the `mailha` command takes to answer, compiled
// (dist/, what the bin runs after `npm run build`) against the same sources through
// tsx (MAILHA_FROM_SOURCES=1, what every start cost before the build), in the same run
// and in turns (compiled, tsx, compiled, ...), so that a pair shares the machine's
// drift. Two commands: `mailha --help`, and `mailha status --json` against a config of
// its own (secrets generated into a temporary folder, no node running: it answers "no
// node daemon answers here", exit 1, after loading and checking the config and looking
// for the nodes' control sockets, as on a machine whose daemons are down). A bare
// `node -e 0` is the floor. Times are wall clock from spawn to exit, the median of the
// turns; ratios the median of the pairs' tsx/compiled.
// Run: `npm run bench -- startup` (prints `NAME VALUE UNIT` lines). BENCH_STARTUP_ROUNDS (15).
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT } from "../helpers/cli.ts";
import { writeSection } from "./report.ts";

const ROUNDS = Number(process.env.BENCH_STARTUP_ROUNDS ?? 15);
const BIN = join(ROOT, "ops", "bin", "mailha.mjs");

interface Run {
  readonly seconds: number;
  readonly code: number;
  readonly stderr: string;
}

/** One start of `node ARGS`, timed from spawn to exit. */
function timeRun(args: readonly string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(process.execPath, args, { cwd: ROOT, env, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr!.on("data", (d) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code) => resolve({ seconds: Number(process.hrtime.bigint() - t0) / 1e9, code: code ?? -1, stderr }));
  });
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

interface Pair {
  readonly compiled: number;
  readonly compiledMin: number;
  readonly tsx: number;
  readonly tsxMin: number;
  readonly ratio: number;
}

/** ROUNDS pairs of one command, compiled and through tsx, after a warm-up of each. */
async function pairs(name: string, args: readonly string[], expectCode: number): Promise<Pair> {
  // =0: the bin refuses (exit 2) rather than fall back to the sources if dist/ is not up to date.
  const compiledEnv = { ...process.env, MAILHA_FROM_SOURCES: "0" };
  const tsxEnv = { ...process.env, MAILHA_FROM_SOURCES: "1" };
  const check = (r: Run, how: string) => {
    if (r.code !== expectCode) throw new Error(`startup bench: mailha ${args.join(" ")} (${how}) exited ${r.code}, not ${expectCode}: ${r.stderr.slice(0, 400)}`);
  };
  check(await timeRun([BIN, ...args], compiledEnv), "compiled");
  check(await timeRun([BIN, ...args], tsxEnv), "tsx");
  const c: number[] = [];
  const t: number[] = [];
  const ratios: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    const a = await timeRun([BIN, ...args], compiledEnv);
    const b = await timeRun([BIN, ...args], tsxEnv);
    check(a, "compiled");
    check(b, "tsx");
    c.push(a.seconds);
    t.push(b.seconds);
    ratios.push(b.seconds / a.seconds);
  }
  const p = { compiled: median(c), compiledMin: Math.min(...c), tsx: median(t), tsxMin: Math.min(...t), ratio: median(ratios) };
  for (const l of pairLines(name, p)) console.log(l);
  return p;
}

function pairLines(name: string, p: Pair): string[] {
  return [
    `startup.${name}.compiled ${p.compiled.toFixed(3)} s`,
    `startup.${name}.compiled_min ${p.compiledMin.toFixed(3)} s`,
    `startup.${name}.tsx ${p.tsx.toFixed(3)} s`,
    `startup.${name}.tsx_min ${p.tsxMin.toFixed(3)} s`,
    `startup.${name}.tsx_over_compiled ${p.ratio.toFixed(1)} ratio`,
  ];
}

export async function runStartupBench(): Promise<void> {
  // The figures are for the product as built from these sources.
  const build = spawnSync(process.execPath, [join(ROOT, "ops", "bin", "build.mjs")], { cwd: ROOT, stdio: ["ignore", "ignore", "inherit"] });
  if (build.status !== 0) throw new Error("startup bench: npm run build failed");

  const dir = mkdtempSync(join(tmpdir(), "mailha-bench-startup-"));
  try {
    const config = join(dir, "mailha.yaml");
    writeFileSync(config, readFileSync(join(ROOT, "examples", "lab.yaml"), "utf8").replaceAll("/var/lib/mailha-lab", dir));
    const gen = spawnSync(process.execPath, [BIN, "secret", "generate", "--config", config], { cwd: ROOT, encoding: "utf8" });
    if (gen.status !== 0) throw new Error(`startup bench: mailha secret generate failed: ${gen.stderr}`);

    const floor: number[] = [];
    const ms = (s: number) => `${Math.round(s * 1000)} ms`;
    await timeRun(["-e", "0"], process.env);
    for (let i = 0; i < ROUNDS; i++) floor.push((await timeRun(["-e", "0"], process.env)).seconds);
    const bare = median(floor);
    const bareMin = Math.min(...floor);
    console.log(`startup.node_bare ${bare.toFixed(3)} s`);
    console.log(`startup.node_bare_min ${bareMin.toFixed(3)} s`);
    const help = await pairs("help", ["--help"], 0);
    const status = await pairs("status", ["status", "--json", "--config", config], 1);

    writeSection("startup", [
      `Command: \`npm run bench -- startup\` (run ${new Date().toISOString().slice(0, 10)}; ${ROUNDS} turns each way, Node ${process.versions.node}).`,
      "How long the `mailha` command takes to answer, from spawn to exit: the bin running the compiled product (dist/, after `npm run build`; the bin's check that dist/ is not older than the sources included) against the same sources through tsx (`MAILHA_FROM_SOURCES=1`, which is what every start cost before the build, every daemon's included), in the same run, in turns. `mailha status --json` runs against a config of its own with no node running (it loads and checks the config and the secret files, finds no node's control socket, answers, exit 1). Times are medians of the turns (the fastest turn in brackets), ratios the median of the pairs' tsx/compiled; a bare `node -e 0` is the floor. Target (issue 17): `--help` and `status` well under 0.3 s.",
      "",
      "| command | compiled | through tsx | tsx/compiled |",
      "|---|---|---|---|",
      `| \`mailha --help\` | ${ms(help.compiled)} (${ms(help.compiledMin)}) | ${ms(help.tsx)} (${ms(help.tsxMin)}) | ${help.ratio.toFixed(1)} |`,
      `| \`mailha status --json\` | ${ms(status.compiled)} (${ms(status.compiledMin)}) | ${ms(status.tsx)} (${ms(status.tsxMin)}) | ${status.ratio.toFixed(1)} |`,
      `| \`node -e 0\` (the floor) | ${ms(bare)} (${ms(bareMin)}) | | |`,
      "",
      "```",
      `startup.node_bare ${bare.toFixed(3)} s`,
      `startup.node_bare_min ${bareMin.toFixed(3)} s`,
      ...pairLines("help", help),
      ...pairLines("status", status),
      "```",
    ]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.url === `file://${process.argv[1]}`) await runStartupBench();
