// The runs page: every run with status, labels, step, LR, last watched metric and an LR
// sparkline; filters by label and status (kept in the URL); refreshes itself.

import { api, coalesced, mapLimited } from "./api.js";
import { sparkline } from "./chart.js";
import { fmt, fmtTime, h, labelChips, staleBadge, statusBadge } from "./dom.js";
import { fleetBar } from "./fleet.js";
import { liveEvents } from "./live.js";
import { lastMetric, specSummary } from "./spec.js";

const REFRESH_MS = 3000;
const LIVE_REFRESH_MS = 1000;
const PAGE = 200;
const MAX_RUNS = 1000; // a page of a dashboard, not an export: beyond this, filter
const SPARK_POINTS = 80;
// A run's history is fetched again when the run changed, or at least this often (metrics
// logged through POST .../metrics do not touch the run itself): history is not a cheap call.
const HISTORY_MAX_AGE_MS = 15000;

function readFilters() {
  const query = new URLSearchParams(window.location.hash.split("?")[1] || "");
  return { labels: query.getAll("label"), status: query.get("status") || "" };
}

function writeFilters({ labels, status }) {
  const query = new URLSearchParams();
  for (const l of labels) query.append("label", l);
  if (status) query.set("status", status);
  const qs = query.toString();
  // replaceState: the filters stay in the URL without re-rendering the page.
  window.history.replaceState(null, "", `#/runs${qs ? `?${qs}` : ""}`);
}

async function fetchRuns(filters) {
  const runs = [];
  let cursor;
  do {
    const page = await api("/v1/runs", { query: { label: filters.labels, status: filters.status, limit: PAGE, cursor } });
    runs.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor && runs.length < MAX_RUNS);
  return { runs, truncated: Boolean(cursor) };
}

function row(run, history, onPick) {
  const metric = lastMetric(history, run.schedule);
  const lrs = run.lrs || [];
  const lrSeries = history ? history.lrs : { steps: [], values: [] };
  return h("tr", { "data-run-id": run.run_id, "data-status": run.status, "data-stale": String(Boolean(run.stale)) },
    h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(run.run_id)}`, class: "run-link" }, run.run_id),
      h("div", { class: "muted small" }, specSummary(run.schedule))),
    h("td", {}, statusBadge(run.status), staleBadge(run)),
    h("td", { class: "labels" }, labelChips(run.labels, onPick)),
    h("td", { class: "num", "data-col": "horizon" }, String(run.horizon)),
    h("td", { class: "num", "data-col": "lr", title: lrs.map((v) => fmt(v, 8)).join(", ") },
      fmt(lrs[0], 4), lrs.length > 1 ? h("span", { class: "muted" }, ` +${lrs.length - 1}`) : null),
    h("td", { class: "num", "data-col": "metric" }, metric
      ? [h("span", { class: metric.watched ? "" : "muted" }, `${metric.name} `), h("b", {}, fmt(metric.value, 4)),
        h("div", { class: "muted small" }, `@ step ${metric.step}`)]
      : h("span", { class: "muted" }, "—")),
    h("td", { class: "spark-cell" }, sparkline(lrSeries.steps, lrSeries.values.map((v) => v[0]))),
    h("td", { class: "muted small" }, fmtTime(run.updated_at)),
  );
}

export function runsPage(root, session = {}) {
  const filters = readFilters();
  const labelInput = h("input", { id: "filter-label", placeholder: "label key:value (several: comma-separated)",
    value: filters.labels.join(", "), "aria-label": "label filter" });
  const statusSelect = h("select", { id: "filter-status", "aria-label": "status filter" },
    ["", "active", "held", "stopped"].map((st) => h("option", { value: st, selected: st === filters.status }, st || "any status")));
  const labelError = h("p", { class: "field-error", "data-field-error": "label", hidden: true });
  const stamp = h("span", { class: "muted small", id: "runs-updated" });
  const tbody = h("tbody");
  const empty = h("p", { class: "empty", hidden: true });
  const note = h("p", { class: "muted small", hidden: true });

  const apply = () => {
    filters.labels = labelInput.value.split(/[,\s]+/).map((x) => x.trim()).filter(Boolean);
    filters.status = statusSelect.value;
    writeFilters(filters);
    refresh();
  };
  const addLabel = (label) => {
    if (!filters.labels.includes(label)) labelInput.value = [...filters.labels, label].join(", ");
    apply();
  };
  labelInput.addEventListener("change", apply);
  labelInput.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); apply(); } });
  statusSelect.addEventListener("change", apply);

  root.append(
    h("section", { class: "page-head" }, h("h1", {}, "Runs"), stamp),
    h("div", { class: "filters" }, h("div", { class: "field" }, labelInput, labelError), statusSelect,
      h("button", { type: "button", class: "secondary", onclick: () => { labelInput.value = ""; statusSelect.value = ""; apply(); } }, "Clear")),
    session.admin ? fleetBar(() => filters, () => refresh()) : null,
    h("table", { class: "runs", id: "runs-table" },
      h("thead", {}, h("tr", {}, ["Run", "Status", "Labels", "Step", "LR", "Last metric", "LR curve", "Updated"].map((t) => h("th", {}, t)))),
      tbody),
    empty, note,
  );

  const cache = new Map(); // run_id -> {version, at, history}
  async function history(run) {
    const version = `${run.horizon}|${run.updated_at}|${run.status}`;
    const hit = cache.get(run.run_id);
    if (hit && hit.version === version && Date.now() - hit.at < HISTORY_MAX_AGE_MS) return hit.history;
    const path = `/v1/runs/${encodeURIComponent(run.run_id)}/history`;
    const fresh = await api(path, { query: { max_points: SPARK_POINTS } }).catch(() => (hit ? hit.history : null));
    cache.set(run.run_id, { version, at: Date.now(), history: fresh });
    return fresh;
  }

  const refresh = coalesced(async () => {
    try {
      const { runs, truncated } = await fetchRuns(filters);
      const histories = await mapLimited(runs, 6, (run) => history(run));
      tbody.replaceChildren(...runs.map((run, i) => row(run, histories[i], addLabel)));
      labelError.hidden = true;
      labelInput.removeAttribute("aria-invalid");
      empty.hidden = runs.length > 0;
      empty.textContent = filters.labels.length || filters.status ? "No run matches these filters." :
        "No runs yet: a training job creates one with POST /v1/runs (or RemoteScheduler).";
      note.hidden = !truncated;
      note.textContent = `Showing the first ${runs.length} runs; filter to see others.`;
      stamp.textContent = `${runs.length} run${runs.length === 1 ? "" : "s"} · updated ${fmtTime(new Date().toISOString())}`;
    } catch (err) {
      if (err.errors.length && err.errors[0].field.startsWith("label")) {
        labelError.textContent = err.errors[0].message;
        labelError.hidden = false;
        labelInput.setAttribute("aria-invalid", "true");
      } else {
        stamp.textContent = `could not refresh: ${err.message}`;
      }
    }
  });

  refresh();
  // A new run, a status change or an action shows at once (GET /v1/events); steps are not
  // events, so the timer still refreshes the step and LR columns.
  // At most one refresh a second however busy the fleet (a burst of events is one refresh).
  let soon = null;
  const live = liveEvents({}, () => {
    if (!soon) soon = setTimeout(() => { soon = null; refresh(); }, LIVE_REFRESH_MS);
  }, (state) => { stamp.dataset.live = state; });
  const timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  return { stop: () => { clearInterval(timer); clearTimeout(soon); live.stop(); } };
}
