// Putting the cluster's records into the zone: `mailha dns render` prints them (a zone
// file fragment and nsupdate input, for people who manage DNS by hand), and `mailha
// dns apply` replaces the managed RRsets in one signed RFC 2136 update (atomic on the
// server) and then reads them back to verify.
import { readFileSync } from "node:fs";
import { dnsUpdates, type MailhaConfig } from "../common/config.ts";
import { query } from "./query.ts";
import { parseTsigKeyFile } from "./tsig-key.ts";
import { sendUpdate, type Op, type RecordType } from "./update.ts";
import { clusterRecords, recordLine, type ZoneRecord } from "./zone.ts";

function rrsets(records: readonly ZoneRecord[]): Map<string, ZoneRecord[]> {
  const m = new Map<string, ZoneRecord[]>();
  for (const r of records) {
    const k = `${r.name} ${r.type}`;
    m.set(k, [...(m.get(k) ?? []), r]);
  }
  return m;
}

export function renderDns(c: MailhaConfig, live?: readonly string[]): { zoneFragment: string; nsupdate: string; records: ZoneRecord[] } {
  const records = clusterRecords(c, live);
  const nsupdate = [`server ${c.dns.server ?? "YOUR-DNS-SERVER"} ${c.dns.port}`, `zone ${c.dns.zone}`];
  for (const [key, rs] of rrsets(records)) {
    const [name, type] = key.split(" ");
    nsupdate.push(`update delete ${name}. ${type}`);
    for (const r of rs) nsupdate.push(`update add ${recordLine(r)}`);
  }
  nsupdate.push("send", "");
  return { zoneFragment: records.map(recordLine).join("\n") + "\n", nsupdate: nsupdate.join("\n"), records };
}

export interface ApplyResult {
  readonly rcode: string;
  readonly tsigError: string | null;
  readonly verified: boolean;
  readonly mismatches: string[];
  readonly records: ZoneRecord[];
}

function normalize(type: string, data: string): string {
  return type === "MX" ? data.replace(/\.$/, "").toLowerCase() : data.toLowerCase();
}

/** Replaces the managed RRsets with what the config (and the live nodes) say, then checks. */
export async function applyDns(c: MailhaConfig, live?: readonly string[]): Promise<ApplyResult> {
  const u = dnsUpdates(c);
  const key = parseTsigKeyFile(readFileSync(u.tsig_key_file, "utf8"));
  const records = clusterRecords(c, live);
  const ops: Op[] = [];
  const managed = rrsets(clusterRecords(c)); // every name we own, also those now empty
  for (const k of managed.keys()) {
    const [name, type] = k.split(" ") as [string, RecordType];
    ops.push({ op: "delete-rrset", name, type });
  }
  for (const r of records) ops.push({ op: "add", name: r.name, type: r.type as RecordType, ttl: r.ttl, data: r.data });
  const res = await sendUpdate(u.server, u.port, u.zone, [], ops, key);
  if (res.rcode !== "NOERROR") return { rcode: res.rcode, tsigError: res.tsigError, verified: false, mismatches: [], records };
  const mismatches: string[] = [];
  for (const [k, want] of managed) {
    const [name, type] = k.split(" ") as [string, RecordType];
    const expected = (rrsets(records).get(k) ?? want.slice(0, 0)).map((r) => normalize(type, r.data)).sort();
    const a = await query(u.server, u.port, name, type as "A");
    const got = a.answers
      .filter((x) => x.type === type)
      .map((x) => (x.type === "MX" ? `${x.data.preference} ${x.data.exchange}` : String((x as { data: unknown }).data)))
      .map((d) => normalize(type, d))
      .sort();
    if (JSON.stringify(got) !== JSON.stringify(expected)) mismatches.push(`${name} ${type}: expected ${expected.join(", ") || "nothing"}, the server answers ${got.join(", ") || "nothing"}`);
  }
  return { rcode: res.rcode, tsigError: res.tsigError, verified: mismatches.length === 0, mismatches, records };
}
