// The failover test's HTML report: one self-contained page (no scripts, no external
// files) with a summary table and, per trial, a timeline drawn in SVG: every client
// operation by protocol (successes above, failures below), outages shaded, each
// node's state over time, cluster events, and the moment of the fault.
import type { ClusterEvent } from "./cluster-view.ts";
import { PROTOS, type Proto } from "./record.ts";
import type { TrialResult } from "./trial.ts";
import { byFaultRows, summaryRows, trialRows } from "./present.ts";

/** Colours the screenshot check looks for; keep them opaque and distinct. */
export const COLORS = {
  ok: "#2e9d4f",
  failed: "#d23c3c",
  outage: "#f6c4c4",
  active: "#2f6fdf",
  transition: "#f0a020",
  passive: "#b9c3cf",
  down: "#4a2f6b",
  fault: "#c2185b",
  step: "#6a4c93",
} as const;

const STATE_COLOR: Record<string, string> = {
  active: COLORS.active,
  activating: COLORS.transition,
  deactivating: COLORS.transition,
  requesting: COLORS.transition,
  passive: COLORS.passive,
  standby: "#dcdcdc",
  starting: "#dcdcdc",
  failed: "#7a1f1f",
  "stop-failed": "#7a1f1f",
  down: COLORS.down,
};

const MARKED_EVENTS: Record<string, string> = {
  "peer:dead": "peer dead",
  "monitor-failed": "monitor failed",
  fencing: "fencing the peer",
  "peer-fenced": "peer fenced",
  "self-fence": "self-fence",
  "node-started": "node daemon started",
  migrate: "migrating",
};

const esc = (s: unknown) => String(s).replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]!);

function tickStep(spanMs: number): number {
  for (const s of [500, 1000, 2000, 5000, 10_000, 30_000, 60_000, 300_000]) if (spanMs / s <= 15) return s;
  return 600_000;
}

/** Each node's state as segments over [t0, t1], starting from the states seen at the start. */
function stateSegments(r: TrialResult, node: string, t0: number, t1: number): { from: number; to: number; state: string }[] {
  let state = r.timeline.initialStates[node] ?? "unknown";
  let from = t0;
  const out: { from: number; to: number; state: string }[] = [];
  const evs = r.timeline.events.filter((e) => e.node === node && e.time >= t0 && e.time <= t1);
  const push = (to: number, next: string) => {
    if (to > from) out.push({ from, to, state });
    from = to;
    state = next;
  };
  // A killed node logs nothing until it is booted again: it is down from the fault on
  // (from the kill step of a split brain).
  const killStep = r.splitBrain?.old === node ? r.splitBrain.steps.find((s) => s.step === "kill-node") : undefined;
  const downAt = r.fault === "kill-node" && r.target === node && r.faultAt ? r.faultAt : killStep ? killStep.start : null;
  let down = false;
  for (const e of evs) {
    if (downAt !== null && !down && e.time >= downAt) {
      push(downAt, "down");
      down = true;
    }
    if (e.type === "state" && e.state) push(e.time, e.state);
    else if (e.type === "node-started") push(e.time, "starting");
  }
  if (downAt !== null && !down) push(downAt, "down");
  push(t1, state);
  return out;
}

