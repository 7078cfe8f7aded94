"""``ProvisionalTail``: the values after the held window, ridden only while no server answers.

The server sends, on request, the values of the steps after a window computed as if no
further input arrived (API.md, "Outages: the provisional tail"): not committed, not
final. The scheduler keeps the latest such tail and asks for a new one when what it
holds beyond its final values covers less than half of ``ride_s`` of training, or when a
final window disagrees with it (a decision or an operator action changed what follows).
While the server is away, steps past the final values take the tail's values; the first
of them is named (``provisional_from``) in the first request after the outage, and the
server commits those steps or records that an input changed them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DEFAULT_FIRST_TAIL", "DEFAULT_RIDE_S", "MAX_TAIL", "ProvisionalTail"]

#: Seconds of training the tail should cover: a server restart or a deploy fits in it.
DEFAULT_RIDE_S = 60.0
#: Steps of tail asked for before the time per step is known.
DEFAULT_FIRST_TAIL = 1024
#: Most steps of tail asked for (the server's default cap, ``LRSERVE_MAX_PROVISIONAL``): a
#: loop faster than 0.6 ms per step rides a shorter outage than ``ride_s``.
MAX_TAIL = 100_000


class ProvisionalTail:
    """Provisional values of steps ``start .. start + len(lrs) - 1``.

    Args:
        ride_s: Seconds of training the tail should cover.
    """

    def __init__(self, ride_s: float = DEFAULT_RIDE_S) -> None:
        if not ride_s >= 0:
            raise ValueError(f"outage_ride_s must be >= 0, got {ride_s!r}")
        self.ride_s = float(ride_s)
        self.id: int | None = None
        self.start = 0
        self.lrs: list[list[float]] = []
        self.moms: list[list[float]] | None = None
        self.ridden_from: int | None = None  # the first step taken on it in this outage
        self._named: int | None = None  # the ridden_from the latest request named

    @property
    def end(self) -> int:
        """The step after the last one held."""
        return self.start + len(self.lrs)

    def holds(self, step: int) -> bool:
        return self.start <= step < self.end

    def row(self, step: int) -> tuple[list[float], list[float] | None]:
        i = step - self.start
        return self.lrs[i], None if self.moms is None else self.moms[i]

    def ride(self, step: int) -> tuple[list[float], list[float] | None]:
        """The values of ``step`` (held), noting that the job took them."""
        if self.ridden_from is None:
            self.ridden_from = step
        return self.row(step)

    def size_wanted(self, seconds_per_step: float | None) -> int:
        """Steps of tail that cover ``ride_s`` of training."""
        if self.ride_s == 0:
            return 0
        if not seconds_per_step:
            return DEFAULT_FIRST_TAIL
        return min(MAX_TAIL, max(DEFAULT_FIRST_TAIL, math.ceil(self.ride_s / seconds_per_step)))

    def request_fields(self, window_end: int, seconds_per_step: float | None, rank: int) -> dict[str, int]:
        """What to send with a request whose window ends at ``window_end``: ``provisional``
        when the tail beyond it is short, ``provisional_from`` after riding it."""
        fields: dict[str, int] = {}
        want = self.size_wanted(seconds_per_step)
        if want and self.end - (window_end + 1) < want // 2:
            fields["provisional"] = want
        self._named = self.ridden_from
        if self.ridden_from is not None:
            fields["provisional_from"] = self.ridden_from
            if self.id is not None:
                fields["provisional_id"] = self.id
        if fields and rank:
            fields["rank"] = rank
        return fields

    def take(self, answer: Mapping[str, Any], window_start: int, window: Sequence[list[float]]) -> None:
        """Keep an answer's tail; drop the one held if the answer's final values disagree with it."""
        if self.lrs:  # rows are the JSON's lists: compared (and kept) as they are, at C speed
            lo, hi = max(window_start, self.start), min(window_start + len(window), self.end)
            held = self.lrs[lo - self.start : hi - self.start]
            if lo < hi and window[lo - window_start : hi - window_start] != held:
                self.lrs, self.moms = [], None  # a decision changed what follows: ask for a new one
        tail = answer.get("provisional")
        if tail is None:
            return
        self.id = int(tail["id"])
        if tail.get("lrs"):
            self.start, self.lrs, self.moms = int(tail["start"]), tail["lrs"], tail.get("momentums")

    def back(self) -> None:
        """The server answered after an outage: forget the ridden steps once a request named them."""
        if self._named is not None and self._named == self.ridden_from:
            self.ridden_from = self._named = None

    def clear(self) -> None:
        self.id, self.start, self.lrs, self.moms, self.ridden_from = None, 0, [], None, None
