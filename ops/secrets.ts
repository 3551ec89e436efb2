// Creates the cluster's secret files (heartbeat key, replication secret, TSIG key)
// where the config says, mode 0600, never overwriting one that exists.
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { secretFiles, type MailhaConfig } from "../common/config.ts";
import { renderTsigKeyFile } from "../dns/tsig-key.ts";

export interface SecretResult {
  readonly key: string;
  readonly path: string;
  readonly created: boolean;
}

export function generateSecrets(c: MailhaConfig): SecretResult[] {
  return secretFiles(c).map((s) => {
    if (existsSync(s.path)) return { key: s.key, path: s.path, created: false };
    mkdirSync(dirname(s.path), { recursive: true, mode: 0o700 });
    const body = s.key === "dns.tsig_key_file" ? renderTsigKeyFile(`mailha-${c.cluster.name}`) : `${randomBytes(32).toString("hex")}\n`;
    writeFileSync(s.path, body, { mode: 0o600, flag: "wx" });
    return { key: s.key, path: s.path, created: true };
  });
}
