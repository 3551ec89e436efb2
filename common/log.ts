// The JSON logger (pino) every mailha process uses; one line per event.
import { pino, type Logger } from "pino";

export type { Logger };

/** A logger that writes JSON lines to stderr (fd 2), so stdout stays for results. */
export function createLogger(name: string, level: string = process.env.MAILHA_LOG_LEVEL ?? "info"): Logger {
  return pino({ name, level, base: { pid: process.pid } }, pino.destination(2));
}
