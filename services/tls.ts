// TLS material for the services: a self-signed certificate for the lab (production
// configures its own paths). Generated with openssl, key mode 0600.
import { chmodSync, existsSync, mkdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { run } from "../common/exec.ts";
import { fsyncPath } from "../common/fsutil.ts";

export interface TlsFiles {
  readonly cert: string;
  readonly key: string;
}

/** Creates DIR/tls.crt and DIR/tls.key for NAMES unless both exist. */
export async function ensureSelfSignedCert(dir: string, names: readonly string[]): Promise<TlsFiles> {
  const files = { cert: join(dir, "tls.crt"), key: join(dir, "tls.key") };
  if (existsSync(files.cert) && existsSync(files.key) && statSync(files.cert).size > 0 && statSync(files.key).size > 0) return files;
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const san = names.map((n) => `DNS:${n}`).join(",");
  await run("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", files.key, "-out", files.cert, "-days", "825",
    "-subj", `/CN=${names[0] ?? "mailha"}`, "-addext", `subjectAltName=${san}`,
  ]);
  chmodSync(files.key, 0o600);
  // The files may live on the replicated volume: make them durable before use.
  fsyncPath(files.cert);
  fsyncPath(files.key);
  fsyncPath(dir);
  return files;
}
