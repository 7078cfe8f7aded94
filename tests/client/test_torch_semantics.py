"""``RemoteScheduler`` side by side with torch's own schedulers, in process, on a real server.

Each test does what a torch user does, once with ``torch.optim.lr_scheduler`` and once with
``RemoteScheduler``, and compares the values exactly (float64): where lrserve gives torch's
values it gives them bit for bit; where it cannot (README, "What differs from torch"), it
raises a clear error instead of training on other values.
"""

from __future__ import annotations

import re

import pytest
import torch
from lrserve.client import RemoteScheduler
from torch.optim import lr_scheduler as L

from tests.live_server import ServerProcess
from tests.specs import plateau


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torch-semantics")
    with ServerProcess(f"sqlite:///{tmp}/semantics.db", tmp) as proc:
        yield proc


@pytest.fixture
def remote(server, request):
    made = []

    def make(opt, spec, **kwargs):
        run_id = f"{re.sub('[^A-Za-z0-9._-]', '_', request.node.name)}-{len(made)}"[-120:]
        sched = RemoteScheduler(opt, spec, run_id=run_id, url=server.url, **kwargs)
        made.append(sched)
        return sched

    yield make
    for sched in made:
        sched.close()


def sgd(lr=0.1, momentum=0.0):
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=momentum)


def run(opt, sched, steps, momentum=False):
    """get_last_lr() (and the momentum) of steps 0..steps, in torch's call pattern."""
    out = [(list(sched.get_last_lr()), opt.param_groups[0].get("momentum") if momentum else None)]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append((list(sched.get_last_lr()), opt.param_groups[0].get("momentum") if momentum else None))
    return out


# -- step(epoch) --------------------------------------------------------------------------

def test_step_with_an_int_on_a_time_based_schedule_is_refused_not_misread(remote):
    opt = sgd()
    torch_sched = L.StepLR(sgd(), step_size=2, gamma=0.1)
    with pytest.warns(UserWarning):  # torch: the deprecated jump to epoch 5
        torch_sched.step(5)
    sched = remote(opt, {"type": "StepLR", "step_size": 2, "gamma": 0.1})
    with pytest.raises(TypeError, match=r"step\(5\).*deprecated step\(epoch\)"):
        sched.step(5)
    assert sched.last_epoch == 0 and sched.get_last_lr() == [0.1]


def test_step_with_a_float_on_a_time_based_schedule_is_refused_not_misread(remote):
    # torch documents fractional epochs for CosineAnnealingWarmRestarts: step(epoch + i / iters)
    torch_sched = L.CosineAnnealingWarmRestarts(sgd(), T_0=10)
    torch_sched.step(0.5)
    assert torch_sched.get_last_lr() != [0.1]  # torch jumped to epoch 0.5 (no deprecation here)
    sched = remote(sgd(), {"type": "CosineAnnealingWarmRestarts", "T_0": 10})
    with pytest.raises(TypeError, match=r"step\(0\.5\).*deprecated step\(epoch\)"):
        sched.step(0.5)
    assert sched.last_epoch == 0 and sched.get_last_lr() == [0.1]


def test_step_with_a_number_on_a_plateau_schedule_is_the_metric_as_in_torch(remote):
    opt_t, opt_r = sgd(), sgd()
    torch_sched = L.ReduceLROnPlateau(opt_t, factor=0.5, patience=0)
    sched = remote(opt_r, plateau(), steps_per_epoch=1)
    for metric in (5, 4, 4, 7, 3, 3):
        torch_sched.step(metric)
        sched.step(metric)
        assert opt_r.param_groups[0]["lr"] == opt_t.param_groups[0]["lr"]


