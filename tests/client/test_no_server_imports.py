"""A training image needs only httpx: importing the client pulls in no server code."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("fastapi", "starlette", "service", "uvicorn", "sqlalchemy", "pydantic", "torch", "matplotlib")


def test_client_imports_neither_the_server_nor_torch():
    code = "import json, sys\nimport client, client._cli\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert bad == []
    assert "httpx" in loaded


def test_client_sources_do_not_mention_server_modules():
    import pathlib

    import client

    for path in pathlib.Path(client.__file__).parent.glob("*.py"):
        text = path.read_text()
        for name in ("fastapi", "starlette", "from service", "import service"):
            assert name not in text, f"{path.name} mentions {name}"
