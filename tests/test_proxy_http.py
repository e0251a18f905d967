"""What the proxy serves, where, and that serving it never stalls the sync loop.

As kube-proxy: ``--proxy-healthz-bind-address`` (all interfaces) answers only ``/healthz``
and ``/livez``; ``--proxy-metrics-bind-address`` (loopback) serves ``/metrics`` and
``/status``. ``/status`` dumps the kernel ruleset, which takes seconds on a large node: it runs
in a worker thread, one dump at a time, its answer cached briefly. The proxy runs in-process
(programming a throwaway namespace) so a test can hold a dump open and watch the loop carry on.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import free_port, ns_sh, require_binary
from svcnet.proxy import drift
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service
from svcnet.proxy.daemon import ProxyOptions, add_node_arguments
from svcnet.proxy.health import StatusPage

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.memory import MemoryStore
from svcnet.watch import InformerFactory


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class InProcessProxy:
    """``svcnet proxy`` on a memory store, its event loop in a thread of the test."""

    def __init__(self, node: str, mode: str) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        p = argparse.ArgumentParser()
        add_node_arguments(p)
        self.opts = ProxyOptions.from_args(p.parse_args([
            "--proxy-mode", mode, "--proxy-netns", node, "--proxy-node-name", "n1",
            "--proxy-ip-families", "4", "--proxy-cluster-cidr", "10.1.0.0/16",
            "--proxy-nodeport-addresses", "192.168.1.0/24", "--proxy-drift-check",
            "--proxy-min-sync-period", "0.05", "--proxy-sync-period", "600",
            "--proxy-healthz-bind-address", f"127.0.0.1:{self.health_port}",
            "--proxy-metrics-bind-address", f"127.0.0.1:{self.metrics_port}"]))
        self.node = node
        self.store = MemoryStore()
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),),
                                       daemon=True)
        self.error: BaseException | None = None

    async def _main(self) -> None:
        from svcnet.proxy.daemon import ProxyComponent

        self._stop = asyncio.Event()
        factory = InformerFactory(self.store)
        task = asyncio.create_task(ProxyComponent(self.opts).run(factory, self.store))
        factory.start()
        stopper = asyncio.create_task(self._stop.wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        if task.done() and task.exception():
            self.error = task.exception()
        task.cancel()
        stopper.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
        await factory.stop()

    def put(self, kind: Any, obj: dict[str, Any], timeout: float = 5.0) -> None:
        """Write to the store on the proxy's loop (times out if that loop is stuck)."""
        asyncio.run_coroutine_threadsafe(self.store.put(kind, obj), self.loop).result(timeout)

    def health(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        return get(f"http://127.0.0.1:{self.health_port}{path}", timeout)

    def metrics(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        return get(f"http://127.0.0.1:{self.metrics_port}{path}", timeout)

    def programmed(self, ip: str) -> bool:
        if self.opts.mode == "nftables":
            return ip in ns_sh(self.node, "nft", "list", "table", "ip", "svcnet",
                                check=False).stdout
        return ip in ns_sh(self.node, "iptables-save", "-t", "nat", check=False).stdout

    def wait_programmed(self, ip: str, timeout: float = 15.0) -> float:
        """Seconds until ``ip`` is in the kernel; fails after ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.programmed(ip):
                return time.monotonic() - started
            time.sleep(0.02)
        raise AssertionError(f"{ip} not programmed within {timeout} s")

    def add_service(self, i: int) -> float:
        """Store-to-kernel latency of one new service (10.96.1.i)."""
        ip = f"10.96.1.{i}"
        started = time.monotonic()
        # the slice first: the service then arrives complete, in one sync
        self.put(ENDPOINT_SLICE, endpoint_slice(f"s{i}", endpoint("10.1.0.11")))
        self.put(SERVICE, service(f"s{i}", ip, port(80, target=8080)))
        self.wait_programmed(ip)
        return time.monotonic() - started


@pytest.fixture(params=["nftables", "iptables"])
def proxy(request: pytest.FixtureRequest, netns: Callable[[str], str]) -> Iterator[InProcessProxy]:
    require_binary("nft", "iptables-restore")
    node = netns("node")
    ns_sh(node, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns_sh(node, "ip", "addr", "add", "192.168.1.10/24", "dev", "eth0")
    ns_sh(node, "ip", "link", "set", "eth0", "up")
    p = InProcessProxy(node, request.param)
    p.thread.start()
    try:
        p.put(SERVICE, service("web", "10.96.0.10", port(80, target=8080)))
        p.put(ENDPOINT_SLICE, endpoint_slice("web", endpoint("10.1.0.11")))
        p.wait_programmed("10.96.0.10", timeout=30)
        deadline = time.monotonic() + 15
        while p.health("/healthz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield p
    finally:
        if p._stop is not None:
            p.loop.call_soon_threadsafe(p._stop.set)
        p.thread.join(30)
        assert p.error is None, p.error


@pytest.mark.kernel
def test_health_address_serves_probes_only(proxy: InProcessProxy) -> None:
    assert proxy.health("/healthz")[0] == 200
    assert proxy.health("/livez")[0] == 200
    assert proxy.health("/status")[0] == 404
    assert proxy.health("/metrics")[0] == 404
    code, body = proxy.metrics("/metrics")
    assert code == 200 and b"kubeproxy_sync_proxy_rules_duration_seconds" in body
    code, body = proxy.metrics("/status")
    assert code == 200 and b'"in_sync": true' in body, body
    assert proxy.metrics("/healthz")[0] == 404


class Gate:
    """Wraps the drift dump so it blocks until released, standing in for a slow dump."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> None:
        self.real = drift.status
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.delay = delay
        monkeypatch.setattr(drift, "status", self)

    def __call__(self, *args: Any) -> dict[str, Any]:
        self.calls += 1
        self.entered.set()
        if self.delay:
            time.sleep(self.delay)
        else:
            self.release.wait(60)
        return self.real(*args)  # type: ignore[no-any-return]


@pytest.mark.kernel
def test_a_slow_status_dump_does_not_block_the_loop(
        proxy: InProcessProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    with ThreadPoolExecutor(4) as pool:
        try:
            pending = [pool.submit(proxy.metrics, "/status", 90) for _ in range(4)]
            assert gate.entered.wait(15), "no dump started"
            # While the dump is held: the probes answer and a new service reaches the kernel.
            # (bounds generous for a loaded machine; the held dump lasts up to 60 s)
            assert proxy.health("/healthz", timeout=10)[0] == 200
            proxy.add_service(1)  # fails if not in the kernel within 15 s
            assert proxy.metrics("/metrics", timeout=10)[0] == 200
            assert gate.calls == 1, "one dump in flight at a time"
        finally:
            gate.release.set()
        answers = [f.result(90) for f in pending]
    assert all(code == 200 and b'"in_sync": true' in body for code, body in answers), answers
    dumps = gate.calls
    assert proxy.metrics("/status")[0] == 200
    assert gate.calls == dumps, "answers within the cache time reuse the last dump"


@pytest.mark.kernel
def test_polling_status_hard_keeps_sync_latency_low(
        proxy: InProcessProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four clients poll /status back to back (each dump made 0.3 s slow) while services
    change: the changes still reach the kernel at once."""
    gate = Gate(monkeypatch, delay=0.3)
    stop = threading.Event()

    def poll() -> int:
        count = 0
        deadline = time.monotonic() + 60
        while not stop.is_set() and count < 2000 and time.monotonic() < deadline:
            assert proxy.metrics("/status", timeout=30)[0] == 200
            count += 1
        return count

    with ThreadPoolExecutor(4) as pool:
        pollers = [pool.submit(poll) for _ in range(4)]
        try:
            assert gate.entered.wait(15)
            latencies = []
            for i in range(2, 10):  # over ~3 s: the cached answer expires in between
                latencies.append(proxy.add_service(i))
                time.sleep(0.3)
        finally:
            stop.set()
        polled = sum(f.result(60) for f in pollers)
    print(f"latencies {[round(x, 3) for x in latencies]} with {polled} /status requests, "
          f"{gate.calls} dumps")
    # Requests share dumps instead of each making one; and no change waits for the pollers
    # (0.04-0.25 s typical here, ~1 s at a load of 30; the dump on the loop, as before,
    # made every request and store write time out). Latency targets proper live in bench/.
    assert polled > 20 and gate.calls * 10 < polled, (polled, gate.calls)
    assert max(latencies) < 5.0, latencies


async def _status_page_shares_one_dump() -> None:
    clock = [0.0]
    release = threading.Event()
    dumps: list[int] = []

    def dump() -> dict[str, object]:
        dumps.append(1)
        release.wait(10)
        return {"in_sync": True}

    page = StatusPage(dump, ttl=2.0, clock=lambda: clock[0])
    waiting = [asyncio.create_task(page.response()) for _ in range(5)]
    await asyncio.sleep(0.05)
    waiting[0].cancel()  # a client going away does not cancel the shared dump
    release.set()
    answers = await asyncio.gather(*waiting[1:])
    assert len(dumps) == 1 and all(a.status == 200 for a in answers)
    clock[0] = 1.9
    assert (await page.response()).status == 200 and len(dumps) == 1
    clock[0] = 2.1
    await page.response()
    assert len(dumps) == 2


def test_status_page_shares_one_dump_and_caches_it() -> None:
    asyncio.run(_status_page_shares_one_dump())
