// `mailha dns render` and `mailha dns apply`.
import { Command, Option } from "commander";
import { loadConfig } from "../../common/config.ts";
import { EXIT_FAILURE } from "../../common/errors.ts";
import { applyDns, renderDns } from "../../dns/apply.ts";
import { checkDns } from "../../dns/check.ts";
import { createOutput } from "./output.ts";

export function dnsCommand(defaultConfig: string): Command {
  const dns = new Command("dns").description("the cluster's DNS records: MX priorities, A records, the mail host with every live node");
  const common = (c: Command) =>
    c
      .addOption(new Option("-c, --config <file>", "cluster configuration file").default(defaultConfig))
      .option("--live <ids>", "only these nodes' addresses on the mail host (comma-separated); default: all")
      .addOption(new Option("--json", "print the result as JSON"));
  common(dns.command("render").description("print the records as a zone-file fragment and as nsupdate input")).action((o: { config: string; live?: string; json?: boolean }) => {
    const r = renderDns(loadConfig(o.config, { checkSecrets: false }), o.live?.split(","));
    createOutput(!!o.json).result(r, () => `; zone file fragment for ${loadConfig(o.config, { checkSecrets: false }).dns.zone}\n${r.zoneFragment}\n; nsupdate input (nsupdate -k TSIG-KEY-FILE < this)\n${r.nsupdate}`);
  });
  common(dns.command("apply").description("replace the records on the DNS server with one TSIG-signed RFC 2136 update, then read them back")).action(
    async (o: { config: string; live?: string; json?: boolean }) => {
      const r = await applyDns(loadConfig(o.config), o.live?.split(","));
      createOutput(!!o.json).result(r, () =>
        r.rcode !== "NOERROR"
          ? `the server refused the update: ${r.rcode}${r.tsigError ? ` (${r.tsigError})` : ""}`
          : r.verified
            ? `applied and verified: ${r.records.length} record(s)`
            : `applied, but the server answers differently:\n  ${r.mismatches.join("\n  ")}`,
      );
      if (r.rcode !== "NOERROR" || !r.verified) process.exitCode = EXIT_FAILURE;
    },
  );
  common(dns.command("check").description("compare the authoritative server and a resolver with what the cluster needs; SPF and PTR advice; exit 1 on a wrong record"))
    .option("--resolver <ip>", "the resolver to ask (default: the system's)")
    .action(async (o: { config: string; live?: string; json?: boolean; resolver?: string }) => {
      const checks = await checkDns(loadConfig(o.config, { checkSecrets: false }), { live: o.live?.split(","), resolver: o.resolver });
      createOutput(!!o.json).result(checks, () => checks.map((x) => `${x.status.toUpperCase().padEnd(4)} ${x.check}: ${x.detail}`).join("\n"));
      if (checks.some((x) => x.status === "fail")) process.exitCode = EXIT_FAILURE;
    });
  return dns;
}
