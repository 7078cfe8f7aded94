"""``python -m lrserve.trainer`` (also under ``torchrun -m lrserve.trainer``)."""

from __future__ import annotations

from lrserve.trainer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
