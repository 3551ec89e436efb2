// `mailha init`'s pure half: the answers (two nodes at two hosters, the mail domains, how
// DNS is kept, the tie-breaker) checked and turned into a commented mailha.yaml for two
// real servers, with the defaults a WAN between hosters wants (Heartbeat-like timers in
// seconds, a tunnel for replication when one is given). What it writes must pass
// `mailha config check` once the secrets exist (ops/cli/init-cmd.ts makes them).
import { isIPv4 } from "node:net";

export interface InitNode {
  readonly id: string;
  /** The public IPv4 address clients use. */
  readonly address: string;
  /** The replication link's address (a tunnel between the servers); the public one when absent. */
  readonly tunnel?: string;
}

export type InitDns = { readonly updates: true; readonly server: string; readonly zone: string } | { readonly updates: false; readonly zone: string };
export type InitTieBreaker = { readonly kind: "witness"; readonly address: string } | { readonly kind: "dns-lease" } | { readonly kind: "none" };

export interface InitAnswers {
  readonly cluster: string;
  readonly nodes: readonly [InitNode, InitNode];
  readonly domains: readonly string[];
  /** The IMAP/POP3/submission name (both nodes' A records); mail.<first domain> when absent. */
  readonly host?: string;
  readonly dns: InitDns;
  readonly tieBreaker: InitTieBreaker;
  /** Where the three secret files go (0700 directory, 0600 files). */
  readonly secretsDir: string;
  /** How the config names that folder: relative to the config file's folder when inside it (the same on every server), else SECRETSDIR. */
  readonly secretsRef?: string;
  readonly stateDir: string;
  /** The replicated volume's size, as the config writes it (20GiB). */
  readonly volumeSize: string;
}

const NODE_ID_RE = /^[a-z][a-z0-9]{0,7}$/;
const NAME_RE = /^[a-z0-9][a-z0-9-]{0,62}$/;
const HOST_RE = /^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$/;
const SIZE_RE = /^\d+(\.\d+)?\s*(MiB|GiB|TiB)$/;

/** Every problem with ANSWERS, each naming the flag to fix (empty: fine). */
export function checkAnswers(a: InitAnswers): string[] {
  const p: string[] = [];
  if (!NAME_RE.test(a.cluster)) p.push(`--cluster: "${a.cluster}" is not a cluster name (lower-case letters, digits and '-')`);
  for (const [i, n] of a.nodes.entries()) {
    if (!NODE_ID_RE.test(n.id)) p.push(`--node ${i + 1}: "${n.id}" is not a node id (a lower-case letter, then up to 7 letters or digits)`);
    if (!isIPv4(n.address)) p.push(`--node ${n.id}: "${n.address}" is not an IPv4 address`);
    if (n.tunnel !== undefined && !isIPv4(n.tunnel)) p.push(`--node ${n.id}: the tunnel address "${n.tunnel}" is not an IPv4 address`);
  }
  if (a.nodes[0].id === a.nodes[1].id) p.push(`--node: the two nodes need different ids (both are "${a.nodes[0].id}")`);
  if (a.nodes[0].address === a.nodes[1].address) p.push(`--node: the two nodes need different addresses (both are ${a.nodes[0].address})`);
  if (!!a.nodes[0].tunnel !== !!a.nodes[1].tunnel) p.push("--node: give a tunnel address for both nodes or for neither");
  if (!a.domains.length) p.push("--domain: at least one mail domain");
  for (const d of a.domains) if (!HOST_RE.test(d)) p.push(`--domain: "${d}" is not a domain name`);
  if (a.host !== undefined && !HOST_RE.test(a.host)) p.push(`--host: "${a.host}" is not a host name`);
  if (!HOST_RE.test(a.dns.zone)) p.push(`--zone: "${a.dns.zone}" is not a zone name`);
  if (a.dns.updates && !isIPv4(a.dns.server)) p.push(`--dns-server: "${a.dns.server}" is not an IPv4 address`);
  if (a.tieBreaker.kind === "witness" && !isIPv4(a.tieBreaker.address)) p.push(`--witness: "${a.tieBreaker.address}" is not an IPv4 address`);
  if (a.tieBreaker.kind === "dns-lease" && !a.dns.updates) p.push("--dns-lease: the DNS lease is a record mailha updates; it needs --dns-server (or use --witness)");
  if (!a.secretsDir.startsWith("/")) p.push(`--secrets-dir: "${a.secretsDir}" is not an absolute path`);
  if (!a.stateDir.startsWith("/")) p.push(`--state-dir: "${a.stateDir}" is not an absolute path`);
  if (!SIZE_RE.test(a.volumeSize)) p.push(`--volume-size: "${a.volumeSize}" is not a size such as 20GiB`);
  return p;
}

