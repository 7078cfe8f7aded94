"""``lrserve lr-finder`` against the real app in process: curve, suggestions, exit codes."""

from __future__ import annotations

import argparse
import builtins
import csv
import io
import json

import lrserve.client._cli as cli
import pytest
from lrserve.client._cli import (
    EXIT_OK,
    EXIT_SERVER_ERROR,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    add_operator_commands,
    main,
)
from lrserve.service import create_app
from lrserve.service.settings import Settings
from starlette.testclient import TestClient

from tests.service.api.test_lr_finder import RANGE, synthetic_loss  # the API test's own curve


@pytest.fixture
def api(tmp_path):
    with TestClient(create_app(Settings(db=f"sqlite:///{tmp_path}/t.db"))) as client:
        yield client


@pytest.fixture
def run(api, capsys):
    """The CLI through the app: returns (exit code, stdout, stderr)."""

    def run_cli(argv):
        code = main(argv, http_client=api)
        out, err = capsys.readouterr()
        return code, out, err

    return run_cli


def post_loss(api, run_id: str, step: int, loss: float) -> dict:
    """A step with its loss, in Python's JSON (as the client sends it), so NaN travels too."""
    body = json.dumps({"step": step, "metrics": {"loss": loss}})
    answer = api.post(f"/v1/runs/{run_id}/step", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def finished_test(api, run_id: str = "rt", spec: dict | None = None) -> dict:
    """A range test stepped with its loss until it switches; returns the lr-finder answer."""
    body = {"run_id": run_id, "schedule": spec or RANGE, "base_lrs": [0.1]}
    api.post("/v1/runs", json=body).raise_for_status()
    lr = api.get(f"/v1/runs/{run_id}").json()["lrs"][0]
    for k in range(1, 200):
        answer = post_loss(api, run_id, k, synthetic_loss(lr))
        lr = answer["lrs"][0]
        if answer["switched_at"] is not None:
            break
    finder = api.get(f"/v1/runs/{run_id}/lr-finder").json()
    assert finder["done"] and finder["switched_at"] is not None
    return finder


def running_test(api, run_id: str = "live") -> dict:
    """A range test still running, whose smoothed loss went NaN at its 5th report."""
    spec = {**RANGE, "then": None}
    api.post("/v1/runs", json={"run_id": run_id, "schedule": spec, "base_lrs": [0.1]}).raise_for_status()
    for k, loss in enumerate([2.0, 1.9, 1.8, 1.7, float("nan"), 1.5], start=1):
        post_loss(api, run_id, k, loss)
    finder = api.get(f"/v1/runs/{run_id}/lr-finder").json()
    assert not finder["done"] and finder["losses"][4:] == ["NaN", "NaN"]
    return finder


def test_table_prints_the_summary_and_every_point(api, run):
    finder = finished_test(api)
    code, out, err = run(["lr-finder", "rt"])
    assert code == EXIT_OK and err == ""
    lines = out.splitlines()
    assert lines[0] == f"run rt: range test switched at step {finder['switched_at']}"
    summary = dict(line.split(None, 1) for line in lines[1:6])
    assert float(summary["chosen"]) == pytest.approx(finder["chosen"], rel=1e-7)
    assert float(summary["steepest"]) == pytest.approx(finder["suggestions"]["steepest"], rel=1e-7)
    assert float(summary["min_over_10"]) == pytest.approx(finder["suggestions"]["min_over_10"], rel=1e-7)
    assert (summary["done"], summary["switched_at"]) == ("yes", str(finder["switched_at"]))
    header = lines[7].split()
    assert header == ["point", "lr", "smoothed_loss", "mark"]
    rows = lines[8:]
    assert len(rows) == len(finder["lrs"])
    for row, lr, loss in zip(rows, finder["lrs"], finder["losses"], strict=True):
        cells = row.split()
        assert float(cells[1]) == pytest.approx(lr, rel=1e-7)
        assert float(cells[2]) == pytest.approx(loss, rel=1e-7)
    steepest = finder["lrs"].index(finder["suggestions"]["steepest"])
    assert rows[steepest].endswith("steepest, chosen")  # the test chose Lightning's suggestion
    lowest = [lr / 10 for lr in finder["lrs"]].index(finder["suggestions"]["min_over_10"])
    assert rows[lowest].endswith("lowest loss")


def test_json_is_the_servers_answer(api, run):
    finder = finished_test(api)
    code, out, _ = run(["lr-finder", "rt", "--format", "json"])
    assert code == EXIT_OK
    assert json.loads(out) == finder


def test_csv_is_the_curve_and_the_summary_goes_to_stderr(api, run):
    finder = running_test(api)
    code, out, err = run(["lr-finder", "live", "--format", "csv"])
    assert code == EXIT_OK
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["lr", "smoothed_loss"]
    assert [float(r[0]) for r in rows[1:]] == finder["lrs"]  # repr: exact
    assert [float(r[1]) if r[1] else "NaN" for r in rows[1:]] == finder["losses"]
    assert rows[-1][1] == ""  # not finite: empty
    assert "chosen=- " in err and "done=no" in err and "switched_at=-" in err


def test_a_running_test_shows_no_choice_yet(api, run):
    finder = running_test(api)
    code, out, _ = run(["lr-finder", "live"])
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0] == "run live: range test running"
    assert lines[1].split() == ["chosen", "-"]
    point, lr, loss = lines[-1].split()  # the last point: no mark, its loss not finite
    assert (point, loss) == ("5", "-")
    assert float(lr) == pytest.approx(finder["lrs"][5], rel=1e-7)


