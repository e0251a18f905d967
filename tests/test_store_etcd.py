"""The etcd store and client against real etcd members on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import EtcdCluster

from svcnet.store.base import Expired, Unavailable
from svcnet.store.etcd import EtcdClient, KvEvent, KvEventType, prefix_end, with_resource_version

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


def test_client_watch_resumes_on_another_member(etcd3: EtcdCluster, tmp_path: Path) -> None:
    """The watched member dies between two writes; the watch goes on from the next revision."""

    async def body() -> None:
        first = etcd3.names[0]
        async with EtcdClient(etcd3.endpoints) as watcher, \
                EtcdClient([etcd3.endpoint(n) for n in etcd3.names[1:]]) as writer:
            assert watcher.endpoint == etcd3.endpoint(first)
            start = await writer.revision() + 1
            events: list[KvEvent] = []

            async def consume() -> None:
                async for e in watcher.watch_prefix(b"/f/", start_revision=start):
                    events.append(e)
                    if len(events) == 20:
                        return

            task = asyncio.create_task(consume())
            for i in range(10):
                await writer.put(b"/f/%d" % i, b"v")
            await _eventually(lambda: len(events) >= 10)
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


async def _eventually(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def _retry(op: Callable[[], Awaitable[Any]], attempts: int = 50) -> Any:
    """Repeat a write the cluster could not take (leader election after a kill)."""
    for _ in range(attempts - 1):
        try:
            return await op()
        except Unavailable:
            await asyncio.sleep(0.1)
    return await op()