/** The commented mailha.yaml for ANSWERS (checked first: checkAnswers must be empty). */
export function renderInitConfig(a: InitAnswers): string {
  const problems = checkAnswers(a);
  if (problems.length) throw new Error(problems.join("\n"));
  const [na, nb] = a.nodes;
  const host = a.host ?? `mail.${a.domains[0]}`;
  const tunnel = !!na.tunnel;
  const link = (n: InitNode) => [`      - { name: public, address: ${n.address} }`, ...(n.tunnel ? [`      - { name: tunnel, address: ${n.tunnel} }`] : [])];
  const node = (n: InitNode) => [
    `  - id: ${n.id}`,
    `    service_address: ${n.address}`,
    `    replication_address: ${n.tunnel ?? n.address}`,
    "    heartbeat_links:",
    ...link(n),
  ];
  const mxDomain = a.domains[0]!;
  const zoneOf = (name: string) => name === a.dns.zone || name.endsWith(`.${a.dns.zone}`);
  const tb = a.tieBreaker;
  const sec = a.secretsRef ?? a.secretsDir;
  return [
    `# mailha.yaml for the cluster "${a.cluster}": two servers, ${na.id} (${na.address}) and ${nb.id} (${nb.address}).`,
    "# Written by `mailha init`. The same file goes to both servers (`mailha deploy` copies it",
    "# and the secrets); `mailha config check FILE` prints every problem, or ok.",
    "",
    "cluster:",
    `  name: ${a.cluster}`,
    `  preferred_node: ${na.id}           # active when both are healthy`,
    "  auto_failback: false      # after a failover, stay on the survivor until `mailha failback`",
    "",
    "nodes:",
    ...node(na),
    ...node(nb),
    ...(tunnel
      ? ["# Replication and one heartbeat link run over the tunnel between the servers (WireGuard,", "# say): the replication stream is authenticated but not encrypted (README, Security)."]
      : [
          "# No tunnel given: replication runs over the public addresses. Its stream is",
          "# authenticated (MAC) but NOT encrypted: put a tunnel (WireGuard) between the servers",
          "# and set replication_address and a second heartbeat link to its addresses.",
        ]),
    "",
    "mail:",
    `  domains: [${a.domains.join(", ")}]`,
    `  host: ${host}      # IMAP, POP3 and submission: both nodes' A records`,
    "  mx:                       # senders try the lowest preference first; the passive node is backup MX",
    `    - { name: mx1.${mxDomain}, node: ${na.id}, preference: 10 }`,
    `    - { name: mx2.${mxDomain}, node: ${nb.id}, preference: 20 }`,
    "  mail_uid: 5000            # owner of the Maildir files, the same number on both servers",
    "  mail_gid: 5000",
    "  message_size_max_bytes: 26214400",
    "  outbound:",
    "    lifetime_s: 432000      # 5 days (RFC 5321), then a bounce",
    "    retry_initial_s: 300",
    "    retry_max_s: 3600",
    "",
    "timers:                     # a WAN between hosters: seconds, not milliseconds",
    "  keepalive_ms: 500",
    "  warntime_ms: 2000",
    "  deadtime_ms: 10000         # the peer silent on every link this long = dead",
    "  initdead_ms: 30000",
    "",
    "quorum:                     # two nodes cannot outvote each other: the tie-breaker decides",
    "  ping_targets: []          # e.g. each hoster's gateway: reach none = this node is the isolated one",
    ...(tb.kind === "witness"
      ? [`  witness: { address: ${tb.address}, port: 7790, lease_ms: 20000 }   # \`mailha witness run\` on a third small server`]
      : tb.kind === "dns-lease"
        ? ["  dns_lease: { lease_ms: 60000 }   # a TXT record on the DNS server below, taken by compare-and-set (needs NTP on both)"]
        : ["  # No tie-breaker: after a partition both sides may serve (a split brain; mailha merges", "  # it afterwards). Add a witness (a third small server) or the DNS lease."]),
    "",
    "fencing:",
    "  agent: none               # two hosters: no power switch to pull; the tie-breaker's lease fences",
    "",
    "manager:",
    "  monitor_interval_ms: 5000",
    "  max_restarts: 3",
    "  restart_window_ms: 600000",
    "",
    "heartbeat:",
    "  port: 694",
    `  key_file: ${sec}/heartbeat.key`,
    "",
    "volume:",
    `  size: ${a.volumeSize}              # the mail, MariaDB and Redis; both servers need this much free`,
    "  protocol: C               # synchronous: an SMTP 250 means on both disks",
    "  split_brain_policy: preserve",
    "  port: 7789",
    `  secret_file: ${sec}/replication.secret`,
    "",
    "dns:",
    ...(a.dns.updates
      ? [
          "  updates: true             # mailha keeps its records by TSIG-signed RFC 2136 updates",
          `  server: ${a.dns.server}`,
          `  zone: ${a.dns.zone}`,
          `  tsig_key_file: ${sec}/tsig.key   # give the DNS server this key and allow it to update the zone`,
        ]
      : [
          "  updates: false            # the records are managed by hand: `mailha dns render` prints them",
          `  zone: ${a.dns.zone}`,
        ]),
    "  ttl: { mail_host_s: 60, mx_s: 3600 }",
    ...(a.domains.some((d) => !zoneOf(d)) ? [`  # Note: ${a.domains.filter((d) => !zoneOf(d)).join(", ")} not in ${a.dns.zone}: their MX records are yours to keep.`] : []),
    "",
    "paths:",
    `  state_dir: ${a.stateDir}`,
    "",
  ].join("\n");
}
