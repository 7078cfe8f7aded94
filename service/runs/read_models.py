"""Read models of a run: its history (curves and events), the LR range test's curve, the
spike guard's bands. Each reads as of the stored horizon (another process may have gone
further than this one) and commits nothing new."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

from lrserve.service.engine import cost
from lrserve.service.engine.range_test import RangeTestReport
from lrserve.service.engine.spec import guard_of
from lrserve.service.engine.spike_guard import Band, BandReplay, GuardSettings, Report, Spike
from lrserve.service.errors import RunConflict, ServerStopping
from lrserve.service.lru import Lru
from lrserve.service.runs.cache import RunCache, RunLock, still_the_run
from lrserve.service.runs.commit import Committer
from lrserve.service.runs.state import RunState
from lrserve.service.runs.value_log import step_tuples
from lrserve.service.scheduling import lower_priority
from lrserve.service.settings import Settings
from lrserve.service.store.base import BaseStore, HistoryMark, MetricEnds, MetricRow
from lrserve.service.store.events import Event, EventKind

log = logging.getLogger("lrserve")


@dataclass(frozen=True)
class LRFinder:
    """A range test as ``GET .../lr-finder`` shows it: what it found, and where the run switched."""

    test: RangeTestReport
    switched_at: int | None


@dataclass(frozen=True)
class SpikeGuardView:
    """A spike guard at the stored horizon: settings, spikes, backoff, each rank's band."""

    run_id: str
    settings: GuardSettings
    horizon: int
    multiplier: float  # the backoff at the horizon (1.0: none)
    spikes: list[Spike]
    bands: dict[int, Band]  # by rank, downsampled
    bands_through: int | None  # the horizon the bands are judged up to; None: replayed in the background


@dataclass(frozen=True)
class History:
    """A run's curves (downsampled) up to the stored horizon and its latest events, as of
    ``mark`` (read before anything else: the history is at least that new)."""

    run_id: str
    steps: Sequence[int]
    packed_lrs: array[float]  # the LRs of each of ``steps``, ``n_groups`` a step, one after the other
    n_groups: int
    metrics: dict[str, Sequence[MetricRow]]  # per name, by step, then rank
    events: list[Event]  # the latest events but the metric ones, at most ``max_points``
    events_total: int  # how many events but the metric ones the run has (up to the last shown)
    mark: HistoryMark

    @property
    def lrs(self) -> list[tuple[float, ...]]:
        """The LRs of each of ``steps``, a tuple a step."""
        return list(step_tuples(self.packed_lrs, self.n_groups))


SHOWN = tuple(kind for kind in EventKind if kind is not EventKind.METRIC)
"""The kinds of events a history shows (a metric event is an input: its values show in ``metrics``)."""

KEPT_EVENTS = 200_000
"""Most events ``RunEvents`` keeps per server process, over all runs (least recently read out first)."""


@dataclass(frozen=True)
class ShownEvents:
    """The events a history shows: the run's latest, at most its ``max_points``, and how many
    it has (``total``, up to the same ``seq``)."""

    total: int
    latest: tuple[Event, ...]


@dataclass(frozen=True)
class _Kept:
    created_at: datetime
    last_seq: int  # every event up to here has been counted (or left out by its kind)
    total: int  # how many of them a history shows (all but the metric ones)
    latest: tuple[Event, ...]  # the latest of those, in order (as many as the last history showed)
    sizes: tuple[int, ...]  # the bytes of each one's payload (its JSON), as stored


@dataclass(frozen=True)
class EventsToShow:
    """What a history's events will be (``RunEvents.count``), none read yet: how many the run
    has, which of the latest are kept and which are to be read, and what they weigh."""

    run_id: str
    total: int  # how many events but the metric ones, up to ``through_seq``
    kept: _Kept  # what this process had read before
    from_kept: int  # how many of the latest of ``kept`` are shown
    read_after: int  # the latest events after this seq, up to ``through_seq``, are read: those
    to_read: list[tuple[int, int]]  # (seq, payload bytes) of each (none: nothing read)
    through_seq: int

    @property
    def shown(self) -> int:
        return self.from_kept + len(self.to_read)

    @property
    def payload_bytes(self) -> int:
        """The bytes of the payloads shown, the kept ones' and those to read."""
        kept = self.kept.sizes
        return sum(kept[len(kept) - self.from_kept :]) + sum(size for _, size in self.to_read)


