"""Issue #12, defect 9: an informer whose etcd member is SIGKILLed at a random moment of a
write burst must end with etcd's exact history and state (the lab once lost an endpoint).

Bounded version of ``bench/etcd_failover.py --informer-rounds``: a few rounds on one real
three-member cluster, each with a random seed (printed on failure). Each round's informer
starts on the member killed in the round (the one restarted after the previous round, so
it also lists and watches on a member that is still catching up), lags behind the writers
(a slow handler, as a starved daemon), and four writers on all members burst creates,
updates and deletes of EndpointSlices while that member is killed and, in odd rounds,
restarted mid-burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import pytest
from conftest import EtcdCluster
from watchkit import Recorder

from svcnet.model import ENDPOINT_SLICE, Kind
from svcnet.store.base import (
    NO_SELECTOR,
    Event,
    EventType,
    Listing,
    NotFound,
    RawObject,
    Selector,
    Unavailable,
)
from svcnet.store.etcd import EtcdStore
from svcnet.watch import Backoff, Informer

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(90)]

T = TypeVar("T")
ROUNDS = 3
WRITES = 120


class Recording:
    """The etcd store, keeping every raw watch event and counting lists."""

    def __init__(self, inner: EtcdStore) -> None:
        self.inner = inner
        self.lists = 0
        self.events: list[Event] = []

    async def list(self, kind: Kind[Any], *, selector: Selector = NO_SELECTOR) -> Listing:
        listing = await self.inner.list(kind, selector=selector)
        self.lists += 1  # lists that succeeded: a failed one loses no place
        return listing

    async def watch(self, kind: Kind[Any], *, revision: str,
                    selector: Selector = NO_SELECTOR) -> AsyncIterator[Event]:
        async for event in self.inner.watch(kind, revision=revision, selector=selector):
            self.events.append(event)
            yield event

    async def put(self, kind: Kind[Any], obj: Mapping[str, Any]) -> RawObject:
        return await self.inner.put(kind, obj)

    async def delete(self, kind: Kind[Any], namespace: str, name: str) -> None:
        await self.inner.delete(kind, namespace, name)

    async def close(self) -> None:
        await self.inner.close()


class SlowRecorder(Recorder):
    """Checks every handler call against its own view, and takes a while over each."""

    async def on_add(self, obj: Any) -> None:  # type: ignore[override]
        super().on_add(obj)
        await asyncio.sleep(0.003)

    async def on_update(self, old: Any, new: Any) -> None:  # type: ignore[override]
        super().on_update(old, new)
        await asyncio.sleep(0.003)

    async def on_delete(self, obj: Any) -> None:  # type: ignore[override]
        super().on_delete(obj)
        await asyncio.sleep(0.003)


def endpoint_slice(name: str, hosts: list[int]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [f"10.244.{h // 250}.{h % 250 + 2}"],
                           "conditions": {"ready": True}} for h in hosts],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


async def retry(op: Callable[[], Awaitable[T]], seconds: float = 30) -> T:
    """Repeat what the cluster could not take (election after a kill)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            return await op()
        except Unavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


def ident(e: Event) -> tuple[str, str, str]:
    return (e.type.value, e.revision, e.obj.key if e.obj else "")


