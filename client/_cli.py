"""The operator commands of ``lrserve``: ``runs``, ``control``, ``preview``, ``history``,
``lr-finder``.

``service/cli.py`` adds them next to ``serve`` with ``add_operator_commands``; ``main()``
runs them alone. Exit codes: 0 ok, 1 the server reported an error (its words on stderr),
2 usage error, 3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import httpx
from lrserve.client._client import DEFAULT_URL, ENV_TOKEN, ENV_URL, LRClient
from lrserve.client._exceptions import ServerError, TransportError

__all__ = [
    "EXIT_OK",
    "EXIT_SERVER_ERROR",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "add_operator_commands",
    "main",
]

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
DEFAULT_PREVIEW_STEPS = 100
DEFAULT_PREVIEW_BASE_LR = 0.1
_STATUSES = ("active", "held", "stopped")

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A command-line value the command cannot use (exit code 2)."""


# -- the parser ------------------------------------------------------------------------------


def add_operator_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``runs``, ``control``, ``preview``, ``history`` and ``lr-finder`` to an ``lrserve`` parser.

    Args:
        subparsers: What ``parser.add_subparsers()`` returned; each command sets ``func``.
    """
    common = _common_options()
    _add_runs(subparsers, common)
    _add_control(subparsers, common)
    _add_preview(subparsers, common)
    _add_history(subparsers, common)
    _add_lr_finder(subparsers, common)
    _add_webhooks(subparsers, common)


def main(argv: Sequence[str] | None = None, *, http_client: httpx.Client | None = None) -> int:
    """Run one operator command; returns its exit code.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).
        http_client: An ``httpx.Client`` to talk through (test seam).
    """
    parser = argparse.ArgumentParser(
        prog="lrserve", description="Operate lrserve runs: list, steer, preview, export."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_operator_commands(subparsers)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's usage errors and --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    args.http_client = http_client
    return int(args.func(args))


def _common_options() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's default
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"server URL (default: ${ENV_URL}, else {DEFAULT_URL})",
    )
    group.add_argument("--token", default=argparse.SUPPRESS, help=f"bearer token (default: ${ENV_TOKEN})")
    return common


def _add_runs(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    runs = subparsers.add_parser(
        "runs", parents=[common], help="list or show runs", description="List or show runs."
    )
    actions = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", parents=[common], help="list runs", description="List runs, newest first."
    )
    listing.add_argument(
        "--label", action="append", default=[], metavar="KEY:VALUE", help="filter (repeatable)"
    )
    listing.add_argument("--status", choices=_STATUSES, help="filter by status")
    listing.add_argument(
        "--stale", action="store_true", help="only active runs no rank has asked about lately (the server's "
        "LRSERVE_STALE_AFTER_S)"
    )
    listing.add_argument("--limit", type=_positive_int, help="most runs to list")
    listing.add_argument("--cursor", help="continue after this page cursor")
    listing.add_argument("--json", action="store_true", help="print the server's JSON")
    listing.set_defaults(func=_command(_runs_list))
    show = actions.add_parser(
        "show", parents=[common], help="show one run", description="Show one run as JSON."
    )
    show.add_argument("run_id", metavar="RUN")
    show.set_defaults(func=_command(_runs_show))


class _ControlParser(argparse.ArgumentParser):
    """``control``'s parser: with ``--selector`` there is no RUN; a placeholder stands in for it.

    argparse gives the first word to RUN, so ``control --selector sweep=7 scale 0.5`` would
    read ``scale`` as a run id; the placeholder (never a valid run id) keeps the words in place.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        if any(w == "--selector" or w.startswith("--selector=") for w in words):
            words.insert(0, _FLEET)
        return super().parse_known_args(words, namespace)


_FLEET = "@selector"


