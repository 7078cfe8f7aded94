"""torch's scheduler classes mapped onto ``RemoteScheduler``, for running torch's own tests.

``load_upstream(path, factory)`` imports torch's ``test/optim/test_lrscheduler.py`` (unmodified)
as a module of its own, with the names it imports from ``torch.optim.lr_scheduler`` bound to
``Mapped`` classes: calling one (``StepLR(opt, gamma=0.1, step_size=3)``) builds what a user
porting that line would write, ``RemoteScheduler(opt, {"type": "StepLR", "step_size": 3,
"gamma": 0.1}, url=..., run_id=...)``. The arguments are bound by torch's own signature, so
positional arguments, defaults left out and a bad call behave as with torch's class.

Translations, each what a user writes in a spec:

- a 0-d tensor argument is its number (JSON has no tensors);
- a Python ``lambda`` of the step is the lrserve expression with the same body
  (``lambda e: e // 10`` is ``"step // 10"``), checked to give the same values at steps 0..100;
  a callable that is not such a lambda has no spec (``Untranslatable``);
- ``SequentialLR`` / ``ChainedScheduler`` take their children's specs: the children were
  built on the optimizer first (each a ``RemoteScheduler``, or ``Pending`` where the client
  refused it: the one before had moved the LRs), and they become the one composite run, as
  in one spec. A child's ``get_last_lr()`` is then the composite's (torch's last chained
  child shows the chain's LR); used otherwise, a ``Pending`` one is built again, and the
  client refuses it again (README, "What differs from torch").
- ``last_epoch=`` (torch's resume through the constructor) is passed on, and the client
  refuses it: a run resumes through ``load_state_dict()``.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lrserve.client import RemoteScheduler
from lrserve.service.engine.expr import compile_expression
from torch.optim import lr_scheduler

#: The names torch's test module imports from torch.optim.lr_scheduler that are schedules.
MAPPED = (
    "ChainedScheduler", "ConstantLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR",
    "ExponentialLR", "LambdaLR", "LinearLR", "MultiplicativeLR", "MultiStepLR", "OneCycleLR",
    "PolynomialLR", "ReduceLROnPlateau", "SequentialLR", "StepLR",
)
COMPOSITES = ("SequentialLR", "ChainedScheduler")
#: Steps at which a translated lambda must equal its expression (the server checks as many).
CHECKED_STEPS = 101


class Untranslatable(TypeError):
    """An argument with no JSON spec equivalent (a callable that is not a lambda of the step)."""


#: Builds the scheduler: ``make(optimizer, spec, **client_kwargs)`` (the harness's, with a server).
Factory = Callable[..., Any]


class Mapped(type):
    """A torch scheduler class's stand-in: calling it builds the ``RemoteScheduler`` (or a
    ``Pending`` one); ``isinstance(sched, ReduceLROnPlateau)`` asks the spec's type."""

    factory: Factory

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        torch_cls = getattr(lr_scheduler, cls.__name__)
        bound = inspect.signature(torch_cls).bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("verbose", None)
        last_epoch = arguments.pop("last_epoch", -1)
        client_kwargs = {} if last_epoch == -1 else {"last_epoch": last_epoch}
        if cls.__name__ in COMPOSITES:
            return _composite(cls, arguments, client_kwargs)
        optimizer = arguments.pop("optimizer")
        spec = {"type": cls.__name__, **{k: _json(v, k) for k, v in arguments.items()}}
        return _leaf(cls.factory, optimizer, spec, client_kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, RemoteScheduler) and obj.schedule.get("type") == cls.__name__


def load_upstream(path: Path, name: str, factory: Factory) -> types.ModuleType:
    """Import torch's test module at ``path`` as ``name``, its scheduler classes mapped."""
    mapped = {n: Mapped(n, (), {"factory": staticmethod(factory)}) for n in MAPPED}
    originals = {n: getattr(lr_scheduler, n) for n in MAPPED}
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # Bound while its `from torch.optim.lr_scheduler import ...` and class body run (its
    # parametrize lists hold the classes); torch's module is left as it was afterwards.
    for n, cls in mapped.items():
        setattr(lr_scheduler, n, cls)
    try:
        spec.loader.exec_module(module)
    finally:
        for n, cls in originals.items():
            setattr(lr_scheduler, n, cls)
    return module


