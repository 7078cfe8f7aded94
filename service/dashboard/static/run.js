// The run page: LR per param group and every metric on one shared step axis, events marked
// on the curves and listed, the spec, (for admins) the operator actions, and for a range
// test its LR finder panel.

import { api, coalesced } from "./api.js";
import { EVENT_COLORS, lineChart, prefersLog } from "./chart.js";
import { controlPanel } from "./controls.js";
import { fmt, fmtTime, h, labelChips, staleBadge, statusBadge } from "./dom.js";
import { finderPanel } from "./finder.js";
import { liveEvents } from "./live.js";
import { guardOf, specSummary, spikeText, watchedMetrics } from "./spec.js";

const REFRESH_MS = 4000;
const MARKED = new Set(["plateau_reduction", "control", "status", "barrier_timeout", "schedule_switch", "loss_spike"]);
const prefs = { log: null, maxPoints: 500 }; // kept while the tab lives; log null: decide per run

/** The event's own fields in a line: "scale factor=0.5", "val_loss=0.41: 0.1 → 0.05". */
export function eventText(ev) {
  const { kind, step, at, actor, reason, ...rest } = ev;
  switch (kind) {
    case "created": return "run created";
    case "control": {
      const { action, ...args } = rest;
      const shown = Object.entries(args).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : fmt(v, 6)}`);
      return [action, ...shown].join(" ");
    }
    case "plateau_reduction":
      return `${rest.monitor}=${fmt(rest.value, 5)}: ${(rest.lrs_before || []).map((v) => fmt(v)).join(", ")} → ${(rest.lrs_after || []).map((v) => fmt(v)).join(", ")}`;
    case "status": return `status → ${rest.status}`;
    case "barrier_timeout": return `missing ranks ${JSON.stringify(rest.missing_ranks)} after ${rest.timeout_s}s`;
    case "schedule_switch":
      return `range test chose lr ${fmt(rest.chosen, 6)}${rest.schedule ? ` → ${specSummary(rest.schedule)}` : ""}`;
    case "loss_spike": return spikeText(ev);
    default: return JSON.stringify(rest);
  }
}

function metricSeries(name, series) {
  const ranks = series.ranks || series.steps.map(() => 0);
  const byRank = new Map();
  series.steps.forEach((step, i) => {
    if (!byRank.has(ranks[i])) byRank.set(ranks[i], { steps: [], values: [] });
    byRank.get(ranks[i]).steps.push(step);
    byRank.get(ranks[i]).values.push(series.values[i]);
  });
  return [...byRank.entries()].sort((a, b) => a[0] - b[0]).map(([rank, sr]) =>
    ({ label: byRank.size > 1 ? `${name} (rank ${rank})` : name, ...sr }));
}

function header(run) {
  return [
    h("div", { class: "page-head" }, h("h1", {}, run.run_id), statusBadge(run.status), staleBadge(run),
      run.stopped_at !== null && run.stopped_at !== undefined ? h("span", { class: "muted" }, `stops at step ${run.stopped_at}`) : null),
    h("dl", { class: "facts" },
      h("dt", {}, "step (horizon)"), h("dd", { id: "run-horizon" }, String(run.horizon)),
      h("dt", {}, "LR now"), h("dd", { id: "run-lrs" }, run.lrs.map((v) => fmt(v, 6)).join(", ")),
      run.momentums ? [h("dt", {}, "momentum"), h("dd", {}, run.momentums.map((v) => fmt(v, 4)).join(", "))] : null,
      h("dt", {}, "world size"), h("dd", {}, String(run.world_size)),
      h("dt", {}, "labels"), h("dd", {}, Object.keys(run.labels).length ? labelChips(run.labels) : "—"),
      h("dt", {}, "updated"), h("dd", {}, fmtTime(run.updated_at))),
  ];
}

function eventsTable(events, total) {
  if (!events.length) return h("p", { class: "muted" }, "No events yet.");
  const table = h("table", { class: "events", id: "events-table" },
    h("thead", {}, h("tr", {}, ["Step", "Event", "What", "Who", "When"].map((t) => h("th", {}, t)))),
    h("tbody", {}, [...events].reverse().map((ev) => h("tr", { "data-kind": ev.kind },
      h("td", { class: "num" }, ev.step === null ? "—" : String(ev.step)),
      h("td", {}, dot(ev.kind), ev.kind),
      h("td", {}, eventText(ev), ev.reason ? h("div", { class: "muted small event-reason" }, `“${ev.reason}”`) : null),
      h("td", { class: "event-actor" }, ev.actor || "—"),
      h("td", { class: "muted small" }, fmtTime(ev.at))))));
  if (!(total > events.length)) return table;
  // A history shows the run's latest `max_points` events; every one is in GET /v1/events.
  return h("div", {}, h("p", { class: "muted small", id: "events-cut" }, `The latest ${events.length} of ${total} events.`), table);
}

function dot(kind) {
  const el = h("span", { class: "swatch" });
  el.style.background = EVENT_COLORS[kind] || "#6b7280";
  return el;
}

function eventLegend(kinds) {
  return h("div", { class: "event-legend" }, kinds.map((k) => h("span", {}, dot(k), k)));
}

/** The spike guard's band on its monitor's chart: per rank, the baseline and the spike line. */
function bandSeries(guard) {
  const out = [];
  for (const [rank, band] of Object.entries((guard && guard.band) || {})) {
    const ranks = Object.keys(guard.band).length > 1 ? ` (rank ${rank})` : "";
    out.push({ label: `baseline${ranks}`, steps: band.steps, values: band.baseline, color: "#9ca3af", dashed: true },
      { label: `spike line${ranks}`, steps: band.steps, values: band.upper, color: "#e11d48", dashed: true });
  }
  return out;
}

function charts(run, history, guard) {
  const metricNames = Object.keys(history.metrics).sort();
  const watched = new Set(watchedMetrics(run.schedule));
  metricNames.sort((a, b) => Number(watched.has(b)) - Number(watched.has(a)));
  const last = (sr) => (sr.steps.length ? sr.steps[sr.steps.length - 1] : 0);
  const events = history.events.filter((ev) => MARKED.has(ev.kind)).map((ev) => ({ ...ev, text: eventText(ev) }));
  // Actions placed above the horizon (not yet handed out) stay in view as markers ahead of the curve.
  const x1 = Math.max(1, run.horizon, last(history.lrs), ...metricNames.map((n) => last(history.metrics[n])),
    ...events.map((ev) => ev.step ?? 0));
  const xDomain = [0, x1];
  const groups = run.base_lrs.length;
  const lrSeries = Array.from({ length: groups }, (_, g) => ({
    label: groups > 1 ? `lr (group ${g})` : "lr",
    steps: history.lrs.steps,
    values: history.lrs.values.map((row) => row[g]),
  }));
  const log = prefs.log ?? prefersLog(lrSeries);
  const kinds = [...new Set(events.map((ev) => ev.kind))];
  const out = [
    h("h3", {}, "Learning rate", log ? h("span", { class: "badge subtle" }, "log scale") : null),
    lineChart({ series: lrSeries, events, xDomain, log, name: "lr", stairs: true }),
  ];
  if (kinds.length) out.unshift(eventLegend(kinds));
  const guarded = guard && guard.settings.monitor;
  for (const name of metricNames) {
    const band = name === guarded ? bandSeries(guard) : [];
    // A long run's reports, replayed by the server in the background: the band comes with a later refresh.
    const replaying = name === guarded && guard.bands_through === null;
    out.push(h("h3", {}, name, watched.has(name) ? h("span", { class: "badge subtle" }, "watched") : null,
      band.length ? h("span", { class: "badge subtle" }, "spike guard") : null,
      replaying ? h("span", { class: "badge subtle", id: "band-replaying" }, "spike guard: replaying its reports") : null),
    lineChart({ series: [...metricSeries(name, history.metrics[name]), ...band], events, xDomain, height: 200,
      name: `metric:${name}` }));
  }
  if (!metricNames.length) out.push(h("p", { class: "muted" }, "No metrics reported yet."));
  return { nodes: out, log };
}

export function runPage(root, session, runId) {
  let run = null;
  let lastKey = "";
  const head = h("section", { class: "run-head" }, h("h1", {}, runId));
  const chartBox = h("div", { class: "charts", id: "charts" });
  const eventsBox = h("div");
  const specBox = h("pre", { class: "spec", id: "run-spec" });
  const error = h("p", { class: "banner-inline", hidden: true });
  const liveState = h("span", { class: "muted small", id: "events-live" }, "connecting…");
  const panel = session.admin ? controlPanel(runId, () => run, () => refresh()) : null;
  const finder = finderPanel(runId);

  const logBox = h("input", { type: "checkbox", id: "log-scale" });
  logBox.addEventListener("change", () => { prefs.log = logBox.checked; refresh(); });
  const points = h("select", { id: "max-points", "aria-label": "points per series" },
    [100, 200, 500, 1000, 2000, 5000].map((n) => h("option", { value: n, selected: n === prefs.maxPoints }, `${n} points`)));
  points.addEventListener("change", () => { prefs.maxPoints = Number(points.value); refresh(); });

  root.append(
    h("p", {}, h("a", { href: "#/" }, "← all runs")),
    head, error,
    panel,
    finder.node,
    h("section", { class: "card" },
      h("div", { class: "card-head" }, h("h2", {}, "Curves"),
        h("label", { class: "inline" }, logBox, " log-scale LR"), points),
      chartBox),
    h("div", { class: "split" },
      h("section", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Events"), liveState), eventsBox),
      h("section", { class: "card" }, h("h2", {}, "Spec"), specBox)),
  );

  const refresh = coalesced(async () => {
    try {
      const path = `/v1/runs/${encodeURIComponent(runId)}`;
      const [fresh, history] = await Promise.all([api(path), api(`${path}/history`, { query: { max_points: prefs.maxPoints } })]);
      const guard = guardOf(fresh.schedule) ? await api(`${path}/spike-guard`, { query: { max_points: prefs.maxPoints } }) : null;
      run = fresh;
      error.hidden = true;
      head.replaceChildren(...header(run));
      if (panel) panel.update(run);
      await finder.refresh(run); // while a range test runs, its curve moves with the steps
      const key = JSON.stringify([history, guard, prefs.log]);
      if (key !== lastKey) { // redraw only on change: the hover readout survives a quiet refresh
        lastKey = key;
        const drawn = charts(run, history, guard);
        chartBox.replaceChildren(...drawn.nodes);
        logBox.checked = drawn.log;
        chartBox.dataset.lrPoints = String(history.lrs.steps.length);
        eventsBox.replaceChildren(eventsTable(history.events, history.events_total));
      }
      specBox.textContent = JSON.stringify({ schedule: run.schedule, base_lrs: run.base_lrs,
        base_momentums: run.base_momentums, world_size: run.world_size }, null, 2);
    } catch (err) {
      error.textContent = err.status === 404 ? `Run ${runId} does not exist.` : `Could not load the run: ${err.message}`;
      error.hidden = false;
    }
  });

  refresh();
  // Events arrive live (GET /v1/events); the curves grow with steps, which are not events,
  // so the timer still refreshes them.
  const live = liveEvents({ run_id: runId }, (ev) => {
    liveState.dataset.lastEventId = String(ev.id);
    liveState.textContent = `live · last event #${ev.id} (${ev.kind})`;
    refresh();
  }, (state) => {
    liveState.dataset.state = state;
    if (state !== "live" || !liveState.dataset.lastEventId) liveState.textContent = state === "live" ? "live" : "reconnecting…";
  });
  const timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  return { stop: () => { clearInterval(timer); live.stop(); } };
}
