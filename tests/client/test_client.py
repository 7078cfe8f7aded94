"""LRClient: request shapes, auth, retries with backoff, error mapping, lifecycle."""

from __future__ import annotations

import json

import httpx
import pytest
from lrserve.client import (
    ClientClosed,
    LRClient,
    RunNotFound,
    ServerTimeout,
    ServerUnavailable,
    ServerUnreachable,
    TransportError,
)
from lrserve.client._client import DEFAULT_URL, backoff_delay


class Recorder:
    """A MockTransport handler that records requests and plays scripted answers."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else httpx.Response(200, json={"ok": True})
        if isinstance(answer, Exception):
            raise answer
        return answer

    def body(self, i=-1):
        return json.loads(self.requests[i].content)


@pytest.fixture
def sleeps():
    return []


def make(recorder, sleeps, **kwargs):
    http = httpx.Client(transport=httpx.MockTransport(recorder))
    kwargs.setdefault("base_url", "http://srv:8000/")
    return LRClient(http_client=http, sleep=sleeps.append, rand=lambda: 1.0, **kwargs), http


@pytest.fixture
def api(sleeps):
    recorder = Recorder()
    client, http = make(recorder, sleeps, token="tok")
    client.recorder = recorder
    yield client
    client.close()
    http.close()


def test_create_run_body_and_auth_header(api):
    api.create_run(
        {"type": "StepLR", "step_size": 2},
        [0.1, 0.2],
        base_momentums=[0.9, 0.9],
        run_id="r",
        labels={"a": 1},
        world_size=2,
    )
    request = api.recorder.requests[0]
    assert (request.method, str(request.url)) == ("POST", "http://srv:8000/v1/runs")
    assert request.headers["Authorization"] == "Bearer tok"
    assert api.recorder.body() == {
        "schedule": {"type": "StepLR", "step_size": 2},
        "base_lrs": [0.1, 0.2],
        "base_momentums": [0.9, 0.9],
        "run_id": "r",
        "labels": {"a": "1"},
        "world_size": 2,
    }


@pytest.mark.parametrize(
    ("call", "method", "url", "body"),
    [
        pytest.param(lambda a: a.read_run("r"), "GET", "/v1/runs/r", None, id="read_run"),
        pytest.param(
            lambda a: a.read_lr("r", 5, ahead=10), "GET", "/v1/runs/r/lr?step=5&ahead=10", None, id="read_lr"
        ),
        pytest.param(
            lambda a: a.step_run("r", 12, metrics={"val_loss": 0.4}, rank=1, ahead=3),
            "POST",
            "/v1/runs/r/step",
            {"step": 12, "metrics": {"val_loss": 0.4}, "rank": 1, "ahead": 3},
            id="step_run",
        ),
        pytest.param(
            lambda a: a.send_metrics("r", [{"step": 1, "name": "l", "value": 0.5, "rank": 0}]),
            "POST",
            "/v1/runs/r/metrics",
            {"records": [{"step": 1, "name": "l", "value": 0.5, "rank": 0}]},
            id="send_metrics",
        ),
        pytest.param(
            lambda a: a.read_history("r", max_points=50),
            "GET",
            "/v1/runs/r/history?max_points=50",
            None,
            id="read_history",
        ),
        pytest.param(
            lambda a: a.control_run("r", "scale", factor=0.5, at_step=100),
            "POST",
            "/v1/runs/r/control",
            {"action": "scale", "factor": 0.5, "at_step": 100},
            id="control",
        ),
        pytest.param(
            lambda a: a.preview_schedule({"type": "ExponentialLR", "gamma": 0.9}, [0.1], steps=3),
            "POST",
            "/v1/schedules/preview",
            {"schedule": {"type": "ExponentialLR", "gamma": 0.9}, "base_lrs": [0.1], "steps": 3},
            id="preview",
        ),
        pytest.param(lambda a: a.read_catalog(), "GET", "/v1/schedules/catalog", None, id="catalog"),
        pytest.param(lambda a: a.read_lr_finder("r"), "GET", "/v1/runs/r/lr-finder", None, id="lr-finder"),
        pytest.param(
            lambda a: a.list_runs(labels={"sweep": "7", "team": "x"}, status="active", limit=5),
            "GET",
            "/v1/runs?label=sweep%3A7&label=team%3Ax&status=active&limit=5",
            None,
            id="list_runs",
        ),
        pytest.param(lambda a: a.delete_run("r"), "DELETE", "/v1/runs/r", None, id="delete"),
    ],
)
def test_routes(api, call, method, url, body):
    call(api)
    request = api.recorder.requests[-1]
    assert request.method == method
    assert str(request.url) == "http://srv:8000" + url
    assert (json.loads(request.content) if request.content else None) == body


def test_run_ids_are_quoted_in_paths(api):
    api.read_run("a/b")
    assert api.recorder.requests[-1].url.raw_path == b"/v1/runs/a%2Fb"


def test_url_and_token_from_the_environment(monkeypatch, sleeps):
    monkeypatch.setenv("LRSERVE_URL", "http://env-host:9000")
    monkeypatch.setenv("LRSERVE_TOKEN", "envtok")
    with LRClient() as client:
        assert client.base_url == "http://env-host:9000"
        assert client._headers["Authorization"] == "Bearer envtok"


def test_default_url(monkeypatch):
    monkeypatch.delenv("LRSERVE_URL", raising=False)
    with LRClient() as client:
        assert client.base_url == DEFAULT_URL


def test_injected_client_without_base_url_uses_its_own(sleeps):
    recorder = Recorder()
    http = httpx.Client(transport=httpx.MockTransport(recorder), base_url="http://testserver")
    with LRClient(http_client=http) as client:
        client.read_run("r")
    assert str(recorder.requests[0].url) == "http://testserver/v1/runs/r"
    assert not http.is_closed  # not ours to close
    http.close()


def test_retries_transport_errors_and_5xx_with_exponential_backoff(sleeps):
    recorder = Recorder(
        httpx.ConnectError("refused"),
        httpx.Response(503, json={"detail": "store down", "code": "store_unavailable"}),
        httpx.ReadTimeout("slow"),
        httpx.Response(200, json={"run_id": "r"}),
    )
    client, http = make(recorder, sleeps)
    assert client.read_run("r") == {"run_id": "r"}
    assert len(recorder.requests) == 4
    assert sleeps == [0.1, 0.2, 0.4]  # rand=1.0: the top of each jitter range
    client.close()
    http.close()


def test_gives_up_after_max_retries_with_the_mapped_error(sleeps):
    recorder = Recorder(*[httpx.ConnectError("refused")] * 3)
    client, http = make(recorder, sleeps, max_retries=2)
    with pytest.raises(ServerUnreachable) as info:
        client.read_run("r")
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(recorder.requests) == 3
    client.close()
    http.close()


@pytest.mark.parametrize(
    ("error", "mapped"),
    [
        (httpx.ConnectError("refused"), ServerUnreachable),
        (httpx.ConnectTimeout("slow connect"), ServerUnreachable),
        (httpx.ReadTimeout("slow"), ServerTimeout),
        (httpx.RemoteProtocolError("eof"), TransportError),
    ],
)
def test_transport_errors_are_mapped(sleeps, error, mapped):
    client, http = make(Recorder(error), sleeps, max_retries=0)
    with pytest.raises(mapped):
        client.read_run("r")
    client.close()
    http.close()


def test_client_errors_are_not_retried(sleeps):
    recorder = Recorder(httpx.Response(404, json={"detail": "no run", "code": "run_not_found"}))
    client, http = make(recorder, sleeps)
    with pytest.raises(RunNotFound, match="no run"):
        client.read_run("r")
    assert len(recorder.requests) == 1 and sleeps == []
    client.close()
    http.close()


def test_control_is_not_retried_once_sent(sleeps):
    recorder = Recorder(httpx.Response(503, json={"detail": "down", "code": "store_unavailable"}))
    client, http = make(recorder, sleeps)
    with pytest.raises(ServerUnavailable):
        client.control_run("r", "scale", factor=0.5)
    assert len(recorder.requests) == 1
    client.close()
    http.close()


def test_control_is_retried_when_nothing_was_sent(sleeps):
    recorder = Recorder(httpx.ConnectError("refused"), httpx.Response(200, json={"applied_at": 3}))
    client, http = make(recorder, sleeps)
    assert client.control_run("r", "hold") == {"applied_at": 3}
    client.close()
    http.close()


def test_retry_after_is_honoured(sleeps):
    recorder = Recorder(
        httpx.Response(429, headers={"Retry-After": "2"}, json={"detail": "slow down"}),
        httpx.Response(200, json={}),
    )
    client, http = make(recorder, sleeps)
    client.read_run("r")
    assert sleeps == [2.0]
    client.close()
    http.close()


def test_backoff_is_capped_and_jittered():
    assert backoff_delay(0, base=0.1, cap=5, rand=lambda: 0.0) == 0.05
    assert backoff_delay(10, base=0.1, cap=5, rand=lambda: 1.0) == 5
    assert backoff_delay(100, base=0.1, cap=5, rand=lambda: 0.5) == 3.75


def test_no_content_answers_none(sleeps):
    client, http = make(Recorder(httpx.Response(204)), sleeps)
    assert client.delete_run("r") is None
    client.close()
    http.close()


def test_closed_client_refuses_requests(api):
    api.close()
    api.close()  # idempotent
    assert api.is_closed
    with pytest.raises(ClientClosed):
        api.read_run("r")
    with pytest.raises(ClientClosed):
        with api:
            pass


def test_owned_http_client_is_closed():
    client = LRClient("http://127.0.0.1:9")
    client.close()
    assert client._sender.is_closed


def test_negative_retries_refused():
    with pytest.raises(ValueError, match="max_retries"):
        LRClient("http://x", max_retries=-1)


def test_injected_client_keeps_its_timeouts_unless_told(sleeps):
    recorder = Recorder()
    http = httpx.Client(transport=httpx.MockTransport(recorder), timeout=4.0)
    with LRClient("http://x", http_client=http) as client:
        client.step_run("r", 1, timeout=60.0)  # e.g. a barrier wait: not forced on a client we do not own
    with LRClient("http://x", http_client=http, timeout=7.0) as client:
        client.read_run("r")
    assert [r.extensions["timeout"]["read"] for r in recorder.requests] == [4.0, 7.0]
    http.close()


# -- parsing answers ---------------------------------------------------------------------------


def _random_floats(n, seed=7):
    """float64 values of every magnitude, drawn as bit patterns (finite ones kept)."""
    import math
    import random
    import struct

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        x = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(x):
            out.append(x)
    return out + [0.0, -0.0, 5e-324, 1.7976931348623157e308, 0.1, 1 / 3]


@pytest.mark.parametrize("with_orjson", [True, False], ids=["orjson", "stdlib"])
def test_answers_parse_to_the_same_float64_values_bit_for_bit(monkeypatch, with_orjson):
    import struct

    import lrserve.client._client as module

    if with_orjson:
        pytest.importorskip("orjson")
    else:
        monkeypatch.setattr(module, "_orjson", None)
    floats = _random_floats(20_000)
    text = json.dumps({"window": {"start": 3, "lrs": [[x] for x in floats]}}).encode()
    parsed = [row[0] for row in module.loads(text)["window"]["lrs"]]
    assert [struct.pack("<d", x) for x in parsed] == [struct.pack("<d", x) for x in floats]


def test_an_answer_with_nan_tokens_parses_as_the_standard_library_does():
    from lrserve.client._client import loads

    text = b'{"values": [NaN, Infinity, -Infinity, 1.5]}'
    parsed = loads(text)["values"]
    assert parsed[0] != parsed[0] and parsed[1:] == [float("inf"), float("-inf"), 1.5]
