"""A safe arithmetic language for ``LambdaLR`` / ``MultiplicativeLR`` factors.

A Python lambda cannot travel over HTTP, so a spec gives ``lr_lambda`` as a small
expression of ``step`` (torch's ``last_epoch``, an int), for example ``"0.95 ** step"`` or
``"min(1.0, (step + 1) / 10)"``. The text is parsed with :mod:`ast` and checked against a
whitelist, node by node, into a new tree of the allowed nodes only (``_Lowering``); that
checked tree, never the text, is compiled into one function of ``step``, whose globals hold
no builtins, only the allowed functions under names no source can write (``_RUNTIME``).
Evaluation is Python's own (ints stay ints, ``/`` is true division; ``**`` goes through
``_power``, which bounds int powers), so an expression gives bit for bit what the equivalent
lambda gives in torch.

One function per expression, not a tree of closures: a closure tree was ~88 objects of the
cyclic collector per expression (90,000 for a 1024-group ``LambdaLR``, built in the server
process as the run's engine is, and held as long as the run), and the young-generation
collections that walked them held the GIL 100-400 ms on a busy 2-core machine (another
run's step waited that long; bench figure 7, "create"). A function is one such object, and
it evaluates faster.

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
import marshal
import math
import types
from collections.abc import Callable
from typing import Any, TypedDict

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


# The operators allowed: Python's own (``**`` through ``_power``), on Python's numbers.
_BINARY: frozenset[type[ast.operator]] = frozenset(
    {ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow}
)
_UNARY: frozenset[type[ast.unaryop]] = frozenset({ast.UAdd, ast.USub, ast.Not})
_COMPARE: frozenset[type[ast.cmpop]] = frozenset({ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq})

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

    The function is compiled once, when the Expression is made, and held by it (so by the
    spec and the run that own it: no process-wide cache whose size a request could
    exceed). It lives in a slot, outside ``__dict__``: torch's ``LambdaLR.state_dict()``
    copies a callable object's ``__dict__``, which thus stays JSON (``source``, ``field``).
    Copies and pickles carry the text and the function's code (``marshal``: this
    interpreter's own format, read back in microseconds where compiling again took ~100 us
    an expression; a pickle only travels between a server and its worker processes, which
    run the same interpreter, and is never stored): a create's checked spec comes back from
    the worker that checked it with its expressions compiled (``service/offload.py``).

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
        return {"source": self.source, "field": self.field, "nodes": self.nodes,
                "code": marshal.dumps(self._fn.__code__)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled: the function of the code compiled from the checked tree, with the same globals
        self.source, self.field, self.nodes = state["source"], state["field"], state["nodes"]
        self._fn = types.FunctionType(marshal.loads(state["code"]), _GLOBALS)

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
    return _terms(tree)


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
    """Parse and check ``source``, and make it one function, with its node count (raises ``_Rejected``)."""
    if len(source) > MAX_SOURCE_CHARS:
        raise _Rejected(f"expected at most {MAX_SOURCE_CHARS} characters, got {len(source)}")
    if not source.strip():
        raise _Rejected("expected an expression of step, got an empty string")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, SyntaxWarning, ValueError) as exc:
        detail = getattr(exc, "msg", None) or str(exc)
        raise _Rejected(f"not a valid expression: {detail}") from None
    lowering = _Lowering()
    try:
        body = lowering.lower(tree.body)
    except _Rejected:  # too many terms is said first, as if counted before the checks
        if (nodes := _terms(tree)) > MAX_NODES:
            raise _Rejected(f"expected at most {MAX_NODES} terms, got {nodes}") from None
        raise
    step = ast.arg("step", **_AT)
    params = ast.arguments(posonlyargs=[], args=[step], kwonlyargs=[], kw_defaults=[], defaults=[])
    code = compile(ast.Expression(body=ast.Lambda(args=params, body=body, **_AT)), "<lr_lambda>", "eval")
    fn: _Fn = eval(code, _GLOBALS)  # a checked tree; no builtins
    return fn, lowering.nodes


def _terms(tree: ast.AST) -> int:
    """How many terms (``ast.expr`` nodes) ``tree`` has: a walk without recursion."""
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.expr))


class _Place(TypedDict):
    lineno: int
    col_offset: int
    end_lineno: int
    end_col_offset: int


_AT: _Place = {"lineno": 1, "col_offset": 0, "end_lineno": 1, "end_col_offset": 0}
"""The one place every node of a checked tree has (``compile`` needs one; tracebacks name
``<lr_lambda>``, not a column): given as each node is made, where ``ast.fix_missing_locations``
walked the finished tree again, a third of compiling a short expression."""


class _Lowering:
    """One source's checked tree (``lower``), and how many terms it has (``nodes``: the
    source's ``ast.expr`` nodes, counted as they are checked, not by walking the tree again).
    Past ``MAX_NODES`` it stops (``_Rejected``; ``_compile`` then counts them all by a walk):
    lowering recurses, and 500 characters nest up to 500 deep (``-`` 499 times), past
    Python's recursion limit."""

    def __init__(self) -> None:
        self.nodes = 0

    def lower(self, node: ast.expr) -> ast.expr:
        """The checked tree of ``node``: only ``step``, numbers, the operators above and calls of
        the functions above (by names of ``_RUNTIME``, which no source can name); anything else
        raises ``_Rejected`` saying what is allowed."""
        lower = _LOWER.get(type(node))
        if lower is None:
            what = _FORBIDDEN_NAMES.get(type(node), f"{type(node).__name__} syntax")
            raise _Rejected(f"{what} not allowed; {_ALLOWED_HINT}")
        self.count()
        return lower(self, node)

    def count(self) -> None:
        """One more term; past ``MAX_NODES`` the lowering stops (``_compile`` counts them all)."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Rejected(f"expected at most {MAX_NODES} terms")


def _lower_constant(_: _Lowering, node: ast.Constant) -> ast.expr:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "strings" if isinstance(value, (str, bytes)) else f"the constant {value!r}"
        raise _Rejected(f"{what} not allowed; only numbers are")
    return ast.Constant(value, **_AT)


def _lower_name(_: _Lowering, node: ast.Name) -> ast.expr:
    if node.id == "step":
        return ast.Name("step", ast.Load(), **_AT)
    if node.id in _CONSTANTS:
        return ast.Constant(_CONSTANTS[node.id], **_AT)
    raise _Rejected(f"unknown name {node.id!r}; the variable is step (torch's epoch counter)")


def _lower_binop(lowering: _Lowering, node: ast.BinOp) -> ast.expr:
    if type(node.op) not in _BINARY:
        raise _Rejected(f"operator {type(node.op).__name__} not allowed; {_ALLOWED_HINT}")
    left, right = lowering.lower(node.left), lowering.lower(node.right)
    if isinstance(node.op, ast.Pow):  # bounded: `10 ** 10 ** 10` fails fast (_power)
        return ast.Call(ast.Name("_power", ast.Load(), **_AT), [left, right], [], **_AT)
    return ast.BinOp(left, type(node.op)(), right, **_AT)


def _lower_unaryop(lowering: _Lowering, node: ast.UnaryOp) -> ast.expr:
    if type(node.op) not in _UNARY:
        raise _Rejected(f"operator {type(node.op).__name__} not allowed; {_ALLOWED_HINT}")
    return ast.UnaryOp(type(node.op)(), lowering.lower(node.operand), **_AT)


def _lower_boolop(lowering: _Lowering, node: ast.BoolOp) -> ast.expr:
    return ast.BoolOp(type(node.op)(), [lowering.lower(v) for v in node.values], **_AT)


def _lower_compare(lowering: _Lowering, node: ast.Compare) -> ast.expr:
    for op_node in node.ops:
        if type(op_node) not in _COMPARE:
            raise _Rejected(f"comparison {type(op_node).__name__} not allowed; use < <= > >= == !=")
    left, comparators = lowering.lower(node.left), [lowering.lower(c) for c in node.comparators]
    return ast.Compare(left, [type(op)() for op in node.ops], comparators, **_AT)


def _lower_ifexp(lowering: _Lowering, node: ast.IfExp) -> ast.expr:
    return ast.IfExp(lowering.lower(node.test), lowering.lower(node.body), lowering.lower(node.orelse), **_AT)


def _lower_call(lowering: _Lowering, node: ast.Call) -> ast.expr:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in _FUNCTIONS:
        shown = name or "this"
        raise _Rejected(f"calling {shown!r} not allowed; functions: {', '.join(_FUNCTIONS)}")
    if node.keywords:
        raise _Rejected(f"keyword arguments not allowed in {name}()")
    _, least, most = _FUNCTIONS[name]
    if not least <= len(node.args) <= most:
        expected = str(least) if least == most else f"{least} to {most}"
        raise _Rejected(f"{name}() takes {expected} arguments, got {len(node.args)}")
    lowering.count()  # the function's name, a term of the source
    function = ast.Name(f"_{name}", ast.Load(), **_AT)
    return ast.Call(function, [lowering.lower(arg) for arg in node.args], [], **_AT)


_LOWER: dict[type[ast.AST], Callable[[_Lowering, Any], ast.expr]] = {
    ast.Constant: _lower_constant,
    ast.Name: _lower_name,
    ast.BinOp: _lower_binop,
    ast.UnaryOp: _lower_unaryop,
    ast.BoolOp: _lower_boolop,
    ast.Compare: _lower_compare,
    ast.IfExp: _lower_ifexp,
    ast.Call: _lower_call,
}

_RUNTIME: dict[str, Any] = {"_power": _power, **{f"_{name}": f for name, (f, _, _) in _FUNCTIONS.items()}}
"""The names a checked tree calls: ``_power`` and ``_min``, ``_max``, ... (a source's names
are ``step``, ``pi`` and ``e`` only, so it reaches none of these but through the checks)."""

_GLOBALS: dict[str, Any] = {"__builtins__": {}, **_RUNTIME}
"""Every expression function's globals, shared: a checked tree assigns nothing."""
