// The reconcile benchmark: a victim with N deliveries and N flag changes (N = 5,000 by
// default, BENCH_RECONCILE_N) merged into the survivor by `mailha reconcile`; printed as
// operations applied per second, against a baseline measured in the same run on the
// same survivor: the same N messages APPENDed over one plain IMAP session (what a
// single client can push through Dovecot here, with no planning, queue or checks).
import assert from "node:assert/strict";
import { readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { parseDocument } from "yaml";
import { dirname, join } from "node:path";
import { ImapFlow } from "imapflow";
import { run, sleep } from "../../common/exec.ts";
import { mailha } from "../helpers/cli.ts";
import { fault, waitNode } from "../helpers/cluster.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";
import { writeSection } from "./report.ts";

const N = Number(process.env.BENCH_RECONCILE_N ?? 5000);
const USER = "bob@mailha.test";
const PASS = "bob-password-1";

export async function runReconcileBench(): Promise<void> {
  const lab = writeTestLabConfig("br", 117);
  const cli = (args: string[]) => mailha([...args, "--config", lab.configFile], 1_800_000);
  const imap = async (host: string) => {
    const c = new ImapFlow({ host, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: USER, pass: PASS }, logger: false });
    await c.connect();
    return c;
  };
  const inbox = (node: string, sub: string) => join(lab.dir, node, "data", "mail", "mailha.test", "bob", "Maildir", sub);
  const count = (node: string) => ["new", "cur"].reduce((n, s) => n + (() => { try { return readdirSync(inbox(node, s)).length; } catch { return 0; } })(), 0);
  const deliver = async (host: string, node: string, n: number) => {
    const before = count(node);
    await run("smtp-source", ["-s", "10", "-m", String(n), "-l", "2000", "-f", "bench@example.net", "-t", USER, host], { timeoutMs: 900_000 });
    for (let i = 0; i < 1200 && count(node) - before < n; i++) await sleep(100);
    assert.equal(count(node) - before, n, "every message arrived");
  };
  try {
    process.stderr.write(`reconcile benchmark: a victim with ${N} deliveries and ${N} flag changes\n- lab up, ${N} messages before the split\n`);
    // Room for 3 N messages, their indexes, and the queue's jobs in Redis' AOF.
    const doc = parseDocument(readFileSync(lab.configFile, "utf8"));
    doc.setIn(["volume", "size"], "1GiB");
    writeFileSync(lab.configFile, doc.toString());
    assert.equal((await cli(["lab", "up"])).code, 0);
    assert.equal((await cli(["user", "add", USER, "--password", PASS])).code, 0);
    await deliver(lab.a, "a", N);
    const c0 = await imap(lab.a);
    await c0.mailboxOpen("INBOX");
    await c0.logout();
    await sleep(3000);
    process.stderr.write(`- split: ${N} deliveries and ${N} flag changes on a, alone\n`);
    await fault(lab, "cut-link", "a", "replication");
    await waitNode(lab, "b", "outdated", (s) => s.volume?.disk === "outdated", 30_000);
    await deliver(lab.a, "a", N);
    const c1 = await imap(lab.a);
    await c1.mailboxOpen("INBOX");
    await c1.messageFlagsAdd(`1:${N}`, ["\\Flagged"]); // the pre-split messages
    await c1.logout();
    await sleep(8000); // a's watcher journals them
    await fault(lab, "kill-node", "a");
    await waitNode(lab, "b", "failed", (s) => s.state === "failed", 60_000);
    assert.equal((await cli(["takeover", "--force", "--node", "b"])).code, 0);
    await waitNode(lab, "b", "active", (s) => s.state === "active", 120_000);
    await fault(lab, "boot-node", "a");
    await fault(lab, "heal");
    await waitNode(lab, "a", "preserved and resynced", (x) => x.volume?.connection === "connected" && x.volume.outOfSyncBytes === 0 && x.volume.disk === "uptodate", 600_000);

    process.stderr.write("- mailha reconcile\n");
    const t0 = process.hrtime.bigint();
    const r = await cli(["reconcile", "--json"]);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    assert.equal(r.code, 0, r.stderr.slice(-2000));
    const res = JSON.parse(r.stdout) as { applied: number; plan: { ops: { op: string }[] } };
    const kinds: Record<string, number> = {};
    for (const o of res.plan.ops) kinds[o.op] = (kinds[o.op] ?? 0) + 1;

    const opsPerS = res.applied / seconds;
    console.log(`reconcile.ops ${res.applied} count`);
    console.log(`reconcile.seconds ${seconds.toFixed(1)} s`);
    console.log(`reconcile.ops_per_s ${opsPerS.toFixed(0)} per_s`);
    process.stderr.write("- baseline: the same messages APPENDed over one plain IMAP session\n");
    const files = ["new", "cur"].flatMap((s) => readdirSync(inbox("b", s)).map((f) => join(inbox("b", s), f))).slice(0, res.applied || N);
    const c2 = await imap(lab.b);
    await c2.mailboxCreate("Baseline");
    const tb = process.hrtime.bigint();
    for (const f of files) await c2.append("Baseline", readFileSync(f), ["\\Flagged"]);
    const baseSeconds = Number(process.hrtime.bigint() - tb) / 1e9;
    await c2.logout();

    const basePerS = files.length / baseSeconds;
    const lines = [
      `reconcile.ops ${res.applied} count`,
      `reconcile.seconds ${seconds.toFixed(1)} s`,
      `reconcile.ops_per_s ${opsPerS.toFixed(0)} per_s`,
      `reconcile.baseline_imap_append_per_s ${basePerS.toFixed(0)} per_s`,
      `reconcile.vs_plain_append ${(opsPerS / basePerS).toFixed(2)} ratio`,
    ];
    for (const l of lines.slice(3)) console.log(l);
    writeSection("reconcile", [
      `Command: \`npm run bench -- reconcile\` (run ${new Date().toISOString().slice(0, 10)}; N = ${N}, BENCH_RECONCILE_N).`,
      `The lab: ${N} messages delivered before the split; then node a alone takes ${N} more (smtp-source) and its user flags the ${N} earlier ones (one STORE over all of them, ${N} flag changes in the journal); a dies, b is forced to take over, a comes back and is preserved and resynced; \`mailha reconcile\` merges a's copy into b. Timed from the command's start to its end: mounting the copy with its journal replayed, reading and hashing both sides, planning, and applying through the BullMQ queue and Dovecot (IMAP as the user). Operations: ${Object.entries(kinds).map(([k, v]) => `${k} ${v}`).join(", ")}. Baseline from the same run: the same number of messages APPENDed by one plain IMAP session to the same Dovecot.`,
      "",
      "```",
      ...lines,
      "```",
    ]);
  } finally {
    await mailha(["lab", "down", "--config", lab.configFile]);
    rmSync(dirname(lab.configFile), { recursive: true, force: true });
  }
}
