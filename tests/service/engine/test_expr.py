from __future__ import annotations

import copy
import json
import math
import pickle
import time

import pytest
import torch
from lrserve.service.engine.expr import (
    MAX_NODES,
    MAX_SOURCE_CHARS,
    Expression,
    compile_expression,
    node_count,
)
from lrserve.service.errors import ScheduleError, SpecError
from torch.optim import lr_scheduler as torch_schedulers

FIELD = "schedule.lr_lambda"
MANY_TERMS = "+".join(["1"] * 240)  # short enough, but more than MAX_NODES terms

# Expressions and the Python lambdas a user would hand torch for them.
EQUIVALENTS = [
    pytest.param("0.95 ** step", lambda e: 0.95**e, id="power"),
    pytest.param("min(1.0, (step + 1) / 10)", lambda e: min(1.0, (e + 1) / 10), id="warmup"),
    pytest.param(
        "0.5 * (1 + cos(pi * step / 50))",
        lambda e: 0.5 * (1 + math.cos(math.pi * e / 50)),
        id="cosine",
    ),
    pytest.param("1 / (step + 1)", lambda e: 1 / (e + 1), id="inverse"),
    pytest.param("step // 30", lambda e: e // 30, id="floor-division"),
    pytest.param(
        "0.9 if step % 3 == 0 else 1.0", lambda e: 0.9 if e % 3 == 0 else 1.0, id="conditional"
    ),
    pytest.param(
        "exp(-step / 40) + sqrt(step) / 100",
        lambda e: math.exp(-e / 40) + math.sqrt(e) / 100,
        id="exp-sqrt",
    ),
    pytest.param(
        "log(step + 1, 2) / 8 + log10(step + 1)",
        lambda e: math.log(e + 1, 2) / 8 + math.log10(e + 1),
        id="logs",
    ),
    pytest.param("step > 10 and 0.5 or 1.0", lambda e: e > 10 and 0.5 or 1.0, id="and-or"),
    pytest.param("not step % 7", lambda e: not e % 7, id="not"),
    pytest.param("1 < step + 1 <= 50", lambda e: 1 < e + 1 <= 50, id="chained-comparison"),
    pytest.param(
        "-abs(tanh(step / 10) - e / 3) + floor(step / 7) - ceil(step / 9) + sin(step) * tan(0.1)",
        lambda e: (
            -abs(math.tanh(e / 10) - math.e / 3)
            + math.floor(e / 7)
            - math.ceil(e / 9)
            + math.sin(e) * math.tan(0.1)
        ),
        id="functions",
    ),
    pytest.param(
        "max(0.01, 1 - step / 150) ** 2", lambda e: max(0.01, 1 - e / 150) ** 2, id="max-square"
    ),
    pytest.param("2 ** (step % 11) / 1024", lambda e: 2 ** (e % 11) / 1024, id="int-power"),
]


def optimizer(n_groups: int = 1) -> torch.optim.SGD:
    groups = [{"params": [torch.zeros(0)], "lr": 0.1 * (i + 1)} for i in range(n_groups)]
    return torch.optim.SGD(groups, lr=0.1)


def lrs_over(cls: type, lr_lambda: object, steps: int = 200) -> list[list[float]]:
    opt = optimizer()
    scheduler = cls(opt, lr_lambda=lr_lambda)
    out = [scheduler.get_last_lr()]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        out.append(scheduler.get_last_lr())
    return out


@pytest.mark.parametrize(("source", "fn"), EQUIVALENTS)
def test_values_equal_the_python_lambda(source, fn):
    expression = compile_expression(source, field=FIELD)
    for step in range(201):
        assert expression(step) == float(fn(step)), step


@pytest.mark.parametrize("cls", [torch_schedulers.LambdaLR, torch_schedulers.MultiplicativeLR])
@pytest.mark.parametrize(("source", "fn"), EQUIVALENTS[:6])
def test_torch_gives_bit_identical_lrs(cls, source, fn):
    ours = lrs_over(cls, compile_expression(source, field=FIELD))
    theirs = lrs_over(cls, fn)
    assert ours == theirs


def test_call_returns_a_float():
    value = compile_expression("step // 2", field=FIELD)(5)
    assert type(value) is float and value == 2.0


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("step.real", id="attribute"),
        pytest.param("(0.5).__class__", id="dunder-attribute"),
        pytest.param("__import__('os').system('true')", id="import"),
        pytest.param("lambda: 1", id="lambda"),
        pytest.param("(lambda x: x)(step)", id="lambda-call"),
        pytest.param("10 ** 10 ** 10", id="huge-power"),
        pytest.param("2 ** 2 ** 2 ** 2 ** 2 ** 2", id="power-tower"),
        pytest.param(MANY_TERMS, id="too-many-nodes"),
        pytest.param("1" * (MAX_SOURCE_CHARS + 1), id="too-long"),
        pytest.param("'0.95'", id="string"),
        pytest.param("b'1'", id="bytes"),
        pytest.param("f'{step}'", id="f-string"),
        pytest.param("[step][0]", id="subscript"),
        pytest.param("[s for s in (1, 2)]", id="comprehension"),
        pytest.param("(x := 1)", id="walrus"),
        pytest.param("min(step, 1, key=abs)", id="keyword-argument"),
        pytest.param("min(*[1, 2])", id="starred"),
        pytest.param("round(step)", id="unknown-function"),
        pytest.param("eval('1')", id="eval"),
        pytest.param("epoch * 0.1", id="unknown-name"),
        pytest.param("True", id="bool-literal"),
        pytest.param("None", id="none"),
        pytest.param("1j", id="complex-literal"),
        pytest.param("step if", id="syntax-error"),
        pytest.param("", id="empty"),
        pytest.param("step << 2", id="shift"),
        pytest.param("~step", id="invert"),
        pytest.param("step is 1", id="is"),
        pytest.param("step in (1, 2)", id="in"),
        pytest.param("exp()", id="too-few-arguments"),
        pytest.param("sqrt(1, 2)", id="too-many-arguments"),
        pytest.param("1 / (step - 5)", id="division-by-zero-at-step-5"),
        pytest.param("exp(step * 10)", id="overflow-within-100-steps"),
        pytest.param("sqrt(-1 - step)", id="math-domain"),
        pytest.param("log(step)", id="log-zero"),
        pytest.param("1e308 * 10 + step", id="infinite"),
        pytest.param("(-8) ** (1 / 3)", id="complex-result"),
        pytest.param("1\x00", id="null-byte"),
    ],
)
def test_unsafe_or_failing_expressions_are_spec_errors(source):
    with pytest.raises(SpecError) as info:
        compile_expression(source, field=FIELD)
    assert [e.field for e in info.value.errors] == [FIELD]
    assert info.value.errors[0].message


