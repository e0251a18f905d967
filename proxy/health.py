"""kube-proxy's health endpoints: ``/healthz`` + ``/livez``, and healthCheckNodePort servers.

As in kube-proxy, the health address (all interfaces by default) serves the two probes only;
``/metrics`` and ``/status`` (a kernel dump) are on the metrics address, loopback by default.

``/healthz`` and ``/livez`` answer 200 once rules have been synced and no queued change has
waited longer than the health timeout, 503 otherwise (kube-proxy's ProxierHealthServer; we
have no node-deletion state, so both agree). A Service with
``externalTrafficPolicy: Local`` gets an HTTP server on its healthCheckNodePort answering
200 while this node has a ready local endpoint and 503 otherwise, so load balancers steer
around nodes without one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter
from svcnet.proxy import metrics

from svcnet.httpserve import HTTPServer, Response, Route, metrics_route

log = logging.getLogger(__name__)


class SyncHealth:
    """Tracks when rules were last applied and how old the oldest unapplied change is."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self.clock = clock
        self.last_updated: float | None = None
        self.oldest_queued: float | None = None

    def queued(self) -> None:
        if self.oldest_queued is None:
            self.oldest_queued = self.clock()

    def updated(self) -> None:
        self.last_updated = self.clock()
        self.oldest_queued = None

    def healthy(self) -> bool:
        if self.last_updated is None:
            return False
        return self.oldest_queued is None or self.clock() - self.oldest_queued < self.timeout

    def response(self, counter: Counter) -> Response:
        ok = self.healthy()
        code = 200 if ok else 503
        counter.labels(str(code)).inc()
        body = {
            "lastUpdated": _rfc3339(self.last_updated),
            "currentTime": _rfc3339(self.clock()),
            "nodeEligible": True,
        }
        return Response(code, json.dumps(body).encode(), "application/json")


def health_routes(health: SyncHealth) -> dict[str, Route]:
    """What ``--proxy-healthz-bind-address`` serves (0.0.0.0 by default): only the two
    probes, each answered from memory, so a client anywhere cannot slow the sync loop."""
    return {
        "/healthz": lambda: health.response(metrics.HEALTHZ),
        "/livez": lambda: health.response(metrics.LIVEZ),
    }


def metrics_routes(status: StatusPage) -> dict[str, Route]:
    """What ``--proxy-metrics-bind-address`` serves (loopback by default)."""

    async def metrics_page() -> Response:
        return await asyncio.to_thread(metrics_route)

    return {"/metrics": metrics_page, "/status": status.response}


class StatusPage:
    """``/status`` without stalling the sync loop: the kernel dump (seconds for a large
    ruleset) runs in a worker thread, at most one at a time; requests arriving meanwhile
    share it, and its answer serves every request for ``ttl`` seconds."""

    def __init__(self, dump: Callable[[], dict[str, object]], ttl: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dump = dump
        self.ttl = ttl
        self.clock = clock
        self._answer: tuple[float, Response] | None = None
        self._running: asyncio.Task[Response] | None = None

    async def response(self) -> Response:
        if self._answer is not None and self.clock() - self._answer[0] < self.ttl:
            return self._answer[1]
        if self._running is None:
            self._running = asyncio.create_task(self._refresh())
        # A client going away must not cancel the dump the others wait for.
        return await asyncio.shield(self._running)

    async def _refresh(self) -> Response:
        try:
            started = self.clock()
            resp = status_response(await asyncio.to_thread(self.dump))
            self._answer = (started, resp)
            return resp
        finally:
            self._running = None


def status_response(body: dict[str, object]) -> Response:
    """200 when the kernel holds exactly the applied rules (or the mode is not covered)."""
    code = 200 if body.get("in_sync") is not False else 503
    return Response(code, json.dumps(body).encode(), "application/json")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    namespace: str
    name: str
    port: int
    local_endpoints: int


class NodePortHealthServers:
    """One HTTP server per healthCheckNodePort, reconciled after every sync."""

    def __init__(self, host: str = "0.0.0.0") -> None:
        self.host = host
        self._servers: dict[int, HTTPServer] = {}
        self._checks: dict[int, HealthCheck] = {}

    async def reconcile(self, wanted: Mapping[int, HealthCheck]) -> None:
        self._checks = dict(wanted)
        for port in list(self._servers):
            if port not in wanted:
                await self._servers.pop(port).stop()
        for port in wanted:
            if port in self._servers:
                continue
            route = self._route(port)
            server = HTTPServer({"/": route, "/healthz": route}, self.host, port)
            try:
                await server.start()
            except OSError as err:
                log.error("cannot serve healthCheckNodePort %d: %s", port, err)
                continue
            self._servers[port] = server

    def _route(self, port: int) -> Callable[[], Response]:
        def answer() -> Response:
            check = self._checks.get(port)
            count = check.local_endpoints if check else 0
            body = {
                "service": {"namespace": check.namespace if check else "",
                            "name": check.name if check else ""},
                "localEndpoints": count,
                "serviceProxyHealthy": True,
            }
            return Response(200 if count > 0 else 503, json.dumps(body).encode(),
                            "application/json")

        return answer

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self._servers.values()))
        self._servers.clear()


def _rfc3339(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
