// The short fault suite: two seeded random trials (npm run test:faults runs many), and
// their HTML report opened in headless Chromium: the screenshot must show the client
// operations and the nodes' states.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runFaultSuite } from "../faults/suite.ts";
import { COLORS } from "../../ops/failover/report.ts";
import { countColor, readPng, screenshot } from "../helpers/browser.ts";

const skip = process.getuid?.() !== 0 ? "needs root" : false;
const seed = process.env.FAULT_SEED ? Number(process.env.FAULT_SEED) : Math.floor(Math.random() * 1e6);

test(`fault suite, short (seed ${seed})`, { skip }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "mailha-faults-"));
  try {
    const report = join(dir, "report.html");
    const results = await runFaultSuite(seed, Number(process.env.FAULT_TRIALS ?? 2), (s) => t.diagnostic(s), report);
    await screenshot(report, join(dir, "report.png"), 1280, 1800);
    const img = readPng(join(dir, "report.png"));
    assert.ok(countColor(img, COLORS.ok) > 1000, "the report shows the clients' successful operations");
    assert.ok(countColor(img, COLORS.active) > 2000, "the report shows an active node");
    assert.ok(countColor(img, COLORS.fault) > 20 || results.every((r) => r.faultAt === null), "the report marks the fault");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
