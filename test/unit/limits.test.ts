// The SMTP listeners' per-address and per-session limits, as a client meets them:
// connections from one address beyond the bound get 421 at the greeting (the peer's
// address is exempt), a freed slot is taken again, and MAIL FROM beyond the session's
// bound gets 452; every refusal is counted. Also the stats files the node daemon reads.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { SMTPServerSession } from "smtp-server";
import { nodePaths } from "../../common/paths.ts";
import { ListenerGuard } from "../../services/smtp/limits.ts";
import { prepareStatsDir, publishStats, readStats, statsDir } from "../../services/stats.ts";

const session = (addr: string) => ({ remoteAddress: addr }) as unknown as SMTPServerSession;
const connect = (g: ListenerGuard, s: SMTPServerSession) => new Promise<Error | null | undefined>((r) => g.onConnect(s, (e) => r(e)));

test("per address: the bound, then 421; a close frees a slot; the peer is exempt", async () => {
  const g = new ListenerGuard({ perAddressMax: 2, messagesPerSessionMax: 3, exempt: ["10.0.0.2"] });
  const a1 = session("::ffff:192.0.2.1");
  const a2 = session("192.0.2.1");
  assert.equal(await connect(g, a1), undefined);
  assert.equal(await connect(g, a2), undefined, "the IPv4-mapped form is the same address");
  const a3 = session("192.0.2.1");
  const e = await connect(g, a3);
  assert.match(String((e as Error & { responseCode?: number })?.message), /4\.7\.0 Too many connections from your address \(at most 2\)/);
  assert.equal((e as Error & { responseCode?: number }).responseCode, 421);
  g.onClose(a3); // a refused one was never counted
  assert.equal(g.counters.open, 2);
  assert.equal(await connect(g, session("192.0.2.9")), undefined, "another address is not affected");
  g.onClose(a1);
  assert.equal(await connect(g, session("192.0.2.1")), undefined, "a freed slot is taken again");
  for (let i = 0; i < 10; i++) assert.equal(await connect(g, session("10.0.0.2")), undefined, "the peer's backup MX forwards many at once");
  assert.equal(g.counters.per_address_refused, 1);
});

test("per session: MAIL FROM beyond the bound gets 452 4.5.3, counted; another session is not affected", () => {
  const g = new ListenerGuard({ perAddressMax: 10, messagesPerSessionMax: 3 });
  const s = session("192.0.2.1");
  for (let i = 0; i < 3; i++) assert.equal(g.mailFromError(s), null);
  const e = g.mailFromError(s) as Error & { responseCode: number };
  assert.equal(e.responseCode, 452);
  assert.match(e.message, /4\.5\.3 Too many messages in one session \(at most 3\)/);
  assert.equal(g.mailFromError(session("192.0.2.1")), null);
  assert.equal(g.counters.messages_refused, 1);
});

test("stats files: what a service publishes is what the node daemon reads; junk is left out", () => {
  const dir = mkdtempSync(join(tmpdir(), "mailha-stats-"));
  try {
    const paths = nodePaths(dir);
    prepareStatsDir(paths);
    const stop = publishStats(paths, "smtp", () => ({ open: 3, per_address_refused: 1 }));
    stop();
    writeFileSync(join(statsDir(paths), "broken.json"), "{not json");
    writeFileSync(join(statsDir(paths), "odd.json"), JSON.stringify({ ok: 1, "Bad Key": 2, text: "x", inf: null }));
    assert.deepEqual(readStats(paths), { smtp: { open: 3, per_address_refused: 1 }, odd: { ok: 1 } });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
