// Sends UDP datagrams (hex payloads) to HOST:PORT; run inside a lab namespace to
// play an attacker on the third host: node --import tsx udp-send.ts HOST PORT HEX...
import { createSocket } from "node:dgram";

const [host, port, ...payloads] = process.argv.slice(2);
const sock = createSocket("udp4");
let left = payloads.length;
for (const hex of payloads) {
  sock.send(Buffer.from(hex, "hex"), Number(port), host, () => {
    if (--left === 0) sock.close();
  });
}
