"""The etcd store and client against real etcd members on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import EtcdCluster
from watchkit import Recorder, eventually

from svcnet.model import NODE, SERVICE, Kind
from svcnet.store.base import (
    NO_SELECTOR,
    Event,
    EventType,
    Expired,
    Invalid,
    Listing,
    NotFound,
    RawObject,
    Selector,
    Store,
    Unavailable,
)
from svcnet.store.etcd import (
    EtcdClient,
    EtcdStore,
    KvEvent,
    KvEventType,
    prefix_end,
    with_resource_version,
)
from svcnet.watch import Backoff, Informer

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(60)]

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


async def take(it: AsyncIterator[T], n: int, timeout: float = 10) -> list[T]:
    out: list[T] = []

    async def collect() -> None:
        async for item in it:
            out.append(item)
            if len(out) == n:
                return

    await asyncio.wait_for(collect(), timeout)
    return out


# ---- pure helpers ------------------------------------------------------------------------


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


@pytest.mark.parametrize("data", [
    b'{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{}}',
    b'{"apiVersion":"v1","kind":"Service","metadata":{},"spec":{}}',
    b'{"spec":{"template":{"metadata":{"name":"t"}}},"metadata":{"name":"a"}}',
    b'{"apiVersion":"v1","metadata":{"name":"a","resourceVersion":"3"}}',
    b'{"apiVersion": "v1", "metadata": {"name": "a"}}',
    b'{"kind":"{weird","metadata":{"name":"a"}}',
    b'{"kind":"x"}',
])
def test_with_resource_version_sets_top_level_field_only(data: bytes) -> None:
    out = json.loads(with_resource_version(data, 42))
    expected = json.loads(data)
    expected.setdefault("metadata", {})["resourceVersion"] = "42"
    assert out == expected


def test_with_resource_version_passes_non_objects_through() -> None:
    assert with_resource_version(b"not json", 5) == b"not json"
    assert with_resource_version(b"[1]", 5) == b"[1]"


# ---- client ------------------------------------------------------------------------------


def test_client_crud_cas_and_prefix(etcd: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(etcd.endpoints) as c:
            assert await c.get(b"/t/a") is None
            r1 = await c.put(b"/t/a", b"1")
            assert await c.get(b"/t/a") == (b"1", r1)
            assert await c.create(b"/t/a", b"x") is False
            assert await c.create(b"/t/b", b"2") is True
            assert await c.replace(b"/t/a", b"3", expect_mod_revision=r1 - 1) is False
            assert await c.replace(b"/t/a", b"3", expect_mod_revision=r1) is True
            await c.put(b"/tx", b"outside the prefix")
            items, rev = await c.get_prefix(b"/t/", page=1)
            assert [(k, v) for k, v, _ in items] == [(b"/t/a", b"3"), (b"/t/b", b"2")]
            assert rev == await c.revision()
            assert await c.delete(b"/t/a") is True
            assert await c.delete(b"/t/a") is False
            assert [k for k, _, _ in (await c.get_prefix(b"/t/"))[0]] == [b"/t/b"]

    run(body)


def test_client_paginated_prefix_is_one_snapshot(etcd: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(etcd.endpoints) as c:
            for i in range(25):
                await c.put(b"/p/%03d" % i, b"v")
            ranges = c.get_prefix(b"/p/", page=4)
            items, rev = await ranges
            assert len(items) == 25 and [k for k, _, _ in items] == sorted(k for k, _, _ in items)
            assert all(mod <= rev for _, _, mod in items)

    run(body)


def test_client_watch_delivers_every_event_in_order_with_prev(etcd: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(etcd.endpoints) as c:
            start = await c.revision() + 1
            await c.put(b"/w/a", b"1")
            await c.put(b"/w/a", b"2")
            await c.put(b"/w/b", b"3")
            await c.delete(b"/w/a")
            await c.put(b"/other", b"x")
            events = await take(c.watch_prefix(b"/w/", start_revision=start), 4)
            assert [(e.type, e.key, e.value, e.prev_value) for e in events] == [
                (KvEventType.PUT, b"/w/a", b"1", None),
                (KvEventType.PUT, b"/w/a", b"2", b"1"),
                (KvEventType.PUT, b"/w/b", b"3", None),
                (KvEventType.DELETE, b"/w/a", b"", b"2"),
            ]
            revs = [e.mod_revision for e in events]
            assert revs == sorted(revs) and revs[0] == start

    run(body)


def test_client_watch_from_compacted_revision_expires(etcd: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(etcd.endpoints) as c:
            first = await c.put(b"/c/a", b"1")
            await c.put(b"/c/a", b"2")
            await c.compact(await c.revision())
            with pytest.raises(Expired):
                await take(c.watch_prefix(b"/c/", start_revision=first), 1)

    run(body)


def test_client_leases_expire_unless_kept_alive(etcd: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(etcd.endpoints) as c:
            kept = await c.grant_lease(2)
            dropped = await c.grant_lease(2)
            await c.put(b"/l/kept", b"1", lease=kept)
            await c.put(b"/l/dropped", b"1", lease=dropped)
            for _ in range(8):  # 4 s: twice the TTL
                await asyncio.sleep(0.5)
                assert await c.keepalive(kept) > 0
            assert await c.get(b"/l/kept") is not None
            assert await c.get(b"/l/dropped") is None
            assert await c.keepalive(dropped) == 0
            await c.revoke_lease(kept)
            assert await c.get(b"/l/kept") is None
            await c.revoke_lease(kept)  # already gone: not an error

    run(body)


def test_client_unavailable_then_recovers_after_restart(etcd: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(etcd.endpoints, timeout=2) as c:
            await c.put(b"/r/a", b"1")
            etcd.kill("m0")
            with pytest.raises(Unavailable):
                await c.get(b"/r/a")
            etcd.start("m0")
            for _ in range(50):
                try:
                    assert await c.get(b"/r/a") is not None
                    break
                except Unavailable:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("client did not recover after etcd restarted")

    run(body)


def test_client_watch_resumes_on_another_member(etcd3: EtcdCluster) -> None:
    """The watched member dies between two writes; the watch goes on from the next revision."""

    async def body() -> None:
        async with EtcdClient(etcd3.endpoints) as watcher:
            start = await _retry(watcher.revision) + 1
            first = member_of(etcd3, watcher.endpoint)
            async with EtcdClient(others(etcd3, first)) as writer:
                events: list[KvEvent] = []

                async def consume() -> None:
                    async for e in watcher.watch_prefix(b"/f/", start_revision=start):
                        events.append(e)
                        if len(events) == 20:
                            return

                task = asyncio.create_task(consume())
                for i in range(10):
                    await writer.put(b"/f/%d" % i, b"v")
                await eventually(lambda: len(events) >= 10)
                etcd3.kill(first)
                # create, not put: a write retried after an unknown outcome (leader election)
                # must not add a second event.
                for i in range(10, 20):
                    await _retry(lambda i=i: writer.create(b"/f/%d" % i, b"v"))  # type: ignore[misc]
                await asyncio.wait_for(task, 15)
                history = await take(writer.watch_prefix(b"/f/", start_revision=start), 20)
                assert events == history
                assert sorted(e.key for e in events) == sorted(b"/f/%d" % i for i in range(20))
                assert watcher.endpoint != etcd3.endpoint(first)

    run(body)


def member_of(cluster: EtcdCluster, endpoint: str) -> str:
    """The member a client is talking to (a young cluster may have sent it elsewhere)."""
    return next(n for n in cluster.names if cluster.endpoint(n) == endpoint)


def others(cluster: EtcdCluster, name: str) -> list[str]:
    return [cluster.endpoint(n) for n in cluster.names if n != name]


async def _retry(op: Callable[[], Awaitable[Any]], attempts: int = 50) -> Any:
    """Repeat a write the cluster could not take (leader election after a kill)."""
    for _ in range(attempts - 1):
        try:
            return await op()
        except Unavailable:
            await asyncio.sleep(0.1)
    return await op()


# ---- store -------------------------------------------------------------------------------


def svc(name: str, ip: str = "10.0.0.1", ns: str | None = "default",
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if ns is not None:
        meta["namespace"] = ns
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}


def node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}}


def rv(data: bytes) -> str:
    return str(json.loads(data)["metadata"]["resourceVersion"])


def cached_versions(inf: Informer[Any]) -> dict[str, str]:
    return {key: obj.metadata.resource_version for key in inf.cache.keys_snapshot()
            if (obj := inf.cache.get(key)) is not None}


class Recording:
    """A Store that passes everything through and remembers every list and watch event."""

    def __init__(self, inner: EtcdStore) -> None:
        self.inner = inner
        self.lists = 0
        self.events: list[Event] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self._drop = asyncio.Event()

    async def list(self, kind: Kind[Any], *, selector: Selector = NO_SELECTOR) -> Listing:
        await self.gate.wait()
        self.lists += 1
        return await self.inner.list(kind, selector=selector)

    async def watch(self, kind: Kind[Any], *, revision: str,
                    selector: Selector = NO_SELECTOR) -> AsyncIterator[Event]:
        await self.gate.wait()
        self._drop.clear()
        async for event in self.inner.watch(kind, revision=revision, selector=selector):
            if self._drop.is_set():
                raise Unavailable("dropped by the test")
            self.events.append(event)
            yield event

    def drop_watch(self) -> None:
        """Fail the open watch at its next event and hold new lists/watches until ``gate``."""
        self.gate.clear()
        self._drop.set()

    async def put(self, kind: Kind[Any], obj: Any) -> RawObject:
        return await self.inner.put(kind, obj)

    async def delete(self, kind: Kind[Any], namespace: str, name: str) -> None:
        await self.inner.delete(kind, namespace, name)

    async def close(self) -> None:
        await self.inner.close()


def test_store_crud_layout_and_list_revision(etcd: EtcdCluster) -> None:
    async def body() -> None:
        store = EtcdStore(etcd.endpoints, prefix="/reg")
        try:
            assert isinstance(store, Store)
            a = await store.put(SERVICE, svc("a", ns=None))  # namespace defaults to "default"
            assert (a.namespace, a.name) == ("default", "a")
            assert rv(a.data) == a.revision
            b = await store.put(SERVICE, {**svc("b", ns="kube-system"),
                                          "metadata": {"name": "b", "namespace": "kube-system",
                                                       "resourceVersion": "999"}})
            n = await store.put(NODE, node("n1"))
            raw, mod = await store.client.get(b"/reg/services/default/a") or (b"", 0)
            assert b"resourceVersion" not in raw and str(mod) == a.revision
            assert await store.client.get(b"/reg/nodes/n1") is not None
            assert b"namespace" not in (await store.client.get(b"/reg/nodes/n1") or (b"",))[0]

            listing = await store.list(SERVICE)
            assert [(o.key, o.revision) for o in listing.items] == [
                ("default/a", a.revision), ("kube-system/b", b.revision)]
            assert int(listing.revision) == int(n.revision)
            for o in listing.items:
                assert rv(o.data) == o.revision  # the stale "999" never comes back
                assert SERVICE.decode(o.data).metadata.resource_version == o.revision
            assert [o.key for o in (await store.list(NODE)).items] == ["n1"]

            a2 = await store.put(SERVICE, svc("a", ip="10.0.0.2"))
            assert int(a2.revision) > int(a.revision)
            await store.delete(SERVICE, "default", "a")
            with pytest.raises(NotFound):
                await store.delete(SERVICE, "default", "a")
            with pytest.raises(Invalid):
                await store.put(SERVICE, {"metadata": {"name": "bad"},
                                          "spec": {"ports": [{"port": 70000}]}})
            with pytest.raises(Invalid):
                await store.put(SERVICE, {"metadata": {}})
            assert await store.create(SERVICE, svc("b", ns="kube-system")) is None
            assert await store.create(SERVICE, svc("c")) is not None
        finally:
            await store.close()

    run(body)


def test_store_list_paginates_at_one_revision(etcd: EtcdCluster) -> None:
    async def body() -> None:
        store = EtcdStore(etcd.endpoints, page_size=7)
        try:
            for i in range(30):
                await store.put(SERVICE, svc(f"s{i:02d}"))
            listing = await store.list(SERVICE)
            assert [o.name for o in listing.items] == [f"s{i:02d}" for i in range(30)]
        finally:
            await store.close()

    run(body)


def test_store_watch_delivers_every_event_in_order(etcd: EtcdCluster) -> None:
    async def body() -> None:
        store = EtcdStore(etcd.endpoints)
        try:
            start = (await store.list(SERVICE)).revision
            a1 = await store.put(SERVICE, svc("a"))
            a2 = await store.put(SERVICE, svc("a", ip="10.0.0.2"))
            await store.put(NODE, node("n1"))  # another kind: not in this watch
            await store.delete(SERVICE, "default", "a")
            gone = await store.client.revision()
            events = await take(store.watch(SERVICE, revision=start), 3)
            assert [(e.type, e.revision) for e in events] == [
                (EventType.ADDED, a1.revision), (EventType.MODIFIED, a2.revision),
                (EventType.DELETED, str(gone))]
            deleted = events[2].obj
            assert deleted is not None and deleted.key == "default/a"
            # DELETED carries the last state, versioned at the deletion (as Kubernetes does).
            last = SERVICE.decode(deleted.data)
            assert last.spec.cluster_ip == "10.0.0.2"
            assert last.metadata.resource_version == str(gone)
            # Watching from the middle starts right after that revision.
            later = await take(store.watch(SERVICE, revision=a1.revision), 1)
            assert later[0].revision == a2.revision
        finally:
            await store.close()

    run(body)


def test_store_selectors_in_list_and_watch(etcd: EtcdCluster) -> None:
    async def body() -> None:
        store = EtcdStore(etcd.endpoints)
        sel = Selector(labels="app=web", fields="metadata.namespace=default")
        try:
            await store.put(SERVICE, svc("a", labels={"app": "web"}))
            await store.put(SERVICE, svc("b", labels={"app": "db"}))
            await store.put(SERVICE, svc("c", ns="other", labels={"app": "web"}))
            listing = await store.list(SERVICE, selector=sel)
            assert [o.key for o in listing.items] == ["default/a"]
            await store.put(SERVICE, svc("b", labels={"app": "web"}))  # starts matching
            await store.put(SERVICE, svc("a", labels={"app": "db"}))   # stops matching
            await store.put(SERVICE, svc("c", ns="other"))             # never matches
            await store.delete(SERVICE, "default", "b")
            events = await take(store.watch(SERVICE, revision=listing.revision, selector=sel), 3)
            assert [(e.type, e.obj.key if e.obj else "") for e in events] == [
                (EventType.ADDED, "default/b"), (EventType.DELETED, "default/a"),
                (EventType.DELETED, "default/b")]
            with pytest.raises(Invalid):
                await store.list(SERVICE, selector=Selector(fields="spec.bogus=1"))
        finally:
            await store.close()

    run(body)


@pytest.fixture
def etcd_fast_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                       ) -> Iterator[EtcdCluster]:
    """One member sending watch progress notifications every 200 ms instead of 10 min."""
    monkeypatch.setenv("ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", "200ms")
    cluster = EtcdCluster(tmp_path, 1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_store_watch_sends_bookmarks_from_progress_notifications(
        etcd_fast_progress: EtcdCluster) -> None:
    async def body() -> None:
        store = EtcdStore(etcd_fast_progress.endpoints)
        try:
            start = (await store.list(SERVICE)).revision
            await store.put(NODE, node("n1"))  # moves the revision, outside the watch
            head = await store.client.revision()
            events = await take(store.watch(SERVICE, revision=start), 1, timeout=5)
            assert events[0].type is EventType.BOOKMARK and events[0].obj is None
            assert int(events[0].revision) >= head
        finally:
            await store.close()

    run(body)


def test_store_compaction_expires_watch_and_informer_relists(etcd: EtcdCluster) -> None:
    """While the informer is away, objects change and history is compacted: it must relist
    and deliver the deletes it missed."""

    async def body() -> None:
        store = Recording(EtcdStore(etcd.endpoints))
        for name in "abc":
            await store.put(SERVICE, svc(name))
        inf = Informer(store, SERVICE, backoff=Backoff(base=0.01, cap=0.05))
        rec = Recorder()
        inf.add_handler(rec)
        inf.start()
        try:
            await inf.wait_synced(10)
            seen = inf.revision
            store.drop_watch()
            await store.put(SERVICE, svc("d"))  # wakes the watch, which then fails
            await store.delete(SERVICE, "default", "a")
            await store.put(SERVICE, svc("b", ip="10.0.0.9"))
            await store.inner.compact()
            with pytest.raises(Expired):
                await take(store.inner.watch(SERVICE, revision=seen), 1)
            store.gate.set()
            await eventually(lambda: store.lists == 2)
            truth = await store.inner.list(SERVICE)
            want = {o.key: o.revision for o in truth.items}
            await eventually(lambda: rec.view == want)
            assert cached_versions(inf) == want
            assert any(entry[:2] == ("delete", "default/a") for entry in rec.log)
        finally:
            await inf.stop()
            await store.close()

    run(body)


def test_store_informer_survives_etcd_restart(etcd: EtcdCluster) -> None:
    async def body() -> None:
        store = EtcdStore(etcd.endpoints, timeout=2)
        inf = Informer(store, SERVICE, backoff=Backoff(base=0.05, cap=0.2))
        inf.start()
        try:
            await store.put(SERVICE, svc("a"))
            await inf.wait_synced(10)
            await eventually(lambda: len(inf.cache) == 1)
            etcd.kill("m0")
            with pytest.raises(Unavailable):
                await store.list(SERVICE)
            await asyncio.sleep(0.5)  # the informer's watch fails and backs off meanwhile
            etcd.start("m0")
            await _retry(lambda: store.put(SERVICE, svc("b")))
            await _retry(lambda: store.delete(SERVICE, "default", "a"))
            await eventually(lambda: inf.cache.keys_snapshot() == ["default/b"])
        finally:
            await inf.stop()
            await store.close()

    run(body)


def test_store_failover_loses_no_event(etcd3: EtcdCluster) -> None:
    """Acceptance: killing the member the informer is connected to loses no event.

    A writer on the other two members runs a bounded stream of creates, updates and deletes;
    halfway through, the informer's member is killed. The events the informer received must
    be exactly etcd's history (nothing lost, nothing twice) without a relist, and its cache
    must equal the store.
    """

    async def body() -> None:
        watched = Recording(EtcdStore(etcd3.endpoints))
        inf = Informer(watched, SERVICE, backoff=Backoff(base=0.01, cap=0.1))
        rec = Recorder()
        inf.add_handler(rec)
        inf.start()
        await inf.wait_synced(10)
        listed = inf.revision
        first = member_of(etcd3, watched.inner.client.endpoint)
        writer = EtcdStore(others(etcd3, first))
        rng = random.Random(7)
        try:
            for step in range(120):
                if step == 60:
                    etcd3.kill(first)
                name = rng.choice("abcdefgh")
                if rng.random() < 0.3:
                    with contextlib.suppress(NotFound):
                        await _retry(lambda n=name: writer.delete(  # type: ignore[misc]
                            SERVICE, "default", n))
                else:
                    ip = f"10.0.0.{rng.randint(1, 250)}"
                    await _retry(lambda n=name, ip=ip: writer.put(  # type: ignore[misc]
                        SERVICE, svc(n, ip)))
            truth = await writer.list(SERVICE)
            want = {o.key: o.revision for o in truth.items}
            await eventually(lambda: inf.revision == truth.revision, timeout=15)
            assert watched.inner.client.endpoint != etcd3.endpoint(first)

            count = int(truth.revision) - int(listed)
            history = await take(writer.watch(SERVICE, revision=listed), count)
            got = [(e.type, e.revision, e.obj.key if e.obj else "")
                   for e in watched.events if e.type is not EventType.BOOKMARK]
            assert got == [(e.type, e.revision, e.obj.key if e.obj else "") for e in history]
            assert watched.lists == 1, "the informer had to relist: it lost its place"
            deletes = {(e.obj.key, e.revision) for e in history
                       if e.type is EventType.DELETED and e.obj}
            assert deletes and sum(1 for e in rec.log if e[0] == "delete") == len(deletes)
            assert rec.view == want
            assert cached_versions(inf) == want
        finally:
            await inf.stop()
            await watched.close()
            await writer.close()

    run(body)


def test_client_watch_survives_dropped_connections(etcd: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(etcd.endpoints) as c:
            start = await c.revision() + 1
            events: list[KvEvent] = []

            async def consume() -> None:
                async for e in c.watch_prefix(b"/d/", start_revision=start):
                    events.append(e)
                    if len(events) == 30:
                        return

            task = asyncio.create_task(consume())
            for i in range(30):
                await _retry(lambda i=i: c.create(b"/d/%02d" % i, b"v"))  # type: ignore[misc]
                if i % 7 == 3:
                    await eventually(lambda i=i: len(events) > i)  # type: ignore[misc]
                    await c.reconnect()
            await asyncio.wait_for(task, 10)
            assert [e.key for e in events] == [b"/d/%02d" % i for i in range(30)]

    run(body)


def test_store_watch_leaves_a_frozen_member(etcd3: EtcdCluster) -> None:
    """A member that stops answering (SIGSTOP: no reset, no FIN) is left within seconds."""

    async def body() -> None:
        watched = EtcdStore(etcd3.endpoints, timeout=1, probe_interval=0.3)
        listed = await _retry(lambda: watched.list(SERVICE))
        first = member_of(etcd3, watched.client.endpoint)
        writer = EtcdStore(others(etcd3, first), timeout=1)
        try:
            events: list[Event] = []

            async def consume() -> None:
                async for e in watched.watch(SERVICE, revision=listed.revision):
                    events.append(e)

            task = asyncio.create_task(consume())
            await writer.put(SERVICE, svc("before"))
            await eventually(lambda: len(events) == 1)
            etcd3.procs[first].send_signal(signal.SIGSTOP)
            try:
                await _retry(lambda: writer.put(SERVICE, svc("after")), attempts=100)
                await eventually(lambda: any(e.obj and e.obj.name == "after" for e in events),
                                 timeout=10)
            finally:
                etcd3.procs[first].send_signal(signal.SIGCONT)
            assert watched.client.endpoint != etcd3.endpoint(first)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await watched.close()
            await writer.close()

    run(body)