# -- cycle_momentum -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 10},
    {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1},
], ids=["OneCycleLR", "CyclicLR"])
def test_cycle_momentum_on_an_optimizer_without_momentum_is_torchs_value_error(remote, spec):
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    with pytest.raises(ValueError, match="must support momentum") as torch_error:
        getattr(L, spec["type"])(torch.optim.Rprop([torch.zeros(1, requires_grad=True)], lr=0.1), **kwargs)
    opt = torch.optim.Rprop([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="must support momentum") as ours:
        remote(opt, spec)
    assert str(torch_error.value) in str(ours.value)
    assert "momentum" not in opt.param_groups[0]


def test_without_cycle_momentum_an_optimizer_without_momentum_gets_torchs_values(remote):
    spec = {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 30, "cycle_momentum": False}
    opt_t = torch.optim.Rprop([torch.zeros(1, requires_grad=True)], lr=0.1)
    opt_r = torch.optim.Rprop([torch.zeros(1, requires_grad=True)], lr=0.1)
    expected = run(opt_t, L.OneCycleLR(opt_t, max_lr=0.1, total_steps=30, cycle_momentum=False), 29)
    assert run(opt_r, remote(opt_r, spec), 29) == expected


# -- momentum above 1 -----------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "make"), [
    ({"type": "CyclicLR", "base_lr": 1.0, "max_lr": 5.0, "step_size_up": 4, "base_momentum": 1.0,
      "max_momentum": 5.0},
     lambda opt: L.CyclicLR(opt, 1.0, 5.0, step_size_up=4, base_momentum=1.0, max_momentum=5.0)),
    ({"type": "OneCycleLR", "max_lr": 25.0, "total_steps": 10, "base_momentum": 1.0, "max_momentum": 22.0},
     lambda opt: L.OneCycleLR(opt, 25.0, total_steps=10, base_momentum=1.0, max_momentum=22.0)),
], ids=["CyclicLR", "OneCycleLR"])
def test_momentums_above_one_are_accepted_as_torch_does(remote, spec, make):
    opt_t, opt_r = sgd(momentum=0.9), sgd(momentum=0.9)
    expected = run(opt_t, make(opt_t), 9, momentum=True)
    assert run(opt_r, remote(opt_r, spec), 9, momentum=True) == expected
    assert max(m for _, m in expected) > 1


# -- constructor arguments as attributes, .schedule -----------------------------------------

@pytest.mark.parametrize(("spec", "make", "names"), [
    ({"type": "StepLR", "step_size": 3, "gamma": 0.5}, lambda o: L.StepLR(o, 3, 0.5), ["step_size", "gamma"]),
    ({"type": "CosineAnnealingLR", "T_max": 50, "eta_min": 0.001},
     lambda o: L.CosineAnnealingLR(o, 50, 0.001), ["T_max", "eta_min"]),
    ({"type": "ExponentialLR", "gamma": 0.9}, lambda o: L.ExponentialLR(o, 0.9), ["gamma"]),
    ({"type": "MultiStepLR", "milestones": [3, 7]}, lambda o: L.MultiStepLR(o, [3, 7]), ["gamma"]),
    ({"type": "LinearLR", "total_iters": 4}, lambda o: L.LinearLR(o, total_iters=4),
     ["start_factor", "end_factor", "total_iters"]),
], ids=["StepLR", "Cosine", "Exponential", "MultiStep", "Linear"])
def test_constructor_arguments_read_as_attributes_as_torchs(remote, spec, make, names):
    torch_sched = make(sgd())
    sched = remote(sgd(), spec)
    assert {n: getattr(sched, n) for n in names} == {n: getattr(torch_sched, n) for n in names}
    with pytest.raises(AttributeError):
        sched.no_such_argument  # noqa: B018


def test_schedule_after_load_state_dict_is_the_loaded_runs(remote, server):
    first = remote(sgd(), {"type": "StepLR", "step_size": 2, "gamma": 0.1})
    checkpoint = first.state_dict()
    # made without run_id, so it may load any run's checkpoint
    with RemoteScheduler(sgd(), {"type": "ExponentialLR", "gamma": 0.9}, url=server.url) as other:
        other.load_state_dict(checkpoint)
        assert other.schedule == {"type": "StepLR", "step_size": 2, "gamma": 0.1}
        assert other.run_id == first.run_id and other.step_size == 2 and other.gamma == 0.1


# -- two schedulers on one optimizer --------------------------------------------------------

def test_two_schedulers_on_one_optimizer_torch_composes_them_chained_spec_does_too(remote):
    opt_t = sgd()
    a, b = L.StepLR(opt_t, 2, 0.1), L.ExponentialLR(opt_t, 0.9)
    expected = [[0.1]]
    for _ in range(6):
        opt_t.step()
        a.step()
        b.step()
        expected.append(list(b.get_last_lr()))
    assert expected[1:3] == [[0.09000000000000001], [0.008100000000000001]]  # 0.09, 0.0081: composed
    opt_r = sgd()
    sched = remote(opt_r, {"type": "ChainedScheduler", "schedulers": [
        {"type": "StepLR", "step_size": 2, "gamma": 0.1}, {"type": "ExponentialLR", "gamma": 0.9}]})
    assert [lrs for lrs, _ in run(opt_r, sched, 6)] == expected
    with pytest.raises(ValueError, match="another RemoteScheduler.*ChainedScheduler"):
        remote(opt_r, {"type": "ExponentialLR", "gamma": 0.9})  # two RemoteSchedulers: refused


