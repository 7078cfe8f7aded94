"""``ValueLog`` reads exactly like the list of ``Values`` tuples it replaces, in far less memory."""

from __future__ import annotations

import math
import random
import struct
import tracemalloc

import pytest
from lrserve.service.api import sliced_json
from lrserve.service.api.responses import window_body
from lrserve.service.engine.engine import Engine, Values
from lrserve.service.engine.run_spec import RunSpec
from lrserve.service.engine.spec import parse_schedule
from lrserve.service.engine.status import RunStatus
from lrserve.service.runs.manager import ON_LOOP_VALUES, Window
from lrserve.service.runs.state import RunState
from lrserve.service.runs.value_log import ValueLog

ODD_FLOATS = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 2.2250738585072014e-308,
              1.7976931348623157e308, 0.1, 1 / 3, -2.5e-17]


def steps(n: int, groups: int, momentum: bool, seed: int = 0) -> list[Values]:
    """``n`` steps of random floats (odd ones first), as ``Engine.values`` gives them."""
    rng = random.Random(seed)
    pool = ODD_FLOATS + [rng.uniform(-1, 1) * 10 ** rng.randint(-300, 300) for _ in range(n * groups * 2)]

    def group(offset: int) -> tuple[float, ...]:
        return tuple(pool[(offset + k) % len(pool)] for k in range(groups))

    return [(group(i * groups), group(i * groups + 7) if momentum else None) for i in range(n)]


def bits(values: object) -> object:
    """``values`` with every float as its 8 bytes: NaN compares equal to itself, -0.0 differs from 0.0."""
    if isinstance(values, float):
        return struct.pack("<d", values)
    if isinstance(values, (list, tuple)):
        return type(values)(bits(v) for v in values)
    return values


def filled(values: list[Values], groups: int, momentum: bool) -> ValueLog:
    log = ValueLog(groups, momentum=momentum)
    log.extend(values)
    return log


@pytest.mark.parametrize(("groups", "momentum"), [(1, False), (1, True), (3, False), (3, True)])
def test_reads_like_the_list_bit_for_bit(groups, momentum):
    expected = steps(40, groups, momentum)
    log = filled(expected, groups, momentum)
    assert len(log) == len(expected)
    for i in range(-len(expected), len(expected)):
        assert bits(log[i]) == bits(expected[i])
        assert type(log[i]) is tuple and type(log[i][0]) is tuple
    bounds = [None, -50, -41, -40, -3, -1, 0, 1, 5, 39, 40, 41, 100]
    for start in bounds:
        for stop in bounds:
            for stride in (None, 1, 2, -1, -3):
                key = slice(start, stop, stride)
                assert bits(log[key]) == bits(expected[key]), key
    assert bits(list(log)) == bits(expected)


def test_append_and_extend_add_after_what_is_held():
    values = steps(10, 2, True)
    log = ValueLog(2, momentum=True)
    log.append(values[0])
    log.extend(values[1:4])
    log.extend(iter(values[4:]))
    log.extend([])
    assert bits(log[:]) == bits(values)


@pytest.mark.parametrize(("groups", "momentum"), [(1, False), (3, False), (3, True)])
def test_packed_steps_and_another_log_add_after_what_is_held_bit_for_bit(groups, momentum):
    """``extend_packed`` (a worker's steps, as their doubles) and ``extend_log`` (a run's
    pending steps, published) read as the same steps appended one by one."""
    values = steps(12, groups, momentum)
    log = filled(values[:2], groups, momentum)
    packed = filled(values[2:7], groups, momentum)
    log.extend_packed(packed.packed_lrs(0, 5), packed._moms)
    later = log.empty()
    later.extend(values[7:])
    log.extend_log(later)
    log.extend_log(log.empty())
    assert bits(log[:]) == bits(values)
    assert len(later) == 5 and len(log.empty()) == 0  # neither changed nor shared


@pytest.mark.parametrize("wrong", ["steps cut short", "momentums missing", "momentums given",
                                   "momentums short"])
