"""Real server processes on loopback: lrserve, its bench twin, and throwaway databases.

Every figure measures a real ``uvicorn`` process, started the way users start it, so what
is timed includes the HTTP stack, the event loop and the store, not a test client.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: nothing in the suite leaves this machine
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_ENV = ("LRSERVE_BENCH_PG", "TEST_DATABASE_URL")


# Ports for the servers started here (by the benchmarks and by the tests) come from below
# the kernel's ephemeral range (32768-60999 on Linux), so no outgoing connection of any
# process takes one between ``free_port()`` and the server's bind, nor while a killed
# server's port waits for its restart; under pytest-xdist each worker draws from its own
# slice, so parallel workers never collide (and a process never hands one out twice).
# A port handed out is also claimed for the life of this process, machine-wide, against every
# other process drawing ports here (other pytest sessions' workers of the same index draw
# from the same slice): between a server's kill and its restart nothing listens on its port,
# and a bind test alone let another test's server take it in that gap (the restart then
# failed to bind, or its readiness poll was answered by the other server).
_PORTS = range(12000, 32000)
_SLICE = 1000
_CLAIMS = Path(tempfile.gettempdir()) / f"lrserve-ports-{os.getuid()}.lock"  # a lock per port; per user: a
# file another user made would not open
_given: set[int] = set()
_claims_fd: int | None = None  # kept open: closing any descriptor of the file drops the locks
_random = random.Random()  # its own: a test seeding `random` must not make workers agree


def _port_slice() -> range:
    """An xdist worker's own slice (the first ones); any other process (a run without xdist,
    ``python -m bench``, also when a test starts it and it inherits the worker's variable)
    one of the last ten, by its pid."""
    slices = len(_PORTS) // _SLICE
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3"
    if "pytest" in sys.modules and worker[2:].isdigit():
        index = int(worker[2:]) % (slices - 10)
    else:
        index = slices - 10 + os.getpid() % 10
    start = _PORTS.start + index * _SLICE
    return range(start, start + _SLICE)


def _claim(port: int) -> bool:
    """Claim ``port`` until this process ends (the kernel drops a process's locks when it ends,
    however it ends): False when another process holds it."""
    global _claims_fd
    if _claims_fd is None:
        _claims_fd = os.open(_CLAIMS, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(_claims_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
    except OSError:
        return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on, never handed out before in this process, nor held by
    another living process that draws ports here (``_claim``)."""
    ports = _port_slice()
    for _ in range(4 * len(ports)):
        port = _random.choice(ports)
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        if not _claim(port):
            continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {ports}")


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on a fresh connection (stdlib only: cheap to call while polling)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


Scheduled = dict[str, tuple[int, int]]
"""Per thread (``PID/TID``): nanoseconds on a CPU, nanoseconds waiting for one (``Server.scheduled_ns``)."""
_NOT_INHERITED = {"LRSERVE_TOKENS", "LRSERVE_TOKENS_FILE"}  # a server is open unless `env` says


