"""Start-up refuses a configuration that would open the server by mistake, in one line.

Before issue 13: ``LRSERVE_TOKENS=","`` (or ``" "``, ``"#admin:x"``, a tokens file of
comments) passed the non-loopback check and served everyone as admin; a malformed entry
or setting was a 37-line traceback. Real ``lrserve serve`` / ``python -m lrserve.service``
processes, as an operator starts them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.live_server import ServerProcess, free_port

# slow: each case starts a real lrserve process (an operator's start-up, seconds of imports each)
pytestmark = pytest.mark.slow

SECRET = "s3cr3t-t0ken"


def serve(tmp_path, *args: str, env: dict[str, str] | None = None, lrserve: bool = False):
    base = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
    script = shutil.which("lrserve", path=os.path.dirname(sys.executable))
    cmd = [script, "serve"] if lrserve and script else [sys.executable, "-m", "lrserve.service"]
    if "LRSERVE_DB" not in (env or {}):
        cmd += ["--db", f"sqlite:///{tmp_path / 'db.sqlite'}"]
    if "LRSERVE_PORT" not in (env or {}):
        cmd += ["--port", str(free_port())]
    return subprocess.run(
        [*cmd, *args],
        capture_output=True, text=True, timeout=60, env={**base, **(env or {})},
    )


def assert_one_line_exit_1(result, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("lrserve: cannot start: "), result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.mark.parametrize("tokens", [",", " ", "#admin:x", " , ,#c", "\n"])
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_tokens_that_yield_no_token_refuse_to_start(tmp_path, tokens, host):
    result = serve(tmp_path, "--host", host, env={"LRSERVE_TOKENS": tokens})
    assert_one_line_exit_1(result, "LRSERVE_TOKENS", "no role:token entry")


def test_a_tokens_file_of_comments_refuses_to_start(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# admin:not-a-token\n\n   \n# read:x\n")
    result = serve(tmp_path, "--host", "0.0.0.0", "--tokens-file", str(path), lrserve=True)
    assert_one_line_exit_1(result, str(path), "no role:token entry")


def test_a_missing_tokens_file_is_one_line(tmp_path):
    result = serve(tmp_path, "--tokens-file", str(tmp_path / "nope"))
    assert_one_line_exit_1(result, "cannot read the tokens file")


@pytest.mark.parametrize("entry", [f"root:{SECRET}", f"admin:{SECRET},{SECRET}", "admin:", f"x:y:{SECRET}"])
def test_a_malformed_entry_is_one_line_never_echoing_a_token(tmp_path, entry):
    result = serve(tmp_path, env={"LRSERVE_TOKENS": entry}, lrserve=True)
    assert_one_line_exit_1(result, "LRSERVE_TOKENS: entry")


@pytest.mark.parametrize("name,value", [
    ("LRSERVE_PORT", "eighty"), ("LRSERVE_MAX_AHEAD", "-5"), ("LRSERVE_SQLITE_SYNCHRONOUS", "SOMETIMES"),
    ("LRSERVE_BARRIER_TIMEOUT_S", "soon"), ("LRSERVE_DB", f"mysql://u:{SECRET}@h/db"),
    ("LRSERVE_OFFLOAD_NICE", "20"), ("LRSERVE_OFFLOAD_NICE", "-1"), ("LRSERVE_OFFLOAD_NICE", "low"),
    ("LRSERVE_OFFLOAD_SLICE_MS", "-1"), ("LRSERVE_OFFLOAD_SLICE_MS", "101"),
    ("LRSERVE_OFFLOAD_SLICE_MS", "nan"),
])
def test_a_malformed_setting_is_one_line_naming_it(tmp_path, name, value):
    assert_one_line_exit_1(serve(tmp_path, env={name: value}), name)


def test_the_bind_check_uses_the_parsed_tokens(tmp_path):
    result = serve(tmp_path, "--host", "0.0.0.0", env={"LRSERVE_TOKENS": ""})
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0 without tokens" in result.stderr


def test_a_named_token_closes_the_server(tmp_path):
    env = {"LRSERVE_TOKENS": f"# the operators\nops:admin:{SECRET}, read:viewer-token"}
    with ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, env=env) as server:
        assert httpx.get(f"{server.url}/v1/runs").status_code == 401
        auth = {"authorization": f"Bearer {SECRET}"}
        assert httpx.get(f"{server.url}/v1/runs", headers=auth).status_code == 200
