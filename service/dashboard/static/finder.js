// The LR finder panel of a range-test run (GET /v1/runs/{id}/lr-finder): the smoothed loss
// against the LR (log x for an exponential test, as Lightning and fastai plot it), the two
// suggestions and the chosen LR marked, and whether the test is done or has switched.

import { api } from "./api.js";
import { linearTicks, logTicks } from "./chart.js";
import { fmt, h, s } from "./dom.js";

export const MARKS = [
  { key: "steepest", label: "steepest", color: "#d97706" },
  { key: "min_over_10", label: "min / 10", color: "#7c3aed" },
  { key: "chosen", label: "chosen", color: "#059669" },
];
const LINE = "#2563eb";
const W = 900;
const H = 280;
const M = { top: 14, right: 16, bottom: 30, left: 64 };
// A loss this many times its lowest is drawn at the frame's top: one blow-up (no early stop)
// would otherwise flatten the part of the curve the suggestions come from.
const Y_CAP = 10;

/** Whether the run has (or had) a range test, so the page should ask for its curve. */
export function isRangeTest(run) {
  return Boolean(run) && ((run.schedule && run.schedule.type === "LRRangeTest") || (run.switched_at ?? null) !== null);
}

const positive = (v) => typeof v === "number" && Number.isFinite(v) && v > 0;
const finite = (v) => typeof v === "number" && Number.isFinite(v);

/** The LR axis: the test's planned range (so a running test fills it), widened to every mark. */
function lrDomain(finder, spec) {
  const marks = MARKS.map((m) => markValue(finder, m.key)).filter(positive);
  const planned = spec && spec.type === "LRRangeTest" ? [spec.min_lr, spec.max_lr] : [];
  const values = [...planned, ...finder.lrs, ...marks].filter(positive);
  if (!values.length) return [1e-6, 1];
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  return lo === hi ? [lo / 2, hi * 2] : [lo, hi];
}

/** Linear y over the finite losses, padded; capped at Y_CAP × the lowest when that is positive. */
function lossDomain(losses) {
  const values = losses.filter(finite);
  if (!values.length) return { lo: 0, hi: 1, capped: false };
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const capped = lo > 0 && hi > Y_CAP * lo;
  if (capped) hi = Y_CAP * lo;
  if (lo === hi) return { lo: lo - Math.abs(lo || 1) * 0.1, hi: hi + Math.abs(hi || 1) * 0.1, capped };
  const pad = (hi - lo) * 0.06;
  lo = lo >= 0 && lo - pad < 0 ? 0 : lo - pad;
  return { lo, hi: hi + pad, capped };
}

function markValue(finder, key) {
  return key === "chosen" ? finder.chosen : (finder.suggestions || {})[key];
}

/**
 * The smoothed loss against the LR, one <path> whose "M"/"L" commands are its points (a
 * null loss starts a new "M"), so the point count can be checked from the markup.
 */
