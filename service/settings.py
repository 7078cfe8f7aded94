"""Server settings: one pydantic-settings class, read from ``LRSERVE_*`` variables.

Defaults run locally with no setup (an SQLite file in the working directory). They are
read once per server: ``lrserve serve`` builds one ``Settings`` from its flags and the
environment and hands that object to every part (and every worker process); nothing
reads the environment again. Tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from lrserve.service.background import BACKGROUND_NICE
from lrserve.service.cli import DEFAULT_DB  # defined there: the CLI's help needs no server packages
from lrserve.service.offload import OFFLOAD_NICE, OFFLOAD_SLICE_MS
from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SqliteSynchronous = Literal["NORMAL", "FULL", "EXTRA"]
"""SQLite's ``synchronous`` levels lrserve accepts. With WAL, ``NORMAL`` makes a commit survive
a crash of the process, ``FULL`` also a power loss; ``EXTRA`` syncs the directory too. ``OFF``
is not offered: a crash could lose acknowledged steps."""
SQLITE_SYNCHRONOUS: tuple[str, ...] = get_args(SqliteSynchronous)
DEFAULT_SQLITE_SYNCHRONOUS: SqliteSynchronous = "NORMAL"


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    """Everything the server can be told. Environment: ``LRSERVE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="LRSERVE_", extra="ignore")

    db: str = Field(DEFAULT_DB, description="Database URL: sqlite:///file.db or postgresql+psycopg://...")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    tokens: str = Field("", description="Comma-separated role:token pairs (roles: read, write, admin).")
    tokens_file: Path | None = Field(None, description="File with one role:token per line.")
    insecure: bool = Field(False, description="Allow a non-loopback bind without tokens.")
    create_db: bool = Field(
        False, description="Create the SQLite database even where one existed and is gone "
        "(else start-up refuses: it would start empty)."
    )
    db_wait_s: float = Field(
        0.0, ge=0,
        description="`lrserve serve`: how long to keep retrying the database at start-up after its "
        "first try failed.",
    )

    barrier_timeout_s: float = Field(
        30.0, gt=0, description="How long a metric barrier waits for every rank before deciding."
    )
    max_ahead: int = Field(10_000, ge=0, description="Most steps one window may return beyond `step`.")
    max_provisional: int = Field(
        100_000,
        ge=0,
        description="Most steps of a provisional tail (values after a window, ridden in outages).",
    )
    max_jump: int = Field(10_000, ge=1, description="Most steps one request may move the horizon.")
    request_timeout_s: float = Field(
        10.0, gt=0, description="A request's headers and body must arrive within this time (else 408)."
    )
    max_connections: int = Field(
        4096, ge=1, description="Open connections per server process; beyond, the oldest idle or "
        "half-sent one is closed with a 503 (or the new one, when every one is busy)."
    )
    work_budget: int = Field(
        500_000,
        ge=10_000,
        description=(
            "Most work one request may cause, in units of about one scheduler step of one param "
            "group: steps × (param groups + 6) × per-step cost of the schedule (service/engine/cost.py). "
            "Previews, history, step jumps and creates over it are a 422 `work_budget_exceeded`; "
            "windows asked ahead are cut to fit."
        ),
    )
    offload_workers: int = Field(
        1, ge=0, le=64, description="Worker processes per server process for big previews and creates "
        "(over service/offload.py's OFFLOAD_UNITS), so that they do not share the server's GIL; "
        "0: computed in the server's threads."
    )
    offload_nice: int = Field(
        OFFLOAD_NICE, ge=0, le=19, description="Nice value of the worker processes for big work "
        "(offload_workers; never below the server's own): above 0 the kernel runs the event loop first "
        "beside a busy worker, but CPU-bound work in the server's session or cgroup starves it (at 19, a "
        "1024-group create waited minutes: docs/hardening.md, \"The worker process's priority\"); "
        "0: the server's priority."
    )
    offload_slice_ms: float = Field(
        OFFLOAD_SLICE_MS, ge=0, le=100, description="Time slice in ms that the worker processes for big work "
        "ask of the kernel (0.1-100; asked on Linux 6.17 and later, where a long slice holds back no other "
        "task): longer than a request thread's, so that each request's thread preempts a busy worker as it "
        "wakes, at no cost to the worker's share of the CPU (service/scheduling.py); 0: none asked, the "
        "worker keeps the server's."
    )
    background_nice: int = Field(
        BACKGROUND_NICE, ge=0, le=19, description="Nice value of the threads writing big answers (a big "
        "history's JSON; service/background.py), so that the kernel runs the event loop's thread first "
        "within the server's scheduling group; 0: at the server's own priority. Not 19: a nice-19 thread "
        "preempted while holding the GIL was starved behind CPU-bound work of the same group "
        "(docs/hardening.md, \"The history row beside CPU-bound work in the server's group\")."
    )
    health_port: int | None = Field(
        None, ge=1, le=65535, description="A port of its own for `GET /healthz` and `GET /readyz`, answered "
        "by a thread of its own: probes there never queue behind the API's connections (a flood of "
        "half-sent requests) or its event loop (service/health.py). Unset: probes use the API's port."
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body.")
    snapshot_every: int = Field(
        1000, ge=1, description="Steps between engine snapshots (bounds replay after restart)."
    )
    max_fleet_runs: int = Field(
        10_000, ge=1, description="Most runs one `POST /v1/control` may act on (more matching: a 422)."
    )
    stale_after_s: float = Field(
        300.0, gt=0, description="An active run not heard from (any rank) for this long is `stale`."
    )
    last_seen_flush_s: float = Field(
        5.0, gt=0, description="How often each server process writes the runs' `last_seen` to the database."
    )
    webhooks: str = Field("", description="Webhook endpoints, a JSON list (see docs/events.md).")
    webhooks_file: Path | None = Field(None, description="File holding the webhook endpoints' JSON list.")
    events_buffer: int = Field(
        1000, ge=1, description="Events one /v1/events stream may fall behind before it is cut off."
    )
    sqlite_synchronous: Annotated[SqliteSynchronous, BeforeValidator(_upper)] = Field(
        DEFAULT_SQLITE_SYNCHRONOUS,
        description="SQLite synchronous mode: NORMAL survives a process crash, FULL power loss.",
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.health_port is not None and self.health_port == self.port:
            raise ValueError(f"health_port must differ from port ({self.port})")
        return self

    @field_validator("db")
    @classmethod
    def _normalise_db(cls, value: str) -> str:
        if value.startswith("postgres://"):
            value = "postgresql://" + value.removeprefix("postgres://")
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.removeprefix("postgresql://")
        if not value.startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ValueError("db must be sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return value

