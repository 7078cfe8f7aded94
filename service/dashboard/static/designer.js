// The schedule designer: edit a spec, base LRs and a step count, see the curve that
// POST /v1/schedules/preview computes (torch's own values). A 422 is shown next to the
// field its errors[].field names; a spec that is not JSON is caught before sending.

import { api } from "./api.js";
import { lineChart } from "./chart.js";
import { spikeText } from "./spec.js";
import { h } from "./dom.js";

const EXAMPLE = {
  type: "SequentialLR",
  milestones: [50],
  schedulers: [
    { type: "LinearLR", start_factor: 0.1, total_iters: 50 },
    { type: "CosineAnnealingLR", T_max: 250, eta_min: 0.0001 },
  ],
};
const PLACEHOLDER = { int: 10, float: 0.1, bool: false, string: "" };
// Types whose placeholder arguments would not make a valid spec (LRRangeTest needs max_lr > min_lr).
const EXAMPLES = {
  LRRangeTest: { type: "LRRangeTest", min_lr: 1e-6, max_lr: 1, num_steps: 100, mode: "exponential",
    then: { type: "CosineAnnealingLR", T_max: 200 } },
};
const state = { spec: JSON.stringify(EXAMPLE, null, 2), baseLrs: "0.1", moms: "", steps: "300", metrics: "", log: false };

// errors[].field's first segment → the form field it belongs to.
const FIELD_OF = { schedule: "schedule", base_lrs: "base_lrs", base_momentums: "base_momentums", steps: "steps", metrics: "metrics" };

function numbers(text) {
  return text.split(/[,\s]+/).filter(Boolean).map(Number);
}

/**
 * What a range-test preview cannot show by itself: with no losses for its monitor the test
 * runs all its steps and `then` starts from the base LR; with losses the server simulates it.
 */
function rangeTestNote(spec, metrics) {
  if (!spec || spec.type !== "LRRangeTest") return "";
  const monitor = spec.monitor || "loss";
  if (metrics && Array.isArray(metrics[monitor]) && metrics[monitor].some((v) => v !== null)) {
    return `Range test: the simulated ${monitor} values are smoothed as on a run; the curve switches where ` +
      "the test would stop (early stop or num_steps), at the LR it would choose.";
  }
  return `Range test: no ${monitor} values given, so the curve shows the rising LR for all ${spec.num_steps ?? 100} ` +
    `steps${spec.then ? ", then the next schedule from the base LR" : ""}. Give {"${monitor}": [...]} as simulated ` +
    "metrics to see where the test would stop and which LR it would choose.";
}