export function finderChart(finder, { spec = null, log = true, name = "lr-finder" } = {}) {
  const iw = W - M.left - M.right;
  const ih = H - M.top - M.bottom;
  const [x0, x1] = lrDomain(finder, spec);
  const { lo: y0, hi: y1, capped } = lossDomain(finder.losses);
  const xs = log
    ? (x) => M.left + ((Math.log10(x) - Math.log10(x0)) / (Math.log10(x1) - Math.log10(x0))) * iw
    : (x) => M.left + ((x - x0) / (x1 - x0)) * iw;
  const ys = (y) => M.top + ih - ((Math.min(y, y1) - y0) / (y1 - y0)) * ih;
  const drawable = (i) => finite(finder.losses[i]) && (log ? positive(finder.lrs[i]) : finite(finder.lrs[i]));

  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": name, "data-chart": name });
  svg.append(axes({ xs, ys, x0, x1, y0, y1, iw, ih, log, monitor: (spec && spec.monitor) || "loss" }));
  const markers = s("g", { class: "finder-marks" });
  for (const mark of MARKS) {
    const value = markValue(finder, mark.key);
    if (!(log ? positive(value) : finite(value))) continue;
    const x = xs(value);
    markers.append(s("g", { class: `finder-mark mark-${mark.key}`, "data-marker": mark.key, "data-lr": value },
      s("title", {}, `${mark.label}: lr ${fmt(value, 6)}`),
      s("line", { x1: x, x2: x, y1: M.top, y2: M.top + ih, stroke: mark.color })));
  }
  svg.append(markers);

  let d = "";
  let pen = false;
  let n = 0;
  finder.lrs.forEach((lr, i) => {
    if (!drawable(i)) { pen = false; return; }
    d += `${pen ? "L" : "M"}${xs(lr).toFixed(1)} ${ys(finder.losses[i]).toFixed(1)}`;
    pen = true;
    n += 1;
  });
  const path = s("path", { d: d || "M0 0", class: "series", stroke: LINE, "data-series": "smoothed loss", "data-points": n });
  if (!d) path.setAttribute("visibility", "hidden");
  svg.append(path);
  const chosenAt = nearestIndex(finder, finder.chosen, drawable);
  if (chosenAt !== null) {
    svg.append(s("circle", { cx: xs(finder.lrs[chosenAt]), cy: ys(finder.losses[chosenAt]), r: 4.5,
      class: "finder-dot", fill: MARKS[2].color, "data-lr": finder.lrs[chosenAt] }));
  }

  const { guide, hit, readout } = hover(svg, finder, { xs, ys, x0, x1, iw, log, drawable });
  svg.append(guide, hit);
  const legend = h("div", { class: "legend" },
    h("span", { class: "legend-item" }, swatch(LINE), `smoothed ${(spec && spec.monitor) || "loss"}`),
    MARKS.map((m) => h("span", { class: "legend-item" }, swatch(m.color), `${m.label} ${fmt(markValue(finder, m.key), 4)}`)),
    capped ? h("span", { class: "muted" }, `losses above ${fmt(y1, 3)} drawn at the top`) : null);
  return h("figure", { class: "chart-box", "data-chart": name }, svg, readout, legend);
}

function axes({ xs, ys, x0, x1, y0, y1, iw, ih, log, monitor }) {
  const grid = s("g", { class: "grid" });
  for (const t of linearTicks(y0, y1)) {
    const y = ys(t);
    if (y < M.top - 0.5 || y > M.top + ih + 0.5) continue;
    grid.append(s("line", { x1: M.left, x2: M.left + iw, y1: y, y2: y }),
      s("text", { x: M.left - 8, y: y + 4, class: "tick y" }, fmt(t, 3)));
  }
  for (const t of log ? logTicks(x0, x1) : linearTicks(x0, x1, 8)) {
    const x = xs(t);
    if (x < M.left - 0.5 || x > M.left + iw + 0.5) continue;
    grid.append(s("line", { x1: x, x2: x, y1: M.top, y2: M.top + ih, class: "vgrid" }),
      s("text", { x, y: M.top + ih + 18, class: "tick x" }, fmt(t, 3)));
  }
  grid.append(s("rect", { x: M.left, y: M.top, width: iw, height: ih, class: "frame" }),
    // Axis names inside the frame's corners: the LR ticks run to its right edge.
    s("text", { x: M.left + iw - 6, y: M.top + ih - 6, class: "tick axis-name" }, log ? "learning rate (log)" : "learning rate"),
    s("text", { x: M.left + 6, y: M.top + 12, class: "tick axis-name y-name" }, `smoothed ${monitor}`));
  return grid;
}

/** Index of the drawn point whose LR is closest to `lr` (null if none). */
function nearestIndex(finder, lr, drawable, scale = (v) => v) {
  if (!finite(lr)) return null;
  let best = null;
  finder.lrs.forEach((v, i) => {
    if (!drawable(i)) return;
    if (best === null || Math.abs(scale(v) - scale(lr)) < Math.abs(scale(finder.lrs[best]) - scale(lr))) best = i;
  });
  return best;
}

/** A guide line and a readout of the point nearest the pointer. */
function hover(svg, finder, { xs, ys, x0, x1, iw, log, drawable }) {
  const guide = s("circle", { r: 4, class: "guide-dot", visibility: "hidden" });
  const hit = s("rect", { x: M.left, y: M.top, width: iw, height: H - M.top - M.bottom, class: "hit" });
  const readout = h("div", { class: "readout", hidden: true });
  hit.addEventListener("mousemove", (e) => {
    const box = svg.getBoundingClientRect();
    const frac = (((e.clientX - box.left) / box.width) * W - M.left) / iw;
    const lr = log ? 10 ** (Math.log10(x0) + frac * (Math.log10(x1) - Math.log10(x0))) : x0 + frac * (x1 - x0);
    const i = nearestIndex(finder, lr, drawable, log ? Math.log10 : (v) => v);
    if (i === null) return;
    guide.setAttribute("cx", xs(finder.lrs[i]));
    guide.setAttribute("cy", ys(finder.losses[i]));
    guide.setAttribute("visibility", "visible");
    readout.replaceChildren(h("div", { class: "readout-step" }, `point ${i + 1} of ${finder.lrs.length}`),
      h("div", {}, "lr ", h("b", {}, fmt(finder.lrs[i], 5))), h("div", {}, "smoothed loss ", h("b", {}, fmt(finder.losses[i], 5))));
    readout.hidden = false;
  });
  hit.addEventListener("mouseleave", () => { guide.setAttribute("visibility", "hidden"); readout.hidden = true; });
  return { guide, hit, readout };
}