def _add_control(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    fleet = argparse.ArgumentParser(add_help=False)  # on control and on every action: any order works
    group = fleet.add_argument_group("fleet and audit")
    group.add_argument(
        "--selector", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE[,KEY=VALUE]",
        help="act on every run carrying these labels instead of one RUN (repeatable)",
    )
    group.add_argument(
        "--status", action="append", choices=_STATUSES, default=argparse.SUPPRESS,
        help="with --selector: only runs with this status (repeatable)",
    )
    group.add_argument("--reason", default=argparse.SUPPRESS, help="why: recorded on the action's events")
    group.add_argument(
        "--dry-run", action="store_true", default=argparse.SUPPRESS,
        help="with --selector: list the runs that match, change nothing",
    )
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the server's JSON"
    )
    control = subparsers.add_parser(
        "control",
        parents=[common, fleet],
        help="steer a running job, or every run a selector matches (admin)",
        description="Apply one operator action to a run, or with --selector to every run whose "
        "labels (and --status) match, each at its own first free step. It lands on the first "
        "step no rank has been handed yet, or at --at-step (one run only).",
        usage="%(prog)s (RUN | --selector KEY=VALUE[,KEY=VALUE]) ACTION [ARGS] [--reason TEXT] "
        "[--dry-run] [--json]",
    )
    control.__class__ = _ControlParser  # see its docstring; argparse builds subparsers itself
    control.add_argument("run_id", metavar="RUN", help="the run (leave out with --selector)")
    actions = control.add_subparsers(dest="action", required=True, metavar="ACTION")
    at_step = argparse.ArgumentParser(add_help=False)
    at_step.add_argument(
        "--at-step",
        type=_nonnegative_int,
        metavar="STEP",
        help="apply at this step (above the horizon)",
    )
    parents = [common, at_step, fleet]
    set_lr = actions.add_parser("set-lr", parents=parents, help="set the LR (one, or one per param group)")
    set_lr.add_argument(
        "lrs", nargs="+", type=_finite_float, metavar="LR", help="one LR for every group, or one per group"
    )
    set_lr.set_defaults(func=_command(_control), make_body=_set_lr_body)
    scale = actions.add_parser("scale", parents=parents, help="multiply the current LRs")
    scale.add_argument("factor", type=_finite_float, metavar="FACTOR")
    scale.set_defaults(func=_command(_control), make_body=lambda a: {"action": "scale", "factor": a.factor})
    replace = actions.add_parser("replace", parents=parents, help="replace the schedule from that step on")
    replace.add_argument("spec", metavar="SPEC", help="schedule spec: a JSON file or inline JSON")
    replace.set_defaults(
        func=_command(_control),
        make_body=lambda a: {"action": "replace_schedule", "schedule": _load_spec(a.spec)},
    )
    for name, text in (
        ("hold", "freeze the schedule's clock"),
        ("resume", "let a held schedule run on"),
        ("stop", "ask the job to stop (should_stop)"),
    ):
        plain = actions.add_parser(name, parents=parents, help=text)
        plain.set_defaults(func=_command(_control), make_body=functools.partial(_plain_body, name))


def _add_preview(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    preview = subparsers.add_parser(
        "preview",
        parents=[common],
        help="print (or plot) a schedule's curve without creating a run",
        description="Print the values of a schedule at steps 0 .. N-1, as a job would get them.",
    )
    preview.add_argument("spec", metavar="SPEC", help="schedule spec: a JSON file or inline JSON")
    preview.add_argument(
        "--base-lr",
        action="append",
        type=_finite_float,
        dest="base_lrs",
        metavar="LR",
        help=f"base LR of a param group (repeatable; default {DEFAULT_PREVIEW_BASE_LR})",
    )
    preview.add_argument(
        "--base-momentum",
        action="append",
        type=_finite_float,
        dest="base_momentums",
        metavar="M",
        help="base momentum of a param group (repeatable; for momentum-cycling schedules)",
    )
    preview.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_PREVIEW_STEPS,
        metavar="N",
        help=f"how many steps (default {DEFAULT_PREVIEW_STEPS})",
    )
    preview.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="values reported with step() calls 1, 2, ... (empty: no report); repeatable",
    )
    preview.add_argument("--plot", metavar="FILE.png", help="also draw the curve into a PNG")
    preview.add_argument("--json", action="store_true", help="print the server's JSON")
    preview.set_defaults(func=_command(_preview))


