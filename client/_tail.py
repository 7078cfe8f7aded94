"""``ProvisionalTail``: the values after the held window, ridden only while no server answers.

The server sends, on request, the values of the steps after a window computed as if no
further input arrived (API.md, "Outages: the provisional tail"): not committed, not
final. The scheduler keeps the latest such tail and asks for more (in requests of their
own, on a thread of their own: ``client._fetcher.TailFetcher``) when what it holds beyond
its final values falls short of ``ride_s`` of training by a request's worth, and anew when
a final window disagrees with it (a decision or an operator action changed what follows).
While the server is away, steps past the final values take the tail's values; the first
of them is named (``provisional_from``) in the first request after the outage, and the
server commits those steps or records that an input changed them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrserve.client._cache import WindowCache

__all__ = ["DEFAULT_FIRST_TAIL", "DEFAULT_RIDE_S", "MAX_TAIL", "TAIL_WINDOWS", "ProvisionalTail"]

#: Seconds of training the tail should cover: a server restart or a deploy fits in it.
DEFAULT_RIDE_S = 60.0
#: Steps of tail asked for before the time per step is known.
DEFAULT_FIRST_TAIL = 1024
#: Most tail asked for per window fetched, in windows (but at least one request's chunk):
#: the tail outgrows what the job consumes meanwhile, and the server computes it at about
#: the pace it computes the windows (a fast loop wants 100,000 steps: all at once, that
#: work delayed the windows the loop was about to need).
TAIL_WINDOWS = 2
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
        self.ridden_id: int | None = None  # the id of the tail those steps came from
        self._named: int | None = None  # the ridden_from the latest request named
        self._named_step = 0  # the step that request asked for
        self.generation = 0  # moves when the values held are dropped: answers asked before are stale

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
        if self.ridden_from is None:  # the id first: the fetch thread reads ridden_from first
            self.ridden_id = self.id
            self.ridden_from = step
        return self.row(step)

    def size_wanted(self, seconds_per_step: float | None) -> int:
        """Steps of tail that cover ``ride_s`` of training."""
        if self.ride_s == 0:
            return 0
        if not seconds_per_step:
            return DEFAULT_FIRST_TAIL
        return min(MAX_TAIL, max(DEFAULT_FIRST_TAIL, math.ceil(self.ride_s / seconds_per_step)))

    def wanted(self, final_end: int, seconds_per_step: float | None, most: int) -> int:
        """Steps of tail to ask for after the final values held (which end before
        ``final_end``), at most ``most``: none until what is held beyond them falls short of
        ``ride_s`` by that much (or by half of it, if less), so the tail stays close to
        ``ride_s`` in requests of a useful size (asked on a thread of their own:
        ``client._fetcher.TailFetcher``)."""
        want = self.size_wanted(seconds_per_step)
        short = want - (max(0, self.end - final_end) if self.lrs else 0)
        return min(most, short) if want and short >= min(most, max(1, want // 2)) else 0

    def held(self) -> tuple[int, int] | None:
        """``(id, last step)`` of the tail held, which a request for more continues."""
        return (self.id, self.end - 1) if self.lrs and self.id is not None else None

    def settle_fields(self, window_start: int, rank: int = 0) -> dict[str, int]:
        """What a request for the window from ``window_start`` sends after riding the tail:
        ``provisional_from`` (the first step taken on it), the tail's id, the rank."""
        ridden_from = self.ridden_from  # read once, before the id (``ride`` sets the id first)
        self._named, self._named_step = ridden_from, window_start
        if ridden_from is None:
            return {}
        fields = {"provisional_from": ridden_from}
        if self.ridden_id is not None:  # not the id of a tail that came since
            fields["provisional_id"] = self.ridden_id
        if rank:
            fields["rank"] = rank
        return fields

    def take(self, answer: Mapping[str, Any], window_start: int, window: Sequence[list[float]]) -> None:
        """Keep an answer's tail; drop the one held if the answer's final values disagree with it."""
        if self.lrs:  # rows are the JSON's lists: compared (and kept) as they are, at C speed
            lo, hi = max(window_start, self.start), min(window_start + len(window), self.end)
            held = self.lrs[lo - self.start : hi - self.start]
            if lo < hi and window[lo - window_start : hi - window_start] != held:
                self.lrs, self.moms = [], None  # a decision changed what follows: ask for a new one
                self.generation += 1
        tail = answer.get("provisional")
        if not tail or not tail.get("lrs"):
            return  # none asked (a settling answer's is empty): the id held stays the values' own
        same = self.lrs and tail["id"] == self.id and int(tail["start"]) == self.end
        self.id = int(tail["id"])
        if same:  # it continues the tail held
            self.lrs.extend(tail["lrs"])
            if self.moms is not None and tail.get("momentums") is not None:
                self.moms.extend(tail["momentums"])
        else:
            self.start, self.lrs, self.moms = int(tail["start"]), tail["lrs"], tail.get("momentums")
        done = window_start - self.start  # steps the job is past: forget them
        if done > len(self.lrs) // 2 and done > DEFAULT_FIRST_TAIL:
            del self.lrs[:done]
            if self.moms is not None:
                del self.moms[:done]
            self.start += done

    def back(self, current_step: int, final: WindowCache) -> None:
        """The server answered after an outage: forget the ridden steps once a request named
        them. Steps the job took while that request was on its way are named in the next
        one, unless its answer made them final (``final`` holds them) with the very values
        the job took: then nothing is left to commit or to record (an input placed after
        them, an operator's meanwhile, is no divergence)."""
        if self._named is None or self._named != self.ridden_from:
            return
        self._named = None
        after = self._named_step + 1
        taken = range(after, current_step + 1)
        same = all(final.holds(k) and self.holds(k) and self.row(k) == final.row(k) for k in taken)
        self.ridden_from = None if same else after
        if same:
            self.ridden_id = None

    def clear(self) -> None:
        self.id, self.start, self.lrs, self.moms = None, 0, [], None
        self.ridden_from = self.ridden_id = None
        self.generation += 1