function swatch(color) {
  const el = h("span", { class: "swatch" });
  el.style.background = color;
  return el;
}

/** "running: 42 of 100 steps", "done", "switched at step 96". */
function statusText(finder, spec) {
  if (finder.switched_at !== null && finder.switched_at !== undefined) return `switched at step ${finder.switched_at}`;
  if (finder.done) return "done";
  const planned = spec && spec.type === "LRRangeTest" ? ` of ${spec.num_steps ?? 100}` : "";
  return `running: ${finder.lrs.length}${planned} losses`;
}

function facts(finder, spec) {
  const drawn = finder.losses.filter(finite).length;
  const value = (key, id) => {
    const v = markValue(finder, key);
    return h("dd", { id, "data-lr": v ?? "" }, fmt(v, 4));
  };
  return [
    h("dt", {}, "chosen LR"), value("chosen", "finder-chosen"),
    h("dt", {}, "steepest"), value("steepest", "finder-steepest"),
    h("dt", {}, "min / 10"), value("min_over_10", "finder-min-over-10"),
    h("dt", {}, "points"), h("dd", { id: "finder-points" }, `${drawn} finite of ${finder.losses.length}`),
    h("dt", {}, "switched at"), h("dd", { id: "finder-switched" }, finder.switched_at ?? "—"),
    spec && spec.type === "LRRangeTest"
      ? [h("dt", {}, "range"), h("dd", {}, `${fmt(spec.min_lr)} → ${fmt(spec.max_lr)} (${spec.mode || "exponential"})`)]
      : null,
  ];
}

/**
 * The panel; `refresh(run)` hides it for a run with no range test, and asks the server for
 * the curve until the test is done.
 */
export function finderPanel(runId) {
  const status = h("span", { class: "badge", id: "finder-status" });
  const factList = h("dl", { class: "facts", id: "finder-facts" });
  const chartBox = h("div", { class: "charts", id: "finder-chart" });
  const error = h("p", { class: "banner-inline", hidden: true });
  const node = h("section", { class: "card", id: "lr-finder", hidden: true },
    h("div", { class: "card-head" }, h("h2", {}, "LR finder"), status), error, factList, chartBox);
  let last = null;
  let lastKey = "";

  async function refresh(run) {
    if (!isRangeTest(run)) { node.hidden = true; return; }
    // A finished test's answer no longer changes (unless the run has since reported its switch).
    if (last && last.done && (last.switched_at ?? null) === (run.switched_at ?? null)) return;
    let finder;
    try {
      finder = await api(`/v1/runs/${encodeURIComponent(runId)}/lr-finder`);
    } catch (err) {
      node.hidden = err.status === 409 || err.status === 404; // no test after all: no panel
      error.textContent = `Could not load the LR finder: ${err.message}`;
      error.hidden = node.hidden;
      return;
    }
    error.hidden = true;
    node.hidden = false;
    last = finder;
    const spec = run.schedule && run.schedule.type === "LRRangeTest" ? run.schedule : null;
    const key = JSON.stringify([finder, spec]);
    if (key === lastKey) return; // redraw only on change: the hover readout survives a quiet refresh
    lastKey = key;
    const log = !spec || (spec.mode || "exponential") === "exponential";
    status.textContent = statusText(finder, spec);
    status.className = `badge ${finder.done ? "status-active" : "status-held"}`;
    node.dataset.done = String(finder.done);
    factList.replaceChildren(...facts(finder, spec).flat().filter(Boolean));
    chartBox.replaceChildren(finderChart(finder, { spec, log }));
    chartBox.dataset.points = String(finder.losses.filter(finite).length);
  }

  return { node, refresh };
}
