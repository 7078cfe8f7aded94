"""A real lrserve process (uvicorn) for end-to-end tests: start, kill -9, restart.

The one helper for a real server, shared with ``python -m bench``, is ``bench.servers.Server``
(ports below the ephemeral range, one slice per xdist worker; ``kill()`` for kill -9);
the tests know it as ``ServerProcess``.
"""

from __future__ import annotations

from bench.servers import Server as ServerProcess
from bench.servers import free_port

__all__ = ["ServerProcess", "free_port"]