class Server:
    """One server process (its own session, so its workers stop with it): the one helper
    for a real server, used by the benchmarks and by the tests (``tests/live_server.py``).

    Args:
        db: Database URL (``--db``).
        log_dir: Where its log goes (``{name}-{port}.log``).
        app: ``"service"`` runs ``lrserve serve`` (what users run); ``"bench"``
            runs the same app plus ``GET /bench/ping`` (``bench._app``) under the same
            uvicorn settings, for the ceiling of the stack.
        port: Its port; a free one by default (a restart passes the old one).
        workers: uvicorn worker processes.
        env: Extra environment variables. The caller's ``LRSERVE_TOKENS`` and
            ``LRSERVE_TOKENS_FILE`` are not passed on: a server is open unless ``env`` says so.
        log_level: uvicorn's.
        args: More arguments for ``serve`` (``app="service"``).
        tree: Run the code of another checkout of the repository (its root), for a side-by-side
            comparison of two versions (``bench.side_by_side``); default: this one.
        hogs: Busy-looping processes at nice 0 started in the server's session, so in its
            scheduling group (``bench/hogs.py``), for as long as it runs; default none.
    """

    def __init__(self, db: str, log_dir: Path, *, app: str = "service", port: int | None = None,
                 workers: int = 1, env: dict[str, str] | None = None, name: str = "server",
                 log_level: str = "warning", args: tuple[str, ...] = (), tree: Path | None = None,
                 hogs: int = 0) -> None:
        self.db = db
        self.tree = Path(tree) if tree is not None else _repo_root()
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.app = app
        self.workers = workers
        self.log_level = log_level
        self.args = args
        self.hogs = hogs
        self.log_path = Path(log_dir) / f"{name}-{self.port}.log"
        inherited = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        self.env = {**inherited, "LRSERVE_DB": db, **(env or {})}
        if tree is not None:  # another checkout's code, imported before anything on the caller's path
            paths = (str(self.tree), self.env.get("PYTHONPATH"))
            self.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def command(self) -> list[str]:
        common = ["--host", HOST, "--port", str(self.port), "--workers", str(self.workers),
                  "--log-level", self.log_level]
        launcher = [sys.executable, str(Path(__file__).with_name("hogs.py")), str(self.hogs), "--"]
        hogs = launcher if self.hogs else []
        if self.app == "bench":
            return [*hogs, sys.executable, "-m", "uvicorn", "bench._app:create_app", "--factory", *common]
        return [*hogs, sys.executable, "-m", "lrserve.service", "serve", "--db", self.db, *common, *self.args]

    def spawn(self) -> Server:
        """Start the process and return at once (``wait_ready`` or ``first_answer`` next)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=self.env, cwd=self.tree,
                                     start_new_session=True, preexec_fn=_dies_with_its_starter())
        log.close()
        _running.add(self)
        return self

    def first_answer(self, path: str, timeout: float = 120.0, poll_s: float = 0.005) -> float:
        """Seconds from ``spawn`` to the first 200 answer to ``GET path``."""
        assert self.proc is not None
        deadline = self.started_at + timeout
        while True:  # asked at least once: a shared server may have started long before the ask
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_tail()}")
            try:
                status, _ = http_get(self.port, path, timeout=10.0)
            except OSError:
                status = 0
            if status == 200:
                return time.perf_counter() - self.started_at
            if time.perf_counter() >= deadline:
                raise RuntimeError(f"no answer to {path} within {timeout}s:\n{self.log_tail()}")
            time.sleep(poll_s)

    def wait_ready(self, timeout: float = 120.0) -> Server:
        self.first_answer("/readyz", timeout=timeout, poll_s=0.05)
        return self

    def start(self, timeout: float = 120.0) -> Server:
        return self.spawn().wait_ready(timeout)

    def pids(self, *, living: bool = False) -> list[int]:
        """The processes of this server (the uvicorn supervisor and its workers); ``living``:
        not those that are gone but not yet reaped (zombies: they hold nothing)."""
        if self.proc is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == self.proc.pid and not (living and fields[0] in "ZX"):
                found.append(int(entry))  # process group = session leader's pid
        return sorted(found)

    def spawned_pids(self) -> list[int]:
        """Its living processes but the first, less helpers such as the resource tracker: with one
        uvicorn worker, the big-work processes (``service/offload.py``)."""
        return [p for p in self.pids(living=True) if p != self.proc.pid and _is_worker(p)]

    def rss_bytes(self) -> int:
        """Resident memory of all its processes, from ``/proc/PID/status`` (VmRSS)."""
        return sum(rss_of(pid) for pid in self.pids())

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of all its processes so far (those gone: none)."""
        return sum(process_cpu_seconds(pid) or 0.0 for pid in self.pids())

    def scheduled_ns(self) -> Scheduled:
        """Per thread of its processes (``PID/TID``): (nanoseconds on a CPU, nanoseconds runnable
        but waiting for one) so far, from ``/proc/PID/task/TID/schedstat``: what requests cost
        the server, apart from how long a busy machine made it wait. Per thread, because a
        thread that exits takes its total with it (``scheduled_between``)."""
        times = {}
        for pid in self.pids():
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
                except OSError:
                    continue
                times[f"{pid}/{tid}"] = (int(fields[0]), int(fields[1]))
        return times

    def settle(self, idle_share: float = 0.1, window_s: float = 0.1, limit_s: float = 5.0) -> float:
        """Wait until the server is idle (below ``idle_share`` of a core over ``window_s``).

        A load generator that stops leaves answers queued in the server (thread pool work,
        replays); without this wait they would run during, and be charged to, the next load.
        Returns the seconds waited.
        """
        began = time.perf_counter()
        last = self.cpu_seconds()
        while time.perf_counter() - began < limit_s:
            time.sleep(window_s)
            now = self.cpu_seconds()
            if now - last <= idle_share * window_s:
                break
            last = now
        return time.perf_counter() - began

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown hooks run. Returns once every process
        of it is gone (``wait`` reaps only the first: ``--workers N``'s workers, which hold the
        listening socket and the database too, may still be dying)."""
        _running.discard(self)
        if self.proc is not None and (self.proc.poll() is None or self.pids(living=True)):
            # the group too when its leader is gone already: its workers may outlive it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._wait_group_gone()

    def _wait_group_gone(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while left := self.pids(living=True):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {left} of the server on port {self.port} outlived it")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after 10 s."""
        _running.discard(self)
        if self.proc is None:
            return
        if self.proc.poll() is not None:  # the leader is gone: what is left of its group goes too
            self.kill()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._wait_group_gone()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_running: set[Server] = set()  # spawned and not yet stopped or killed

