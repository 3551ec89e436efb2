// Installs the Debian packages mailha needs when they are missing, without letting
// their maintainer scripts start system-wide copies of the daemons (mailha starts
// its own, with its own configs and data dirs).
import { execFile } from "node:child_process";
import { existsSync, writeFileSync, unlinkSync } from "node:fs";
import { promisify } from "node:util";

const run = promisify(execFile);

/** Every Debian package mailha uses, with the reason. */
export const DEBIAN_PACKAGES: Readonly<Record<string, string>> = {
  "mariadb-server": "accounts and spam data (MariaDB)",
  "mariadb-client": "mariadb command-line client for operators",
  "redis-server": "outbound and reconcile queues (Redis)",
  "dovecot-core": "IMAP/POP3 server",
  "dovecot-imapd": "Dovecot IMAP",
  "dovecot-pop3d": "Dovecot POP3",
  "dovecot-lmtpd": "Dovecot LMTP delivery",
  "dovecot-mysql": "Dovecot passdb/userdb in MariaDB",
  bind9: "authoritative DNS in the lab",
  "bind9-utils": "tsig-keygen, named-checkconf",
  "bind9-dnsutils": "dig and nsupdate",
  libfuse2: "FUSE library for the volume engine",
  fuse: "fusermount for the volume engine",
  swaks: "SMTP test client",
  "libnet-ssleay-perl": "TLS for swaks",
  "libio-socket-ssl-perl": "TLS for swaks",
  postfix: "smtp-source load generator (postfix itself is never started)",
  iproute2: "network namespaces for the lab",
  "iputils-ping": "reachability checks (lab tests, ping targets)",
  "util-linux": "losetup, nsenter, setsid",
  e2fsprogs: "mkfs.ext4 and e2fsck for the volume's file system",
  procps: "process inspection",
  openssl: "lab TLS certificates",
  bogofilter: "the spam benchmark's baseline (npm run bench -- spam)",
  chromium: "headless browser: the tests open the failover report and check a screenshot",
  debootstrap: "the deploy test's machines: a Debian root (npm run test:deploy)",
  "systemd-container": "the deploy test's machines: systemd-nspawn boots them",
  "openssh-client": "the deploy test's machines: ssh into them",
};

const POLICY_RC = "/usr/sbin/policy-rc.d";

/** Names of packages that dpkg does not report as installed. */
export async function missingPackages(names: readonly string[] = Object.keys(DEBIAN_PACKAGES)): Promise<string[]> {
  const missing: string[] = [];
  for (const name of names) {
    try {
      const { stdout } = await run("dpkg-query", ["-W", "-f=${Status}", name]);
      if (!stdout.includes("install ok installed")) missing.push(name);
    } catch {
      missing.push(name);
    }
  }
  return missing;
}

export interface InstallReport {
  readonly installed: string[];
  readonly alreadyPresent: number;
}

/**
 * apt-get installs what is missing. While it runs, a policy-rc.d that answers 101
 * keeps the packages' init scripts from starting daemons on the host; it is removed
 * afterwards (only if we created it).
 */
export async function ensurePackages(log: (line: string) => void = () => {}): Promise<InstallReport> {
  const all = Object.keys(DEBIAN_PACKAGES);
  const missing = await missingPackages(all);
  if (missing.length === 0) return { installed: [], alreadyPresent: all.length };
  if (process.getuid?.() !== 0) {
    throw new Error(`Debian packages missing (${missing.join(", ")}); run as root so mailha can install them`);
  }
  log(`installing Debian packages: ${missing.join(" ")}`);
  const ownPolicy = !existsSync(POLICY_RC);
  if (ownPolicy) writeFileSync(POLICY_RC, "#!/bin/sh\n# written by mailha setup while it installs packages\nexit 101\n", { mode: 0o755 });
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive", NEEDRESTART_MODE: "a" };
  try {
    await aptGet(["update"], env);
    await aptGet(["install", "-y", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold", ...missing], env);
  } finally {
    if (ownPolicy) unlinkSync(POLICY_RC);
  }
  const still = await missingPackages(missing);
  if (still.length > 0) throw new Error(`apt-get finished but these packages are still missing: ${still.join(", ")}`);
  return { installed: missing, alreadyPresent: all.length - missing.length };
}

async function aptGet(args: string[], env: NodeJS.ProcessEnv): Promise<void> {
  try {
    await run("apt-get", args, { env, maxBuffer: 64 * 1024 * 1024, timeout: 15 * 60_000 });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    const tail = (e.stderr ?? "").trim().split("\n").slice(-15).join("\n");
    throw new Error(`apt-get ${args[0]} failed: ${e.message.split("\n")[0]}\n${tail}`);
  }
}
