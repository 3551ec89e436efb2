// The node's Prometheus page: what an operator's scraper reads. Every dropped packet or
// answer counter the daemon keeps (heartbeats, the peer channel, DNS answers, witness
// answers) is a labelled counter; every line parses as the text format.
import { test } from "node:test";
import assert from "node:assert/strict";
import { renderMetrics } from "../../cluster/node.ts";

const status = {
  node: "a",
  state: "active",
  peer: { node: "b", state: "up", summary: null },
  links: { service: "up", replication: "down" },
  quorum: true,
  resources: { volume: "running", smtp: "running" },
  heartbeats: { received: 10, accepted: 7, forged: 1, foreign: 0, replayed: 2, stale: 0 },
  volume: null,
  peerChannel: { refused: 3, malformed: 1, served: 40 },
  dnsAnswers: { updates: { received: 5, accepted: 4, forged: 1, foreign: 0, mismatched: 0, malformed: 0, unsigned: 0 }, queries: { received: 2, accepted: 2, foreign: 0, malformed: 0, mismatched: 0 } },
  witnessAnswers: { forged: 0, foreign: 2, unexpected: 1 },
  services: { smtp: { per_address_refused: 4, open: 3 }, proxy: { idle_cut: 1 } },
  limits: { smtp_clients_per_address_max: 20 },
  queues: { outbound_files: 7, journal_bytes: 1234 },
} as unknown as Parameters<typeof renderMetrics>[1];

test("the metrics page counts every kind of dropped packet and answer, in the text format", () => {
  const text = renderMetrics("a", status);
  const lines = text.trim().split("\n");
  for (const l of lines) assert.match(l, /^(# (HELP|TYPE) \w+ .+|\w+\{[^}]*\} -?\d+(\.\d+)?)$/, `not the text format: ${l}`);
  assert.ok(lines.includes('mailha_heartbeat_packets_total{node="a",verdict="forged"} 1'));
  assert.ok(lines.includes('mailha_peer_channel_requests_total{node="a",outcome="refused"} 3'));
  assert.ok(lines.includes('mailha_dns_update_answers_total{node="a",verdict="forged"} 1'));
  assert.ok(!lines.some((l) => l.startsWith("mailha_dns_update_answers_total") && l.includes('"received"')), "received is not a verdict");
  assert.ok(lines.includes('mailha_dns_query_answers_total{node="a",verdict="accepted"} 2'));
  assert.ok(lines.includes('mailha_witness_answers_dropped_total{node="a",reason="foreign"} 2'));
  assert.ok(lines.includes('mailha_node_active{node="a"} 1'));
  assert.ok(lines.includes('mailha_service_value{node="a",service="smtp",name="per_address_refused"} 4'));
  assert.ok(lines.includes('mailha_service_value{node="a",service="proxy",name="idle_cut"} 1'));
  assert.ok(lines.includes('mailha_limit{node="a",limit="smtp_clients_per_address_max"} 20'));
  assert.ok(lines.includes('mailha_queue_size{node="a",queue="outbound_files"} 7'));
  assert.ok(lines.includes('mailha_link_up{node="a",link="replication"} 0'));
});
