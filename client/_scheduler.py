"""``RemoteScheduler``: a drop-in for a ``torch.optim.lr_scheduler`` object, served by lrserve.

How a step works (see DESIGN.md, "Flow of one step"): the scheduler holds a window of final
values (``client._cache``), so ``step()`` is an index into a list plus writing
``param_group["lr"]`` (``client._optimizer`` writes them otherwise). A worker thread
(``client._fetcher``) fetches the next window before this one runs out, when and as far as
``client._windows.PrefetchPolicy`` says. A step that carries a watched metric is the one
step that must talk to the server (``POST .../step``), since the metric decides that step's
values; windows end before such steps. The scheduler's ``ClientState`` says whether the
server answers, and whether it is closed.

When the server is away, training goes on with the values held, then on the provisional
tail the server sent ahead (``client._tail``: the values as if no decision or operator
action came, enough for ``outage_ride_s`` of training), while the worker retries with
backoff. A step whose report decides its values, or a step past the tail, waits for a
server, up to ``report_wait_s`` (ranks keep the same values: each rank's tail ends where its
own requests left it). Past that bound the last values are kept, and the schedule catches up
with the current step when the server is back. Each of these (riding the tail, waiting,
keeping the last values) warns once per outage (``ServerAwayWarning``).
"""

from __future__ import annotations

import enum
import functools
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
from lrserve.client._buffer import DEFAULT_FLUSH_INTERVAL_S, DEFAULT_MAX_BUFFERED
from lrserve.client._cache import NEVER, WindowCache
from lrserve.client._client import DEFAULT_MAX_RETRIES, LRClient
from lrserve.client._env import labels_from_env, mode_from_env, run_id_from_env
from lrserve.client._exceptions import (
    CadenceWarning,
    ClientClosed,
    LRServiceError,
    MetricsDroppedWarning,
    RunConflict,
    ServerAwayWarning,
    TransportError,
    warn,
)
from lrserve.client._fetcher import (
    HANDLED,
    NOT_READY,
    EndOfSchedule,
    TailFetcher,
    WindowFetcher,
    is_outage,
    tail_chunk,
)
from lrserve.client._metrics import MetricLog, to_float
from lrserve.client._optimizer import (
    OptimizerWriter,
    check_not_composed,
    check_optimizer,
    register_driver,
    release_driver,
    unhook,
)
from lrserve.client._run_events import RunEvents
from lrserve.client._tail import DEFAULT_RIDE_S, TAIL_WINDOWS, ProvisionalTail
from lrserve.client._windows import (
    DEFAULT_MONITOR,
    DEFAULT_TIME_BUDGET_S,
    Cadence,
    PrefetchPolicy,
    guard_monitor,
)

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT_S",
    "DEFAULT_REPORT_WAIT_S",
    "REPORT_TIMEOUT",
    "ClientState",
    "RemoteScheduler",
]

#: How long ``close()`` keeps trying to send buffered metrics.
DEFAULT_CLOSE_TIMEOUT_S = 10.0
#: How long a step whose report decides its values waits for a server that is away.
DEFAULT_REPORT_WAIT_S = 60.0
#: How long a scheduler collected without ``close()`` tries to send its buffered metrics.
DROPPED_FLUSH_S = 1.0
#: How long its connections wait for a request its worker threads have in flight.
DROPPED_JOIN_S = 30.0
#: Timeout of a report with ``world_size > 1``: the server's metric barrier may hold it.
REPORT_TIMEOUT = httpx.Timeout(60.0, connect=3.0)
ENV_RANK = "RANK"
ENV_WORLD_SIZE = "WORLD_SIZE"


class ClientState(enum.Enum):
    """Where a ``RemoteScheduler`` stands with its server (as httpx's ``ClientState``)."""

    #: The server answers (or has not failed a request the job needed yet).
    ACTIVE = "active"
    #: It does not: steps take the values held, then the provisional tail, while the
    #: worker retries; a step whose report decides its values, or past the tail, waits
    #: (``report_wait_s``).
    AWAY = "away"
    #: ``close()`` was called: nothing more is sent.
    CLOSED = "closed"


