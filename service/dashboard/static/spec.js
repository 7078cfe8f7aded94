// What the pages need to know about a schedule spec without asking the server.

/** Metric names the schedule's decisions watch (ReduceLROnPlateau / LRRangeTest `monitor`). */
export function watchedMetrics(spec) {
  const found = [];
  const walk = (node) => {
    if (!node || typeof node !== "object") return;
    if (node.type === "ReduceLROnPlateau") found.push(node.monitor || "val_loss");
    if (node.type === "LRRangeTest") found.push(node.monitor || "loss");
    for (const child of node.schedulers || []) walk(child);
    if (node.then) walk(node.then);
    if (node.type === "SpikeGuard") walk(node.schedule);
  };
  walk(spec);
  return [...new Set(found)];
}

/** The SpikeGuard of a spec (the whole schedule or a range test's `then`), or null. */
export function guardOf(spec) {
  for (const node of [spec, spec && spec.then]) if (node && node.type === "SpikeGuard") return node;
  return null;
}

/** A loss_spike event (or a preview's spike) in a line. */
export function spikeText(sp) {
  const num = (v) => (typeof v === "number" ? Number(v.toPrecision(5)) : v);
  return `rank ${sp.rank} reported ${num(sp.value)} with step ${sp.step} (baseline ${num(sp.baseline) ?? "—"}): ` +
    `backoff from step ${sp.applied_at}, roll back to ≤ ${sp.last_good_step} (spike ${sp.count})`;
}

/**
 * The metric shown in the runs table: the last report of the first watched metric, else
 * of whichever metric was reported last. Returns {name, step, value, watched} or null.
 */
export function lastMetric(history, spec) {
  const metrics = (history && history.metrics) || {};
  const last = (name) => {
    const series = metrics[name];
    if (!series || !series.steps.length) return null;
    const i = series.steps.length - 1;
    return { name, step: series.steps[i], value: series.values[i] };
  };
  for (const name of watchedMetrics(spec)) {
    const hit = last(name);
    if (hit) return { ...hit, watched: true };
  }
  let best = null;
  for (const name of Object.keys(metrics)) {
    const hit = last(name);
    if (hit && (!best || hit.step > best.step)) best = hit;
  }
  return best && { ...best, watched: false };
}

/** A one-line summary of a spec: "SequentialLR(LinearLR → ReduceLROnPlateau)". */
export function specSummary(spec) {
  if (!spec || typeof spec !== "object") return "";
  const kids = spec.schedulers || [];
  if (spec.type === "SpikeGuard") return `SpikeGuard(${specSummary(spec.schedule)})`;
  const inner = kids.length ? `(${kids.map(specSummary).join(spec.type === "SequentialLR" ? " → " : " + ")})` : "";
  return `${spec.type || "?"}${inner}${spec.then ? ` then ${specSummary(spec.then)}` : ""}`;
}
