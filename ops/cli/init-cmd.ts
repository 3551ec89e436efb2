// `mailha init`: writes a commented mailha.yaml for two real servers from flags, or
// from questions on a terminal for what the flags leave out, creates its secret files
// (0600, never overwriting), and proves the result with the same check as `mailha
// config check`. It never overwrites a config file without --force.
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { dirname, isAbsolute, relative, resolve } from "node:path";
import { createInterface } from "node:readline/promises";
import { Command, Option } from "commander";
import { loadConfig } from "../../common/config.ts";
import { UsageError } from "../../common/errors.ts";
import { checkAnswers, renderInitConfig, type InitAnswers, type InitNode } from "../init.ts";
import { generateSecrets } from "../secrets.ts";
import { createOutput, table } from "./output.ts";

interface InitFlags {
  output: string;
  cluster?: string;
  node?: string[];
  domain?: string[];
  host?: string;
  dnsServer?: string;
  dnsManual?: boolean;
  zone?: string;
  witness?: string;
  dnsLease?: boolean;
  noTieBreaker?: boolean;
  secretsDir: string;
  stateDir: string;
  volumeSize: string;
  force?: boolean;
  json?: boolean;
}

/** `ID=ADDRESS[/TUNNEL]` */
function parseNode(s: string): InitNode {
  const m = /^([^=]+)=([^/]+)(?:\/(.+))?$/.exec(s.trim());
  if (!m) throw new UsageError(`--node ${s}: expected ID=ADDRESS or ID=ADDRESS/TUNNEL-ADDRESS (e.g. a=192.0.2.10/10.99.0.1)`);
  return { id: m[1]!, address: m[2]!, ...(m[3] ? { tunnel: m[3] } : {}) };
}

const collect = (v: string, prev: string[] = []) => [...prev, v];

/** Asks on the terminal for what the flags did not give; refuses (naming the flags) when there is no terminal. */
async function complete(f: InitFlags): Promise<InitAnswers> {
  const missing: string[] = [];
  if (!f.cluster) missing.push("--cluster");
  if ((f.node?.length ?? 0) !== 2) missing.push("--node (twice)");
  if (!f.domain?.length) missing.push("--domain");
  if (!f.dnsServer && !f.dnsManual) missing.push("--dns-server or --dns-manual");
  if (!f.witness && !f.dnsLease && !f.noTieBreaker) missing.push("--witness, --dns-lease or --no-tie-breaker");
  if (missing.length && !process.stdin.isTTY) throw new UsageError(`mailha init needs ${missing.join(", ")} (or a terminal to ask on)`);
  const rl = missing.length ? createInterface({ input: process.stdin, output: process.stderr }) : null;
  const ask = async (q: string, def?: string): Promise<string> => {
    const a = (await rl!.question(`${q}${def ? ` [${def}]` : ""}: `)).trim();
    return a || def || "";
  };
  try {
    const cluster = f.cluster ?? (await ask("cluster name (lower-case letters, digits, '-')", "mail"));
    const nodes = f.node?.length === 2 ? f.node.map(parseNode) : [];
    for (const id of ["a", "b"].slice(nodes.length)) {
      const address = await ask(`node ${id}: its public IPv4 address`);
      const tunnel = await ask(`node ${id}: its tunnel (WireGuard) address for replication, empty for none`, "");
      nodes.push({ id, address, ...(tunnel ? { tunnel } : {}) });
    }
    const domains = f.domain?.length ? f.domain : (await ask("mail domains (comma-separated)")).split(/[\s,]+/).filter(Boolean);
    const zone = f.zone ?? (f.domain?.length || f.dnsServer || f.dnsManual ? domains[0]! : await ask("the DNS zone the mail host and MX names are in", domains[0]));
    let dns: InitAnswers["dns"];
    if (f.dnsServer) dns = { updates: true, server: f.dnsServer, zone };
    else if (f.dnsManual) dns = { updates: false, zone };
    else {
      const server = await ask("a DNS server that takes TSIG-signed updates for the zone (its IPv4), empty to manage the records by hand", "");
      dns = server ? { updates: true, server, zone } : { updates: false, zone };
    }
    let tieBreaker: InitAnswers["tieBreaker"];
    if (f.witness) tieBreaker = { kind: "witness", address: f.witness };
    else if (f.dnsLease) tieBreaker = { kind: "dns-lease" };
    else if (f.noTieBreaker) tieBreaker = { kind: "none" };
    else {
      const w = await ask(`tie-breaker: a witness server's IPv4${dns.updates ? ", or 'dns' for the DNS lease" : ""}, empty for none`, "");
      tieBreaker = w === "dns" ? { kind: "dns-lease" } : w ? { kind: "witness", address: w } : { kind: "none" };
    }
    return { cluster, nodes: [nodes[0]!, nodes[1]!], domains, ...(f.host ? { host: f.host } : {}), dns, tieBreaker, secretsDir: f.secretsDir, stateDir: f.stateDir, volumeSize: f.volumeSize };
  } finally {
    rl?.close();
  }
}

