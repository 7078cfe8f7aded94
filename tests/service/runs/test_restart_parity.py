"""A restart changes no LR: any schedule, stepped with the metrics a job reports and the actions
an operator takes, gives the same values, decisions and status whether the server restarts
between its steps or not.

Each restart is what a new server process has: the store opened again and a manager with
nothing in memory, which loads the run from its latest snapshot and replays the events after
it. Snapshots are taken every few steps here (``snapshot_every``), so that restarts land
between snapshots and just after them; the default of 1,000 steps is the end-to-end test's
(``tests/e2e/test_server_restart.py``). The engine's own property
(``test_engine.py::test_any_spec_survives_a_snapshot``) holds a snapshot to the rule; this one
holds the whole load path (the store, the snapshot, the replay of metrics and actions). It
found nothing in 400 random examples; on the tree before the MultiStepLR fix, 150 did not reach
the one case the engine's property found.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lrserve.service.errors import LRServeError, ScheduleError
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import open_store

from tests.service.engine.strategies import MONITORS, SAFE_STEPS, valid_specs

STEPS = SAFE_STEPS // 2
ACTIONS = st.one_of(
    st.builds(lambda f: {"action": "scale", "factor": f}, st.floats(0.5, 1.5)),
    st.just({"action": "hold"}),
    st.just({"action": "resume"}),
)
"""Operator actions a run takes at any point, the replay of its log applies again after a restart."""


class _Server:
    """A run's store and manager, as one server process holds them; ``restart`` is a new process."""

    def __init__(self, db: str, snapshot_every: int) -> None:
        self.settings = Settings(db=db, snapshot_every=snapshot_every)
        self.store = open_store(db)
        self.manager = RunManager(self.store, self.settings)

    def restart(self) -> None:
        self.close()
        self.store = open_store(self.settings.db)
        self.manager = RunManager(self.store, self.settings)

    def act(self, action: dict[str, object]) -> object:
        """An operator's action at the first free step: the step it applies at (or the error)."""
        try:
            return self.manager.control("r", action, None)[0]
        except LRServeError as exc:
            return str(exc)

    def step(self, step: int, metrics: dict[str, float]) -> object:
        """The values and status at ``step`` after reporting ``metrics`` with it (or the error)."""
        try:
            window = self.manager.step_run("r", step, metrics, 0, 0)
        except ScheduleError as exc:
            return str(exc)
        return window.values[0], window.status, window.stopped_at, window.switched_at

    def close(self) -> None:
        self.manager.close()
        self.store.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n_groups=st.integers(1, 2),
    snapshot_every=st.integers(1, 9),
    losses=st.lists(st.one_of(st.none(), st.floats(0, 10)), min_size=STEPS, max_size=STEPS),
)
def test_restarts_between_any_steps_change_no_value(data, n_groups, snapshot_every, losses):
    schedule = data.draw(valid_specs(n_groups))
    restarts = data.draw(st.sets(st.integers(1, STEPS - 1), max_size=5))
    actions = data.draw(st.dictionaries(st.integers(1, STEPS - 1), ACTIONS, max_size=4))
    folder = Path(tempfile.mkdtemp())
    servers = [_Server(f"sqlite:///{folder}/{name}.db", snapshot_every) for name in ("straight", "restarted")]
    try:
        request = {"run_id": "r", "schedule": schedule, "base_lrs": [0.1 * (i + 1) for i in range(n_groups)]}
        for server in servers:
            server.manager.create_run(request)
        for step in range(1, STEPS):
            if step in restarts:
                servers[1].restart()
            if step in actions:
                straight, restarted = (server.act(actions[step]) for server in servers)
                assert restarted == straight, (step, actions[step])
            metrics = {m: losses[step] for m in MONITORS} if losses[step] is not None else {}
            straight, restarted = (server.step(step, metrics) for server in servers)
            assert restarted == straight, (step, sorted(restarts))
            if isinstance(straight, str):  # a step torch cannot take (a chain driven negative): both stop
                return
    finally:
        for server in servers:
            server.close()
        shutil.rmtree(folder, ignore_errors=True)