async def one_round(cluster: EtcdCluster, victim: str, rng: random.Random,
                    restart_mid_burst: bool) -> str:
    """Kill ``victim`` (the informer's member) during a burst; '' if all is well, else why."""
    others = [n for n in cluster.names if n != victim]
    rng.shuffle(others)
    watched = Recording(EtcdStore([cluster.endpoint(n) for n in [victim, *others]], timeout=2))
    writer_order = [victim, *others]
    first = rng.randrange(3)
    writer = EtcdStore([cluster.endpoint(n) for n in writer_order[first:] + writer_order[:first]],
                       timeout=2)
    rec = SlowRecorder()
    inf = Informer(watched, ENDPOINT_SLICE, backoff=Backoff(base=0.05, cap=0.5))
    inf.add_handler(rec)
    hosts: dict[str, list[int]] = {f"s{i}": [i] for i in range(6)}
    try:
        inf.start()
        await inf.wait_synced(30)
        listed = inf.revision
        kill_at = rng.randrange(WRITES)
        restart_at = rng.randrange(kill_at, WRITES) if restart_mid_burst else -1
        fresh = iter(range(100, 10**9))
        done = 0

        async def burst(names: list[str]) -> None:
            nonlocal done
            for _ in range(WRITES // 4):
                if done == kill_at:
                    cluster.kill(victim)
                if done == restart_at:
                    cluster.start(victim)
                done += 1
                name = rng.choice(names)
                if rng.random() < 0.1:
                    with contextlib.suppress(NotFound):
                        await retry(lambda n=name: writer.delete(  # type: ignore[misc]
                            ENDPOINT_SLICE, "default", n))
                    hosts[name] = []
                    continue
                if hosts[name] and rng.random() < 0.4:
                    hosts[name] = hosts[name][1:]
                else:
                    hosts[name] = [*hosts[name], next(fresh)]
                await retry(lambda n=name: writer.put(  # type: ignore[misc]
                    ENDPOINT_SLICE, endpoint_slice(n, hosts[n])))

        names = sorted(hosts)
        await asyncio.gather(*(burst(names[w::4]) for w in range(4)))
        truth = await retry(lambda: writer.list(ENDPOINT_SLICE))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while int(inf.revision or 0) < int(truth.revision) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        history: list[Event] = []

        async def read_history() -> None:
            async for e in writer.watch(ENDPOINT_SLICE, revision=listed):
                if e.type is not EventType.BOOKMARK:
                    history.append(e)
                    if int(e.revision) >= int(truth.revision):
                        return

        if int(truth.revision) > int(listed):
            await asyncio.wait_for(read_history(), 30)
        got = [ident(e) for e in watched.events if e.type is not EventType.BOOKMARK]
        want = [ident(e) for e in history]
        state = {o.key: o.revision for o in truth.items}
        cached = {k: o.metadata.resource_version for k in inf.cache.keys_snapshot()
                  if (o := inf.cache.get(k)) is not None}
        where = f"victim {victim}, kill at write {kill_at}, restart at {restart_at}"
        if got != want:
            missed = sorted(set(want) - set(got), key=lambda e: int(e[1]))
            return f"{where}: events differ from etcd's history; missed {missed[:5]}"
        if cached != state or rec.view != state:
            return f"{where}: cache/handlers differ from the store"
        if watched.lists != 1:
            return f"{where}: the informer relisted ({watched.lists} lists)"
        return ""
    finally:
        await inf.stop()
        await watched.close()
        await writer.close()
        if victim not in cluster.procs:
            cluster.start(victim)


def test_informer_misses_nothing_when_its_member_dies_mid_burst(etcd3: EtcdCluster) -> None:
    seed = random.randrange(1 << 30)

    async def body() -> list[str]:
        problems = []
        for r in range(ROUNDS):
            victim = etcd3.names[r % 3]
            why = await one_round(etcd3, victim, random.Random(seed + r), r % 2 == 1)
            if why:
                problems.append(f"round {r}: {why}")
        return problems

    problems = asyncio.run(body())
    assert problems == [], f"seed {seed}: " + "; ".join(problems)


# ---- a member that travels back in time --------------------------------------------------


class BackInTimeWatch:
    """A Watch service answering as etcd 3.4.23 does on a member that has just restored a
    snapshot while holding a watch on a future revision (etcd pull 15520, issue 20221): the
    events after ``created`` begin below the requested start revision."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def Watch(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        from svcnet.store.etcdpb import etcd_pb2 as pb

        create = (await anext(aiter(requests))).create_request
        self.requests.append(create)
        start = create.start_revision
        yield pb.WatchResponse(header=pb.ResponseHeader(revision=start - 1), created=True)

        def put(rev: int) -> Any:
            return pb.Event(type=pb.Event.PUT, kv=pb.KeyValue(
                key=b"/k/%d" % rev, value=b"v", create_revision=rev, mod_revision=rev))

        yield pb.WatchResponse(header=pb.ResponseHeader(revision=start + 1),
                               events=[put(start - 2), put(start - 1), put(start)])
        yield pb.WatchResponse(header=pb.ResponseHeader(revision=start + 1),
                               events=[put(start + 1)])
        await asyncio.sleep(3600)


def test_watch_drops_events_older_than_its_start_revision() -> None:
    """Events already delivered are not delivered again, even if a member sends them."""
    import grpc.aio

    from svcnet.store.etcd_client import EtcdClient
    from svcnet.store.etcdpb import etcd_pb2_grpc

    async def body() -> list[int]:
        server = grpc.aio.server()
        etcd_pb2_grpc.add_WatchServicer_to_server(BackInTimeWatch(), server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with EtcdClient([f"127.0.0.1:{port}"], timeout=5) as client:
                got: list[int] = []
                async for event in client.watch_prefix(b"/k/", start_revision=10):
                    got.append(event.mod_revision)
                    if len(got) == 2:
                        break
                return got
        finally:
            await server.stop(None)

    assert asyncio.run(body()) == [10, 11]