class RunEvents:
    """The events a history shows, per run: its latest ones, at most as many as the history
    asks, each read from the store once. Events are only appended (``seq`` counts from 1 per
    run, without gaps, and a run's appends take turns), so a history counts, then weighs, then
    reads only those after the last its run's count went to (``count_events_of``,
    ``payload_sizes_of``, ``read_events_of(after_seq, through_seq, latest)``), never decodes a
    metric event and decodes at most as many others as it shows: a run's 20,000 operator
    actions were 2.6 MB in every history. A run deleted and created again has another
    ``created_at`` and is counted from its start.

    Bounded by ``most`` events over all runs; safe from worker threads."""

    def __init__(self, store: BaseStore, most: int = KEPT_EVENTS) -> None:
        self.store = store
        self._kept: Lru[str, _Kept] = Lru(most, lambda _, kept: len(kept.latest))

    def count(self, run_id: str, mark: HistoryMark, max_points: int) -> EventsToShow:
        """The run's latest ``max_points`` events but the metric ones, at least up to the
        ``mark``'s ``last_seq`` (read first: the run's row moves its ``last_seq`` in the
        transaction that writes the events up to it, so every one of them is there to read),
        counted and weighed, none read: the database counts those after the ones this process
        counted before, and gives the payloads' bytes of those it is to read. The kept ones
        are shown where they are enough with the new ones, else the latest are read anew."""
        kept = self._kept.get(run_id)
        if kept is None or kept.created_at != mark.created_at:
            kept = _Kept(mark.created_at, 0, 0, (), ())
        through = max(kept.last_seq, mark.last_seq)
        new = 0
        if kept.last_seq < mark.last_seq:
            new = self.store.count_events_of(run_id, SHOWN, after_seq=kept.last_seq, through_seq=through)
        total = kept.total + new
        shown = min(total, max_points)
        if shown <= new:  # the latest are all new
            after, from_kept = kept.last_seq, 0
        elif len(kept.latest) + new >= shown:  # the latest kept ones, then every new one
            after, from_kept = kept.last_seq, shown - new
        else:  # kept for a history that showed fewer: the latest read anew
            after, from_kept = 0, 0
        to_read = []
        if shown > from_kept:
            to_read = self.store.payload_sizes_of(run_id, SHOWN, after_seq=after, through_seq=through,
                                                  latest=shown - from_kept)
        return EventsToShow(run_id, total, kept, from_kept, after, to_read, through)

    def read(self, to_show: EventsToShow) -> ShownEvents:
        """The events ``to_show`` counted, in order, read where they are not kept.

        Raises:
            RunConflict: the run was deleted and created again since it was counted: the
                events read may be the new run's (its seqs count from 1 again), so none is
                kept; the next history counts anew.
            RunNotFound: the run was deleted since.
        """
        kept, first = to_show.kept, len(to_show.kept.latest) - to_show.from_kept
        latest, sizes = kept.latest[first:], kept.sizes[first:]
        if to_show.to_read:
            read = self.store.read_events_of(to_show.run_id, SHOWN, after_seq=to_show.read_after,
                                             through_seq=to_show.through_seq, latest=len(to_show.to_read))
            if (not still_the_run(self.store, to_show.run_id, kept.created_at)
                    or [e.seq for e in read] != [seq for seq, _ in to_show.to_read]):
                raise RunConflict(f"run {to_show.run_id!r} was deleted and created again while its "
                                  "history was read: ask again")
            latest, sizes = latest + tuple(read), sizes + tuple(size for _, size in to_show.to_read)
        now = _Kept(kept.created_at, to_show.through_seq, to_show.total, latest, sizes)
        self._kept.put(to_show.run_id, now, keep_old=lambda old: (  # another thread read further
            old.created_at == now.created_at and old.last_seq > now.last_seq))
        return ShownEvents(to_show.total, latest)


