"""lrserve: learning-rate schedules served over HTTP.

Users import from ``lrserve.client`` (the training side: ``RemoteScheduler``, ``LRClient``),
``lrserve.service`` (the server) and ``lrserve.trainer`` (the reference trainer).

An install places the repository's top-level folders ``client/``, ``service/`` and ``trainer/``
under this package (pyproject.toml's ``package-dir``). In a checkout they stay where they are,
so here this package also looks for its subpackages in the checkout's root.
"""

from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
if not (_here / "client").is_dir() and (_here.parent / "pyproject.toml").is_file():
    __path__.append(str(_here.parent))  # a checkout: lrserve.client is <root>/client
