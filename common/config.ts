// Loads and validates mailha.yaml: one typed object for the whole cluster, checked at
// the edge. Every problem names the key path, what was expected and what was found;
// secret files must exist, be mode 0600 (or stricter) and belong to the running user.
import { readFileSync, statSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import { parseDocument } from "yaml";
import { z } from "zod";
import { ConfigError, type ConfigProblem } from "./errors.ts";

const NAME_RE = /^[a-z][a-z0-9-]{0,30}$/;
const NODE_ID_RE = /^[a-z][a-z0-9]{0,7}$/;
const HOSTNAME_RE = /^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$/;
const SIZE_RE = /^(\d+)\s*(B|KiB|MiB|GiB|TiB)$/;
const SIZE_UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4 };

const ipv4 = () => z.ipv4({ error: "an IPv4 address such as 10.77.0.1" });
const ipv6 = () => z.ipv6({ error: "an IPv6 address such as fd00::1" });
const hostname = () => z.string({ error: "a DNS name such as mail.example.org" }).regex(HOSTNAME_RE, { error: "a lower-case DNS name such as mail.example.org" });
/** A mailbox of the lab's (the test tools log in as it). */
const labUser = z.strictObject({ address: z.email({ error: "an e-mail address" }), password: z.string({ error: "a password" }).min(8, { error: "a password of at least 8 characters" }) });

const int = (what: string, min: number, max: number) =>
  z.number({ error: `${what} (an integer from ${min} to ${max})` }).int({ error: `${what} (an integer from ${min} to ${max})` }).min(min, { error: `${what} (an integer from ${min} to ${max})` }).max(max, { error: `${what} (an integer from ${min} to ${max})` });
const port = () => int("a TCP/UDP port", 1, 65535);
const ms = (min: number, max: number) => int("milliseconds", min, max);
const filePath = (what: string) => z.string({ error: `a path to ${what}` }).min(1, { error: `a path to ${what}` });
const absPath = (what: string) => z.string({ error: `an absolute path to ${what}` }).refine((p) => isAbsolute(p), { error: `an absolute path to ${what}` });
const oneOf = <const T extends readonly [string, ...string[]]>(values: T) =>
  z.enum(values, { error: `one of ${values.map((v) => JSON.stringify(v)).join(", ")}` });
const size = () =>
  z
    .string({ error: 'a size such as "1GiB" (units B, KiB, MiB, GiB, TiB)' })
    .regex(SIZE_RE, { error: 'a size such as "1GiB" (units B, KiB, MiB, GiB, TiB)' })
    .transform((s) => {
      const m = SIZE_RE.exec(s)!;
      return Number(m[1]) * SIZE_UNITS[m[2]!]!;
    });

export const SPLIT_BRAIN_POLICIES = ["disconnect", "discard-zero-changes", "discard-least-changes", "discard-younger-primary", "preserve"] as const;
export const FENCING_AGENTS = ["command", "lab", "none"] as const;
/** How a volume's backing image gets its blocks (replication/store.ts explains). */
export const VOLUME_ALLOCATIONS = ["full", "sparse"] as const;
export type VolumeAllocation = (typeof VOLUME_ALLOCATIONS)[number];

const heartbeatLink = z.strictObject({
  name: z.string({ error: "a link name such as service or replication" }).regex(NAME_RE, { error: "a link name such as service or replication" }),
  address: ipv4(),
});

const node = z.strictObject({
  id: z.string({ error: "a node id: a lower-case letter, then up to 7 letters or digits" }).regex(NODE_ID_RE, { error: "a node id: a lower-case letter, then up to 7 letters or digits" }),
  service_address: ipv4(),
  service_address6: ipv6().optional(),
  replication_address: ipv4(),
  heartbeat_links: z.array(heartbeatLink, { error: "a list of heartbeat links" }).min(1, { error: "at least one heartbeat link" }).max(4, { error: "at most 4 heartbeat links" }),
});

