"""Window sizing and report cadence."""

from __future__ import annotations

import pytest
from lrserve.client._windows import MAX_AHEAD, Cadence, WindowSizer


def test_fixed_cadence_is_the_multiples_of_steps_per_epoch():
    cadence = Cadence(steps_per_epoch=10)
    assert cadence.known
    assert [cadence.next_report_after(s) for s in (0, 9, 10, 15)] == [10, 10, 20, 20]
    assert cadence.may_report_at(30) and not cadence.may_report_at(31)
    cadence.observe_report(13)  # off the grid the job declared: the grid stays
    assert cadence.next_report_after(13) == 20


def test_unknown_cadence_allows_no_step_beyond_the_current_one():
    cadence = Cadence()
    assert not cadence.known
    assert cadence.next_report_after(7) == 8
    assert cadence.may_report_at(1)


def test_cadence_is_learned_from_the_first_report():
    cadence = Cadence(start=0)
    cadence.observe_report(25)
    assert cadence.period == 25
    assert cadence.next_report_after(25) == 50
    assert not cadence.may_report_at(26) and cadence.may_report_at(75)


def test_learned_cadence_counts_from_a_resumed_start():
    cadence = Cadence(start=100)
    cadence.observe_report(110)
    assert cadence.period == 10


def test_learned_cadence_relearns_from_a_report_off_the_grid():
    cadence = Cadence()
    cadence.observe_report(10)
    cadence.observe_report(20)
    cadence.observe_report(35)
    assert (cadence.period, cadence.anchor) == (15, 35)


def test_learned_cadence_keeps_its_period_when_a_report_skips_an_epoch():
    cadence = Cadence()
    cadence.observe_report(10)
    cadence.observe_report(30)  # validation every other epoch for a while: still on the grid
    assert (cadence.period, cadence.anchor) == (10, 30)


def test_cadence_state_round_trips():
    cadence = Cadence()
    cadence.observe_report(12)
    other = Cadence(steps_per_epoch=3)
    other.load_state_dict(cadence.state_dict())
    assert (other.fixed, other.period, other.anchor) == (False, 12, 12)


def test_steps_per_epoch_must_be_positive():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Cadence(steps_per_epoch=0)


def test_sizer_starts_small_and_grows_gradually_to_the_budget():
    sizer = WindowSizer(1.0, first=16, growth=4)
    assert sizer.next_ahead() == 16  # nothing measured yet
    sizer.observe(0, 0.0)
    sizer.observe(100, 0.1)  # 1 ms per step: the budget is 1000 steps
    assert [sizer.next_ahead() for _ in range(4)] == [64, 256, 999, 999]


def test_sizer_shrinks_at_once_when_steps_get_slower():
    sizer = WindowSizer(1.0, first=16)
    sizer.observe(0, 0.0)
    sizer.observe(1000, 0.1)
    for _ in range(5):
        sizer.next_ahead()
    sizer.observe(1010, 10.1)  # 1 s per step now (smoothed with the past)
    assert sizer.next_ahead() <= 2


def test_sizer_caps_and_floors():
    sizer = WindowSizer(1000.0, first=16)
    sizer.observe(0, 0.0)
    sizer.observe(10, 0.0)  # no measurable time
    for _ in range(10):
        ahead = sizer.next_ahead()
    assert ahead == MAX_AHEAD
    slow = WindowSizer(1.0)
    slow.observe(0, 0.0)
    slow.observe(1, 5.0)
    assert slow.next_ahead() == 0


def test_sizer_needs_a_positive_budget():
    with pytest.raises(ValueError, match="time_budget_s"):
        WindowSizer(0)
