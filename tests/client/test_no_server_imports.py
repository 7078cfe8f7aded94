"""A training image needs only httpx: importing the client pulls in no server code."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("fastapi", "starlette", "lrserve.service", "uvicorn", "sqlalchemy", "pydantic", "torch",
             "matplotlib")


def test_client_imports_neither_the_server_nor_torch():
    code = ("import json, sys\nimport lrserve.client, lrserve.client._cli\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if m.startswith(FORBIDDEN)]
    assert bad == []
    assert "httpx" in loaded


def test_client_sources_do_not_mention_server_modules():
    import pathlib

    from lrserve import client
    for path in pathlib.Path(client.__file__).parent.glob("*.py"):
        text = path.read_text()
        for name in ("fastapi", "starlette", "lrserve.service"):
            assert name not in text, f"{path.name} mentions {name}"


def test_scheduler_works_without_torch():
    code = """
import sys, httpx
from lrserve.client import RemoteScheduler

def answer(request):
    return httpx.Response(201, json={"run_id": "r", "horizon": 0, "lrs": [0.1], "momentums": None,
                                     "status": "active"})

class Opt:
    param_groups = [{"lr": 0.1}]

http = httpx.Client(transport=httpx.MockTransport(answer), base_url="http://x")
sched = RemoteScheduler(Opt(), {"type": "StepLR", "step_size": 3}, http_client=http)
assert sched.get_last_lr() == [0.1]
sched.close()
http.close()
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
