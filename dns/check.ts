// `mailha dns check`: compares what the authoritative server and a resolver answer
// with what the cluster needs (MX, A records, the mail host), and gives SPF and PTR
// advice, saying what to fix, in the spirit of Mail-in-a-Box's status checks.
import { Resolver } from "node:dns/promises";
import type { MailhaConfig } from "../common/config.ts";
import { query } from "./query.ts";
import { clusterRecords } from "./zone.ts";

export interface Check {
  readonly check: string;
  readonly status: "ok" | "warn" | "fail";
  readonly detail: string;
}

function norm(type: string, d: string): string {
  return (type === "MX" ? d.replace(/\.$/, "") : d).toLowerCase();
}

export async function checkDns(c: MailhaConfig, opts: { live?: readonly string[]; resolver?: string } = {}): Promise<Check[]> {
  const out: Check[] = [];
  const want = new Map<string, string[]>();
  for (const r of clusterRecords(c, opts.live)) {
    const k = `${r.name} ${r.type}`;
    want.set(k, [...(want.get(k) ?? []), norm(r.type, r.data)]);
  }
  const resolver = new Resolver({ timeout: 2000, tries: 1 });
  if (opts.resolver) resolver.setServers([opts.resolver]);
  for (const [k, expected] of want) {
    const [name, type] = k.split(" ") as [string, "A" | "AAAA" | "MX"];
    const exp = [...expected].sort();
    // Records managed by hand may have no server named: then the resolver's answer is all there is.
    const server = c.dns.server;
    if (server) {
      try {
        const a = await query(server, c.dns.port, name, type);
        const got = a.answers
          .filter((x) => x.type === type)
          .map((x) => norm(type, x.type === "MX" ? `${x.data.preference} ${x.data.exchange}` : String((x as { data: unknown }).data)))
          .sort();
        const same = JSON.stringify(got) === JSON.stringify(exp);
        out.push({ check: `authoritative ${name} ${type}`, status: same ? "ok" : "fail", detail: same ? got.join(", ") : `expected ${exp.join(", ")}, ${server} answers ${got.join(", ") || "nothing"}: ${c.dns.updates ? "run mailha dns apply (or paste mailha dns render)" : "put mailha dns render's records into the zone"}` });
      } catch (err) {
        out.push({ check: `authoritative ${name} ${type}`, status: "fail", detail: `${server} does not answer: ${(err as Error).message}` });
      }
    }
    try {
      const got =
        type === "MX"
          ? (await resolver.resolveMx(name)).map((m) => norm("MX", `${m.priority} ${m.exchange}`)).sort()
          : (type === "A" ? await resolver.resolve4(name) : await resolver.resolve6(name)).map((x) => x.toLowerCase()).sort();
      const same = JSON.stringify(got) === JSON.stringify(exp);
      out.push({ check: `resolver ${name} ${type}`, status: same ? "ok" : "warn", detail: same ? got.join(", ") : `a resolver answers ${got.join(", ") || "nothing"} (cached or not yet propagated? the TTL is ${type === "MX" ? c.dns.ttl.mx_s : c.dns.ttl.mail_host_s} s)` });
    } catch (err) {
      out.push({ check: `resolver ${name} ${type}`, status: "warn", detail: `the resolver${opts.resolver ? ` ${opts.resolver}` : ""} gives no answer (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})` });
    }
  }
  const spfWant = `v=spf1 mx -all`;
  for (const d of c.mail.domains) {
    try {
      const txts = c.dns.server
        ? (await query(c.dns.server, c.dns.port, d, "TXT")).answers.filter((x) => x.type === "TXT").map((x) => [(x as { data: unknown }).data].flat().map((y) => String(y)).join(""))
        : (await resolver.resolveTxt(d)).map((parts) => parts.join(""));
      const spf = txts.find((t) => t.startsWith("v=spf1"));
      if (!spf) out.push({ check: `SPF ${d}`, status: "warn", detail: `no SPF record: add "${d}. TXT \\"${spfWant}\\"" so that both MX hosts may send for ${d}` });
      else if (!/\bmx\b/.test(spf) && !c.nodes.every((n) => spf.includes(n.service_address))) out.push({ check: `SPF ${d}`, status: "warn", detail: `"${spf}" names neither mx nor both nodes' addresses: mail sent from the passive node after a failover may be rejected` });
      else out.push({ check: `SPF ${d}`, status: "ok", detail: spf });
    } catch (err) {
      out.push({ check: `SPF ${d}`, status: "warn", detail: `cannot read TXT of ${d}: ${(err as Error).message}` });
    }
  }
  for (const n of c.nodes) {
    const mx = c.mail.mx.find((m) => m.node === n.id)?.name ?? c.mail.host;
    try {
      const names = (await resolver.reverse(n.service_address)).map((x) => x.toLowerCase().replace(/\.$/, ""));
      out.push(names.includes(mx) ? { check: `PTR ${n.service_address}`, status: "ok", detail: names.join(", ") } : { check: `PTR ${n.service_address}`, status: "warn", detail: `points to ${names.join(", ")}; ask the hoster of node ${n.id} to set it to ${mx}` });
    } catch {
      out.push({ check: `PTR ${n.service_address}`, status: "warn", detail: `no reverse DNS for node ${n.id}: ask its hoster to set ${n.service_address} -> ${mx} (many receivers reject mail without it)` });
    }
  }
  return out;
}
