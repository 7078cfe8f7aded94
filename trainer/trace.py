"""Per-rank JSON-lines trace: what each rank applied at every step, and its epoch metrics.

The end-to-end tests compare ranks with it (identical LRs at every step, decisions on the
same step), rebuild the metric sequence the server decided on and see which steps a rank
took while the server was away (``"away": true``). Written outside the
timed part of a step, line-buffered so a reader sees each step as it happens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Trace", "trace_path"]


def trace_path(template: str, rank: int) -> Path:
    """``{rank}`` in ``template`` becomes the rank; without it ranks above 0 get ``.RANK``."""
    if "{rank}" in template:
        return Path(template.replace("{rank}", str(rank)))
    return Path(template if rank == 0 else f"{template}.{rank}")


class Trace:
    """Appends records (resume continues the same file); a no-op without a path."""

    def __init__(self, template: str | None, rank: int) -> None:
        self._file: TextIO | None = None
        if template:
            path = trace_path(template, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            torn = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed by close()
            if torn:  # a killed job left half a line: end it, so the next record stays whole
                self._file.write("\n")

    def step(self, step: int, epoch: int, optimizer: Any, *, away: bool = False) -> None:
        """The values the rank applies at ``step``; ``away``: taken while the server was away
        (held or provisional values: ``RemoteScheduler.state``), marked on those steps only."""
        if self._file is None:
            return
        groups = optimizer.param_groups
        moms = [g["betas"][0] if "betas" in g else g.get("momentum") for g in groups]
        record = {"kind": "step", "step": step, "epoch": epoch,
                  "lrs": [float(g["lr"]) for g in groups], "momentums": moms}
        if away:
            record["away"] = True
        self._write(record)

    def record(self, kind: str, **fields: Any) -> None:
        if self._file is not None:
            self._write({"kind": kind, **fields})

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
