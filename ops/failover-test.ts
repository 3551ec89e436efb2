// The client failover test: real clients (nodemailer over SMTP to the MX hosts in
// preference order, imapflow sessions that reconnect with a bounded backoff) run
// against the cluster while a fault is injected; then it counts what the users would:
// messages acknowledged with 250 and found afterwards by their unique id (none may be
// lost), duplicates, UIDVALIDITY and the UIDs of older messages (which must not
// change), the outage each protocol saw, and detection and takeover from the cluster
// event logs.
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import nodemailer from "nodemailer";
import { ImapFlow } from "imapflow";
import type { MailhaConfig } from "../common/config.ts";
import { sleep } from "../common/exec.ts";
import { clusterEventLog } from "../cluster/node.ts";
import { nodeStatus } from "../cluster/client.ts";
import { labFault, type Fault } from "./lab/faults.ts";

export interface TrialOptions {
  readonly config: MailhaConfig;
  readonly configFile: string;
  readonly user: string;
  readonly password: string;
  readonly fault: "kill-node" | "switchover" | "freeze-node" | "cut-replication" | "none";
  readonly faultAfterMs: number;
  readonly durationMs: number;
  readonly sendEveryMs: number;
  readonly progress?: (line: string) => void;
}

interface Op {
  readonly at: number;
  readonly ok: boolean;
}

export interface TrialResult {
  readonly fault: string;
  readonly target: string | null;
  readonly faultAt: string | null;
  readonly detectionMs: number | null;
  readonly takeoverMs: number | null;
  readonly smtp: { sent: number; acked: number; found: number; lost: string[]; duplicated: string[]; outageMs: number };
  readonly imap: { ops: number; failures: number; outageMs: number };
  readonly uidValidityStable: boolean;
  readonly oldUidsStable: boolean;
  readonly ok: boolean;
}

/** The longest stretch from a failed operation to the next successful one. */
function outage(ops: readonly Op[]): number {
  let worst = 0;
  let firstFail: number | null = null;
  for (const o of [...ops].sort((a, b) => a.at - b.at)) {
    if (!o.ok) firstFail ??= o.at;
    else if (firstFail !== null) {
      worst = Math.max(worst, o.at - firstFail);
      firstFail = null;
    }
  }
  return worst;
}

async function activeNode(c: MailhaConfig): Promise<string | null> {
  for (const n of c.nodes) if ((await nodeStatus(c, n.id, 1000).catch(() => null))?.state === "active") return n.id;
  return null;
}

async function imapSnapshot(hosts: string[], user: string, pass: string): Promise<{ uidValidity: bigint; uids: number[]; ids: string[] }> {
  for (const host of hosts) {
    const c = new ImapFlow({ host, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user, pass }, logger: false, connectionTimeout: 3000, greetingTimeout: 3000 });
    try {
      await c.connect();
      const box = await c.mailboxOpen("INBOX");
      const uids: number[] = [];
      const ids: string[] = [];
      if (box.exists > 0) {
        for await (const m of c.fetch("1:*", { uid: true, headers: ["x-mailha-test-id"] })) {
          uids.push(m.uid);
          const id = /x-mailha-test-id:\s*(\S+)/i.exec(m.headers?.toString() ?? "")?.[1];
          if (id) ids.push(id);
        }
      }
      await c.logout();
      return { uidValidity: box.uidValidity, uids, ids };
    } catch {
      await c.logout().catch(() => {});
    }
  }
  throw new Error(`no IMAP server answered on ${hosts.join(", ")}`);
}