def test_packed_steps_of_another_shape_are_refused_and_nothing_is_added(wrong):
    log = filled(steps(2, 2, True), 2, True)
    plain = filled(steps(2, 2, False), 2, False)
    lrs, moms = log.packed_lrs(0, 2), log._moms
    assert moms is not None
    with pytest.raises(ValueError, match="expected steps of"):
        if wrong == "steps cut short":
            log.extend_packed(lrs[:-1], moms[:-1])
        elif wrong == "momentums missing":
            log.extend_packed(lrs, None)
        elif wrong == "momentums given":
            plain.extend_packed(lrs, moms)
        else:
            log.extend_packed(lrs, moms[:-2])
    assert len(log) == 2 and len(plain) == 2


def test_out_of_range_indexes_raise_like_a_list():
    log = filled(steps(3, 1, False), 1, False)
    for index in (3, -4, 10**9):
        with pytest.raises(IndexError):
            log[index]
    assert log[3:] == [] and log[2:1] == []
    assert ValueLog(1, momentum=False)[:] == []
    with pytest.raises(TypeError):
        log["0"]


@pytest.mark.parametrize("wrong", [((0.1,), None), ((0.1, 0.2, 0.3), None), ((0.1, 0.2), (0.9, 0.9)),
                                   ((0.1, 0.2), (0.9,))])
def test_a_step_of_another_shape_is_refused_and_nothing_is_added(wrong):
    log = filled(steps(2, 2, False), 2, False)
    with pytest.raises(ValueError, match="per step"):
        log.append(wrong)
    assert len(log) == 2


def test_a_held_step_costs_about_its_floats():
    """8 B per float (plus the arrays' spare room), where tuples of floats took ~148 B a step."""
    values = steps(20_000, 1, False)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        log = filled(values, 1, False)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(log) == 20_000
    assert held / len(log) < 10


def test_a_run_state_holds_the_engines_values_in_order():
    schedule = {"type": "OneCycleLR", "max_lr": [0.5, 0.25], "total_steps": 30}
    spec = RunSpec.from_request({"base_lrs": [0.1, 0.05], "schedule": schedule})
    state = RunState("r", spec, spec.new_engine(), last_seq=0)
    reference = Engine(parse_schedule(schedule, n_groups=2), [0.1, 0.05])
    expected = [reference.values()]
    for _ in range(20):
        reference.advance()
        expected.append(reference.values())
    assert expected[0][1] is not None  # OneCycleLR cycles momentum: both arrays are in use
    state.advance_to(12)
    assert state.horizon == 0 and state.held_between(1, 1) is None  # not visible before publish
    state.publish()
    state.advance_to(20)
    state.publish()
    assert state.horizon == 20
    assert bits(state.values[:]) == bits(expected)
    assert bits(state.held_between(7, 7)) == bits(expected[7:8])
    assert bits(state.values[-1]) == bits(expected[-1])


@pytest.mark.parametrize("momentum", [False, True])
def test_a_big_window_s_answer_from_packed_values_is_the_lists_byte_for_byte(momentum):
    """A window of more than ``ON_LOOP_VALUES`` values comes packed (``RunState.held_packed``)
    and its answer is written from a numpy view of its doubles: the same bytes as from the
    tuples of floats it replaces (odd floats included)."""
    groups, n = 100, 60
    values = steps(n, groups, momentum)
    assert n * groups > ON_LOOP_VALUES
    log = filled(values, groups, momentum)
    packed = log.copy_range(0, n)
    assert bits(packed[:]) == bits(values) and bits(log.copy_range(2, 5)[:]) == bits(values[2:5])

    def answer(held):
        window = Window("r", 7, held, RunStatus.ACTIVE, None, None, ("loss",), 99)
        return sliced_json.dumps(window_body(window))

    assert answer(packed) == answer(log[:])
    assert len(log) == n and len(packed) == n  # the copy shares nothing: the log may grow
    log.append(values[0])
