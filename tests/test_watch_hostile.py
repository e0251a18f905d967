"""Hostile objects and handler bugs: one bad object must never stop an informer or a daemon.

Objects are written past the store's validation (``unchecked``), as any client with access to
etcd could write them; the informer must reject each with one error, keep the last good
version, and carry on; a handler that raises for one object must only lose that object.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import dns.rcode
import pytest
from dnskit import query, serve, wait_for
from prometheus_client import REGISTRY
from svcnet.dns.daemon import DNSComponent, DNSOptions
from watchkit import Recorder, eventually, service, unchecked

from svcnet.model import ENDPOINT_SLICE, SERVICE, Kind, Service
from svcnet.store.base import NO_SELECTOR, Event, Selector
from svcnet.store.memory import MemoryStore
from svcnet.watch import Informer, InformerFactory


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def bad_port_service(name: str) -> dict[str, Any]:
    return {**service(name), "spec": {"clusterIP": "10.0.0.5",
                                      "ports": [{"name": "pört", "port": 80}]}}


def headless(name: str, hostname: str) -> tuple[dict[str, Any], dict[str, Any]]:
    svc = {"kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}}
    eps = {"kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": f"{name}-1", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": name}},
           "endpoints": [{"addresses": ["10.1.0.7"], "hostname": hostname}],
           "ports": [{"name": "http", "port": 80}]}
    return svc, eps


class Raising:
    """Raises for one object on every kind of call; records everything else it sees."""

    def __init__(self, bad: str, *, awaitable: bool = False) -> None:
        self.bad = bad
        self.awaitable = awaitable
        self.seen: dict[str, str] = {}

    def _handle(self, obj: Service, gone: bool = False) -> Any:
        key = f"{obj.metadata.namespace}/{obj.metadata.name}"
        if obj.metadata.name == self.bad:
            if self.awaitable:
                async def fail() -> None:
                    raise RuntimeError(f"handler bug on {key}")
                return fail()
            raise RuntimeError(f"handler bug on {key}")
        if gone:
            self.seen.pop(key, None)
        else:
            self.seen[key] = obj.metadata.resource_version
        return None

    def on_add(self, obj: Service) -> Any:
        return self._handle(obj)

    def on_update(self, old: Service, new: Service) -> Any:
        return self._handle(new)

    def on_delete(self, obj: Service) -> Any:
        return self._handle(obj, gone=True)


@pytest.mark.parametrize("awaitable", [False, True])
async def test_a_handler_raising_for_one_object_loses_only_that_object(
    awaitable: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    await store.put(SERVICE, service("bad"))  # already there at the first listing
    inf = Informer(store, SERVICE)
    raising, good = Raising("bad", awaitable=awaitable), Recorder()
    inf.add_handler(raising)
    inf.add_handler(good)
    handler = "Raising"
    before = metric("svcnet_watch_handler_errors_total", kind="Service", handler=handler)
    caplog.set_level(logging.ERROR, logger="svcnet.watch.informer")
    inf.start()
    try:
        await inf.wait_synced(5)
        await store.put(SERVICE, service("a"))
        for i in range(5):
            await store.put(SERVICE, service("bad", f"10.0.0.{10 + i}"))
        await store.put(SERVICE, service("c"))
        await store.delete(SERVICE, "default", "bad")
        await store.put(SERVICE, service("d"))
        truth = {"default/a": "2", "default/c": "8", "default/d": "10"}
        await eventually(lambda: good.view == truth and raising.seen == truth)
        assert not inf.failed and inf._task is not None and not inf._task.done()
        # add + 5 updates + delete, counted each time, logged once for that object/handler
        after = metric("svcnet_watch_handler_errors_total", kind="Service", handler=handler)
        assert after - before == 7
        logged = [r for r in caplog.records if "default/bad" in r.getMessage()]
        assert len(logged) == 1 and "Raising" in logged[0].getMessage()
        assert logged[0].exc_info is not None
    finally:
        await inf.stop()


async def test_a_handler_added_late_that_raises_does_not_stop_others() -> None:
    store = MemoryStore()
    for name in ("a", "bad", "c"):
        await store.put(SERVICE, service(name))
    inf = Informer(store, SERVICE)
    inf.start()
    try:
        await inf.wait_synced(5)
        raising = Raising("bad")
        inf.add_handler(raising)  # replays the cache as adds
        await store.put(SERVICE, service("e"))
        await eventually(lambda: set(raising.seen) == {"default/a", "default/c", "default/e"})
        assert not inf.failed
    finally:
        await inf.stop()


@pytest.mark.parametrize("bad", [
    {"metadata": {"name": "wéb", "namespace": "default"}, "spec": {"clusterIP": "10.0.0.9"}},
    bad_port_service("x"),
    {**service("x"), "spec": {"ports": [{"name": "a" * 64, "port": 80}]}},
    {**service("x"), "spec": {"ports": [{"port": 80, "targetPort": "sixteen-chars-xx"}]}},
    {**service("x"), "spec": {"ports": "80"}},
    {**service("x"), "spec": None},
    {"metadata": {"name": "x", "namespace": "Default"}},
])
async def test_invalid_objects_are_rejected_once_others_flow_and_last_good_is_kept(
    bad: dict[str, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryStore()
    await store.put(SERVICE, service("x", "10.0.0.1"))
    inf = Informer(store, SERVICE)
    rec = Recorder()
    inf.add_handler(rec)
    caplog.set_level(logging.ERROR, logger="svcnet.watch.informer")
    before = metric("svcnet_watch_rejected_objects_total", kind="Service")
    inf.start()
    try:
        await inf.wait_synced(5)
        await store.put(unchecked(SERVICE), bad)
        await store.put(SERVICE, service("y"))
        await eventually(lambda: "default/y" in rec.view)
        assert metric("svcnet_watch_rejected_objects_total", kind="Service") - before == 1
        kept = inf.cache.get("default/x")
        assert kept is not None and kept.cluster_ips == ("10.0.0.1",)
        rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert len(rejected) == 1 and "invalid Service" in rejected[0], rejected
        assert "\n" not in rejected[0]
    finally:
        await inf.stop()


class DyingStore(MemoryStore):
    """A store whose watch hits a bug (not a StoreError) once ``die`` is set."""

    die = False

    async def watch(self, kind: Kind[Any], *, revision: str,
                    selector: Selector = NO_SELECTOR) -> AsyncIterator[Event]:
        if self.die:
            raise RuntimeError("bug in the store client")
        async for event in super().watch(kind, revision=revision, selector=selector):
            yield event


async def test_a_dead_informer_is_reported_and_dns_is_not_ready() -> None:
    store = DyingStore()
    factory = InformerFactory(store)
    component = DNSComponent(DNSOptions(listen=("127.0.0.1", 0), workers=1))
    task = asyncio.create_task(component.run(factory, store))
    try:
        async with asyncio.timeout(15):
            await component.ready.wait()
        assert component._ready().status == 200 and not factory.failed
        waiter = asyncio.create_task(factory.wait_failed())
        store.die = True
        await store.restart()  # drops the watches; re-watching hits the bug
        async with asyncio.timeout(10):
            dead = await waiter
        assert dead.kind.name == "Service" and isinstance(dead.error, RuntimeError)
        assert component._ready().status == 503
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await factory.stop()


def test_svcnet_node_exits_when_a_shared_informer_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    from svcnet import node
    from svcnet.cli import build_parser

    store = DyingStore()
    store.die = True
    monkeypatch.setattr(node, "store_from_args", lambda args: store)
    args = build_parser().parse_args(["node", "--dns", "--dns-listen", "127.0.0.1:0",
                                      "--dns-workers", "1"])

    async def main() -> None:
        with pytest.raises(RuntimeError, match=r"informer \w+ failed"):
            await asyncio.wait_for(node.run_node(args, ["dns"]), 20)

    asyncio.run(main())


def test_dns_fed_hostile_objects_still_learns_new_services() -> None:
    """Real UDP queries: a Service named ``wéb``, a Unicode port name, an endpoint hostname
    ``hé`` and a bad ExternalName target go in first; a valid Service written after them
    must still resolve (before the fix the first of them ended DNS's Service informer)."""
    async def hostile(store: MemoryStore) -> None:
        await store.put(SERVICE, service("before", "10.0.0.20"))
        await store.put(unchecked(SERVICE), {"metadata": {"name": "wéb", "namespace": "default"},
                                             "spec": {"clusterIP": "10.0.0.21"}})
        await store.put(unchecked(SERVICE), bad_port_service("ports"))
        await store.put(unchecked(SERVICE), {**service("ext"), "spec": {
            "type": "ExternalName", "externalName": "ünicode.example.org"}})
        svc, eps = headless("hl", "hé")
        await store.put(SERVICE, svc)
        await store.put(unchecked(ENDPOINT_SLICE), eps)

    with serve(DNSOptions(listen=("127.0.0.1", 0), workers=1), hostile) as srv:
        name = "before.default.svc.cluster.local."
        assert query(srv.port, name, "A").rcode() == dns.rcode.NOERROR
        srv.call(srv.store.put(SERVICE, service("after", "10.0.0.22")))
        srv.call(srv.store.put(unchecked(SERVICE), {"metadata": {
            "name": "wéb2", "namespace": "default"}, "spec": {"clusterIP": "10.0.0.23"}}))
        srv.call(srv.store.put(SERVICE, service("later", "10.0.0.24")))

        def resolves(name: str, ip: str) -> bool:
            msg = query(srv.port, name, "A")
            return msg.rcode() == dns.rcode.NOERROR and ip in str(msg.answer)

        assert wait_for(lambda: resolves("after.default.svc.cluster.local.", "10.0.0.22"), 10)
        assert wait_for(lambda: resolves("later.default.svc.cluster.local.", "10.0.0.24"), 10)
        # the headless service's slice was rejected; its valid successor is served
        assert "10.1.0.7" not in str(query(srv.port, "hl.default.svc.cluster.local.", "A"))
        srv.call(srv.store.put(ENDPOINT_SLICE, headless("hl", "web-0")[1]))
        assert wait_for(lambda: resolves("web-0.hl.default.svc.cluster.local.", "10.1.0.7"), 10)
        assert srv.component._ready().status == 200
