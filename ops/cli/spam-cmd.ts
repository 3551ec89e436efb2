// `mailha spam classify|train|stats|purge|import|status|worker`: the operator's side of
// the spam filter (services/spam/), run on the active node against its MariaDB (the
// tokens live on the replicated volume). `classify` changes nothing (a read-only
// transaction; a user the filter has not seen is classified with uid 0's defaults and
// empty counts); `train` learns a corpus for a user (Maildir folders, mbox files or
// single message files), each message once (the ledger); `purge` applies DSPAM's purge
// rules (under the purge lock the nightly job takes too); `import` loads a DSPAM
// mysqldump; `status` shows the spam worker's feedback loop and purge schedule;
// `worker` is the spam worker daemon itself (the node daemon's `spam` resource);
// `quarantine list|digest|release|delete` acts on the held spam of users whose spam_action is
// quarantine (services/spam/quarantine.ts), each release or deletion journaled before it
// is done; `digest` sends the users' notices now (quarantine-digest.ts).
// Bounds: at most TRAIN_MESSAGES_MAX messages per run, each read up to the filter's
// analysis cap; an mbox is split on its "From " lines as it is streamed.
import { closeSync, createReadStream, existsSync, openSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { Command, Option } from "commander";
import type { Connection } from "mysql2/promise";
import { loadConfig, type MailhaConfig } from "../../common/config.ts";
import { UsageError } from "../../common/errors.ts";
import { nodePaths, nodeStateDir } from "../../common/paths.ts";
import { activeLocalNode } from "../../cluster/client.ts";
import { Queue } from "bullmq";
import { runUntilSignalled } from "../../common/lifecycle.ts";
import { createLogger } from "../../common/log.ts";
import { resolveNode } from "../../replication/client.ts";
import { dovecotPaths } from "../../services/dovecot.ts";
import { redisConnection, redisPaths } from "../../services/redis.ts";
import { purgeLocked } from "../../services/spam/purge.ts";
import { DIGEST_SCHEDULER, PURGE_QUEUE, PURGE_SCHEDULER, runSpamWorker, type SpamWorker } from "../../services/spam/worker.ts";
import { readSpamWorkerStatus, spamWorkerStatusFile } from "../../services/spam/worker-status.ts";
import { DATABASE } from "../../services/accounts.ts";
import { connectMariadb, mariadbPaths } from "../../services/mariadb.ts";
import { ImportConflict, importDspamDump } from "../../services/spam/dump.ts";
import { classifyMessage, parsePreferences, readPreferences, retrainAndApply } from "../../services/spam/filter.ts";
import { MariadbSpamStore, migrateSpam } from "../../services/spam/store.ts";
import { journalSpamDeltas, spamJournalFor } from "../../services/spam/journal.ts";
import { ChangeJournal } from "../../services/journal/changes.ts";
import { journalTarget } from "../../services/journal/accounts.ts";
import { deleteHeld, listHeld, NotHeld, type QuarantineTarget } from "../../services/spam/quarantine.ts";
import { sendDigests } from "../../services/spam/quarantine-digest.ts";
import { releaseAndRetrain } from "../../services/spam/release.ts";
import { createOutput, table } from "./output.ts";

const TRAIN_MESSAGES_MAX = 1_000_000;
const MESSAGE_BYTES_MAX = 64 * 1024 * 1024;

const configOpt = (def: string) => new Option("-c, --config <file>", "cluster configuration file").default(def);
const jsonOpt = () => new Option("--json", "print the result as JSON");

async function activeSocket(c: MailhaConfig): Promise<string> {
  const id = await activeLocalNode(c);
  if (!id) throw new Error("no active node here: run this on the active node (see mailha status)");
  return mariadbPaths(nodePaths(nodeStateDir(c, id))).socket;
}

/** The preferences `mailha spam prefs` sets, their values, and DSPAM's name for each. */
const PREF_VALUES: Record<string, RegExp> = { spam_action: /^(junk|tag|quarantine)$/, training_mode: /^(toe|teft|tum|notrain)$/, algorithms: /^(graham burton|graham|burton|chi-square)$/ };
const PREF_HELP: Record<string, string> = { spam_action: "junk, tag or quarantine", training_mode: "toe, teft, tum or notrain", algorithms: '"graham burton", graham, burton or chi-square' };
const PREF_DSPAM_NAME: Record<string, string> = { spam_action: "spamAction", training_mode: "trainingMode", algorithms: "algorithm" };

async function withStore<T>(config: string, fn: (s: MariadbSpamStore, db: Connection) => Promise<T>, o: { readOnly?: boolean } = {}): Promise<T> {
  const db = await connectMariadb(await activeSocket(loadConfig(config)), DATABASE);
  try {
    if (o.readOnly) {
      // The tables exist (made at every activation); a write in here fails instead of happening.
      await db.query("START TRANSACTION READ ONLY");
      try {
        return await fn(new MariadbSpamStore(db), db);
      } finally {
        await db.query("ROLLBACK").catch(() => undefined);
      }
    }
    await migrateSpam(db);
    return await fn(new MariadbSpamStore(db), db);
  } finally {
    await db.end();
  }
}

/** USER's DSPAM uid if the filter knows the user, without making one (0: uid 0's defaults, no counts). */
export async function knownUid(db: Connection, user: string): Promise<number> {
  const [rows] = await db.query(`SELECT uid FROM ${DATABASE}.dspam_virtual_uids WHERE username = ?`, [user]);
  return Number((rows as { uid: number }[])[0]?.uid ?? 0);
}

/** Every message under PATH: a Maildir (its cur/ and new/), a folder of files, an mbox, or one file. */
export async function* messagesOf(path: string): AsyncGenerator<{ name: string; data: Buffer }> {
  if (!existsSync(path)) throw new UsageError(`${path}: no such file or folder`);
  const st = statSync(path);
  if (st.isDirectory()) {
    const subs = ["cur", "new"].filter((d) => existsSync(join(path, d)));
    const dirs = subs.length ? subs.map((d) => join(path, d)) : [path];
    for (const d of dirs) {
      for (const f of readdirSync(d).sort()) {
        const p = join(d, f);
        if (f.startsWith(".") || !statSync(p).isFile()) continue;
        if (statSync(p).size > MESSAGE_BYTES_MAX) continue;
        yield { name: p, data: readFileSync(p) };
      }
    }
    return;
  }
  const head = Buffer.alloc(5);
  const fd = openSync(path, "r");
  try {
    readSync(fd, head, 0, 5, 0);
  } finally {
    closeSync(fd);
  }
  if (head.toString("latin1") !== "From ") {
    if (st.size <= MESSAGE_BYTES_MAX) yield { name: path, data: readFileSync(path) };
    return;
  }
  // An mbox: messages start at lines "From "; ">From " lines are unquoted.
  let lines: string[] = [];
  let bytes = 0;
  let n = 0;
  const flush = function* () {
    if (lines.length === 0) return;
    const body = lines.map((l) => (/^>+From /.test(l) ? l.slice(1) : l)).join("\n");
    lines = [];
    bytes = 0;
    yield { name: `${path}#${++n}`, data: Buffer.from(body, "latin1") };
  };
  for await (const line of createInterface({ input: createReadStream(path, { encoding: "latin1" }), crlfDelay: Infinity })) {
    if (line.startsWith("From ")) {
      yield* flush();
      continue;
    }
    bytes += line.length + 1;
    if (bytes <= MESSAGE_BYTES_MAX) lines.push(line);
  }
  yield* flush();
}

/** The user's keys to act on: KEYS, or with ALL every one held; at least one asked for. */
function keysOf(mailRoot: string, user: string, keys: readonly string[], all: boolean): string[] {
  if (all === keys.length > 0) throw new UsageError("name the messages' keys (see mailha spam quarantine list) or say --all (one of them)");
  return all ? listHeld(mailRoot, user).map((h) => h.key) : [...keys];
}

const clip = (s: string, n: number) => (s.length > n ? `${s.slice(0, n - 1)}…` : s);

/** The active node's mail root (`<volume>/mail`). */
async function activeMailRoot(c: MailhaConfig): Promise<string> {
  const id = await activeLocalNode(c);
  if (!id) throw new Error("no active node here: run this on the active node (see mailha status)");
  return join(nodePaths(nodeStateDir(c, id)).data, "mail");
}

/** The mail root and the change journal of DB's volume (every quarantine action is journaled before it is done). */
async function quarantineTarget(db: Connection): Promise<QuarantineTarget & { journal: ChangeJournal }> {
  const t = await journalTarget(db);
  if (!t) throw new Error("the change journal is not ready on the active node (the journal resource writes its marker): try again when mailha status shows it running");
  return { mailRoot: join(t.dataDir, "mail"), journal: new ChangeJournal(t.dataDir, t.node) };
}

export function spamCommand(defaultConfig: string): Command {
  const spam = new Command("spam").description("the spam filter: classify a message, train a corpus, statistics, purge, import DSPAM data (on the active node)");

  spam
    .command("classify")
    .argument("<file>", "a message file")
    .description("the verdict for FILE as USER's filter sees it, with the tokens that decided; learns nothing")
    .requiredOption("-u, --user <address>", "whose tokens")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (file: string, o: { user: string; config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      if (!existsSync(file)) throw new UsageError(`${file}: no such file`);
      const { uid, r } = await withStore(
        o.config,
        async (store, db) => {
          // Looked up, never made: a look must not change what the filter knows (NOTRAIN too).
          const uid = await knownUid(db, o.user.toLowerCase());
          const prefs = await readPreferences(store, uid);
          return { uid, r: await classifyMessage(store, uid, readFileSync(file), { ...prefs, training_mode: "notrain" }) };
        },
        { readOnly: true },
      );
      const top = r.tokens.slice(0, 15);
      out.result({ file, user: o.user.toLowerCase(), uid, known: uid !== 0, result: r.result, probability: r.probability, confidence: r.confidence, headers: r.headers, tokens: top, reasons: r.reasons, passedThrough: r.passedThrough }, () =>
        [
          `${file}: ${r.result} (probability ${r.probability.toFixed(4)}, confidence ${r.confidence.toFixed(2)})${r.passedThrough ? " - passed through, nothing readable" : ""}`,
          ...(r.reasons.length ? [`  the tokenizer stopped early: ${r.reasons.join(", ")}`] : []),
          ...top.map((t) => `  ${t.probability.toFixed(3)}  spam ${t.spam_hits}  innocent ${t.innocent_hits}  ${t.name ?? t.token}`),
        ].join("\n"),
      );
    });

  spam
    .command("train")
    .argument("<path...>", "Maildir folders, folders of message files, mbox files or message files")
    .description("learn PATHs as spam or as ham (innocent) for USER; a message already learned is not learned twice")
    .requiredOption("-u, --user <address>", "whose tokens")
    .option("--spam", "the messages are spam")
    .option("--ham", "the messages are ham (innocent)")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (paths: string[], o: { user: string; spam?: boolean; ham?: boolean; config: string; json?: boolean }) => {
      if (!!o.spam === !!o.ham) throw new UsageError("say --spam or --ham (one of them)");
      const out = createOutput(!!o.json);
      const asClass = o.spam ? "spam" : "innocent";
      const r = await withStore(o.config, async (store, db) => {
        const user = o.user.toLowerCase();
        const uid = await store.uidFor(user);
        // Every delta journaled before it is applied (a split brain's merge adds them).
        const journal = await spamJournalFor(db);
        if (!journal) process.stderr.write("mailha: warning: the change journal is not ready on the active node: this training is not journaled\n");
        try {
          return await trainAll(store, uid, user, journal);
        } finally {
          await journal?.close();
        }
      });
      out.result(r, () => `${r.user}: ${r.messages} messages read, ${r.learned} learned as ${r.as} (${r.messages - r.learned} known already); now ${r.totals.spam_learned} spam and ${r.totals.innocent_learned} ham learned`);

      async function trainAll(store: MariadbSpamStore, uid: number, user: string, journal: ChangeJournal | null) {
        let seen = 0;
        let learned = 0;
        for (const p of paths) {
          for await (const m of messagesOf(p)) {
            if (++seen > TRAIN_MESSAGES_MAX) throw new UsageError(`more than ${TRAIN_MESSAGES_MAX} messages: train in parts`);
            const deltas = await retrainAndApply(store, uid, m.data, asClass, "corpus", undefined, 3, journal ? (d) => journalSpamDeltas(journal, user, d) : undefined);
            if (deltas.length > 0) learned++;
            if (seen % 50 === 0) out.progress("training", { messages: seen, learned });
          }
        }
        return { user, as: asClass, messages: seen, learned, totals: await store.totals(uid) };
      }
    });

  spam
    .command("stats")
    .description("per user: messages learned, misclassified, classified (DSPAM's dspam_stats)")
    .option("-u, --user <address>", "one user")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (o: { user?: string; config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const rows = await withStore(o.config, async (store, db) => {
        const [users] = await db.query(`SELECT uid, username FROM ${DATABASE}.dspam_virtual_uids${o.user ? " WHERE username = ?" : ""} ORDER BY username`, o.user ? [o.user.toLowerCase()] : []);
        const list: { user: string; uid: number; totals: Awaited<ReturnType<typeof store.totals>> }[] = [];
        for (const u of users as { uid: number; username: string }[]) list.push({ user: u.username, uid: u.uid, totals: await store.totals(u.uid) });
        return list;
      });
      if (o.user && rows.length === 0) throw new UsageError(`${o.user}: the filter has seen no mail of this user`);
      out.result(rows, () =>
        rows.length === 0
          ? "no user has spam-filter data yet"
          : rows
              .map((r) => `${r.user}: spam learned ${r.totals.spam_learned}, ham learned ${r.totals.innocent_learned}, spam missed ${r.totals.spam_misclassified}, ham flagged ${r.totals.innocent_misclassified}, classified ${r.totals.spam_classified} spam / ${r.totals.innocent_classified} ham`)
              .join("\n"),
      );
    });

  spam
    .command("prefs")
    .description("a user's preferences (or, without --user, everyone's defaults): spam_action junk|tag|quarantine, training_mode toe|teft|tum|notrain, algorithms")
    .option("-u, --user <address>", "the user (default: the defaults, DSPAM's uid 0)")
    .option("--set <key=value>", "set a preference (repeatable)", (v: string, prev: string[] = []) => [...prev, v])
    .option("--unset <key>", "remove a preference: the default applies again (repeatable)", (v: string, prev: string[] = []) => [...prev, v])
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (o: { user?: string; set?: string[]; unset?: string[]; config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const sets = (o.set ?? []).map((kv) => {
        const m = /^([a-z_A-Z]+)=(.+)$/.exec(kv.trim());
        if (!m) throw new UsageError(`--set ${kv}: expected KEY=VALUE`);
        const [key, value] = [m[1]!, m[2]!.trim().toLowerCase()];
        const allowed = PREF_VALUES[key];
        if (!allowed) throw new UsageError(`--set ${key}: not a preference (known: ${Object.keys(PREF_VALUES).join(", ")})`);
        if (!allowed.test(value)) throw new UsageError(`--set ${key}=${value}: expected ${PREF_HELP[key]}`);
        return [key, value] as const;
      });
      for (const k of o.unset ?? []) if (!PREF_VALUES[k]) throw new UsageError(`--unset ${k}: not a preference (known: ${Object.keys(PREF_VALUES).join(", ")})`);
      const r = await withStore(o.config, async (store, db) => {
        const uid = o.user ? await store.uidFor(o.user.toLowerCase()) : 0;
        for (const [k, v] of sets) {
          // One name per preference: DSPAM's camelCase twin goes, so the two never disagree.
          await db.query(`DELETE FROM ${DATABASE}.dspam_preferences WHERE uid = ? AND preference = ?`, [uid, PREF_DSPAM_NAME[k]]);
          await store.setPreference(uid, k, v);
        }
        for (const k of o.unset ?? []) await db.query(`DELETE FROM ${DATABASE}.dspam_preferences WHERE uid = ? AND preference IN (?, ?)`, [uid, k, PREF_DSPAM_NAME[k]]);
        // SMTP keeps a user's preferences with their learn generation: this makes it read them again.
        if (sets.length || o.unset?.length) await store.preferencesChanged(uid);
        const rows = await store.preferences(uid);
        return { user: o.user?.toLowerCase() ?? null, uid, rows, effective: parsePreferences(rows) };
      });
      out.result(r, () => `${r.user ?? "defaults (uid 0)"}: spam_action ${r.effective.spam_action}, training_mode ${r.effective.training_mode}, algorithms ${r.effective.algorithms.join(" ")}${Object.keys(r.rows).length ? ` (set: ${Object.entries(r.rows).map(([k, v]) => `${k}=${v}`).join(", ")})` : " (all defaults)"}`);
    });

  const quarantine = spam
    .command("quarantine")
    .description("spam held for users whose spam_action is quarantine (beside their Maildir, not shown to mail clients): list, release into the INBOX, delete");

  quarantine
    .command("list")
    .description("the held messages, oldest first: key, when held, sender, subject, probability")
    .option("-u, --user <address>", "one user's")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (o: { user?: string; config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const mailRoot = await activeMailRoot(loadConfig(o.config));
      const held = listHeld(mailRoot, o.user);
      out.result(held, () =>
        held.length === 0
          ? `nothing in quarantine${o.user ? ` for ${o.user.toLowerCase()}` : ""}`
          : table([["user", "key", "held", "from", "subject", "probability", "size"], ...held.map((h) => [h.user, h.key, h.held.slice(0, 19).replace("T", " "), clip(h.from, 40), clip(h.subject, 50), h.probability, String(h.size)])]),
      );
    });

  quarantine
    .command("digest")
    .description("send now the notice each user gets (spam.quarantine_digest_cron): into their INBOX, what was held for them since the last notice; nothing new, no notice")
    .option("-u, --user <address>", "one user's")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (o: { user?: string; config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const c = loadConfig(o.config);
      const mailRoot = await activeMailRoot(c);
      const sent = await sendDigests({ mailRoot, dataDir: dirname(mailRoot), uid: c.mail.mail_uid, gid: c.mail.mail_gid, quarantineDays: c.spam.quarantine_days, ...(o.user ? { user: o.user } : {}) });
      out.result(sent, () =>
        sent.length === 0 ? `nothing in quarantine${o.user ? ` for ${o.user.toLowerCase()}` : ""}: no notice` : sent.map((d) => `${d.user}: ${d.listed ? `a notice of ${d.listed} held since the last one (${d.held} in all)` : `nothing new (${d.held} held, listed before): no notice`}`).join("\n"),
      );
    });

  quarantine
    .command("release")
    .argument("[key...]", "the held messages' keys (from quarantine list)")
    .description("move held messages into the user's INBOX, and retrain each as innocent (a false positive); journaled, so a split brain's merge carries it")
    .requiredOption("-u, --user <address>", "whose quarantine")
    .option("--all", "every message the user has in quarantine")
    .option("--no-train", "release without retraining")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (keys: string[], o: { user: string; all?: boolean; train: boolean; config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const user = o.user.toLowerCase();
      const r = await withStore(o.config, async (store, db) => {
        const t = await quarantineTarget(db);
        const todo = keysOf(t.mailRoot, user, keys, !!o.all);
        try {
          const released = await releaseAndRetrain(store, t, user, todo, o.train, (_r, n) => {
            if (n % 50 === 0) out.progress("releasing", { released: n, of: todo.length });
          });
          return { user, released };
        } catch (err) {
          if (err instanceof NotHeld) throw new UsageError(err.message);
          throw err;
        } finally {
          await t.journal.close();
        }
      });
      out.result(r, () => (r.released.length === 0 ? `nothing in quarantine for ${user}` : r.released.map((x) => `${x.key}: released into ${user}'s INBOX${x.retrained ? ", retrained as innocent" : ""}`).join("\n")));
    });

  quarantine
    .command("delete")
    .argument("[key...]", "the held messages' keys (from quarantine list)")
    .description("delete held messages (journaled, so a split brain's merge carries it)")
    .requiredOption("-u, --user <address>", "whose quarantine")
    .option("--all", "every message the user has in quarantine")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (keys: string[], o: { user: string; all?: boolean; config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const user = o.user.toLowerCase();
      const r = await withStore(o.config, async (_store, db) => {
        const t = await quarantineTarget(db);
        const todo = keysOf(t.mailRoot, user, keys, !!o.all);
        const deleted: string[] = [];
        try {
          for (const key of todo) {
            try {
              await deleteHeld(t, user, key);
            } catch (err) {
              if (err instanceof NotHeld) throw new UsageError(err.message);
              throw err;
            }
            deleted.push(key);
          }
        } finally {
          await t.journal.close();
        }
        return { user, deleted };
      });
      out.result(r, () => (r.deleted.length === 0 ? `nothing in quarantine for ${user}` : `${r.deleted.length} deleted from ${user}'s quarantine`));
    });

  spam
    .command("purge")
    .description("DSPAM's purge rules: signatures after 14 days, hapaxes after 30, unused tokens after 90; held spam after spam.quarantine_days")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (o: { config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const c = loadConfig(o.config);
      const r = await withStore(o.config, async (_store, db) => {
        const t = await quarantineTarget(db);
        try {
          return await purgeLocked(db, { quarantine: { target: t, days: c.spam.quarantine_days } });
        } finally {
          await t.journal.close();
        }
      });
      if (!r.ran) throw new Error(`not purged: ${r.why} (the nightly job, or another mailha spam purge); try again when it is done`);
      out.result({ ...r.counts, day: r.day, deleted: r.deleted, ms: r.ms }, () => `purged: ${Object.entries(r.counts).map(([k, v]) => `${k} ${v}`).join(", ")} (${r.ms} ms)`);
    });

  spam
    .command("status")
    .description("the spam worker on the active node: retraining from moves (entries read, learned, lag) and the purge's schedule and last run")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (o: { config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const c = loadConfig(o.config);
      const id = await activeLocalNode(c);
      if (!id) throw new Error("no active node here: run this on the active node (see mailha status)");
      const paths = nodePaths(nodeStateDir(c, id));
      const worker = readSpamWorkerStatus(spamWorkerStatusFile(paths.run));
      const queue = new Queue(PURGE_QUEUE, { connection: redisConnection(redisPaths(paths).socket) });
      try {
        const schedulerOf = async (name: string) => {
          const s = await queue.getJobScheduler(name);
          return s ? { id: name, pattern: s.pattern ?? null, next: s.next ? new Date(s.next).toISOString() : null } : null;
        };
        const scheduler = await schedulerOf(PURGE_SCHEDULER);
        const digestScheduler = await schedulerOf(DIGEST_SCHEDULER);
        const recent = await queue.getJobs(["completed", "failed"], 0, 4);
        const jobs = recent.map((j) => ({ id: j.id, name: j.name, state: j.failedReason ? "failed" : "completed", finishedOn: j.finishedOn ? new Date(j.finishedOn).toISOString() : null, result: j.returnvalue ?? null, error: j.failedReason ?? null }));
        const data = { node: id, worker, purge: { scheduler, recent: jobs }, digest: { scheduler: digestScheduler } };
        out.result(data, () => {
          const f = worker?.feedback;
          return [
            worker ? `spam worker on ${id} (pid ${worker.pid}, reported ${worker.at}): retraining from moves ${f?.enabled ? "on" : "off"}${f?.error ? ` - failing: ${f.error}` : ""}` : `spam worker on ${id}: no status yet`,
            ...(f ? [`  moves read ${f.counts.entries}: learned ${f.counts.spam} spam, ${f.counts.innocent} innocent, ${f.counts.unchanged} already known; ${f.counts.none} not feedback, ${f.counts.reconciler} by the reconciler, ${f.counts.missing} gone; lag ${f.counts.lag_ms} ms`] : []),
            scheduler ? `purge: ${scheduler.pattern}, next ${scheduler.next ?? "?"}` : "purge: not scheduled",
            digestScheduler ? `quarantine notices: ${digestScheduler.pattern}, next ${digestScheduler.next ?? "?"}` : "quarantine notices: not scheduled",
            ...jobs.map((j) => `  ${j.finishedOn ?? "?"} ${j.name} ${j.state}${j.error ? `: ${j.error}` : ""}`),
          ].join("\n");
        });
      } finally {
        await queue.close();
      }
    });

  spam
    .command("worker")
    .description("the spam worker daemon: retraining from users' moves into and out of Junk, the nightly purge (the node daemon runs it on the active node)")
    .addOption(configOpt(defaultConfig))
    .addOption(new Option("-n, --node <id>", "the node"))
    .action(async (o: { config: string; node?: string }) => {
      const c = loadConfig(o.config);
      const id = resolveNode(c, o.node);
      const paths = nodePaths(nodeStateDir(c, id));
      const log = createLogger(`spam@${id}`);
      let w: SpamWorker | null = null;
      let closing = false;
      const done = runUntilSignalled(async () => {
        closing = true;
        await w?.close();
      });
      try {
        w = await runSpamWorker({ config: c, nodeId: id, paths, mailRoot: dovecotPaths(paths).mailRoot, log });
      } catch (err) {
        // Not a partial start: the process exits and the resource starts it again.
        if (!closing) {
          log.error({ err }, "spam worker: start failed");
          process.exit(1);
        }
      }
      await done;
    });

  spam
    .command("import")
    .description("load a mysqldump of a DSPAM database (its token, stats, signature, preference and user tables)")
    .requiredOption("--dspam-dump <file>", "the dump")
    .option("--replace", "a user of the dump who has learned data here already gets the dump's instead (else refused)")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (o: { dspamDump: string; config: string; json?: boolean; replace?: boolean }) => {
      const out = createOutput(!!o.json);
      if (!existsSync(o.dspamDump)) throw new UsageError(`${o.dspamDump}: no such file`);
      const r = await withStore(o.config, async (_store, db) => {
        // Its users come over under mailha's uids; one with learned data here already is refused.
        return importDspamDump(db, o.dspamDump, DATABASE, { replace: !!o.replace }).catch((e: Error) => {
          throw e instanceof ImportConflict ? new UsageError(e.message) : e;
        });
      });
      out.result(r, () => `imported ${o.dspamDump}: ${Object.entries(r.rows).map(([k, v]) => `${k} ${v}`).join(", ")} (${r.statements} statements)`);
    });

  return spam;
}
