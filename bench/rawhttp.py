"""A minimal asyncio HTTP/1.1 keep-alive client for the load generators.

Why not httpx: a load generator must not be the bottleneck, and on this 2-core machine it
shares the CPU with the server. Writing the request by hand and reading a
``Content-Length`` body costs a fraction of a full client per request; lrserve always
answers with ``Content-Length`` (JSON bodies), which is all this client understands.
"""

from __future__ import annotations

import asyncio


class HttpError(Exception):
    """The answer could not be read (closed connection, no Content-Length, ...)."""


class Connection:
    """One keep-alive connection to ``host:port``; reconnects when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request and read its answer: ``(status, body)``."""
        if self._writer is None:
            await self._open()
        assert self._reader is not None and self._writer is not None
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._host_header
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        self._writer.write(head + b"\r\n" + (body or b""))
        try:
            status_line = await self._reader.readline()
            if not status_line:
                raise HttpError("connection closed by the server")
            status = int(status_line.split(b" ", 2)[1])
            length = None
            close = False
            while True:
                line = await self._reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length is None:
                raise HttpError("answer without Content-Length")
            data = await self._reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            await self.close()
            raise HttpError(str(exc) or type(exc).__name__) from exc
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it is, with uvicorn[standard]): a cheaper client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
