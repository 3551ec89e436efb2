// The DNS lease: a tie-breaker for two nodes at two hosters with no third server. The
// lease is one TXT record, `_mailha-lease.<zone>`, holding "node=<id> epoch=<n>
// expires=<unix ms>". Taking or renewing it is an RFC 2136 update whose prerequisite
// is the exact current value (or its absence): compare-and-set, so when two nodes race
// the server lets exactly one through. Expiry is wall-clock time, so the nodes need
// synchronised clocks (NTP); a node counts its lease from before it asked.
// The lease is won only on a NOERROR the server signed with our TSIG key over our
// request (RFC 8945; BIND9 signs its answers to signed requests), within the fudge: an
// unsigned or forged answer is dropped while the client waits for the server's own,
// and without it the lease is not held. Known gap: the read of the current record is
// an unsigned query, so a forged read can make a node believe the lease is taken (it
// then does not take over: the safe side) or make its compare-and-set fail.
import { readFileSync } from "node:fs";
import { dnsUpdates, type MailhaConfig } from "../common/config.ts";
import { query } from "./query.ts";
import { parseTsigKeyFile } from "./tsig-key.ts";
import { sendUpdate, type Prereq, type UpdateOptions } from "./update.ts";

export interface LeaseValue {
  readonly node: string;
  readonly epoch: number;
  readonly expiresMs: number;
}

export const leaseName = (c: MailhaConfig) => `_mailha-lease.${c.dns.zone}`;

export function formatLease(v: LeaseValue): string {
  return `node=${v.node} epoch=${v.epoch} expires=${v.expiresMs}`;
}

export function parseLease(text: string): LeaseValue | null {
  const m = /^node=([a-z0-9]+) epoch=(\d+) expires=(\d+)$/.exec(text.trim());
  return m ? { node: m[1]!, epoch: Number(m[2]), expiresMs: Number(m[3]) } : null;
}

/** The current lease record (raw text and parsed), or null. */
export async function readLease(c: MailhaConfig): Promise<{ raw: string; value: LeaseValue | null } | null> {
  const u = dnsUpdates(c);
  const a = await query(u.server, u.port, leaseName(c), "TXT");
  const txt = a.answers.filter((x) => x.type === "TXT").map((x) => [(x as { data: unknown }).data].flat().map(String).join(""));
  if (!txt.length) return null;
  return { raw: txt[0]!, value: parseLease(txt[0]!) };
}

export interface TakeResult {
  readonly won: boolean;
  readonly holder: string | null;
  readonly expiresMs: number;
  readonly reason: string;
}

/** Takes (or renews) the lease for NODE for LEASEMS; exactly one of two racing nodes wins. */
export async function takeLease(c: MailhaConfig, node: string, leaseMs: number, now = Date.now(), opts: Pick<UpdateOptions, "timeoutMs" | "tries"> = {}): Promise<TakeResult> {
  const key = parseTsigKeyFile(readFileSync(dnsUpdates(c).tsig_key_file, "utf8"));
  const cur = await readLease(c);
  if (cur?.value && cur.value.node !== node && cur.value.expiresMs > now) return { won: false, holder: cur.value.node, expiresMs: cur.value.expiresMs, reason: `held by ${cur.value.node}` };
  const next: LeaseValue = { node, epoch: (cur?.value?.epoch ?? 0) + 1, expiresMs: now + leaseMs };
  const name = leaseName(c);
  const pre: Prereq[] = cur ? [{ pre: "rrset-exists-value", name, type: "TXT", data: cur.raw }] : [{ pre: "rrset-absent", name, type: "TXT" }];
  const r = await sendUpdate(dnsUpdates(c).server, c.dns.port, c.dns.zone, pre, [{ op: "delete-rrset", name, type: "TXT" }, { op: "add", name, type: "TXT", ttl: 1, data: formatLease(next) }], key, { ...opts, requireSignedAnswer: true });
  if (r.rcode === "NOERROR" && r.answerSigned !== true) return { won: false, holder: null, expiresMs: 0, reason: `the server's answer is not signed with our key${r.signatureProblem ? ` (${r.signatureProblem})` : ""}: the lease is not held` };
  if (r.rcode === "NOERROR") return { won: true, holder: node, expiresMs: next.expiresMs, reason: "taken" };
  if (r.rcode === "NXRRSET" || r.rcode === "YXRRSET") return { won: false, holder: null, expiresMs: 0, reason: "another node changed the lease first" };
  throw new Error(`lease update refused: ${r.rcode}${r.tsigError ? ` (${r.tsigError})` : ""}`);
}
