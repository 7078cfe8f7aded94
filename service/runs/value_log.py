"""``ValueLog``: a run's final values in memory, packed into arrays of doubles."""

from __future__ import annotations

import operator
from array import array
from collections.abc import Iterable, Iterator
from itertools import repeat
from typing import overload

import numpy as np
from lrserve.service.engine.engine import Values


class ValueLog:
    """The values of consecutive steps, read like a list of ``Values`` tuples.

    Every final step of every loaded run stays in memory, so its form matters: as tuples of
    floats a step costs ~148 B (one group); here each float is 8 B in an ``array('d')``,
    groups interleaved (step ``i``'s LRs are ``lrs[i*g : (i+1)*g]``). A float64 goes in and
    comes out bit for bit; the tuples are built again on each read.
    """

    __slots__ = ("n_groups", "_shape", "_lrs", "_moms")

    def __init__(self, n_groups: int, momentum: bool) -> None:
        self.n_groups = n_groups
        self._shape = (n_groups, n_groups if momentum else None)  # of a step's (LRs, momentums)
        self._lrs = array("d")
        self._moms = array("d") if momentum else None

    def __len__(self) -> int:
        return len(self._lrs) // self.n_groups

    def __eq__(self, other: object) -> bool:
        """Equal to a log of the same values, or to the list of ``Values`` it reads as (floats
        compared as floats: a NaN is equal to nothing, where a list holding the same NaN object
        equals itself)."""
        if isinstance(other, ValueLog):
            return self._shape == other._shape and self._lrs == other._lrs and self._moms == other._moms
        if isinstance(other, list):
            return self[:] == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # it grows

    @overload
    def __getitem__(self, key: int) -> Values: ...
    @overload
    def __getitem__(self, key: slice) -> list[Values]: ...
    def __getitem__(self, key: int | slice) -> Values | list[Values]:
        if isinstance(key, slice):
            start, stop, stride = key.indices(len(self))
            if stride != 1:
                return [self[i] for i in range(start, stop, stride)]
            return self._steps(start, max(start, stop))
        index, steps = operator.index(key), len(self)
        if index < 0:
            index += steps
        if not 0 <= index < steps:
            raise IndexError("ValueLog index out of range")
        at = slice(index * self.n_groups, (index + 1) * self.n_groups)
        return tuple(self._lrs[at]), None if self._moms is None else tuple(self._moms[at])

    def append(self, values: Values) -> None:
        lrs, moms = values
        shape = (len(lrs), None if moms is None else len(moms))
        if shape != self._shape:
            raise ValueError(f"expected {self._shape} (LRs, momentums) per step, got {shape}")
        if moms is not None and self._moms is not None:  # first: a step counts (``len``) by its LRs,
            self._moms.extend(moms)  # so a reader in another thread never sees one without its momentums
        self._lrs.extend(lrs)

    def extend(self, values: Iterable[Values]) -> None:
        for one in values:
            self.append(one)

    def extend_packed(self, lrs: array[float], moms: array[float] | None) -> None:
        """Steps given packed as they are held (``n_groups`` LRs a step, one step after the
        other; momentums likewise, or ``None`` for a log without them): one copy of doubles, no
        float object made."""
        g, momentum = self.n_groups, self._moms is not None
        if len(lrs) % g or (moms is not None) != momentum or (moms is not None and len(moms) != len(lrs)):
            shape = (len(lrs), None if moms is None else len(moms))
            raise ValueError(f"expected steps of {self._shape} (LRs, momentums), got {shape} in all")
        if moms is not None and self._moms is not None:  # first, as in ``append``
            self._moms.extend(moms)
        self._lrs.extend(lrs)

    def extend_log(self, later: ValueLog) -> None:
        """Append ``later``'s steps (the same groups and momentum), as ``extend_packed``."""
        self.extend_packed(later._lrs, later._moms)

    def copy_range(self, start: int, stop: int) -> ValueLog:
        """A new log of steps ``start .. stop - 1`` (within ``0 .. len``), copied packed: no float
        object made (a big window's answer is written from it: ``responses.window_body``)."""
        g, part = self.n_groups, self.empty()
        part._lrs = self._lrs[start * g : stop * g]
        if self._moms is not None:
            part._moms = self._moms[start * g : stop * g]
        return part

    def table(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The LRs and momentums as 2-D views of float64 (a row a step) over these arrays. For a
        copy (``copy_range``) only: while a view exists its array cannot grow (a run's log must)."""
        lrs = np.frombuffer(self._lrs, dtype=np.float64).reshape(len(self), self.n_groups)
        if self._moms is None:
            return lrs, None
        return lrs, np.frombuffer(self._moms, dtype=np.float64).reshape(len(self), self.n_groups)

    def empty(self) -> ValueLog:
        """A new log with no step, of these groups and momentum."""
        return ValueLog(self.n_groups, momentum=self._moms is not None)

    def joined(self, later: ValueLog) -> ValueLog:
        """A new log: these steps, then ``later``'s (the same groups and momentum); neither changes."""
        if later._shape != self._shape:
            raise ValueError(f"expected {self._shape} (LRs, momentums) per step, got {later._shape}")
        both = self.empty()
        both._lrs = self._lrs + later._lrs
        if self._moms is not None and later._moms is not None:
            both._moms = self._moms + later._moms
        return both

    def packed_lrs(self, start: int, stop: int) -> array[float]:
        """The LRs of steps ``start .. stop - 1``, packed as they are held (step-major)."""
        return self._lrs[start * self.n_groups : stop * self.n_groups]

    def packed_rows(self, indices: Iterable[int]) -> array[float]:
        """The LRs of the steps at ``indices`` (each within ``0 .. len - 1``), one after the
        other, packed as they are held: no float object is made (a history of 485 steps of
        1,024 groups is one copy of 4 MB, not half a million floats)."""
        g, lrs, out = self.n_groups, self._lrs, array("d")
        if g == 1:
            out.extend(lrs[i] for i in indices)  # doubles copied as such (array.extend of a generator)
            return out
        for i in indices:
            out.extend(lrs[i * g : (i + 1) * g])
        return out

    def _steps(self, start: int, stop: int) -> list[Values]:
        """Steps ``start .. stop - 1`` as ``Values``, built at C speed (the hot path reads windows)."""
        g, packed = self.n_groups, self._moms
        lrs = step_tuples(self._lrs[start * g : stop * g], g)
        moms = repeat(None, stop - start) if packed is None else step_tuples(packed[start * g : stop * g], g)
        return list(zip(lrs, moms, strict=False))  # equal lengths


def step_tuples(flat: array[float], size: int) -> Iterator[tuple[float, ...]]:
    """``flat``'s floats in consecutive tuples of ``size``."""
    return zip(*[iter(flat)] * size, strict=False)  # len(flat) is a multiple of size