export function initCommand(): Command {
  return new Command("init")
    .description("write a commented mailha.yaml for two servers (from flags, or questions on a terminal) and create its secrets (0600)")
    .addOption(new Option("-o, --output <file>", "the config file to write").default("/etc/mailha/mailha.yaml"))
    .option("--cluster <name>", "the cluster's name")
    .option("--node <id=address[/tunnel]>", "a node: its id, public IPv4 and, optionally, its tunnel address for replication (give it twice)", collect)
    .option("--domain <domain>", "a mail domain (repeatable)", collect)
    .option("--host <name>", "the IMAP/POP3/submission host name (default mail.<first domain>)")
    .option("--dns-server <ipv4>", "a DNS server that takes TSIG-signed RFC 2136 updates for the zone (mailha keeps its records)")
    .option("--dns-manual", "the DNS records are managed by hand (mailha dns render prints them)")
    .option("--zone <zone>", "the DNS zone of the mail host and MX names (default: the first domain)")
    .option("--witness <ipv4>", "tie-breaker: a witness server (`mailha witness run` on a third small server)")
    .option("--dns-lease", "tie-breaker: a lease record on the DNS server (needs --dns-server)")
    .option("--no-tie-breaker", "no tie-breaker (a partition may split the brain; mailha merges it afterwards)")
    .addOption(new Option("--secrets-dir <dir>", "where the secret files go").default("/etc/mailha/secrets"))
    .addOption(new Option("--state-dir <dir>", "each node's state directory").default("/var/lib/mailha"))
    .addOption(new Option("--volume-size <size>", "the replicated volume's size").default("20GiB"))
    .option("--force", "overwrite an existing config file (the secrets are never overwritten)")
    .addOption(new Option("--json", "print the result as JSON on stdout"))
    .action(async (f: InitFlags & { tieBreaker?: boolean }) => {
      // commander's --no-tie-breaker sets tieBreaker: false.
      if (f.tieBreaker === false) f.noTieBreaker = true;
      const out = createOutput(!!f.json);
      if ([f.dnsServer, f.dnsManual].filter(Boolean).length > 1) throw new UsageError("--dns-server and --dns-manual: one or the other");
      if ([f.witness, f.dnsLease, f.noTieBreaker].filter(Boolean).length > 1) throw new UsageError("--witness, --dns-lease, --no-tie-breaker: one of them");
      const file = resolve(f.output);
      if (existsSync(file) && !f.force) throw new UsageError(`${file} exists; nothing written (--force replaces it; its secrets are kept)`);
      const filled = await complete(f);
      // Secrets beside the config are named relative to it: the same paths on every server.
      const rel = relative(dirname(file), resolve(filled.secretsDir));
      const answers: InitAnswers = { ...filled, secretsDir: resolve(filled.secretsDir), ...(rel && !rel.startsWith("..") && !isAbsolute(rel) ? { secretsRef: rel } : {}) };
      const problems = checkAnswers(answers);
      if (problems.length) throw new UsageError(`nothing written:\n${problems.map((p) => `  ${p}`).join("\n")}`);
      mkdirSync(dirname(file), { recursive: true, mode: 0o755 });
      writeFileSync(file, renderInitConfig(answers), { mode: 0o644 });
      mkdirSync(answers.secretsDir, { recursive: true, mode: 0o700 });
      const secrets = generateSecrets(loadConfig(file, { checkSecrets: false }));
      // What `mailha config check` does: the file and its secrets.
      const c = loadConfig(file);
      const next = [
        `copy ${file} and ${answers.secretsDir}/ to both servers (same paths, secrets 0600) or run: mailha deploy --config ${file}`,
        ...(c.dns.updates ? [`give the DNS server ${c.dns.server} the key in ${c.dns.tsig_key_file} and let it update ${c.dns.zone}`] : ["put the records of `mailha dns render --config " + file + "` into the zone"]),
        ...(c.quorum.witness ? [`run \`mailha witness run --config ${file}\` on ${c.quorum.witness.address}`] : []),
      ];
      out.result({ file, secrets, next }, () => [`wrote ${file} (mailha config check: ok)`, table(secrets.map((s) => [s.created ? "created" : "kept", s.key, s.path])), "next:", ...next.map((n) => `  - ${n}`)].join("\n"));
    });
}