class Pending:
    """A scheduler built on an optimizer another one drives: a child of a composite to come,
    or (used as a scheduler) the second scheduler torch would compose with the first."""

    def __init__(self, factory: Factory, optimizer: Any, spec: dict[str, Any], client_kwargs: dict[str, Any]):
        self.optimizer = optimizer
        self.schedule = spec
        self._build = lambda: factory(optimizer, spec, **client_kwargs)
        self._composite: Any = None

    def get_last_lr(self) -> list[float]:
        if self._composite is not None:
            return self._composite.get_last_lr()
        return self._build().get_last_lr()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._build(), name)  # the client refuses it, and says why


def _leaf(factory: Factory, optimizer: Any, spec: dict[str, Any], client_kwargs: dict[str, Any]) -> Any:
    from lrserve.client._optimizer import driver_of

    try:
        return factory(optimizer, spec, **client_kwargs)
    except ValueError:
        if driver_of(optimizer) is None:
            raise
        return Pending(factory, optimizer, spec, client_kwargs)  # a composite's child, or refused


def _composite(cls: Mapped, arguments: dict[str, Any], client_kwargs: dict[str, Any]) -> Any:
    children = list(arguments.pop("schedulers"))
    optimizer = arguments.pop("optimizer", None) or children[0].optimizer
    for child in children:
        if isinstance(child, RemoteScheduler):
            child.close()  # its run becomes part of the composite's
    spec = {"type": cls.__name__, "schedulers": [c.schedule for c in children],
            **{k: _json(v, k) for k, v in arguments.items()}}
    composite = cls.factory(optimizer, spec, **client_kwargs)
    for child in children:
        if isinstance(child, Pending):
            child._composite = composite
        else:
            child.get_last_lr = composite.get_last_lr  # type: ignore[method-assign]
    return composite


def _json(value: Any, name: str) -> Any:
    """An argument as a spec writes it."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json(v, name) for v in value]
    if name == "lr_lambda" and callable(value):
        return expression_of(value)
    if callable(value):
        raise Untranslatable(f"{name}={value!r}: a spec has no callables")
    return value


def expression_of(fn: Callable[..., Any]) -> str:
    """The lrserve expression with the body of ``lambda step: <body>`` (closed-over numbers
    inlined), checked against ``fn`` at steps 0..100.

    Raises:
        Untranslatable: ``fn`` is not such a lambda, or its body is no lrserve expression.
    """
    if not isinstance(fn, types.LambdaType) or fn.__name__ != "<lambda>":
        raise Untranslatable(f"lr_lambda={fn!r} is not a lambda: an expression cannot say what it does")
    node = _lambda_node(fn)
    params = [a.arg for a in node.args.args]
    free = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True))

    class Rename(ast.NodeTransformer):
        def visit_Name(self, name: ast.Name) -> ast.AST:
            if name.id in params:
                return ast.copy_location(ast.Name("step", ast.Load()), name)
            if isinstance(free.get(name.id), (int, float)) and not isinstance(free[name.id], bool):
                return ast.copy_location(ast.Constant(free[name.id]), name)
            return name

    source = ast.unparse(Rename().visit(node.body))
    try:
        expression = compile_expression(source, field="lr_lambda")
    except Exception as exc:  # noqa: BLE001 - any refusal means: no expression says it
        raise Untranslatable(f"lambda body {source!r}: {exc}") from None
    for step in range(CHECKED_STEPS):
        want = fn(step) if params else fn()
        got = expression(step)
        if not (want == got or (isinstance(want, float) and math.isnan(want) and math.isnan(got))):
            raise AssertionError(f"{source!r} at step {step}: {got!r}, the lambda gives {want!r}")
    return source


def _lambda_node(fn: types.LambdaType) -> ast.Lambda:
    """The ``ast.Lambda`` of ``fn`` in its source file (by the lines and columns its code spans)."""
    lines, _ = inspect.findsource(fn)  # the whole file's
    code = fn.__code__
    # (RESUME and the like span nothing: (line, line, 0, 0))
    spans = [(p[0], p[2]) for p in code.co_positions() if None not in p and p[3] > p[2]]
    tree = ast.parse("".join(lines))
    def span(node: ast.Lambda) -> tuple[tuple[int, int], tuple[int, int]]:
        body = node.body
        return (body.lineno, body.col_offset), (body.end_lineno or 0, body.end_col_offset or 0)

    around = [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Lambda) and node.lineno == code.co_firstlineno
        and all(span(node)[0] <= position <= span(node)[1] for position in spans)
    ]
    if not around:
        raise Untranslatable(f"the source of {fn!r} was not found")
    # the innermost: a lambda inside another lies within the outer one's body as well
    return min(around, key=lambda n: (span(n)[1][0] - span(n)[0][0], span(n)[1][1] - span(n)[0][1]))
