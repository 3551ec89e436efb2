// How `mailha user add|passwd` take a password: --password works but warns that ps and
// shell history show it; standard input is read with --password-stdin or with no
// password option at all; on a terminal the password is asked for twice, never echoed.
// (No node runs here: each command gets as far as "no active node", after the password.)
import { test, describe, after } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { dirname } from "node:path";
import { spawn } from "node:child_process";
import { MAILHA_BIN, ROOT, mailha, mailhaWithInput } from "../helpers/cli.ts";
import { writeTestLabConfig } from "../helpers/lab.ts";

const PW = "correct-horse-battery-9";

/**
 * Runs mailha ARGS on a terminal (script(1)), typing each of ANSWERS once the prompt
 * for it shows; resolves with what the terminal showed.
 */
function onTerminal(args: readonly string[], answers: readonly string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const cmd = [process.execPath, MAILHA_BIN, ...args].join(" ");
    const child = spawn("script", ["-qec", cmd, "/dev/null"], { cwd: ROOT, stdio: ["pipe", "pipe", "inherit"] });
    let shown = "";
    let typed = 0;
    child.stdout.on("data", (d) => {
      shown += d;
      const prompts = (shown.match(/password for [^ ]+: |again: /g) ?? []).length;
      if (prompts > typed && typed < answers.length) child.stdin.write(`${answers[typed++]}\r`);
    });
    const t = setTimeout(() => child.kill("SIGKILL"), 60_000);
    child.on("error", reject);
    child.on("close", () => {
      clearTimeout(t);
      resolve(shown);
    });
  });
}

describe("passwords for mailha user add|passwd", () => {
  const lab = writeTestLabConfig("pw", 252);
  after(() => rmSync(dirname(lab.configFile), { recursive: true, force: true }));
  const noNode = /no active node here/;

  test("--password works, with a warning that ps and shell history show it", async () => {
    assert.equal((await mailha(["secret", "generate", "--config", lab.configFile])).code, 0);
    const r = await mailha(["user", "add", "bob@mailha.test", "--password", PW, "--config", lab.configFile]);
    assert.match(r.stderr, /warning: a password given with --password is visible to every local user in ps and stays in your shell history; use --password-stdin/);
    assert.match(r.stderr, noNode);
  });

  test("standard input: with --password-stdin, and without any password option; no warning", async () => {
    for (const extra of [["--password-stdin"], []]) {
      const r = await mailhaWithInput(["user", "passwd", "bob@mailha.test", ...extra, "--config", lab.configFile], `${PW}\n`);
      assert.match(r.stderr, noNode, `with ${extra.join(" ") || "no option"}: ${r.stderr}`);
      assert.doesNotMatch(r.stderr, /warning/);
    }
  });

  test("nothing on standard input: a usage error that says how to give it", async () => {
    const r = await mailhaWithInput(["user", "add", "bob@mailha.test", "--config", lab.configFile], "");
    assert.equal(r.code, 2);
    assert.match(r.stderr, /no password on standard input/);
    const both = await mailhaWithInput(["user", "add", "bob@mailha.test", "--password", PW, "--password-stdin", "--config", lab.configFile], PW);
    assert.equal(both.code, 2);
    assert.match(both.stderr, /either --password or --password-stdin, not both/);
  });

  test("the help says standard input is the way", async () => {
    const r = await mailha(["user", "add", "--help"]);
    assert.match(r.stdout, /--password-stdin +read the password/);
    assert.match(r.stdout, /visible in ps/);
  });

  test("on a terminal: asked twice without echo; two different answers change nothing", async () => {
    const first = await onTerminal(["user", "add", "bob@mailha.test", "--config", lab.configFile], [PW, PW]);
    assert.match(first, /password for bob@mailha\.test: /);
    assert.match(first, noNode, first);
    assert.ok(!first.includes(PW), "the password was echoed on the terminal");
    const differ = await onTerminal(["user", "add", "bob@mailha.test", "--config", lab.configFile], [PW, "something-else-1"]);
    assert.match(differ, /the two passwords differ; nothing changed/);
  });
});
