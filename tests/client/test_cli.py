"""The operator CLI: parsing, requests, output and exit codes."""

from __future__ import annotations

import argparse
import csv
import io
import json

import httpx
import pytest
from lrserve.client._cli import (
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    add_operator_commands,
    main,
)

PREVIEW = {"lrs": [[0.1, 0.01], [0.05, 0.005], [0.025, 0.0025]], "momentums": None}
HISTORY = {
    "run_id": "r",
    "lrs": {"steps": [0, 10], "values": [[0.1], [0.05]]},
    "metrics": {"val_loss": {"steps": [10], "values": [0.4]}},
    "events": [{"kind": "created", "step": 0, "at": "2025-01-01T00:00:00Z", "actor": "ops-alice"},
               {"kind": "control", "step": 11, "at": "2025-01-01T00:01:00Z", "actor": "ops-alice",
                "action": "hold", "reason": "loss diverged"}],
    "events_total": 2,
}


class Server:
    def __init__(self, answer=None, status=200):
        self.answer = {} if answer is None else answer
        self.status = status
        self.requests: list[httpx.Request] = []

    def __call__(self, request):
        self.requests.append(request)
        return httpx.Response(self.status, json=self.answer)

    @property
    def body(self):
        return json.loads(self.requests[-1].content)


@pytest.fixture
def run(capsys):
    clients = []

    def run_cli(argv, server=None):
        http = httpx.Client(transport=httpx.MockTransport(server or Server()))
        clients.append(http)
        code = main(argv, http_client=http)
        out, err = capsys.readouterr()
        return code, out, err

    yield run_cli
    for http in clients:
        http.close()


def test_operator_commands_plug_into_the_lrserve_parser():
    parser = argparse.ArgumentParser(prog="lrserve")
    subparsers = parser.add_subparsers(dest="command", required=True)
    subparsers.add_parser("serve")
    add_operator_commands(subparsers)
    args = parser.parse_args(["control", "r1", "scale", "0.5", "--at-step", "10", "--url", "http://h:1"])
    assert (args.command, args.run_id, args.action, args.factor, args.at_step) == (
        "control",
        "r1",
        "scale",
        0.5,
        10,
    )
    assert args.url == "http://h:1"
    assert callable(args.func)


def test_url_and_token_are_accepted_before_the_action():
    parser = argparse.ArgumentParser(prog="lrserve")
    add_operator_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["runs", "--url", "http://h:1", "--token", "t", "list"])
    assert (args.url, args.token) == ("http://h:1", "t")


def test_help_exits_zero(run):
    code, out, _ = run(["preview", "--help"])
    assert code == EXIT_OK
    assert "--base-lr" in out and "--plot" in out


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-command"),
        pytest.param(["runs"], id="no-action"),
        pytest.param(["control", "r"], id="no-control-action"),
        pytest.param(["control", "r", "scale", "half"], id="bad-number"),
        pytest.param(["control", "r", "set-lr", "nan"], id="nan"),
        pytest.param(["preview", "{}", "--steps", "0"], id="zero-steps"),
        pytest.param(["history", "r", "--format", "xml"], id="bad-format"),
        pytest.param(["runs", "list", "--status", "sleeping"], id="bad-status"),
    ],
)
def test_usage_errors_exit_2(run, argv):
    code, _, err = run(argv)
    assert code == EXIT_USAGE
    assert "usage:" in err


def test_runs_list_prints_a_table_and_passes_filters(run):
    server = Server(
        {"data": [{"run_id": "a", "status": "active", "horizon": 12, "lrs": [0.1], "labels": {"k": "v"}}]}
    )
    code, out, _ = run(["runs", "list", "--label", "k:v", "--status", "active", "--limit", "5"], server)
    assert code == EXIT_OK
    assert str(server.requests[0].url).endswith("/v1/runs?label=k%3Av&status=active&limit=5")
    header, row = out.splitlines()[:2]
    assert header.split() == ["RUN", "STATUS", "HORIZON", "LR", "LABELS"]
    assert row.split() == ["a", "active", "12", "0.1", "k=v"]


def test_runs_list_label_must_be_key_value(run):
    code, _, err = run(["runs", "list", "--label", "novalue"])
    assert code == EXIT_USAGE
    assert "KEY:VALUE" in err


def test_runs_show_prints_json(run):
    code, out, _ = run(["runs", "show", "a"], Server({"run_id": "a", "horizon": 3}))
    assert code == EXIT_OK
    assert json.loads(out) == {"run_id": "a", "horizon": 3}


@pytest.mark.parametrize(
    ("argv", "body"),
    [
        pytest.param(["set-lr", "0.01"], {"action": "set_lr", "lr": 0.01}, id="set-lr"),
        pytest.param(["set-lr", "0.01", "0.001"], {"action": "set_lr", "lrs": [0.01, 0.001]}, id="set-lrs"),
        pytest.param(
            ["scale", "0.5", "--at-step", "100"],
            {"action": "scale", "factor": 0.5, "at_step": 100},
            id="scale",
        ),
        pytest.param(["hold"], {"action": "hold"}, id="hold"),
        pytest.param(["resume"], {"action": "resume"}, id="resume"),
        pytest.param(["stop"], {"action": "stop"}, id="stop"),
        pytest.param(
            ["replace", '{"type": "ExponentialLR", "gamma": 0.9}'],
            {"action": "replace_schedule", "schedule": {"type": "ExponentialLR", "gamma": 0.9}},
            id="replace",
        ),
    ],
)
def test_control_actions(run, argv, body):
    server = Server({"run_id": "r", "applied_at": 42, "event": {}})
    code, out, _ = run(["control", "r", *argv], server)
    assert code == EXIT_OK
    assert server.body == body
    assert str(server.requests[0].url).endswith("/v1/runs/r/control")
    assert "at step 42" in out


