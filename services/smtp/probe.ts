// A monitor probe for SMTP: greeting 220, EHLO answered with 250, QUIT; bounded.
import { createConnection } from "node:net";

export function smtpEhloWorks(host: string, port: number, timeoutMs = 3000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection({ host, port });
    let buf = "";
    let step: "greeting" | "ehlo" = "greeting";
    const done = (ok: boolean) => {
      clearTimeout(t);
      s.destroy();
      resolve(ok);
    };
    const t = setTimeout(() => done(false), timeoutMs);
    s.on("error", () => done(false));
    s.on("data", (d) => {
      buf += d.toString("latin1");
      for (;;) {
        const nl = buf.indexOf("\r\n");
        if (nl < 0) return;
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 2);
        if (step === "greeting") {
          if (!line.startsWith("220")) return done(false);
          if (line.startsWith("220 ")) {
            step = "ehlo";
            s.write("EHLO mailha-monitor\r\n");
          }
        } else {
          if (!line.startsWith("250")) return done(false);
          if (line.startsWith("250 ")) {
            s.write("QUIT\r\n");
            return done(true);
          }
        }
      }
    });
  });
}
