// How the failover test's clients find the servers, as real clients do: the MX hosts
// of the mail domain in preference order and the mail host's addresses, asked of a
// DNS server at every connection (so a node taken out of the mail host is seen at
// once). When DNS gives no answer, the addresses in the config stand in.
import { Resolver } from "node:dns/promises";
import type { MailhaConfig } from "../../common/config.ts";

const DNS_TIMEOUT_MS = 1000;

export interface Finder {
  /** Addresses of the MX hosts, lowest preference first. */
  mxAddresses(): Promise<string[]>;
  /** The mail host's addresses (IMAP and POP3 clients try each in turn); the nodes' when DNS has none. */
  mailHostAddresses(): Promise<string[]>;
}

export function finder(c: MailhaConfig, dnsServer: string | null): Finder {
  const r = new Resolver({ timeout: DNS_TIMEOUT_MS, tries: 1 });
  if (dnsServer) r.setServers([c.dns.port === 53 ? dnsServer : `${dnsServer}:${c.dns.port}`]);
  const byConfig = () => [...c.mail.mx].sort((a, b) => a.preference - b.preference).map((m) => c.nodes.find((n) => n.id === m.node)!.service_address);
  const nodes = c.nodes.map((n) => n.service_address);
  return {
    async mxAddresses() {
      try {
        const mx = (await r.resolveMx(c.mail.domains[0]!)).sort((a, b) => a.priority - b.priority);
        const out: string[] = [];
        for (const m of mx) out.push(...(await r.resolve4(m.exchange).catch(() => [] as string[])));
        if (out.length) return out;
      } catch {
        // no answer: the config's MX hosts
      }
      return byConfig();
    },
    async mailHostAddresses() {
      const fromDns = await r.resolve4(c.mail.host).catch(() => [] as string[]);
      return fromDns.length ? fromDns : nodes;
    },
  };
}