class RemoteScheduler:
    """A learning-rate scheduler whose values come from an lrserve server.

    Replace ``torch.optim.lr_scheduler.X(optimizer, **kwargs)`` with
    ``RemoteScheduler(optimizer, {"type": "X", **kwargs}, run_id=...)``: the values written
    into ``optimizer.param_groups`` at every step are the ones torch's ``X`` would write, and
    operators can steer the run from outside. Creating it creates the run (or joins it:
    every rank of a job may) and writes the values of step 0.

    Args:
        optimizer: Anything with ``param_groups`` (a torch optimizer). Base LRs are each
            group's ``initial_lr``, else ``lr``; base momentums are ``momentum`` or
            ``betas[0]`` where every group has one.
        schedule: The schedule spec, ``{"type": "<torch class>", <its arguments>}``.
        run_id: The run's id; default ``$LRSERVE_RUN_ID``, else the server makes one.
            Resumable and distributed jobs should name it.
        url: The server; default ``$LRSERVE_URL``, else ``http://127.0.0.1:8000``.
        token: Bearer token; default ``$LRSERVE_TOKEN``.
        steps_per_epoch: Scheduler steps per epoch, the one carrying the watched metric
            included. Tells when this job reports the metric a plateau schedule watches;
            when omitted it is learned from the first report.
        rank: This process's rank (default ``$RANK``, else 0).
        world_size: Ranks that report metrics (default ``$WORLD_SIZE``, else 1).
        labels: ``{"key": "value"}`` labels for the run; default ``$LRSERVE_LABELS``
            (``key=value,key2=value2``).
        strict: Raise instead of holding the last LR (or waiting) when the server is away.
        http_client: An ``httpx.Client`` to talk through (test seam; not closed by ``close()``).
        client: An ``LRClient`` to talk through instead of the one built from ``url``,
            ``token``, ``timeout``, ``max_retries``, ``http_client`` and ``sleep`` (which must
            then be left out). Shared, so not closed by ``close()``.
        time_budget_s: Seconds of training one window of final values should cover (how
            late an operator action may land).
        outage_ride_s: Seconds of training the provisional tail should cover: an outage
            that short changes no value the job takes (unless an input lands meanwhile).
        report_wait_s: How long a step that carries a watched metric waits for a server
            that is away (one ``ServerAwayWarning``), so the decision lands on the same step
            as without the outage. Past it the step goes on with the values held (the tail's
            or the last ones) and the report is delivered when the server is back: its
            decision then lands on the first free step, and the server records a
            ``provisional_divergence`` for the steps taken meanwhile. A step past the
            provisional tail waits as long, once per outage (every rank then keeps the
            schedule's values); past it the last values are kept. 0: never wait.
        timeout: Per-request timeout in seconds.
        max_retries: Retries of a request the training loop waits for.
        max_buffered_metrics: Most logged metric records held unsent (oldest dropped beyond).
        flush_interval_s: Longest a logged metric waits before it is sent.
        clock: Monotonic clock for measuring the time per step (test seam).
        sleep: Sleep used between retries the loop waits for (test seam).
        rand: Random numbers in ``[0, 1)`` for backoff jitter (test seam).
        on_schedule_switch: Called once, with this scheduler, when the job reaches the step
            where an ``LRRangeTest`` ended and the run switched to its ``then`` schedule,
            before that step's values are written: restore the weights (and optimizer
            state) saved before the test here, as Lightning's ``lr_find`` does.
        overlap_decisions: Let ``step(metric)`` return before the server's decision comes,
            so its round trip (and a metric barrier's wait for the other ranks) overlaps
            the next batch. The decided values are written when the job next needs them,
            at the latest just before the next ``optimizer.step()`` (a hook on the
            optimizer): the optimizer applies exactly the values it would have.
            ``get_last_lr()``, ``state_dict()``, ``should_stop``, the next ``step()`` and
            ``optimizer.state_dict()`` wait for them; code that reads ``param_groups``
            directly in between sees the previous step's values, which is why it is off by
            default (torch's timing). Ignored with ``strict=True``, for range tests (the
            switch restores weights before the next batch) and for optimizers whose
            ``step`` torch does not hook.
        on_spike: Called once per spike on every rank, with the ``loss_spike`` event
            (``step``, ``rank``, ``value``, ``baseline``, ``applied_at``,
            ``last_good_step``), when the job reaches the step the spike guard's backoff
            applies at (``applied_at``, the same on every rank), before that step's values
            are written: restore a checkpoint taken at or before ``last_good_step`` here
            (weights and optimizer state) and every rank rolls back alike. The monitored
            metric reaches the guard through ``log()`` (or ``step()``), without waiting.
        reports_after_step: The job calls ``report()`` after the ``step()`` that ends an
            epoch, as frameworks do (they step the scheduler, then evaluate): such steps
            keep their values open until the report (or the next ``optimizer.step()``), so
            it decides the values of the next batch. Meanwhile ``param_groups`` and
            ``get_last_lr()`` hold the previous step's values. The callbacks in
            ``client.integrations`` set it. Needs a torch optimizer and ``strict=False``.

    With ``LRSERVE_MODE=disabled`` in the environment, the object made is a
    ``LocalScheduler``: torch's own scheduler of the same spec, no server (docs/fleet.md).

    Raises:
        InvalidSchedule: The spec is invalid (``errors`` names the field).
        RunConflict: ``run_id`` exists with a different spec.
        AuthenticationError: The token is missing or unknown.
        PermissionDenied: The token may not create runs.
        TransportError: The server cannot be reached (values of step 0 are needed now).

    Example:
        >>> sched = RemoteScheduler(opt, {"type": "StepLR", "step_size": 2, "gamma": 0.1},
        ...                         run_id="demo")  # doctest: +SKIP
        >>> for _ in range(4):  # doctest: +SKIP
        ...     print(sched.get_last_lr()); opt.step(); sched.step()
        [0.1]
        [0.1]
        [0.010000000000000002]
        [0.010000000000000002]
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> RemoteScheduler:
        if mode_from_env() == "disabled":  # no server: torch's own scheduler (client/_disabled.py)
            from lrserve.client._disabled import LocalScheduler

            # torch's own scheduler stands in (same calls): not a RemoteScheduler, by design
            return LocalScheduler(*args, **kwargs)  # type: ignore[return-value]
        # Frameworks check isinstance(scheduler, torch's LRScheduler) (Lightning refuses
        # other schedulers). When the job has torch loaded, be one, without importing it here.
        if cls is RemoteScheduler and "torch" in sys.modules:
            cls = _torch_flavour()
        return super().__new__(cls)

    def __init__(
        self,
        optimizer: Any,
        schedule: Mapping[str, Any],
        run_id: str | None = None,
        url: str | None = None,
        token: str | None = None,
        steps_per_epoch: int | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        labels: Mapping[str, str] | None = None,
        strict: bool = False,
        http_client: httpx.Client | None = None,
        client: LRClient | None = None,
        time_budget_s: float = DEFAULT_TIME_BUDGET_S,
        outage_ride_s: float = DEFAULT_RIDE_S,
        report_wait_s: float = DEFAULT_REPORT_WAIT_S,
        timeout: float | None = None,
        max_retries: int | None = None,
        max_buffered_metrics: int = DEFAULT_MAX_BUFFERED,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] | None = None,
        rand: Callable[[], float] = random.random,
        on_schedule_switch: Callable[[RemoteScheduler], None] | None = None,
        overlap_decisions: bool = False,
        reports_after_step: bool = False,
        on_spike: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._writer = writer = OptimizerWriter(optimizer)
        if not isinstance(schedule, Mapping) or "type" not in schedule:
            raise TypeError('schedule must be a spec like {"type": "StepLR", "step_size": 30}')
        if not report_wait_s >= 0:
            raise ValueError(f"report_wait_s must be >= 0, got {report_wait_s!r}")
        check_optimizer(optimizer, schedule)
        self._owns_client = client is None
        self._client = client = _client_for(
            client, url=url, token=token, timeout=timeout, max_retries=max_retries,
            http_client=http_client, sleep=sleep, rand=rand,
        )
        self.optimizer = optimizer
        self.schedule = dict(schedule)
        self.rank = int(os.environ.get(ENV_RANK, 0)) if rank is None else int(rank)
        self.world_size = int(os.environ.get(ENV_WORLD_SIZE, 1)) if world_size is None else int(world_size)
        self.steps_per_epoch = steps_per_epoch
        self.strict = strict
        self.reports_after_step = reports_after_step
        self.last_epoch = 0
        self.base_lrs = writer.base_lrs()
        self._last_lr: list[float] = []
        self._report_wait_s = float(report_wait_s)
        self._report_timeout = REPORT_TIMEOUT if self.world_size > 1 else None
        self._clock = clock
        self._on_switch = on_schedule_switch
        self._on_spike = on_spike
        self._guard_monitor = guard_monitor(self.schedule)
        is_range_test = self.schedule["type"] == "LRRangeTest"
        # A range test takes the loss of every step; steps_per_epoch is for what follows it.
        self._policy = PrefetchPolicy(time_budget_s, 1 if is_range_test else steps_per_epoch)
        self._cache = WindowCache()
        self._tail = ProvisionalTail(outage_ride_s)
        self._tail_fields = functools.partial(self._tail.settle_fields, rank=self.rank)
        self._prefetch_at: float = NEVER  # the step at which the next window is fetched
        self._state = ClientState.ACTIVE
        self._run_status = "active"  # the run's, as the server last said (shown: _publish)
        self._heard_status = "active"  # the same, as the latest answer taken in says
        self._watched: frozenset[str] = frozenset()  # _policy.watched, shown (_publish)
        self._events = RunEvents()  # a stop, a range test's switch, spikes: due at a step
        self._warned: set[str] = set()
        self._waited_out = False  # this outage's wait for values timed out: hold, do not wait again
        self._deciding: int | None = None  # the step whose decision step(metric) left on its way
        self._superseded = False  # another scheduler was built on the optimizer since (torch composes)
        self._job_watched = False  # whether the spec this job built the run with watched a metric
        self._open: int | None = None  # a step whose values wait for report() (or the optimizer)
        self._due = _Due()  # armed while _open or _deciding is set: the optimizer hook looks then
        self._reported: dict[str, float] = {}  # report()ed metrics for the next step()
        # The optimizer hook lets a report come after step() (report()) and, with
        # overlap_decisions, a decision travel during the next batch; hooked once the
        # run watches a metric (an operator may replace its schedule by one that does).
        self._hookable = not strict and not is_range_test
        self._hooked = False
        self._want_overlap = overlap_decisions
        self._overlap = False  # whether step(metric) returns before its decision (once hooked)
        run_id = run_id if run_id is not None else run_id_from_env()
        labels = labels if labels is not None else labels_from_env()
        self._named_run = run_id is not None
        self._link = _Link()
        self._metrics = MetricLog(
            functools.partial(_send_metrics, client, self._link),
            rank=self.rank,
            urgent=self._guard_monitor,
            max_records=max_buffered_metrics,
            flush_interval_s=flush_interval_s,
            rand=rand,
        )
        self._refresh()
        # The worker threads hold the scheduler weakly: a job that drops it without close()
        # (torch users never call it) frees it with its optimizer, and the finalizer stops them.
        self._fetcher = WindowFetcher(
            client,
            run_id=self._link.get_run_id,
            current_step=_weakly(weakref.ref(self), "_current_step"),
            limit_ahead=self._policy.limit_ahead,
            tail_fields=self._tail_fields,
            rank=self.rank,
            report_timeout=self._report_timeout,
            clock=clock,
            rand=rand,
            plan=_weakly(weakref.ref(self), "_plan_decision"),
            accept=_weakly(weakref.ref(self), "_accept_handed"),
        )
        self._tails = TailFetcher(client, run_id=self._link.get_run_id)
        self._finalizer = weakref.finalize(
            self, _release, self._fetcher, self._tails, self._metrics, client if self._owns_client else None,
            writer.hooks,
        )
        try:
            self._create(run_id, labels)
        except BaseException:
            self._finalizer()
            raise
        register_driver(optimizer, self)

    def __getattr__(self, name: str) -> Any:
        """The schedule's arguments as attributes, as torch's classes expose theirs
        (``sched.T_max``, ``sched.gamma``); the spec the server filled in when it has one."""
        if not name.startswith("_"):
            for spec in (self.__dict__.get("_spec_filled"), self.__dict__.get("schedule")):
                if spec is not None and name in spec and name != "type":
                    return spec[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def run_id(self) -> str:
        """The run's id (the server's, when none was given; a loaded checkpoint's)."""
        return self._link.run_id

    @run_id.setter
    def run_id(self, value: str) -> None:
        self._link.run_id = value

    @property
    def state(self) -> ClientState:
        """Whether the server answers (``ACTIVE``), is away (``AWAY``), or ``close()`` was called."""
        return self._state

    def _current_step(self) -> int:
        return self.last_epoch

    def _create(self, run_id: str | None, labels: Mapping[str, str] | None) -> None:
        run = self._client.create_run(
            self.schedule,
            self.base_lrs,
            base_momentums=self._writer.base_momentums(),
            run_id=run_id,
            labels=labels,
            world_size=self.world_size,
        )
        self.run_id = str(run["run_id"])
        if isinstance(run.get("schedule"), Mapping):
            self._spec_filled = dict(run["schedule"])  # every argument, defaults filled in
        self._heard_status = str(run.get("status") or "active")
        self._note_server(run)
        self._publish()
        self._job_watched = bool(self._policy.watched)
        self._events.note_stop(run, self.last_epoch)
        if int(run.get("horizon", 0)) == 0 and run.get("lrs") is not None:
            moms = run.get("momentums")
            self._merge(0, [run["lrs"]], None if moms is None else [moms])
        else:
            self._accept(self._client.read_lr(self.run_id, 0))
        self._apply(0)
        self._maybe_prefetch(0)

    # -- the torch surface --------------------------------------------------------------

    def step(self, metrics: float | Mapping[str, float] | None = None, epoch: None = None) -> None:
        """Advance one step and write its values into the optimizer's param groups.

        Args:
            metrics: The watched metric of this step (as torch's ``ReduceLROnPlateau.step``
                takes it), or ``{"name": value}``. Watched metrics decide this step's
                values (one request); others are logged for history like ``log()``.
                A bare number when the schedule watches no metric is torch's deprecated
                ``step(epoch)``: refused (``TypeError``), unless the job built the run
                watching one (an operator replaced its schedule since): then a float is
                logged as ``val_loss``.
            epoch: Not supported (torch deprecated it); must be ``None``.

        Raises:
            ClientClosed: After ``close()``.
            TypeError: ``epoch``, or a number torch would read as one (above).
            ValueError: Another scheduler was built on the optimizer since (torch would
                compose the two), or ``optimizer.add_param_group()`` was called.
            TransportError: ``strict=True`` and the server is away when values are needed.
            ScheduleError: The schedule cannot go on (torch would raise at this step too).
        """
        if metrics is None and epoch is None and self._fast:
            s = self.last_epoch + 1
            cache = self._cache
            i = s - cache.base
            if i < len(cache.lrs):
                self.last_epoch = s
                row = cache.lrs[i]
                # OptimizerWriter.write's loop for float LRs (_fast says they are), inlined;
                # looked up every step, as torch does: optimizer.load_state_dict() (which
                # accelerate calls in prepare()) replaces the param group dicts
                try:
                    for group, lr in zip(self.optimizer.param_groups, row, strict=True):
                        group["lr"] = lr
                except ValueError:
                    self.last_epoch = s - 1
                    raise self._writer.groups_changed() from None
                moms = cache.moms[i]
                if moms is not None:
                    self._writer.write_momentums(moms)
                self._last_lr = row
                if s >= self._prefetch_at:
                    self._maybe_prefetch(s)
                return
        if type(metrics) is float and epoch is None and self._fast and self._overlap:
            # torch's step(metric), overlapping: what _step_slow and _take_report do then
            # (open, one watched metric, nothing pending, no fetch in flight), in one go
            s = self.last_epoch + 1
            watched = self._watched
            if len(watched) == 1 and not self._fetcher.busy and not self._cache.holds(s):
                self.last_epoch = s
                self._policy.cadence.observe_report(s)
                for name in watched:
                    self._hand_off(s, {name: metrics})
                check_not_composed(self.optimizer)
                return
        self._step_slow(metrics, epoch)

    def get_last_lr(self) -> list[float]:
        """The LRs of the current step, one per param group (as torch's).

        While the step waits for ``report()``, the previous step's LRs (those in the param
        groups), as torch's ``ReduceLROnPlateau`` shows before its ``step(metric)``.
        """
        self._settle()
        return list(self._last_lr)

    def get_lr(self) -> list[float]:
        """The LRs of the current step (torch computes them here; the server did)."""
        self._settle()
        return list(self._last_lr)

    @property
    def should_stop(self) -> bool:
        """Whether an operator stopped the run: the job should finish (save, exit)."""
        # Tied to the step, not to when an answer came: every rank stops at the same step
        # (a rank's prefetch may learn of the stop before the other rank gets there).
        self._settle()
        return self._events.stopped(self.last_epoch)

    @property
    def watched(self) -> frozenset[str]:
        """The metrics the run decides on now, as the server last said: ``step(metric)`` and
        ``report()`` send these with the step (an operator may change them)."""
        return self._watched

    @property
    def status(self) -> str:
        """The run's status as last seen: ``active``, ``held`` or ``stopped``."""
        return self._run_status

    def log(
        self,
        metrics: Mapping[str, float] | None = None,
        /,
        *,
        step: int | None = None,
        **named: float,
    ) -> None:
        """Log metrics for history and plots; sent in batches in the background.

        Records are keyed ``(name, step, rank)``; logging a key again replaces its value.
        The step defaults to the one the next ``step()`` call commits, as for metrics passed
        to ``step()`` (the training they describe ran at the current step's values).
        History only: a watched metric drives the schedule only when passed to ``step()``.

        Args:
            metrics: ``{"name": value}``.
            step: The step to file them under (default ``last_epoch + 1``).
            **named: More metrics, e.g. ``log(train_loss=0.4)``.

        Raises:
            ClientClosed: After ``close()``.
        """
        self._check_open()
        items = {**(metrics or {}), **named}
        self._metrics.add(self.last_epoch + 1 if step is None else int(step), items)

    def report(self, **metrics: float) -> None:
        """Report metrics measured after the last ``step()``, e.g. ``report(val_loss=0.41)``.

        With ``reports_after_step=True`` they decide the values of the next
        ``optimizer.step()``, as torch's ``ReduceLROnPlateau`` stepped after an evaluation
        would: a step that may carry the watched metric keeps its values open after
        ``step()`` until ``report()`` brings it, or until the optimizer next steps without
        one (a hook on the optimizer), whichever comes first. Where no step is open
        (the default, ``strict=True``, an optimizer torch does not hook, or ``report()``
        before ``step()``) they go with the next ``step()``, as ``step(metrics=...)``
        would. Metrics the schedule does not watch are logged for history. The Hugging
        Face and Lightning callbacks in ``client.integrations`` call it.

        Raises:
            ClientClosed: After ``close()``.
            TypeError: A value is not a number.
        """
        self._check_open()
        items = {name: to_float(value) for name, value in metrics.items()}
        s = self._open
        if s is None:
            self._reported.update(items)
            self._refresh()  # the next step() takes them
            return
        report, extra = self._split_metrics(items)
        if extra:
            self._metrics.add(s, extra)
        if not report:
            return  # the step stays open for the watched metric
        self._open = None
        self._take_report(s, report)
        self._refresh()
        self._after_step(s)

    def flush(self, timeout: float | None = DEFAULT_CLOSE_TIMEOUT_S) -> bool:
        """Send the logged metrics now; returns whether all were sent within ``timeout``."""
        self._check_open()
        return self._metrics.flush(timeout)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume this schedule (plain Python values)."""
        self._close_step()
        return {
            "run_id": self.run_id,
            "url": self._client.base_url,
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "_last_lr": list(self._last_lr),
            "schedule": self.schedule,
            "rank": self.rank,
            "world_size": self.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "cadence": self._policy.cadence.state_dict(),
            "status": self._run_status,
            "stopped_at": self._events.stopped_at,
            "switched_at": self._events.switched_at,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``: fetches the values of its ``last_epoch`` and applies them.

        Values are final, so a resumed job applies exactly the values it would have.

        Raises:
            ValueError: The checkpoint belongs to another run than the one named at creation.
            LRServiceError: The server could not give the values (it must, to resume).
        """
        self._check_open()
        self._close_step()
        run_id = str(state_dict["run_id"])
        if run_id != self.run_id and self._named_run:
            raise ValueError(
                f"the checkpoint is of run {run_id!r} but this scheduler was made for run "
                f"{self.run_id!r}; pass run_id={run_id!r} (or no run_id) to resume it"
            )
        self._fetcher.drop()
        self._tails.drop()
        self._tail.clear()  # the values after another run's (or another step's) window
        self.run_id = run_id
        if state_dict.get("schedule") is not None:
            self.schedule = dict(state_dict["schedule"])  # the loaded run's
            self.__dict__.pop("_spec_filled", None)
        self.last_epoch = int(state_dict["last_epoch"])
        if "cadence" in state_dict:
            self._policy.cadence.load_state_dict(state_dict["cadence"])
        self._events.restore(state_dict, self.last_epoch)
        self._cache.restart(self.last_epoch)
        self._accept(self._client.read_lr(self.run_id, self.last_epoch))
        self._apply(self.last_epoch)
        self._maybe_prefetch(self.last_epoch)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Send what is buffered (for up to ``timeout`` s), stop the worker, close the connection.

        Idempotent. Later ``step()``, ``log()`` and ``load_state_dict()`` raise ``ClientClosed``;
        ``get_last_lr()`` and ``state_dict()`` still answer. An ``LRClient`` passed as
        ``client=`` is left open (its owner closes it).
        """
        if self._state is ClientState.CLOSED:
            return
        self._finalizer.detach()  # this does what it would, and more
        self._fetcher.drop()  # first: a decision handed off is not taken in past here
        self._deciding = None
        self._open = None  # the job is done with it: nothing needs its values
        self._set_state(ClientState.CLOSED)
        release_driver(self.optimizer, self)
        self._writer.unhook()
        self._fetcher.close(timeout)
        self._tails.close(timeout)
        # undelivered decisions still belong in history; taken under the fetcher's lock: after
        # a timeout above, a report's POST may still be on its way and its thread pop it
        for step, report in self._fetcher.take_pending():
            self._metrics.add(step, report)
        lost = self._metrics.close(timeout)
        if self._owns_client:
            self._client.close()
        if lost:
            warn(
                f"lrserve: {lost} logged metric records of run {self.run_id!r} could not be sent "
                f"before close() (last error: {self._metrics.last_error})",
                MetricsDroppedWarning,
            )

    def __enter__(self) -> RemoteScheduler:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RemoteScheduler(run_id={self.run_id!r}, last_epoch={self.last_epoch}, "
            f"status={self._run_status!r}, url={self._client.base_url!r})"
        )

    # -- the state ----------------------------------------------------------------------

    def _set_state(self, state: ClientState) -> None:
        self._state = state
        self._refresh()

    def _refresh(self) -> None:
        """Note whether ``step()`` may be a bare index (``_fast``): the server answers, nothing
        is pending or due at a step (a decision, a report, a switch, a spike), float LRs.
        Called wherever one of these changes."""
        self._fast = (
            self._state is ClientState.ACTIVE
            and self._deciding is None
            and self._open is None
            and not self._reported
            and not self._events.pending
            and not self._superseded
            and not self._writer.has_tensor_lrs()  # the one that loops: last
        )

    def _back(self) -> None:
        self._warned -= {"away", "wait:report", "wait:tail"}
        self._waited_out = False
        self._set_state(ClientState.ACTIVE)

    def _check_open(self) -> None:
        if self._state is ClientState.CLOSED:
            raise ClientClosed("this RemoteScheduler is closed")

    def _supersede(self) -> None:
        """Another scheduler was built on this one's optimizer (``register_driver``)."""
        self._superseded = True
        self._refresh()

    def _check_not_superseded(self) -> None:
        if self._superseded:
            raise ValueError(
                f"another scheduler was built on this optimizer after this one (run {self.run_id!r}): "
                f"torch would compose the two if both step (each scaling the LR the other wrote); "
                f"lrserve serves one schedule per optimizer: step only the newer one, or put both in "
                f'one spec ({{"type": "ChainedScheduler", "schedulers": [...]}})'
            )

    # -- the slow path ------------------------------------------------------------------

    def _step_slow(self, metrics: Any, epoch: Any) -> None:
        self._check_open()
        self._check_not_superseded()
        self._close_step()
        if epoch is not None:
            raise TypeError(
                "RemoteScheduler.step() takes no epoch: the server keeps the schedule's clock "
                "(torch deprecated step(epoch) as well)"
            )
        report, extra = self._split_metrics(metrics)
        if self._reported:  # report() before step(): they go with this step
            queued, self._reported = self._split_metrics(self._reported), {}
            report, extra = {**queued[0], **report}, {**queued[1], **extra}
        s = self.last_epoch + 1
        self.last_epoch = s
        try:
            if extra:
                self._metrics.add(s, extra)
            self._collect(wait=False)
            if report:
                self._take_report(s, report)
            elif self._cache.holds(s):
                self._apply(s)
            elif self.reports_after_step and self._hooked and self._policy.cadence.may_report_at(s):
                # the job may report() this step's metric after step() (frameworks evaluate
                # after stepping the scheduler): its values are taken then, or by the hook
                self._open = s
                self._due.armed = True
                self._refresh()
                return
            else:
                self._obtain(s)
        except BaseException:
            if self.strict:
                self.last_epoch = s - 1  # the caller may retry the same step
            raise
        self._after_step(s)

    def _after_step(self, s: int) -> None:
        """Fetch the next window if due (``_maybe_prefetch``), unless the step's report was
        handed off: the fetch thread plans the windows until ``_settle`` then."""
        if self._deciding is None:
            self._maybe_prefetch(s)
        else:
            check_not_composed(self.optimizer)

    def _split_metrics(self, metrics: Any) -> tuple[dict[str, float], dict[str, float]]:
        if metrics is None:
            return {}, {}
        watched = self._watched
        if type(metrics) is float and len(watched) == 1:  # torch's call: what the rest gives, at once
            for name in watched:
                return {name: metrics}, {}
        if isinstance(metrics, Mapping):
            items = {str(k): to_float(v) for k, v in metrics.items()}
        else:
            # A number is torch's deprecated step(epoch) jump (fractional for
            # CosineAnnealingWarmRestarts) on a schedule that watches no metric: an int always,
            # a float unless the job's own spec watched one (then it is the job's metric, still
            # passed after an operator replaced the schedule by one that watches none) or has a
            # spike guard (then it is the guarded loss).
            epoch_like = isinstance(metrics, int) or (
                isinstance(metrics, float) and not self._job_watched and self._guard_monitor is None)
            if not watched and epoch_like and not isinstance(metrics, bool):
                raise TypeError(
                    f"step({metrics!r}): torch reads a number passed to a scheduler that watches "
                    f"no metric as the deprecated step(epoch) jump, which lrserve does not do "
                    f"(the server keeps the schedule's clock); call step() once per step, and "
                    f"log(name=value) for metrics"
                )
            if len(watched) > 1:
                raise TypeError(
                    f"the schedule watches {sorted(watched)}; pass step(metrics={{name: value, ...}})"
                )
            name = next(iter(watched)) if watched else (self._guard_monitor or DEFAULT_MONITOR)
            items = {name: to_float(metrics)}
        report = {k: v for k, v in items.items() if k in watched}
        return report, {k: v for k, v in items.items() if k not in watched}

    def _take_report(self, s: int, report: dict[str, float]) -> None:
        self._policy.cadence.observe_report(s)
        self._collect(wait=True)  # a window in flight may already cover s
        if self._cache.holds(s):
            self._warn_once(
                "cadence",
                f"lrserve: {sorted(report)} for step {s} came after that step's values were "
                f"fetched, so it is recorded for history only; pass steps_per_epoch= so windows "
                f"end before the steps that report",
                CadenceWarning,
            )
            self._metrics.add(s, report)
            self._apply(s)
            return
        if self._state is ClientState.AWAY:
            self._fetcher.pending.append((s, report))
            if not self._wait_for_server(s, _decides(s, report), self._fetcher.error):
                self._hold(s, self._fetcher.error, wait=False)
            return
        if self._overlap and not self._fetcher.busy:
            self._hand_off(s, report)
            return
        self._policy.sizer.observe(s, self._clock())
        try:
            ahead = self._ahead_from(s)
            answer = self._client.step_run(
                self.run_id,
                s,
                metrics=report,
                rank=self.rank,
                ahead=ahead,
                timeout=self._report_timeout,
                tail=self._tail_fields(s),
            )
        except LRServiceError as exc:
            if not is_outage(exc):
                raise
            if not self.strict:
                self._fetcher.pending.append((s, report))
                self._set_state(ClientState.AWAY)
                if self._wait_for_server(s, _decides(s, report), exc):
                    return
            self._hold(s, exc, wait=False)
            return
        self._accept(answer)
        self._apply(s)

    def _hand_off(self, s: int, report: dict[str, float]) -> None:
        """The worker posts the report and takes its answer in; ``_settle`` writes the values
        of ``s`` when first needed. The hand-off comes last (the contract: ``_accept_handed``)."""
        self._fetcher.pending.append((s, report))
        self._deciding = s
        self._due.armed = True
        self._fast = False  # what _refresh() says while a decision is on its way
        self._fetcher.hand_off(s, self._clock())

    def _wait_for_server(
        self, s: int, why: str, exc: BaseException | None, *, past_tail: bool = False
    ) -> bool:
        """Step ``s`` needs values only a server has (``why``: its report decides them, or it is
        past the provisional tail): wait for one, up to ``report_wait_s`` (a warning, once per
        outage and reason).

        The worker delivers what is pending (a report) as soon as a server answers. Returns
        whether the values of ``s`` came; if not (a report stays pending: the fallback), the
        steps past the tail keep the last values for the rest of this outage without waiting
        again (``_hold``); a report's own step still waits.
        """
        if self._report_wait_s <= 0:
            return False
        self._warn_once(
            "wait:tail" if past_tail else "wait:report",
            f"lrserve: the server is away ({exc}); {why} training waits for the server, up to "
            f"{self._report_wait_s:g} s (report_wait_s)",
            ServerAwayWarning,
        )
        deadline = time.monotonic() + self._report_wait_s
        while True:
            if not self._fetcher.busy:
                self._fetcher.submit(None, self._ahead_from(s))
            left = deadline - time.monotonic()
            result = self._fetcher.take(wait=True, stop_waiting=lambda: False, timeout=max(0.0, left))
            if result is NOT_READY:
                self._waited_out = True  # past the bound: the worker keeps trying to deliver it
                return False
            self._take_in(result)
            if isinstance(result, EndOfSchedule):
                return False
            if self._cache.holds(s):
                self._apply(s)
                if self._state is ClientState.AWAY:
                    self._back()
                return True

    def _obtain(self, s: int) -> None:
        if self._fetcher.busy:
            self._collect(wait=True)
            if self._cache.holds(s):
                self._apply(s)
                return
        if self._fetcher.busy:  # still running: the worker is retrying, the server is away
            if not self.strict:
                self._hold(s, self._fetcher.error)
                return
            self._fetcher.drop()  # strict: the caller waits for an answer, so ask now
        self._policy.sizer.observe(s, self._clock())
        try:
            ahead = self._ahead_from(s)
            answer = self._client.read_lr(self.run_id, s, ahead=ahead, tail=self._tail_fields(s))
        except LRServiceError as exc:
            if not is_outage(exc):
                raise
            self._hold(s, exc)
            return
        self._accept(answer)
        self._apply(s)

    def _hold(self, s: int, exc: BaseException | None, *, wait: bool = True) -> None:
        """No final values for step ``s`` while the server is away: the provisional tail's if
        it holds ``s``; else (``wait``) wait for a server, up to ``report_wait_s``, once per
        outage: the values past the tail are not known here, and each rank's tail ends where
        its own requests left it, so ranks that kept their last values would train on
        different LRs. Past that bound (or with ``wait=False``: a report's wait is over) keep
        the last values, warn once, and let the worker catch up."""
        if self.strict:
            raise exc if exc is not None else TransportError("the server is away")
        self._set_state(ClientState.AWAY)
        self._take_tail()  # what came before the outage
        if self._tail.holds(s):
            self._write(*self._tail.ride(s))
            self._warn_once(
                "away",
                f"lrserve: the server is away ({exc}); from step {s} training goes on with the "
                f"provisional values it sent ahead (steps up to {self._tail.end - 1}), as if no "
                f"decision or operator action came, until it is back.",
                ServerAwayWarning,
            )
            return
        if wait and not self._waited_out:
            held = f"steps up to {self._tail.end - 1}" if self._tail.lrs else "none"
            why = (f"step {s} is past the provisional values held ({held}), so every rank "
                   f"keeps the schedule's values:")
            if self._wait_for_server(s, why, exc, past_tail=True):
                return
        self._warn_once(
            "away",
            f"lrserve: the server is away ({exc}); step {s} keeps the last learning rates "
            f"{self._last_lr} until it is back. Training goes on; the schedule catches up then.",
            ServerAwayWarning,
        )
        if not self._fetcher.busy:
            self._fetcher.submit(None, 0 if self._policy.watched else self._policy.sizer.next_ahead())

    # -- values -------------------------------------------------------------------------

    def _apply(self, s: int) -> None:
        if self._events.pending:
            self._reach(s)
        self._write(*self._cache.row(s))

    def _reach(self, s: int) -> None:
        """Act on what is due at step ``s``, before its values are written: the range test is
        over (what follows reports ``then``'s metrics, on its own cadence; the job restores
        its weights), spike backoffs (the job rolls back, once per spike)."""
        if self._events.switch_reached(s):
            self._policy.cadence = Cadence(self.steps_per_epoch, start=s)
            if self._on_switch is not None:
                self._on_switch(self)
        for spike in self._events.spikes_reached(s):
            if self._on_spike is not None:
                self._on_spike(dict(spike))
        self._refresh()

    def _write(self, row: list[float], moms: Sequence[float] | None) -> None:
        self._writer.write(row, moms)
        self._last_lr = row

    def _accept(self, answer: Mapping[str, Any]) -> None:
        """Take an answer in, on the training thread."""
        self._heard(answer)
        self._publish()
        self._refresh()  # a switch or a spike due: the step that reaches it goes through _apply
        self._take_values(answer)
        if self._state is ClientState.AWAY and self._cache.holds(self.last_epoch):
            self._apply(self.last_epoch)  # catch up now, not one step later
            self._back()
        self._grow_tail()

    def _plan_decision(self, s: int, now: float) -> int:
        """A handed-off report's window: how far it reaches (on the fetch thread)."""
        self._policy.sizer.observe(s, now)
        return self._ahead_from(s)

    def _accept_handed(self, answer: Any) -> Any:
        """Take a handed-off report's answer in, on the fetch thread (``overlap_decisions``).

        Threading: from ``WindowFetcher.hand_off`` (the last thing ``_take_report`` does)
        until ``_settle`` takes the job (``HANDLED``), the fetch thread is the one writer and
        reader of what this and ``_plan_decision`` use (the window cache, the provisional
        tail and its fetcher, the prefetch policy, the run's events and status heard): every
        call of the job's that reads them settles first (``_fast`` is false meanwhile),
        ``drop()`` revokes the job under the lock this runs under, and a ``_settle`` that
        stops waiting revokes it too (the answer, when it comes, is then taken in by
        ``_accept`` there). What the job is shown (``status``, ``watched``) and what touches
        the optimizer (its hooks, its values) stay on the training thread: ``_publish``,
        ``_apply``. No state is left as the training thread's ``_accept`` would not leave it:
        the catch-up after an outage is not needed (a hand-off is made only while active).
        """
        if isinstance(answer, EndOfSchedule):
            return answer  # the training thread notes it (_collect)
        self._heard(answer)
        self._take_values(answer)
        self._grow_tail()
        return HANDLED

    def _heard(self, answer: Mapping[str, Any]) -> None:
        self._heard_status = str(answer.get("status") or self._heard_status)
        self._note_server(answer)
        self._events.note(answer, self.last_epoch)

    def _publish(self) -> None:
        """Show the job what the latest answer taken in said (``status``, ``watched``), and
        hook the optimizer once the run watches a metric: on the training thread."""
        self._run_status = self._heard_status
        if self._watched is not self._policy.watched:
            self._watched = self._policy.watched
            self._maybe_hook()

    def _take_values(self, answer: Mapping[str, Any]) -> None:
        window = answer.get("window")
        if window:
            start, lrs = int(window["start"]), window["lrs"]
            self._merge(start, lrs, window.get("momentums"))
        else:
            moms = answer.get("momentums")
            start, lrs = int(answer["step"]), [answer["lrs"]]
            self._merge(start, lrs, None if moms is None else [moms])
        # the steps ridden are judged against the tail they were taken from, before the
        # answer's final values replace it (those disagree from any input placed meanwhile)
        self._tail.back(self.last_epoch, self._cache)
        self._tail.take(answer, start, lrs)

    def _grow_tail(self) -> None:
        """Ask for more provisional tail after the final values held, when what is held
        beyond them is short (``ProvisionalTail.wanted``), at most ``TAIL_WINDOWS`` windows
        (or one request's chunk) per window: on the tail's own thread, so the windows never
        wait for it. Answers are taken here, at the next window."""
        self._take_tail()
        if self._tails.busy or self._state is not ClientState.ACTIVE:
            return
        after = self._cache.next_step - 1  # final: asking there commits nothing
        groups = self._writer.n_groups
        most = max(tail_chunk(groups), TAIL_WINDOWS * self._cache.last_window)
        steps = self._tail.wanted(after + 1, self._policy.sizer.seconds_per_step, most)
        if steps and after >= 0:
            self._tails.submit(after, steps, self._tail.held(), groups, self._tail.generation)

    def _take_tail(self) -> None:
        """Keep the tail answers that came, unless the values held were dropped since they
        were asked for (a decision changed what follows: they are stale)."""
        result = self._tails.take()
        if result is NOT_READY:
            return
        generation, answers = result
        for answer in answers:
            if generation != self._tail.generation:
                return
            self._tail.take(answer, int(answer["step"]), [answer["lrs"]])

    def _merge(self, start: int, lrs: list[list[float]], moms: list[list[float]] | None) -> None:
        if not lrs:
            return
        self._writer.check_groups()
        if len(lrs[0]) != self._writer.n_groups:
            raise RunConflict(
                f"run {self.run_id!r} has {len(lrs[0])} param groups, the optimizer has "
                f"{self._writer.n_groups}; use another run_id"
            )
        self._cache.merge(start, lrs, moms, self.last_epoch)
        self._reschedule()

    def _note_server(self, answer: Mapping[str, Any]) -> None:
        """What the server says of the run now: the metrics it decides on, its cap on ``ahead``."""
        watched = answer.get("watched")
        if watched is not None and frozenset(watched) != self._policy.watched:
            self._policy.watched = frozenset(str(name) for name in watched)
        max_ahead = answer.get("max_ahead")
        if max_ahead:
            self._policy.sizer.cap = int(max_ahead)

    # -- fetching windows ---------------------------------------------------------------

    def _reschedule(self) -> None:
        if self._state is ClientState.CLOSED:
            self._prefetch_at = NEVER
        else:
            self._prefetch_at = self._policy.fetch_at(self._cache, self._fetcher.seconds)

    def _ahead_from(self, start: int) -> int:
        return self._policy.ahead_from(start, self._cache.end_at)

    def _maybe_prefetch(self, s: int) -> None:
        check_not_composed(self.optimizer)  # a torch scheduler built on it since (each window)
        if self._fetcher.busy:
            if not self._fetcher.done():
                self._prefetch_at = s + 1  # look again next step
                return
            self._collect(wait=False)
        if s < self._prefetch_at or self._state is not ClientState.ACTIVE:
            return
        self._reschedule()
        if s < self._prefetch_at:
            return
        nxt = self._cache.next_step
        self._policy.sizer.observe(s, self._clock())
        self._fetcher.submit(nxt, self._ahead_from(nxt))
        self._prefetch_at = s + 1

    def _collect(self, *, wait: bool) -> None:
        if not self._fetcher.busy:
            return
        result = self._fetcher.take(wait=wait, stop_waiting=self._stop_waiting)
        if result is not NOT_READY:
            self._take_in(result)

    def _take_in(self, result: Any) -> None:
        """Take in what ``WindowFetcher.take()`` answered (not ``NOT_READY``), on the training thread."""
        if result is HANDLED:  # the fetch thread took it in (_accept_handed)
            self._publish()
        elif isinstance(result, EndOfSchedule):
            self._cache.end_at = result.step
            self._reschedule()
        else:
            self._accept(result)

    def _stop_waiting(self) -> bool:
        # a loop's own request would retry max_retries times: wait that long, unless known away
        return self._state is ClientState.AWAY or self._fetcher.failures > self._client.max_retries

    # -- decisions on their way ---------------------------------------------------------

    def _maybe_hook(self) -> None:
        """Hook the optimizer once the run watches a metric (not before: no cost without)."""
        if self._hookable and self._policy.watched and not self._hooked:
            self._hooked = self._writer.hook(_before_reads_hook(weakref.ref(self), self._due))
            self._overlap = self._want_overlap and self._hooked

    def _before_optimizer_reads(self, *_: Any) -> None:
        if self._open is not None:
            self._close_step()
        if self._deciding is not None:
            self._settle()
        self._due.armed = self._open is not None or self._deciding is not None

    def _close_step(self) -> None:
        """No report came for the open step: take its values as they are (then settle)."""
        s, self._open = self._open, None
        if s is not None:
            if self._cache.holds(s):
                self._apply(s)
            else:
                self._obtain(s)
            self._refresh()
            self._maybe_prefetch(s)
        self._settle()

    def _settle(self) -> None:
        """Wait for the decision ``step(metric)`` sent, and write its values (now due)."""
        if self._deciding is None:
            return
        s, self._deciding = self._deciding, None
        if self._fetcher.handled():  # the fetch thread took the answer in (_accept_handed)
            self._publish()
        else:
            self._collect(wait=True)
        self._refresh()
        if self._fast and self._cache.holds(s):
            # no event due and float LRs (_fast): _apply's write, and nothing after it to refresh
            self._write(*self._cache.row(s))
        else:
            if self._cache.holds(s):
                self._apply(s)
            else:  # the server is away: wait for it as a report that did not overlap would
                self._set_state(ClientState.AWAY)
                report = next((r for k, r in list(self._fetcher.pending) if k == s), None)
                why = _decides(s, report) if report else f"step {s} waits for the decision of its report:"
                if not self._wait_for_server(s, why, self._fetcher.error):
                    self._hold(s, self._fetcher.error, wait=False)  # the worker keeps trying to deliver it
            self._refresh()
        self._maybe_prefetch(s)

    # -- small helpers ------------------------------------------------------------------

    def _warn_once(self, key: str, message: str, category: type[Warning]) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn(message, category)


