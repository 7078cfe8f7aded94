"""Webhooks against a real server and a real receiver on loopback that fails its first answers.

The receiver must get every matching event at least once, in order per run, each with a
valid signature, across a kill -9 of the server; status shows in ``/metrics`` and in
``lrserve webhooks status``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from lrserve.service.store import open_store
from lrserve.service.store.webhook_queue import WebhookQueue

from tests.live_server import ServerProcess

pytestmark = pytest.mark.slow

SCHEDULE = {"type": "StepLR", "step_size": 3, "gamma": 0.5}
SECRET = "webhook-secret-7"


class Receiver:
    """An HTTP server on loopback: answers 500 to its first ``fail_first`` POSTs per path, then 204.

    With ``hold=True`` it answers 500 to everything until ``release()``, and after that
    until ``fail_first`` POSTs per path were refused in all and at least one since the
    release: what a test expects still queued must not hang on timing, the sender's backoff
    stays what those refusals make it, and the server that runs after a release surely
    records a failure. ``refused`` counts the 500s it answered per path.
    """

    def __init__(self, fail_first: int, hold: bool = False) -> None:
        self.fail_first = fail_first
        self.holding = hold
        self.lock = threading.Lock()
        self.seen: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.refused_since_release: dict[str, int] = {}
        self.got: dict[str, list[tuple[dict, bytes, str]]] = {}  # path -> (body, raw, signature)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server's name
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    n = receiver.seen[self.path] = receiver.seen.get(self.path, 0) + 1
                    ok = (not receiver.holding and n > receiver.fail_first
                          and receiver.refused_since_release.get(self.path, 0) > 0)
                    if ok:
                        receiver.got.setdefault(self.path, []).append(
                            (json.loads(raw), raw, self.headers["X-LRServe-Signature"]))
                    else:
                        receiver.refused[self.path] = receiver.refused.get(self.path, 0) + 1
                        if not receiver.holding:
                            receiver.refused_since_release[self.path] = \
                                receiver.refused_since_release.get(self.path, 0) + 1
                self.send_response(204 if ok else 500)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def release(self) -> None:
        with self.lock:
            self.holding = False

    def refusals(self, path: str) -> int:
        with self.lock:
            return self.refused.get(path, 0)

    def received(self, path: str) -> list[tuple[dict, bytes, str]]:
        with self.lock:
            return list(self.got.get(path, []))


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def test_every_event_arrives_signed_in_order_per_run_across_kill_9(tmp_path):
    db = f"sqlite:///{tmp_path}/hooks.db"
    with Receiver(fail_first=3, hold=True) as receiver:
        hooks = [{"url": f"{receiver.url}/all", "secret": SECRET},
                 {"url": f"{receiver.url}/sweep7", "secret": SECRET, "kinds": ["control"],
                  "labels": {"sweep": "7"}}]
        env = {"LRSERVE_WEBHOOKS": json.dumps(hooks)}
        server = ServerProcess(db, tmp_path, env=env).start()
        try:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                for run_id, sweep in (("a", "7"), ("b", "8")):
                    http.post("/v1/runs", json={"run_id": run_id, "schedule": SCHEDULE, "base_lrs": [0.1],
                                                "labels": {"sweep": sweep}}).raise_for_status()
                for i in range(6):
                    http.post(f"/v1/runs/{'ab'[i % 2]}/control",
                              json={"action": "scale", "factor": 0.9}).raise_for_status()
            server.kill()  # the receiver has refused everything so far: all of it waits in the queue
            assert receiver.received("/all") == []
            # A refusal the receiver answered while kill -9 landed before the server wrote it
            # down is not counted (the delivery is simply sent again): the count the server
            # kept is what its database holds now, plus every refusal after the restart.
            refused_before = receiver.refusals("/all")
            store = open_store(db)
            try:
                recorded_before = WebhookQueue(store).status([f"{receiver.url}/all"])[0].failures
            finally:
                store.close()
            assert recorded_before <= refused_before
            receiver.release()  # refusing on until 3 per path were refused in all, 1 at least from now
            server = ServerProcess(db, tmp_path, env=env, port=server.port).start()
            with httpx.Client(base_url=server.url, timeout=10) as http:
                for run_id in "ab":
                    http.post(f"/v1/runs/{run_id}/control", json={"action": "scale", "factor": 0.5})
            store = open_store(db)
            try:
                truth = [(f.run_id, f.event.seq, f.labels.get("sweep"), f.event.kind.value)
                         for f in store.read_feed(0)]
            finally:
                store.close()
            assert len(truth) == 2 + 6 + 2
            wanted = {"/all": truth, "/sweep7": [t for t in truth if t[2] == "7" and t[3] == "control"]}
            for path, expected in wanted.items():
                wait_until(lambda path=path, expected=expected: {
                    (b["run_id"], b["seq"]) for b, _, _ in receiver.received(path)
                } >= {(r, s) for r, s, _, _ in expected}, 60, f"every event at {path}")
            # The receiver keeps a body before the server has written down its delivery.
            wait_until(lambda: all(w["pending"] == 0 for w in httpx.get(
                f"{server.url}/v1/webhooks", timeout=10).json()["data"]), 60, "no delivery pending")
            for path, expected in wanted.items():
                got = receiver.received(path)
                assert {(b["run_id"], b["seq"]) for b, _, _ in got} == {(r, s) for r, s, _, _ in expected}
                for body, raw, signature in got:
                    assert signature == "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
                    assert body["id"] >= 1 and body["kind"] in ("created", "control")
                for run_id in "ab":  # in order per run (a repeat may only repeat the latest)
                    seqs = [b["seq"] for b, _, _ in got if b["run_id"] == run_id]
                    assert seqs == sorted(seqs)

            status = subprocess.run(
                [sys.executable, "-m", "lrserve.service", "webhooks", "status", "--url", server.url,
                 "--json"],
                capture_output=True, text=True, timeout=60)
            assert status.returncode == 0, status.stderr
            by_url = {w["url"]: w for w in json.loads(status.stdout)["data"]}
            assert set(by_url) == {f"{receiver.url}/all", f"{receiver.url}/sweep7"}
            assert by_url[f"{receiver.url}/all"]["delivered"] >= 10
            assert by_url[f"{receiver.url}/all"]["pending"] == 0
            refused_after = receiver.refusals("/all") - refused_before
            assert refused_after >= 1
            assert by_url[f"{receiver.url}/all"]["failed_attempts"] == recorded_before + refused_after
            assert by_url[f"{receiver.url}/all"]["last_error"] == "HTTP 500"
            assert SECRET not in status.stdout
            table = subprocess.run(
                [sys.executable, "-m", "lrserve.service", "webhooks", "status", "--url", server.url],
                capture_output=True, text=True, timeout=60)
            assert f"{receiver.url}/sweep7" in table.stdout and "DELIVERED" in table.stdout
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert f'lrserve_webhook_attempts_total{{endpoint="{receiver.url}/all",outcome="delivered"}}' \
                in metrics
            assert "lrserve_webhook_pending" in metrics
        finally:
            server.stop()


def test_a_bad_webhook_configuration_stops_the_start_with_one_line(tmp_path):
    hooks_file = tmp_path / "hooks.json"
    hooks_file.write_text(json.dumps([{"url": "ftp://example.org/x", "secret": "very-secret"}]))
    done = subprocess.run(
        [sys.executable, "-m", "lrserve.service", "serve", "--db", f"sqlite:///{tmp_path}/x.db",
         "--webhooks-file", str(hooks_file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "url" in done.stderr and "[0.url]" in done.stderr
    assert "very-secret" not in done.stderr and "Traceback" not in done.stderr


def test_two_replicas_on_postgres_deliver_each_event_once(tmp_path, database_url):
    db = database_url("postgres")
    with Receiver(fail_first=0) as receiver:
        env = {"LRSERVE_WEBHOOKS": json.dumps([{"url": f"{receiver.url}/all", "secret": SECRET}])}
        replicas = [ServerProcess(db, tmp_path, env=env).start() for _ in range(2)]
        try:
            def drive(server, run_id):
                with httpx.Client(base_url=server.url, timeout=10) as http:
                    http.post("/v1/runs", json={"run_id": run_id, "schedule": SCHEDULE,
                                                "base_lrs": [0.1]}).raise_for_status()
                    for _ in range(10):
                        http.post(f"/v1/runs/{run_id}/control",
                                  json={"action": "scale", "factor": 0.9}).raise_for_status()

            threads = [threading.Thread(target=drive, args=(replicas[i % 2], f"r{i}")) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wait_until(lambda: len(receiver.received("/all")) >= 44, 60, "44 deliveries")
            time.sleep(1.5)  # three idle rounds of both senders: a duplicate would show now
            got = [(b["run_id"], b["seq"]) for b, _, _ in receiver.received("/all")]
            assert sorted(got) == sorted((f"r{i}", s) for i in range(4) for s in range(1, 12))
            for i in range(4):
                seqs = [s for r, s in got if r == f"r{i}"]
                assert seqs == list(range(1, 12))
        finally:
            for server in replicas:
                server.stop()
