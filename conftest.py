"""pytest refuses a path argument that does not exist, with or without workers.

Without workers pytest itself says "file or directory not found" (exit 4); under
pytest-xdist (``-n 2``, what ``./scripts/test`` runs) the controller collects nothing and
a missing path was one line, "no tests ran" (exit 5), and with another path beside it that
path's tests were dropped too. Here, at the root so that it loads whatever the arguments
name, the controller checks every path before any worker starts.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if config.option.pyargs or hasattr(config, "workerinput"):  # module names; a worker: checked
        return
    here = config.invocation_params.dir
    missing = [arg for arg in config.args if not (here / arg.split("::")[0]).exists()]
    if missing:
        raise pytest.UsageError(f"file or directory not found: {' '.join(missing)}")
