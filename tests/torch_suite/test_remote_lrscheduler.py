"""PyTorch's own ``test/optim/test_lrscheduler.py`` (``upstream/``, unmodified), its scheduler
classes mapped onto ``RemoteScheduler`` on one real server (``mapping.py`` says how).

Of its 190 tests, 33 do not apply (``NOT_APPLICABLE``, each with its reason: torch's private
state, SWALR, tests of torch's own classes). Of the 157 that apply, 79 pass and 78 meet a
documented difference (``DIFFERENCES``): an ``xfail(strict=True)`` that must raise the
client's clear error, each pointing to its entry in README.md, "What differs from torch".
A test here that starts passing, or fails another way, fails the suite.

``upstream/test_lrscheduler.py`` itself runs too, against torch (``upstream/conftest.py``):
the same file passes there, so what fails here is lrserve's.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
from lrserve.client import InvalidSchedule, RemoteScheduler, ScheduleError

from tests.live_server import ServerProcess
from tests.torch_suite.mapping import load_upstream

pytestmark = pytest.mark.slow  # a real server and ~160 schedulers on it: ~30 s, the fast lane's longest

UPSTREAM = Path(__file__).parent / "upstream" / "test_lrscheduler.py"
README = Path(__file__).parents[2] / "README.md"

_server: ServerProcess | None = None
_made: list[weakref.ref[RemoteScheduler]] = []  # weakly: tests check that a dropped one is freed


def _make(optimizer, spec, **kwargs):
    assert _server is not None, "a mapped scheduler outside a test"
    # No run_id, as a torch user porting the line writes it: the server names the run, and
    # load_state_dict() takes any run's checkpoint (a named run refuses another run's).
    sched = RemoteScheduler(optimizer, spec, url=_server.url, **kwargs)
    _made.append(weakref.ref(sched))
    return sched


upstream = load_upstream(UPSTREAM, "tests.torch_suite._upstream_remote", _make)
TestLRScheduler = upstream.TestLRScheduler


def _each(name: str, ids) -> list[str]:
    return [name.format(i) for i in ids]


def _state_dict_load(ids) -> list[str]:
    name = "test_lr_scheduler_state_dict_load_LRClass{}_weights_only_{}"
    return [name.format(i, w) for i in ids for w in (False, True)]


_TORCH_CLASS = "builds torch.optim.lr_scheduler's class by its full name: a test of torch, not of the mapping"
_WRAPPER = ("torch's warning about the call order comes from the wrapper its scheduler installs on "
            "optimizer.step(); RemoteScheduler installs none")
_DICT = ("compares every attribute in two schedulers' __dict__ (torch's implementation state; "
         "a RemoteScheduler's are its connection, cache and threads)")
_SWALR = "SWALR (torch.optim.swa_utils) is not an lrserve schedule"
_SCALE_FN = "CyclicLR's scale_fn callables and private _scale_fn_* attributes"

#: Upstream tests that do not apply to RemoteScheduler, and why.
NOT_APPLICABLE: dict[str, str] = {
    "test_error_when_getlr_has_epoch": "defines its own torch LRScheduler subclass",
    # Its weakref twin, test_no_cyclic_references_in_step, runs (and tests/client/test_no_leak.py).
    "test_no_cyclic_references": "counts the whole process's cyclic garbage after `del optim`: a "
    "dropped RemoteScheduler's worker threads end their last HTTP exchange in the background "
    "(each httpx response is a reference cycle), so the count depends on when that ends; the "
    "optimizer itself is freed at once",
    "test_get_last_lr_step_lr": _TORCH_CLASS,
    "test_sequentiallr4": _TORCH_CLASS,
    "test_cosine_then_cyclic": _TORCH_CLASS,
    "test_old_pattern_warning": _WRAPPER,
    "test_old_pattern_warning_with_arg": _WRAPPER,
    "test_old_pattern_warning_resuming": _WRAPPER,
    "test_old_pattern_warning_resuming_with_arg": _WRAPPER,
    "test_old_pattern_warning_with_overridden_optim_step": _WRAPPER,
    "test_new_pattern_no_warning_with_overridden_optim_step": _WRAPPER,
    "test_CosineAnnealingWarmRestarts_T_cur_reset": "sets torch's internal counter T_cur",
    "test_cycle_lr_state_dict_picklable": _SCALE_FN,
    "test_cycle_lr_scale_fn_restored_from_state_dict": _SCALE_FN,
    "test_onecycle_lr_legacy_state_dict": "OneCycleLR's private _anneal_func_type, an old state_dict format",
    "test_lambda_lr_state_dict_fn": "torch's LambdaLR state_dict format (lr_lambdas)",
    "test_lambda_lr_state_dict_obj": "a callable object as lr_lambda, and torch's state_dict format",
    "test_multiplicative_lr_with_lr_lambda": (
        "torch's TypeError for an lr_lambda that is not a function; a spec's lr_lambda is an "
        "expression string, a number is refused with InvalidSchedule naming the field"
    ),
    "test_step_lr_state_dict": _DICT,
    "test_multi_step_lr_state_dict": _DICT,
    "test_exp_step_lr_state_dict": _DICT,
    "test_cosine_lr_state_dict": _DICT,
    "test_CosineAnnealingWarmRestarts_lr_state_dict": _DICT,
    "test_reduce_lr_on_plateau_state_dict": _DICT,
    **dict.fromkeys([
        "test_swalr_no_anneal", "test_swalr_cosine_anneal_after_multiplicative",
        "test_swalr_linear_anneal_after_multiplicative", "test_swalr_hypers", "test_swa_lr_state_dict",
        "test_constant_initial_params_swalr", *_state_dict_load([15]),
        "test_lr_scheduler_checkpoint_LRClass12",
    ], _SWALR),
}

# Entries of README.md, "What differs from torch" (test_every_difference_is_documented checks them).
EPOCH = "`step(epoch)`"
TWO = "Two schedulers stepping one optimizer."
DROVE = "A scheduler on an optimizer another scheduler drove."
GROUPS = "`optimizer.add_param_group()` mid-run."
RESUME = "Resuming through `last_epoch=`."
NEGATIVE = "An LR below zero."
STAGE = "A composite as a `SequentialLR` stage."

#: Upstream tests that meet a documented difference: (the client's error, README entry).
DIFFERENCES: dict[str, tuple[type[Exception] | tuple[type[Exception], ...], str]] = {
    **dict.fromkeys([
        *_each("test_{}_is_constant_for_constant_epoch", ["step_lr", "exponential_lr", "constantlr",
                                                           "linear_linearlr", "polynomial_lr"]),
        "test_multi_step_lr_with_epoch",
        "test_constantlr_with_epoch", "test_linearlr_with_epoch", "test_closed_form_step_lr",
        "test_closed_form_multi_step_lr", "test_closed_form_exp_lr", "test_closed_form_poly_lr",
        "test_closed_form_cos_anneal_lr", "test_CosineAnnealingWarmRestarts_lr2",
        "test_CosineAnnealingWarmRestarts_lr3", *_each("test_constant_initial_lr_LRClass{}", range(10)),
        "test_constant_initial_params_cyclelr", "test_constant_initial_params_onecyclelr",
    ], (TypeError, EPOCH)),
    **dict.fromkeys([
        "test_compound_step_and_multistep_lr", "test_compound_step_and_exp_lr",
        "test_compound_exp_and_multistep_lr",
        "test_compound_exp_and_linearlr", "test_compound_step_and_constantlr",
        "test_compound_linearlr_and_multistep_lr", "test_compound_cosanneal_and_step_lr",
        "test_compound_cosanneal_and_multistep_lr", "test_compound_cosanneal_and_linearlr",
        "test_compound_cosanneal_and_exp_lr", *_each("test_compound_reduce_lr_on_plateau{}", range(1, 6)),
    ], (ValueError, TWO)),
    **dict.fromkeys([
        "test_closed_form_constantlr", "test_closed_form_linearlr",
        *_state_dict_load([0, 4, 5, 9, 10, 12, 13]),
    ], (ValueError, DROVE)),
    **dict.fromkeys([
        "test_add_param_group_does_not_break_reduce_lr_on_plateau_min_lr_scalar",
        "test_add_param_group_errors_reduce_lr_on_plateau",
    ], (ValueError, GROUPS)),
    # and it appends the new group's bound to torch's ReduceLROnPlateau.min_lrs: no such list
    "test_add_param_group_does_not_break_reduce_lr_on_plateau_min_lr_list": (
        (AttributeError, ValueError), GROUPS
    ),
    **dict.fromkeys([
        "test_cos_anneal_lr_continue", *_each("test_lr_scheduler_checkpoint_LRClass{}", range(12)),
        "test_raise_error_when_last_epoch_is_greater_than_0_and_initial_lr_is_not_specified",
    ], (TypeError, RESUME)),
    **dict.fromkeys(
        ["test_onecycle_lr_linear_annealing", "test_cycle_lr_with_adam"], (ScheduleError, NEGATIVE)
    ),
    "test_sequentiallr5": (InvalidSchedule, STAGE),
}


def _mark_upstream_tests() -> None:
    names = {n for n in dir(TestLRScheduler) if n.startswith("test_")}
    listed = [*NOT_APPLICABLE, *DIFFERENCES]
    unknown = sorted(set(listed) - names)
    assert not unknown, f"not upstream tests (has the upstream file changed?): {unknown}"
    assert len(set(listed)) == len(listed), "a test is listed twice"
    for name, reason in NOT_APPLICABLE.items():
        pytest.mark.skip(reason=f"not applicable: {reason}")(getattr(TestLRScheduler, name))
    for name, (error, entry) in DIFFERENCES.items():
        reason = f'README, "What differs from torch": {entry}'
        pytest.mark.xfail(raises=error, strict=True, reason=reason)(getattr(TestLRScheduler, name))


_mark_upstream_tests()


@pytest.fixture(scope="module", autouse=True)
def _one_server(tmp_path_factory):
    global _server
    tmp = tmp_path_factory.mktemp("torch-suite")
    with ServerProcess(f"sqlite:///{tmp}/runs.db", tmp) as proc:
        _server = proc
        yield
        _server = None


@pytest.fixture(autouse=True)
def _close_what_the_test_made():
    yield
    while _made:
        sched = _made.pop()()
        if sched is not None:
            sched.close(timeout=1.0)


def test_every_difference_is_documented():
    text = README.read_text()
    section = text[text.index("### What differs from torch"):]
    section = section[: section.index("\n## ", 1)]
    missing = sorted({entry for _, entry in DIFFERENCES.values() if f"**{entry}" not in section})
    assert not missing, f"README's 'What differs from torch' has no entry {missing}"


def test_the_counts_in_this_docstring_are_the_lists():
    applicable = len([n for n in dir(TestLRScheduler) if n.startswith("test_")]) - len(NOT_APPLICABLE)
    counts = (len(NOT_APPLICABLE), applicable, applicable - len(DIFFERENCES), len(DIFFERENCES))
    assert counts == (33, 157, 79, 78), counts
