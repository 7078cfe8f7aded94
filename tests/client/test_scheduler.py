"""RemoteScheduler against the in-memory fake server: the torch surface and the hot path."""

from __future__ import annotations

import pytest
from lrserve.client import (
    AuthenticationError,
    ClientClosed,
    ClientState,
    InvalidSchedule,
    LRClient,
    PermissionDenied,
    RemoteScheduler,
    RunConflict,
    RunNotFound,
    ScheduleError,
)

from tests.client.conftest import PLATEAU, STEP_LR
from tests.client.fake_server import FakeServer, Optimizer, expected_lrs


def run_steps(sched, clock, n, seconds_per_step=0.001):
    seen = []
    for _ in range(n):
        clock.advance(seconds_per_step)
        sched.step()
        seen.append(sched.get_last_lr())
    return seen


# -- creating and joining ----------------------------------------------------------------------


def test_create_sends_base_lrs_from_initial_lr_and_momentum(make_scheduler, fake):
    opt = Optimizer({"lr": 0.1, "momentum": 0.9}, {"lr": 0.5, "initial_lr": 0.02, "momentum": 0.8})
    sched = make_scheduler(opt, run_id="r1", labels={"sweep": "7"})
    method, path, _, body = fake.requests[0]
    assert (method, path) == ("POST", "/v1/runs")
    assert body == {
        "schedule": STEP_LR,
        "base_lrs": [0.1, 0.02],
        "base_momentums": [0.9, 0.8],
        "run_id": "r1",
        "labels": {"sweep": "7"},
        "world_size": 1,
    }
    assert sched.run_id == "r1"
    assert sched.base_lrs == [0.1, 0.02]
    assert opt.param_groups[0]["initial_lr"] == 0.1  # set as torch sets it


def test_create_takes_beta1_as_momentum(make_scheduler, fake):
    make_scheduler(Optimizer({"lr": 0.1, "betas": (0.95, 0.999)}))
    assert fake.requests[0][3]["base_momentums"] == [0.95]


def test_create_omits_momentums_when_groups_have_none(make_scheduler, fake):
    make_scheduler(Optimizer({"lr": 0.1}))
    assert "base_momentums" not in fake.requests[0][3]


