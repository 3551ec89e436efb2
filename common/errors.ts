// Errors that carry the exit code the `mailha` command documents:
// 0 ok, 1 failure, 2 usage or configuration error.

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

/** One problem in a configuration file: where, what was expected, what was found. */
export interface ConfigProblem {
  readonly path: string;
  readonly expected: string;
  readonly found: string;
}

/** A configuration that must not be used; `problems` lists every reason. */
export class ConfigError extends Error {
  readonly exitCode = EXIT_USAGE;
  constructor(readonly file: string, readonly problems: readonly ConfigProblem[]) {
    super(`${file}: ${problems.length} problem(s)\n` + problems.map(formatProblem).join("\n"));
    this.name = "ConfigError";
  }
}

export function formatProblem(p: ConfigProblem): string {
  return `  ${p.path}: expected ${p.expected}, found ${p.found}`;
}

/** The operator asked for something that cannot be done as asked. */
export class UsageError extends Error {
  readonly exitCode = EXIT_USAGE;
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

export function exitCodeOf(err: unknown): number {
  if (err && typeof err === "object" && "exitCode" in err && typeof err.exitCode === "number") return err.exitCode;
  return EXIT_FAILURE;
}
