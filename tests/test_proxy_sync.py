"""The sync loop's timing, failure handling, health, metrics and conntrack choices (fakes)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import selectors
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import pytest
from conftest import free_port
from prometheus_client import REGISTRY
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.commands import FakeCommands
from svcnet.proxy.config import BackendConfig
from svcnet.proxy.conntrack import FakeConntrack, StaleFlow, stale_flows
from svcnet.proxy.health import HealthCheck, NodePortHealthServers, SyncHealth
from svcnet.proxy.iptables import IptablesBackend
from svcnet.proxy.proxier import Proxier, SyncSettings
from svcnet.proxy.state import (
    Change,
    Changes,
    ChangeTracker,
    Family,
    NodeConfig,
    ServicePortState,
)

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.memory import MemoryStore
from svcnet.watch import InformerFactory


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.syncs: list[tuple[float, bool, Changes]] = []
        self.fail_next = False
        self.rules_present = True

    def sync(self, changes: Changes, *, full: bool) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("restore failed")
        self.syncs.append((time.monotonic(), full, changes))

    def sync_full(self, ports: Iterable[ServicePortState]) -> None:
        state = {p.key: p for p in ports}
        self.sync(Changes({k: Change(None, p) for k, p in state.items()}, state), full=True)

    def healthy(self) -> bool:
        return self.rules_present

    def cleanup(self) -> None:
        self.syncs.clear()

    def set_node_addresses(self, addresses: Mapping[Family, tuple[str, ...]]) -> None:
        pass

    def rules_total(self) -> Mapping[str, int]:
        return {}

    def kernel_items(self) -> frozenset[str] | None:
        return None

    def record_failure(self, *, full: bool) -> None:
        pass


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


async def started(settings: SyncSettings, **kw: Any
                  ) -> tuple[MemoryStore, FakeBackend, Proxier, asyncio.Task[None],
                             InformerFactory]:
    store = MemoryStore()
    await store.put(SERVICE, service("a", "10.96.0.1"))
    backend = FakeBackend()
    proxier = Proxier(backend, NodeConfig("n1"), settings=settings, **kw)
    factory = InformerFactory(store)
    task = asyncio.create_task(proxier.run(factory))
    await eventually(lambda: len(backend.syncs) == 1)
    return store, backend, proxier, task, factory


async def stop(task: asyncio.Task[None], factory: InformerFactory) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await factory.stop()


def test_first_sync_full_then_single_change_immediately() -> None:
    async def go() -> None:
        store, backend, _, task, factory = await started(SyncSettings(min_sync_period=2.0))
        try:
            assert backend.syncs[0][1] is True
            assert [str(k) for k in backend.syncs[0][2].state] == ["default/a/tcp/v4"]
            await asyncio.sleep(2.1)  # quiet for longer than min_sync_period
            wrote = time.monotonic()
            await store.put(ENDPOINT_SLICE, endpoint_slice("a", endpoint("10.1.0.1")))
            await eventually(lambda: len(backend.syncs) == 2)
            at, full, changes = backend.syncs[1]
            assert at - wrote < 0.3 and not full
            assert [str(k) for k in changes.changed] == ["default/a/tcp/v4"]
        finally:
            await stop(task, factory)

    run(go)


def test_bursts_coalesce_within_min_sync_period() -> None:
    """With no burst budget (burst_syncs=1) every sync waits min_sync_period."""
    async def go() -> None:
        store, backend, _, task, factory = await started(
            SyncSettings(min_sync_period=0.5, burst_syncs=1))
        try:
            first = backend.syncs[0][0]
            for i in range(5):
                await store.put(SERVICE, service(f"b{i}", f"10.96.1.{i}"))
            await eventually(lambda: len(backend.syncs) >= 2)
            await asyncio.sleep(0.6)
            assert len(backend.syncs) == 2
            at, full, changes = backend.syncs[1]
            assert at - first >= 0.45 and not full  # waited for min_sync_period
            assert len(changes.changed) == 5
        finally:
            await stop(task, factory)

    run(go)


def test_failure_makes_the_next_sync_full_and_missing_rules_too() -> None:
    async def go() -> None:
        settings = SyncSettings(min_sync_period=0.05, sync_period=0.3, retry_delay=0.05)
        store, backend, proxier, task, factory = await started(settings)
        try:
            backend.fail_next = True
            await store.put(SERVICE, service("b", "10.96.0.2"))
            await eventually(lambda: len(backend.syncs) == 2)
            assert backend.syncs[1][1] is True  # retried as a full sync
            assert proxier.stats.failures == 1
            backend.rules_present = False  # somebody flushed our rules
            await eventually(lambda: len(backend.syncs) == 3, timeout=3)
            assert backend.syncs[2][1] is True
        finally:
            await stop(task, factory)

    run(go)


def test_network_programming_latency_from_trigger_time_annotation() -> None:
    async def go() -> None:
        store, backend, _, task, factory = await started(SyncSettings(min_sync_period=0.05))
        try:
            before = REGISTRY.get_sample_value(
                "kubeproxy_network_programming_duration_seconds_count") or 0
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 2))
            await store.put(ENDPOINT_SLICE, endpoint_slice(
                "a", endpoint("10.1.0.1"),
                annotations={"endpoints.kubernetes.io/last-change-trigger-time": stamp}))
            await eventually(lambda: len(backend.syncs) == 2)
            after = REGISTRY.get_sample_value(
                "kubeproxy_network_programming_duration_seconds_count")
            assert after == before + 1
            assert REGISTRY.get_sample_value(
                "kubeproxy_sync_proxy_rules_duration_seconds_count")
            assert REGISTRY.get_sample_value(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds")
        finally:
            await stop(task, factory)

    run(go)


def test_health_semantics() -> None:
    now = [1000.0]
    health = SyncHealth(timeout=60, clock=lambda: now[0])
    assert not health.healthy()  # never synced
    health.updated()
    assert health.healthy()
    health.queued()
    now[0] += 59
    assert health.healthy()  # a change is pending, but not for too long
    now[0] += 2
    assert not health.healthy()
    health.updated()
    assert health.healthy()


def test_health_check_node_port_server() -> None:
    async def go() -> None:
        servers = NodePortHealthServers("127.0.0.1")
        port = free_port()

        def get() -> tuple[int, dict[str, Any]]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        try:
            await servers.reconcile({port: HealthCheck("default", "web", port, 2)})
            status, body = await asyncio.to_thread(get)
            assert status == 200 and body["localEndpoints"] == 2
            assert body["service"] == {"namespace": "default", "name": "web"}
            await servers.reconcile({port: HealthCheck("default", "web", port, 0)})
            status, body = await asyncio.to_thread(get)
            assert status == 503 and body["localEndpoints"] == 0
            await servers.reconcile({})
            with pytest.raises(OSError):
                await asyncio.to_thread(get)
        finally:
            await servers.stop()

    run(go)


def _changes(before: list[Any], after: list[Any], udp: bool = True) -> Changes:
    tracker = ChangeTracker(NodeConfig("n1"))
    proto = "UDP" if udp else "TCP"
    svc = to_service(service("dns", "10.96.0.10", port(53, "dns", proto)))
    for eps in (before, after):
        sl = [to_slice(endpoint_slice("dns", *eps, ports=[("dns", 53, proto)]))] if eps else []
        tracker.service_changed(None, svc)
        changes = tracker.drain(lambda k: svc, lambda k, sl=sl: sl, lambda: ["default/dns"])
    return changes


def test_stale_udp_flows() -> None:
    gone = _changes([endpoint("10.1.0.1"), endpoint("10.1.0.2")], [endpoint("10.1.0.2")])
    assert stale_flows(gone) == [StaleFlow(4, "10.96.0.10", 53, "10.1.0.1")]
    first = _changes([], [endpoint("10.1.0.2")])
    assert stale_flows(first) == [StaleFlow(4, "10.96.0.10", 53, "")]
    tcp = _changes([endpoint("10.1.0.1")], [], udp=False)
    assert stale_flows(tcp) == []


def test_proxier_deletes_stale_conntrack_after_sync() -> None:
    async def go() -> None:
        ct = FakeConntrack()
        store, _backend, _, task, factory = await started(
            SyncSettings(min_sync_period=0.05), conntrack=ct)
        try:
            await store.put(SERVICE, service("d", "10.96.0.5", port(53, "", "UDP")))
            await store.put(ENDPOINT_SLICE, endpoint_slice(
                "d", endpoint("10.1.0.1"), endpoint("10.1.0.2"), ports=[("", 53, "UDP")]))
            await eventually(lambda: StaleFlow(4, "10.96.0.5", 53) in ct.deleted)
            await store.put(ENDPOINT_SLICE, endpoint_slice(
                "d", endpoint("10.1.0.2"), ports=[("", 53, "UDP")]))
            await eventually(lambda: StaleFlow(4, "10.96.0.5", 53, "10.1.0.1") in ct.deleted)
        finally:
            await stop(task, factory)

    run(go)


def test_iptables_partial_sync_touches_only_the_changed_service() -> None:
    fake = FakeCommands()
    backend = IptablesBackend(fake, BackendConfig(), legacy=False)
    tracker = ChangeTracker(NodeConfig("n1"))
    services = {f"default/s{i}": to_service(service(f"s{i}", f"10.96.0.{i}")) for i in range(5)}
    slices = {k: [to_slice(endpoint_slice(k.split("/")[1], endpoint(f"10.1.0.{i}")))]
              for i, k in enumerate(services)}
    for s in services.values():
        tracker.service_changed(None, s)
    backend.sync(tracker.drain(services.get, lambda k: slices[k], lambda: services), full=True)
    full_input = fake.calls[-1][1] or ""
    assert full_input.count("-A KUBE-SERVICES") == 5
    slices["default/s2"] = [to_slice(endpoint_slice("s2", endpoint("10.1.0.99")))]
    tracker.slice_changed(None, slices["default/s2"][0])
    backend.sync(tracker.drain(services.get, lambda k: slices[k]), full=False)
    partial = fake.calls[-1][1] or ""
    assert "10.96.0.2/32" not in partial  # the frontend rule did not change
    assert "--to-destination 10.1.0.99:8080" in partial
    assert partial.count("-X KUBE-SEP-") == 1 and partial.count(":KUBE-SEP-") == 2
    assert ":KUBE-SERVICES" not in partial  # not flushed and rewritten
    del services["default/s4"]
    tracker.service_changed(to_service(service("s4", "10.96.0.4")), None)
    backend.sync(tracker.drain(services.get, lambda k: slices.get(k, [])), full=False)
    removal = fake.calls[-1][1] or ""
    assert "-D KUBE-SERVICES" in removal and "10.96.0.4/32" in removal
    assert removal.count("-X KUBE-") == 2  # its SVC and SEP chains


def test_periodic_full_resync_without_changes() -> None:
    async def go() -> None:
        settings = SyncSettings(min_sync_period=0.05, sync_period=0.1, full_sync_period=0.3)
        _store, backend, _, task, factory = await started(settings)
        try:
            await eventually(lambda: len(backend.syncs) >= 3, timeout=5)
            assert all(full for _, full, _ in backend.syncs[:3])
            gaps = [b[0] - a[0] for a, b in zip(backend.syncs, backend.syncs[1:], strict=False)]
            assert min(gaps[:2]) >= 0.25
        finally:
            await stop(task, factory)

    run(go)


class StreamingBackend(FakeBackend):
    """A backend that takes full syncs as a stream of ports, like the nftables one."""

    def __init__(self) -> None:
        super().__init__()
        self.streamed: list[list[str]] = []
        self.fail_after: int | None = None

    def sync_full(self, ports: Any) -> None:
        seen: list[str] = []
        for p in ports:
            if self.fail_after is not None and len(seen) == self.fail_after:
                self.fail_after = None
                raise RuntimeError("nft failed half way")
            seen.append(p.key.name)
        self.streamed.append(sorted(seen))


def test_full_sync_streams_the_model_and_a_failed_stream_loses_nothing() -> None:
    async def go() -> None:
        store = MemoryStore()
        for i in range(4):
            await store.put(SERVICE, service(f"s{i}", f"10.96.0.{i}"))
        backend = StreamingBackend()
        backend.fail_after = 2
        proxier = Proxier(backend, NodeConfig("n1"), settings=SyncSettings(min_sync_period=0))
        factory = InformerFactory(store)
        proxier.attach(factory)
        factory.start()
        try:
            await factory.wait_for_sync(5)
            assert not await proxier.sync_once()  # failed after two ports
            assert backend.streamed == [] and proxier.stats.failures == 1
            assert await proxier.sync_once()  # full again, every port still there
            assert backend.streamed == [["s0", "s1", "s2", "s3"]]
            assert backend.syncs == []  # full syncs never went through sync()
            await store.put(ENDPOINT_SLICE, endpoint_slice("s1", endpoint("10.1.0.1")))
            await eventually(lambda: proxier.tracker.pending)
            assert await proxier.sync_once()  # partial: through sync() with the change
            [(_, full, changes)] = backend.syncs
            assert not full and [k.name for k in changes.changed] == ["s1"]
            assert len(changes.state) == 4
        finally:
            await factory.stop()

    run(go)


def test_nftables_full_script_order_and_partial_diff_from_previous_state() -> None:
    from svcnet.proxy.nftables import NftablesBackend

    fake = FakeCommands()
    backend = NftablesBackend(fake, BackendConfig())
    tracker = ChangeTracker(NodeConfig("n1"))
    services = {f"default/s{i}": to_service(service(f"s{i}", f"10.96.0.{i}")) for i in range(3)}
    slices = {k: [to_slice(endpoint_slice(k.split("/")[1], endpoint(f"10.1.0.{i}"),
                                          endpoint(f"10.1.1.{i}")))]
              for i, k in enumerate(services)}
    backend.sync(tracker.drain(services.get, lambda k: slices[k], lambda: services), full=True)
    full = (fake.calls[-1][1] or "").splitlines()
    first = {word: next(i for i, ln in enumerate(full) if word in ln)
             for word in ("add chain ip svcnet lb-2", "element ip svcnet service-ips",
                          "element ip svcnet backends")}
    # verdict elements jump to lb chains, which are made once every port was seen
    assert first["add chain ip svcnet lb-2"] < first["element ip svcnet service-ips"]
    assert "10.96.0.1 . tcp . 80 : goto lb-2" in "\n".join(full)
    slices["default/s1"] = [to_slice(endpoint_slice("s1", endpoint("10.1.0.1")))]
    tracker.slice_changed(None, slices["default/s1"][0])
    backend.sync(tracker.drain(services.get, lambda k: slices[k]), full=False)
    partial = fake.calls[-1][1] or ""
    # the old rendering comes from the previous state: only s1's differences move
    assert "delete element ip svcnet service-ips { 10.96.0.1 . tcp . 80 }" in partial
    assert "add element ip svcnet service-ips { 10.96.0.1 . tcp . 80 : goto lb-1 }" in partial
    assert "delete element ip svcnet backends { 10.96.0.1 . tcp . 80 . 1 }" in partial
    assert "delete element ip svcnet hairpin { 10.1.1.1 . 10.1.1.1 }" in partial
    assert "10.96.0.0" not in partial and "10.96.0.2" not in partial


def test_nftables_full_sync_writes_what_render_gives() -> None:
    """The full sync's elements, batched per set, are exactly what render() gives."""
    from svcnet.proxy.nftables import NftablesBackend

    backend = NftablesBackend(FakeCommands(), BackendConfig())
    tracker = ChangeTracker(NodeConfig("n1"))
    services = {
        "default/a": to_service(service("a", "10.96.0.1", port(80), port(53, "d", "UDP"))),
        "default/b": to_service(service("b", "10.96.0.2", port(80, node_port=30001),
                                        type="NodePort", externalTrafficPolicy="Local")),
        "default/c": to_service(service("c", "10.96.0.3", internalTrafficPolicy="Local")),
        "default/e": to_service(service("e", "10.96.0.5")),  # no endpoints
    }
    slices = {k: [to_slice(endpoint_slice(
        k.split("/")[1], endpoint(f"10.1.{i}.2", node="n1"), endpoint(f"10.1.{i}.1"),
        ports=[("", 8080, "TCP"), ("d", 5353, "UDP")]))] for i, k in enumerate(services)}
    slices["default/e"] = []
    state = tracker.drain(services.get, lambda k: slices[k], lambda: services).state
    got: dict[str, set[str]] = {}
    for line in backend._full_script(state).splitlines():
        if line.startswith("add element"):
            name, body = line.split(" ", 5)[4:]
            got.setdefault(name, set()).update(body.strip("{} ").split(", "))
    want: dict[str, set[str]] = {}
    for sp in state.values():
        r = backend.render(sp)
        for name, elems in r.elements.items():
            want.setdefault(name, set()).update(f"{e.key} : {e.value}" if e.value else e.key
                                                for e in elems)
        want.setdefault("hairpin", set()).update(f"{ip} . {ip}" for ip in r.hairpin)
    assert got == want
    assert "10.96.0.1 . udp . 53 . 1 : 10.1.0.2 . 5353" in got["backends"]