_PR_SET_PDEATHSIG = 1  # prctl(2)


def _dies_with_its_starter() -> Callable[[], None] | None:
    """For ``Popen(preexec_fn=)``: the server is sent SIGTERM (it stops, and its workers with
    it) when the process that started it dies, even by SIGKILL, where ``_kill_leftovers``
    cannot run (a bench tool killed by its test's timeout left its server running before).
    Linux, and only from the main thread: the signal comes when the thread that started it
    ends."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    starter = os.getpid()

    def in_the_child() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:  # a sandbox that refuses it: said in the log
            os.write(2, f"bench: prctl(PR_SET_PDEATHSIG) refused (errno {ctypes.get_errno()}): "
                        "this server outlives its starter if that is killed\n".encode())
        if os.getppid() != starter:  # the starter died before the call: no signal will come
            os._exit(1)

    return in_the_child


@atexit.register
def _kill_leftovers() -> None:
    """A server its starter did not stop (a test that failed before its ``finally``) dies with
    the process that started it, instead of holding its port and database connections."""
    for server in list(_running):
        server.kill()


def process_cpu_seconds(pid: int) -> float | None:
    """One process's CPU time (user + system) so far, from ``/proc/PID/stat`` (its utime and
    stime, in clock ticks); ``None`` if there is no such process (any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # past the command's name, which may hold spaces and ")"
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _is_worker(pid: int) -> bool:
    """Workers (uvicorn's, big work's) are multiprocessing children; skip helpers such as the
    resource tracker, and a process gone since it was listed."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"resource_tracker" not in cmdline and b"semaphore_tracker" not in cmdline


def scheduled_between(before: Scheduled, after: Scheduled) -> tuple[int, int]:
    """(on-CPU ns, waiting ns) between two ``Server.scheduled_ns`` readings: threads started
    since count from zero; threads gone since are left out (what they did meanwhile is lost)."""
    on_cpu = waiting = 0
    for thread, (cpu, wait) in after.items():
        cpu0, wait0 = before.get(thread, (0, 0))
        on_cpu += cpu - cpu0
        waiting += wait - wait0
    return on_cpu, waiting


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def compile_tree(tree: Path | None = None) -> None:
    """Write the bytecode of a checkout's packages (``lrserve``, ``service``, ``client``,
    ``trainer``), as ``pip install`` does for the files it installs, so a cold start times what
    a user starts. Where ``PYTHONDONTWRITEBYTECODE`` is set (this workplace sets it) a checkout
    would otherwise compile its ~70 server modules from source at every start: ~0.12 s of a
    ~1.7 s start, which torch, the yardstick, never pays (its bytecode came with its install).
    Writes into the checkout's ``__pycache__`` folders (ignored by git), another one's too.

    Raises:
        RuntimeError: a module did not compile (the start would be timed from source).
    """
    import compileall

    root = Path(tree) if tree is not None else _repo_root()
    for package in ("lrserve", "service", "client", "trainer"):
        if (root / package).is_dir():
            if not compileall.compile_dir(str(root / package), quiet=1):
                raise RuntimeError(f"could not write the bytecode of {root / package}")


@contextlib.contextmanager
def workdir(prefix: str = "lrserve-bench-") -> Iterator[Path]:
    """A temporary folder for databases and server logs, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as path:
        yield Path(path)


