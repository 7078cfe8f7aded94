"""Figure 7's history attacker against a real server: every history it asks for is built anew
(no answer kept from an earlier scenario), and its big answers are read to the last byte."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lrserve.service.settings import Settings

from bench import budgets
from tests.live_server import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp("budgets")
    with ServerProcess(f"sqlite:///{tmp / 'lrserve.db'}", tmp) as proc:
        with httpx.Client(base_url=proc.url, timeout=120) as http:
            http.post("/v1/runs", json={"run_id": "wide", "schedule": budgets.STEP_LR,
                                        "base_lrs": [0.1] * budgets.GROUPS}).raise_for_status()
            http.get("/v1/runs/wide/lr", params={"step": 0, "ahead": 40}).raise_for_status()
        yield proc


def test_each_history_of_each_attacker_is_built_anew(server: ServerProcess) -> None:
    # Each scenario is an attacker process of its own; the first one's records were the second
    # one's too (steps 0, 1, 2 again: kept as they were, the mark unmoved, the answer a kept one).
    budget = Settings().work_budget
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for _ in range(2):
            attacker = budgets._Attacker(server.url, "history", "wide", budget)
            attacker.start(http)
            for _ in range(3):
                attacker.one(http)
            attacker.big.close()
        shown = http.get("/v1/runs/wide/history", params={"max_points": 10_000}).json()
    assert shown["metrics"]["attack"]["steps"] == list(range(6))


def test_the_kept_history_attacker_asks_the_same_history_and_posts_nothing(server: ServerProcess) -> None:
    budget = Settings().work_budget
    with httpx.Client(base_url=server.url, timeout=120) as http:
        before = http.get("/v1/runs/wide/history", params={"max_points": 10_000}).json()["metrics"]
        attacker = budgets._Attacker(server.url, "kept history", "wide", budget)
        attacker.start(http)
        for _ in range(3):
            attacker.one(http)
        attacker.big.close()
        after = http.get("/v1/runs/wide/history", params={"max_points": 10_000}).json()["metrics"]
    assert after == before  # no record: every answer after the first is a kept one
    points = budgets.cost.history_points(n_groups=budgets.GROUPS, series=1, budget=budget)
    assert attacker.count == 3 and attacker.units == budgets.cost.history_cost(
        n_groups=budgets.GROUPS, points=points, series=1, read=2 * (points + 1))
    assert attacker.units <= budget < budgets.cost.history_cost(
        n_groups=budgets.GROUPS, points=points + 1, series=1, read=2 * (points + 2))


def test_a_big_answer_is_read_to_its_last_byte_on_one_connection(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        expected = len(http.get("/v1/runs/wide/history", params={"max_points": 30}).content)
    reader = budgets._Discarding(server.url)
    try:
        for _ in range(2):  # the connection is left ready for the next request
            assert reader.request("GET", "/v1/runs/wide/history", params={"max_points": 30}) == expected
        body = {"schedule": budgets.STEP_LR, "base_lrs": [0.1] * 8, "steps": 50}
        assert reader.request("POST", "/v1/schedules/preview", json=body) > 0
        with pytest.raises(RuntimeError, match="404"):
            reader.request("GET", "/v1/runs/nope/history")
    finally:
        reader.close()


def test_a_kept_connection_the_server_closed_is_opened_again(server: ServerProcess) -> None:
    reader = budgets._Discarding(server.url)
    try:
        size = reader.request("GET", "/v1/runs/wide/history", params={"max_points": 3})
        assert reader.sock is not None
        reader.sock.shutdown(socket.SHUT_WR)  # as if the server had closed it: the next send finds it gone
        reader.sock.recv(1)  # the server's side closes too
        assert reader.request("GET", "/v1/runs/wide/history", params={"max_points": 3}) == size
    finally:
        reader.close()
