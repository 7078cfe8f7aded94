"""docker-compose.yml and docker/ name only things that exist: no Docker engine runs here.

``docker compose config`` validates the file where the compose plugin is installed (it
needs no daemon); everywhere, the YAML is parsed and every image, build context,
Dockerfile, COPY source, command, option, variable, port and host it names is checked
against the project: commands are parsed by the real argument parsers of ``lrserve`` and
``python -m lrserve.trainer``, server variables must be settings, trainer variables must be read
by the trainer or the client, and the proxy must name the replicas on the port they listen.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.trainer.harness import ROOT

COMPOSE = ROOT / "docker-compose.yml"
NGINX = ROOT / "docker" / "nginx.conf"
REPLICAS = ("lrserve-1", "lrserve-2")
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def expand(value: str) -> str:
    """Compose interpolation with every variable unset: defaults, or a stand-in for required ones."""
    return _VAR.sub(lambda m: m.group(3) if m.group(2) in (":-", "-") else f"<{m.group(1)}>", value)


def nginx_listen_and_upstreams() -> tuple[int, set[str]]:
    text = NGINX.read_text()
    (listen,) = re.findall(r"^\s*listen\s+(\d+)\s*;", text, re.M)
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", text, re.S)
    assert upstream and f"proxy_pass http://{upstream.group(1)};" in text
    return int(listen), set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", upstream.group(2), re.M))


def console_scripts() -> set[str]:
    """``lrserve`` (this project's, as installed) and ``torchrun`` (torch's)."""
    from importlib.metadata import entry_points

    wanted = {"lrserve": "lrserve.service.cli:main", "torchrun": "torch.distributed.run:main"}
    return {e.name for e in entry_points(group="console_scripts") if wanted.get(e.name) == e.value}


def test_the_stack_has_its_parts(services, compose):
    assert set(services) >= {"postgres", *REPLICAS, "proxy", "trainer", "trainer-gpu"}
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    assert services["trainer-gpu"]["profiles"] == ["gpu"]
    (device,) = services["trainer-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for image in [svc["image"]] if "image" in svc else []:
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_file(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_builds_name_real_contexts_dockerfiles_and_sources(services):
    built = {svc["build"]["dockerfile"] for svc in services.values() if "build" in svc}
    assert built == {"docker/Dockerfile.service", "docker/Dockerfile.trainer"}
    for svc in services.values():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"]).resolve() == ROOT
    for dockerfile in built:
        path = ROOT / dockerfile
        ignore = Path(f"{path}.dockerignore").read_text().split()
        assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"  # allow-list style
        copied = []
        for line in path.read_text().splitlines():
            if line.startswith("COPY "):
                args = [a for a in shlex.split(line)[1:] if not a.startswith("--")]
                copied += args[:-1]
        assert copied, dockerfile
        for source in copied:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}"
            assert f"!{source.rstrip('/')}/" in ignore or f"!{source}" in ignore, \
                f"{dockerfile}.dockerignore leaves out {source}"


def test_dockerfile_commands_exist():
    from lrserve.service.cli import build_parser as lrserve_parser

    service = (ROOT / "docker" / "Dockerfile.service").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", service, re.M).group(1))
    assert cmd[0] in console_scripts()
    lrserve_parser().parse_args(cmd[1:])
    assert "download.pytorch.org/whl/cpu" in service and ".[server,postgres]" in service
    trainer = (ROOT / "docker" / "Dockerfile.trainer").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", trainer, re.M).group(1))
    assert cmd[:3] == ["python", "-m", "lrserve.trainer"] and (ROOT / "trainer" / "__main__.py").exists()
    assert ".[trainer]" in trainer  # the client and the trainer, none of the server's packages
    assert re.search(r"^ARG BASE=pytorch/pytorch:[\w.-]+cuda", trainer, re.M)


def test_replicas_run_the_real_server_command_on_postgres(services):
    from lrserve.service.cli import build_parser as lrserve_parser
    from lrserve.service.settings import Settings

    pg = services["postgres"]["environment"]
    for name in REPLICAS:
        svc = services[name]
        cmd = [expand(a) for a in svc["command"]]
        assert cmd[0] in console_scripts()
        args = lrserve_parser().parse_args(cmd[1:])
        assert args.host == "0.0.0.0"
        db = urlsplit(Settings(db=args.db).db)
        assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres" and db.port == 5432
        assert (db.username, db.password, db.path.lstrip("/")) == (
            pg["POSTGRES_USER"], expand(pg["POSTGRES_PASSWORD"]), pg["POSTGRES_DB"])
        for var in svc["environment"]:
            assert var.startswith("LRSERVE_"), var
            assert var.removeprefix("LRSERVE_").lower() in Settings.model_fields, f"{var} is no setting"
        assert svc["depends_on"] == {"postgres": {"condition": "service_healthy"}}
        check = " ".join(svc["healthcheck"]["test"])
        assert args.health_port not in (None, args.port)  # probes on a port of their own
        assert f"127.0.0.1:{args.health_port}/readyz" in check


def test_proxy_balances_the_replicas_on_their_port(services):
    from lrserve.service.cli import build_parser as lrserve_parser

    listen, upstreams = nginx_listen_and_upstreams()
    ports = {name: lrserve_parser().parse_args([expand(a) for a in services[name]["command"][1:]]).port
             for name in REPLICAS}
    assert upstreams == {f"{name}:{port}" for name, port in ports.items()}
    proxy = services["proxy"]
    assert [p.split(":")[-1] for p in proxy["ports"]] == [str(listen)]
    assert f"127.0.0.1:{listen}/readyz" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["depends_on"] == {name: {"condition": "service_healthy"} for name in REPLICAS}


@pytest.mark.parametrize("name", ["trainer", "trainer-gpu"])
def test_trainer_runs_the_real_trainer_through_the_proxy(services, name):
    from lrserve.trainer.cli import build_parser as trainer_parser
    from torch.distributed.run import get_args_parser

    svc = services[name]
    cmd = svc["command"]
    assert cmd[0] in console_scripts()
    launch = get_args_parser().parse_args(cmd[1:])
    assert launch.module and launch.training_script == "lrserve.trainer"
    args = trainer_parser().parse_args(launch.training_script_args)
    assert args.checkpoint.startswith("/checkpoints/")
    assert any(v.endswith(":/checkpoints") for v in svc["volumes"])
    listen, _ = nginx_listen_and_upstreams()
    url = urlsplit(svc["environment"]["LRSERVE_URL"])
    assert (url.hostname, url.port) == ("proxy", listen)
    sources = "".join(p.read_text() for d in ("trainer", "client") for p in (ROOT / d).glob("*.py"))
    for var in svc["environment"]:
        assert f'"{var}"' in sources, f"{var} is read by neither the trainer nor the client"
    assert svc["depends_on"] == {"proxy": {"condition": "service_healthy"}}


def test_every_variable_the_file_uses_is_documented():
    used = {m.group(1) for m in _VAR.finditer(COMPOSE.read_text())}
    assert used == {"POSTGRES_PASSWORD", "LRSERVE_TOKENS", "LRSERVE_JOB_TOKEN", "LRSERVE_RUN_ID"}
    docs = (ROOT / "docs" / "trainer.md").read_text()
    header = COMPOSE.read_text().split("\nx-")[0]
    for var in used:
        assert var in docs and var in header, var


def test_docker_compose_config_accepts_it(tmp_path):
    if shutil.which("docker") is None:
        pytest.skip("no docker client")
    env = {"PATH": shutil.os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "LRSERVE_TOKENS": "admin:a,write:w", "LRSERVE_JOB_TOKEN": "w"}
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        pytest.skip("the docker client has no compose plugin here (the YAML checks above stand in)")
    done = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "--profile", "gpu", "config", "-q"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
