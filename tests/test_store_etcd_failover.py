"""Issue #12, defect 9: an informer whose etcd member is SIGKILLed at a random moment of a
write burst must end with etcd's exact history and state (the lab once lost an endpoint).

The round is ``svcnet.lab.etcdfault.kill_during_burst``, the one ``bench/etcd_failover.py
--informer-rounds`` repeats under load; here a few bounded rounds on one real
three-member cluster, each with a random seed (printed on failure). Each round's informer
starts on the member killed in the round (the one restarted after the previous round, so
it also lists and watches on a member that is still catching up), lags behind the writers
(a slow handler, as a starved daemon), and four writers on all members burst creates,
updates and deletes of EndpointSlices while that member is killed and, in odd rounds,
restarted mid-burst.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import EtcdCluster
from svcnet.lab.etcdfault import kill_during_burst
from watchkit import Recorder

from svcnet.watch import Backoff

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(90)]

ROUNDS = 3
WRITES = 120


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


def test_informer_misses_nothing_when_its_member_dies_mid_burst(etcd3: EtcdCluster) -> None:
    seed = random.randrange(1 << 30)

    async def body() -> list[str]:
        problems = []
        for r in range(ROUNDS):
            victim = etcd3.names[r % 3]
            rec = SlowRecorder()
            result = await kill_during_burst(
                etcd3, victim, random.Random(seed + r), restart=r % 2 == 1, writes=WRITES,
                handler=rec, view=lambda rec=rec: rec.view,  # type: ignore[misc]
                backoff=Backoff(base=0.05, cap=0.5))
            why = result.problem()
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
