"""``python -m lrserve.trainer --help`` documents every option, and bad arguments fail clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from lrserve.trainer.cli import build_parser, main
from lrserve.trainer.schedules import EXAMPLES

from tests.trainer.harness import ROOT


def _help() -> str:
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "lrserve.trainer", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60, check=True)
    return done.stdout


def test_help_lists_every_option_with_a_description():
    text = _help()
    options = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 17
    for action in options:
        assert action.help and len(action.help) > 15, action.dest
        for flag in action.option_strings:
            assert flag in text, flag
    for needed in ("--url", "--token", "--run-id", "--schedule", "--epochs", "--batch-size", "--lr",
                   "--world-size", "--checkpoint", "--seed", "--device", "--step-per", "--metric-mode",
                   "--trace"):
        assert needed in text
    for name in EXAMPLES:
        assert name in text
    assert "LRSERVE_URL" in text and "LRSERVE_TOKEN" in text
    assert "torchrun --standalone --nproc_per_node=2 -m lrserve.trainer" in text


def test_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LRSERVE_URL", "http://lrserve:8000")
    monkeypatch.setenv("LRSERVE_TOKEN", "t0k")
    monkeypatch.setenv("LRSERVE_RUN_ID", "job-7")
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = build_parser().parse_args([])
    assert (args.url, args.token, args.run_id, args.world_size) == ("http://lrserve:8000", "t0k", "job-7", 4)
    assert (args.step_per, args.metric_mode, args.schedule) == ("batch", "barrier", "warmup-plateau")


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--batch-size", "0"], ["--lr", "-1"]])
def test_nonsense_numbers_are_refused(argv):
    with pytest.raises(SystemExit, match="at least 1"):
        main(argv)


def test_unknown_choice_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--metric-mode", "median"])
    assert "invalid choice" in capsys.readouterr().err
