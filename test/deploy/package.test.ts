// The Debian package on a booted Debian 12 machine: `npm run package`'s .deb is refused
// without Node >= 20.10, installs with apt (its dependencies through the harness's
// proxy) without enabling or starting anything and with Debian's own mariadb,
// redis-server and dovecot stopped; its units pass `systemd-analyze verify`; the
// witness runs under its sandbox as the mailha user; installing the same package again
// (the upgrade path) leaves the running witness running, the same process; `dpkg -r`
// keeps config and data; a purge keeps a node's data and says so, and a purge of a
// machine with nothing of the operator's left leaves nothing behind.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { basename } from "node:path";
import { ensurePackages } from "../../ops/setup/packages.ts";
import { buildDeb, type DebBuild } from "../../ops/package/build-deb.ts";
import { run, runAll } from "../../common/exec.ts";
import { bootMachines, cleanupLeftovers, type Machine, type Machines } from "./machines.ts";

const NODE = "/usr/local/bin/node";
const UNITS = ["mailha-node.service", "mailha-witness.service"];
const DEBIAN_SERVICES = ["mariadb", "redis-server", "dovecot"];
const WITNESS_PORT = 7790;
const NODE_A_SERVICE = "10.201.0.201";
const NODE_A_REPLICATION = "10.99.0.1";
const ACTIVE_WAIT_S = 120;

const say = (line: string) => process.stdout.write(`# ${line}\n`);

