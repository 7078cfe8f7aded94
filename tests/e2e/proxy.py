"""A TCP proxy in front of replicas, as a load balancer with passive failover does.

Each client connection goes to the first replica (in order) that accepts it; bytes are
copied both ways until either side closes. A replica killed mid-connection resets its
connections (the client sees it and reconnects); new connections skip it while it refuses.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Sequence

from tests.live_server import free_port


class FailoverProxy:
    def __init__(self, backends: Sequence[int]) -> None:
        self.backends = list(backends)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FailoverProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._listener.close()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="test-proxy")
        thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        for port in self.backends:
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue  # refused: the next replica
            upstream.settimeout(None)
            self._spawn(pipe, client, upstream)
            pipe(upstream, client)
            return
        client.close()


def pipe(source: socket.socket, sink: socket.socket, on_data: Callable[[], object] | None = None) -> None:
    """Copy ``source``'s bytes to ``sink`` until either side closes (``on_data`` after each
    ``recv`` of data), then shut both down and close them."""
    try:
        while data := source.recv(65536):
            if on_data is not None:
                on_data()
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
