// A minimal DNS client over UDP (dns-packet): one question to one server, with a
// timeout and a bounded number of tries. Used for readiness and verification.
import { createSocket } from "node:dgram";
import { randomInt } from "node:crypto";
import dnsPacket from "dns-packet";

export interface Answer {
  readonly rcode: string;
  readonly answers: dnsPacket.Answer[];
}

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

function queryOnce(server: string, port: number, name: string, type: dnsPacket.RecordType, timeoutMs: number): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const id = randomInt(0, 65536);
    const sock = createSocket("udp4");
    const t = setTimeout(() => {
      sock.close();
      reject(new Error(`no answer from ${server}:${port} for ${name} ${type} within ${timeoutMs} ms`));
    }, timeoutMs);
    sock.on("error", (err) => {
      clearTimeout(t);
      sock.close();
      reject(err);
    });
    sock.on("message", (msg) => {
      const p = dnsPacket.decode(msg);
      if (p.id !== id) return;
      clearTimeout(t);
      sock.close();
      resolve({ rcode: (p as { rcode?: string }).rcode ?? "NOERROR", answers: p.answers ?? [] });
    });
    sock.send(dnsPacket.encode({ type: "query", id, flags: 0, questions: [{ name, type, class: "IN" }] }), port, server);
  });
}