async function must(m: Machine, cmd: string, timeoutMs?: number): Promise<string> {
  const r = await m.ssh(cmd, timeoutMs === undefined ? {} : { timeoutMs });
  assert.equal(r.code, 0, `on machine ${m.name}, \`${cmd}\` failed (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  return r.stdout + r.stderr;
}

/**
 * The cluster for the unit tests: node a (its addresses added to p) alone with the
 * witness on p's own address; b never answers, and fencing it "succeeds" (/bin/true),
 * so a takes over after initdead.
 */
function witnessConfig(address: string): string {
  return `cluster: { name: pkgtest, preferred_node: a }
nodes:
  - { id: a, service_address: ${NODE_A_SERVICE}, replication_address: ${NODE_A_REPLICATION}, heartbeat_links: [{ name: public, address: ${NODE_A_SERVICE} }] }
  - { id: b, service_address: 10.201.0.202, replication_address: 10.99.0.2, heartbeat_links: [{ name: public, address: 10.201.0.202 }] }
mail:
  domains: [example.org]
  host: mail.example.org
  mx: [{ name: mx1.example.org, node: a, preference: 10 }]
quorum:
  witness: { address: ${address}, port: ${WITNESS_PORT} }
timers: { keepalive_ms: 500, warntime_ms: 1000, deadtime_ms: 2000, initdead_ms: 3000 }
fencing: { agent: command, command: /bin/true }
heartbeat: { key_file: /etc/mailha/heartbeat.key }
volume: { size: 256MiB, allocation: sparse, secret_file: /etc/mailha/replication.secret }
dns: { updates: false, zone: example.org }
`;
}

describe("the Debian package (npm run package) on a booted Debian 12 machine", () => {
  let m: Machines | undefined;
  let p: Machine;
  let deb: DebBuild;
  let debOnP = "";

  before(async () => {
    await ensurePackages(say);
    deb = await buildDeb(say);
    say(`package: ${basename(deb.file)} ${(deb.sizeBytes / 1e6).toFixed(1)} MB, installed size ${(deb.installedSizeKb / 1024).toFixed(1)} MiB, built in ${deb.seconds.toFixed(0)} s`);
    m = await bootMachines({ names: ["p"], log: say });
    p = m.byName.p!;
    debOnP = `/root/${basename(deb.file)}`;
    const cp = await runAll("scp", ["-F", m.sshConfigFile, deb.file, `p:${debOnP}`], { timeoutMs: 60_000 });
    assert.equal(cp.code, 0, `scp of the package to p failed: ${cp.stderr}`);
    // The harness's root already has the host's node 20 at /usr/local/bin/node (where a
    // deploy copies it); the first test takes it away and puts it back.
    assert.match(await must(p, `${NODE} --version`), /^v20\./);
  });

  after(async () => {
    if (m) await m.destroy();
    else await cleanupLeftovers();
  });

  test("without Node >= 20.10 the package refuses to install, saying what to do", async () => {
    await must(p, `mv ${NODE} /root/node.away`);
    try {
      const r = await p.ssh(`command -v node; dpkg -i ${debOnP}`, { timeoutMs: 120_000 });
      assert.notEqual(r.code, 0, "dpkg -i should fail without a node");
      assert.match(r.stdout + r.stderr, /needs Node\.js >= 20\.10 at \/usr\/local\/bin\/node or on PATH/);
      const st = await p.ssh("dpkg-query -W -f='${Status}' mailha");
      assert.match(st.stdout.trim(), /^$|not-installed$/, "a refused package must not be (half-)installed");
      assert.equal((await p.ssh("test -e /usr/bin/mailha")).code, 1, "nothing of the package may be unpacked");
    } finally {
      await must(p, `mv /root/node.away ${NODE}`);
    }
  });

  test("apt-get install of the .deb: dependencies through the proxy, nothing enabled or started", async () => {
    await must(p, "DEBIAN_FRONTEND=noninteractive apt-get update -q", 300_000);
    const t = Date.now();
    const out = await must(p, `DEBIAN_FRONTEND=noninteractive apt-get install -y -q ${debOnP}`, 900_000);
    const seconds = (Date.now() - t) / 1000;
    const s = m!.aptProxyStats;
    say(`timing: apt-get install of the .deb with its dependencies ${seconds.toFixed(0)} s (proxy: ${s.requests} requests, ${(s.upstreamBytes / 1e6).toFixed(1)} MB downloaded); .deb ${(deb.sizeBytes / 1e6).toFixed(1)} MB`);
    say(`postinst said: ${out.split("\n").filter((l) => l.startsWith("mailha:")).join(" | ")}`);
    const dpkgT = Date.now();
    await must(p, `dpkg -i ${debOnP}`, 120_000);
    say(`timing: dpkg -i of the package alone (dependencies present, as an upgrade) ${((Date.now() - dpkgT) / 1000).toFixed(1)} s`);

    assert.match(await must(p, "mailha --help"), /Usage: mailha/);
    assert.match(await must(p, "mailha config --help"), /config/);
    assert.match(await must(p, "cat /usr/lib/mailha/BUILD"), new RegExp(deb.commit));
    assert.match(await must(p, "getent passwd mailha"), /^mailha:x:\d+:\d+:[^:]*:\/var\/lib\/mailha:\/usr\/sbin\/nologin$/m);
    assert.match(await must(p, "getent group mailha"), /^mailha:/);
    assert.equal((await must(p, "stat -c '%U:%G %a' /etc/mailha /var/lib/mailha")).trim(), "root:mailha 750\nroot:root 755");
    for (const u of UNITS) {
      assert.equal((await p.ssh(`systemctl is-enabled ${u}`)).stdout.trim(), "disabled", `${u} must not be enabled by the package`);
      assert.equal((await p.ssh(`systemctl is-active ${u}`)).stdout.trim(), "inactive", `${u} must not be started by the package`);
    }
    for (const svc of DEBIAN_SERVICES) {
      assert.notEqual((await p.ssh(`systemctl is-active ${svc}`)).stdout.trim(), "active", `Debian's ${svc} must not run next to mailha's own`);
      assert.notEqual((await p.ssh(`systemctl is-enabled ${svc}`)).stdout.trim(), "enabled", `Debian's ${svc} must not be enabled`);
    }
    const verify = await p.ssh(`systemd-analyze verify ${UNITS.map((u) => `/lib/systemd/system/${u}`).join(" ")}`, { timeoutMs: 60_000 });
    assert.equal(verify.code, 0, `systemd-analyze verify failed:\n${verify.stdout}${verify.stderr}`);
    assert.doesNotMatch(verify.stdout + verify.stderr, /mailha/, `systemd-analyze verify complains about mailha's units:\n${verify.stdout}${verify.stderr}`);
  });

  test("the witness unit runs sandboxed as the mailha user; the same package again leaves it running", async () => {
    const w = await p.ssh("cat > /etc/mailha/mailha.yaml && chgrp mailha /etc/mailha/mailha.yaml && chmod 640 /etc/mailha/mailha.yaml", { input: witnessConfig(p.address) });
    assert.equal(w.code, 0, w.stderr);
    await must(p, "mailha secret generate --config /etc/mailha/mailha.yaml && chown mailha:mailha /etc/mailha/heartbeat.key /etc/mailha/replication.secret");
    await must(p, "systemctl start mailha-witness");
    const up = await p.ssh(`for i in $(seq 1 100); do ss -Hlun 'sport = :${WITNESS_PORT}' | grep -q ${WITNESS_PORT} && exit 0; sleep 0.1; done; exit 1`);
    const journal = await p.ssh("journalctl -u mailha-witness --no-pager -n 30");
    assert.equal(up.code, 0, `the witness should listen on UDP ${WITNESS_PORT}; its journal:\n${journal.stdout}`);
    assert.match(journal.stdout, /"type":"listening"/, "the witness logs to the journal");
    // Restart=on-failure: a witness killed is back within RestartSec (its ready file,
    // bind-mounted into the sandbox, is reused, not replaced).
    const killed = (await must(p, "systemctl show -p MainPID --value mailha-witness")).trim();
    await must(p, "systemctl kill -s KILL mailha-witness");
    const back = await p.ssh(`for i in $(seq 1 100); do p=$(systemctl show -p MainPID --value mailha-witness); [ "$p" != 0 ] && [ "$p" != ${killed} ] && ss -Hlun 'sport = :${WITNESS_PORT}' | grep -q ${WITNESS_PORT} && exit 0; sleep 0.1; done; exit 1`);
    assert.equal(back.code, 0, `a killed witness should be restarted by systemd:\n${(await p.ssh("journalctl -u mailha-witness --no-pager -n 20")).stdout}`);
    const pid = (await must(p, "systemctl show -p MainPID --value mailha-witness")).trim();
    assert.match(await must(p, `ps -o user= -p ${pid}`), /^mailha\s*$/);
    assert.equal((await must(p, "stat -c '%U' /var/lib/mailha/run/witness.ready /var/lib/mailha/run")).trim(), "mailha\nroot", "the witness may write its ready file, not the node's run folder");
    assert.notEqual((await must(p, "cat /var/lib/mailha/run/witness.ready")).trim(), "", "the witness writes its pid into the ready file");

    const sec = await p.ssh("systemd-analyze security --no-pager mailha-witness.service mailha-node.service");
    say(`systemd-analyze security: ${sec.stdout.trim().split("\n").filter((l) => /mailha-(node|witness)\.service/.test(l)).join(" | ").replace(/\s+/g, " ")}`);

    const again = await must(p, `dpkg -i ${debOnP}`, 120_000);
    assert.match(again, /mailha-witness\.service still runs the version before 0\.1\.0\S* -> this upgrade; not restarted/);
    assert.equal((await p.ssh("systemctl is-active mailha-witness")).stdout.trim(), "active", "an upgrade must leave a running unit running");
    assert.equal((await must(p, "systemctl show -p MainPID --value mailha-witness")).trim(), pid, "an upgrade must not restart a running unit");
    assert.equal((await p.ssh("systemctl is-enabled mailha-node")).stdout.trim(), "disabled");
  });

  test("the node unit runs node a (found by its address, then named in /etc/mailha/node.env) under its options: volume, file system, services; the same package again leaves it running", async () => {
    // The node runs as root: its secret files are root's (the running witness read them as mailha's).
    await must(p, "chown root:root /etc/mailha/heartbeat.key /etc/mailha/replication.secret");
    // The container may not change its own addresses (no CAP_NET_ADMIN): the host adds
    // node a's to the machine's network namespace.
    for (const addr of [NODE_A_SERVICE, NODE_A_REPLICATION]) await run("ip", ["-n", p.netns, "addr", "add", `${addr}/32`, "dev", "eth0"]);
    await must(p, "mailha volume create --config /etc/mailha/mailha.yaml --node a --primary", 120_000);
    // First with MAILHA_NODE empty: the node is found by its local address.
    await must(p, "echo MAILHA_NODE= > /etc/mailha/node.env && systemctl start mailha-node");
    const t = Date.now();
    let view = "";
    for (let i = 0; i < ACTIVE_WAIT_S; i++) {
      const r = await p.ssh("mailha status --config /etc/mailha/mailha.yaml --node a --json");
      view = r.stdout + r.stderr;
      if (/"state":\s*"(failed|stop-failed)"/.test(view)) break;
      if (/"state":\s*"active"/.test(view) && !/"(starting|stopped|failed)"/.test(JSON.stringify(JSON.parse(r.stdout || "{}").nodes?.[0]?.resources ?? {}))) break;
      await new Promise((res) => setTimeout(res, 1000));
    }
    const journal = (await p.ssh("journalctl -u mailha-node --no-pager -n 40 -o cat")).stdout.trim();
    const unit = (await p.ssh("systemctl show -p ActiveState,SubState,Result,ExecMainStatus,NRestarts mailha-node")).stdout.trim().replace(/\n/g, " ");
    say(`timing: node a active with its resources ${((Date.now() - t) / 1000).toFixed(1)} s after systemctl start (${unit})`);
    assert.match(view, /"state":\s*"active"/, `node a should become active under mailha-node.service; mailha status:\n${view}\njournal:\n${journal}`);
    const res = JSON.parse(view).nodes[0].resources as Record<string, string>;
    say(`resources: ${JSON.stringify(res)}`);
    assert.ok(Object.values(res).every((x) => x === "running"), `every resource should run: ${JSON.stringify(res)}\njournal:\n${journal}`);
    // The node's mounts are the host's (no mount namespace): the operator's shell sees them.
    assert.match(await must(p, "findmnt -n -o FSTYPE /var/lib/mailha/data"), /ext4/);
    assert.match(await must(p, "ps -o user= -C mariadbd; ps -o user= -C redis-server"), /mysql[\s\S]*redis/);
    assert.match(await must(p, `exec 3<>/dev/tcp/${NODE_A_SERVICE}/143 && head -c 4 <&3`), /\* OK/);
    const pid = (await must(p, "systemctl show -p MainPID --value mailha-node")).trim();
    assert.match(await must(p, `ps -o args= -p ${pid}`), /launcher\.mjs node run --config \/etc\/mailha\/mailha\.yaml --node\s*$/);

    const again = await must(p, `dpkg -i ${debOnP}`, 120_000);
    assert.match(again, /mailha-node\.service still runs the version before/);
    assert.equal((await must(p, "systemctl show -p MainPID --value mailha-node")).trim(), pid, "an upgrade must not restart a running node");
    assert.equal((await p.ssh("systemctl is-active mailha-node")).stdout.trim(), "active");

    // The node daemon killed (a crash): systemd starts it again after RestartSec; the
    // rest of the unit stays up (KillMode=process), and the new daemon kills the services
    // left over, takes the running volume engine back and is active again.
    const dbBefore = (await must(p, "pgrep -x mariadbd")).trim();
    const tCrash = Date.now();
    await must(p, "echo MAILHA_NODE=a > /etc/mailha/node.env && systemctl kill -s KILL --kill-who=main mailha-node");
    let again2 = "";
    for (let i = 0; i < ACTIVE_WAIT_S; i++) {
      await new Promise((res) => setTimeout(res, 1000));
      const r = await p.ssh("systemctl show -p NRestarts --value mailha-node; mailha status --config /etc/mailha/mailha.yaml --node a --json");
      again2 = r.stdout;
      if (/^[1-9]/.test(again2) && /"state":\s*"active"/.test(again2) && /"smtp":\s*"running"/.test(again2)) break;
    }
    const crashJournal = (await p.ssh("journalctl -u mailha-node --no-pager -n 60 -o cat | grep -v '^{' | tail -12")).stdout.trim();
    say(`timing: node a active again ${((Date.now() - tCrash) / 1000).toFixed(1)} s after its daemon was killed (RestartSec 5 s); systemd said: ${crashJournal.split("\n").filter((l) => /mailha-node\.service|Started|Stopped/.test(l)).join(" | ")}`);
    assert.match(again2, /^[1-9]/, "systemd should have restarted the killed node daemon");
    assert.match(again2, /"state":\s*"active"/, `node a should be active again after its daemon was killed:\n${again2}\n${crashJournal}`);
    assert.notEqual((await must(p, "pgrep -x mariadbd")).trim(), dbBefore, "the MariaDB left over by the killed daemon should have been replaced by a new one");
    assert.match(await must(p, "findmnt -n -o FSTYPE /var/lib/mailha/data"), /ext4/);
    const restarted = (await must(p, "systemctl show -p MainPID --value mailha-node")).trim();
    assert.match(await must(p, `ps -o args= -p ${restarted}`), /--node a\s*$/, "the restart reads /etc/mailha/node.env again");

    const tStop = Date.now();
    await must(p, "systemctl stop mailha-node", 330_000);
    say(`timing: systemctl stop mailha-node (the group stopped in order) ${((Date.now() - tStop) / 1000).toFixed(1)} s`);
    assert.equal((await p.ssh("findmnt -R /var/lib/mailha")).stdout.trim(), "", "the node's stop should unmount everything under /var/lib/mailha");
    assert.equal((await p.ssh("pgrep -x mariadbd || pgrep -x redis-server || pgrep -x dovecot")).stdout.trim(), "", "no service may outlive the node's unit");
    const left = (await p.ssh("cg=$(systemctl show -p ControlGroup --value mailha-node); [ -n \"$cg\" ] && cat /sys/fs/cgroup/unified$cg/cgroup.procs /sys/fs/cgroup$cg/cgroup.procs 2>/dev/null | sort -u | xargs -r ps -o pid=,args= -p")).stdout.trim();
    const strays = (await p.ssh("pgrep -a -x auth; pgrep -af /usr/lib/mailha | grep -v ' witness run '")).stdout.trim();
    assert.equal(left + strays, "", `after systemctl stop (KillMode=process) these processes of the unit are left, from the daemon killed before:\n${left}\n${strays}`);
    await must(p, "rm /etc/mailha/node.env");
  });

  test("dpkg -r stops and removes the units, keeps /etc/mailha and /var/lib/mailha", async () => {
    await must(p, "mkdir -p /var/lib/mailha/data && echo 'a message' > /var/lib/mailha/data/mail-marker");
    const out = await must(p, "dpkg -r mailha", 120_000);
    assert.match(out, /stopping mailha-witness\.service/);
    for (const u of UNITS) assert.equal((await p.ssh(`test -e /lib/systemd/system/${u}`)).code, 1, `${u} should be gone`);
    assert.equal((await p.ssh("pgrep -u mailha")).code, 1, "no process of the mailha user may be left");
    assert.equal((await p.ssh("test -e /usr/bin/mailha || test -e /usr/lib/mailha")).code, 1, "the program should be gone");
    await must(p, "test -f /etc/mailha/mailha.yaml && test -f /etc/mailha/heartbeat.key && test -f /var/lib/mailha/data/mail-marker");
    await must(p, "getent passwd mailha");
  });

  test("dpkg --purge keeps a node's data (and the operator's config) with a message, removes the user", async () => {
    const out = await must(p, "dpkg --purge mailha", 120_000);
    assert.match(out, /kept \/var\/lib\/mailha: it holds a node's state/);
    assert.match(out, /kept \/etc\/mailha: it holds files the package did not make/);
    assert.equal((await must(p, "cat /var/lib/mailha/data/mail-marker")).trim(), "a message", "a purge must never delete mail");
    assert.equal((await p.ssh("getent passwd mailha")).code, 2, "the mailha user should be gone");
    assert.equal((await p.ssh("getent group mailha")).code, 2, "the mailha group should be gone");
  });

  test("installed again after the purge, then purged with nothing of the operator's left: nothing remains", async () => {
    await must(p, `dpkg -i ${debOnP}`, 120_000);
    assert.match(await must(p, "mailha --help"), /Usage: mailha/);
    await must(p, "getent passwd mailha");
    await must(p, "rm -rf /var/lib/mailha/* /etc/mailha/*");
    const out = await must(p, "dpkg --purge mailha", 120_000);
    assert.doesNotMatch(out, /kept/);
    assert.equal((await p.ssh("test -e /etc/mailha || test -e /var/lib/mailha || test -e /usr/lib/mailha")).code, 1, "a clean purge leaves no mailha folder");
    assert.equal((await p.ssh("getent passwd mailha")).code, 2);
    assert.equal((await p.ssh("dpkg-query -W -f='${Status}' mailha")).stdout.includes("installed"), false);
    assert.equal((await p.ssh("ls /etc/systemd/system/*/mailha-node.service /etc/systemd/system/*/mailha-witness.service 2>/dev/null")).stdout.trim(), "", "no enablement link may remain");
  });
});
