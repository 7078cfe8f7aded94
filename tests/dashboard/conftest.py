"""A real server with live runs, and Debian's Chromium driven by Playwright.

Playwright's own browser builds cannot be downloaded here, so the tests drive the system
Chromium (``scripts/install-browser`` installs it). They skip, saying why, only when it
is missing and cannot be installed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dashboard.seed import seed
from tests.live_server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
# Test runs write here (ignored by git); LRSERVE_SCREENSHOTS=docs/screenshots refreshes the
# README's pictures on purpose.
SCREENSHOTS = ROOT / os.environ.get("LRSERVE_SCREENSHOTS", "test-artifacts/screenshots")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _ensure_chromium() -> str | None:
    """None when Chromium is there (installing it if needed), else why it is not."""
    if CHROMIUM.exists():
        return None
    result = subprocess.run(
        [str(ROOT / "scripts" / "install-browser")], capture_output=True, text=True
    )
    if CHROMIUM.exists():
        return None
    why = result.stderr.strip()[-300:]
    return f"{CHROMIUM} is missing and scripts/install-browser could not install it: {why}"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = _ensure_chromium()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser context per test: its own sessionStorage, so its own token."""
    context = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _server(tmp: Path, env: dict | None = None) -> ServerProcess:
    return ServerProcess(
        f"sqlite:///{tmp}/dash.db", tmp, env={"LRSERVE_TOKENS": "", **(env or {})}
    ).start()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[tuple[ServerProcess, httpx.Client]]:
    """An open server (no tokens) with the seeded runs, and an API client for it."""
    server = _server(tmp_path_factory.mktemp("live"))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            seed(http)
            yield server, http
    finally:
        server.stop()


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Iterator[tuple[ServerProcess, httpx.Client]]:
    """A server with an admin token ``a`` and a read token ``r``; the client is admin."""
    server = _server(tmp_path_factory.mktemp("secured"), {"LRSERVE_TOKENS": "admin:a,read:r"})
    try:
        with httpx.Client(
            base_url=server.url, timeout=10, headers={"Authorization": "Bearer a"}
        ) as http:
            http.post(
                "/v1/runs",
                json={
                    "run_id": "guarded",
                    "schedule": {"type": "StepLR", "step_size": 10},
                    "base_lrs": [0.1],
                },
            ).raise_for_status()
            http.get("/v1/runs/guarded/lr", params={"step": 0, "ahead": 30}).raise_for_status()
            yield server, http
    finally:
        server.stop()


def screenshot(pg, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    pg.screenshot(path=str(path), full_page=True)
    return path