def _decides(s: int, report: Mapping[str, float]) -> str:
    """Why step ``s``, which carries ``report``, waits for a server (``_wait_for_server``)."""
    return f"step {s} carries {sorted(report)}, whose decision sets its values:"


class _Link:
    """The run's id, which the worker threads read without keeping the scheduler alive."""

    __slots__ = ("run_id",)

    def __init__(self) -> None:
        self.run_id = ""

    def get_run_id(self) -> str:
        return self.run_id


_GONE: Any = ClientClosed


def _weakly(ref: weakref.ref[RemoteScheduler], name: str, gone: Any = _GONE) -> Callable[..., Any]:
    """``ref().<name>(...)``; once the scheduler is collected, raise ``ClientClosed`` (or return ``gone``)."""

    def call(*args: Any) -> Any:
        scheduler = ref()
        if scheduler is None:
            if gone is _GONE:
                raise ClientClosed("the RemoteScheduler was garbage-collected")
            return gone
        return getattr(scheduler, name)(*args)

    return call


class _Due:
    """Whether the optimizer hook has work (a step open, a decision on its way): the hook runs
    before every ``optimizer.step()``, so on the steps between reports it reads one flag."""

    __slots__ = ("armed",)

    def __init__(self) -> None:
        self.armed = False


def _before_reads_hook(ref: weakref.ref[RemoteScheduler], due: _Due) -> Callable[..., None]:
    """The optimizer pre-step (and state-dict) hook: ``_before_optimizer_reads`` when ``due``
    is armed and the scheduler is alive; holds no reference that keeps it alive."""

    def before_reads(*_: Any) -> None:
        if due.armed:
            scheduler = ref()
            if scheduler is not None:
                scheduler._before_optimizer_reads()

    return before_reads