export async function runTrial(o: TrialOptions): Promise<TrialResult> {
  const c = o.config;
  const say = o.progress ?? (() => {});
  const mxHosts = [...c.mail.mx].sort((a, b) => a.preference - b.preference).map((m) => c.nodes.find((n) => n.id === m.node)!.service_address);
  const hostAddrs = c.nodes.map((n) => n.service_address);
  const before = await imapSnapshot(hostAddrs, o.user, o.password);
  const run = randomBytes(4).toString("hex");
  const sent: string[] = [];
  const acked: string[] = [];
  const smtpOps: Op[] = [];
  const imapOps: Op[] = [];
  let stop = false;

  const sender = (async () => {
    let n = 0;
    while (!stop) {
      const id = `${run}-${++n}`;
      sent.push(id);
      let ok = false;
      for (const host of mxHosts) {
        const tx = nodemailer.createTransport({ host, port: 25, secure: false, tls: { rejectUnauthorized: false }, connectionTimeout: 2000, greetingTimeout: 2000, socketTimeout: 5000 });
        try {
          await tx.sendMail({ from: "failover-test@example.net", to: o.user, subject: `failover test ${id}`, text: `id ${id}\n`, headers: { "X-Mailha-Test-Id": id } });
          ok = true;
          break;
        } catch {
          // next MX, as RFC 5321 asks
        } finally {
          tx.close();
        }
      }
      smtpOps.push({ at: Date.now(), ok });
      if (ok) acked.push(id);
      await sleep(o.sendEveryMs);
    }
  })();

  const reader = (async () => {
    let backoff = 100;
    while (!stop) {
      let connected = false;
      for (const host of hostAddrs) {
        const cl = new ImapFlow({ host, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: o.user, pass: o.password }, logger: false, connectionTimeout: 2000, greetingTimeout: 2000 });
        cl.on("error", () => {});
        try {
          await cl.connect();
          connected = true;
          backoff = 100;
          while (!stop) {
            await cl.status("INBOX", { messages: true });
            imapOps.push({ at: Date.now(), ok: true });
            await sleep(300);
          }
          await cl.logout().catch(() => {});
        } catch {
          imapOps.push({ at: Date.now(), ok: false });
          await cl.logout().catch(() => {});
        }
        if (stop) break;
      }
      if (!connected) {
        await sleep(backoff);
        backoff = Math.min(2000, backoff * 2);
      }
    }
  })();

  await sleep(o.faultAfterMs);
  const target = await activeNode(c);
  let faultAt: string | null = null;
  if (o.fault !== "none" && target) {
    say(`injecting ${o.fault} on node ${target}`);
    const f: [Fault, string[]] =
      o.fault === "kill-node" ? ["kill-node", [target]] : o.fault === "freeze-node" ? ["freeze-node", [target]] : o.fault === "cut-replication" ? ["cut-link", [target, "replication"]] : ["heal", []];
    if (o.fault === "switchover") {
      faultAt = new Date().toISOString();
      const { nodeCommand } = await import("../cluster/client.ts");
      await nodeCommand(c, target, "switchover").catch(() => null);
    } else faultAt = (await labFault(o.configFile, f[0], f[1])).at as string;
  }
  await sleep(Math.max(0, o.durationMs - o.faultAfterMs));
  stop = true;
  await Promise.all([sender, reader]);

  // Recovery: heal links, thaw, and bring back any node that is down (killed by the
  // fault, or fenced by its peer, which may happen after any fault), then let the
  // volume resync.
  if (o.fault !== "none") await labFault(o.configFile, "heal", []);
  for (const n of c.nodes) {
    const down = (await nodeStatus(c, n.id, 1500).catch(() => null)) === null;
    if (down) {
      say(`node ${n.id} is down: booting it`);
      await labFault(o.configFile, "boot-node", [n.id]).catch((err: Error) => say(`boot-node ${n.id}: ${err.message}`));
    }
  }
  say("waiting for the cluster to be healthy again");
  for (let i = 0; i < 300; i++) {
    const st = await Promise.all(c.nodes.map((n) => nodeStatus(c, n.id, 1000).catch(() => null)));
    if (st.every((s) => s && s.volume?.connection === "connected" && s.volume.disk === "uptodate") && st.some((s) => s?.state === "active")) break;
    await sleep(500);
  }
  await sleep(3000); // backup-MX spools drain
  const after = await imapSnapshot(hostAddrs, o.user, o.password);
  const counts = new Map<string, number>();
  for (const id of after.ids) counts.set(id, (counts.get(id) ?? 0) + 1);
  const lost = acked.filter((id) => !counts.has(id));
  const duplicated = [...counts].filter(([id, k]) => id.startsWith(run) && k > 1).map(([id]) => id);
  const found = acked.filter((id) => counts.has(id)).length;

  let detectionMs: number | null = null;
  let takeoverMs: number | null = null;
  if (faultAt && target) {
    const survivor = c.nodes.find((n) => n.id !== target)!.id;
    const f = clusterEventLog(c, survivor);
    const evs = existsSync(f) ? readFileSync(f, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as { time: string; type: string; state?: string }) : [];
    const dead = evs.find((e) => e.time >= faultAt! && e.type === "peer" && e.state === "dead");
    const act = evs.find((e) => e.time >= faultAt! && e.type === "state" && e.state === "active");
    if (dead) detectionMs = new Date(dead.time).getTime() - new Date(faultAt).getTime();
    if (act) takeoverMs = new Date(act.time).getTime() - new Date(faultAt).getTime();
  }
  const oldStable = before.uids.every((u) => after.uids.includes(u));
  const result: TrialResult = {
    fault: o.fault,
    target,
    faultAt,
    detectionMs,
    takeoverMs,
    smtp: { sent: sent.length, acked: acked.length, found, lost, duplicated, outageMs: outage(smtpOps) },
    imap: { ops: imapOps.length, failures: imapOps.filter((x) => !x.ok).length, outageMs: outage(imapOps) },
    uidValidityStable: before.uidValidity === after.uidValidity,
    oldUidsStable: oldStable,
    ok: lost.length === 0 && before.uidValidity === after.uidValidity && oldStable,
  };
  return result;
}
