// How a long-running mailha process ends: SIGTERM or SIGINT runs its close step once
// and exits 0; SIGHUP is ignored (processes run in their own session and must not die
// with a terminal).
export function runUntilSignalled(close: () => Promise<void> | void): Promise<never> {
  let closing = false;
  const stop = () => {
    if (closing) return;
    closing = true;
    void Promise.resolve()
      .then(close)
      .catch(() => {})
      .finally(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  process.on("SIGHUP", () => {});
  return new Promise<never>(() => {});
}
