// Where a node keeps its files. `data` is where replicated data lives (MariaDB's
// datadir, Redis's AOF, the Maildirs); today a plain directory under the state dir,
// the replicated volume's mount point once the volume resource mounts it there.
import { join } from "node:path";

export interface NodePaths {
  readonly state: string;
  /** Sockets and pid files. */
  readonly run: string;
  /** Logs of this node's daemons. */
  readonly log: string;
  /** Generated configuration files. */
  readonly etc: string;
  /** Replicated data: mariadb/, redis/, mail/, journal/. */
  readonly data: string;
}

export function nodePaths(stateDir: string): NodePaths {
  return {
    state: stateDir,
    run: join(stateDir, "run"),
    log: join(stateDir, "log"),
    etc: join(stateDir, "etc"),
    data: join(stateDir, "data"),
  };
}