KEPT_BAND_POINTS = 200_000
"""Most band points (a rank's report as the detector met it) ``RunBands`` keeps per server
process, over all runs (least recently shown out first; ~130 bytes a point); a run's bands are
thinned to a quarter of it (``BandReplay``), so that about four long runs fit together."""

READ_PIECE = 250
"""Metric events a band replay reads and decodes at a time (a long run's whole log, read at
once, was held decoded in memory at once), giving way after each (see ``_judge``)."""

JUDGED_PIECE = 64
"""Reports a band replay judges between two times it gives way (~1 ms)."""


def shared_points(ranks: int, budget: int) -> int:
    """The most points of each of ``ranks`` bands a view shows within ``budget`` (at least 2:
    a rank's first and last report; so a job of more than ``budget // 8`` ranks shows more)."""
    return max(2, budget // (cost.BAND_POINT * max(1, ranks)))


@dataclass
class _Replayed:
    created_at: datetime
    replay: BandReplay
    last_seq: int  # every metric event up to here has been read
    horizon: int  # the reports applied up to here are judged
    ahead: list[tuple[int, int, Report]]  # (step applied at, seq, report) of the rest, as placed

    @property
    def points(self) -> int:
        """What it holds: the band points and the reports still ahead."""
        return self.replay.points + len(self.ahead)


@dataclass(frozen=True)
class ShownBands:
    """Each rank's band (downsampled) and the horizon its reports are judged up to: None while
    the run's reports are replayed in the background (``RunBands``: ask again)."""

    bands: dict[int, Band]
    through: int | None


class _Stopped(Exception):
    """A background replay given up: the server is stopping, or the run was deleted."""


class RunBands:
    """Each spike guard's bands (``GET .../spike-guard``), replayed on from where the last view
    stopped: a view reads only the metric events after the last it read
    (``read_events_of(after_seq)``) and judges the reports applied up to the horizon.

    Exact, not an estimate: reports are judged by the step they apply at, then as placed, and
    a report is placed at a step above the horizon, so every report applied at or below a
    horizon was written before that horizon was, at or before the run's ``last_seq`` read with
    it; those read later apply above the last one judged (the rest wait, ``ahead``). A run
    deleted and created again, or guarded by other settings, is replayed from its start.

    **Budgeted.** A view first weighs the metric events it is to read (``weigh_events_of``, at
    most one more than the budget could pay for, none decoded) and prices them
    (``cost.bands_cost``). Within the budget it reads and judges them itself (other views of
    the run wait for it). Over it (the first view in a process of a long run, or one long
    unviewed), the replay is handed to ``replays`` (one low-priority thread: one run's at a
    time) and the view answers at once without bands (``ShownBands.through`` None); views of
    the run meanwhile do the same, holding nothing; the finished replay is kept for the next
    (a run's bands are thinned to fit, below). A replay that failed is the next view's
    error (then the view after starts again); one under way stops at its next piece when the
    run is deleted here or the server stops (``close``). The points shown are priced too
    (``cost.BAND_POINT`` each): each rank shows ``max_points``, or fewer where that many of
    every rank's would cost more than the budget (``shared_points``).

    Bounded by ``most`` points (band points and reports ahead) over all runs, least recently
    shown out first, each run's bands thinned to a quarter of it (``BandReplay``: a view shows
    at most what is kept, ~50,000 points over the run's ranks; a job of more than ~16,000 ranks
    keeps 3 a rank: it may not fit, and is then replayed at each view); safe from worker
    threads (one view or replay of a run at a time)."""

    def __init__(self, store: BaseStore, budget: int, replays: Executor, most: int = KEPT_BAND_POINTS
                 ) -> None:
        self.store = store
        self.budget = budget
        self.most = most
        self._replays = replays
        self._kept: Lru[str, _Replayed] = Lru(most, lambda _, kept: kept.points)
        self._lock = threading.Lock()  # the maps below, and ``_viewing``
        self._viewing: weakref.WeakValueDictionary[str, RunLock] = weakref.WeakValueDictionary()
        self._replaying: set[str] = set()  # runs whose replay is in ``replays``
        self._deleted: set[str] = set()  # ... and deleted here since: it stops
        self._failed: dict[str, BaseException] = {}  # failed replays: the next view's error
        self._stopping = threading.Event()

    def shown(self, run_id: str, created_at: datetime, settings: GuardSettings, horizon: int, last_seq: int,
              max_points: int) -> ShownBands:
        """Each rank's band, the reports applied up to ``horizon`` (the run's stored horizon,
        read first, with its ``last_seq``), downsampled to ``max_points`` (or ``shared_points``);
        or none yet, while they are replayed in the background.

        Raises:
            StoreUnavailable: the database failed (nothing kept is lost), here or in the run's
                background replay (the view after this one starts it again).
            ServerStopping: a replay was due and the server is stopping.
        """
        with self._lock:
            if run_id in self._replaying:
                return ShownBands({}, None)
            viewing = self._viewing.setdefault(run_id, RunLock())
        with viewing:
            with self._lock:  # handed to the background while this view waited
                if run_id in self._replaying:
                    return ShownBands({}, None)
                failed = self._failed.pop(run_id, None)
            if failed is not None:
                raise failed
            kept = self._kept.get(run_id)
            if kept is None or (kept.created_at, kept.replay.settings) != (created_at, settings) \
                    or kept.horizon > horizon:
                kept = _Replayed(created_at, BandReplay(settings, self.most // 4), 0, -1, [])
            to_read = self._weighed(run_id, kept, last_seq)  # raises before anything kept changed
            self._kept.pop(run_id)  # changed from here on: weighed again when kept
            if to_read is None:
                with self._lock:
                    self._replaying.add(run_id)
                    self._deleted.discard(run_id)
                self._hand_over(run_id, kept, horizon, last_seq)
                return ShownBands({}, None)
            if to_read:
                try:  # in one piece: at most what the budget pays for
                    self._read(run_id, kept, last_seq, piece=to_read + 1)
                except Exception:
                    self._kept.put(run_id, kept)  # what was read is judged by the next view
                    raise
            self._judge(kept, horizon)
            self._kept.put(run_id, kept)
            bands = kept.replay.bands
            each = min(max_points, shared_points(len(bands), self.budget))
            shown = {rank: band.picked(downsample(range(len(band.steps)), each))
                     for rank, band in sorted(bands.items())}
        return ShownBands(shown, horizon)

    def _weighed(self, run_id: str, kept: _Replayed, last_seq: int) -> int | None:
        """How many metric events after ``kept``'s up to ``last_seq`` there are to read, or None
        when reading and judging them costs more than the budget (weighed in the database, at
        most one more than the budget pays for)."""
        most = self.budget // cost.BAND_EVENT
        count, size = self.store.weigh_events_of(run_id, [EventKind.METRIC], after_seq=kept.last_seq,
                                                 through_seq=last_seq, first=most + 1)
        return None if cost.bands_cost(events=count, event_bytes=size) > self.budget else count

    def _hand_over(self, run_id: str, kept: _Replayed, horizon: int, last_seq: int) -> None:
        try:
            self._replays.submit(self._replay_later, run_id, kept, horizon, last_seq)
        except RuntimeError as error:  # shut down: the server is stopping
            with self._lock:
                self._replaying.discard(run_id)
            raise ServerStopping("the server is stopping; retry (another replica, or once it is up)"
                                 ) from error

    def _read(self, run_id: str, kept: _Replayed, last_seq: int, stop: Callable[[], bool] | None = None,
              marks: Sequence[tuple[int, int]] = (), piece: int | None = None) -> None:
        """Read the metric events after ``kept``'s up to ``last_seq``, ``piece`` (by default
        ``READ_PIECE``) at a time: their reports wait in ``kept.ahead`` to be judged. ``stop``:
        asked between pieces.
        ``marks``: the run's snapshots' ``(step, seq)`` by step (``snapshot_marks``): once the
        events up to a mark's seq are read, every report applied up to its step is, and those
        are judged then (so ``ahead`` holds the reports of a snapshot's steps, not the run's)."""
        monitor, marks, piece = kept.replay.settings.monitor, list(marks), piece or READ_PIECE
        while True:
            if stop is not None and stop():
                raise _Stopped
            new = self.store.read_events_of(run_id, [EventKind.METRIC], after_seq=kept.last_seq,
                                            through_seq=last_seq, first=piece)
            for event in new:
                kept.last_seq = event.seq
                at, reports = event.step, event.payload.get("reports", ())
                if at is not None:
                    kept.ahead.extend((at, event.seq, Report.from_payload(r))
                                      for r in reports if r.get("name") == monitor)
            while marks and marks[0][1] <= kept.last_seq:
                step = marks.pop(0)[0]
                if step > kept.horizon:
                    self._judge(kept, step, stop)
            if len(new) < piece:
                break
            time.sleep(0)  # gives way: see ``_judge``

    @staticmethod
    def _judge(kept: _Replayed, horizon: int, stop: Callable[[], bool] | None = None) -> None:
        """Judge the reports read that apply up to ``horizon``, in the engine's order. ``stop``:
        asked between pieces (then ``kept`` is half judged: dropped)."""
        ready = [a for a in kept.ahead if a[0] <= horizon]
        kept.ahead = [a for a in kept.ahead if a[0] > horizon]
        for i, (at, _, report) in enumerate(sorted(ready, key=itemgetter(0, 1)), 1):  # stable: as placed
            kept.replay.judge(at, report)
            if i % JUDGED_PIECE == 0:
                # gives way (views and replays run in worker threads, never on the event loop): the
                # GIL released and taken back after a thread waiting for it, as ``sliced_json`` does
                time.sleep(0)
                if stop is not None and stop():
                    raise _Stopped
        kept.horizon = horizon

    def _replay_later(self, run_id: str, kept: _Replayed, horizon: int, last_seq: int) -> None:
        """The replay in the background thread, ``kept`` its own (views of the run answer
        without it until it is done); kept for the next."""

        def stop() -> bool:
            return self._stopping.is_set() or run_id in self._deleted

        try:
            marks = self.store.snapshot_marks(run_id, after_step=kept.horizon, through_step=horizon)
            self._read(run_id, kept, last_seq, stop, marks)
            self._judge(kept, horizon, stop)
            if stop():  # deleted while its last piece was read (it read none, or the new run's)
                raise _Stopped
        except _Stopped:
            pass
        except Exception as error:  # noqa: BLE001 - any failure: the run's next view raises it
            log.warning("replaying run %r's spike-guard bands failed (its next view says why): %s",
                        run_id, error)
            with self._lock:  # (the lock ``forget`` takes: not for a run deleted meanwhile)
                if run_id not in self._deleted:
                    self._failed[run_id] = error
        else:
            with self._lock:
                if run_id not in self._deleted:
                    self._kept.put(run_id, kept)
        finally:
            with self._lock:
                self._replaying.discard(run_id)
                self._deleted.discard(run_id)

    def forget(self, run_id: str) -> None:
        """The run was deleted: what was kept of it goes, and its replay under way stops."""
        with self._lock:  # the lock a replay keeps its bands under: none kept after this
            self._kept.pop(run_id)
            self._failed.pop(run_id, None)
            if run_id in self._replaying:
                self._deleted.add(run_id)

    def close(self) -> None:
        """The server stops: a replay under way stops at its next piece."""
        self._stopping.set()


class ReadModels:
    """The answers built from a run's log (``GET .../history``, ``lr-finder``, ``spike-guard``)."""

    def __init__(self, store: BaseStore, settings: Settings, runs: RunCache, committer: Committer) -> None:
        self.store = store
        self.settings = settings
        self.runs = runs
        self.committer = committer
        self.events = RunEvents(store)
        # long runs' band replays: one at a time, at the priority of the server's background work
        self._replays = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrserve-bands",
                                           initializer=lower_priority, initargs=(settings.background_nice,))
        self.bands = RunBands(store, settings.work_budget, self._replays)

    def close(self) -> None:
        """Stop a band replay under way (at its next piece) and wait for it; no more is taken."""
        self.bands.close()
        self._replays.shutdown(wait=True, cancel_futures=True)

    def lr_finder(self, run_id: str) -> LRFinder:
        """The range test's curve, suggestions and choice (API.md, LR range test).

        Raises:
            RunConflict: the run's schedule is not an LRRangeTest.
        """
        state = self.committer.caught_up(run_id)
        with state.lock:
            test = state.engine.range_test
            if test is None:
                raise RunConflict(f"run {run_id!r} has no LRRangeTest schedule")
            return LRFinder(test.report(), state.switched_at)

    def spike_guard(self, run_id: str, max_points: int) -> SpikeGuardView:
        """The guard's settings, spikes and backoff at the stored horizon, and each rank's
        band (baseline and spike line) as the detector met each report, downsampled.

        Raises:
            RunConflict: the run has no spike guard (now).
        """
        state = self.committer.caught_up(run_id)
        with state.lock:
            guard, horizon, created_at = state.engine.guard, state.horizon, state.created_at
            last_seq = state.last_seq
            spikes = state.spikes_between(0, horizon)
        if guard is not None:
            settings, multiplier = guard.settings, guard.multiplier
        else:  # not (yet) acting, e.g. the `then` of a range test still running
            spec = guard_of(state.spec.schedule, state.n_groups)
            if spec is None:
                raise RunConflict(f"run {run_id!r} has no SpikeGuard schedule")
            settings, multiplier = GuardSettings.from_spec(spec), 1.0
        assert created_at is not None, "a state caught up is loaded from the store"
        shown = self.bands.shown(run_id, created_at, settings, horizon, last_seq, max_points)
        return SpikeGuardView(run_id, settings, horizon, multiplier, spikes, shown.bands, shown.through)

    def history_mark(self, run_id: str) -> HistoryMark:
        """What the run's history is made of now (``HistoryMark``): equal marks, equal histories.

        Raises:
            RunNotFound: no such run (or deleted by any replica).
        """
        return self.store.history_mark(run_id)

    def history(self, run_id: str, max_points: int, mark: HistoryMark | None = None) -> History:
        """The run's curves up to the stored horizon and its latest ``max_points`` events, at
        least up to the mark's ``last_seq`` (an event written after the mark, with a step the
        curves already show, is in the next history: the answer is kept under this mark); 404
        if deleted by any replica. The events are counted first and priced with the LRs, before
        the metrics' rows are shared out of what the budget leaves (``_metrics``).

        ``mark``: the run's ``history_mark`` if the caller has just read it (else read here, first).
        """
        mark = self.store.history_mark(run_id) if mark is None else mark
        state = self.committer.caught_up(run_id)
        horizon, n_groups = state.horizon, state.n_groups
        what = f"a history of {max_points} points on {n_groups} param groups"
        units = cost.history_cost(n_groups=n_groups, points=min(max_points, horizon + 1))
        cost.check(what, "max_points", units, self.settings.work_budget)  # before any event is counted
        to_show = self.events.count(run_id, mark, max_points)
        what = f"{what} and {to_show.shown} events of {to_show.payload_bytes} bytes"
        units += cost.history_cost(n_groups=0, points=0, events=to_show.shown,
                                   event_bytes=to_show.payload_bytes)
        cost.check(what, "max_points", units, self.settings.work_budget)
        metrics = self._metrics(run_id, max_points, mark, units, what)  # priced in turn
        steps = downsample(range(horizon + 1), max_points)
        lrs = self._lrs_at(state, steps)
        events = self.events.read(to_show)
        return History(run_id, steps, lrs, n_groups, metrics, list(events.latest), events.total, mark)

    def _metrics(self, run_id: str, max_points: int, mark: HistoryMark, other_units: int,
                 what: str) -> dict[str, Sequence[MetricRow]]:
        """The run's metric series, each at most ``max_points`` rows (``picks``), read at a
        cost bounded by ``max_points`` and the number of series, never by their length. Each
        read is priced (``cost.history_cost``, on top of the ``other_units`` of the history's
        LRs and events) before it is made:

        - the names (a seek each), at most as many as the budget pays for, and one more;
        - each series' first ``max_points + 1`` rows and its last step's (read in order), at
          most twice the rows ``mark`` counted (read first: rows logged since are read
          unpriced, at most ``max_points + 1`` a series);
        - in each series longer than that, the rows shown, found by seeks: a seek for each
          step and one for each row. Where the budget left cannot pay for ``max_points`` of
          them in each, each shows as many as it can, the same for all.

        Raises:
            WorkBudgetExceeded: more series than the budget pays for, or not one row of each
                long one.
        """
        budget = self.settings.work_budget
        names = self.store.metric_names(run_id, max(0, budget - other_units) // cost.METRIC_SEEK + 1)
        read = 2 * len(names) * (max_points + 1)
        if mark.exact:
            read = min(read, 2 * mark.metric_rows)
        units = other_units + cost.history_cost(n_groups=0, points=0, series=len(names), read=read)
        cost.check(f"{what} and {len(names)} metric series", "max_points", units, budget)
        ends = self.store.metric_ends(run_id, names, max_points + 1)
        longer = [e for e in ends if e.last]
        each = min(max_points, (budget - units) // (2 * cost.METRIC_SEEK * len(longer))) if longer else 0
        where = {e.name: picks(e, max(each, 1)) for e in longer}
        sought = sum(len(steps) * (1 + len(ranks)) for steps, ranks in where.values())
        cost.check(f"{what} and {len(names)} metric series, {len(longer)} of them over {max_points} rows",
                   "max_points", units + cost.history_cost(n_groups=0, points=0, sought=sought), budget)
        return {e.name: self.store.metric_rows_at(run_id, e.name, *where[e.name]) if e.last else e.head
                for e in ends}

    def _lrs_at(self, state: RunState, steps: Sequence[int]) -> array[float]:
        """Final LRs of ``steps`` (at most the horizon, increasing), packed: from memory, else as
        stored with the snapshots (a read per step, however long the run), else (runs written
        before the values were stored) replayed."""
        first = state.first_step  # held from first_step to the horizon, and steps are at most the horizon
        older = [s for s in steps if s < first]
        held = state.values.packed_rows(s - first for s in steps[len(older):])
        if not older:
            return held
        found = self.store.read_lrs(state.run_id, older)
        missing = [s for s in older if s not in found]
        if missing:
            replayed = self.runs.values_between(state.run_id, missing[0], missing[-1])
            found.update({s: replayed[s - missing[0]][0] for s in missing})
        packed = array("d")
        for s in older:
            packed.extend(found[s])
        packed.extend(held)
        return packed


def picks(ends: MetricEnds, points: int) -> tuple[list[int], list[int]]:
    """Where a history shows, in at most ``points`` rows, a metric series longer than that
    (``ends``: its first ``points + 1`` rows or more, and its last step's): its rows at the
    first step the series has rows at at or after each of the steps returned, of each rank
    returned.

    The ranks are those at its last step, then those of its first rows, at most ``points``
    of them (the last step's highest first: one point is the series' last row). The steps,
    ``points // ranks`` of them, are spread evenly from the series' first step to its last.
    So a rank that logs at both keeps them however long the series is, and as many rows are
    read as shown (``BaseStore.metric_rows_at``).
    """
    last = sorted({rank for _, rank, _ in ends.last}, reverse=True)
    first = sorted({rank for _, rank, _ in ends.head} - set(last))
    ranks = sorted((last + first)[:points])
    steps = downsample(range(ends.head[0][0], ends.last[0][0] + 1), max(1, points // len(ranks)))
    return list(steps), ranks


def downsample(items: Sequence[Any], max_points: int) -> Sequence[Any]:
    """At most ``max_points`` items, evenly spaced, always keeping the first and the last."""
    n = len(items)
    if n <= max_points:
        return items
    if max_points == 1:
        return [items[-1]]
    chosen = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return [items[i] for i in chosen]
