"""Drop-in parity against the real app, in process: torch's scheduler vs RemoteScheduler.

A small model is trained twice from the same seed on CPU, once with a torch scheduler
in process and once with ``RemoteScheduler`` served by ``create_app`` through Starlette's
``TestClient`` (an ``httpx.Client``). The final weights must be bit-identical.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lrserve.client import RemoteScheduler
from lrserve.service import create_app
from lrserve.service.settings import Settings
from starlette.testclient import TestClient

from tests.specs import plateau, warmup_then

STEPS = 120
STEPS_PER_EPOCH = 10


@pytest.fixture
def api(tmp_path):
    with TestClient(create_app(Settings(db=f"sqlite:///{tmp_path}/t.db"))) as client:
        yield client


def make_model(optimizer_name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    groups = [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 0.02},
    ]
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(groups, lr=0.01, betas=(0.9, 0.999))
    return model, opt


def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS + 1, 4, 8, generator=gen)
    y = torch.randn(STEPS + 1, 4, 1, generator=gen)
    val = (torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen))
    return x, y, val


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def val_loss(model, val, epoch):
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(model(val[0]), val[1]).item()
    return loss + (1.0 if epoch % 3 == 2 else 0.0)  # every third epoch looks worse: plateaus fire


def lrs_of(opt):
    return [g["lr"] for g in opt.param_groups]


def momentum_of(opt):
    return [g["betas"][0] if "betas" in g else g["momentum"] for g in opt.param_groups]


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


TIME_BASED = [
    pytest.param(
        {"type": "OneCycleLR", "max_lr": [0.1, 0.05], "total_steps": STEPS},
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.05], total_steps=STEPS),
        id="one-cycle",
    ),
    pytest.param(
        {
            "type": "SequentialLR",
            "milestones": [20],
            "schedulers": [
                {"type": "LinearLR", "start_factor": 0.01, "total_iters": 20},
                {"type": "CosineAnnealingLR", "T_max": STEPS - 20},
            ],
        },
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=20),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 20),
            ],
            milestones=[20],
        ),
        id="warmup-cosine",
    ),
]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize(("spec", "make_torch"), TIME_BASED)
def test_time_based_schedule_gives_bit_identical_weights(api, spec, make_torch, optimizer_name):
    x, y, _ = data()
    model, opt = make_model(optimizer_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own SequentialLR warns on step(0)
        sched = make_torch(opt)
        local = [(lrs_of(opt), momentum_of(opt))]
        for k in range(STEPS):
            train_step(model, opt, x[k], y[k])
            sched.step()
            local.append((lrs_of(opt), momentum_of(opt)))
    local_weights = weights(model)

    model, opt = make_model(optimizer_name)
    with RemoteScheduler(opt, spec, run_id=f"t-{optimizer_name}", http_client=api) as remote:
        served = [(lrs_of(opt), momentum_of(opt))]
        for k in range(STEPS):
            train_step(model, opt, x[k], y[k])
            remote.step()
            served.append((lrs_of(opt), momentum_of(opt)))
        assert remote.get_last_lr() == local[-1][0]
    assert served == local
    assert all(torch.equal(a, b) for a, b in zip(weights(model), local_weights, strict=True))


PLATEAU_SPEC = warmup_then(plateau(), steps=25)


def train_with_plateau(model, opt, step):
    """The loop both runs share: a metric with the last step of each epoch."""
    x, y, val = data()
    trajectory = [lrs_of(opt)]
    for k in range(1, STEPS + 1):
        train_step(model, opt, x[k - 1], y[k - 1])
        if k % STEPS_PER_EPOCH == 0:
            step(k, val_loss(model, val, k // STEPS_PER_EPOCH))
        else:
            step(k, None)
        trajectory.append(lrs_of(opt))
    return trajectory


def torch_plateau_spec_by_hand(opt):
    """``PLATEAU_SPEC`` in torch, by hand: ``step(k, metric)`` for the loop above.

    LinearLR warms up; at the milestone the LRs restart at their base values and a
    ReduceLROnPlateau takes over; it hears the metric sent with step k only if it was
    already in charge at step k-1 (the training it describes ran under it).
    """
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=25)
    plateau = {}

    def local_step(k, metric):
        if k < 25:
            warmup.step()
        elif k == 25:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"]
            plateau["s"] = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
        elif metric is not None:
            plateau["s"].step(metric)

    return local_step


def test_warmup_then_plateau_gives_bit_identical_weights(api):
    model, opt = make_model("sgd")
    local = train_with_plateau(model, opt, torch_plateau_spec_by_hand(opt))
    local_weights = weights(model)
    assert len({tuple(lrs) for lrs in local[26:]}) > 2  # the plateau did lower the LRs

    model, opt = make_model("sgd")
    with RemoteScheduler(
        opt, PLATEAU_SPEC, run_id="plateau", steps_per_epoch=STEPS_PER_EPOCH, http_client=api
    ) as remote:
        served = train_with_plateau(model, opt, lambda k, metric: remote.step(metric))
    assert served == local
    assert all(torch.equal(a, b) for a, b in zip(weights(model), local_weights, strict=True))


def test_plateau_cadence_learned_without_steps_per_epoch(api):
    model, opt = make_model("sgd")
    with RemoteScheduler(opt, PLATEAU_SPEC, run_id="learned", http_client=api) as remote:
        learned = train_with_plateau(model, opt, lambda k, metric: remote.step(metric))
    model, opt = make_model("sgd")
    with RemoteScheduler(
        opt, PLATEAU_SPEC, run_id="given", steps_per_epoch=STEPS_PER_EPOCH, http_client=api
    ) as remote:
        given = train_with_plateau(model, opt, lambda k, metric: remote.step(metric))
    assert learned == given


def test_resume_from_a_checkpoint_replays_identical_values(api):
    spec = TIME_BASED[1].values[0]
    model, opt = make_model("sgd")
    with RemoteScheduler(opt, spec, run_id="resume", http_client=api) as first:
        straight = [lrs_of(opt)]
        for _ in range(STEPS):
            first.step()
            straight.append(lrs_of(opt))
    model, opt = make_model("sgd")
    with RemoteScheduler(opt, spec, run_id="resume2", http_client=api) as before:
        for _ in range(47):
            before.step()
        state = before.state_dict()
    model, opt = make_model("sgd")
    with RemoteScheduler(opt, spec, run_id="resume2", http_client=api) as after:
        after.load_state_dict(state)
        resumed = [lrs_of(opt)]
        for _ in range(STEPS - 47):
            after.step()
            resumed.append(lrs_of(opt))
    assert resumed == straight[47:]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_resume_of_a_momentum_cycling_schedule_with_the_optimizers_state_loaded_first(api, optimizer_name):
    """torch's resume order "optimizer.load_state_dict, then build the scheduler, then its
    load_state_dict": the optimizer's momentum is the cycled one by then. It was sent as the
    run's base momentum and the create was a 409 (another spec); the one noted at the first
    create (``initial_momentum``) is sent, and the values go on as torch's do."""
    spec = {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 40}
    values = {}
    for name in ("torch", "lrserve"):
        torch.manual_seed(0)
        model, opt = make_model(optimizer_name)
        first = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=40) if name == "torch"
                 else RemoteScheduler(opt, spec, run_id=f"cycled-{optimizer_name}", http_client=api))
        for _ in range(5):
            opt.step()
            first.step()
        checkpoint = {"opt": opt.state_dict(), "sched": first.state_dict()}
        if name == "lrserve":
            first.close()
        torch.manual_seed(0)
        model, opt = make_model(optimizer_name)
        opt.load_state_dict(checkpoint["opt"])  # the momentum is the cycled one now
        again = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=40) if name == "torch"
                 else RemoteScheduler(opt, spec, run_id=f"cycled-{optimizer_name}", http_client=api))
        again.load_state_dict(checkpoint["sched"])
        seen = []
        for _ in range(10):
            opt.step()
            again.step()
            seen.append([(g["lr"], g.get("momentum", g.get("betas", (None,))[0])) for g in opt.param_groups])
        values[name] = seen
        if name == "lrserve":
            again.close()
    assert values["lrserve"] == values["torch"]


