"""What a job may set in its environment instead of passing to ``RemoteScheduler``.

- ``LRSERVE_RUN_ID``: the run's id when ``run_id`` is not given (a launcher names the run
  once for every rank).
- ``LRSERVE_LABELS``: labels when ``labels`` is not given, as ``key=value`` pairs separated
  by commas (``sweep=7,team=nlp``).
- ``LRSERVE_MODE``: ``disabled`` makes ``RemoteScheduler`` a local torch scheduler of the
  same spec (no server: tests of user code, a laptop); ``remote`` (the default) talks to
  the server.

``LRSERVE_URL`` and ``LRSERVE_TOKEN`` are read by ``LRClient``; ``RANK`` and ``WORLD_SIZE``
by ``RemoteScheduler``, as torchrun sets them.
"""

from __future__ import annotations

import os

ENV_RUN_ID = "LRSERVE_RUN_ID"
ENV_LABELS = "LRSERVE_LABELS"
ENV_MODE = "LRSERVE_MODE"
MODES = ("remote", "disabled")


def run_id_from_env() -> str | None:
    """``$LRSERVE_RUN_ID``, or None when unset or blank."""
    return os.environ.get(ENV_RUN_ID, "").strip() or None


def labels_from_env() -> dict[str, str] | None:
    """``$LRSERVE_LABELS`` as a dict, or None when unset or blank.

    Raises:
        ValueError: a pair is not ``key=value`` (the message names the variable).
    """
    raw = os.environ.get(ENV_LABELS, "").strip()
    if not raw:
        return None
    labels = {}
    for item in raw.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{ENV_LABELS} must be key=value pairs separated by commas, got {item!r}")
        labels[key.strip()] = value.strip()
    return labels


def mode_from_env() -> str:
    """``$LRSERVE_MODE`` (default ``remote``).

    Raises:
        ValueError: an unknown mode (the message names the variable and the choices).
    """
    mode = os.environ.get(ENV_MODE, "").strip().lower() or "remote"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode
