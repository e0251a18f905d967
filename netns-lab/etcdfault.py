"""etcd members on loopback that a test or a bench can kill, and the "member killed during a
write burst" round both run against them.

One implementation for ``tests/test_store_etcd_failover.py`` (a few bounded rounds) and
``bench/etcd_failover.py`` (many rounds, under load, with figures), so the case the bench
measures is exactly the one CI checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from svcnet.model import ENDPOINT_SLICE, Kind
from svcnet.store.base import (
    NO_SELECTOR,
    Event,
    EventType,
    Listing,
    NotFound,
    RawObject,
    Selector,
    Store,
    Unavailable,
)
from svcnet.store.etcd import EtcdStore
from svcnet.watch import Backoff, Handler, Informer

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdCluster:
    """Real etcd members on loopback, each in its own data dir under ``base``."""

    def __init__(self, base: Path, members: int) -> None:
        self.base = base
        self.names = [f"m{i}" for i in range(members)]
        self.client_ports = {n: free_port() for n in self.names}
        self.peer_ports = {n: free_port() for n in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # TLS tests set these: "https" and the --client-cert-auth/--cert-file/... flags.
        self.client_scheme = "http"
        self.client_args: list[str] = []

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(n) for n in self.names]

    def endpoint(self, name: str) -> str:
        return f"127.0.0.1:{self.client_ports[name]}"

    def start(self, name: str | None = None) -> None:
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer_ports[n]}" for n in self.names)
        for n in [name] if name else self.names:
            url = f"{self.client_scheme}://127.0.0.1:{self.client_ports[n]}"
            peer = f"http://127.0.0.1:{self.peer_ports[n]}"
            log = open(self.base / f"{n}.log", "ab")  # noqa: SIM115 - lives as long as etcd
            self.procs[n] = subprocess.Popen(
                ["etcd", "--name", n, "--data-dir", str(self.base / n),
                 "--listen-client-urls", url, "--advertise-client-urls", url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", f"t{os.getpid()}",
                 "--heartbeat-interval", "50", "--election-timeout", "500",
                 *self.client_args],
                stdout=log, stderr=log, env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "amd64"},
            )
            log.close()
        self.wait_ready([name] if name else self.names)

    def wait_ready(self, names: list[str], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        for n in names:
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", self.client_ports[n]), 0.2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"etcd {n} did not start; see {self.base}/{n}.log"
                                           ) from None
                    time.sleep(0.05)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    def freeze(self, name: str) -> None:
        """SIGSTOP: no reset, the member's sockets just go quiet."""
        self.procs[name].send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        for n, proc in list(self.procs.items()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            self.kill(n)


class RecordingStore:
    """A store that keeps every raw watch event and counts the lists that succeeded."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.lists = 0
        self.events: list[Event] = []

    async def list(self, kind: Kind[Any], *, selector: Selector = NO_SELECTOR) -> Listing:
        listing = await self.inner.list(kind, selector=selector)
        self.lists += 1  # a failed list loses no place
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


def endpoint_slice(name: str, hosts: list[int]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [f"10.244.{h // 250}.{h % 250 + 2}"],
                           "conditions": {"ready": True}} for h in hosts],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


async def retry(op: Callable[[], Awaitable[T]], seconds: float = 30) -> T:
    """Repeat what the cluster could not take (an election after a kill)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await op()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def ident(e: Event) -> tuple[str, str, str]:
    return (e.type.value, e.revision, e.obj.key if e.obj else "")


async def history(store: Store, since: str, until: str) -> list[Event]:
    """etcd's own record of the EndpointSlice changes after ``since`` up to ``until``."""
    events: list[Event] = []

    async def read() -> None:
        async for e in store.watch(ENDPOINT_SLICE, revision=since):
            if e.type is not EventType.BOOKMARK:
                events.append(e)
                if int(e.revision) >= int(until):
                    return

    if int(until) > int(since):
        await asyncio.wait_for(read(), 30)
    return events


@dataclass
class Burst:
    """Writers on their own EndpointSlices (as controllers): creates, updates, deletes; the
    step callback runs before each write, so the caller can kill or restart a member."""

    writer: Store
    rng: random.Random
    hosts: dict[str, list[int]]
    writes: int
    writers: int = 4
    done: int = 0
    latest: int = 0
    fresh: Iterator[int] = field(default_factory=lambda: itertools.count(1000))

    async def seed(self) -> None:
        for name, h in self.hosts.items():
            await retry(lambda n=name, h=h: self.writer.put(  # type: ignore[misc]
                ENDPOINT_SLICE, endpoint_slice(n, h)))

    async def run(self, step: Callable[[int], Awaitable[None]]) -> None:
        names = sorted(self.hosts)
        await asyncio.gather(*(self._one(names[w::self.writers], step)
                               for w in range(self.writers)))

    async def _one(self, names: list[str], step: Callable[[int], Awaitable[None]]) -> None:
        for _ in range(self.writes // self.writers):
            at, self.done = self.done, self.done + 1
            await step(at)
            name = self.rng.choice(names)
            if self.rng.random() < 0.1:
                with contextlib.suppress(NotFound):
                    await retry(lambda n=name: self.writer.delete(  # type: ignore[misc]
                        ENDPOINT_SLICE, "default", n))
                self.hosts[name] = []
                continue
            if self.hosts[name] and self.rng.random() < 0.4:
                self.hosts[name] = self.hosts[name][1:]
            else:
                self.hosts[name] = [*self.hosts[name], next(self.fresh)]
            raw = await retry(lambda n=name: self.writer.put(  # type: ignore[misc]
                ENDPOINT_SLICE, endpoint_slice(n, self.hosts[n])))
            self.latest = max(self.latest, int(raw.revision))


@dataclass
class RoundResult:
    victim: str
    kill_at: int
    restart_at: int
    got: list[tuple[str, str, str]]
    want: list[tuple[str, str, str]]
    cache_ok: bool
    handler_ok: bool
    lists: int
    behind: int
    catch_up_s: float

    @property
    def missed(self) -> int:
        return len(set(self.want) - set(self.got))

    @property
    def extra(self) -> int:
        got = set(self.got)
        return len(self.got) - len(got) + len(got - set(self.want))

    def problem(self) -> str:
        """'' if the informer saw exactly etcd's history, else why not."""
        where = f"victim {self.victim}, kill at write {self.kill_at}, restart at {self.restart_at}"
        if self.got != self.want:
            missed = sorted(set(self.want) - set(self.got), key=lambda e: int(e[1]))
            return f"{where}: events differ from etcd's history; missed {missed[:5]}"
        if not self.cache_ok or not self.handler_ok:
            return f"{where}: cache/handlers differ from the store"
        if self.lists != 1:
            return f"{where}: the informer relisted ({self.lists} lists)"
        return ""


async def kill_during_burst(
    cluster: EtcdCluster, victim: str, rng: random.Random, *, restart: bool,
    writes: int = 120, objects: int = 6, handler: Handler[Any] | None = None,
    view: Callable[[], dict[str, str]] | None = None, backoff: Backoff | None = None,
) -> RoundResult:
    """An informer connected to ``victim`` (members in random order after it) watches
    EndpointSlices while writers on all members burst; ``victim`` is SIGKILLed at a random
    write and, with ``restart``, started again at a later one. ``view`` is the handler's
    picture of the store, compared with etcd's state at the end."""
    others = [n for n in cluster.names if n != victim]
    rng.shuffle(others)
    order = [victim, *others]
    watched = RecordingStore(EtcdStore([cluster.endpoint(n) for n in order], timeout=2))
    first = rng.randrange(len(order))
    writer = EtcdStore([cluster.endpoint(n) for n in order[first:] + order[:first]], timeout=2)
    inf = Informer(watched, ENDPOINT_SLICE, backoff=backoff or Backoff(base=0.05, cap=1.0))
    if handler is not None:
        inf.add_handler(handler)
    burst = Burst(writer, rng, {f"s{i}": [i] for i in range(objects)}, writes)
    try:
        await burst.seed()
        inf.start()
        await inf.wait_synced(30)
        listed = inf.revision or "0"
        kill_at = rng.randrange(writes)
        restart_at = rng.randrange(kill_at, writes) if restart else -1
        behind = 0

        async def step(at: int) -> None:
            nonlocal behind
            if at == kill_at:
                cluster.kill(victim)
                behind = burst.latest - int(inf.revision or 0)
            if at == restart_at:
                await asyncio.to_thread(cluster.start, victim)

        await burst.run(step)
        wrote = time.monotonic()
        truth = await retry(lambda: writer.list(ENDPOINT_SLICE))
        deadline = time.monotonic() + 30
        while int(inf.revision or 0) < int(truth.revision) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        caught_up = time.monotonic() - wrote
        state = {o.key: o.revision for o in truth.items}
        cached = {k: o.metadata.resource_version for k in inf.cache.keys_snapshot()
                  if (o := inf.cache.get(k)) is not None}
        want = [ident(e) for e in await history(writer, listed, truth.revision)]
        got = [ident(e) for e in watched.events if e.type is not EventType.BOOKMARK]
        return RoundResult(victim, kill_at, restart_at, got, want, cached == state,
                           view is None or view() == state, watched.lists, behind,
                           round(caught_up, 3))
    finally:
        await inf.stop()
        await watched.close()
        await writer.close()
        if victim not in cluster.procs:
            cluster.start(victim)