def test_rejections_say_what_is_allowed():
    with pytest.raises(SpecError) as info:
        compile_expression("step.real", field=FIELD)
    assert "attribute access not allowed" in info.value.errors[0].message
    with pytest.raises(SpecError) as info:
        compile_expression(MANY_TERMS, field=FIELD)
    assert f"at most {MAX_NODES}" in info.value.errors[0].message


@pytest.mark.parametrize("source", [p.values[0] for p in EQUIVALENTS] + ["max(step, 1) + min(2, step)", "1"])
def test_an_expression_s_terms_are_its_source_s_expression_nodes(source):
    # counted as the tree is checked; node_count walks the parsed source, as the check did before
    assert Expression(source).nodes == node_count(source)


def test_too_many_terms_is_said_before_what_else_is_wrong():
    deepest = "-" * (MAX_SOURCE_CHARS - 1) + "1"  # 500 deep: past the recursion limit, if lowered whole
    for source in (MANY_TERMS + "+step.real", "step.real+" + MANY_TERMS, MANY_TERMS + "+round(1)", deepest):
        with pytest.raises(SpecError) as info:
            compile_expression(source[:MAX_SOURCE_CHARS], field=FIELD)
        assert f"at most {MAX_NODES} terms" in info.value.errors[0].message, source