def test_streamed_tool_run_is_bounded_by_the_timeout() -> None:
    """A tool that stops reading blocks our writes; the timeout still ends the run."""
    import itertools
    import subprocess

    from svcnet.proxy.commands import SubprocessCommands

    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        SubprocessCommands(timeout=0.5).stream(["sleep", "30"], itertools.repeat("x" * 65536))
    assert time.monotonic() - started < 5


def test_nftables_full_script_makes_long_lb_chains_before_their_verdicts() -> None:
    from svcnet.proxy.nftables import NftablesBackend

    backend = NftablesBackend(FakeCommands(), BackendConfig())
    tracker = ChangeTracker(NodeConfig("n1"))
    services = {"default/big": to_service(service("big", "10.96.0.9")),
                "default/small": to_service(service("small", "10.96.0.8"))}
    eps = {"default/big": [endpoint(f"10.1.{i // 250}.{i % 250 + 1}") for i in range(70)],
           "default/small": [endpoint("10.2.0.1")]}
    slices = {k: [to_slice(endpoint_slice(k.split("/")[1], *v))] for k, v in eps.items()}
    state = tracker.drain(services.get, lambda k: slices[k], lambda: services).state
    script = backend._full_script(state)
    assert script.index("add chain ip svcnet lb-70\n") < script.index(
        "10.96.0.9 . tcp . 80 : goto lb-70")
    assert script.count("10.1.0.1 . 10.1.0.1") == 1


