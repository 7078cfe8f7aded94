"""Every route x {no token, read, write, admin}: 401 / 403 / allowed, as API.md says."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from lrserve.service.app import create_app
from lrserve.service.auth import Authenticator, Identity, TokenError, load_tokens, parse_tokens

TOKENS = {"read": "r-token", "write": "w-token", "admin": "a-token"}
RANK = {None: -1, "read": 0, "write": 1, "admin": 2}
SPEC = {"type": "StepLR", "step_size": 2}

# (method, path template) -> (least role, request kwargs). None: open to everyone.
ROUTES = {
    ("POST", "/v1/runs"): ("write", {"json": {"run_id": "new", "schedule": SPEC, "base_lrs": [0.1]}}),
    ("GET", "/v1/runs"): ("read", {}),
    ("GET", "/v1/runs/{run_id}"): ("read", {}),
    ("DELETE", "/v1/runs/{run_id}"): ("admin", {}),
    ("POST", "/v1/runs/{run_id}/control"): ("admin", {"json": {"action": "hold"}}),
    ("POST", "/v1/control"): (
        "admin", {"json": {"selector": {"status": ["active"]}, "action": {"action": "hold"}}}),
    ("GET", "/v1/runs/{run_id}/history"): ("read", {}),
    ("GET", "/v1/runs/{run_id}/lr-finder"): ("read", {}),
    ("GET", "/v1/runs/{run_id}/spike-guard"): ("read", {}),
    ("GET", "/v1/runs/{run_id}/lr"): ("read", {"params": {"step": 1}}),
    ("POST", "/v1/runs/{run_id}/step"): ("write", {"json": {"step": 1}}),
    ("POST", "/v1/runs/{run_id}/metrics"): (
        "write", {"json": {"records": [{"step": 0, "name": "loss", "value": 1.0}]}}),
    ("POST", "/v1/schedules/preview"): ("read", {"json": {"schedule": SPEC, "base_lrs": [0.1], "steps": 3}}),
    ("GET", "/v1/schedules/catalog"): ("read", {}),
    # a stream never ends, which TestClient waits for: an unknown kind makes it a 422 once
    # access is granted (tests/e2e/test_event_stream.py reads the stream with a read token)
    ("GET", "/v1/events"): ("read", {"params": {"kind": "unknown"}}),
    ("GET", "/v1/webhooks"): ("admin", {}),
    ("GET", "/v1/whoami"): ("read", {}),
    ("GET", "/healthz"): (None, {}),
    ("GET", "/readyz"): (None, {}),
    ("GET", "/metrics"): (None, {}),
}


@pytest.fixture(scope="module")
def secured(module_settings):
    # One app per backend for the whole matrix (it was one per case: 150 apps, a database each).
    tokens = ",".join(f"{role}:{token}" for role, token in TOKENS.items())
    app = create_app(module_settings.model_copy(update={"tokens": tokens}))
    with TestClient(app) as client:
        yield app, client


def test_every_route_is_in_the_matrix(secured):
    app, _ = secured
    documented = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
    assert documented == set(ROUTES)


@pytest.mark.parametrize("who", [None, "read", "write", "admin"], ids=lambda w: w or "no-token")
@pytest.mark.parametrize(("method", "template"), list(ROUTES), ids=lambda x: str(x))
def test_role_matrix(secured, method, template, who):
    _, client = secured
    least, kwargs = ROUTES[(method, template)]
    admin = {"Authorization": f"Bearer {TOKENS['admin']}"}
    then = {"type": "SpikeGuard", "schedule": SPEC}  # every route has something to show
    range_test = {"type": "LRRangeTest", "min_lr": 1e-4, "max_lr": 1.0, "then": then}
    client.post("/v1/runs", json={"run_id": "r", "schedule": range_test, "base_lrs": [0.1]}, headers=admin)
    headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
    response = client.request(method, template.replace("{run_id}", "r"), headers=headers, **kwargs)
    if least is None or RANK[who] >= RANK[least]:
        assert response.status_code not in (401, 403), response.text
        assert response.status_code < 400 or (template, response.status_code) == ("/v1/events", 422), \
            response.text
    elif who is None:
        assert response.status_code == 401
        assert response.json()["code"] == "unauthorized"
    else:
        assert response.status_code == 403
        assert least in response.json()["detail"]


def test_wrong_token_is_401_and_never_echoed(secured):
    _, client = secured
    response = client.get("/v1/runs", headers={"Authorization": "Bearer not-a-token-xyz"})
    assert response.status_code == 401
    assert "not-a-token-xyz" not in response.text


def test_tokens_file(settings, tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# ops\nadmin:file-admin\nread:file-read\n")
    app = create_app(settings.model_copy(update={"tokens_file": path}))
    with TestClient(app) as client:
        assert client.get("/v1/runs", headers={"Authorization": "Bearer file-read"}).status_code == 200
        assert client.get("/v1/runs").status_code == 401


def test_a_tokens_file_not_utf8_is_a_token_error_naming_it(tmp_path):
    # It was an AttributeError (UnicodeDecodeError has no strerror): a traceback at start-up.
    path = tmp_path / "tokens"
    path.write_bytes(b"admin:s3cr\xe9t\n")
    with pytest.raises(TokenError, match="not UTF-8") as caught:
        load_tokens("", path)
    assert str(path) in str(caught.value) and "s3cr" not in str(caught.value)


@pytest.mark.parametrize("text", ["admin", "root:x", "read:", ":tok", "alice:root:x", ":read:tok"])
def test_malformed_tokens_fail_loudly(text):
    with pytest.raises(TokenError):
        parse_tokens(text, source="LRSERVE_TOKENS")


def test_open_server_treats_everyone_as_admin():
    assert Authenticator({}).identify(None) == Identity("local", "admin")


def test_named_tokens_carry_their_name_unnamed_ones_their_role():
    tokens = parse_tokens("ops-alice:admin:t0k,write:job:token,read:viewer", source="LRSERVE_TOKENS")
    assert tokens == {
        "t0k": Identity("ops-alice", "admin"),
        "job:token": Identity("write", "write"),  # role:token, the token holds a ':'
        "viewer": Identity("read", "read"),
    }
    auth = Authenticator(tokens)
    assert auth.require("Bearer t0k", "admin") == Identity("ops-alice", "admin")