def test_no_report_yet(api, run):
    api.post("/v1/runs", json={"run_id": "fresh", "schedule": RANGE, "base_lrs": [0.1]}).raise_for_status()
    code, out, _ = run(["lr-finder", "fresh"])
    assert code == EXIT_OK
    assert "(no loss reported yet)" in out


def test_not_a_range_test_exits_1_with_the_servers_words(api, run):
    body = {"run_id": "plain", "schedule": {"type": "StepLR", "step_size": 5}, "base_lrs": [0.1]}
    api.post("/v1/runs", json=body).raise_for_status()
    code, out, err = run(["lr-finder", "plain"])
    assert code == EXIT_SERVER_ERROR and out == ""
    detail = api.get("/v1/runs/plain/lr-finder").json()["detail"]
    assert "LRRangeTest" in detail
    assert f"lrserve: {detail} (HTTP 409" in err


def test_unknown_run_exits_1(run):
    code, _, err = run(["lr-finder", "nope"])
    assert code == EXIT_SERVER_ERROR
    assert "HTTP 404" in err


def test_unreachable_server_exits_3(capsys):
    code = main(["lr-finder", "rt", "--url", "http://127.0.0.1:9"])  # nothing listens on port 9
    assert code == EXIT_UNREACHABLE
    assert "cannot reach the server at http://127.0.0.1:9" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["lr-finder"], id="no-run"),
        pytest.param(["lr-finder", "rt", "--format", "xml"], id="bad-format"),
        pytest.param(["lr-finder", "rt", "--plot"], id="plot-without-file"),
    ],
)
def test_usage_errors_exit_2(run, argv):
    code, _, err = run(argv)
    assert code == EXIT_USAGE
    assert "usage:" in err


def test_help_says_what_it_prints(run):
    code, out, _ = run(["lr-finder", "--help"])
    assert code == EXIT_OK
    words = " ".join(out.split())  # argparse wraps to the terminal's width
    for text in ("--format {table,json,csv}", "--plot FILE.png", "smoothed loss", "steepest", "(exit 1)"):
        assert text in words


def test_lr_finder_plugs_into_the_lrserve_parser():
    parser = argparse.ArgumentParser(prog="lrserve")
    add_operator_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lr-finder", "r1", "--format", "csv", "--plot", "f.png", "--url", "http://h:1"])
    assert (args.run_id, args.format, args.plot, args.url) == ("r1", "csv", "f.png", "http://h:1")


@pytest.mark.parametrize(
    ("spec", "scale"),
    [
        pytest.param(RANGE, "log", id="exponential"),
        pytest.param({**RANGE, "mode": "linear", "max_lr": 2.0}, "linear", id="linear"),
    ],
)
def test_plot_writes_a_png_with_the_tests_x_scale(api, run, tmp_path, monkeypatch, spec, scale):
    import matplotlib.figure as matplotlib_figure
    seen = {}

    class Recording(matplotlib_figure.Figure):
        def savefig(self, *args, **kwargs):
            axes = self.axes[0]
            seen["xscale"] = axes.get_xscale()
            seen["vlines"] = sorted(line.get_xdata()[0] for line in axes.lines[1:])
            seen["title"] = axes.get_title()
            return super().savefig(*args, **kwargs)

    monkeypatch.setattr(cli, "_figure_class", lambda: Recording)
    finder = finished_test(api, spec=spec)
    png = tmp_path / "finder.png"
    code, _, err = run(["lr-finder", "rt", "--plot", str(png)])
    assert code == EXIT_OK
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in err
    assert seen["xscale"] == scale
    marks = [finder["suggestions"]["steepest"], finder["suggestions"]["min_over_10"], finder["chosen"]]
    assert None not in marks
    assert seen["vlines"] == sorted(marks)
    assert f"switched at step {finder['switched_at']}" in seen["title"]


def test_plot_without_matplotlib_is_a_usage_error_before_any_request(api, run, monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, out, err = run(["lr-finder", "nope", "--plot", str(tmp_path / "x.png")])
    assert code == EXIT_USAGE  # not the 404 the server would have given: nothing was asked
    assert "matplotlib" in err and out == ""