export function timelineSvg(r: TrialResult): string {
  const W = 1100;
  const left = 110;
  const right = 20;
  const laneH = 36;
  const t0 = r.startedAt;
  // A split brain's heal and reconcile come after the traffic: the timeline runs on to them.
  const t1 = Math.max(r.trafficEndAt, t0 + 1000, ...(r.splitBrain?.steps ?? []).map((s) => s.end));
  const x = (t: number) => left + ((Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0)) * (W - left - right);
  const protos = PROTOS.filter((p) => p !== "pop3" || r.pop3);
  const nodes = Object.keys(r.timeline.initialStates);
  const steps = r.splitBrain?.steps ?? [];
  const lanes = [...protos.map((p) => p.toUpperCase()), ...nodes.map((n) => `node ${n}`), ...(steps.length ? ["fault steps"] : [])];
  const top = 24;
  const H = top + lanes.length * laneH + 40;
  const laneY = (i: number) => top + i * laneH;
  const parts: string[] = [];
  parts.push(`<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`);
  lanes.forEach((name, i) => {
    parts.push(`<rect x="${left}" y="${laneY(i)}" width="${W - left - right}" height="${laneH - 4}" fill="${i % 2 ? "#f7f8fa" : "#fbfcfd"}"/>`);
    parts.push(`<text x="${left - 8}" y="${laneY(i) + laneH / 2 + 2}" text-anchor="end" class="lane">${esc(name)}</text>`);
  });
  // Outages first, so the operations are drawn over them.
  protos.forEach((p, i) => {
    const figs = p === "pop3" ? r.pop3! : r[p as Exclude<Proto, "pop3">];
    for (const w of figs.outages) {
      const x0 = x(w.from);
      const wd = Math.max(2, x(w.to) - x0);
      parts.push(`<rect x="${x0.toFixed(1)}" y="${laneY(i)}" width="${wd.toFixed(1)}" height="${laneH - 4}" fill="${COLORS.outage}"><title>${p} outage ${((w.to - w.from) / 1000).toFixed(2)} s</title></rect>`);
      parts.push(`<text x="${(x0 + 3).toFixed(1)}" y="${laneY(i) + 10}" class="small">outage ${((w.to - w.from) / 1000).toFixed(1)} s</text>`);
    }
  });
  for (const o of r.timeline.ops) {
    const i = protos.indexOf(o.proto);
    if (i < 0) continue;
    const x0 = x(o.start);
    const wd = Math.max(2, x(o.end) - x0);
    const y = laneY(i) + (o.ok ? 12 : 22);
    parts.push(`<rect x="${x0.toFixed(1)}" y="${y}" width="${wd.toFixed(1)}" height="7" fill="${o.ok ? COLORS.ok : COLORS.failed}"><title>${esc(`${o.proto} ${o.op} ${o.ok ? "ok" : "failed"}${o.host ? ` @${o.host}` : ""} ${o.end - o.start} ms${o.error ? `: ${o.error}` : ""}`)}</title></rect>`);
  }
  nodes.forEach((n, k) => {
    const i = protos.length + k;
    for (const s of stateSegments(r, n, t0, t1)) {
      const x0 = x(s.from);
      const wd = Math.max(1, x(s.to) - x0);
      parts.push(`<rect x="${x0.toFixed(1)}" y="${laneY(i) + 8}" width="${wd.toFixed(1)}" height="16" fill="${STATE_COLOR[s.state] ?? "#dcdcdc"}"><title>${esc(`node ${n}: ${s.state} for ${((s.to - s.from) / 1000).toFixed(2)} s`)}</title></rect>`);
      if (wd > 60) parts.push(`<text x="${(x0 + 4).toFixed(1)}" y="${laneY(i) + 20}" class="state">${esc(s.state)}</text>`);
    }
    for (const e of r.timeline.events.filter((ev: ClusterEvent) => ev.node === n && ev.time >= t0 && ev.time <= t1)) {
      const label = MARKED_EVENTS[e.type === "peer" ? `peer:${e.state}` : e.type];
      if (!label) continue;
      const ex = x(e.time);
      parts.push(`<path d="M${ex.toFixed(1)},${laneY(i) + 6} l-4,-6 h8 z" fill="#111"><title>${esc(`${new Date(e.time).toISOString()} node ${n}: ${label}`)}</title></path>`);
    }
  });
  // A multi-step fault (split brain): each step as a bar in its own lane, labels alternating above and below.
  steps.forEach((s, k) => {
    const i = protos.length + nodes.length;
    const x0 = x(s.start);
    const wd = Math.max(3, x(s.end) - x0);
    parts.push(`<rect x="${x0.toFixed(1)}" y="${laneY(i) + 10}" width="${wd.toFixed(1)}" height="10" fill="${s.ok ? COLORS.step : COLORS.failed}"><title>${esc(`${s.label}: ${((s.end - s.start) / 1000).toFixed(2)} s${s.ok ? "" : " FAILED"}${s.detail ? ` (${s.detail})` : ""}`)}</title></rect>`);
    parts.push(`<text x="${x0.toFixed(1)}" y="${laneY(i) + (k % 2 ? 30 : 8)}" class="small">${esc(s.step)}</text>`);
  });
  if (r.faultAt) {
    const fx = x(r.faultAt);
    parts.push(`<line x1="${fx.toFixed(1)}" y1="${top - 6}" x2="${fx.toFixed(1)}" y2="${laneY(lanes.length) - 4}" stroke="${COLORS.fault}" stroke-width="2" stroke-dasharray="5,3"/>`);
    parts.push(`<text x="${(fx + 4).toFixed(1)}" y="${top - 8}" class="fault">${esc(`${r.fault} on ${r.target ?? "?"}`)}</text>`);
  }
  const step = tickStep(t1 - t0);
  const axisY = laneY(lanes.length) + 4;
  parts.push(`<line x1="${left}" y1="${axisY}" x2="${W - right}" y2="${axisY}" stroke="#888"/>`);
  for (let t = 0; t <= t1 - t0; t += step) {
    const tx = x(t0 + t);
    parts.push(`<line x1="${tx.toFixed(1)}" y1="${axisY}" x2="${tx.toFixed(1)}" y2="${axisY + 5}" stroke="#888"/><text x="${tx.toFixed(1)}" y="${axisY + 18}" text-anchor="middle" class="small">+${t / 1000} s</text>`);
  }
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img" aria-label="timeline of trial">${parts.join("")}</svg>`;
}