def _client_for(
    client: LRClient | None,
    *,
    url: str | None,
    token: str | None,
    timeout: float | None,
    max_retries: int | None,
    http_client: httpx.Client | None,
    sleep: Callable[[float], None] | None,
    rand: Callable[[], float],
) -> LRClient:
    """``client``, or (when ``None``) the ``LRClient`` the scheduler's own arguments describe.

    Raises:
        TypeError: Both a client and arguments for building one were given.
    """
    if client is not None:
        given = {"url": url, "token": token, "timeout": timeout, "max_retries": max_retries,
                 "http_client": http_client, "sleep": sleep}
        if any(value is not None for value in given.values()):
            raise TypeError(
                f"RemoteScheduler(client=...) talks through that LRClient; "
                f"{sorted(k for k, v in given.items() if v is not None)} configure the one it "
                f"builds when none is given: pass one or the other"
            )
        return client
    return LRClient(
        url,
        token=token,
        timeout=timeout,
        max_retries=DEFAULT_MAX_RETRIES if max_retries is None else max_retries,
        http_client=http_client,
        sleep=time.sleep if sleep is None else sleep,
        rand=rand,
    )


def _send_metrics(client: LRClient, link: _Link, records: list[dict[str, Any]]) -> Any:
    return client.send_metrics(link.run_id, records, max_retries=0)


