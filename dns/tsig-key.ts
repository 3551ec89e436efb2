// TSIG key files in the format BIND's tsig-keygen writes and nsupdate -k reads:
//   key "NAME" { algorithm hmac-sha256; secret "BASE64"; };
// Parsed here so that mailha's own RFC 2136 client uses the very file BIND uses.
import { randomBytes } from "node:crypto";

export interface TsigKey {
  readonly name: string;
  readonly algorithm: string;
  readonly secret: Buffer;
}

const KEY_RE = /key\s+"?([A-Za-z0-9._-]+)"?\s*\{\s*algorithm\s+([A-Za-z0-9-]+)\s*;\s*secret\s+"([A-Za-z0-9+/=]+)"\s*;\s*\}\s*;/;

export function parseTsigKeyFile(text: string): TsigKey {
  const m = KEY_RE.exec(text);
  if (!m) throw new Error('not a TSIG key file: expected key "NAME" { algorithm hmac-sha256; secret "BASE64"; };');
  return { name: m[1]!, algorithm: m[2]!.toLowerCase(), secret: Buffer.from(m[3]!, "base64") };
}

export function renderTsigKeyFile(name: string, secret: Buffer = randomBytes(32), algorithm = "hmac-sha256"): string {
  return `key "${name}" {\n\talgorithm ${algorithm};\n\tsecret "${secret.toString("base64")}";\n};\n`;
}