function htmlTable(rows: readonly (readonly string[])[]): string {
  const [head, ...body] = rows;
  return `<table><thead><tr>${head!.map((h) => `<th>${esc(h)}</th>`).join("")}</tr></thead><tbody>${body.map((r) => `<tr>${r.map((c) => `<td class="${/^(NO|FAILED|[1-9]\d* lost)/.test(c) ? "bad" : ""}">${esc(c)}</td>`).join("")}</tr>`).join("")}</tbody></table>`;
}

const LEGEND = `<p class="legend">
<span style="background:${COLORS.ok}"></span> operation ok
<span style="background:${COLORS.failed}"></span> operation failed
<span style="background:${COLORS.outage}"></span> client-visible outage
<span style="background:${COLORS.active}"></span> active
<span style="background:${COLORS.transition}"></span> activating / deactivating
<span style="background:${COLORS.passive}"></span> passive
<span style="background:${COLORS.down}"></span> down
<span style="background:${COLORS.step}"></span> fault step (split brain)
<b style="color:${COLORS.fault}">- - -</b> fault &#9660; cluster event (hover for details)</p>`;

export function renderReport(results: readonly TrialResult[], meta: { cluster: string; command: string; seed?: number }): string {
  const sections = results.map(
    (r, i) => `<section><h2>Trial ${i + 1}: ${esc(r.fault)}${r.target ? ` on ${esc(r.target)}` : ""} &mdash; ${r.ok ? '<span class="ok">OK</span>' : '<span class="bad">FAILED</span>'}</h2>
<p>${esc(r.description)}. Started ${esc(new Date(r.startedAt).toISOString())}${r.faultDetail ? `; ${esc(r.faultDetail)}` : ""}.</p>
${timelineSvg(r)}
${r.splitBrain?.steps.length ? htmlTable([["step", "at", "took", "outcome"], ...r.splitBrain.steps.map((s) => [s.label, `+${((s.start - r.startedAt) / 1000).toFixed(1)} s`, `${((s.end - s.start) / 1000).toFixed(1)} s`, s.ok ? (s.detail ?? "ok") : `FAILED: ${s.detail ?? ""}`])]) : ""}
${htmlTable(trialRows(r))}
${r.notes.length ? `<ul class="notes">${r.notes.map((n) => `<li>${esc(n)}</li>`).join("")}</ul>` : ""}
</section>`,
  );
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mailha failover test: ${esc(meta.cluster)}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1c1c1c; background: #ffffff; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; margin: 10px 0; } th, td { border: 1px solid #d0d4da; padding: 3px 8px; text-align: left; }
th { background: #eef1f5; } td.bad, .bad { color: #b00020; font-weight: 600; } .ok { color: #1b7a3a; }
svg { display: block; margin: 8px 0; } svg text { font: 11px system-ui, sans-serif; fill: #333; } svg text.lane { font-weight: 600; font-size: 12px; }
svg text.fault { fill: ${COLORS.fault}; font-weight: 600; } svg text.state { fill: #fff; } svg text.small { font-size: 10px; }
.legend span { display: inline-block; width: 14px; height: 10px; margin: 0 4px 0 12px; vertical-align: middle; }
code { background: #f2f2f2; padding: 1px 4px; }
</style></head><body>
<h1>mailha failover test: ${esc(meta.cluster)}</h1>
<p>${results.length} trial(s), ${esc(new Date().toISOString())}. Command: <code>${esc(meta.command)}</code>${meta.seed !== undefined ? `, seed ${meta.seed}` : ""}.</p>
${htmlTable(summaryRows(results))}
${results.length > 1 ? `<h2>Per fault type</h2>\n${htmlTable(byFaultRows(results))}` : ""}
${LEGEND}
${sections.join("\n")}
</body></html>
`;
}