const schema = z
  .strictObject({
    cluster: z.strictObject({
      name: z.string({ error: "a cluster name: lower-case letters, digits and '-'" }).regex(NAME_RE, { error: "a cluster name: lower-case letters, digits and '-'" }),
      preferred_node: z.string({ error: "the id of one of the nodes" }),
      auto_failback: z.boolean({ error: "true or false" }).default(false),
    }),
    nodes: z.array(node, { error: "a list of exactly two nodes" }).length(2, { error: "exactly two nodes" }),
    mail: z.strictObject({
      domains: z.array(hostname(), { error: "a list of mail domains" }).min(1, { error: "at least one mail domain" }),
      host: hostname(),
      mx: z
        .array(z.strictObject({ name: hostname(), node: z.string({ error: "the id of one of the nodes" }), preference: int("an MX preference", 0, 65535) }), { error: "a list of MX hosts" })
        .min(1, { error: "at least one MX host" }),
      mail_uid: int("a uid for mail files", 500, 2 ** 31 - 2).default(5000),
      mail_gid: int("a gid for mail files", 500, 2 ** 31 - 2).default(5000),
      message_size_max_bytes: int("a byte count", 1024, 2 ** 31 - 1).default(25 * 1024 * 1024),
      /** Recipients one message may have (RCPT beyond it: 452 4.5.3), as Postfix's smtpd_recipient_limit. */
      message_recipients_max: int("a number of recipients", 1, 100_000).default(1000),
      outbound: z
        .strictObject({
          lifetime_s: int("seconds", 1, 30 * 86_400).default(5 * 86_400),
          retry_initial_s: int("seconds", 1, 86_400).default(300),
          retry_max_s: int("seconds", 1, 86_400).default(3600),
          resolvers: z.array(ipv4(), { error: "a list of IPv4 addresses" }).max(4, { error: "at most 4 resolvers" }).default([]),
        })
        .prefault({}),
    }),
    timers: z
      .strictObject({
        keepalive_ms: ms(10, 60_000).default(200),
        warntime_ms: ms(10, 600_000).default(1000),
        deadtime_ms: ms(10, 600_000).default(2000),
        initdead_ms: ms(10, 3_600_000).default(6000),
      })
      .prefault({}),
    quorum: z
      .strictObject({
        ping_targets: z.array(ipv4(), { error: "a list of IPv4 addresses" }).max(8, { error: "at most 8 ping targets" }).default([]),
        witness: z.strictObject({ address: ipv4(), port: port().default(7790), lease_ms: ms(500, 600_000).default(5000) }).optional(),
        dns_lease: z.strictObject({ lease_ms: ms(5000, 3_600_000).default(60_000) }).optional(),
      })
      .prefault({}),
    fencing: z
      .strictObject({
        agent: oneOf(FENCING_AGENTS).default("none"),
        command: z.string({ error: "a command line" }).min(1, { error: "a command line" }).optional(),
        timeout_ms: ms(100, 600_000).default(30_000),
      })
      .prefault({}),
    manager: z
      .strictObject({
        monitor_interval_ms: ms(100, 600_000).default(2000),
        max_restarts: int("a number of restarts", 0, 100).default(3),
        restart_window_ms: ms(1000, 86_400_000).default(60_000),
        self_fence_ms: ms(100, 600_000).default(3000),
        metrics_port: port().default(9647),
        // The node-to-node channel (common/peer-rpc.ts: TLS with a key derived from the
        // heartbeat key) on the service address: the recipient list, split-brain copies.
        peer_port: port().default(9648),
      })
      .prefault({}),
    // Bounds on what clients may hold (exported as metrics: mailha_limit_*, mailha_*_refused_total).
    limits: z
      .strictObject({
        smtp_clients_max: int("a number of connections", 1, 100_000).default(200),
        smtp_clients_per_address_max: int("a number of connections", 1, 100_000).default(50),
        smtp_idle_ms: ms(1000, 3_600_000).default(120_000),
        smtp_messages_per_session_max: int("a number of messages", 1, 1_000_000).default(100),
        proxy_connections_max: int("a number of connections", 1, 100_000).default(1000),
        proxy_connections_per_address_max: int("a number of connections", 1, 100_000).default(50),
        // IMAP IDLE: RFC 9051 asks servers to wait at least 30 minutes before they log an idle client out.
        proxy_idle_ms: ms(60_000, 86_400_000).default(1_860_000),
      })
      .prefault({}),
    reconcile: z
      .strictObject({
        // After a split brain heals, the active node merges the victim's preserved copy
        // by itself; false: it waits for `mailha reconcile` (look first with --dry-run).
        auto: z.boolean({ error: "true or false" }).default(true),
        attempts_max: int("a number of attempts", 1, 100).default(5),
        retry_ms: ms(1000, 86_400_000).default(30_000),
        // Change-journal segments older than this are removed (while in sync, nothing to merge).
        journal_keep_ms: ms(3_600_000, 3_650 * 86_400_000).default(7 * 86_400_000),
      })
      .prefault({}),
    spam: z
      .strictObject({
        // The statistical filter (services/spam/): mail from outside is classified at
        // delivery, before the 250; false: delivered unclassified (no X-DSPAM fields).
        enabled: z.boolean({ error: "true or false" }).default(true),
        // A delivery waits at most this long for the filter; longer: delivered unclassified (Innocent, X-DSPAM-Reason).
        classify_timeout_ms: ms(100, 60_000).default(2000),
        // Users' moves into and out of Junk retrain the filter (the spam worker, on the active node).
        learn_from_moves: z.boolean({ error: "true or false" }).default(true),
        // Spam held in quarantine (spam_action quarantine) is deleted after this many days, by the purge.
        quarantine_days: z.number({ error: "a whole number of days, 1 to 3650" }).int({ error: "a whole number of days, 1 to 3650" }).min(1, { error: "a whole number of days, 1 to 3650" }).max(3650, { error: "a whole number of days, 1 to 3650" }).default(30),
        // When the spam worker runs DSPAM's purge (cron, the node's local time).
        purge_cron: z.string({ error: "a cron expression (5 fields), e.g. 30 3 * * *" }).regex(/^\S+( \S+){4}$/, { error: "a cron expression of 5 fields, e.g. 30 3 * * *" }).default("30 3 * * *"),
        // When users with spam held since their last notice get one in their INBOX (cron, the node's local time), or off.
        quarantine_digest_cron: z.string({ error: 'a cron expression (5 fields), e.g. 0 7 * * *, or "off"' }).regex(/^(off|\S+( \S+){4})$/, { error: 'a cron expression of 5 fields, e.g. 0 7 * * *, or "off"' }).default("0 7 * * *"),
      })
      .prefault({}),
    heartbeat: z.strictObject({
      port: port().default(694),
      key_file: filePath("the heartbeat key file (mode 0600)"),
    }),
    volume: z.strictObject({
      size: size(),
      block_size_bytes: z.literal([4096], { error: "4096" }).default(4096),
      protocol: oneOf(["C", "A"] as const).default("C"),
      allocation: oneOf(VOLUME_ALLOCATIONS).default("full"),
      split_brain_policy: oneOf(SPLIT_BRAIN_POLICIES).default("preserve"),
      port: port().default(7789),
      secret_file: filePath("the replication secret file (mode 0600)"),
      activity_log_extents: int("a number of extents", 1, 65536).default(64),
      resync_rate_max_bytes_per_s: int("bytes per second", 1024, 2 ** 40).default(100 * 1024 * 1024),
    }),
    dns: z.strictObject({
      // true: mailha keeps its records itself, by TSIG-signed RFC 2136 updates to SERVER
      // (the mail host's A records follow the live nodes); false: they are managed by
      // hand (`mailha dns render` prints them, `mailha dns check` checks them; the mail
      // host keeps both nodes' A records, clients fall back by themselves).
      updates: z.boolean({ error: "true or false" }).default(true),
      server: ipv4().optional(),
      port: port().default(53),
      zone: hostname(),
      tsig_key_file: filePath("the TSIG key file (mode 0600), as tsig-keygen writes it").optional(),
      ttl: z
        .strictObject({
          mail_host_s: int("seconds", 1, 86_400).default(60),
          mx_s: int("seconds", 1, 604_800).default(3600),
        })
        .prefault({}),
    }),
    paths: z.strictObject({ state_dir: absPath("the node's state directory") }).prefault({ state_dir: "/var/lib/mailha" }),
    lab: z
      .strictObject({
        name: z.string({ error: "a lab name: 1 to 6 lower-case letters or digits" }).regex(/^[a-z0-9]{1,6}$/, { error: "a lab name: 1 to 6 lower-case letters or digits" }),
        dir: absPath("the lab's directory"),
        witness_address: ipv4(),
        operator_address: ipv4(),
        prefix_len: int("a prefix length", 8, 30).default(24),
        test_user: labUser,
        pop3_user: labUser.optional(),
      })
      .optional(),
    failover_test: z
      .strictObject({
        faults: z
          .record(
            z.string().regex(/^[a-z][a-z0-9-]{0,31}$/, { error: "a fault name: a lower-case letter, then letters, digits or dashes" }),
            z.strictObject({
              description: z.string({ error: "a sentence saying what the fault does" }).optional(),
              inject: z.string({ error: "a shell command that injects the fault" }).min(1, { error: "a shell command that injects the fault" }),
              recover: z.string({ error: "a shell command that undoes the fault" }).min(1, { error: "a shell command that undoes the fault" }).optional(),
              timeout_ms: ms(100, 600_000).default(60_000),
            }),
            { error: "a map of fault names to { inject, recover } commands" },
          )
          .default({}),
      })
      .prefault({}),
  })
  .superRefine((c, ctx) => {
    const ids = c.nodes.map((n) => n.id);
    if (ids.length === 2 && ids[0] === ids[1]) ctx.addIssue({ code: "custom", path: ["nodes", 1, "id"], message: `a node id different from "${ids[0]}"`, input: ids[1] });
    if (!ids.includes(c.cluster.preferred_node)) ctx.addIssue({ code: "custom", path: ["cluster", "preferred_node"], message: `one of the node ids (${ids.join(", ")})`, input: c.cluster.preferred_node });
    c.mail.mx.forEach((mx, i) => {
      if (!ids.includes(mx.node)) ctx.addIssue({ code: "custom", path: ["mail", "mx", i, "node"], message: `one of the node ids (${ids.join(", ")})`, input: mx.node });
    });
    const [a, b] = c.nodes;
    if (a && b) {
      const la = a.heartbeat_links.map((l) => l.name).sort().join(",");
      const lb = b.heartbeat_links.map((l) => l.name).sort().join(",");
      if (la !== lb) ctx.addIssue({ code: "custom", path: ["nodes", 1, "heartbeat_links"], message: `the same link names as node ${a.id} (${la})`, input: lb });
    }
    const t = c.timers;
    if (t.warntime_ms <= t.keepalive_ms) ctx.addIssue({ code: "custom", path: ["timers", "warntime_ms"], message: `more than keepalive_ms (${t.keepalive_ms})`, input: t.warntime_ms });
    if (t.deadtime_ms <= t.warntime_ms) ctx.addIssue({ code: "custom", path: ["timers", "deadtime_ms"], message: `more than warntime_ms (${t.warntime_ms})`, input: t.deadtime_ms });
    if (t.initdead_ms < t.deadtime_ms) ctx.addIssue({ code: "custom", path: ["timers", "initdead_ms"], message: `at least deadtime_ms (${t.deadtime_ms})`, input: t.initdead_ms });
    if (c.quorum.witness && c.quorum.dns_lease)
      ctx.addIssue({ code: "custom", path: ["quorum", "dns_lease"], message: "either quorum.witness or quorum.dns_lease, not both", input: c.quorum.dns_lease });
    const lease = c.quorum.witness ?? c.quorum.dns_lease;
    if (lease) {
      const renew = lease.lease_ms / 4;
      const key = c.quorum.witness ? "witness" : "dns_lease";
      if (lease.lease_ms <= c.manager.self_fence_ms + renew)
        ctx.addIssue({ code: "custom", path: ["quorum", key, "lease_ms"], message: `more than manager.self_fence_ms + a quarter of itself (${c.manager.self_fence_ms} + lease_ms/4): the active node must stop before its lease can expire`, input: lease.lease_ms });
    }
    if (c.dns.updates && !c.dns.server) ctx.addIssue({ code: "custom", path: ["dns", "server"], message: "the address of the DNS server that takes the updates (or dns.updates: false to manage the records by hand)", input: undefined });
    if (c.dns.updates && !c.dns.tsig_key_file) ctx.addIssue({ code: "custom", path: ["dns", "tsig_key_file"], message: "the TSIG key file the updates are signed with (or dns.updates: false)", input: undefined });
    if (c.quorum.dns_lease && !c.dns.updates) ctx.addIssue({ code: "custom", path: ["quorum", "dns_lease"], message: "a DNS server that takes updates (dns.updates: true): the lease is a record on it; or a witness instead", input: c.quorum.dns_lease });
    if (c.fencing.agent === "command" && !c.fencing.command) ctx.addIssue({ code: "custom", path: ["fencing", "command"], message: 'a command line (required when agent is "command")', input: undefined });
    if (c.volume.size % c.volume.block_size_bytes !== 0 || c.volume.size < 16 * 1024 * 1024)
      ctx.addIssue({ code: "custom", path: ["volume", "size"], message: "a whole number of blocks, at least 16MiB", input: c.volume.size });
    if (c.lab && c.lab.test_user && !c.mail.domains.includes(c.lab.test_user.address.split("@")[1]!))
      ctx.addIssue({ code: "custom", path: ["lab", "test_user", "address"], message: `an address in one of the mail domains (${c.mail.domains.join(", ")})`, input: c.lab.test_user.address });
  });