def _add_history(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    history = subparsers.add_parser(
        "history",
        parents=[common],
        help="export a run's LRs, metrics and events",
        description="Export a run's history. CSV has one row per point: series,step,value,actor,reason "
        "(series: lr[i], momentum[i], a metric name, or event:KIND; actor and reason: who caused "
        "an event and the words they gave).",
    )
    history.add_argument("run_id", metavar="RUN")
    history.add_argument("--format", choices=("csv", "json"), default="csv", help="default csv")
    history.add_argument(
        "--max-points", type=_positive_int, metavar="N",
        help="downsample each series to N points (events: the latest N)"
    )
    history.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    history.set_defaults(func=_command(_history))


def _add_lr_finder(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    finder = subparsers.add_parser(
        "lr-finder",
        parents=[common],
        help="print (or plot) a range test's loss curve and suggested LR",
        description="Print the LR range test of a run (schedule LRRangeTest): each LR with the "
        "smoothed loss measured at it, the two suggestions (steepest fall, lowest loss / 10), the "
        "chosen LR, and whether the test is done and at which step the run switched. A run "
        "whose schedule is not a range test is a server error (exit 1).",
        epilog="table: summary then one row per point (mark names the suggestions' points); "
        "csv: the curve only (lr,smoothed_loss; empty where not finite), the summary on stderr; "
        "json: the server's answer.",
    )
    finder.add_argument("run_id", metavar="RUN")
    finder.add_argument("--format", choices=("table", "json", "csv"), default="table", help="default table")
    finder.add_argument("--plot", metavar="FILE.png", help="also draw the curve into a PNG")
    finder.set_defaults(func=_command(_lr_finder))


def _add_webhooks(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    webhooks = subparsers.add_parser(
        "webhooks", help="webhook delivery status",
        description="Webhook endpoints the server delivers events to (docs/events.md).")
    actions = webhooks.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    status = actions.add_parser(
        "status", parents=[common], help="each endpoint's queue, deliveries and last error (admin)",
        description="Each configured endpoint: events waiting (pending, of which retrying), "
        "delivered, failed attempts, the last error. Counts cover every replica.")
    status.add_argument("--json", action="store_true", help="print the server's answer")
    status.set_defaults(func=_command(_webhooks_status))


# -- running a command -----------------------------------------------------------------------


def _command(fn: Callable[[argparse.Namespace, LRClient], int | None]) -> Command:
    """Wrap a command: open the client, turn errors into messages and exit codes."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            with _client_for(args) as api:
                return int(fn(args, api) or EXIT_OK)
        except UsageError as exc:
            _error(f"lrserve {args.command}: error: {exc}")
            return EXIT_USAGE
        except TransportError as exc:
            _error(f"lrserve: cannot reach the server at {_url_of(args)}: {exc}")
            return EXIT_UNREACHABLE
        except ServerError as exc:
            _error(_describe(exc))
            return EXIT_SERVER_ERROR
        except BrokenPipeError:  # `lrserve preview ... | head`: the reader has seen enough
            _silence_stdout()
            return EXIT_OK

    return run


def _client_for(args: argparse.Namespace) -> LRClient:
    return LRClient(
        getattr(args, "url", None) or _url_of(args),
        token=getattr(args, "token", None),
        http_client=getattr(args, "http_client", None),
    )


def _url_of(args: argparse.Namespace) -> str:
    return getattr(args, "url", None) or os.environ.get(ENV_URL) or DEFAULT_URL


def _describe(exc: ServerError) -> str:
    lines = [f"lrserve: {exc.detail} (HTTP {exc.status_code}{', ' + exc.code if exc.code else ''})"]
    for error in exc.errors:
        field, message = error.get("field"), error.get("message")
        if field and message and message not in exc.detail:
            lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second BrokenPipeError at interpreter exit
    except (OSError, ValueError):
        pass


def _error(message: str) -> None:
    print(message, file=sys.stderr)


# -- the commands ----------------------------------------------------------------------------


def _runs_list(args: argparse.Namespace, api: LRClient) -> int:
    for label in args.label:
        if ":" not in label:
            raise UsageError(f"--label must be KEY:VALUE, got {label!r}")
    page = api.list_runs(labels=args.label, status=args.status, limit=args.limit, cursor=args.cursor,
                         stale=args.stale)
    if args.json:
        _print_json(page)
        return EXIT_OK
    runs = _items_of(page)
    rows = [
        [
            str(run.get("run_id", "")),
            str(run.get("status", "")) + (" (stale)" if run.get("stale") else ""),
            str(run.get("horizon", "")),
            " ".join(_fmt(x) for x in run.get("lrs") or []),
            ",".join(f"{k}={v}" for k, v in (run.get("labels") or {}).items()),
        ]
        for run in runs
    ]
    _print_table(["RUN", "STATUS", "HORIZON", "LR", "LABELS"], rows)
    cursor = page.get("next_cursor") or page.get("cursor") if isinstance(page, Mapping) else None
    if cursor:
        print(f"(more: --cursor {cursor})")
    return EXIT_OK


def _runs_show(args: argparse.Namespace, api: LRClient) -> int:
    _print_json(api.read_run(args.run_id))
    return EXIT_OK


def _control(args: argparse.Namespace, api: LRClient) -> int:
    body = dict(args.make_body(args))
    reason = getattr(args, "reason", None)
    if args.run_id == _FLEET:
        return _control_fleet(args, api, body, reason)
    for option in ("status", "dry_run"):
        if getattr(args, option, None):
            raise UsageError(f"--{option.replace('_', '-')} goes with --selector, not with a RUN")
    action = body.pop("action")
    if reason is not None:
        body["reason"] = reason
    answer = api.control_run(args.run_id, action, at_step=args.at_step, **body)
    if getattr(args, "json", False):
        _print_json(answer)
        return EXIT_OK
    applied = answer.get("applied_at") if isinstance(answer, Mapping) else None
    print(f"{action} applied to run {args.run_id} at step {applied}")
    return EXIT_OK


def _control_fleet(
    args: argparse.Namespace, api: LRClient, action: dict[str, Any], reason: str | None
) -> int:
    if args.at_step is not None:
        raise UsageError("--at-step is for one RUN: with --selector each run takes the action at its own "
                         "first free step")
    labels: dict[str, str] = {}
    for item in ",".join(args.selector).split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            raise UsageError(f"--selector takes KEY=VALUE pairs, got {item!r}")
        labels[key] = value
    dry_run = bool(getattr(args, "dry_run", False))
    answer = api.control_fleet(labels, action, statuses=getattr(args, "status", None), reason=reason,
                               dry_run=dry_run)
    results = list(answer.get("results") or [])
    refused = [r for r in results if "error" in r]
    if getattr(args, "json", False):
        _print_json(answer)
    elif dry_run:
        _print_table(["RUN", "STATUS", "HORIZON"], [
            [str(r.get("run_id")), str(r.get("status")), str(r.get("horizon"))] for r in results])
        print(f"{answer.get('matched')} runs would take {action['action']} (dry run: nothing changed)")
    else:
        _print_table(["RUN", "RESULT"], [
            [str(r.get("run_id")), f"refused: {r['error'].get('detail')}" if "error" in r
             else f"applied at step {r.get('applied_at')}"] for r in results])
        print(f"{action['action']} applied to {len(results) - len(refused)} of {answer.get('matched')} runs")
    if refused:
        _error(f"lrserve: {len(refused)} of {answer.get('matched')} runs refused {action['action']}")
        return EXIT_SERVER_ERROR
    return EXIT_OK


def _set_lr_body(args: argparse.Namespace) -> dict[str, Any]:
    if len(args.lrs) == 1:
        return {"action": "set_lr", "lr": args.lrs[0]}
    return {"action": "set_lr", "lrs": list(args.lrs)}


def _plain_body(action: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"action": action}


def _preview(args: argparse.Namespace, api: LRClient) -> int:
    spec = _load_spec(args.spec)
    metrics = _parse_metrics(args.metric)
    figure_class = _figure_class() if args.plot else None
    answer = api.preview_schedule(
        spec,
        args.base_lrs or [DEFAULT_PREVIEW_BASE_LR],
        steps=args.steps,
        base_momentums=args.base_momentums,
        metrics=metrics or None,
    )
    if args.json:
        _print_json(answer)
    else:
        _print_curve(answer)
    if figure_class is not None:
        _plot(figure_class, answer, args.plot, title=str(spec.get("type", "")))
        print(f"wrote {args.plot}", file=sys.stderr)
    return EXIT_OK


def _history(args: argparse.Namespace, api: LRClient) -> int:
    history = api.read_history(args.run_id, max_points=args.max_points)
    shown, total = len(history.get("events") or []), history.get("events_total")
    if isinstance(total, int) and total > shown:  # the latest ``max_points`` of them
        print(f"lrserve history: the latest {shown} of the run's {total} events (every one is in "
              "the event stream, GET /v1/events?run_id=RUN&since=0)", file=sys.stderr)
    text = json.dumps(history, indent=2) + "\n" if args.format == "json" else _history_csv(history)
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _webhooks_status(args: argparse.Namespace, api: LRClient) -> int:
    answer = api.request("GET", "/v1/webhooks")
    if args.json:
        _print_json(answer)
        return EXIT_OK
    rows = [[str(w["url"]), str(w["pending"]), str(w["retrying"]), str(w["delivered"]),
             str(w["failed_attempts"]), w["last_error"] or "-"] for w in _items_of(answer)]
    if not rows:
        print("no webhooks configured (LRSERVE_WEBHOOKS or --webhooks-file)")
        return EXIT_OK
    _print_table(["URL", "PENDING", "RETRYING", "DELIVERED", "FAILED", "LAST ERROR"], rows)
    return EXIT_OK


def _lr_finder(args: argparse.Namespace, api: LRClient) -> int:
    figure_class = _figure_class() if args.plot else None
    finder = api.read_lr_finder(args.run_id)
    if args.format == "json":
        _print_json(finder)
    elif args.format == "csv":
        sys.stdout.write(_finder_csv(finder))
        _error(" ".join(f"{k}={v}" for k, v in _finder_summary(finder)))
    else:
        _print_finder(args.run_id, finder)
    if figure_class is not None:
        schedule = api.read_run(args.run_id).get("schedule") or {}  # the mode decides the x scale
        _plot_finder(figure_class, finder, schedule, args.plot, title=f"{args.run_id}: LR range test")
        print(f"wrote {args.plot}", file=sys.stderr)
    return EXIT_OK


# -- input -----------------------------------------------------------------------------------


def _load_spec(text: str) -> dict[str, Any]:
    """A schedule spec from a JSON file path, or from inline JSON."""
    source = text
    if not text.lstrip().startswith("{"):
        try:
            with open(text, encoding="utf-8") as spec_file:
                source = spec_file.read()
        except OSError as exc:
            raise UsageError(f"SPEC is neither inline JSON nor a readable file: {exc}") from exc
    try:
        spec = json.loads(source)
    except ValueError as exc:
        raise UsageError(f"SPEC is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise UsageError('SPEC must be a JSON object such as {"type": "StepLR", "step_size": 30}')
    return spec


def _parse_metrics(items: Sequence[str]) -> dict[str, list[float | None]]:
    metrics: dict[str, list[float | None]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--metric must be NAME=V1,V2,..., got {item!r}")
        try:
            metrics[name] = [float(v) if v.strip() else None for v in values.split(",")]
        except ValueError as exc:
            raise UsageError(f"--metric {name}: {exc}") from exc
    return metrics


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


# -- output ----------------------------------------------------------------------------------


def _print_json(data: Any, out: TextIO | None = None) -> None:
    print(json.dumps(data, indent=2), file=out or sys.stdout)


def _items_of(page: Any) -> list[Mapping[str, Any]]:
    if not isinstance(page, list):
        page = next((page[key] for key in ("data", "runs", "items") if isinstance(page.get(key), list)), [])
    items: list[Mapping[str, Any]] = page
    return items


def _fmt(value: Any) -> str:
    return format(value, ".8g") if isinstance(value, float) else str(value)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    for row in [list(header), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _print_curve(answer: Mapping[str, Any]) -> None:
    lrs = answer.get("lrs") or []
    moms = answer.get("momentums")
    groups = len(lrs[0]) if lrs else 0
    header = ["step", *(f"lr[{g}]" for g in range(groups))]
    if moms:
        header += [f"momentum[{g}]" for g in range(len(moms[0]))]
    rows = []
    for step, row in enumerate(lrs):
        cells = [str(step), *(_fmt(v) for v in row)]
        if moms:
            cells += [_fmt(v) for v in moms[step]]
        rows.append(cells)
    _print_table(header, rows)


def _history_csv(history: Mapping[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["series", "step", "value", "actor", "reason"])
    for prefix, key in (("lr", "lrs"), ("momentum", "momentums")):
        series = history.get(key) or {}
        for step, values in zip(series.get("steps") or [], series.get("values") or [], strict=False):
            for group, value in enumerate(values):
                writer.writerow([f"{prefix}[{group}]", step, repr(float(value)), "", ""])
    for name, series in sorted((history.get("metrics") or {}).items()):
        for step, value in zip(series.get("steps") or [], series.get("values") or [], strict=False):
            writer.writerow([name, step, repr(float(value)), "", ""])
    for event in history.get("events") or []:
        writer.writerow([f"event:{event.get('kind')}", event.get("step"), "", event.get("actor") or "",
                         event.get("reason") or ""])
    return out.getvalue()


def _finder_summary(finder: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The test's outcome as (name, text) pairs: what an operator copies into a config."""
    suggestions = finder.get("suggestions") or {}
    return [
        ("chosen", _fmt_opt(finder.get("chosen"))),
        ("steepest", _fmt_opt(suggestions.get("steepest"))),
        ("min_over_10", _fmt_opt(suggestions.get("min_over_10"))),
        ("done", "yes" if finder.get("done") else "no"),
        ("switched_at", _fmt_opt(finder.get("switched_at"))),
    ]


def _finite_or_none(value: Any) -> float | None:
    """A number of an answer as a float, or None where it is not finite (the server spells
    those "NaN", "Infinity", "-Infinity"; older servers sent null)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fmt_opt(value: Any) -> str:
    return "-" if value is None else _fmt(value)


def _finder_marks(finder: Mapping[str, Any]) -> dict[int, list[str]]:
    """Which points the suggestions come from, by index: steepest and chosen are LRs of points,
    min_over_10 is the LR of the lowest point divided by 10."""
    suggestions = finder.get("suggestions") or {}
    wanted = [
        ("steepest", suggestions.get("steepest"), 1.0),
        ("chosen", finder.get("chosen"), 1.0),
        ("lowest loss", suggestions.get("min_over_10"), 10.0),
    ]
    marks: dict[int, list[str]] = {}
    for name, value, factor in wanted:
        if value is None:
            continue
        for i, lr in enumerate(finder.get("lrs") or []):
            if lr / factor == value:  # the server's own arithmetic: exact
                marks.setdefault(i, []).append(name)
                break
    return marks


def _print_finder(run_id: str, finder: Mapping[str, Any]) -> None:
    if finder.get("switched_at") is not None:
        state = f"switched at step {finder['switched_at']}"
    else:
        state = "done" if finder.get("done") else "running"
    print(f"run {run_id}: range test {state}")
    summary = _finder_summary(finder)
    width = max(len(name) for name, _ in summary)
    for name, text in summary:
        print(f"{name.ljust(width)}  {text}")
    lrs, losses = finder.get("lrs") or [], finder.get("losses") or []
    if not lrs:
        print("\n(no loss reported yet)")
        return
    marks = _finder_marks(finder)
    rows = [
        [str(i), _fmt(float(lr)), _fmt_opt(_finite_or_none(loss)), ", ".join(marks.get(i, []))]
        for i, (lr, loss) in enumerate(zip(lrs, losses, strict=False))
    ]
    print()
    _print_table(["point", "lr", "smoothed_loss", "mark"], rows)


def _finder_csv(finder: Mapping[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["lr", "smoothed_loss"])
    for lr, loss in zip(finder.get("lrs") or [], finder.get("losses") or [], strict=False):
        value = _finite_or_none(loss)
        writer.writerow([repr(float(lr)), "" if value is None else repr(value)])
    return out.getvalue()


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'lrserve[plot]'") from exc
    return Figure


def _plot(figure_class: Any, answer: Mapping[str, Any], path: str, *, title: str) -> None:
    lrs = answer.get("lrs") or []
    figure = figure_class(figsize=(8, 4.5))
    axes = figure.subplots()
    steps = list(range(len(lrs)))
    for group in range(len(lrs[0]) if lrs else 0):
        axes.plot(steps, [row[group] for row in lrs], label=f"lr[{group}]")
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot write {path}: {exc}") from exc


def _plot_finder(
    figure_class: Any, finder: Mapping[str, Any], schedule: Mapping[str, Any], path: str, *, title: str
) -> None:
    """Smoothed loss against LR, log x unless the test is linear (as Lightning plots it)."""
    lrs = [float(v) for v in finder.get("lrs") or []]
    losses = [float("nan") if v is None else float(v) for v in finder.get("losses") or []]  # "NaN" too
    figure = figure_class(figsize=(8, 4.5))
    axes = figure.subplots()
    axes.plot(lrs, losses, label=f"smoothed {schedule.get('monitor') or 'loss'}")
    if schedule.get("type") != "LRRangeTest" or schedule.get("mode", "exponential") == "exponential":
        axes.set_xscale("log")
    suggestions = finder.get("suggestions") or {}
    for name, value, style in (
        ("steepest", suggestions.get("steepest"), {"color": "tab:orange", "linestyle": "--"}),
        ("min / 10", suggestions.get("min_over_10"), {"color": "tab:purple", "linestyle": ":"}),
        ("chosen", finder.get("chosen"), {"color": "tab:green", "linestyle": "-"}),
    ):
        if value is not None and value > 0:
            axes.axvline(value, label=f"{name} {float(value):.3g}", **style)
    if finder.get("switched_at") is not None:
        title += f" (switched at step {finder['switched_at']})"
    axes.set_xlabel("learning rate")
    axes.set_ylabel("smoothed loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot write {path}: {exc}") from exc