def test_rank_and_world_size_come_from_the_environment(make_scheduler, fake, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    sched = make_scheduler()
    assert (sched.rank, sched.world_size) == (3, 4)
    assert fake.requests[0][3]["world_size"] == 4


def test_step_zero_values_are_written_at_creation(make_scheduler):
    opt = Optimizer({"lr": 0.1})
    sched = make_scheduler(opt)
    assert sched.last_epoch == 0
    assert sched.get_last_lr() == [0.1]
    assert opt.param_groups[0]["lr"] == 0.1


def test_joining_a_run_past_step_zero_fetches_step_zero(make_scheduler, fake, clock):
    first = make_scheduler(run_id="shared")
    run_steps(first, clock, 25)
    second = make_scheduler(Optimizer({"lr": 0.1}), run_id="shared")
    assert ("GET", "/v1/runs/shared/lr") in [(m, p) for m, p, _, _ in fake.requests[-3:]]
    assert second.get_last_lr() == [0.1]
    assert run_steps(second, clock, 25) == run_steps_expected(25)


def run_steps_expected(n, base=0.1):
    return expected_lrs([base], n)[1:]


def test_bad_spec_raises_invalid_schedule_naming_the_field(make_scheduler):
    with pytest.raises(InvalidSchedule) as info:
        make_scheduler(schedule={"type": "Bogus"})
    assert info.value.errors == [{"field": "schedule.type", "message": "schedule.type: unknown"}]
    assert isinstance(info.value, ValueError)


def test_same_run_id_with_another_spec_raises_run_conflict(make_scheduler):
    make_scheduler(run_id="r")
    with pytest.raises(RunConflict):
        make_scheduler(schedule={"type": "StepLR", "step_size": 3}, run_id="r")


@pytest.mark.parametrize(
    ("status", "error"),
    [pytest.param(401, AuthenticationError, id="401"), pytest.param(403, PermissionDenied, id="403")],
)
def test_auth_errors_at_creation_raise(make_scheduler, fake, status, error):
    fake.fail = [status]
    with pytest.raises(error):
        make_scheduler()


def test_optimizer_without_param_groups_is_refused(make_scheduler):
    with pytest.raises(TypeError, match="param_groups"):
        make_scheduler(object())


def test_group_count_mismatch_with_the_run_is_refused(make_scheduler):
    make_scheduler(Optimizer({"lr": 0.1}, {"lr": 0.2}), run_id="two")
    with pytest.raises(RunConflict, match="param groups"):
        make_scheduler(Optimizer({"lr": 0.1}), run_id="two", schedule=STEP_LR)


# -- the hot path ------------------------------------------------------------------------------


def test_values_follow_the_server_schedule(make_scheduler, clock):
    opt = Optimizer({"lr": 0.1}, {"lr": 0.01})
    sched = make_scheduler(opt)
    for k, want in enumerate(expected_lrs([0.1, 0.01], 300)[1:], start=1):
        clock.advance(0.001)
        sched.step()
        assert sched.last_epoch == k
        assert sched.get_last_lr() == want
        assert [g["lr"] for g in opt.param_groups] == want


def test_most_steps_do_no_io(make_scheduler, fake, clock):
    sched = make_scheduler(time_budget_s=1.0)
    run_steps(sched, clock, 5000, seconds_per_step=0.001)
    fetches = fake.paths("GET")
    assert len(fetches) <= 12, fetches
    assert sched.get_last_lr() == expected_lrs([0.1], 5000)[-1]


def test_windows_are_sized_to_the_time_budget(make_scheduler, fake, clock):
    sched = make_scheduler(time_budget_s=0.5)
    run_steps(sched, clock, 2000, seconds_per_step=0.01)  # 50 steps fill the budget
    aheads = [int(q["ahead"]) for m, _, q, _ in fake.requests if m == "GET"]
    assert aheads[0] == 16
    assert max(aheads) <= 49  # windows of 50 steps: the first and 49 ahead
    assert aheads[-1] == 49


def test_windows_never_exceed_the_cap(make_scheduler, fake, clock):
    sched = make_scheduler(time_budget_s=1000.0)
    run_steps(sched, clock, 30_000, seconds_per_step=1e-6)
    aheads = [int(q["ahead"]) for m, _, q, _ in fake.requests if m == "GET"]
    assert max(aheads) == 10_000


def test_tensor_lr_is_filled_in_place(make_scheduler, clock):
    import torch
    lr = torch.tensor(0.1, dtype=torch.float64)
    opt = Optimizer({"lr": lr})
    sched = make_scheduler(opt)
    run_steps(sched, clock, 25)
    assert opt.param_groups[0]["lr"] is lr
    assert lr.item() == expected_lrs([0.1], 25)[-1][0]
    assert sched.get_last_lr() == [lr.item()]


def test_momentums_are_written_to_momentum_or_betas(http, clock):
    fake = FakeServer(cycle_momentum=True)
    from lrserve.client import RemoteScheduler

    with fake.client() as client:
        opt = Optimizer({"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "betas": (0.9, 0.999)})
        with RemoteScheduler(opt, STEP_LR, http_client=client, clock=clock) as sched:
            run_steps(sched, clock, 12)
    want = 0.9 - 0.001 * 12
    assert opt.param_groups[0]["momentum"] == want
    assert opt.param_groups[1]["betas"] == (want, 0.999)


def test_should_stop_follows_the_run_status(make_scheduler, fake, clock):
    sched = make_scheduler(run_id="s")
    assert not sched.should_stop
    fake.runs["s"].status = "stopped"
    run_steps(sched, clock, 100)
    assert sched.should_stop
    assert sched.status == "stopped"


def test_step_with_epoch_is_refused(make_scheduler):
    sched = make_scheduler()
    with pytest.raises(TypeError, match="epoch"):
        sched.step(None, 3)


def test_end_of_schedule_raises_schedule_error_only_when_reached(make_scheduler, fake, clock):
    fake.end_at = 40  # steps 0..39 exist, as OneCycleLR's total_steps bounds it
    sched = make_scheduler(time_budget_s=100.0)
    run_steps(sched, clock, 39)
    assert sched.get_last_lr() == expected_lrs([0.1], 39)[-1]
    with pytest.raises(ScheduleError) as info:
        sched.step()
    assert isinstance(info.value, ValueError)  # as torch's own ValueError


def test_run_deleted_on_the_server_raises(make_scheduler, fake, clock):
    sched = make_scheduler(run_id="gone")
    del fake.runs["gone"]
    with pytest.raises(RunNotFound):
        run_steps(sched, clock, 200)


def test_auth_error_while_stepping_raises_even_when_not_strict(make_scheduler, fake, clock):
    sched = make_scheduler()
    fake.fail = [401] * 50
    with pytest.raises(AuthenticationError):
        run_steps(sched, clock, 200)
    fake.fail = []


# -- checkpoints -------------------------------------------------------------------------------


def test_resume_from_state_dict_applies_identical_values(make_scheduler, clock):
    sched = make_scheduler(run_id="ckpt")
    run_steps(sched, clock, 37)
    state = sched.state_dict()
    sched.close()
    assert state["last_epoch"] == 37 and state["run_id"] == "ckpt"

    opt = Optimizer({"lr": 0.1})
    resumed = make_scheduler(opt, run_id="ckpt")
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 37
    assert opt.param_groups[0]["lr"] == expected_lrs([0.1], 37)[-1][0]
    assert run_steps(resumed, clock, 50) == expected_lrs([0.1], 87)[38:]


def test_resume_adopts_the_run_of_the_checkpoint_when_none_was_named(make_scheduler, clock):
    sched = make_scheduler(run_id="origin")
    run_steps(sched, clock, 12)
    resumed = make_scheduler()
    resumed.load_state_dict(sched.state_dict())
    assert resumed.run_id == "origin"
    assert resumed.get_last_lr() == expected_lrs([0.1], 12)[-1]


def test_resume_into_a_differently_named_run_is_refused(make_scheduler, clock):
    sched = make_scheduler(run_id="a")
    other = make_scheduler(run_id="b")
    with pytest.raises(ValueError, match="run 'a'"):
        other.load_state_dict(sched.state_dict())


def test_state_dict_is_plain_data(make_scheduler, clock):
    import json

    sched = make_scheduler(PLATEAU and Optimizer({"lr": 0.1}), run_id="p")
    run_steps(sched, clock, 3)
    assert json.loads(json.dumps(sched.state_dict())) == sched.state_dict()


# -- closing -----------------------------------------------------------------------------------


def test_closed_scheduler_refuses_steps_and_logs_but_still_reports(make_scheduler, clock):
    sched = make_scheduler()
    run_steps(sched, clock, 3)
    sched.close()
    sched.close()  # idempotent
    with pytest.raises(ClientClosed):
        sched.step()
    with pytest.raises(ClientClosed):
        sched.log(loss=1.0)
    with pytest.raises(RuntimeError):  # the misuse branch is a RuntimeError
        sched.load_state_dict({})
    assert sched.get_last_lr() == expected_lrs([0.1], 3)[-1]
    assert sched.state_dict()["last_epoch"] == 3


def test_context_manager_closes(make_scheduler):
    with make_scheduler() as sched:
        sched.step()
    with pytest.raises(ClientClosed):
        sched.step()
    with pytest.raises(ClientClosed):
        sched.__enter__()


def test_injected_http_client_is_left_open(make_scheduler, http):
    make_scheduler().close()
    assert not http.is_closed


def test_the_state_says_active_then_closed(make_scheduler):
    sched = make_scheduler()
    assert sched.state is ClientState.ACTIVE
    sched.close()
    assert sched.state is ClientState.CLOSED


def test_an_injected_lrclient_carries_every_request_and_is_left_open(http, clock, fake):
    with LRClient(http_client=http, max_retries=0, sleep=lambda s: None) as api:
        opt = Optimizer({"lr": 0.1})
        with RemoteScheduler(opt, STEP_LR, run_id="shared", client=api, clock=clock) as sched:
            seen = run_steps(sched, clock, 25)
            assert sched.run_id == "shared"
        assert not api.is_closed  # its owner closes it
        assert api.read_run("shared")["run_id"] == "shared"  # and may go on using it
    assert seen == expected_lrs([0.1], 25)[1:]
    assert [r[:2] for r in fake.requests[:1]] == [("POST", "/v1/runs")]


@pytest.mark.parametrize("setting", [{"url": "http://x"}, {"token": "t"}, {"max_retries": 1},
                                     {"timeout": 3.0}, {"sleep": lambda s: None}])
def test_an_injected_lrclient_with_settings_for_another_is_refused(http, fake, setting):
    with LRClient(http_client=http) as api:
        with pytest.raises(TypeError, match=f"client=.*{next(iter(setting))}"):
            RemoteScheduler(Optimizer({"lr": 0.1}), STEP_LR, client=api, **setting)
    assert fake.requests == []  # refused before any run was made


def test_slow_fetches_are_started_earlier(make_scheduler, fake, clock):
    def slow(request):
        if request.url.path.endswith("/lr"):
            clock.advance(0.2)

    fake.on_request = slow
    sched = make_scheduler(time_budget_s=100.0)
    run_steps(sched, clock, 3000, seconds_per_step=0.001)
    # At least the server's 0.2 s. The job keeps stepping while a prefetch is out, and on this
    # one fake clock its steps add to the fetch's time (in real time they would overlap it);
    # how many land inside depends on thread scheduling, so only the lower bound is exact.
    assert sched._fetcher.seconds >= 0.2 - 1e-9
    per_step = sched._policy.sizer.seconds_per_step
    assert sched._policy.margin(sched._cache.last_window, sched._fetcher.seconds) >= int(2 * 0.2 / per_step)


def test_is_a_torch_lr_scheduler_when_torch_is_loaded(make_scheduler):
    import torch
    from lrserve.client import RemoteScheduler

    sched = make_scheduler()
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)  # what Lightning checks
    assert isinstance(sched, RemoteScheduler)
    assert type(sched).__name__ == "RemoteScheduler"
    assert sched.get_lr() == sched.get_last_lr()


def test_values_reach_param_groups_replaced_by_optimizer_load_state_dict(make_scheduler, clock):
    import torch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = make_scheduler(opt)
    opt.load_state_dict(opt.state_dict())  # new group dicts, as accelerate's prepare() does
    run_steps(sched, clock, 25)
    assert opt.param_groups[0]["lr"] == expected_lrs([0.1], 25)[-1][0]
