"""lrserve's reference trainer: a real model on a real (bundled) data set, its LR schedule
served by lrserve through ``client.RemoteScheduler``, one process or many under torchrun.

Run ``python -m lrserve.trainer --help``; docs/trainer.md has the walk-through.
"""

from __future__ import annotations

__all__: list[str] = []
