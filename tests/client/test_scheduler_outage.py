"""When the server is away: final values carry on, then the provisional tail; a step past the
tail, or whose report decides its values, waits for the server (``report_wait_s``), past which
the last LR is held; then it catches up."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from lrserve.client import ClientState, MetricsDroppedWarning, ServerAwayWarning, ServerUnreachable

from tests.client.conftest import PLATEAU
from tests.client.fake_server import expected_lrs, next_lrs

CATCH_UP_S = 10.0


def held_until(sched):
    return sched._cache.next_step - 1


def step_once(sched, clock):
    clock.advance(0.001)
    sched.step()
    return sched.get_last_lr()


def tail_beyond_window(sched, steps):
    """Wait until the tail held reaches ``steps`` past the final values: it comes on a thread
    of its own, and the scheduler takes it with the next window, as in a job."""
    deadline = time.monotonic() + CATCH_UP_S
    while sched._tail.end <= held_until(sched) + steps:
        assert time.monotonic() < deadline, (sched._tail.end, held_until(sched))
        time.sleep(0.01)
        sched._grow_tail()


def down_at_the_end_of_the_final_values(sched, fake, clock, tail):
    """Train 300 steps, hold a tail of ``tail`` steps beyond the final values, then take the
    server down and step through the final values held: the next step rides the tail."""
    for _ in range(300):
        step_once(sched, clock)
    sched._collect(wait=True)
    tail_beyond_window(sched, tail)
    fake.down = True
    while sched.last_epoch < held_until(sched):
        step_once(sched, clock)


def step_until_caught_up(sched, clock, reports=None):
    """Step (slowly, so the worker's retries get time) until values follow the schedule again."""
    deadline = time.monotonic() + CATCH_UP_S
    while time.monotonic() < deadline:
        lrs = step_once(sched, clock)
        if sched.state is not ClientState.AWAY and lrs == expected_lrs([0.1], sched.last_epoch, reports)[-1]:
            return
        time.sleep(0.01)
    raise AssertionError("the scheduler did not catch up with the server")


def down_at_the_end_of_the_final_values_held(sched, fake, clock, steps=50):
    """Train ``steps`` steps, take the server down, step through the final values held: the
    next step is past them. Returns the last LR."""
    for _ in range(steps):
        step_once(sched, clock)
    sched._collect(wait=True)
    fake.down = True
    while sched.last_epoch < held_until(sched):
        step_once(sched, clock)
    return sched.get_last_lr()


def back_and_on_with_the_schedule(sched, fake, clock):
    fake.down = False
    step_until_caught_up(sched, clock)
    for _ in range(100):
        assert step_once(sched, clock) == expected_lrs([0.1], sched.last_epoch)[-1]


def test_held_values_carry_training_through_an_outage(make_scheduler, fake, clock):
    sched = make_scheduler(time_budget_s=100.0)
    for _ in range(300):
        step_once(sched, clock)
    sched._collect(wait=True)
    fake.down = True
    while sched.last_epoch < held_until(sched):  # no warning: nothing is lost yet
        assert step_once(sched, clock) == expected_lrs([0.1], sched.last_epoch)[-1]
    fake.down = False


def test_past_final_values_the_tail_carries_the_schedule_on_and_is_named_after(make_scheduler, fake, clock):
    sched = make_scheduler(run_id="t")  # defaults: a tail for 60 s of training
    down_at_the_end_of_the_final_values(sched, fake, clock, tail=300)
    first = sched.last_epoch + 1
    with pytest.warns(ServerAwayWarning, match="provisional") as record:
        rode = [step_once(sched, clock) for _ in range(300)]
    assert len(record) == 1
    assert rode == expected_lrs([0.1], sched.last_epoch)[first:]  # the schedule, not the last LR
    fake.down = False
    step_until_caught_up(sched, clock)
    sent = [{**(params or {}), **(body or {})} for _, _, params, body in fake.requests]
    named = [int(fields["provisional_from"]) for fields in sent if "provisional_from" in fields]
    assert named[0] == first  # the first request after the outage names the first step ridden
    assert named == sorted(named)  # a later one, steps taken while that one was on its way
    for _ in range(100):  # and on with the schedule
        assert step_once(sched, clock) == expected_lrs([0.1], sched.last_epoch)[-1]


def test_steps_taken_while_the_settling_answer_travels_are_not_named_again_once_final(
    make_scheduler, fake, clock
):
    sched = make_scheduler(run_id="t")
    down_at_the_end_of_the_final_values(sched, fake, clock, tail=20)
    with pytest.warns(ServerAwayWarning, match="provisional"):
        for _ in range(20):
            step_once(sched, clock)
    answer_may_go = threading.Event()

    def hold_the_settling_request(request):
        if b"provisional_from" in request.url.query or b"provisional_from" in request.content:
            answer_may_go.wait(CATCH_UP_S)

    fake.on_request = hold_the_settling_request
    fake.down = False
    deadline = time.monotonic() + CATCH_UP_S
    while not [r for r in fake.requests if "provisional_from" in r[2]] and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker's retry is on its way
    for _ in range(5):  # on the tail still, while the answer is held up
        step_once(sched, clock)
    answer_may_go.set()
    step_until_caught_up(sched, clock)
    for _ in range(100):
        assert step_once(sched, clock) == expected_lrs([0.1], sched.last_epoch)[-1]
    named = [r for r in fake.requests if "provisional_from" in r[2]]
    assert len(named) == 1  # the answer made those 5 steps final, with the values taken: settled
    assert sched._tail.ridden_from is None


def test_steps_taken_on_the_tail_before_an_action_placed_meanwhile_are_not_named_again(
    make_scheduler, fake, clock
):
    """The server committed a window the job never got (killed before answering), and an
    operator acted just after it: the job rides the tail through the steps before the
    action, the settling answer comes while the job is still before it, and its window
    disagrees with the tail only from the action on. The steps the job took meanwhile had
    the final values: nothing is left to name (naming them records a divergence that
    never was, once a later request reaches the action)."""
    sched = make_scheduler(run_id="t")
    down_at_the_end_of_the_final_values(sched, fake, clock, tail=100)
    run = fake.runs["t"]
    acted_at = sched.last_epoch + 40
    fake._commit(run, acted_at - 1)  # the window the job never got
    lrs, _ = next_lrs(run.values[-1], acted_at, None, run.best, fake.step_size, fake.gamma)
    run.values.append([lr * 0.5 for lr in lrs])  # the operator's action, placed on the first free step
    with pytest.warns(ServerAwayWarning, match="provisional"):
        for _ in range(10):
            step_once(sched, clock)
    settling, answer_may_go = threading.Event(), threading.Event()

    def hold_the_settling_request(request):
        if b"provisional_from" in request.url.query or b"provisional_from" in request.content:
            settling.set()
            answer_may_go.wait(CATCH_UP_S)

    fake.on_request = hold_the_settling_request
    fake.down = False
    assert settling.wait(CATCH_UP_S)  # the worker's retry is on its way
    for _ in range(5):  # on the tail still, before the action, while the answer is held up
        step_once(sched, clock)
    assert sched.last_epoch < acted_at
    answer_may_go.set()
    deadline = time.monotonic() + CATCH_UP_S
    while sched.state is ClientState.AWAY and time.monotonic() < deadline:
        step_once(sched, clock)
        time.sleep(0.01)
    assert sched.last_epoch < acted_at  # the answer came before the job reached the action
    windows = len(fake.requests)
    for _ in range(5000):  # past the action, on final values, until two windows more were asked
        assert step_once(sched, clock) == run.values[sched.last_epoch]
        sched._collect(wait=True)
        if len(fake.requests) >= windows + 2:
            break
    named = [r for r in fake.requests if "provisional_from" in r[2]]
    assert len(named) == 1, [r[2] for r in named]  # those 5 steps were final, with the values taken
    assert sched._tail.ridden_from is None


def test_the_tail_comes_in_requests_of_its_own_and_soon_covers_outage_ride_s(make_scheduler, fake, clock):
    fake.max_provisional = 100_000
    sched = make_scheduler(run_id="t")  # defaults: a tail for 60 s of training
    deadline = time.monotonic() + CATCH_UP_S
    wanted = None
    while time.monotonic() < deadline:  # 10 ms steps: 60 s is 6,000 steps
        clock.advance(0.01)
        sched.step()
        wanted = sched._tail.size_wanted(sched._policy.sizer.seconds_per_step)
        if sched._tail.end - held_until(sched) > wanted // 2:
            break
        time.sleep(0.001)  # the tail thread's turn
    assert wanted == 6000
    assert sched._tail.end - held_until(sched) > wanted // 2, (sched.last_epoch, sched._tail.end)
    assert sched.last_epoch < 200  # within a few windows (the sizer grows them to 1 s, 100 steps)
    assert sched._tail.lrs == expected_lrs([0.1], sched._tail.end - 1)[sched._tail.start:]
    # windows and reports ask for none: they never wait for its values to be computed and parsed
    assert not [params for _, _, params, _ in fake.requests if "provisional" in params]
    assert {params["ahead"] for _, _, params, _ in fake.tail_requests} == {"0"}  # of a final step


def test_a_step_past_the_tail_waits_for_the_server_and_takes_its_values(make_scheduler, fake, clock):
    # report_wait_s at its default (60 s); a short tail, quick to ride. Steps past the tail would
    # otherwise keep the last LR, and each rank of a job keeps its own (its tail ends where its
    # own requests left it): a two-rank job's ranks trained on different LRs (CI, a fast loop
    # through a kill -9 early in the job: one rank's tail ended at 1024, the other's at 2813)
    sched = make_scheduler(run_id="t", outage_ride_s=1.0)  # 1,024 steps of tail
    down_at_the_end_of_the_final_values(sched, fake, clock, tail=300)
    with pytest.warns(ServerAwayWarning, match="sent ahead"):
        while sched.last_epoch < sched._tail.end - 1:
            assert step_once(sched, clock) == expected_lrs([0.1], sched.last_epoch)[-1]
    threading.Timer(0.5, lambda: setattr(fake, "down", False)).start()
    with pytest.warns(ServerAwayWarning, match="past the provisional values held .* waits") as record:
        lrs = step_once(sched, clock)  # waits for the server: the schedule's value, as every rank's
    assert len(record) == 1
    assert lrs == expected_lrs([0.1], sched.last_epoch)[-1]
    assert sched.state is ClientState.ACTIVE
    for _ in range(100):
        assert step_once(sched, clock) == expected_lrs([0.1], sched.last_epoch)[-1]


def test_past_report_wait_s_the_last_lr_is_held_without_waiting_again(make_scheduler, fake, clock):
    sched = make_scheduler(outage_ride_s=0, report_wait_s=0.2)  # no tail asked for
    last = down_at_the_end_of_the_final_values_held(sched, fake, clock)
    waits = []
    wait_for_server = sched._wait_for_server
    sched._wait_for_server = lambda *args, **kw: waits.append(args[0]) or wait_for_server(*args, **kw)
    with pytest.warns(ServerAwayWarning) as record:
        held = [step_once(sched, clock) for _ in range(30)]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and "past the provisional values held (none)" in messages[0], messages
    assert "keeps the last learning rates" in messages[1], messages
    assert len(waits) == 1  # the first step past the values held waited; the rest of the outage holds
    assert held == [last] * 30
    back_and_on_with_the_schedule(sched, fake, clock)
    fake.down = True  # a second outage waits again
    while sched.last_epoch < held_until(sched):
        step_once(sched, clock)
    with pytest.warns(ServerAwayWarning):
        step_once(sched, clock)
    assert len(waits) == 2


def test_with_report_wait_s_0_past_the_tail_the_last_lr_is_held_with_one_warning(make_scheduler, fake, clock):
    sched = make_scheduler(outage_ride_s=0, report_wait_s=0)  # no tail asked for, no wait
    last = down_at_the_end_of_the_final_values_held(sched, fake, clock)
    with pytest.warns(ServerAwayWarning, match="keeps the last") as record:
        held = [step_once(sched, clock) for _ in range(30)]
    assert len(record) == 1
    assert held == [last] * 30
    back_and_on_with_the_schedule(sched, fake, clock)


def test_a_second_outage_warns_again(make_scheduler, fake, clock):
    # report_wait_s: its first step past the first window (no tail has come yet) waits that long
    sched = make_scheduler(report_wait_s=0.2)
    for _ in range(2):
        fake.down = True
        with pytest.warns(ServerAwayWarning):
            while sched.state is not ClientState.AWAY:
                step_once(sched, clock)
        fake.down = False
        step_until_caught_up(sched, clock)


def test_a_report_during_an_outage_waits_for_the_server_and_lands_on_its_step(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=PLATEAU, run_id="p", steps_per_epoch=5)  # report_wait_s: 60 s
    for k in range(1, 11):
        if k % 5:
            step_once(sched, clock)
        else:
            sched.step(2.0 - k / 10)
    fake.down = True
    for _ in range(4):
        step_once(sched, clock)
    threading.Timer(0.5, lambda: setattr(fake, "down", False)).start()
    with pytest.warns(ServerAwayWarning, match="waits") as record:
        sched.step(5.0)  # 15: worse, so the LR drops at 15, as without the outage
    assert len(record) == 1
    assert fake.runs["p"].reports[15] == {"val_loss": 5.0}
    assert sched.get_last_lr() == expected_lrs([0.1], 15, {5: 1.5, 10: 1.0, 15: 5.0})[15]


def test_report_past_report_wait_s_is_delivered_when_the_server_is_back(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=PLATEAU, run_id="p", steps_per_epoch=5, report_wait_s=0.2)
    reports = {}
    for k in range(1, 11):
        if k % 5:
            step_once(sched, clock)
        else:
            sched.step(1.0 / k)
            reports[k] = 1.0 / k
    fake.down = True
    for _ in range(4):  # 11..14 are held
        step_once(sched, clock)
    with pytest.warns(ServerAwayWarning):
        sched.step(0.5)  # 15: cannot be committed now
        for _ in range(4):
            step_once(sched, clock)
    fake.down = False
    reports[15] = 0.5
    deadline = time.monotonic() + CATCH_UP_S
    while 15 not in fake.runs["p"].reports and time.monotonic() < deadline:
        step_once(sched, clock)
        time.sleep(0.01)
    assert fake.runs["p"].reports[15] == {"val_loss": 0.5}
    assert fake.runs["p"].values[15] == expected_lrs([0.1], 15, reports)[15]


def test_strict_raises_and_the_same_step_can_be_retried(make_scheduler, fake, clock):
    sched = make_scheduler(strict=True)
    down_at_the_end_of_the_final_values_held(sched, fake, clock, steps=20)
    at = sched.last_epoch
    with pytest.raises(ServerUnreachable):
        sched.step()
    assert sched.last_epoch == at
    fake.down = False
    assert step_once(sched, clock) == expected_lrs([0.1], at + 1)[-1]
    assert sched.last_epoch == at + 1


def test_strict_report_raises_when_the_server_is_away(make_scheduler, fake, clock):
    sched = make_scheduler(schedule=PLATEAU, strict=True, steps_per_epoch=1)
    fake.down = True
    with pytest.raises(ServerUnreachable):
        sched.step(0.5)
    assert sched.last_epoch == 0
    fake.down = False


def test_timeouts_and_5xx_count_as_outage(make_scheduler, fake, clock):
    sched = make_scheduler()
    fake.fail = [503, httpx.ReadTimeout("slow"), 500]
    for k in range(1, 60):  # retried by the worker and the loop alike: no warning, no error
        assert step_once(sched, clock) == expected_lrs([0.1], k)[-1]


def test_logged_metrics_survive_an_outage_once_each(make_scheduler, fake, clock):
    sched = make_scheduler(run_id="m", flush_interval_s=0.01)
    sched._collect(wait=True)  # the window after step 0 is held: steps 1..9 need no server
    fake.down = True
    for k in range(1, 31):
        sched.log(loss=float(k))
        if k < 10:
            step_once(sched, clock)
    time.sleep(0.1)  # the sender tries and backs off meanwhile
    fake.down = False
    assert sched.flush(timeout=CATCH_UP_S)
    assert sorted(fake.runs["m"].metrics) == sorted(
        [("loss", k, 0) for k in range(1, 10)] + [("loss", 10, 0)]
    )
    assert fake.runs["m"].metrics[("loss", 10, 0)] == 30.0  # re-logged key: last value wins


def test_metrics_resent_after_a_lost_answer_keep_their_keys(make_scheduler, fake):
    sched = make_scheduler(run_id="m")
    sent = []

    def lose_first_answer(request, response):
        if request.url.path.endswith("/metrics"):
            sent.append(request.content)
            if len(sent) == 1:  # stored, but the answer never arrives
                raise httpx.ReadTimeout("answer lost", request=request)

    fake.after_request = lose_first_answer
    sched.log(loss=1.0, acc=0.5)
    assert sched.flush(timeout=CATCH_UP_S)
    assert len(sent) == 2 and sent[0] == sent[1]  # the same records: the server keeps one each
    assert fake.runs["m"].metrics == {("loss", 1, 0): 1.0, ("acc", 1, 0): 0.5}


def test_full_buffer_drops_oldest_with_a_warning(make_scheduler, fake):
    sched = make_scheduler(run_id="m", max_buffered_metrics=5)
    fake.down = True
    with pytest.warns(MetricsDroppedWarning, match="full") as record:
        for k in range(8):
            sched.log(step=k, loss=float(k))
    assert len(record) == 1
    assert sched._metrics.buffer.dropped == 3
    fake.down = False
    assert sched.flush(timeout=CATCH_UP_S)
    assert sorted(fake.runs["m"].metrics) == [("loss", k, 0) for k in range(3, 8)]


def test_close_during_an_outage_reports_what_was_not_sent(make_scheduler, fake):
    sched = make_scheduler(run_id="m")
    fake.down = True
    sched.log(loss=1.0)
    with pytest.warns(MetricsDroppedWarning, match="1 logged metric"):
        sched.close(timeout=0.2)
    fake.down = False


def test_metrics_the_server_refuses_are_reported(make_scheduler, fake):
    sched = make_scheduler(run_id="m")
    sched._collect(wait=True)  # the first prefetch is done: the next request is the batch
    fake.fail = [422]
    sched.log(loss=1.0)
    with pytest.warns(MetricsDroppedWarning, match="refused"):
        sched.flush(timeout=CATCH_UP_S)
    sched.log(loss=2.0)
    assert sched.flush(timeout=CATCH_UP_S)
