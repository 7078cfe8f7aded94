"""A safe arithmetic language for ``LambdaLR`` / ``MultiplicativeLR`` factors.

A Python lambda cannot travel over HTTP, so a spec gives ``lr_lambda`` as a small
expression of ``step`` (torch's ``last_epoch``, an int), for example ``"0.95 ** step"`` or
``"min(1.0, (step + 1) / 10)"``. The text is parsed with :mod:`ast`, checked against a
whitelist and turned into a tree of closures; it is never handed to ``eval``, ``exec`` or
``compile``. Evaluation keeps Python's own number semantics (ints stay ints, ``/`` is true
division), so an expression gives bit for bit what the equivalent lambda gives in torch.

Allowed: number literals, ``step``, the constants ``pi`` and ``e``, ``+ - * / // % **``,
unary ``+``/``-``, comparisons, ``a if cond else b``, ``and`` / ``or`` / ``not``, and calls
to min, max, abs, floor, ceil, exp, log, log10, sqrt, sin, cos, tan, tanh.

Example:
    >>> f = compile_expression("min(1.0, (step + 1) / 4)", field="lr_lambda")
    >>> [f(k) for k in range(5)]
    [0.25, 0.5, 0.75, 1.0, 1.0]
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from lrserve.service.errors import ScheduleError, SpecError

MAX_SOURCE_CHARS = 500
MAX_NODES = 200
CHECKED_STEPS = 101
"""Steps ``0 .. CHECKED_STEPS - 1`` at which a new expression must evaluate to a finite number."""

# An int power whose result would need more bits than this is computed as a float
# instead, which overflows at once: `10 ** 10 ** 10` must fail fast, not build a huge int.
_MAX_INT_POWER_BITS = 1100

_Fn = Callable[[int], Any]

_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

# name -> (function, minimum number of arguments, maximum number of arguments)
_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    "min": (min, 2, 32),
    "max": (max, 2, 32),
    "abs": (abs, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "exp": (math.exp, 1, 1),
    "log": (math.log, 1, 2),
    "log10": (math.log10, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "tanh": (math.tanh, 1, 1),
}


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * base.bit_length() > _MAX_INT_POWER_BITS:
            return float(base) ** float(exponent)  # raises OverflowError
    result = base**exponent
    if isinstance(result, complex):
        raise ValueError("a negative number raised to a fractional power has no real value")
    return result


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
    ast.Not: operator.not_,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}

_FORBIDDEN_NAMES: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Lambda: "lambdas",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.NamedExpr: "assignments",
    ast.Starred: "starred arguments",
    ast.JoinedStr: "strings",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}

_ALLOWED_HINT = (
    "use numbers, step, pi, e, + - * / // % **, comparisons, `a if cond else b`, "
    "and/or/not, and " + ", ".join(_FUNCTIONS)
)


class _Rejected(Exception):
    """The source breaks a rule of the language; the message says which."""


class Expression:
    """A validated ``lr_lambda`` expression, callable like the lambda it stands for.

    The closure tree is built once, when the Expression is made, and held by it (so by
    the spec and the run that own it: no process-wide cache whose size a request could
    exceed). It lives in a slot, outside ``__dict__``: torch's ``LambdaLR.state_dict()``
    copies a callable object's ``__dict__``, which thus stays JSON (``source``, ``field``);
    copies and pickles carry the text and build the closures again.

    Attributes:
        source: The expression text, e.g. ``"0.95 ** step"``.
        field: The spec field it came from, named in evaluation errors.
        nodes: How many terms the expression has (its cost per evaluation).

    Raises:
        _Rejected: ``source`` is not an allowed expression (``compile_expression`` says so
            as a ``SpecError``).
    """

    __slots__ = ("__dict__", "_fn", "nodes")

    def __init__(self, source: str, *, field: str = "lr_lambda") -> None:
        self.source = source
        self.field = field
        self._fn, self.nodes = _compile(source)

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "field": self.field}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled: compiled again from the source, as when first built
        self.__init__(state["source"], field=state["field"])  # type: ignore[misc]

    def __call__(self, step: int) -> float:
        """Evaluate at ``step``.

        Raises:
            ScheduleError: The expression cannot be evaluated at this step (division by
                zero, overflow, math domain error) or its value is not a finite number.
        """
        try:
            value = self._fn(step)
        except (ArithmeticError, ValueError, TypeError) as exc:
            raise ScheduleError.at(self.field, _failure(self.source, step, exc)) from exc
        return _finite(value, self.source, self.field, step)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Expression):
            return NotImplemented
        return (self.source, self.field) == (other.source, other.field)

    def __hash__(self) -> int:
        return hash((self.source, self.field))

    def __repr__(self) -> str:
        return f"Expression({self.source!r}, field={self.field!r})"


def compile_expression(source: str, *, field: str) -> Expression:
    """Check ``source`` and return it as an :class:`Expression`.

    Besides the syntax rules, the expression must evaluate to a finite number at
    steps ``0 .. 100``, so most mistakes surface when the run is created.

    Args:
        source: Expression text (at most 500 characters and 200 nodes).
        field: The spec field the text came from, e.g. ``"schedule.lr_lambda"``.

    Returns:
        The callable expression.

    Raises:
        SpecError: The text is not an allowed expression, or fails at a step in 0..100.
    """
    if not isinstance(source, str):
        raise SpecError.at(field, f"expected an expression string, got {type(source).__name__}")
    try:
        expression = Expression(source, field=field)
    except _Rejected as exc:
        raise SpecError.at(field, str(exc)) from None
    for step in range(CHECKED_STEPS):
        try:
            expression(step)
        except ScheduleError as exc:
            raise SpecError.at(field, exc.errors[0].message) from None
    return expression


def node_count(source: str) -> int:
    """How many terms ``source`` has, without building or checking it (1 if it does not parse)."""
    if len(source) > MAX_SOURCE_CHARS:
        return 1
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, SyntaxWarning, ValueError):
        return 1
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.expr))


def _failure(source: str, step: int, exc: Exception) -> str:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, OverflowError):
        reason = "the result is too large for a float"
    elif isinstance(exc, ZeroDivisionError):
        reason = "division by zero"
    return f"{source!r} cannot be evaluated at step {step}: {reason}"


def _finite(value: Any, source: str, field: str, step: int) -> float:
    if not isinstance(value, (int, float)):
        raise ScheduleError.at(field, f"{source!r} is not a number at step {step}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ScheduleError.at(
            field, f"{source!r} is not a finite number at step {step}: got {result}"
        )
    return result


def _compile(source: str) -> tuple[_Fn, int]:
    """Parse, check and build the closure tree for ``source``, with its node count (raises ``_Rejected``)."""
    if len(source) > MAX_SOURCE_CHARS:
        raise _Rejected(f"expected at most {MAX_SOURCE_CHARS} characters, got {len(source)}")
    if not source.strip():
        raise _Rejected("expected an expression of step, got an empty string")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, SyntaxWarning, ValueError) as exc:
        detail = getattr(exc, "msg", None) or str(exc)
        raise _Rejected(f"not a valid expression: {detail}") from None
    nodes = sum(1 for node in ast.walk(tree) if isinstance(node, ast.expr))
    if nodes > MAX_NODES:
        raise _Rejected(f"expected at most {MAX_NODES} terms, got {nodes}")
    return _build(tree.body), nodes


def _build(node: ast.expr) -> _Fn:
    builder = _BUILDERS.get(type(node))
    if builder is None:
        what = _FORBIDDEN_NAMES.get(type(node), f"{type(node).__name__} syntax")
        raise _Rejected(f"{what} not allowed; {_ALLOWED_HINT}")
    return builder(node)


def _build_constant(node: ast.Constant) -> _Fn:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "strings" if isinstance(value, (str, bytes)) else f"the constant {value!r}"
        raise _Rejected(f"{what} not allowed; only numbers are")
    return lambda step: value


def _build_name(node: ast.Name) -> _Fn:
    if node.id == "step":
        return lambda step: step
    if node.id in _CONSTANTS:
        value = _CONSTANTS[node.id]
        return lambda step: value
    raise _Rejected(f"unknown name {node.id!r}; the variable is step (torch's epoch counter)")


def _build_binop(node: ast.BinOp) -> _Fn:
    op = _BINARY.get(type(node.op))
    if op is None:
        raise _Rejected(f"operator {type(node.op).__name__} not allowed; {_ALLOWED_HINT}")
    left, right = _build(node.left), _build(node.right)
    return lambda step: op(left(step), right(step))


def _build_unaryop(node: ast.UnaryOp) -> _Fn:
    op = _UNARY.get(type(node.op))
    if op is None:
        raise _Rejected(f"operator {type(node.op).__name__} not allowed; {_ALLOWED_HINT}")
    operand = _build(node.operand)
    return lambda step: op(operand(step))


def _build_boolop(node: ast.BoolOp) -> _Fn:
    values = [_build(v) for v in node.values]
    if isinstance(node.op, ast.And):
        return lambda step: _all_and(values, step)
    return lambda step: _any_or(values, step)


def _all_and(values: list[_Fn], step: int) -> Any:
    result: Any = True
    for value in values:  # Python's `and`: the first falsy operand, else the last
        result = value(step)
        if not result:
            return result
    return result


def _any_or(values: list[_Fn], step: int) -> Any:
    result: Any = False
    for value in values:  # Python's `or`: the first truthy operand, else the last
        result = value(step)
        if result:
            return result
    return result


def _build_compare(node: ast.Compare) -> _Fn:
    ops = []
    for op_node in node.ops:
        op = _COMPARE.get(type(op_node))
        if op is None:
            raise _Rejected(f"comparison {type(op_node).__name__} not allowed; use < <= > >= == !=")
        ops.append(op)
    operands = [_build(node.left)] + [_build(c) for c in node.comparators]
    return lambda step: _chain_compare(ops, operands, step)


def _chain_compare(ops: list[Callable[[Any, Any], Any]], operands: list[_Fn], step: int) -> bool:
    left = operands[0](step)
    for op, right_fn in zip(ops, operands[1:], strict=True):
        right = right_fn(step)
        if not op(left, right):
            return False
        left = right
    return True


def _build_ifexp(node: ast.IfExp) -> _Fn:
    test, body, orelse = _build(node.test), _build(node.body), _build(node.orelse)
    return lambda step: body(step) if test(step) else orelse(step)


def _build_call(node: ast.Call) -> _Fn:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in _FUNCTIONS:
        shown = name or "this"
        raise _Rejected(f"calling {shown!r} not allowed; functions: {', '.join(_FUNCTIONS)}")
    if node.keywords:
        raise _Rejected(f"keyword arguments not allowed in {name}()")
    function, least, most = _FUNCTIONS[name]
    if not least <= len(node.args) <= most:
        expected = str(least) if least == most else f"{least} to {most}"
        raise _Rejected(f"{name}() takes {expected} arguments, got {len(node.args)}")
    args = [_build(arg) for arg in node.args]
    return lambda step: function(*(arg(step) for arg in args))


_BUILDERS: dict[type[ast.AST], Callable[[Any], _Fn]] = {
    ast.Constant: _build_constant,
    ast.Name: _build_name,
    ast.BinOp: _build_binop,
    ast.UnaryOp: _build_unaryop,
    ast.BoolOp: _build_boolop,
    ast.Compare: _build_compare,
    ast.IfExp: _build_ifexp,
    ast.Call: _build_call,
}
