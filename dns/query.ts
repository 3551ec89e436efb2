// A minimal DNS client over UDP (dns-packet): one question to one server, with a
// timeout and a bounded number of tries. Used for readiness and verification.
// Answers are untrusted: a datagram counts only if it comes from the server's address
// and port, decodes, is a response with our id and echoes our question; anything else
// is dropped inside the handler and counted (queryCounters), never thrown.
import { randomInt } from "node:crypto";
import dnsPacket from "dns-packet";
import { exchange, type Judgement } from "./update.ts";

export interface Answer {
  readonly rcode: string;
  readonly answers: dnsPacket.Answer[];
}

/** What became of each datagram a query socket received. */
export type QueryVerdict = "accepted" | "foreign" | "malformed" | "mismatched";
/** Datagrams received by query clients in this process, by verdict. */
export const queryCounters: { received: number } & Record<QueryVerdict, number> = { received: 0, accepted: 0, foreign: 0, malformed: 0, mismatched: 0 };

export async function query(server: string, port: number, name: string, type: dnsPacket.RecordType, timeoutMs = 1000, tries = 3): Promise<Answer> {
  let last: Error | null = null;
  for (let i = 0; i < tries; i++) {
    try {
      return await queryOnce(server, port, name, type, timeoutMs);
    } catch (err) {
      last = err as Error;
    }
  }
  throw last ?? new Error("no answer");
}

/** The verdict on one datagram, and the answer when it is ours. */
export function judgeAnswer(msg: Buffer, id: number, name: string, type: dnsPacket.RecordType): Judgement<Answer, Exclude<QueryVerdict, "foreign" | "accepted">> {
  let p: dnsPacket.Packet;
  try {
    p = dnsPacket.decode(msg);
  } catch {
    return { verdict: "malformed" };
  }
  if (p.id !== id || p.type !== "response") return { verdict: "mismatched" };
  const q = p.questions?.[0];
  if (p.questions?.length !== 1 || q?.type !== type || q.name.toLowerCase().replace(/\.$/, "") !== name.toLowerCase().replace(/\.$/, "")) return { verdict: "mismatched" };
  return { verdict: "accepted", result: { rcode: (p as { rcode?: string }).rcode ?? "NOERROR", answers: p.answers ?? [] } };
}

function queryOnce(server: string, port: number, name: string, type: dnsPacket.RecordType, timeoutMs: number): Promise<Answer> {
  const id = randomInt(0, 65536);
  const msg = dnsPacket.encode({ type: "query", id, flags: 0, questions: [{ name, type, class: "IN" }] });
  return exchange(server, port, msg, timeoutMs, (m) => judgeAnswer(m, id, name, type), queryCounters).catch((err: Error) => {
    throw new Error(`${name} ${type}: ${err.message}`);
  });
}
