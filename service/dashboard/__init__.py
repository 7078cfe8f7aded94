"""The dashboard served at ``GET /``: plain HTML, ES modules and CSS, no build step, no CDN.

The page holds no data: it calls the ``/v1`` API from the browser with the token the
user typed in, so the page and its static files are open while the API keeps its roles.
"""

from __future__ import annotations

from lrserve.service.dashboard.routes import router

__all__ = ["router"]
