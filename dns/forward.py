"""Forwarding names outside the cluster zone to upstream resolvers, like CoreDNS's forward.

Each upstream has one UDP socket; queries get a fresh random ID so replies are matched
without a socket per query, and a truncated reply is retried over TCP. An upstream that
fails ``max_fails`` times in a row is marked down and probed (``. IN NS``) every
``health_interval`` until it answers; queries go to healthy upstreams in random order, to
all of them when none is healthy. Beyond ``max_concurrent`` queries in flight the caller
gets REFUSED (counted). Upstreams that are this server itself are refused at start
(``drop_self``) and at run time by a loop probe (``Forwarder.loop_probe_name``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from dataclasses import dataclass, field

from svcnet.dns import metrics
from svcnet.dns.wire import HINFO, NS, RCODE_NAMES

log = logging.getLogger(__name__)


class ForwardError(Exception):
    """No upstream produced an answer."""


class ConcurrencyLimit(ForwardError):
    """Too many queries in flight; answer REFUSED."""


def parse_hostport(text: str, default_port: int = 53) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, default_port


def resolv_conf_upstreams(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append((parts[1].split("%")[0], 53))
    except OSError:
        pass
    return out


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12:
            return
        fut = self.upstream.pending.pop(data[:2], None)
        if fut is not None and not fut.done():
            fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        for fut in self.upstream.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.upstream.pending.clear()


@dataclass(eq=False)
class Upstream:
    host: str
    port: int
    fails: int = 0
    healthy: bool = True
    looped: bool = False
    transport: asyncio.DatagramTransport | None = None
    pending: dict[bytes, asyncio.Future[bytes]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    async def _ensure(self) -> asyncio.DatagramTransport:
        if self.transport is None or self.transport.is_closing():
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self), remote_addr=(self.host, self.port))
            self.transport = transport
        return self.transport

    async def exchange(self, query: bytes, timeout: float) -> bytes:
        """Send over UDP (TCP on truncation); the reply carries the caller's ID."""
        transport = await self._ensure()
        loop = asyncio.get_running_loop()
        for _ in range(16):
            qid = struct.pack("!H", random.getrandbits(16))
            if qid not in self.pending:
                break
        fut: asyncio.Future[bytes] = loop.create_future()
        self.pending[qid] = fut
        try:
            transport.sendto(qid + query[2:])
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(qid, None)
        qend = query.index(0, 12) + 5
        if reply[4:6] != b"\x00\x00" and reply[12:qend].lower() != query[12:qend].lower():
            raise ForwardError("reply for another question")
        if reply[2] & 0x02:
            reply = await self._tcp(query, timeout)
        return query[:2] + reply[2:]

    async def _tcp(self, query: bytes, timeout: float) -> bytes:
        async def go() -> bytes:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(struct.pack("!H", len(query)) + query)
                await writer.drain()
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                return await reader.readexactly(size)
            finally:
                writer.close()

        return await asyncio.wait_for(go(), timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def drop_self(upstreams: list[tuple[str, int]], listen: tuple[str, int]
              ) -> list[tuple[str, int]]:
    """Refuse upstreams that are our own listening address (a forwarding loop)."""
    host, port = listen
    ours = {host} if host not in ("0.0.0.0", "::", "") else {"0.0.0.0", "::"}
    out = []
    for up_host, up_port in upstreams:
        local = up_host in ours or ("0.0.0.0" in ours and up_host.startswith("127.")) or (
            "::" in ours and up_host == "::1")
        if up_port == port and local:
            log.error("upstream %s:%d is this server; not forwarding to it", up_host, up_port)
            continue
        out.append((up_host, up_port))
    return out


class Forwarder:
    def __init__(self, upstreams: list[tuple[str, int]], *, timeout: float = 2.0,
                 max_fails: int = 2, health_interval: float = 0.5,
                 max_concurrent: int = 1000) -> None:
        self.upstreams = [Upstream(h, p) for h, p in upstreams]
        self.timeout = timeout
        self.max_fails = max_fails
        self.health_interval = health_interval
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self._health_task: asyncio.Task[None] | None = None
        self.loop_probe_name = (
            f"{random.getrandbits(32):x}.{random.getrandbits(32):x}.svcnet-loop-check.")

    async def forward(self, query: bytes) -> bytes:
        if self.in_flight >= self.max_concurrent:
            metrics.FORWARD_MAX_CONCURRENT.inc()
            raise ConcurrencyLimit("too many concurrent queries")
        candidates = [u for u in self.upstreams if not u.looped]
        if not candidates:
            raise ForwardError("no upstream")
        healthy = [u for u in candidates if u.healthy]
        order = healthy or candidates
        random.shuffle(order)
        self.in_flight += 1
        try:
            last: Exception | None = None
            for up in order:
                started = time.perf_counter()
                metrics.FORWARD_REQUESTS.labels(up.name).inc()
                try:
                    reply = await up.exchange(query, self.timeout)
                except (OSError, TimeoutError, ForwardError, asyncio.IncompleteReadError,
                        struct.error) as err:
                    last = err
                    self._failed(up)
                    continue
                rcode = RCODE_NAMES.get(reply[3] & 0xF, str(reply[3] & 0xF))
                metrics.FORWARD_RESPONSES.labels(up.name, rcode).inc()
                metrics.FORWARD_DURATION.labels(up.name, rcode).observe(
                    time.perf_counter() - started)
                up.fails = 0
                return reply
            raise ForwardError(f"all upstreams failed: {last}")
        finally:
            self.in_flight -= 1

    def _failed(self, up: Upstream) -> None:
        up.fails += 1
        if up.healthy and up.fails >= self.max_fails:
            up.healthy = False
            log.warning("upstream %s marked down after %d failures", up.name, up.fails)
            self._start_health_checks()

    def _start_health_checks(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self) -> None:
        probe = struct.pack("!HHHHHH", 0, 0, 1, 0, 0, 0) + b"\x00" + struct.pack("!HH", NS, 1)
        while any(not u.healthy for u in self.upstreams):
            await asyncio.sleep(self.health_interval)
            for up in [u for u in self.upstreams if not u.healthy]:
                try:
                    await up.exchange(probe, self.timeout)
                except (OSError, TimeoutError, ForwardError, asyncio.IncompleteReadError):
                    metrics.FORWARD_HC_FAILURES.labels(up.name).inc()
                    continue
                up.healthy, up.fails = True, 0
                log.info("upstream %s is healthy again", up.name)
            if all(not u.healthy for u in self.upstreams):
                metrics.FORWARD_HC_BROKEN.inc()

    def probe_query(self, index: int) -> bytes:
        """A HINFO query naming upstream ``index``; seeing it arrive here means a loop."""
        name = f"u{index}.{self.loop_probe_name}"
        wire = b"".join(bytes((len(p),)) + p.encode() for p in name.rstrip(".").split("."))
        return struct.pack("!HHHHHH", random.getrandbits(16), 0x0100, 1, 0, 0, 0) + wire + \
            b"\x00" + struct.pack("!HH", HINFO, 1)

    def saw_probe(self, qname: str) -> bool:
        """Called for every query we receive; marks the looping upstream when it is a probe."""
        if not qname.endswith(self.loop_probe_name):
            return False
        label = qname.split(".", 1)[0]
        with contextlib.suppress(ValueError, IndexError):
            up = self.upstreams[int(label[1:])]
            if not up.looped:
                up.looped = True
                log.error("forwarding loop detected through upstream %s; not forwarding to it",
                          up.name)
        return True

    async def check_loops(self) -> None:
        """Send one loop probe through every upstream (CoreDNS's loop plugin, simplified)."""
        for i, up in enumerate(self.upstreams):
            with contextlib.suppress(OSError, TimeoutError, ForwardError,
                                     asyncio.IncompleteReadError):
                await up.exchange(self.probe_query(i), self.timeout)

    def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for up in self.upstreams:
            up.close()
