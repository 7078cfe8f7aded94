"""``Lru``: the one bounded map of what a server process keeps between requests (history
answers, a history's events, spike-guard bands, checked specs), least recently used out first.

Each is bounded by a weight (bytes, events, band points) and, where given, by a count; a value
whose weight alone is over the bound is not kept. Thread safe: the event loop and the worker
threads share them. (``cachetools.LRUCache`` weighs its values too, but is not thread safe,
refuses an oversized value with an error, and is not a dependency here.)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """Values by key while their weights (``weight(key, value)``) sum to at most ``most`` and,
    where given, they are at most ``most_items``; the least recently kept or touched go first."""

    def __init__(self, most: int, weight: Callable[[K, V], int], *, most_items: int | None = None) -> None:
        self.most, self.weight = most, weight
        self.most_items = most_items if most_items is not None else float("inf")
        self._kept: OrderedDict[K, V] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, key: K) -> bool:
        return key in self._kept

    def values(self) -> list[V]:
        """What is kept, the least recently used first."""
        with self._lock:
            return list(self._kept.values())

    def get(self, key: K, *, touch: bool = False) -> V | None:
        """The value kept under ``key`` (``touch``: and it is now the most recently used)."""
        if not touch:
            return self._kept.get(key)
        with self._lock:
            value = self._kept.get(key)
            if value is not None:
                self._kept.move_to_end(key)
            return value

    def pop(self, key: K) -> V | None:
        """What is kept under ``key`` goes; it is returned (None if nothing was)."""
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None:
                self._total -= self.weight(key, old)
            return old

    def put(self, key: K, value: V, *, keep_old: Callable[[V], bool] | None = None) -> None:
        """Keep ``value`` under ``key``, the most recently used (or the one kept before, where
        ``keep_old`` says so of it); others go, least recently used first, past the bounds."""
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None:
                self._total -= self.weight(key, old)
                if keep_old is not None and keep_old(old):
                    value = old
            weight = self.weight(key, value)
            if weight > self.most:
                return
            self._kept[key] = value
            self._total += weight
            while self._total > self.most or len(self._kept) > self.most_items:
                gone, dropped = self._kept.popitem(last=False)
                self._total -= self.weight(gone, dropped)
