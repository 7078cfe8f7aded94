"""``WindowCache``: the final values the client holds, the client's twin of the server's ``ValueLog``.

The rows are kept as the JSON answer's own lists (one ``[lr, ...]`` per step, the same
for momentums), so merging a window costs a list splice and reading a step an index:
``RemoteScheduler.step()``'s fast path reads ``base`` and ``lrs`` directly.
"""

from __future__ import annotations

__all__ = ["COMPACT_AFTER", "NEVER", "WindowCache"]

#: A step no schedule reaches: "no end known", "no fetch due".
NEVER = float("inf")
#: Rows of passed steps kept before they are dropped (and only when they are most of the rows).
COMPACT_AFTER = 1024


class WindowCache:
    """Final values of steps ``base .. base + len(lrs) - 1``, and where the schedule ends.

    Attributes:
        base: The step of ``lrs[0]``.
        lrs: One row of LRs per step (one per param group).
        moms: One row of momentums per step, or ``None`` for a step that sets none.
        last_window: Steps in the latest window merged (the prefetch margin is half of it).
        end_at: The first step the server said the schedule cannot produce (``NEVER``).
    """

    __slots__ = ("base", "end_at", "last_window", "lrs", "moms")

    def __init__(self) -> None:
        self.base = 0
        self.lrs: list[list[float]] = []
        self.moms: list[list[float] | None] = []
        self.last_window = 1
        self.end_at: float = NEVER

    @property
    def next_step(self) -> int:
        """The first step not held (where the next window starts)."""
        return self.base + len(self.lrs)

    def holds(self, step: int) -> bool:
        return 0 <= step - self.base < len(self.lrs)

    def row(self, step: int) -> tuple[list[float], list[float] | None]:
        """The LRs and momentums of a held step."""
        i = step - self.base
        return self.lrs[i], self.moms[i]

    def restart(self, base: int) -> None:
        """Forget every value: the next window merged starts the cache at ``base``."""
        self.base, self.lrs, self.moms, self.end_at = base, [], [], NEVER

    def merge(self, start: int, lrs: list[list[float]], moms: list[list[float]] | None, current: int) -> None:
        """Add the window of steps ``start .. start + len(lrs) - 1``; the job is at ``current``.

        A window that continues (or overlaps the end of) what is held extends it, newer
        values winning; one that does not touch it replaces it.
        """
        if not lrs:
            return
        rows_m: list[list[float] | None] = list(moms) if moms is not None else [None] * len(lrs)
        end = self.next_step
        if not self.lrs or start < self.base or start > end:
            self.base, self.lrs, self.moms = start, list(lrs), rows_m
        elif start + len(lrs) > end:
            cut = start - self.base
            self.lrs[cut:] = lrs
            self.moms[cut:] = rows_m
        self.last_window = len(lrs)
        done = current - self.base  # rows of steps already passed
        if done > COMPACT_AFTER and done * 2 > len(self.lrs):
            del self.lrs[:done]
            del self.moms[:done]
            self.base += done
