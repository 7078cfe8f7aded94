// Hand-made SVG line charts: axes with round ticks, linear or log y, event markers, a
// hover readout, and a sparkline. No library: the page loads nothing it does not ship.

import { fmt, h, s } from "./dom.js";

export const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
export const EVENT_COLORS = {
  plateau_reduction: "#d97706",
  control: "#7c3aed",
  status: "#0891b2",
  barrier_timeout: "#dc2626",
  schedule_switch: "#059669",
  loss_spike: "#e11d48",
  created: "#6b7280",
};

const W = 900;
const M = { top: 14, right: 16, bottom: 28, left: 64 };

/** Round tick values covering [lo, hi] (about `count` of them). */
export function linearTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((st) => raw <= st) || 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/** Powers of ten within [lo, hi]; with fewer than two, 1-2-5 steps or linear ticks. */
export function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.ceil(Math.log10(lo) - 1e-9); e <= Math.floor(Math.log10(hi) + 1e-9); e++) ticks.push(10 ** e);
  if (ticks.length >= 2) return ticks;
  const finer = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const f of [1, 2, 5]) { const v = f * 10 ** e; if (v >= lo && v <= hi) finer.push(v); }
  }
  return finer.length >= 2 ? finer : linearTicks(lo, hi, 4);
}

