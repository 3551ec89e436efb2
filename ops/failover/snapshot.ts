// A look at a mailbox before and after a trial: UIDVALIDITY, every UID, which UIDs
// carry \Seen, and the UIDs of each tagged message (two UIDs for one id = a duplicate).
import { ImapFlow } from "imapflow";
import type { Finder } from "./resolve.ts";
import type { Mailbox } from "./workloads.ts";

export interface Snapshot {
  readonly uidValidity: bigint;
  readonly uids: ReadonlySet<number>;
  readonly seen: ReadonlySet<number>;
  readonly ids: ReadonlyMap<string, number[]>;
}

export async function imapSnapshot(find: Finder, box: Mailbox): Promise<Snapshot> {
  const hosts = await find.mailHostAddresses();
  for (let attempt = 0; attempt < 5; attempt++) {
    for (const host of hosts) {
      const c = new ImapFlow({ host, port: 143, secure: false, doSTARTTLS: true, tls: { rejectUnauthorized: false }, auth: { user: box.address, pass: box.password }, logger: false, connectionTimeout: 3000, greetingTimeout: 3000, socketTimeout: 30_000 });
      c.on("error", () => {});
      try {
        await c.connect();
        const mb = await c.mailboxOpen("INBOX", { readOnly: true });
        const uids = new Set<number>();
        const seen = new Set<number>();
        const ids = new Map<string, number[]>();
        if (mb.exists > 0) {
          for await (const m of c.fetch("1:*", { uid: true, flags: true, headers: ["x-mailha-test-id"] })) {
            uids.add(m.uid);
            if (m.flags?.has("\\Seen")) seen.add(m.uid);
            const id = /x-mailha-test-id:\s*(\S+)/i.exec(m.headers?.toString() ?? "")?.[1];
            if (id) ids.set(id, [...(ids.get(id) ?? []), m.uid]);
          }
        }
        await c.logout();
        return { uidValidity: mb.uidValidity, uids, seen, ids };
      } catch {
        c.close();
      }
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
  throw new Error(`no IMAP server answered on ${hosts.join(", ")} for ${box.address}`);
}
