// Who mail is for: local domains, users and aliases from the account store in MariaDB
// (read with SMTP's own read-only account), and the stored password hashes SMTP AUTH
// checks against. Aliases are followed a bounded number of levels; a destination
// outside the local domains is reported as remote. Addresses found to be local are
// remembered for RESOLVED_TTL_MS (bounded), so a busy MX does not ask MariaDB twice per
// recipient; unknown addresses are always asked again, so a new user receives mail at
// once and a removed one is refused within the TTL. The password check itself is
// auth.ts's (bounded, off the event loop).
import mysql from "mysql2/promise";
import { DATABASE } from "../accounts.ts";
import { sqlLogin } from "../mariadb.ts";

const ALIAS_DEPTH_MAX = 5;
const EXPANSION_MAX = 100;
export const RESOLVED_TTL_MS = 5000;
const RESOLVED_MAX = 10_000;

export type Resolution =
  | { readonly kind: "local"; readonly mailboxes: readonly string[]; readonly remote: readonly string[] }
  | { readonly kind: "unknown" }
  | { readonly kind: "not-local" };

export class Directory {
  private readonly pool: mysql.Pool;
  private readonly resolved = new Map<string, { at: number; r: Resolution }>();

  constructor(socket: string, private readonly domains: readonly string[]) {
    // SMTP's own account (SELECT on users and aliases); its password is read here, while
    // the service still runs as root.
    this.pool = mysql.createPool({ ...sqlLogin(socket, "smtp"), database: DATABASE, connectionLimit: 4, connectTimeout: 3000 });
  }

  isLocalDomain(domain: string): boolean {
    return this.domains.includes(domain.toLowerCase());
  }

  private async userExists(addr: string): Promise<boolean> {
    const [rows] = await this.pool.query("SELECT 1 FROM users WHERE email = ? AND active = 1", [addr]);
    return (rows as unknown[]).length > 0;
  }

  private async aliasTargets(addr: string): Promise<string[]> {
    const [rows] = await this.pool.query("SELECT destination FROM aliases WHERE source = ?", [addr]);
    return (rows as { destination: string }[]).map((r) => r.destination.toLowerCase());
  }

  /** Expands ADDRESS to local mailboxes (and remote forwards), or says why not. */
  async resolve(address: string): Promise<Resolution> {
    const addr = address.toLowerCase();
    const hit = this.resolved.get(addr);
    if (hit && Date.now() - hit.at < RESOLVED_TTL_MS) return hit.r;
    const r = await this.lookup(addr);
    if (r.kind === "local") {
      if (this.resolved.size >= RESOLVED_MAX) this.resolved.clear();
      this.resolved.set(addr, { at: Date.now(), r });
    } else this.resolved.delete(addr);
    return r;
  }

  private async lookup(addr: string): Promise<Resolution> {
    const domain = addr.slice(addr.lastIndexOf("@") + 1);
    if (!this.isLocalDomain(domain)) return { kind: "not-local" };
    const mailboxes = new Set<string>();
    const remote = new Set<string>();
    let frontier = [addr];
    for (let depth = 0; depth <= ALIAS_DEPTH_MAX && frontier.length; depth++) {
      const next: string[] = [];
      for (const a of frontier) {
        const d = a.slice(a.lastIndexOf("@") + 1);
        if (!this.isLocalDomain(d)) {
          remote.add(a);
          continue;
        }
        const targets = await this.aliasTargets(a);
        if (targets.length) next.push(...targets);
        else if (await this.userExists(a)) mailboxes.add(a);
        if (mailboxes.size + remote.size + next.length > EXPANSION_MAX) break;
      }
      frontier = next;
    }
    if (mailboxes.size === 0 && remote.size === 0) return { kind: "unknown" };
    return { kind: "local", mailboxes: [...mailboxes], remote: [...remote] };
  }

  /** USER's stored password hash (for SMTP AUTH, auth.ts), or null when there is no such active user. */
  async storedPassword(user: string): Promise<string | null> {
    const [rows] = await this.pool.query("SELECT password FROM users WHERE email = ? AND active = 1", [user.toLowerCase()]);
    return (rows as { password: string }[])[0]?.password ?? null;
  }

  /** Every address mail is accepted for (users and alias sources), for the backup MX. */
  async allRecipients(): Promise<string[]> {
    const [u] = await this.pool.query("SELECT email AS a FROM users WHERE active = 1 UNION SELECT source AS a FROM aliases");
    return (u as { a: string }[]).map((r) => r.a.toLowerCase());
  }

  async close(): Promise<void> {
    await this.pool.end();
  }
}