function extent(series, log) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const { values } of series) {
    for (const v of values) {
      if (typeof v !== "number" || !Number.isFinite(v) || (log && v <= 0)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  if (lo === Infinity) return log ? [1e-3, 1] : [0, 1];
  if (log) return lo === hi ? [lo / 2, hi * 2] : [lo / 1.15, hi * 1.15];
  if (lo === hi) return lo === 0 ? [-1, 1] : [lo - Math.abs(lo) * 0.1, hi + Math.abs(hi) * 0.1];
  const pad = (hi - lo) * 0.06;
  return [lo >= 0 && lo - pad < 0 ? 0 : lo - pad, hi + pad];
}

const colorOf = (sr, i) => sr.color || PALETTE[i % PALETTE.length];

/** A colour square; set through the CSSOM, which the page's CSP allows (inline styles it does not). */
function swatch(color) {
  const el = h("span", { class: "swatch" });
  el.style.background = color;
  return el;
}

/** Index of the step in a sorted `steps` closest to `x`. */
function nearest(steps, x) {
  let lo = 0;
  let hi = steps.length - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (steps[mid] <= x) lo = mid; else hi = mid;
  }
  return Math.abs(steps[hi] - x) < Math.abs(steps[lo] - x) ? hi : lo;
}

/**
 * A line chart on a step axis.
 *
 * series: [{label, steps, values, color?, dashed?}] (values: numbers, null for a gap).
 * events: [{step, kind, text}] drawn as vertical markers. xDomain: [x0, x1] shared by the
 * charts of one page. Each series is one <path> whose "M"/"L" commands are its points (a
 * gap starts a new "M"), so the point count can be checked from the markup. stairs: a value
 * holds from its step to the next point's (an "H" run, then the "L" up or down to the next
 * value), as an LR does between scheduler steps; otherwise points are joined by slopes.
 */
export function lineChart({ series, events = [], xDomain, log = false, height = 240, name = "chart", stairs = false }) {
  const H = height;
  const iw = W - M.left - M.right;
  const ih = H - M.top - M.bottom;
  const allSteps = series.flatMap((sr) => [sr.steps[0], sr.steps[sr.steps.length - 1]]).filter((v) => v !== undefined);
  const [x0, x1] = xDomain || [Math.min(0, ...allSteps), Math.max(1, ...allSteps)];
  const [y0, y1] = extent(series, log);
  const xs = (x) => M.left + (x1 > x0 ? ((x - x0) / (x1 - x0)) * iw : iw / 2);
  const ys = log
    ? (y) => M.top + ih - ((Math.log10(y) - Math.log10(y0)) / (Math.log10(y1) - Math.log10(y0))) * ih
    : (y) => M.top + ih - ((y - y0) / (y1 - y0)) * ih;
  const ok = (v) => typeof v === "number" && Number.isFinite(v) && (!log || v > 0);

  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": name, "data-chart": name });
  const grid = s("g", { class: "grid" });
  for (const t of log ? logTicks(y0, y1) : linearTicks(y0, y1)) {
    const y = ys(t);
    if (y < M.top - 0.5 || y > M.top + ih + 0.5) continue;
    grid.append(s("line", { x1: M.left, x2: M.left + iw, y1: y, y2: y }),
      s("text", { x: M.left - 8, y: y + 4, class: "tick y" }, fmt(t, 3)));
  }
  for (const t of linearTicks(x0, x1, 8).filter((v) => Number.isInteger(v))) {
    const x = xs(t);
    if (x > M.left + iw - 36) continue; // room for the axis name
    grid.append(s("line", { x1: x, x2: x, y1: M.top, y2: M.top + ih, class: "vgrid" }),
      s("text", { x, y: M.top + ih + 18, class: "tick x" }, String(t)));
  }
  grid.append(s("rect", { x: M.left, y: M.top, width: iw, height: ih, class: "frame" }),
    s("text", { x: M.left + iw, y: M.top + ih + 18, class: "tick axis-name" }, "step"));
  svg.append(grid);

  const markers = s("g", { class: "events" });
  for (const ev of events) {
    if (ev.step === null || ev.step === undefined || ev.step < x0 || ev.step > x1) continue;
    const x = xs(ev.step);
    const color = EVENT_COLORS[ev.kind] || "#6b7280";
    markers.append(s("g", { class: "event-marker", "data-kind": ev.kind, "data-step": ev.step },
      s("title", {}, `${ev.kind} @ step ${ev.step}${ev.text ? `: ${ev.text}` : ""}`),
      s("line", { x1: x, x2: x, y1: M.top, y2: M.top + ih, stroke: color }),
      s("path", { d: `M${x - 5} ${M.top} L${x + 5} ${M.top} L${x} ${M.top + 7} Z`, fill: color })));
  }
  svg.append(markers);

  const lines = s("g", { class: "lines" });
  series.forEach((sr, i) => {
    const color = colorOf(sr, i);
    let d = "";
    let pen = false;
    let n = 0;
    sr.steps.forEach((step, j) => {
      const v = sr.values[j];
      if (!ok(v)) { pen = false; return; }
      if (pen && stairs) d += `H${xs(step).toFixed(1)}`;
      d += `${pen ? "L" : "M"}${xs(step).toFixed(1)} ${ys(v).toFixed(1)}`;
      pen = true;
      n += 1;
    });
    const cls = sr.dashed ? "series dashed" : "series";
    const path = s("path", { d: d || "M0 0", class: cls, stroke: color, "data-series": sr.label, "data-points": n,
      "data-shape": stairs ? "stairs" : "line" });
    if (!d) path.setAttribute("visibility", "hidden");
    lines.append(path);
  });
  svg.append(lines);

  // Hover: a guide line and a readout of every series at the nearest step.
  const guide = s("line", { y1: M.top, y2: M.top + ih, class: "guide", visibility: "hidden" });
  const hit = s("rect", { x: M.left, y: M.top, width: iw, height: ih, class: "hit" });
  svg.append(guide, hit);
  const readout = h("div", { class: "readout", hidden: true });
  hit.addEventListener("mousemove", (e) => {
    const box = svg.getBoundingClientRect();
    const px = ((e.clientX - box.left) / box.width) * W;
    const step = x0 + ((px - M.left) / iw) * (x1 - x0);
    const rows = [];
    let at = null;
    series.forEach((sr, i) => {
      if (!sr.steps.length) return;
      const j = nearest(sr.steps, step);
      at = at === null ? sr.steps[j] : at;
      rows.push(h("div", {}, swatch(colorOf(sr, i)), `${sr.label} `,
        h("b", {}, fmt(sr.values[j], 5)), sr.steps[j] !== at ? ` @${sr.steps[j]}` : ""));
    });
    if (at === null) return;
    guide.setAttribute("x1", xs(at));
    guide.setAttribute("x2", xs(at));
    guide.setAttribute("visibility", "visible");
    readout.replaceChildren(h("div", { class: "readout-step" }, `step ${at}`), ...rows);
    readout.hidden = false;
  });
  hit.addEventListener("mouseleave", () => { guide.setAttribute("visibility", "hidden"); readout.hidden = true; });

  const legend = h("div", { class: "legend" }, series.map((sr, i) =>
    h("span", { class: "legend-item" }, swatch(colorOf(sr, i)), sr.label)));
  return h("figure", { class: "chart-box", "data-chart": name }, svg, readout, series.length > 1 ? legend : null);
}

/** Log scale suits LRs spanning two decades or more (decays), if none is zero. */
export function prefersLog(series) {
  const values = series.flatMap((sr) => sr.values).filter((v) => typeof v === "number" && Number.isFinite(v));
  if (!values.length || values.some((v) => v <= 0)) return false;
  return Math.max(...values) / Math.min(...values) >= 100;
}

/** A small line of one series (the runs page's LR column); no axes. */
export function sparkline(steps, values, { width = 140, height = 30 } = {}) {
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "sparkline" });
  const pts = steps.map((st, i) => [st, values[i]]).filter(([, v]) => typeof v === "number" && Number.isFinite(v));
  if (!pts.length) return svg;
  const [lo, hi] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  const [a, b] = [pts[0][0], pts[pts.length - 1][0]];
  const x = (st) => 2 + (b > a ? ((st - a) / (b - a)) * (width - 4) : (width - 4) / 2);
  const y = (v) => (hi > lo ? 2 + (1 - (v - lo) / (hi - lo)) * (height - 4) : height / 2);
  const d = pts.map(([st, v], i) => `${i ? "L" : "M"}${x(st).toFixed(1)} ${y(v).toFixed(1)}`).join("");
  svg.append(s("path", { d, class: "spark", "data-points": pts.length }));
  return svg;
}
