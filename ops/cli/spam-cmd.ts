// `mailha spam classify|train|stats|purge|import`: the operator's side of the spam
// filter (services/spam/), run on the active node against its MariaDB (the tokens live
// on the replicated volume). `classify` changes nothing; `train` learns a corpus for a
// user (Maildir folders, mbox files or single message files), each message once (the
// ledger); `purge` applies DSPAM's purge rules; `import` loads a DSPAM mysqldump.
// Bounds: at most TRAIN_MESSAGES_MAX messages per run, each read up to the filter's
// analysis cap; an mbox is split on its "From " lines as it is streamed.
import { closeSync, createReadStream, existsSync, openSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { Command, Option } from "commander";
import type { Connection } from "mysql2/promise";
import { loadConfig, type MailhaConfig } from "../../common/config.ts";
import { UsageError } from "../../common/errors.ts";
import { nodePaths, nodeStateDir } from "../../common/paths.ts";
import { activeLocalNode } from "../../cluster/client.ts";
import { DATABASE } from "../../services/accounts.ts";
import { connectMariadb, mariadbPaths } from "../../services/mariadb.ts";
import { importDspamDump } from "../../services/spam/dump.ts";
import { classifyMessage, readPreferences, retrainAndApply } from "../../services/spam/filter.ts";
import { MariadbSpamStore, migrateSpam } from "../../services/spam/store.ts";
import { journalSpamDeltas, spamJournalFor } from "../../services/spam/journal.ts";
import type { ChangeJournal } from "../../services/journal/changes.ts";
import { createOutput } from "./output.ts";

const TRAIN_MESSAGES_MAX = 1_000_000;
const MESSAGE_BYTES_MAX = 64 * 1024 * 1024;

const configOpt = (def: string) => new Option("-c, --config <file>", "cluster configuration file").default(def);
const jsonOpt = () => new Option("--json", "print the result as JSON");

async function activeSocket(c: MailhaConfig): Promise<string> {
  const id = await activeLocalNode(c);
  if (!id) throw new Error("no active node here: run this on the active node (see mailha status)");
  return mariadbPaths(nodePaths(nodeStateDir(c, id))).socket;
}

async function withStore<T>(config: string, fn: (s: MariadbSpamStore, db: Connection) => Promise<T>): Promise<T> {
  const db = await connectMariadb(await activeSocket(loadConfig(config)), DATABASE);
  try {
    await migrateSpam(db);
    return await fn(new MariadbSpamStore(db), db);
  } finally {
    await db.end();
  }
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
      const r = await withStore(o.config, async (store) => {
        const uid = await store.uidFor(o.user.toLowerCase());
        const prefs = await readPreferences(store, uid);
        // NOTRAIN here: a look must not change what the filter knows.
        return classifyMessage(store, uid, readFileSync(file), { ...prefs, training_mode: "notrain" });
      });
      const top = r.tokens.slice(0, 15);
      out.result({ file, user: o.user.toLowerCase(), result: r.result, probability: r.probability, confidence: r.confidence, headers: r.headers, tokens: top, reasons: r.reasons, passedThrough: r.passedThrough }, () =>
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
    .command("purge")
    .description("DSPAM's purge rules: signatures after 14 days, hapaxes after 30, unused tokens after 90")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (o: { config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      const r = await withStore(o.config, (store) => store.purge(new Date().toISOString().slice(0, 10)));
      out.result(r, () => `purged: ${Object.entries(r).map(([k, v]) => `${k} ${v}`).join(", ")}`);
    });

  spam
    .command("import")
    .description("load a mysqldump of a DSPAM database (its token, stats, signature, preference and user tables)")
    .requiredOption("--dspam-dump <file>", "the dump")
    .addOption(configOpt(defaultConfig))
    .addOption(jsonOpt())
    .action(async (o: { dspamDump: string; config: string; json?: boolean }) => {
      const out = createOutput(!!o.json);
      if (!existsSync(o.dspamDump)) throw new UsageError(`${o.dspamDump}: no such file`);
      const r = await withStore(o.config, async (_store, db) => {
        // DSPAM's uids are kept as they are: into a filter that has users already they
        // would land on other users' tokens.
        const [n] = await db.query(`SELECT COUNT(*) AS n FROM ${DATABASE}.dspam_virtual_uids`);
        const users = Number((n as { n: number }[])[0]?.n ?? 0);
        if (users > 0) throw new UsageError(`the spam filter has ${users} user(s) already: import a DSPAM dump into an empty filter (before mail is classified), or its uids would mix with theirs`);
        return importDspamDump(db, o.dspamDump);
      });
      out.result(r, () => `imported ${o.dspamDump}: ${Object.entries(r.rows).map(([k, v]) => `${k} ${v}`).join(", ")} (${r.statements} statements)`);
    });

  return spam;
}
