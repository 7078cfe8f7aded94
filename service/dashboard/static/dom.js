// Tiny DOM helpers. Every piece of data reaches the page as text (never as HTML), so a
// run id, label or metric name can never inject markup: the page keeps the token safe.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** An HTML element: h("td", {class: "num"}, "0.1"). */
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, same signature as h(). */
export function s(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** Compact numbers for LRs and metrics: 0.1, 0.0025, 1.2e-5, 3.4e+4. */
export function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (!Number.isFinite(value)) return String(value);
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 1e5 || abs < 1e-3) {
    const [m, e] = value.toExponential(digits - 1).split("e");
    return `${String(Number(m))}e${e.replace("+", "")}`;
  }
  return String(Number(value.toPrecision(digits)));
}

/** "12:03:44" for today, "2024-05-01 12:03" otherwise. */
export function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const today = new Date();
  if (d.toDateString() === today.toDateString()) return d.toLocaleTimeString([], { hour12: false });
  return `${d.toISOString().slice(0, 10)} ${d.toTimeString().slice(0, 5)}`;
}

/** A status badge: the status is also a CSS class, so the palette lives in style.css. */
export function statusBadge(status) {
  return h("span", { class: `badge status status-${status}`, text: status });
}

/** "stale" next to the status of an active run not heard from for LRSERVE_STALE_AFTER_S. */
export function staleBadge(run) {
  if (!run.stale) return null;
  const title = run.last_seen ? `no request from any rank since ${new Date(run.last_seen).toLocaleString()}` : "never heard from";
  return h("span", { class: "badge stale", title, "data-stale": "true" }, "stale");
}

/** Label chips; a click calls onPick("key:value") (the runs page filters by it). */
export function labelChips(labels, onPick) {
  return Object.entries(labels || {}).map(([k, v]) =>
    h("button", {
      type: "button", class: "chip", title: onPick ? "filter by this label" : undefined,
      onclick: onPick ? () => onPick(`${k}:${v}`) : undefined,
    }, `${k}:${v}`),
  );
}
