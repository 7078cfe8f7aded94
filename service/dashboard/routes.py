"""Routes that serve the dashboard's files: ``GET /`` and ``GET /dashboard/static/{name}``.

They are plain Starlette routes, open and left out of the OpenAPI document: they are not
part of the API (the fuzzer and the auth matrix cover the API alone), and the page they
serve carries no data. Files are served from a list fixed at import time, so no request
path can reach outside ``static/``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/dashboard/static"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_FILES = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _MEDIA_TYPES}

# The page runs only its own scripts and talks only to this origin: a stored label or
# metric name can never become script, and the token cannot be sent anywhere else.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate: a new release is picked up on reload
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _file(path: Path) -> FileResponse:
    headers = dict(_HEADERS)
    if path.suffix == ".html":
        headers["Content-Security-Policy"] = _CSP
        headers["X-Frame-Options"] = "DENY"
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=headers)


async def index(request: Request) -> Response:
    """The single page; it routes itself on the URL fragment (``#/runs/<id>``)."""
    return _file(STATIC_DIR / "index.html")


async def static_file(request: Request) -> Response:
    """One of the files shipped in ``static/``; anything else is a 404 in the API's error shape."""
    path = _FILES.get(request.path_params["name"])
    if path is None:
        raise HTTPException(404, "no such dashboard file")  # the app's handlers write the body
    return _file(path)


router = APIRouter()
router.add_route("/", index, methods=["GET"], include_in_schema=False)
router.add_route(f"{STATIC_PREFIX}/{{name}}", static_file, methods=["GET"], include_in_schema=False)
