// From nothing to a healthy cluster on two booted Debian machines and a witness, the
// way an operator does it: `mailha init` on this host, `mailha deploy` into the machines
// (the system's ssh, the harness's key), mail sent and read through both nodes, a power
// loss of the active machine (its init killed): the other takes over with nothing
// acknowledged lost; the machine comes back and rejoins; a second deploy changes
// nothing; `mailha deploy upgrade` to a newer package as the fault of a `mailha
// failover-test` run loses nothing. The machines are removed afterwards even when a
// step fails.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { run, runAll, sleep } from "../../common/exec.ts";
import { parseDocument } from "yaml";
import { mailha, ROOT } from "../helpers/cli.ts";
import { bootMachines, type Machine, type Machines } from "./machines.ts";

const say = (line: string) => process.stdout.write(`# ${line}\n`);
const DOMAIN = "deploy.test";
const USER = `erin@${DOMAIN}`;
const PASSWORD = "erin-deploy-password";

async function must(m: Machine, cmd: string, input?: string, timeoutMs?: number): Promise<string> {
  const r = await m.ssh(cmd, { ...(input === undefined ? {} : { input }), ...(timeoutMs ? { timeoutMs } : {}) });
  assert.equal(r.code, 0, `on ${m.name}, \`${cmd}\` failed (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

/** The node's own view (`mailha status --json` on it), or null. */
async function stateOf(m: Machine): Promise<{ state: string; volumeInSync: boolean } | null> {
  const r = await m.ssh(`mailha status --config /etc/mailha/mailha.yaml --node ${m.name} --json 2>/dev/null`, { timeoutMs: 20_000 });
  try {
    const n = (JSON.parse(r.stdout) as { nodes: { node: string; state?: string; volumeInSync?: boolean }[] }).nodes.find((x) => x.node === m.name);
    return n?.state ? { state: n.state, volumeInSync: !!n.volumeInSync } : null;
  } catch {
    return null;
  }
}

async function waitFor<T>(what: string, ms: number, probe: () => Promise<T | null | false>): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = await probe();
    if (v) {
      say(`${what}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      return v;
    }
    if (Date.now() - t0 > ms) assert.fail(`${what}: not within ${ms / 1000} s`);
    await sleep(2000);
  }
}

