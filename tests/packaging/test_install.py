"""What ``pip install lrserve`` puts in a user's environment: one ``lrserve`` namespace (no
top-level ``client``, ``service`` or ``trainer`` to clash with the user's own modules), and, as
the base install, the client alone: httpx and orjson, nothing of the server, no torch.

The wheel is built from this checkout and installed into a fresh virtual environment from the
client's dependency wheels that ``scripts/bootstrap`` downloads (no network here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.live_server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "pydantic", "pydantic_settings",
               "prometheus_client", "torch", "numpy")

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
"""A user's environment: this checkout is not on its path (no PYTHONPATH)."""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("lrserve-*.whl")
    return path


@pytest.fixture(scope="module")
def client_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with ``pip install lrserve`` (the base install) and nothing else."""
    wheelhouse = VENV / "wheelhouse"
    assert wheelhouse.is_dir(), "run ./scripts/bootstrap: it downloads the client's wheels"
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--disable-pip-version-check", "--no-index", "--find-links", str(wheelhouse),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300, env=CLEAN_ENV)
    return venv


def in_venv(venv: Path, code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=venv, env=CLEAN_ENV, **kwargs)


def test_the_wheel_holds_every_module_under_lrserve_and_nothing_at_the_top(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"lrserve"}
    for folder in ("client", "service", "trainer"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert f"lrserve/{path.relative_to(ROOT).as_posix()}" in names, f"{path} is not installed"


def test_the_base_install_is_the_client_without_the_server_or_torch(client_venv):
    probe = f"""
import importlib.util, json, sys
import lrserve.client, lrserve.client._cli
from lrserve.client import LRClient, RemoteScheduler
print(json.dumps({{
    "installed": [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m) is not None],
    "top_level": [m for m in ("client", "service", "trainer") if importlib.util.find_spec(m) is not None],
    "loaded": sorted(m for m in sys.modules if m.startswith("lrserve.service")),
    "orjson": importlib.util.find_spec("orjson") is not None,
}}))
"""
    done = in_venv(client_venv, probe)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got == {"installed": [], "top_level": [], "loaded": [], "orjson": True}


def test_the_installed_client_talks_to_a_real_server(client_venv, tmp_path):
    with ServerProcess(f"sqlite:///{tmp_path}/x.db", tmp_path) as server:
        code = f"""
from lrserve.client import LRClient
with LRClient({server.url!r}) as c:
    c.create_run({{"type": "StepLR", "step_size": 2, "gamma": 0.5}}, [0.1], run_id="installed")
    print(c.read_lr("installed", 0, ahead=3)["window"]["lrs"])
"""
        done = in_venv(client_venv, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([[0.1], [0.1], [0.05], [0.05]])


def test_the_lrserve_command_of_a_client_install_says_how_to_get_the_server(client_venv, tmp_path):
    lrserve = client_venv / "bin" / "lrserve"
    helped = subprocess.run([str(lrserve), "--help"], capture_output=True, text=True, timeout=60,
                            env=CLEAN_ENV)
    assert helped.returncode == 0 and "runs" in helped.stdout, helped.stderr
    served = subprocess.run([str(lrserve), "serve", "--db", f"sqlite:///{tmp_path}/x.db"],
                            capture_output=True, text=True, timeout=60, env=CLEAN_ENV)
    assert served.returncode == 1
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'lrserve[server]'" in lines[0], served.stderr
