"""``python -m bench [--quick | --size NAME] [--only NAME ...] [--json PATH]``

Runs the figures in order, prints each table as it completes and a summary at the end,
and writes everything (numbers, what ran, the machine) as JSON, by default to
``bench/results/latest.json`` (git-ignored). A figure whose package or database is
missing is skipped with the reason; a figure that fails is reported and the others run.
Exit status: 0 when every figure ran (skips included), 1 when one failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import report
from bench.servers import Pool, workdir
from bench.sizes import SIZES

FIGURES = ("client_step", "hot_path", "report_decide", "scale", "backends", "fanout", "budgets", "routes")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "fastapi", "starlette", "uvicorn", "pydantic", "sqlalchemy", "httpx", "optuna",
                 "grpcio", "psycopg"):
        try:
            from importlib.metadata import version

            found[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed, whatever the reason
            pass
    from bench.loadgen import wrk_path

    if wrk_path():
        out = subprocess.run([wrk_path() or "wrk", "-v"], capture_output=True, text=True)
        found["wrk"] = (out.stdout or out.stderr).split("[")[0].strip()
    return found


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg()), "note": "2 cores, shared with other work (noisy)"}


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service", "client"],
                               capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return head + (" (service/ or client/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick size (under about a minute)")
    parser.add_argument("--size", choices=list(SIZES), help="tiny (smoke test), quick or default")
    parser.add_argument("--only", nargs="+", choices=FIGURES, metavar="NAME",
                        help=f"run only these figures: {', '.join(FIGURES)}")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"where to write (default {DEFAULT_JSON.relative_to(ROOT)})")
    parser.add_argument("--scale-runs", type=int, nargs="+", metavar="N",
                        help="run counts for the memory figure (e.g. 10000 100000; 100,000 takes ~15 min)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = SIZES[args.size or ("quick" if args.quick else "default")]
    if args.scale_runs:
        size = dataclasses.replace(size, scale_runs=tuple(sorted(args.scale_runs)))
    names = [n for n in FIGURES if not args.only or n in args.only]
    meta = {"command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "size": size.name, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git": _git(), "machine": _machine(), "versions": _versions()}
    print(f"lrserve bench, size {size.name}: {', '.join(names)}  [{meta['machine']['cpus']} cpus, "
          f"load {meta['machine']['loadavg_start'][0]:.1f}; git {meta['git']}]", flush=True)
    figures: dict[str, Any] = {}
    failed = False
    began = time.perf_counter()
    with workdir() as work:
        pool = Pool(work, share=size.name != "default")  # fresh servers for the numbers to quote
        try:
            for name in names:
                module = importlib.import_module(f"bench.{name}")
                t0 = time.perf_counter()
                try:
                    fig = module.run(size, work, pool)
                except Exception as exc:  # noqa: BLE001 - report it; the other figures still run
                    failed = True
                    fig = report.skipped(name, module.TITLE, f"FAILED: {exc!r}")
                    fig["error"] = traceback.format_exc()
                    print(fig["error"], file=sys.stderr)
                fig["seconds"] = round(time.perf_counter() - t0, 1)
                figures[name] = fig
                print(report.table(fig), f"({fig['seconds']} s)\n", sep="", flush=True)
        finally:
            pool.close()
    meta["seconds"] = round(time.perf_counter() - began, 1)
    meta["machine"]["loadavg_end"] = list(os.getloadavg())
    print(summary(figures))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "figures": figures}, indent=1) + "\n")
    print(f"wrote {args.json} ({meta['seconds']} s)")
    return 1 if failed else 0


def summary(figures: dict[str, Any]) -> str:
    lines = ["== Summary =="]
    for name, fig in figures.items():
        if fig.get("skipped"):
            verdict = "skipped: " + fig["skipped"]
        else:
            verdict = f"{report.VERDICTS[fig['holds']]}  ({fig['target']})"
        lines.append(f"{name:14} {verdict}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