/** A spec skeleton for a catalog entry: its required arguments with placeholder values. */
function template(entry) {
  if (EXAMPLES[entry.type]) return structuredClone(EXAMPLES[entry.type]);
  const spec = { type: entry.type };
  for (const arg of entry.args) {
    if (!arg.required) continue;
    if (arg.choices) spec[arg.name] = arg.choices[0];
    else if (/list|\[/.test(arg.type)) spec[arg.name] = arg.name === "schedulers" ? [{ type: "ConstantLR" }] : [10];
    else spec[arg.name] = PLACEHOLDER[arg.type] ?? (/float/.test(arg.type) ? 0.1 : 10);
  }
  return spec;
}

export function designerPage(root) {
  const fields = {
    schedule: h("textarea", { id: "designer-spec", rows: 16, spellcheck: "false", "aria-label": "schedule spec (JSON)" }),
    base_lrs: h("input", { id: "designer-base-lrs", "aria-label": "base LRs", placeholder: "0.1, 0.01" }),
    base_momentums: h("input", { id: "designer-moms", "aria-label": "base momentums", placeholder: "optional: 0.9" }),
    steps: h("input", { id: "designer-steps", type: "number", min: 1, max: 100000, "aria-label": "steps" }),
    metrics: h("textarea", { id: "designer-metrics", rows: 3, spellcheck: "false", "aria-label": "simulated metrics (JSON)",
      placeholder: '{"val_loss": [1.0, 0.9, 0.9, 0.9, null, 0.9]}  (optional: drives ReduceLROnPlateau and LRRangeTest)' }),
  };
  fields.schedule.value = state.spec;
  fields.base_lrs.value = state.baseLrs;
  fields.base_momentums.value = state.moms;
  fields.steps.value = state.steps;
  fields.metrics.value = state.metrics;
  const errors = Object.fromEntries(Object.keys(fields).map((f) => [f, h("p", { class: "field-error", "data-field-error": f, hidden: true })]));
  const general = h("p", { class: "field-error", "data-field-error": "general", hidden: true });
  const chartBox = h("div", { class: "charts", id: "designer-chart" });
  const note = h("p", { class: "muted small", id: "designer-note", hidden: true });
  const picker = h("select", { id: "designer-type", "aria-label": "insert a schedule type" }, h("option", { value: "" }, "insert a type…"));
  const help = h("p", { class: "muted small", id: "designer-help" });
  const logBox = h("input", { type: "checkbox", id: "designer-log", checked: state.log });
  const previewButton = h("button", { type: "button", id: "designer-preview" }, "Preview");

  const field = (name, label, hint) => h("div", { class: "field" }, h("label", { for: fields[name].id }, label), fields[name],
    hint ? h("p", { class: "muted small" }, hint) : null, errors[name]);

  root.append(
    h("section", { class: "page-head" }, h("h1", {}, "Schedule designer"),
      h("span", { class: "muted" }, "values from torch's own schedulers, via POST /v1/schedules/preview")),
    h("div", { class: "designer" },
      h("section", { class: "card" },
        h("div", { class: "card-head" }, h("h2", {}, "Spec"), picker), help,
        field("schedule", "Schedule (JSON)"),
        h("div", { class: "row" }, field("base_lrs", "Base LRs", "one per param group"),
          field("base_momentums", "Base momentums"), field("steps", "Steps")),
        field("metrics", "Simulated metrics (JSON)", "value passed with the j-th step() call; null = no report"),
        h("div", { class: "button-row" }, previewButton, h("label", { class: "inline" }, logBox, " log-scale"))),
      h("section", { class: "card" }, h("h2", {}, "Curve"), general, note, chartBox)),
  );

  const clearErrors = () => {
    for (const [name, el] of Object.entries(errors)) { el.hidden = true; fields[name].removeAttribute("aria-invalid"); }
    general.hidden = true;
  };
  const showError = (path, message) => {
    const name = FIELD_OF[String(path).split(".")[0]];
    const target = name ? errors[name] : general;
    target.textContent = name ? `${path}: ${message}` : message;
    target.hidden = false;
    if (name) fields[name].setAttribute("aria-invalid", "true");
  };

  let seq = 0;
  async function preview() {
    const mine = ++seq;
    Object.assign(state, { spec: fields.schedule.value, baseLrs: fields.base_lrs.value, moms: fields.base_momentums.value,
      steps: fields.steps.value, metrics: fields.metrics.value, log: logBox.checked });
    clearErrors();
    note.hidden = true;
    const body = { base_lrs: numbers(state.baseLrs), steps: Number(state.steps) };
    try { body.schedule = JSON.parse(state.spec); } catch (err) { return showError("schedule", `not valid JSON (${err.message})`); }
    if (state.moms.trim()) body.base_momentums = numbers(state.moms);
    if (state.metrics.trim()) {
      try { body.metrics = JSON.parse(state.metrics); } catch (err) { return showError("metrics", `not valid JSON (${err.message})`); }
    }
    try {
      const result = await api("/v1/schedules/preview", { method: "POST", body });
      if (mine !== seq) return; // a newer edit already asked again
      const steps = result.lrs.map((_, i) => i);
      const groups = body.base_lrs.length;
      const series = (rows, name) => Array.from({ length: rows[0].length }, (_, g) =>
        ({ label: groups > 1 ? `${name} (group ${g})` : name, steps, values: rows.map((r) => r[g]) }));
      // a spike guard's backoffs, found in the simulated metric stream, marked where they land
      const events = (result.spikes || []).map((sp) => ({ step: sp.applied_at, kind: "loss_spike", text: spikeText(sp) }));
      const out = [lineChart({ series: series(result.lrs, "lr"), events, log: state.log, name: "preview" })];
      if (result.momentums) out.push(h("h3", {}, "Momentum"), lineChart({ series: series(result.momentums, "momentum"), height: 160, name: "preview-momentum" }));
      chartBox.replaceChildren(...out);
      note.textContent = rangeTestNote(body.schedule, body.metrics);
      note.hidden = !note.textContent;
    } catch (err) {
      if (mine !== seq) return;
      if (err.errors.length) for (const e of err.errors) showError(e.field, e.message);
      else showError("", err.message);
    }
  }

  let debounce = null;
  const later = () => { clearTimeout(debounce); debounce = setTimeout(preview, 600); };
  for (const el of Object.values(fields)) el.addEventListener("input", later);
  logBox.addEventListener("change", preview);
  previewButton.addEventListener("click", () => { clearTimeout(debounce); preview(); });
  fields.schedule.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); previewButton.click(); } });

  api("/v1/schedules/catalog").then(({ types }) => {
    picker.append(...types.map((t) => h("option", { value: t.type }, t.type)));
    picker.addEventListener("change", () => {
      const entry = types.find((t) => t.type === picker.value);
      if (!entry) return;
      help.textContent = `${entry.type}: ${entry.description} Arguments: ${entry.args.map((a) => `${a.name} (${a.type}${a.required ? ", required" : `, default ${JSON.stringify(a.default)}`})`).join(", ")}.`;
      const spec = template(entry);
      fields.schedule.value = JSON.stringify(spec, null, 2);
      if (spec.type === "LRRangeTest") logBox.checked = spec.mode !== "linear"; // decades of LR
      picker.value = "";
      preview();
    });
  }).catch(() => picker.remove());

  preview();
  return { stop: () => clearTimeout(debounce) };
}