def test_a_second_scheduler_on_an_optimizer_replaces_the_first_as_a_notebook_cell_run_again(remote):
    spec, make = {"type": "StepLR", "step_size": 2, "gamma": 0.1}, lambda o: L.StepLR(o, 2, 0.1)
    opt_t = sgd()
    make(opt_t)  # the cell's first run: built, never stepped again
    expected = run(opt_t, make(opt_t), 6)
    opt_r = sgd()
    first = remote(opt_r, spec)
    assert [lrs for lrs, _ in run(opt_r, remote(opt_r, spec), 6)] == [lrs for lrs, _ in expected]
    with pytest.raises(ValueError, match="another scheduler was built on this optimizer after this one"):
        first.step()  # torch would compose the two: refused, not run on other values
    assert first.last_epoch == 0


def test_a_scheduler_on_an_optimizer_whose_lrs_another_one_moved_is_refused(remote):
    opt = sgd()
    sched = remote(opt, {"type": "StepLR", "step_size": 2, "gamma": 0.5})
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.05  # a torch scheduler built now would start from it
    with pytest.raises(ValueError, match="moved this optimizer's LRs from their initial_lr"):
        remote(opt, {"type": "ExponentialLR", "gamma": 0.9})
    opt.step()
    sched.step()  # the first one goes on
    assert sched.get_last_lr() == [0.05]


def test_a_torch_scheduler_on_the_same_optimizer_is_refused(remote):
    opt = sgd()
    sched = remote(opt, {"type": "StepLR", "step_size": 2, "gamma": 0.1})
    L.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 5))  # a hand-written warm-up on top
    with pytest.raises(ValueError, match="torch.optim.lr_scheduler scheduler was built on this optimizer"):
        for _ in range(20_000):  # refused when the scheduler next asks the server, within a window
            opt.step()
            sched.step()


def test_a_scheduler_on_an_optimizer_a_torch_scheduler_drove_is_refused(remote):
    opt = sgd()
    torch_sched = L.StepLR(opt, 2, 0.5)
    for _ in range(6):
        opt.step()
        torch_sched.step()
    assert opt.param_groups[0]["lr"] == 0.0125
    continued = L.ExponentialLR(opt, 0.9)  # torch: continues from the current LR
    opt.step()
    continued.step()
    assert continued.get_last_lr() == [0.0125 * 0.9]
    with pytest.raises(ValueError, match="continue from the LR it left"):
        remote(opt, {"type": "ExponentialLR", "gamma": 0.9})


def test_the_same_continuation_as_one_sequential_spec_gives_torchs_values(remote):
    opt_t = sgd()
    first, second = L.StepLR(opt_t, 2, 0.5), None
    expected = [[0.1]]
    for k in range(1, 11):
        opt_t.step()
        if k <= 6:
            first.step()
            if k == 6:
                second = L.ExponentialLR(opt_t, 0.9)
        else:
            second.step()
        expected.append([opt_t.param_groups[0]["lr"]])
    # torch's SequentialLR hands over the same way: the second continues from the LR it gets
    opt_s = sgd()
    seq = L.SequentialLR(opt_s, [L.StepLR(opt_s, 2, 0.5), L.ExponentialLR(opt_s, 0.9)], milestones=[6])
    torch_seq = [lrs for lrs, _ in run(opt_s, seq, 10)]
    opt_r = sgd()
    sched = remote(opt_r, {"type": "SequentialLR", "milestones": [6], "schedulers": [
        {"type": "StepLR", "step_size": 2, "gamma": 0.5}, {"type": "ExponentialLR", "gamma": 0.9}]})
    assert [lrs for lrs, _ in run(opt_r, sched, 10)] == torch_seq


# -- add_param_group ------------------------------------------------------------------------

def test_add_param_group_mid_run_is_a_clear_error_at_the_next_step(remote):
    opt = sgd()
    sched = remote(opt, {"type": "StepLR", "step_size": 2, "gamma": 0.1})
    for _ in range(3):
        opt.step()
        sched.step()
    opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5})
    with pytest.raises(ValueError, match=r"add_param_group\(\)"):
        sched.step()
    assert sched.last_epoch == 3