describe("mailha init + mailha deploy into two booted Debian machines and a witness", { skip: process.getuid?.() !== 0 ? "needs root" : false }, () => {
  let m: Machines;
  let dir: string;
  let config: string;
  let pkg: string;
  /** The package the nodes run after the upgrade test. */
  let current: string;
  const cli = (args: string[]) => mailha([...args, "--config", config]);
  const deployArgs = (p = pkg) => ["deploy", "--package", p, "--ssh-config", m.sshConfigFile, "--timeout", "600"];

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "mailha-deploy-test-"));
    const t0 = Date.now();
    const b = await runAll("npm", ["run", "package", "--silent"], { cwd: ROOT, timeoutMs: 900_000 });
    assert.equal(b.code, 0, `npm run package: ${b.stdout.slice(-2000)}\n${b.stderr.slice(-2000)}`);
    const debs = readdirSync(join(ROOT, "dist-deb")).filter((f) => f.endsWith(".deb"));
    assert.ok(debs.length, "npm run package made a .deb");
    // The one just built: the newest file (versions do not sort as names do).
    pkg = debs.map((f) => join(ROOT, "dist-deb", f)).sort((x, y) => statSync(y).mtimeMs - statSync(x).mtimeMs)[0]!;
    say(`package ${pkg} built in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    m = await bootMachines({ names: ["a", "b", "w"], log: say });
  });
  after(async () => {
    // The nodes first, so they unmount and detach their loop devices (the host's own).
    if (m) await Promise.all(["a", "b"].map((n) => m.byName[n]?.ssh("systemctl stop mailha-node", { timeoutMs: 120_000 }).catch(() => null)));
    if (m) await m.destroy();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("init, deploy (dry run, then for real): a healthy cluster; mail in and out through both nodes", async () => {
    config = join(dir, "mailha.yaml");
    const [a, b, w] = [m.byName.a!, m.byName.b!, m.byName.w!];
    const init = await mailha(["init", "-o", config, "--cluster", "deploytest", "--node", `a=${a.address}`, "--node", `b=${b.address}`, "--domain", DOMAIN, "--dns-manual", "--witness", w.address, "--secrets-dir", join(dir, "secrets"), "--volume-size", "256MiB"]);
    assert.equal(init.code, 0, init.stderr);
    assert.equal((await mailha(["config", "check", config])).code, 0);

    const dry = await cli([...deployArgs(), "--dry-run", "--json"]);
    assert.equal(dry.code, 0, `deploy --dry-run: ${dry.stdout}\n${dry.stderr}`);
    const plan = JSON.parse(dry.stdout) as { changes: number; hosts: { name: string; planned: string[]; problems: { severity: string; message: string }[] }[] };
    for (const h of plan.hosts) assert.ok(h.planned.some((p) => /^install mailha/.test(p)), `${h.name} would get the package: ${JSON.stringify(h)}`);
    assert.notEqual((await a.ssh("test -e /etc/mailha/mailha.yaml")).code, 0, "the dry run wrote nothing");

    const t0 = Date.now();
    const r = await cli([...deployArgs(), "--json"]);
    say(`deploy took ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    assert.equal(r.code, 0, `deploy: ${r.stdout.slice(-4000)}\n${r.stderr.slice(-4000)}`);
    const res = JSON.parse(r.stdout) as { healthy: boolean; changes: number; dns: { records?: string } };
    assert.equal(res.healthy, true);
    assert.match(res.dns.records ?? "", new RegExp(`mx1\\.${DOMAIN.replace(".", "\\.")}`), "the DNS records to put in the zone are printed");
    // Secrets went over stdin, with their mode.
    assert.equal((await must(a, "stat -c %a /etc/mailha/secrets/heartbeat.key")).trim(), "600");
    assert.equal((await must(a, "systemctl is-enabled mailha-node")).trim(), "enabled");
    assert.equal((await must(w, "systemctl is-active mailha-witness")).trim(), "active");

    await must(a, `mailha domain add ${DOMAIN} --config /etc/mailha/mailha.yaml >/dev/null 2>&1 || true; mailha user add ${USER} --config /etc/mailha/mailha.yaml`, `${PASSWORD}\n`);
    for (const [via, n] of [["a", 1], ["b", 2]] as const) {
      const target = via === "a" ? a.address : b.address;
      let sw = await runAll("swaks", ["--server", target, "--from", "someone@example.net", "--to", USER, "--header", `Subject: deploy test ${n}`]);
      for (let i = 0; i < 20 && /451 4\.3\.0/.test(sw.stdout); i++) {
        await sleep(1000);
        sw = await runAll("swaks", ["--server", target, "--from", "someone@example.net", "--to", USER, "--header", `Subject: deploy test ${n}`]);
      }
      assert.match(sw.stdout, /250 2\.0\.0/, `mail through ${via}: ${sw.stdout.slice(-600)}`);
    }
    // Read through both: a's IMAP, and b's proxy to it.
    for (const target of [a.address, b.address]) {
      const found = await waitFor(`both messages readable through ${target}`, 60_000, async () => {
        const c = await runAll("curl", ["-sk", "--ssl-reqd", `imap://${target}/INBOX`, "-u", `${USER}:${PASSWORD}`, "-X", "SEARCH ALL"]);
        const ids = /\* SEARCH ([\d ]+)/.exec(c.stdout)?.[1]?.trim().split(/\s+/) ?? [];
        return ids.length >= 2 ? ids : null;
      });
      assert.ok(found.length >= 2);
    }
  });

  test("a power loss of the active machine: the other takes over, nothing acknowledged is lost; it comes back and rejoins", async (t) => {
    const [a, b] = [m.byName.a!, m.byName.b!];
    assert.equal((await stateOf(a))?.state, "active");
    // Acknowledged just before the power goes.
    const sw = await run("swaks", ["--server", a.address, "--from", "someone@example.net", "--to", USER, "--header", "Subject: before the power loss"]);
    assert.match(sw.stdout, /250 2\.0\.0/);
    const k = await a.kill();
    t.diagnostic(`a gone ${k.seconds.toFixed(1)} s after its init's SIGKILL${k.abortedFuse.length ? ` (its FUSE connections ${k.abortedFuse.join(", ")} aborted: the I/O a power loss fails)` : ""}`);
    await waitFor("b active after a's power loss", 180_000, async () => (await stateOf(b))?.state === "active");
    const c = await waitFor("every acknowledged message on b", 60_000, async () => {
      const r = await runAll("curl", ["-sk", "--ssl-reqd", `imap://${b.address}/INBOX`, "-u", `${USER}:${PASSWORD}`, "-X", "SEARCH ALL"]);
      const n = (/\* SEARCH ([\d ]+)/.exec(r.stdout)?.[1]?.trim().split(/\s+/) ?? []).length;
      return n >= 3 ? n : null;
    });
    assert.equal(c, 3, "three acknowledged, three there");
    await a.start();
    await waitFor("a back as passive, the volume in sync", 300_000, async () => {
      const [sa, sb] = [await stateOf(a), await stateOf(b)];
      return sa?.state === "passive" && sb?.state === "active" && sa.volumeInSync && sb.volumeInSync;
    });
  });

  test("a second deploy changes nothing", async () => {
    const r = await cli([...deployArgs(), "--json"]);
    assert.equal(r.code, 0, `deploy again: ${r.stdout.slice(-3000)}\n${r.stderr.slice(-2000)}`);
    const res = JSON.parse(r.stdout) as { healthy: boolean; changes: number; hosts: { name: string; done: string[] }[] };
    assert.equal(res.changes, 0, `nothing to change: ${JSON.stringify(res.hosts.map((h) => [h.name, h.done]))}`);
    assert.equal(res.healthy, true);
    assert.ok(existsSync(pkg));
  });

  test("mailha deploy upgrade to a newer package while clients send mail: passive first, a switchover, the other; nothing acknowledged lost", async () => {
    const [a, b] = [m.byName.a!, m.byName.b!];
    // The same build under a later version: what a package from a later commit is to dpkg.
    const tree = join(dir, "repack");
    await run("dpkg-deb", ["-R", pkg, tree]);
    const control = join(tree, "DEBIAN", "control");
    const version = /^Version: (.+)$/m.exec(readFileSync(control, "utf8"))![1]!;
    const next = `${version}.1`;
    writeFileSync(control, readFileSync(control, "utf8").replace(/^Version: .+$/m, `Version: ${next}`));
    const newer = join(dir, `mailha_${next}_amd64.deb`);
    current = newer;
    await run("dpkg-deb", ["--root-owner-group", "-b", tree, newer], { timeoutMs: 300_000 });
    // The upgrade is the fault of a `mailha failover-test` run, as an operator proves
    // it: real clients (SMTP to the MX hosts in order, IMAP sessions) before, during and
    // after it, and every acknowledged message found once afterwards.
    const result = join(dir, "upgrade.json");
    const upgradeCmd = [process.execPath, join(ROOT, "ops", "bin", "mailha.mjs"), "deploy", "upgrade", "--config", config, "--package", newer, "--ssh-config", m.sshConfigFile, "--timeout", "600", "--json"].map((x) => `'${x}'`).join(" ");
    const ft = join(dir, "failover-test.yaml");
    const doc = parseDocument(readFileSync(config, "utf8"));
    doc.setIn(["failover_test", "faults", "upgrade"], doc.createNode({ description: "mailha deploy upgrade to a newer package", inject: `${upgradeCmd} > '${result}'`, timeout_ms: 600_000 }));
    writeFileSync(ft, doc.toString());
    writeFileSync(join(dir, "erin.pw"), `${PASSWORD}\n`, { mode: 0o600 });
    const t0 = Date.now();
    const r = await mailha(["failover-test", "--config", ft, "--fault", "upgrade", "--fault-after", "5", "--duration", "20", "--smtp-interval", "300", "--imap-sessions", "1", "--no-pop3", "--user", USER, "--password-file", join(dir, "erin.pw"), "--report", join(dir, "report.html"), "--json"], 1_500_000);
    say(`failover-test --fault upgrade took ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    const up = existsSync(result) ? readFileSync(result, "utf8") : "";
    type Trial = { ok: boolean; notes: string[]; healthyAfter: boolean; smtp: { acked: number; lost: string[]; duplicated: string[] }; imap: { uidValidityStable: boolean; oldUidsStable: boolean }; timeline: { ops: { id?: string; start: number }[]; events: { time: number }[] } };
    let trial: Trial | undefined;
    try {
      trial = (JSON.parse(r.stdout) as { results: Trial[] }).results[0];
    } catch {
      // not JSON: the exit code's message below shows what it printed
    }
    // What a duplicate's sends and the cluster's events around them were (to tell why, if one happens).
    const around = (ids: string[]) => {
      const sends = trial!.timeline.ops.filter((o) => o.id && ids.includes(o.id));
      const t = sends[0]?.start ?? 0;
      return JSON.stringify({ sends, events: trial!.timeline.events.filter((e) => Math.abs(e.time - t) < 15_000) }).slice(0, 6000);
    };
    // The trial's own verdict first (a failed one is why the exit code is 1), with what failed.
    const why = trial
      ? `notes: ${trial.notes.join("; ")}; lost ${JSON.stringify(trial.smtp.lost)}; duplicated ${around(trial.smtp.duplicated)}; healthy after ${trial.healthyAfter}; UIDVALIDITY stable ${trial.imap.uidValidityStable}, old UIDs stable ${trial.imap.oldUidsStable}`
      : r.stdout.slice(-3000);
    assert.equal(r.code, 0, `failover-test: ${why}\n${r.stderr.slice(-3000)}\nupgrade: ${up.slice(-2000)}`);
    assert.ok(trial, "failover-test printed its results");
    const res = JSON.parse(up) as { healthy: boolean; steps: string[]; active: string };
    assert.equal(res.healthy, true);
    assert.ok(res.steps.some((x) => /switchover/.test(x)), `a switchover: ${res.steps.join("; ")}`);
    for (const x of [a, b]) assert.equal((await must(x, "dpkg-query -W -f '${Version}' mailha")).trim(), next, `${x.name} runs the new package`);
    assert.ok(trial.ok, `the trial: ${why}`);
    assert.deepEqual(trial.smtp.lost, [], "nothing acknowledged is lost");
    assert.deepEqual(trial.smtp.duplicated, [], `nothing is there twice: ${around(trial.smtp.duplicated)}`);
    assert.ok(trial.smtp.acked > 5, `clients sent mail during the upgrade (${trial.smtp.acked} acknowledged)`);
    say(`${trial.smtp.acked} messages acknowledged around the upgrade, every one there once`);
  });

  test("a deploy that fails on one node leaves the other serving and says how to go on; once fixed, deploy again finishes", async () => {
    assert.ok(current, "the upgrade test ran first");
    const states = await Promise.all([m.byName.a!, m.byName.b!].map(async (x) => ({ x, s: (await stateOf(x))?.state })));
    const active = states.find((v) => v.s === "active")!.x;
    const broken = states.find((v) => v.x !== active)!.x;
    // The passive node loses its package (dpkg -r: stops the unit, keeps config and data),
    // and its dpkg is made to fail, as a full disk or a broken apt would.
    await must(broken, "export DEBIAN_FRONTEND=noninteractive; dpkg -r mailha >/dev/null 2>&1");
    await must(broken, `echo 'DPkg::Pre-Invoke { "echo mailha-test: dpkg refused >&2; false"; };' > /etc/apt/apt.conf.d/99mailha-test-fail`);
    const r = await cli([...deployArgs(current), "--json"]);
    assert.notEqual(r.code, 0, "a failed node makes deploy fail");
    const res = JSON.parse(r.stdout) as { healthy: boolean; next: string[]; hosts: { name: string; error?: string; done: string[] }[] };
    const h = res.hosts.find((x) => x.name === broken.name)!;
    assert.match(h.error ?? "", /installing the package failed/, `${broken.name}'s error says what failed: ${JSON.stringify(h)}`);
    assert.ok(res.next.some((n) => n.includes(`${broken.name} failed`) && /run mailha deploy again/.test(n)), `it says how to go on: ${res.next.join("; ")}`);
    for (const o of res.hosts.filter((x) => x.name !== broken.name)) assert.equal(o.error, undefined, `${o.name} did not fail`);
    // The other node kept serving: it takes mail and shows it.
    assert.equal((await stateOf(active))?.state, "active");
    const sw = await runAll("swaks", ["--server", active.address, "--from", "someone@example.net", "--to", USER, "--header", "Subject: while the other node is broken"]);
    assert.match(sw.stdout, /250 2\.0\.0/, `mail through ${active.name}: ${sw.stdout.slice(-600)}`);
    const subjects = async () => (await runAll("curl", ["-sk", "--ssl-reqd", `imap://${active.address}/INBOX`, "-u", `${USER}:${PASSWORD}`, "-X", "SEARCH SUBJECT \"while the other node is broken\""])).stdout;
    await waitFor(`the message readable on ${active.name}`, 60_000, async () => /\* SEARCH \d+/.test(await subjects()));

    // Fixed, deploy again continues from there: the package, the unit, a healthy cluster.
    await must(broken, "rm -f /etc/apt/apt.conf.d/99mailha-test-fail");
    const again = await cli([...deployArgs(current), "--json"]);
    assert.equal(again.code, 0, `deploy after the fix: ${again.stdout.slice(-3000)}\n${again.stderr.slice(-2000)}`);
    const res2 = JSON.parse(again.stdout) as { healthy: boolean; changes: number; hosts: { name: string; done: string[] }[] };
    assert.equal(res2.healthy, true);
    const done = res2.hosts.find((x) => x.name === broken.name)!.done;
    assert.ok(done.some((d) => /^install mailha/.test(d)) && done.some((d) => /^start /.test(d)), `${broken.name} got its package and unit back: ${done.join("; ")}`);
    assert.deepEqual(res2.hosts.filter((x) => x.name !== broken.name).map((x) => x.done), [[], []], "nothing else changed");
    assert.equal((await stateOf(broken))?.state, "passive");
    assert.match(await subjects(), /\* SEARCH \d+/, "the message is still there");
  });
});
