// Operator actions on a run (admin only): set LR, scale, hold, resume, stop. Each one is
// spelled out in a confirmation dialog before it is sent; 422s land next to their field.

import { api } from "./api.js";
import { confirmAction } from "./confirm.js";
import { fmt, h } from "./dom.js";

function numbers(text) {
  return text.split(/[,\s]+/).filter(Boolean).map(Number);
}

/** The control panel; `getRun()` returns the run as last read, `onDone()` refreshes the page. */
export function controlPanel(runId, getRun, onDone) {
  const lrInput = h("input", { id: "ctl-lr", placeholder: "0.01 or 0.01, 0.001 (one per group)", "aria-label": "new LR" });
  const factorInput = h("input", { id: "ctl-factor", placeholder: "0.5", inputmode: "decimal", "aria-label": "scale factor" });
  const atInput = h("input", { id: "ctl-at", placeholder: "first free step", inputmode: "numeric", "aria-label": "at step" });
  const inputs = { lr: lrInput, lrs: lrInput, factor: factorInput, at_step: atInput };
  const errors = Object.fromEntries(["lr", "factor", "at_step"].map((f) => [f, h("p", { class: "field-error", "data-field-error": f, hidden: true })]));
  const message = h("p", { class: "control-message", id: "control-message", role: "status" });

  const clearErrors = () => {
    for (const el of Object.values(errors)) el.hidden = true;
    for (const el of Object.values(inputs)) el.removeAttribute("aria-invalid");
  };
  const showError = (field, text) => {
    const key = field === "lrs" ? "lr" : field;
    if (!errors[key]) { message.textContent = text; message.className = "control-message error"; return; }
    errors[key].textContent = text;
    errors[key].hidden = false;
    inputs[key].setAttribute("aria-invalid", "true");
  };

  const LABELS = { set_lr: "Set LR", scale: "Scale", hold: "Hold", resume: "Resume", stop: "Stop" };

  async function act(action, extra, describe) {
    clearErrors();
    message.textContent = "";
    const body = { action, ...extra };
    const at = atInput.value.trim();
    if (at) {
      if (!/^\d+$/.test(at)) return showError("at_step", "a whole step number");
      body.at_step = Number(at);
    }
    const run = getRun();
    const when = body.at_step !== undefined ? `at step ${body.at_step}` : `at the first free step (${run ? run.horizon + 1 : "next"})`;
    const text = `${describe} ${when}. Clients get the new values from that step on; steps already handed out never change.`;
    if (!(await confirmAction(`${LABELS[action]} on ${runId}?`, text, LABELS[action]))) {
      message.textContent = "Cancelled.";
      message.className = "control-message muted";
      return;
    }
    try {
      const result = await api(`/v1/runs/${encodeURIComponent(runId)}/control`, { method: "POST", body });
      message.textContent = `${action} applied at step ${result.applied_at}.`;
      message.className = "control-message ok";
      onDone();
    } catch (err) {
      const first = err.errors[0];
      if (first && first.field) {
        const field = first.field.replace(/^body\./, "").split(".")[0];
        showError(field, first.message);
        if (["lr", "lrs", "factor", "at_step"].includes(field)) return;
      }
      message.textContent = `${action} refused (${err.status}): ${err.message}`;
      message.className = "control-message error";
    }
  }

  const setLr = () => {
    const values = numbers(lrInput.value);
    if (!values.length || values.some((v) => !Number.isFinite(v) || v < 0)) return showError("lr", "one LR, or one per param group (numbers ≥ 0)");
    const body = values.length === 1 ? { lr: values[0] } : { lrs: values };
    act("set_lr", body, `Set the LR of every param group to ${values.map((v) => fmt(v, 6)).join(", ")}`);
  };
  const scale = () => {
    const factor = Number(factorInput.value.trim());
    if (!factorInput.value.trim() || !Number.isFinite(factor) || factor <= 0) return showError("factor", "a number > 0");
    act("scale", { factor }, `Multiply the current LRs by ${fmt(factor, 6)}`);
  };

  const buttons = {
    set_lr: h("button", { type: "button", "data-action": "set_lr", onclick: setLr }, "Set LR"),
    scale: h("button", { type: "button", "data-action": "scale", onclick: scale }, "Scale"),
    hold: h("button", { type: "button", "data-action": "hold", class: "secondary", onclick: () => act("hold", {}, "Freeze the schedule's clock") }, "Hold"),
    resume: h("button", { type: "button", "data-action": "resume", class: "secondary", onclick: () => act("resume", {}, "Let the schedule run on") }, "Resume"),
    stop: h("button", { type: "button", "data-action": "stop", class: "danger", onclick: () => act("stop", {}, "Stop the run for good (clients report should_stop)") }, "Stop"),
  };

  const panel = h("section", { class: "card controls", id: "controls" },
    h("h2", {}, "Operator actions"),
    h("div", { class: "control-grid" },
      h("label", { for: "ctl-lr" }, "New LR"), h("div", { class: "field" }, lrInput, errors.lr), buttons.set_lr,
      h("label", { for: "ctl-factor" }, "Factor"), h("div", { class: "field" }, factorInput, errors.factor), buttons.scale,
      h("label", { for: "ctl-at" }, "At step"), h("div", { class: "field" }, atInput, errors.at_step),
      h("div", { class: "button-row" }, buttons.hold, buttons.resume, buttons.stop)),
    message);

  /**
   * A stopped run takes no more actions (the server says 409): grey them out. Hold and
   * resume stay available in every other status, since one may be pending above the horizon.
   */
  panel.update = (run) => {
    for (const button of Object.values(buttons)) button.disabled = run.status === "stopped";
  };
  return panel;
}