type Parsed = z.infer<typeof schema>;
export type NodeConfig = Parsed["nodes"][number];

/** The validated cluster configuration, with secret paths made absolute. */
export type MailhaConfig = Parsed & { readonly file: string };

export interface LoadOptions {
  /** Check the secret files' presence, mode and owner (default true). */
  readonly checkSecrets?: boolean;
}

/** The secret files a configuration names, by purpose. */
export function secretFiles(c: MailhaConfig): { purpose: string; key: string; path: string }[] {
  return [
    { purpose: "heartbeat key", key: "heartbeat.key_file", path: c.heartbeat.key_file },
    { purpose: "replication secret", key: "volume.secret_file", path: c.volume.secret_file },
    ...(c.dns.tsig_key_file ? [{ purpose: "TSIG key", key: "dns.tsig_key_file", path: c.dns.tsig_key_file }] : []),
  ];
}

/** The DNS server mailha updates and its key; throws when the records are managed by hand (dns.updates: false). */
export function dnsUpdates(c: MailhaConfig): { server: string; port: number; zone: string; tsig_key_file: string } {
  if (!c.dns.updates || !c.dns.server || !c.dns.tsig_key_file) throw new Error(`${c.file}: dns.updates is false: the records are managed by hand (mailha dns render prints them)`);
  return { server: c.dns.server, port: c.dns.port, zone: c.dns.zone, tsig_key_file: c.dns.tsig_key_file };
}

