"""The ``lrserve`` command: ``lrserve serve`` starts the server; the operator commands
(``runs``, ``control``, ``preview``, ``history``, ``lr-finder``) come from the client package."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import ipaddress
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the server's packages (the `server` extra) load only for `lrserve serve`
    from lrserve.service.settings import Settings

DEFAULT_DB = "sqlite:///./lrserve.db"
"""Where ``lrserve serve`` keeps its database unless told (``Settings.db``'s default)."""

SERVER_EXTRA = "pip install 'lrserve[server]'"
SERVER_PACKAGES = ("fastapi", "uvicorn", "pydantic_settings", "sqlalchemy", "prometheus_client", "torch")
"""What ``lrserve serve`` needs beyond the client (the `server` extra), by import name."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_serve_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve", help="start the server", description="Start the lrserve HTTP server (uvicorn)."
    )
    # Flags override the LRSERVE_* variables (a flag not given leaves its variable's value).
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1, or LRSERVE_HOST)")
    serve.add_argument("--port", type=int, default=None,
                       help="port (default 8000, or LRSERVE_PORT)")
    serve.add_argument("--db", default=None,
                       help="database URL: sqlite:///PATH or postgresql+psycopg://... "
                            f"(default {DEFAULT_DB}, or LRSERVE_DB)")
    serve.add_argument("--health-port", type=int, default=None,
                       help="a port of its own for GET /healthz and /readyz, which a flood on the API's "
                            "port does not delay (or LRSERVE_HEALTH_PORT; default: none)")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    serve.add_argument("--db-wait", type=float, default=None,
                       metavar="SECONDS",
                       help="at start-up, wait up to this long for the database to be reachable "
                            "(default 0; or LRSERVE_DB_WAIT_S, e.g. 60 where the database starts alongside)")
    serve.add_argument("--tokens-file", default=None,
                       help="file with one role:token per line (or LRSERVE_TOKENS_FILE; "
                            "or set LRSERVE_TOKENS)")
    serve.add_argument("--create-db", action="store_true", default=None,
                       help="create the SQLite database even where one existed and is gone "
                            "(default: refuse to start without it; or LRSERVE_CREATE_DB=1)")
    serve.add_argument("--webhooks-file", default=None,
                       help="JSON file listing webhook endpoints (or LRSERVE_WEBHOOKS_FILE, or set "
                            "LRSERVE_WEBHOOKS; see docs/events.md)")
    serve.add_argument("--insecure", action="store_true", default=None,
                       help="allow a non-loopback bind without any token (anyone may steer runs; "
                            "or LRSERVE_INSECURE=1)")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--access-log", action="store_true",
                       help="log every request (off by default: a line per request costs the hot path "
                            "more than it answers; /metrics counts requests by route and status)")
    serve.set_defaults(func=serve_command)


FLAGS = {
    "host": "--host", "port": "--port", "db": "--db", "db_wait_s": "--db-wait",
    "tokens_file": "--tokens-file", "create_db": "--create-db", "webhooks_file": "--webhooks-file",
    "insecure": "--insecure", "health_port": "--health-port",
}
"""The settings ``lrserve serve`` takes as flags: each ``Settings`` field, and its flag."""

SHUTDOWN_GRACE_S = 5
"""On SIGTERM, how long open requests (event streams never end by themselves) may finish."""

STARTUP_FAILURE = 3
"""The exit status when the server did not start (uvicorn's)."""


def fail(problem: str) -> int:
    """One line on stderr and exit status 1: how every start-up problem is told."""
    print(f"lrserve: cannot start: {problem}", file=sys.stderr)
    return 1


def serve_command(args: argparse.Namespace) -> int:
    # Start-up runs without the cyclic collector: importing torch, FastAPI, pydantic and
    # SQLAlchemy makes ~200,000 long-lived objects and almost no garbage, and each collection
    # of the oldest generation re-scanned them all (~0.15 s of the imports after torch's,
    # ~0.07 s of torch's own, load ~2). The app's warm-up turns it back on once the start-up
    # objects are frozen (``app._warm_up_torch``); a start that fails turns it on here.
    gc.disable()
    try:
        return _serve(args)
    finally:
        gc.enable()


def _serve(args: argparse.Namespace) -> int:
    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:  # a client-only install: the operator commands work, serving does not
        return fail(f"the server's packages are not installed ({', '.join(missing)}): {SERVER_EXTRA}")
    from lrserve.service.auth import TokenError, load_tokens
    from lrserve.service.connections import raise_fd_limit
    from lrserve.service.events.webhooks import WebhookConfigError, load_webhooks

    given = {field: getattr(args, flag.lstrip("-").replace("-", "_")) for field, flag in FLAGS.items()}
    settings, problem = build_settings({k: v for k, v in given.items() if v is not None})
    if settings is None:
        return fail(problem or "bad settings")
    try:  # the set the server will use: a configuration that yields none is refused there
        tokens = load_tokens(settings.tokens, settings.tokens_file)
    except TokenError as exc:
        return fail(str(exc))
    try:
        load_webhooks(settings.webhooks, settings.webhooks_file)
    except WebhookConfigError as exc:
        return fail(str(exc))
    if not tokens and not is_loopback(settings.host) and not settings.insecure:
        print(
            f"lrserve: refusing to listen on {settings.host} without tokens: anyone could steer your runs.\n"
            "Set LRSERVE_TOKENS or --tokens-file, bind 127.0.0.1, or pass --insecure.",
            file=sys.stderr,
        )
        return 2
    problem = check_database(settings.db, settings.db_wait_s, create_db=settings.create_db,
                             sqlite_synchronous=settings.sqlite_synchronous)
    if problem is not None:
        return fail(problem)
    if settings.health_port is not None:
        from lrserve.service.health import port_problem

        problem = port_problem(settings.host, settings.health_port)
        if problem is not None:
            return fail(problem)
    problem = raise_fd_limit(settings.max_connections)
    if problem is not None:
        print(f"lrserve: warning: {problem}", file=sys.stderr)
    return run_server(settings, workers=args.workers, log_level=args.log_level, access_log=args.access_log)


def build_settings(flags: dict[str, Any]) -> tuple[Settings | None, str | None]:
    """The server's one ``Settings``: ``flags`` (field: value, as given) over the ``LRSERVE_*``
    variables over the defaults; or the first bad one, in a line naming its flag or variable."""
    from lrserve.service.settings import Settings
    from pydantic import ValidationError

    try:
        return Settings(**flags), None
    except ValidationError as exc:
        error = exc.errors()[0]
        field = "_".join(str(p) for p in error["loc"])
        name = FLAGS[field] if field in flags else "LRSERVE_" + field.upper()
        message = str(error["msg"]).removeprefix("Value error, ")
        if field in ("db", "tokens"):  # may hold a password or a token: not echoed
            return None, f"{name}: {message}"
        return None, f"{name}: {message} (got {str(error.get('input'))[:80]!r})"


def run_server(settings: Settings, *, workers: int, log_level: str, access_log: bool) -> int:
    """Serve until stopped: ``workers`` processes, each building its app from ``settings``
    (handed over as an object, pickled to each worker, not through the environment)."""
    import uvicorn
    from lrserve.service.workers import AppFactory, GuardedProtocol
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        AppFactory(settings), factory=True, host=settings.host, port=settings.port, workers=workers,
        log_level=log_level, access_log=access_log,
        # request timeout, connection limit; uvicorn's annotation asks for a protocol class, and
        # only calls it: this is a factory of one, picklable to the workers
        http=GuardedProtocol.of(settings),  # type: ignore[arg-type]
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    if config.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else STARTUP_FAILURE


def check_database(url: str, wait_s: float, *, create_db: bool = False,
                   sqlite_synchronous: str = "NORMAL") -> str | None:
    """Open the store once before any worker starts: one clear line instead of N tracebacks.
    It creates or migrates the database, so with the settings' ``sqlite_synchronous``.

    Returns:
        ``None`` when the database is usable (created or migrated now), else why not, in
        one line that names the host or file and never the password.
    """
    from lrserve.service.errors import StoreUnavailable
    from lrserve.service.store import wait_for_store

    def waiting(error: StoreUnavailable, left: float) -> None:
        print(f"lrserve: waiting for the database ({left:.0f} s left): {error}", file=sys.stderr)

    try:
        store = wait_for_store(url, wait_s=wait_s, create_db=create_db, on_wait=waiting,
                               sqlite_synchronous=sqlite_synchronous)
    except (ValueError, StoreUnavailable) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    store.close()
    return None


def build_parser(*, operator_commands: bool = True) -> argparse.ArgumentParser:
    """The ``lrserve`` parser; ``operator_commands=False`` leaves out the client's commands (and
    their imports: ``lrserve serve`` starts without them)."""
    parser = argparse.ArgumentParser(
        prog="lrserve", description="Learning-rate schedules served over HTTP."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(subparsers)
    if not operator_commands:
        return parser
    try:
        from lrserve.client._cli import add_operator_commands
    except ImportError:  # the operator commands are optional for a server-only install
        pass
    else:
        add_operator_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    serving = bool(argv) and argv[0] == "serve" and not {"-h", "--help"} & set(argv)
    args = build_parser(operator_commands=not serving).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