def test_token_is_sent(run):
    server = Server({"run_id": "r"})
    run(["runs", "show", "r", "--token", "s3cret"], server)
    assert server.requests[0].headers["Authorization"] == "Bearer s3cret"


def test_server_error_exits_1_with_its_words(run):
    server = Server(
        {
            "detail": "run 'x' does not exist",
            "code": "run_not_found",
            "errors": [{"field": "run_id", "message": "not found"}],
        },
        status=404,
    )
    code, _, err = run(["runs", "show", "x"], server)
    assert code == EXIT_SERVER_ERROR
    assert "run 'x' does not exist" in err and "404" in err
    assert "run_id: not found" in err


def test_forbidden_exits_1(run):
    code, _, err = run(
        ["control", "r", "stop"], Server({"detail": "admin only", "code": "forbidden"}, status=403)
    )
    assert code == EXIT_SERVER_ERROR
    assert "admin only" in err


def test_unreachable_server_exits_3(capsys):
    code = main(["runs", "list", "--url", "http://127.0.0.1:9"])  # nothing listens on port 9
    assert code == EXIT_UNREACHABLE
    assert "cannot reach the server at http://127.0.0.1:9" in capsys.readouterr().err


def test_preview_inline_spec_prints_the_curve(run):
    server = Server(PREVIEW)
    code, out, _ = run(
        [
            "preview",
            '{"type": "StepLR", "step_size": 1, "gamma": 0.5}',
            "--base-lr",
            "0.1",
            "--base-lr",
            "0.01",
            "--steps",
            "3",
        ],
        server,
    )
    assert code == EXIT_OK
    assert server.body == {
        "schedule": {"type": "StepLR", "step_size": 1, "gamma": 0.5},
        "base_lrs": [0.1, 0.01],
        "steps": 3,
    }
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["step", "lr[0]", "lr[1]"]
    assert lines[1:] == [["0", "0.1", "0.01"], ["1", "0.05", "0.005"], ["2", "0.025", "0.0025"]]


def test_preview_spec_from_a_file_with_metrics(run, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"type": "ReduceLROnPlateau", "patience": 0}))
    server = Server(PREVIEW)
    code, _, _ = run(["preview", str(spec), "--metric", "val_loss=1.0,,0.9", "--json"], server)
    assert code == EXIT_OK
    assert server.body["metrics"] == {"val_loss": [1.0, None, 0.9]}
    assert server.body["base_lrs"] == [0.1]


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("{not json", id="bad-json"),
        pytest.param("/no/such/file.json", id="no-file"),
        pytest.param("[1]", id="not-object"),
    ],
)
def test_preview_bad_spec_is_a_usage_error(run, spec):
    code, _, err = run(["preview", spec])
    assert code == EXIT_USAGE
    assert "SPEC" in err


def test_preview_plot_writes_a_png(run, tmp_path):
    png = tmp_path / "curve.png"
    code, _, err = run(["preview", '{"type": "StepLR", "step_size": 1}', "--plot", str(png)], Server(PREVIEW))
    assert code == EXIT_OK
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in err


def test_preview_plot_without_matplotlib_is_a_clear_error(run, monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    server = Server(PREVIEW)
    code, _, err = run(
        ["preview", '{"type": "StepLR", "step_size": 1}', "--plot", str(tmp_path / "x.png")], server
    )
    assert code == EXIT_USAGE
    assert "matplotlib" in err
    assert server.requests == []  # refused before asking the server


def test_history_csv(run):
    server = Server(HISTORY)
    code, out, _ = run(["history", "r", "--max-points", "100"], server)
    assert code == EXIT_OK
    assert str(server.requests[0].url).endswith("/v1/runs/r/history?max_points=100")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows == [
        ["series", "step", "value", "actor", "reason"],
        ["lr[0]", "0", "0.1", "", ""],
        ["lr[0]", "10", "0.05", "", ""],
        ["val_loss", "10", "0.4", "", ""],
        ["event:created", "0", "", "ops-alice", ""],
        ["event:control", "11", "", "ops-alice", "loss diverged"],
    ]


def test_history_says_when_it_shows_the_latest_events_of_more(run):
    code, out, err = run(["history", "r"], Server({**HISTORY, "events_total": 9}))
    assert code == EXIT_OK and "event:control" in out
    assert "the latest 2 of the run's 9 events" in err
    assert run(["history", "r"], Server(HISTORY))[2] == ""


def test_history_json_to_a_file(run, tmp_path):
    target = tmp_path / "h.json"
    code, out, _ = run(["history", "r", "--format", "json", "-o", str(target)], Server(HISTORY))
    assert code == EXIT_OK and out == ""
    assert json.loads(target.read_text()) == HISTORY


def test_url_from_the_environment(run, monkeypatch):
    monkeypatch.setenv("LRSERVE_URL", "http://from-env:7000")
    server = Server({})
    run(["runs", "show", "r"], server)
    assert str(server.requests[0].url) == "http://from-env:7000/v1/runs/r"
