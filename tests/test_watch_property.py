"""Property: whatever happens to the connection, the informer's cache ends equal to the store.

Random creates/updates/deletes are interleaved with dropped watches, compactions (expired
revisions) and store restarts. Afterwards the cache must equal the store and the handler's
replayed view must equal it too, which means every delete was delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from conftest import EtcdCluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from watchkit import Recorder, eventually, service

from svcnet.model import SERVICE
from svcnet.store.base import NotFound, Store
from svcnet.store.etcd import EtcdStore
from svcnet.store.memory import MemoryStore
from svcnet.watch import Backoff, Informer

NAMES = ["a", "b", "c", "d"]
_examples = itertools.count()

operation = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(NAMES), st.integers(1, 250)),
    st.tuples(st.just("delete"), st.sampled_from(NAMES)),
    st.tuples(st.just("drop")),
    st.tuples(st.just("expire")),
    st.tuples(st.just("restart")),
    st.tuples(st.just("settle")),
)


@dataclass
class Harness:
    """How to disturb one kind of store; each action is a real failure of that store."""

    store: Store
    drop: Callable[[], Awaitable[None]]
    expire: Callable[[], Awaitable[None]]
    restart: Callable[[], Awaitable[None]]


async def run_scenario(harness: Harness, ops: list[tuple[object, ...]]) -> None:
    store = harness.store
    inf = Informer(store, SERVICE, backoff=Backoff(base=0.01, cap=0.1))
    rec = Recorder()
    inf.add_handler(rec)
    inf.start()
    try:
        await inf.wait_synced(10)
        for op in ops:
            if op[0] == "put":
                await store.put(SERVICE, service(str(op[1]), f"10.0.0.{op[2]}"))
            elif op[0] == "delete":
                with contextlib.suppress(NotFound):
                    await store.delete(SERVICE, "default", str(op[1]))
            elif op[0] == "drop":
                await harness.drop()
            elif op[0] == "expire":
                await harness.expire()
            elif op[0] == "restart":
                await harness.restart()
            else:
                await asyncio.sleep(0.01)
        listing = await store.list(SERVICE)
        truth = {raw.key: raw.revision for raw in listing.items}
        cached = lambda: {k: o.metadata.resource_version for k, o in  # noqa: E731
                          ((k, inf.cache.get(k)) for k in inf.cache.keys_snapshot()) if o}
        await eventually(lambda: cached() == truth and rec.view == truth, timeout=30)
    finally:
        await inf.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operation, max_size=30))
def test_memory_store_cache_converges(ops: list[tuple[object, ...]]) -> None:
    async def main() -> None:
        store = MemoryStore(history=8)
        await run_scenario(Harness(store, store.restart, store.compact, store.restart), ops)

    asyncio.run(main())


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, max_size=15))
def test_real_etcd_cache_converges(etcd: EtcdCluster, ops: list[tuple[object, ...]]) -> None:
    """Same property on a real etcd; drops and restarts are kill -9 and restart of etcd."""
    prefix = f"/prop{next(_examples)}"

    async def restart_etcd() -> None:
        await asyncio.to_thread(etcd.kill, "m0")
        await asyncio.to_thread(etcd.start, "m0")

    async def main() -> None:
        store = EtcdStore(etcd.endpoints, prefix=prefix, timeout=2.0)
        try:
            await run_scenario(Harness(store, restart_etcd, store.compact, restart_etcd), ops)
        finally:
            await store.close()

    asyncio.run(main())