def _release(
    fetcher: WindowFetcher, tails: TailFetcher, metrics: MetricLog, client: LRClient | None, hooks: list[Any]
) -> None:
    """A scheduler dropped without ``close()``: unhook the optimizer, stop the worker threads.

    Logged metrics still unsent get a short try (the exit handler gives the rest theirs).
    The client is closed when the scheduler built it (``None`` here otherwise).
    """
    unhook(hooks)
    fetcher.close(0)
    tails.close(0)
    if metrics.buffer is not None:
        metrics.buffer.close(DROPPED_FLUSH_S)
    if client is not None:
        # A worker may have a request in flight (a window, a tail): closing the connection pool
        # under it leaves its socket to the garbage collector (a ResourceWarning in some later,
        # unrelated code). Close it once they stopped, off the thread that dropped the scheduler.
        threading.Thread(
            target=_close_when_stopped, args=(client, fetcher, tails), name="lrserve-release", daemon=True
        ).start()


def _close_when_stopped(client: LRClient, *workers: WindowFetcher | TailFetcher) -> None:
    for worker in workers:
        worker.close(DROPPED_JOIN_S)
    client.close()


@functools.cache
def _torch_flavour() -> type[RemoteScheduler]:
    """``RemoteScheduler`` that is also a ``torch.optim.lr_scheduler.LRScheduler``.

    Its methods are all ``RemoteScheduler``'s (first in the MRO); torch's ``__init__`` is
    never called, so torch does not wrap ``optimizer.step``.
    """
    from torch.optim.lr_scheduler import LRScheduler

    return type(
        "RemoteScheduler",
        (RemoteScheduler, LRScheduler),
        {"__module__": RemoteScheduler.__module__, "__doc__": RemoteScheduler.__doc__},
    )


