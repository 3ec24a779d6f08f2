"""/metrics, /healthz and /readyz on a tiny asyncio HTTP/1.0 responder.

Three GET endpoints do not justify a web framework as a dependency; anything else
answers 404, and a request that does not parse is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from bridge.service import Service

Handler = Callable[[], tuple[int, str, bytes]]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HttpServer(Service):
    def __init__(self, host: str, port: int, handlers: dict[str, Handler]) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.handlers = handlers
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        structlog.get_logger().info("http.listening", host=self.host, port=self.port)

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        if self._server is not None:
            self._server.close()
        return await super().__aexit__(*exc_info)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = path.split("?", 1)[0]
            handler = self.handlers.get(path)
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            else:
                status, ctype, body = handler()
            head = (
                f"HTTP/1.0 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (
            TimeoutError,
            ValueError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()


def probe_handlers(
    metrics: Callable[[], bytes],
    healthy: Callable[[], bool],
    readiness: Callable[[], dict[str, Any]],
) -> dict[str, Handler]:
    """The worker's three endpoints. ``readiness()`` holds a "ready" key and the facts
    behind it, so an operator sees why a worker is not ready."""

    def healthz() -> tuple[int, str, bytes]:
        if healthy():
            return 200, "text/plain", b"ok\n"
        return 503, "text/plain", b"event loop stalled\n"

    def readyz() -> tuple[int, str, bytes]:
        state = readiness()
        body = orjson.dumps(state) + b"\n"
        return (200 if state["ready"] else 503), "application/json", body

    return {
        "/metrics": lambda: (200, "text/plain; version=0.0.4", metrics()),
        "/healthz": healthz,
        "/readyz": readyz,
    }
