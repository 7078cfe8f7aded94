// Act on every run the runs page shows (admin only): the filters become a selector for
// POST /v1/control. A dry run counts the runs first; the confirmation names the action and
// the count; the answer says how many took it and which refused.

import { api } from "./api.js";
import { confirmAction } from "./confirm.js";
import { fmt, h } from "./dom.js";

const ACTIONS = { scale: "Scale LRs by", hold: "Hold", resume: "Resume", stop: "Stop" };

function selectorOf(filters) {
  const labels = {};
  for (const item of filters.labels) {
    const at = item.indexOf(":");
    if (at > 0) labels[item.slice(0, at)] = item.slice(at + 1);
  }
  // No filter at all means every run: the server wants that said, as every status.
  const status = filters.status ? [filters.status] : (Object.keys(labels).length ? undefined : ["active", "held", "stopped"]);
  return status ? { labels, status } : { labels };
}

function describe(selector) {
  const parts = Object.entries(selector.labels).map(([k, v]) => `${k}:${v}`);
  if (selector.status) parts.push(`status ${selector.status.join(" or ")}`);
  return parts.join(", ");
}

/** The fleet bar; `getFilters()` returns the runs page's filters, `onDone()` refreshes it. */
export function fleetBar(getFilters, onDone) {
  const actionSelect = h("select", { id: "fleet-action", "aria-label": "fleet action" },
    Object.entries(ACTIONS).map(([value, text]) => h("option", { value }, text)));
  const factorInput = h("input", { id: "fleet-factor", placeholder: "0.5", inputmode: "decimal", "aria-label": "scale factor" });
  const reasonInput = h("input", { id: "fleet-reason", class: "reason", placeholder: "reason (recorded)", "aria-label": "reason" });
  const message = h("p", { class: "control-message", id: "fleet-message", role: "status" });
  actionSelect.addEventListener("change", () => { factorInput.hidden = actionSelect.value !== "scale"; });

  async function actOnAll() {
    message.textContent = "";
    const kind = actionSelect.value;
    const action = { action: kind };
    if (kind === "scale") {
      const factor = Number(factorInput.value.trim());
      if (!factorInput.value.trim() || !Number.isFinite(factor) || factor <= 0) {
        message.textContent = "The scale factor must be a number > 0.";
        message.className = "control-message error";
        return;
      }
      action.factor = factor;
    }
    const selector = selectorOf(getFilters());
    const reason = reasonInput.value.trim() || undefined;
    try {
      const dry = await api("/v1/control", { method: "POST", body: { selector, action, dry_run: true } });
      if (!dry.matched) {
        message.textContent = "No run matches these filters.";
        message.className = "control-message muted";
        return;
      }
      const what = kind === "scale" ? `Multiply the current LRs by ${fmt(action.factor, 6)}` : ACTIONS[kind];
      const text = `${what} on ${dry.matched} run${dry.matched === 1 ? "" : "s"} (${describe(selector)}), each at its own first free step.`;
      if (!(await confirmAction(`${ACTIONS[kind].split(" ")[0]} ${dry.matched} runs?`, text, `Apply to ${dry.matched} runs`))) {
        message.textContent = "Cancelled.";
        message.className = "control-message muted";
        return;
      }
      const done = await api("/v1/control", { method: "POST", body: { selector, action, reason } });
      const refused = done.results.filter((r) => r.error);
      message.textContent = `${kind} applied to ${done.matched - refused.length} of ${done.matched} runs.` +
        (refused.length ? ` Refused: ${refused.map((r) => `${r.run_id} (${r.error.detail})`).join("; ")}` : "");
      message.className = `control-message ${refused.length ? "error" : "ok"}`;
      onDone();
    } catch (err) {
      message.textContent = `${kind} refused (${err.status}): ${err.message}`;
      message.className = "control-message error";
    }
  }

  const button = h("button", { type: "button", id: "fleet-apply", onclick: actOnAll }, "Act on all shown");
  return h("section", { class: "fleet card", id: "fleet-bar" },
    h("strong", {}, "All shown runs:"), actionSelect, factorInput, reasonInput, button, message);
}
