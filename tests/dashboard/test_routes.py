"""The dashboard's own routes: open with tokens set, absent from OpenAPI, confined to static/.

They run in process through httpx's ASGI transport: these routes need no store, so the
app's lifespan (and a database) stays out of it. Each request runs its own event loop in a
worker thread, whatever loop the calling thread may hold.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from lrserve.service.app import create_app
from lrserve.service.dashboard.routes import STATIC_DIR
from lrserve.service.settings import Settings


@pytest.fixture
def get(tmp_path):
    app = create_app(Settings(db=f"sqlite:///{tmp_path}/d.db", tokens="admin:a,read:r"))

    def fetch(path: str) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get(path)

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, go()).result()

    return fetch


def test_page_and_files_are_open_without_a_token(get):
    page = get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/dashboard/static/app.js">' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name in ("app.js", "chart.js", "style.css", "favicon.svg"):
        assert get(f"/dashboard/static/{name}").status_code == 200, name
    js = get("/dashboard/static/app.js")
    assert js.headers["content-type"].startswith("text/javascript")


def test_every_module_the_page_imports_is_served(get):
    """A file missing from static/ would break the page only in a browser: catch it here."""
    for path in sorted(STATIC_DIR.glob("*.js")):
        for name in re.findall(r'from "\./([\w.-]+)"', path.read_text()):
            assert get(f"/dashboard/static/{name}").status_code == 200, (path.name, name)


@pytest.mark.parametrize("name", ["nope.js", "..%2Froutes.py", "%2E%2E%2F__init__.py", "index.htm"])
def test_nothing_outside_the_shipped_files(get, name):
    response = get(f"/dashboard/static/{name}")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_openapi_document_has_no_dashboard_route(get):
    paths = get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/dashboard")]