def test_operator_stop_reaches_the_job(api):
    model, opt = make_model("sgd")
    with RemoteScheduler(
        opt,
        {"type": "ConstantLR", "factor": 0.5, "total_iters": 5},
        run_id="stop",
        http_client=api,
        time_budget_s=0.05,
    ) as remote:
        api.post("/v1/runs/stop/control", json={"action": "stop"}).raise_for_status()
        for _ in range(20_000):
            remote.step()
            if remote.should_stop:
                break
        assert remote.should_stop


def test_logged_metrics_reach_history_once(api):
    model, opt = make_model("sgd")
    with RemoteScheduler(opt, {"type": "StepLR", "step_size": 10}, run_id="hist", http_client=api) as remote:
        for k in range(30):
            remote.log(train_loss=1.0 / (k + 1))
            remote.step()
        remote.log(train_loss=0.5, step=5)  # re-logged: the server keeps one record per key
    history = api.get("/v1/runs/hist/history", params={"max_points": 1000}).json()
    assert history["metrics"]["train_loss"]["steps"] == list(range(1, 31))


def test_bad_spec_and_conflict_are_clear(api):
    from lrserve.client import InvalidSchedule, RunConflict

    model, opt = make_model("sgd")
    with pytest.raises(InvalidSchedule) as info:
        RemoteScheduler(opt, {"type": "MultiStepLR", "milestones": [5, 3]}, http_client=api)
    assert any("milestones" in e["field"] for e in info.value.errors)
    RemoteScheduler(opt, {"type": "StepLR", "step_size": 3}, run_id="c", http_client=api).close()
    with pytest.raises(RunConflict):
        RemoteScheduler(opt, {"type": "StepLR", "step_size": 4}, run_id="c", http_client=api)


def test_ranks_apply_identical_values_and_decide_on_the_mean(api):
    import threading

    spec = plateau()
    local_metrics = {0: [1.0, 0.9, 1.2, 0.8, 0.8, 0.7], 1: [1.0, 1.1, 0.6, 1.0, 0.9, 0.9]}
    seen: dict[int, list[list[float]]] = {}
    errors = []

    def rank_job(rank):
        try:
            opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
            with RemoteScheduler(
                opt, spec, run_id="ddp", rank=rank, world_size=2, steps_per_epoch=5, http_client=api
            ) as sched:
                trajectory = [sched.get_last_lr()]
                for value in local_metrics[rank]:
                    for i in range(5):
                        sched.step(value) if i == 4 else sched.step()
                        trajectory.append(sched.get_last_lr())
                seen[rank] = trajectory
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=rank_job, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert seen[0] == seen[1]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    expected = [[0.1]]
    for epoch in range(6):
        for i in range(5):
            if i == 4:
                torch_plateau.step((local_metrics[0][epoch] + local_metrics[1][epoch]) / 2)
            expected.append([opt.param_groups[0]["lr"]])
    assert seen[0] == expected
