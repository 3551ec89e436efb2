// Mutual challenge-response over the replication secret (HMAC-SHA256): each side sends
// a random nonce and proves it knows the secret by MACing both nonces, its own node id
// and the cluster name. The secret never crosses the wire; a replayed proof does not
// match a fresh nonce; a wrong secret is refused. Each direction of the session then
// has its own frame key, derived from the secret, the sender and both nonces, so the
// frames of one session are worthless in another and in the other direction.
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";

export interface AuthHello {
  readonly node: string;
  readonly cluster: string;
  readonly nonce: string;
}

export function makeNonce(): string {
  return randomBytes(32).toString("hex");
}

/** The proof that SENDER, holding SECRET, answers to the challenge RECEIVERNONCE. */
export function proof(secret: Buffer, cluster: string, sender: string, receiverNonce: string, senderNonce: string): string {
  return createHmac("sha256", secret).update(`mailha-volume-auth-v1|${cluster}|${sender}|${receiverNonce}|${senderNonce}`).digest("hex");
}

export function verifyProof(secret: Buffer, cluster: string, sender: string, myNonce: string, senderNonce: string, mac: string): boolean {
  const want = Buffer.from(proof(secret, cluster, sender, myNonce, senderNonce), "hex");
  const got = Buffer.from(typeof mac === "string" ? mac : "", "hex");
  return got.length === want.length && timingSafeEqual(got, want);
}

/** The key that authenticates the frames SENDER sends in the session of these two nonces. */
export function sessionKey(secret: Buffer, cluster: string, sender: string, senderNonce: string, receiverNonce: string): Buffer {
  return createHmac("sha256", secret).update(`mailha-volume-frames-v1|${cluster}|${sender}|${senderNonce}|${receiverNonce}`).digest();
}
