"""A test run given a path that does not exist fails, saying which, also under workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_missing_path_is_a_usage_error(workers):
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", workers,
         "tests/test_exported_members.py", "tests/does_not_exist.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "file or directory not found: tests/does_not_exist.py" in run.stderr, run.stderr