/** Reads, parses and validates FILE; throws ConfigError listing every problem. */
export function loadConfig(file: string, opts: LoadOptions = {}): MailhaConfig {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new ConfigError(file, [{ path: "(file)", expected: "a readable YAML file", found: (err as Error).message }]);
  }
  return parseConfig(text, file, opts);
}

/** Validates configuration text; FILE is used for messages and to resolve relative paths. */
export function parseConfig(text: string, file: string, opts: LoadOptions = {}): MailhaConfig {
  const doc = parseDocument(text, { prettyErrors: true });
  if (doc.errors.length > 0) {
    throw new ConfigError(
      file,
      doc.errors.map((e) => ({ path: `(line ${e.linePos?.[0]?.line ?? "?"})`, expected: "valid YAML", found: e.message.split("\n")[0] ?? e.code })),
    );
  }
  const raw: unknown = doc.toJS();
  const result = schema.safeParse(raw ?? {});
  if (!result.success) throw new ConfigError(file, result.error.issues.flatMap((i) => toProblems(i, raw)));
  const base = dirname(resolve(file));
  const abs = (p: string) => (isAbsolute(p) ? p : resolve(base, p));
  const c = result.data;
  const config: MailhaConfig = {
    ...c,
    file: resolve(file),
    heartbeat: { ...c.heartbeat, key_file: abs(c.heartbeat.key_file) },
    volume: { ...c.volume, secret_file: abs(c.volume.secret_file) },
    dns: { ...c.dns, ...(c.dns.tsig_key_file ? { tsig_key_file: abs(c.dns.tsig_key_file) } : {}) },
  };
  if (opts.checkSecrets ?? true) {
    const problems = secretFiles(config).flatMap((s) => checkSecretFile(s.key, s.path, s.purpose));
    if (problems.length > 0) throw new ConfigError(file, problems);
  }
  return config;
}