# --- sync scheduling on a virtual clock -----------------------------------------------------


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs ``asyncio.to_thread`` work at once on the loop thread: no real time passes."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to the awaiting coroutine
            future.set_exception(e)
        return future


class _VirtualSelector:
    """Polls the real selector without blocking; a wait for a timer jumps the clock."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualClockLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        events = self._real.select(0)
        if events or not timeout or timeout <= 0:
            return events
        self._loop.now += timeout
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when everything waits for a timer, so the sync
    loop's timing is checked exactly, whatever the machine's load."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self._selector = _VirtualSelector(self._selector, self)  # type: ignore[has-type]
        self.set_default_executor(_InlineExecutor(max_workers=1))

    def time(self) -> float:
        return self.now


class ClockedBackend(FakeBackend):
    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock = clock

    def sync(self, changes: Changes, *, full: bool) -> None:
        self.syncs.append((self.clock(), full, changes))


def run_virtual(scenario: Callable[[VirtualClockLoop], Awaitable[None]]) -> None:
    loop = VirtualClockLoop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(loop), 3600))
    finally:
        loop.close()


async def virtual_proxier(loop: VirtualClockLoop, settings: SyncSettings
                          ) -> tuple[MemoryStore, ClockedBackend, asyncio.Task[None],
                                     InformerFactory]:
    store = MemoryStore()
    await store.put(SERVICE, service("a", "10.96.0.1"))
    backend = ClockedBackend(loop.time)
    factory = InformerFactory(store)
    task = asyncio.create_task(Proxier(backend, NodeConfig("n1"), settings=settings)
                               .run(factory))
    for _ in range(1000):
        if backend.syncs:
            break
        await asyncio.sleep(0.001)
    assert len(backend.syncs) == 1
    return store, backend, task, factory


async def synced_after(loop: VirtualClockLoop, backend: ClockedBackend, count: int) -> float:
    """Virtual time at which sync number ``count`` ran (waits up to 10 virtual seconds)."""
    for _ in range(10_000):
        if len(backend.syncs) >= count:
            return backend.syncs[count - 1][0]
        await asyncio.sleep(0.001)
    raise AssertionError(f"sync {count} did not happen")


def test_a_periodic_check_that_finds_nothing_does_not_delay_the_next_change() -> None:
    """Only real syncs start the minimum gap: a change just after the periodic rules check
    syncs at once (it used to wait ~min_sync_period after the check)."""
    async def go(loop: VirtualClockLoop) -> None:
        start = loop.time()
        store, backend, task, factory = await virtual_proxier(
            loop, SyncSettings(min_sync_period=1.0, sync_period=30.0))
        try:
            await asyncio.sleep(start + 30.05 - loop.time())  # the check ran at ~30.0
            assert len(backend.syncs) == 1
            wrote = loop.time()
            await store.put(SERVICE, service("b", "10.96.0.2"))
            assert await synced_after(loop, backend, 2) - wrote < 0.05
        finally:
            await stop(task, factory)

    run_virtual(go)


def test_burst_budget_allows_two_back_to_back_then_bounds_the_rate() -> None:
    """kube-proxy's BoundedFrequencyRunner (burstSyncs=2): right after a sync one more
    change still syncs at once; the next waits for the budget to refill."""
    async def go(loop: VirtualClockLoop) -> None:
        store, backend, task, factory = await virtual_proxier(
            loop, SyncSettings(min_sync_period=1.0, sync_period=3600.0))
        try:
            await asyncio.sleep(5.0)  # quiet: the budget is full again
            await store.put(SERVICE, service("b", "10.96.0.2"))
            first = await synced_after(loop, backend, 2)
            await asyncio.sleep(0.01)
            wrote = loop.time()
            await store.put(SERVICE, service("c", "10.96.0.3"))
            assert await synced_after(loop, backend, 3) - wrote < 0.05  # the burst budget
            await asyncio.sleep(0.01)
            await store.put(SERVICE, service("d", "10.96.0.4"))
            third = await synced_after(loop, backend, 4)
            assert 0.95 < third - first < 1.1  # 2 syncs per min_sync_period, then 1 each
        finally:
            await stop(task, factory)

    run_virtual(go)
