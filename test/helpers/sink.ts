// A sink SMTP server for tests, standing in for another organisation's MX: it accepts
// everything on HOST:25 and writes each message to DIR. Run it in the lab's third
// host: nsenter --net=/run/netns/mailha-X-w node --import tsx sink.ts HOST DIR
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { SMTPServer } from "smtp-server";

const [host, dir] = process.argv.slice(2);
mkdirSync(dir!, { recursive: true });
let n = 0;
const server = new SMTPServer({
  authOptional: true,
  disabledCommands: ["AUTH", "STARTTLS"],
  logger: false,
  onData(stream, session, cb) {
    const chunks: Buffer[] = [];
    stream.on("data", (d: Buffer) => chunks.push(d));
    stream.on("end", () => {
      writeFileSync(join(dir!, `${++n}.eml`), Buffer.concat(chunks));
      writeFileSync(join(dir!, `${n}.json`), JSON.stringify({ from: session.envelope.mailFrom, to: session.envelope.rcptTo }));
      cb(null, "2.0.0 sunk");
    });
  },
});
server.listen(25, host, () => process.stdout.write("listening\n"));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
