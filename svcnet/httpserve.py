"""A tiny asyncio HTTP/1.1 server for health, readiness and metrics endpoints.

Every daemon needs the same three or four GET routes; this avoids a web framework on the
node and keeps one implementation of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


# A route may be a coroutine function: one that must not block the event loop awaits a thread.
Route = Callable[[], Response | Awaitable[Response]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}


def metrics_route() -> Response:
    """Prometheus exposition of this process's default registry."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(200, generate_latest(), CONTENT_TYPE_LATEST)


class HTTPServer:
    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            route = self.routes.get(path.split("?", 1)[0])
            if route is None:
                resp = Response(404, b"not found\n")
            elif method not in ("GET", "HEAD"):
                resp = Response(405, b"method not allowed\n")
            else:
                try:
                    answer = route()
                    resp = answer if isinstance(answer, Response) else await answer
                except Exception:
                    log.exception("route %s failed", path)
                    resp = Response(500, b"internal error\n")
            head = (
                f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}\r\n"
                f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head + (b"" if method == "HEAD" else resp.body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, ValueError):
            pass
        finally:
            writer.close()
