"""Figures as plain dicts (the JSON) and as text tables (what the command prints)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.stats import rounded

Column = tuple[str, str]  # (key in each row, header)
VERDICTS = {True: "HOLDS", False: "DOES NOT HOLD", None: "n/a"}


def figure(name: str, title: str, *, ran: str, target: str, holds: bool | None,
           columns: Sequence[Column], rows: list[dict[str, Any]], notes: Sequence[str] = (),
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One figure: what ran, the target and whether it holds, and its rows of numbers."""
    return {
        "name": name,
        "title": title,
        "ran": ran,
        "target": target,
        "holds": holds,
        "columns": [list(c) for c in columns],
        "rows": rounded(rows, 4),
        "notes": list(notes),
        "extra": rounded(extra or {}, 4),
        "skipped": None,
    }


def skipped(name: str, title: str, reason: str) -> dict[str, Any]:
    """A figure that could not run here, with the reason (a missing package, no database)."""
    return {"name": name, "title": title, "ran": "", "target": "", "holds": None, "columns": [],
            "rows": [], "notes": [], "extra": {}, "skipped": reason}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def table(fig: dict[str, Any]) -> str:
    """The figure as a text table, with its target, verdict and notes."""
    head = f"== {fig['title']} =="
    if fig.get("skipped"):
        return f"{head}\nSKIPPED: {fig['skipped']}\n"
    columns = fig["columns"]
    cells = [[fmt(row.get(key)) for key, _ in columns] for row in fig["rows"]]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = [head, f"ran: {fig['ran']}"]
    for c in [[h for _, h in columns], *cells]:
        padded = [v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths, strict=True))]
        lines.append("  ".join(padded))
    verdict = VERDICTS[fig["holds"]]
    lines.append(f"target: {fig['target']} -> {verdict}")
    lines.extend(f"note: {n}" for n in fig.get("notes", []))
    return "\n".join(lines) + "\n"