def test_compile_error_names_the_failing_step():
    with pytest.raises(SpecError) as info:
        compile_expression("1 / (step - 5)", field=FIELD)
    assert "at step 5" in info.value.errors[0].message


def test_huge_powers_fail_fast():
    started = time.perf_counter()
    for source in ("10 ** 10 ** 10", "(step + 2) ** 10 ** 9", "9 ** 9 ** 9 ** 9"):
        with pytest.raises(SpecError):
            compile_expression(source, field=FIELD)
    assert time.perf_counter() - started < 1.0


def test_evaluation_error_is_a_schedule_error_with_field_and_step():
    expression = Expression("1 / (step - 5)", field="schedule.schedulers.1.lr_lambda")
    with pytest.raises(ScheduleError) as info:
        expression(5)
    error = info.value.errors[0]
    assert error.field == "schedule.schedulers.1.lr_lambda"
    assert "step 5" in error.message and "division by zero" in error.message


def test_overflow_after_the_checked_steps_is_a_schedule_error():
    expression = compile_expression("exp(step)", field=FIELD)
    assert expression(100) == math.exp(100)
    with pytest.raises(ScheduleError, match="step 1000"):
        expression(1000)


def test_non_finite_value_is_a_schedule_error():
    expression = compile_expression("1e306 * step", field=FIELD)
    with pytest.raises(ScheduleError, match="not a finite number at step 1000"):
        expression(1000)


def test_expression_deep_copies_and_pickles():
    expression = compile_expression("0.9 ** step", field=FIELD)
    for clone in (copy.deepcopy(expression), pickle.loads(pickle.dumps(expression))):
        assert clone == expression
        assert clone(7) == expression(7)


def test_torch_scheduler_with_expressions_deep_copies_and_saves_json_state():
    opt = optimizer(2)
    scheduler = torch_schedulers.LambdaLR(
        opt, lr_lambda=[compile_expression(s, field=FIELD) for s in ("0.9 ** step", "1.0")]
    )
    clone = copy.deepcopy(scheduler)
    assert [fn(3) for fn in clone.lr_lambdas] == [0.9**3, 1.0]
    json.dumps(scheduler.state_dict())


def test_an_engine_steps_on_its_compiled_expressions_however_many_distinct_exist(monkeypatch):
    """Each expression is parsed once, when the spec is checked; stepping never parses again
    (a process-wide cache of 512 re-parsed every expression on every step beyond 512)."""
    from lrserve.service.engine import expr
    from lrserve.service.engine.engine import Engine
    from lrserve.service.engine.spec import parse_schedule

    n = 600
    spec = parse_schedule(
        {"type": "LambdaLR", "lr_lambda": [f"0.99 ** step * {i + 1}" for i in range(n)]}, n_groups=n
    )
    engine = Engine(spec, [0.1] * n)
    parses = []
    monkeypatch.setattr(expr, "_compile", lambda source: parses.append(source))
    for _ in range(20):
        engine.advance()
    assert parses == []
    assert engine.values()[0][5] == pytest.approx(0.1 * 0.99**20 * 6)


def test_an_expression_is_a_few_objects_of_the_cyclic_collector():
    """A compiled expression is one function, not a tree of closures: a closure tree was ~88
    objects of the cyclic collector per expression (90,000 for a 1024-group LambdaLR's
    engine), and the collections that walked them while a create was built held the GIL
    100-400 ms on a busy 2-core machine: another run's step waited that long."""
    import gc

    sources = [f"{i + 1}/({i + 1}+step)" + "+0*step" * 5 for i in range(1024)]
    gc.collect()
    before = len(gc.get_objects())
    compiled = [compile_expression(source, field=FIELD) for source in sources]
    gc.collect()  # what every later collection walks again (a tuple of constants only is let go)
    per_expression = (len(gc.get_objects()) - before) / len(sources)
    assert [f(7) for f in compiled[:3]] == [1 / 8, 2 / 9, 3 / 10]
    assert per_expression <= 5, per_expression