def sqlite_url(folder: Path, name: str = "bench") -> str:
    return f"sqlite:///{folder / name}.db"


# -- PostgreSQL: one private schema per server set, dropped afterwards ----------------------


def pg_base_url() -> str:
    for name in PG_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_PG


def _pg_connect(url: str):  # -> psycopg.Connection
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://", 1)
    return psycopg.connect(plain, connect_timeout=3, autocommit=True)


def pg_problem() -> str | None:
    """Why PostgreSQL cannot be used here, or None when it can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'lrserve[postgres]')"
    try:
        _pg_connect(pg_base_url()).close()
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, bad credentials
        return f"PostgreSQL at {pg_base_url()} is not reachable: {str(exc).strip().splitlines()[0]}"
    return None


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh schema in the bench database; yields a URL whose ``search_path`` is it."""
    base = pg_base_url()
    name = f"lrserve_bench_{uuid.uuid4().hex[:10]}"
    with _pg_connect(base) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    from sqlalchemy import make_url

    url = make_url(base).update_query_dict({"options": f"-csearch_path={name}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with _pg_connect(base) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


class Pool:
    """The servers a suite run uses: fresh ones per figure, or (``share=True``: the tiny and
    quick sizes) one SQLite server and one pair of PostgreSQL servers, started together at
    the beginning and shared by every figure.

    Starting a server costs seconds here (Python, torch, and torch's lazy imports on the
    first run), which is most of a tiny run. Sharing does not make a measurement invalid,
    but only the default size's numbers (fresh servers) are meant to be quoted.
    """

    def __init__(self, work: Path, *, share: bool) -> None:
        self.work = work
        self.share = share
        self._stack = contextlib.ExitStack()
        self._sqlite: Server | None = None
        self._pg: dict[int, Server] = {}
        self._warmer: threading.Thread | None = None
        if share:
            self._sqlite = self._track(Server(sqlite_url(work, "shared"), work, app="bench", name="shared"))
            if pg_problem() is None:
                url = self._stack.enter_context(pg_schema())
                for workers in (1, 2):
                    self._pg[workers] = self._track(Server(url, work, workers=workers, name=f"pg{workers}"))
            self._warmer = threading.Thread(target=self._warm_all, name="bench-pool-warm", daemon=True)
            self._warmer.start()

    def _warm_all(self) -> None:
        """Create a run on each shared server (each worker, likely) while the first figure runs:
        the first run of a process pays torch's lazy imports (seconds), once."""
        body = json.dumps({"run_id": "pool-warm", "base_lrs": [0.1],
                           "schedule": {"type": "StepLR", "step_size": 10}})
        for server in [s for s in (self._sqlite, *self._pg.values()) if s is not None]:
            try:
                server.wait_ready()
                for _ in range(2 * server.workers - 1):  # fresh connections reach both workers
                    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
                    conn.request("POST", "/v1/runs", body, {"content-type": "application/json"})
                    conn.getresponse().read()
                    conn.close()
            except (OSError, RuntimeError):
                return  # best effort: a figure that needs the server will report the problem

    def _track(self, server: Server) -> Server:
        self._stack.callback(server.stop)
        return server.spawn()

    @contextlib.contextmanager
    def sqlite(self, name: str, *, app: str = "service") -> Iterator[Server]:
        """A started SQLite server (``app`` is ignored when shared: the bench app serves all)."""
        if self._sqlite is not None:
            yield self._sqlite.wait_ready()
            return
        server = Server(sqlite_url(self.work, name), self.work, app=app, name=name)
        try:
            yield server.start()
        finally:
            server.stop()

    @contextlib.contextmanager
    def postgres(self) -> Iterator[dict[int, Server]]:
        """Two started servers on one PostgreSQL schema: ``{1: one process, 2: two workers}``."""
        if self._pg:
            yield {w: s.wait_ready() for w, s in self._pg.items()}
            return
        with pg_schema() as url, contextlib.ExitStack() as stack:
            servers = {w: Server(url, self.work, workers=w, name=f"pg{w}") for w in (1, 2)}
            for server in servers.values():
                stack.callback(server.stop)
                server.spawn()
            yield {w: s.wait_ready() for w, s in servers.items()}

    def close(self) -> None:
        if self._warmer is not None:
            self._warmer.join(timeout=60)
        self._stack.close()
