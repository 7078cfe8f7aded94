"""``python -m tests.trainer.through_outages ARGS``: ``python -m lrserve.trainer ARGS`` in a job
that rides out a server outage, every other warning still an error.

The harness runs trainers with ``PYTHONWARNINGS=error``. A job training through an outage
is meant to see one ``ServerAwayWarning``; ``PYTHONWARNINGS`` cannot let exactly that one
through: Python reads it at start-up, before the site-packages or ``PYTHONPATH`` folders are
on ``sys.path``, so a category outside the standard library does not resolve there ("Invalid
-W option ignored"). The filter goes in here instead, in front of the inherited ``error``.
"""

from __future__ import annotations

import runpy
import warnings

from lrserve.client import ServerAwayWarning

warnings.filterwarnings("default", category=ServerAwayWarning)  # printed to stderr, not raised
runpy.run_module("lrserve.trainer", run_name="__main__", alter_sys=True)