/** A secret file shorter than this (after trimming) is refused: an empty or cut-short key authenticates nothing. */
const SECRET_BYTES_MIN = 16;

/** Problems with one secret file: missing, not a file, readable by others, wrong owner, empty or cut short. */
export function checkSecretFile(key: string, path: string, purpose: string): ConfigProblem[] {
  let st;
  try {
    st = statSync(path);
  } catch {
    return [{ path: key, expected: `an existing ${purpose} file (make one with: mailha secret generate --config FILE)`, found: `nothing at ${path}` }];
  }
  const problems: ConfigProblem[] = [];
  if (!st.isFile()) problems.push({ path: key, expected: `a regular file holding the ${purpose}`, found: `something else at ${path}` });
  else if (st.size < SECRET_BYTES_MIN || readFileSync(path, "utf8").trim().length < SECRET_BYTES_MIN)
    problems.push({
      path: key,
      expected: `a ${purpose} of at least ${SECRET_BYTES_MIN} characters in ${path} (the same file on both nodes: copy it from the other node, or remove it, run \`mailha secret generate\` and copy the new one there)`,
      found: st.size === 0 ? "an empty file (cut short by a crash while it was written?)" : `only ${readFileSync(path, "utf8").trim().length} characters`,
    });
  const mode = st.mode & 0o777;
  if ((mode & 0o077) !== 0)
    problems.push({ path: key, expected: `${purpose} file ${path} with mode 0600 (chmod 600 ${path})`, found: `mode 0${mode.toString(8)}` });
  const uid = process.geteuid?.();
  if (uid !== undefined && st.uid !== uid)
    problems.push({ path: key, expected: `${purpose} file ${path} owned by the user running mailha (uid ${uid})`, found: `owner uid ${st.uid}` });
  return problems;
}

function toProblems(issue: z.core.$ZodIssue, raw: unknown): ConfigProblem[] {
  const path = formatPath(issue.path);
  if (issue.code === "unrecognized_keys") {
    return issue.keys.map((k) => ({
      path: formatPath([...issue.path, k]),
      expected: `one of the known keys (${knownKeys(issue.path).join(", ") || "none"})`,
      found: `unknown key "${k}"`,
    }));
  }
  const value = "input" in issue && issue.input !== undefined ? issue.input : valueAt(raw, issue.path);
  let expected = issue.message;
  if (expected.startsWith("Invalid input")) expected = issue.code === "invalid_type" ? `a value of type ${issue.expected}` : "a valid value";
  return [{ path, expected, found: describe(value) }];
}

function knownKeys(path: readonly PropertyKey[]): string[] {
  let s: z.ZodType = schema as unknown as z.ZodType;
  for (const seg of path) {
    s = unwrap(s);
    if (s instanceof z.ZodObject) s = (s.shape as Record<string, z.ZodType>)[String(seg)] ?? s;
    else if (s instanceof z.ZodArray) s = s.element as z.ZodType;
  }
  s = unwrap(s);
  return s instanceof z.ZodObject ? Object.keys(s.shape) : [];
}

function unwrap(s: z.ZodType): z.ZodType {
  for (let i = 0; i < 8; i++) {
    const def = (s as unknown as { _zod: { def: { innerType?: z.ZodType; in?: z.ZodType } } })._zod.def;
    if (def.innerType) s = def.innerType;
    else if (def.in) s = def.in;
    else break;
  }
  return s;
}

function formatPath(path: readonly PropertyKey[]): string {
  if (path.length === 0) return "(top level)";
  return path.map((p, i) => (typeof p === "number" ? `[${p}]` : i === 0 ? String(p) : `.${String(p)}`)).join("");
}

function valueAt(raw: unknown, path: readonly PropertyKey[]): unknown {
  let v: unknown = raw;
  for (const seg of path) {
    if (v === null || typeof v !== "object") return undefined;
    v = (v as Record<PropertyKey, unknown>)[seg];
  }
  return v;
}

function describe(v: unknown): string {
  if (v === undefined) return "nothing (the key is missing)";
  if (v === null) return "null";
  if (Array.isArray(v)) return `a list of ${v.length}`;
  if (typeof v === "object") return "a mapping";
  const s = JSON.stringify(v);
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

/** The node with this id; throws a usage-style error naming the known ids. */
export function nodeById(c: MailhaConfig, id: string): NodeConfig {
  const n = c.nodes.find((x) => x.id === id);
  if (!n) throw new ConfigError(c.file, [{ path: "nodes", expected: `a node with id "${id}"`, found: c.nodes.map((x) => x.id).join(", ") }]);
  return n;
}

/** The other node of the pair. */
export function peerOf(c: MailhaConfig, id: string): NodeConfig {
  const n = c.nodes.find((x) => x.id !== id);
  if (!n) throw new Error(`no peer of ${id}`);
  return n;
}
