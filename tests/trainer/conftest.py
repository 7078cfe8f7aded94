"""Fixtures of the trainer tests: one real lrserve process (with tokens) per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live_server import ServerProcess
from tests.trainer.harness import TOKENS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("lrserve")
    with ServerProcess(f"sqlite:///{tmp}/trainer.db", tmp, env={"LRSERVE_TOKENS": TOKENS}) as proc:
        yield proc
