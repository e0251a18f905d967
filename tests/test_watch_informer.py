"""The watch client over the in-memory store: order, relist, reconnect, rejection, sharing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import REGISTRY
from watchkit import Recorder, eventually, service

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.base import NO_SELECTOR, Event, Selector, Unavailable
from svcnet.store.memory import MemoryStore
from svcnet.watch import Informer, InformerFactory, Listed, changes
from svcnet.watch.informer import Backoff


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def store_view(store: MemoryStore) -> dict[str, str]:
    listing = await store.list(SERVICE)
    return {raw.key: raw.revision for raw in listing.items}


async def test_list_then_watch_delivers_changes_in_order() -> None:
    store = MemoryStore()
    await store.put(SERVICE, service("a"))
    inf = Informer(store, SERVICE)
    rec = Recorder()
    inf.add_handler(rec)
    inf.start()
    await inf.wait_synced(5)
    assert rec.log == [("add", "default/a", "1")]
    await store.put(SERVICE, service("a", "10.0.0.2"))
    await store.put(SERVICE, service("b"))
    await store.delete(SERVICE, "default", "a")
    await eventually(lambda: len(rec.log) == 4)
    assert [(op, key) for op, key, _ in rec.log] == [
        ("add", "default/a"), ("update", "default/a"), ("add", "default/b"),
        ("delete", "default/a")]
    assert inf.cache.get("default/b") is not None and inf.cache.get("default/a") is None
    await inf.stop()


async def test_deletes_missed_during_expiry_are_delivered_after_relist() -> None:
    store = MemoryStore(history=3)
    for name in "abc":
        await store.put(SERVICE, service(name))
    inf = Informer(store, SERVICE)
    rec = Recorder()
    inf.add_handler(rec)
    before = metric("svcnet_watch_relists_total", kind="Service", reason="expired")
    inf.start()
    await inf.wait_synced(5)
    await inf.stop()  # the client goes away ...
    await store.delete(SERVICE, "default", "a")
    for i in range(5):  # ... long enough for its revision to be compacted
        await store.put(SERVICE, service("b", f"10.0.1.{i}"))
    inf.start()
    await eventually(lambda: rec.view == {"default/b": str(store.revision), "default/c": "3"})
    assert ("delete", "default/a", "1") in rec.log
    assert metric("svcnet_watch_relists_total", kind="Service", reason="expired") == before + 1
    await inf.stop()


async def test_store_restart_resumes_from_last_revision_without_relist() -> None:
    store = MemoryStore()
    inf = Informer(store, SERVICE)
    rec = Recorder()
    inf.add_handler(rec)
    inf.start()
    await inf.wait_synced(5)
    relists = metric("svcnet_watch_relists_total", kind="Service", reason="expired")
    for i in range(20):
        await store.put(SERVICE, service(f"s{i}"))
        if i % 5 == 0:
            await store.restart()
    await eventually(lambda: len(rec.view) == 20)
    assert rec.view == await store_view(store)
    assert metric("svcnet_watch_relists_total", kind="Service", reason="expired") == relists
    await inf.stop()


async def test_invalid_update_is_rejected_and_last_good_version_kept() -> None:
    store = MemoryStore()
    good = await store.put(SERVICE, service("a"))
    inf = Informer(store, SERVICE)
    rec = Recorder()
    inf.add_handler(rec)
    inf.start()
    await inf.wait_synced(5)
    rejected = metric("svcnet_watch_rejected_objects_total", kind="Service")
    # Bypass the store's own validation, as a newer API server with looser rules might.
    store._objects["Service"]["default/a"] = (good, {})
    bad = json.loads(good.data)
    bad["spec"]["clusterIP"] = "not-an-ip"
    from svcnet.store.base import Event, EventType, RawObject

    store._revision += 1
    raw = RawObject("default", "a", str(store._revision), json.dumps(bad).encode())
    await store._record(SERVICE, Event(EventType.MODIFIED, raw.revision, raw), bad)
    await store.put(SERVICE, service("b"))
    await eventually(lambda: "default/b" in rec.view)
    assert rec.view["default/a"] == good.revision
    cached = inf.cache.get("default/a")
    assert cached is not None and cached.cluster_ips == ("10.0.0.1",)
    assert metric("svcnet_watch_rejected_objects_total", kind="Service") == rejected + 1
    await inf.stop()


async def test_selector_filters_and_factory_shares_one_informer() -> None:
    store = MemoryStore()
    proxy_label = {"service.kubernetes.io/service-proxy-name": "x"}
    labelled = service("a") | {"metadata": {"name": "a", "namespace": "default",
                                             "labels": proxy_label}}
    await store.put(SERVICE, labelled)
    await store.put(SERVICE, service("b"))
    factory = InformerFactory(store)
    sel = Selector(labels="!service.kubernetes.io/service-proxy-name")
    first = factory.informer(SERVICE, selector=sel)
    assert factory.informer(SERVICE, selector=sel) is first
    slices = factory.informer(ENDPOINT_SLICE)
    factory.start()
    await factory.wait_for_sync(5)
    assert factory.synced
    assert [s.metadata.name for s in first.cache.values()] == ["b"]
    await store.put(ENDPOINT_SLICE, {
        "metadata": {"name": "b-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "b"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.1"]}]})
    await eventually(lambda: len(slices.cache.by_index("service", "default/b")) == 1)
    assert slices.cache.by_index("namespace", "default")[0].metadata.name == "b-1"
    await factory.stop()


async def test_periodic_resync_redelivers_current_state() -> None:
    store = MemoryStore()
    await store.put(SERVICE, service("a"))
    inf = Informer(store, SERVICE, resync_period=0.05)
    rec = Recorder()
    inf.add_handler(rec)
    inf.start()
    await eventually(lambda: sum(op == "update" for op, _, _ in rec.log) >= 2)
    await inf.stop()


async def test_handler_failure_does_not_stop_the_informer() -> None:
    store = MemoryStore()
    inf = Informer(store, SERVICE)
    calls: list[str] = []

    class Flaky:
        async def on_add(self, obj: object) -> None:
            calls.append("add")
            raise RuntimeError("boom")

        def on_update(self, old: object, new: object) -> None:
            calls.append("update")

        def on_delete(self, obj: object) -> None:
            calls.append("delete")

    inf.add_handler(Flaky())  # type: ignore[arg-type]
    inf.start()
    await inf.wait_synced(5)
    await store.put(SERVICE, service("a"))
    await store.put(SERVICE, service("a", "10.0.0.9"))
    await eventually(lambda: calls == ["add", "update"])
    await inf.stop()


class _RecordingBackoff(Backoff):
    """Real backoff with a tiny base, remembering the attempt number behind each delay."""

    def __init__(self) -> None:
        super().__init__(base=0.0001, cap=0.001)
        self.attempts: list[int] = []

    def next(self) -> float:
        self.attempts.append(self._attempt)
        return super().next()


class _FlakyStore(MemoryStore):
    """Watches fail while ``failing`` is set; a resumed watch then delivers again."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = 0

    async def watch(self, kind: Any, *, revision: str, selector: Selector = NO_SELECTOR
                    ) -> AsyncIterator[Event]:
        if self.failing:
            self.failing -= 1
            raise Unavailable("connection refused")
        async for event in super().watch(kind, revision=revision, selector=selector):
            yield event


async def test_backoff_restarts_after_a_watch_delivers_again() -> None:
    """An outage long ago must not make the next failure wait the capped delay: the watch
    resumes by revision (no relist), so delivering events is what proves it healthy."""
    store = _FlakyStore()
    backoff = _RecordingBackoff()
    stream = changes(store, SERVICE, backoff=backoff)
    assert isinstance(await anext(stream), Listed)
    store.failing = 6
    await store.put(SERVICE, service("a"))
    assert isinstance(await anext(stream), Event)  # after six failed attempts
    assert backoff.attempts == [0, 1, 2, 3, 4, 5]
    store.failing = 1
    await store.restart()  # the watch drops and the next attempt fails ...
    await store.put(SERVICE, service("b"))
    assert isinstance(await anext(stream), Event)
    assert backoff.attempts[6:] == [0, 1]  # ... starting again from the base delay
    await stream.aclose()
