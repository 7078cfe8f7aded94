"""docs/api.md's route table is the OpenAPI document's list of routes (none missing, none extra),
with the role each needs as the auth matrix proves it against the app (tests/service/api/test_auth.py)."""

from __future__ import annotations

import re
from pathlib import Path

from lrserve.service.app import create_app
from lrserve.service.settings import Settings
from lrserve.service.store.events import EventKind

from tests.service.api.test_auth import ROUTES

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (GET|POST|PUT|PATCH|DELETE) \| `([^`]+)` \| (read|write|admin|none) \|", re.M)


def test_every_route_is_in_docs_api_md_and_nothing_else():
    documented = {(method, path) for method, path, _ in ROW.findall((ROOT / "docs/api.md").read_text())}
    served = {
        (method.upper(), path)
        for path, operations in create_app(Settings()).openapi()["paths"].items()
        for method in operations
    }
    assert documented == served, f"missing: {served - documented}, not served: {documented - served}"


def test_the_docs_stand_alone():
    """No document of the repository links outside it (the contract lives in docs/api.md)."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "../shared" not in page.read_text(), page


def test_each_documented_role_is_the_one_the_route_enforces():
    rows = ROW.findall((ROOT / "docs/api.md").read_text())
    documented = {(method, path): role for method, path, role in rows}
    assert documented == {route: role or "none" for route, (role, _) in ROUTES.items()}


def test_every_event_kind_history_shows_is_documented():
    text = (ROOT / "docs/api.md").read_text()
    assert all(f"`{kind.value}`" in text for kind in EventKind)
