"""Helpers for the DNS tests: a DNS component on its own event-loop thread, a dnslib upstream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.query
from dnslib import QTYPE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer
from svcnet.dns.daemon import DNSComponent, DNSOptions

from svcnet.store.memory import MemoryStore
from svcnet.watch import InformerFactory


@dataclass
class Running:
    port: int
    component: DNSComponent
    store: Any
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Awaitable[Any], timeout: float = 10) -> Any:
        """Run a coroutine on the server's loop (e.g. a store change) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]


@contextmanager
def serve(options: DNSOptions, populate: Callable[[MemoryStore], Awaitable[None]] | None = None,
          *, store: Any = None, wait_ready: bool = True) -> Iterator[Running]:
    """Run a DNSComponent (informers over ``store``) on a thread; always cleaned up."""
    loop = asyncio.new_event_loop()
    store = store if store is not None else MemoryStore()
    component = DNSComponent(options)
    started = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        factory = InformerFactory(store)
        try:
            if populate is not None:
                await populate(store)
            task = asyncio.create_task(component.run(factory, store))
            while component.server is None or component.server.port == 0 or (
                    not component.server._tcp):
                await asyncio.sleep(0.01)
                if task.done():
                    task.result()
            if wait_ready:
                await asyncio.wait_for(component.ready.wait(), 15)
            started.set()
            with suppress(asyncio.CancelledError):
                await task
        except BaseException as err:
            failure.append(err)
            started.set()
        finally:
            await factory.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(20), "dns server did not start"
    if failure:
        raise failure[0]
    try:
        yield Running(component.server.port, component, store, loop)
    finally:
        def cancel() -> None:
            for task in asyncio.all_tasks(loop):
                if task.get_coro().__qualname__.startswith("DNSComponent.run"):  # type: ignore[union-attr]
                    task.cancel()
        loop.call_soon_threadsafe(cancel)
        thread.join(15)


def query(port: int, name: str, rtype: str, *, tcp: bool = False, timeout: float = 3,
          **kw: Any) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, **kw)
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=timeout)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=timeout)


def wait_for(check: Callable[[], bool], timeout: float = 5, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return check()


@dataclass
class Upstream:
    """A loopback resolver built on dnslib's server: records answers and counts queries."""

    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    ttl: int = 60
    delay: float = 0.0
    silent: bool = False
    queries: list[tuple[str, str, str]] = field(default_factory=list)
    port: int = 0


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        up = self.upstream
        name = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        up.queries.append((name, qtype, handler.protocol))
        if up.delay:
            time.sleep(up.delay)
        reply = request.reply()
        zone_lines = up.records.get((name, qtype))
        if zone_lines is None:
            reply.header.rcode = 3
            reply.add_auth(*RR.fromZone(
                f"example.org. {up.ttl} IN SOA ns.example.org. h.example.org. 1 2 3 4 {up.ttl}"))
            return reply
        for line in zone_lines:
            for rr in RR.fromZone(f"{name} {up.ttl} IN {qtype} {line}"):
                reply.add_answer(rr)
        return reply


class _Handler(DNSHandler):  # type: ignore[misc]
    udplen = 512

    def handle(self) -> None:
        up = self.server.resolver.upstream
        if up.silent:  # record, never answer
            if isinstance(self.request, tuple):
                request = DNSRecord.parse(self.request[0])
                up.queries.append((str(request.q.qname).lower(), QTYPE[request.q.qtype], "udp"))
            return
        super().handle()


@contextmanager
def upstream_server(up: Upstream) -> Iterator[Upstream]:
    """UDP and TCP on one free loopback port."""
    from conftest import free_port

    for _ in range(20):
        port = free_port()
        try:
            udp = DNSServer(_Resolver(up), address="127.0.0.1", port=port, handler=_Handler,
                            logger=_Quiet())
            tcp = DNSServer(_Resolver(up), address="127.0.0.1", port=port, tcp=True,
                            handler=_Handler, logger=_Quiet())
            break
        except OSError:
            continue
    up.port = port
    udp.start_thread()
    tcp.start_thread()
    try:
        yield up
    finally:
        udp.stop()
        tcp.stop()
        udp.server.server_close()
        tcp.server.server_close()


class _Quiet:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None
