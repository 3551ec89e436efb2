// Where a node keeps its files. `data` is where replicated data lives (MariaDB's
// datadir, Redis's AOF, the Maildirs); today a plain directory under the state dir,
// the replicated volume's mount point once the volume resource mounts it there.
import { join } from "node:path";
import type { MailhaConfig } from "./config.ts";

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

/** A node's state directory: lab.dir/ID in the lab, paths.state_dir on a real node. */
export function nodeStateDir(c: MailhaConfig, nodeId: string): string {
  return c.lab ? join(c.lab.dir, nodeId) : c.paths.state_dir;
}

/** The network namespace a lab node's processes run in (none on a real node). */
export function nodeNetns(c: MailhaConfig, nodeId: string): string | undefined {
  return c.lab ? `mailha-${c.lab.name}-${nodeId}` : undefined;
}
