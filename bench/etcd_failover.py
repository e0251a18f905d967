"""How long a watch is blind when the etcd member it uses dies or freezes.

Starts a three-member etcd cluster on loopback. A watcher uses all three members (it starts
on one of them); a writer on the two others creates a key every 20 ms. Then the watcher's
member is killed (SIGKILL), or frozen (SIGSTOP: no reset, the socket just goes quiet), and
we measure the watcher's blindness: the longest delay between a write being confirmed to
the writer (after the fault) and the watcher receiving it; and check that no write was lost.

Prints a table and, as the last line, JSON with ``kill_blind_s``, ``freeze_blind_s`` (median of
--rounds) and ``lost`` (events missing, must be 0).

``--informer-rounds N`` runs the lab's "etcd member killed during a scale-up" case instead, N
times (``--stress``: under ``stress-ng`` on every core, or busy loops without it): an informer
on the etcd store, connected to a random member, watches EndpointSlices while a writer on all
three members makes a burst of updates, deletes and creates; the informer's member is SIGKILLed
at a random write of the burst and, in half of the rounds, restarted at a later random write.
Each round checks that the informer's raw events equal etcd's history (none missed, none
twice) and its cache equals the store. Last line: JSON with ``rounds``, ``missed_rounds``,
``events_missed`` (all must be 0 but ``rounds``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import suppress
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
    Unavailable,
)
from svcnet.store.etcd import EtcdClient, EtcdStore
from svcnet.watch import Backoff, Informer

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, members: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="svcnet-bench-etcd3-")
        self.names = [f"m{i}" for i in range(members)]
        self.client = {n: _free_port() for n in self.names}
        self.peer = {n: _free_port() for n in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def endpoint(self, name: str) -> str:
        return f"127.0.0.1:{self.client[name]}"

    def start(self, only: str | None = None) -> None:
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.names)
        for n in [only] if only else self.names:
            self.procs[n] = subprocess.Popen(
                ["etcd", "--name", n, "--data-dir", f"{self.dir}/{n}",
                 "--listen-client-urls", f"http://127.0.0.1:{self.client[n]}",
                 "--advertise-client-urls", f"http://127.0.0.1:{self.client[n]}",
                 "--listen-peer-urls", f"http://127.0.0.1:{self.peer[n]}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer[n]}",
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--heartbeat-interval", "50", "--election-timeout", "500"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "amd64"})

    def stop(self) -> None:
        for proc in self.procs.values():
            with suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


async def one_round(fault: str) -> tuple[float, int]:
    cluster = Cluster()
    cluster.start()
    try:
        watcher = EtcdClient([cluster.endpoint(n) for n in cluster.names], timeout=2.0)
        for _ in range(100):
            try:
                start = await watcher.revision() + 1
                break
            except Unavailable:
                await asyncio.sleep(0.1)
        victim = next(n for n in cluster.names if cluster.endpoint(n) == watcher.endpoint)
        writer = EtcdClient([cluster.endpoint(n) for n in cluster.names if n != victim],
                            timeout=2.0)
        seen: list[tuple[float, bytes]] = []

        async def watch() -> None:
            async for event in watcher.watch_prefix(b"/bench/", start_revision=start):
                seen.append((time.monotonic(), event.key))

        acked: dict[bytes, float] = {}

        async def write(first: int, count: int) -> list[bytes]:
            written = []
            for i in range(first, first + count):
                key = b"/bench/%s/%04d" % (fault.encode(), i)
                for _ in range(100):
                    try:
                        await writer.create(key, b"v")
                        acked[key] = time.monotonic()
                        break
                    except Unavailable:
                        await asyncio.sleep(0.05)
                written.append(key)
                await asyncio.sleep(0.02)
            return written

        task = asyncio.create_task(watch())
        written = await write(0, 25)
        faulted = time.monotonic()
        proc = cluster.procs[victim]
        proc.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        written += await write(25, 25)
        deadline = time.monotonic() + 30
        while len(seen) < len(written) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        # Blindness: how late the watcher saw a write the cluster had already confirmed.
        seen_at = dict((k, t) for t, k in reversed(seen))
        gap = max((seen_at.get(k, float("inf")) - t for k, t in acked.items() if t > faulted),
                  default=float("inf"))
        lost = len(set(written) - {k for _, k in seen})
        await watcher.close()
        await writer.close()
        return gap, lost
    finally:
        cluster.stop()


async def run(rounds: int) -> dict[str, float | int]:
    results: dict[str, list[float]] = {"kill": [], "freeze": []}
    lost = 0
    for fault in results:
        for _ in range(rounds):
            gap, missing = await one_round(fault)
            results[fault].append(gap)
            lost += missing
    print(f"{'fault of the watched member':32} {'median blind s':>14} {'max blind s':>11}")
    for fault, gaps in results.items():
        print(f"{fault:32} {statistics.median(gaps):14.2f} {max(gaps):11.2f}")
    print(f"events lost: {lost}")
    return {"kill_blind_s": round(statistics.median(results["kill"]), 3),
            "freeze_blind_s": round(statistics.median(results["freeze"]), 3), "lost": lost}


# ---- the lab's case: an informer whose member is killed during a write burst ----------


class _Recording:
    """The etcd store, remembering every raw watch event and counting lists."""

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


def _slice(name: str, hosts: list[int]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [f"10.244.{h // 250}.{h % 250 + 2}"],
                           "conditions": {"ready": True}} for h in hosts],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


async def _retry(op: Callable[[], Awaitable[T]], seconds: float = 30) -> T:
    """Repeat an operation the cluster could not take (election, member just killed)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await op()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def _history_key(e: Event) -> tuple[str, str, str]:
    return (e.type.value, e.revision, e.obj.key if e.obj else "")


class _Slow:
    """A handler that takes ``lag`` seconds per change, so the informer falls behind the
    writers and the killed member takes unread responses with it (a starved node daemon)."""

    def __init__(self, lag: float) -> None:
        self.lag = lag

    async def on_add(self, obj: Any) -> None:
        await asyncio.sleep(self.lag)

    async def on_update(self, old: Any, new: Any) -> None:
        await asyncio.sleep(self.lag)

    async def on_delete(self, obj: Any) -> None:
        await asyncio.sleep(self.lag)


class _ChildInformer:
    """The informer in its own process, as a node daemon's is: ``svcnet watch`` (the same
    InformerFactory path) at nice 10, so the load starves it first. Each handler call is a
    line ``VERB KIND ns/name rv=N ...``."""

    def __init__(self, endpoints: list[str]) -> None:
        self.proc = subprocess.Popen(
            ["nice", "-n", "10", sys.executable, "-m", "svcnet.cli", "watch", "endpointslices",
             "--store", "etcd://" + ",".join(endpoints)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[tuple[str, str, int]] = []
        self._reader = asyncio.get_running_loop().run_in_executor(None, self._read)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            verb, _kind, key, rv = line.split()[:4]
            self.lines.append((verb, key, int(rv.removeprefix("rv="))))

    def state(self) -> dict[str, str]:
        view: dict[str, str] = {}
        for verb, key, rv in list(self.lines):
            if verb == "DELETED":
                view.pop(key, None)
            else:
                view[key] = str(rv)
        return view

    @property
    def seen(self) -> int:
        return max((rv for _v, _k, rv in list(self.lines)), default=0)

    async def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        await self._reader


async def informer_round(seed: int, writes: int = 200, objects: int = 8, writers: int = 4,
                         restart: bool = False, lag: float = 0.0, separate: bool = False
                         ) -> dict[str, Any]:
    """One kill during a burst; the informer's view is compared with etcd's history."""
    rng = random.Random(seed)
    cluster = Cluster()
    cluster.start()
    try:
        order = cluster.names[:]
        rng.shuffle(order)
        endpoints = [cluster.endpoint(n) for n in order]
        watched = _Recording(EtcdStore(endpoints, timeout=2))
        first = rng.randrange(len(endpoints))
        writer = EtcdStore(endpoints[first:] + endpoints[:first], timeout=2)
        hosts: dict[str, list[int]] = {f"s{i}": [i] for i in range(objects)}
        for name, h in hosts.items():
            await _retry(lambda n=name, h=h: writer.put(ENDPOINT_SLICE, _slice(n, h)))
        if separate:
            return await _separate_round(rng, cluster, order, writer, hosts, writes, writers,
                                         restart, seed)
        inf = Informer(watched, ENDPOINT_SLICE, backoff=Backoff(base=0.05, cap=1.0))
        if lag:
            inf.add_handler(_Slow(lag))
        inf.start()
        await inf.wait_synced(30)
        listed = inf.revision
        victim = next(n for n in cluster.names
                      if cluster.endpoint(n) == watched.inner.client.endpoint)
        kill_at = rng.randrange(writes)
        restart_at = rng.randrange(kill_at, writes) if restart else -1
        counter = iter(range(objects, 10**9))
        done = latest = behind = 0

        async def burst(names: list[str], share: int) -> None:
            """One of several concurrent writers, each on its own objects (as controllers)."""
            nonlocal done, latest, behind
            for _ in range(share):
                if done == kill_at:
                    cluster.procs.pop(victim).kill()
                    behind = latest - int(inf.revision or 0)
                if done == restart_at:
                    cluster.start(victim)
                done += 1
                name = rng.choice(names)
                if rng.random() < 0.1:
                    with suppress(NotFound):
                        await _retry(lambda n=name: writer.delete(ENDPOINT_SLICE, "default", n))
                    hosts[name] = []
                    continue
                if hosts[name] and rng.random() < 0.4:
                    hosts[name] = hosts[name][1:]
                else:
                    hosts[name] = [*hosts[name], next(counter)]
                raw = await _retry(lambda n=name: writer.put(ENDPOINT_SLICE, _slice(n, hosts[n])))
                latest = max(latest, int(raw.revision))

        names = sorted(hosts)
        await asyncio.gather(*(burst(names[w::writers], writes // writers)
                               for w in range(writers)))
        wrote = time.monotonic()
        truth = await _retry(lambda: writer.list(ENDPOINT_SLICE))
        deadline = time.monotonic() + 30
        while int(inf.revision or 0) < int(truth.revision) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        caught_up = time.monotonic() - wrote
        want = {o.key: o.revision for o in truth.items}
        cached = {k: o.metadata.resource_version for k in inf.cache.keys_snapshot()
                  if (o := inf.cache.get(k)) is not None}
        count = int(truth.revision) - int(listed)
        history: list[Event] = []
        if count > 0:
            async def read_history() -> None:
                async for e in writer.watch(ENDPOINT_SLICE, revision=listed):
                    if e.type is not EventType.BOOKMARK:
                        history.append(e)
                        if int(e.revision) >= int(truth.revision):
                            return
            await asyncio.wait_for(read_history(), 30)
        got = [_history_key(e) for e in watched.events if e.type is not EventType.BOOKMARK]
        want_events = [_history_key(e) for e in history]
        await inf.stop()
        await watched.close()
        await writer.close()
        return {"seed": seed, "victim": victim, "kill_at": kill_at, "restart_at": restart_at,
                "events": len(want_events), "missed": len(set(want_events) - set(got)),
                "extra": len(got) - len(set(got)) + len(set(got) - set(want_events)),
                "cache_ok": cached == want, "relists": watched.lists - 1, "behind": behind,
                "catch_up_s": round(caught_up, 3)}
    finally:
        cluster.stop()


async def _separate_round(rng: random.Random, cluster: Cluster, order: list[str],
                          writer: EtcdStore, hosts: dict[str, list[int]], writes: int,
                          writers: int, restart: bool, seed: int) -> dict[str, Any]:
    """``informer_round`` with the informer in a child process (see ``_ChildInformer``)."""
    child = _ChildInformer([cluster.endpoint(n) for n in order])
    victim = order[0]
    try:
        deadline = time.monotonic() + 60
        while len(child.state()) < len(hosts) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        listed = str(await _retry(writer.client.revision))
        kill_at = rng.randrange(writes)
        restart_at = rng.randrange(kill_at, writes) if restart else -1
        counter = iter(range(len(hosts), 10**9))
        done = behind = 0

        async def burst(names: list[str], share: int) -> None:
            nonlocal done, behind
            for _ in range(share):
                step, done = done, done + 1
                if step == kill_at:
                    cluster.procs.pop(victim).kill()
                    behind = int(await _retry(writer.client.revision)) - child.seen
                if step == restart_at:
                    cluster.start(victim)
                name = rng.choice(names)
                if rng.random() < 0.1:
                    with suppress(NotFound):
                        await _retry(lambda n=name: writer.delete(ENDPOINT_SLICE, "default", n))
                    hosts[name] = []
                    continue
                if hosts[name] and rng.random() < 0.4:
                    hosts[name] = hosts[name][1:]
                else:
                    hosts[name] = [*hosts[name], next(counter)]
                await _retry(lambda n=name: writer.put(ENDPOINT_SLICE, _slice(n, hosts[n])))

        names = sorted(hosts)
        await asyncio.gather(*(burst(names[w::writers], writes // writers)
                               for w in range(writers)))
        wrote = time.monotonic()
        truth = await _retry(lambda: writer.list(ENDPOINT_SLICE))
        want = {o.key: o.revision for o in truth.items}
        deadline = time.monotonic() + 30
        while child.state() != want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        caught_up = time.monotonic() - wrote
        history: list[Event] = []

        async def read_history() -> None:
            async for e in writer.watch(ENDPOINT_SLICE, revision=listed):
                if e.type is not EventType.BOOKMARK:
                    history.append(e)
                    if int(e.revision) >= int(truth.revision):
                        return

        if int(truth.revision) > int(listed):
            await asyncio.wait_for(read_history(), 30)
        puts = {int(e.revision) for e in history if e.type is not EventType.DELETED}
        got_puts = {rv for verb, _k, rv in child.lines if verb != "DELETED"
                    and rv > int(listed)}
        deletes = sorted(e.obj.key for e in history if e.type is EventType.DELETED and e.obj)
        got_deletes = sorted(k for verb, k, rv in child.lines if verb == "DELETED")
        return {"seed": seed, "victim": victim, "kill_at": kill_at, "restart_at": restart_at,
                "events": len(history),
                "missed": len(puts - got_puts) + len(set(deletes) ^ set(got_deletes)),
                "extra": len(got_puts - puts) + abs(len(deletes) - len(got_deletes)),
                "cache_ok": child.state() == want, "relists": 0, "behind": behind,
                "catch_up_s": round(caught_up, 3)}
    finally:
        await child.stop()
        await writer.close()


async def run_informer(rounds: int, seed: int, lag: float, separate: bool = False
                       ) -> dict[str, Any]:
    rows = []
    print(f"{'round':>5} {'victim':>6} {'kill@':>5} {'restart@':>8} {'behind':>6} "
          f"{'events':>6} {'missed':>6} {'extra':>5} {'cache':>5} {'relists':>7} "
          f"{'catch-up s':>10}")
    for r in range(rounds):
        row = await informer_round(seed + r, restart=r % 2 == 1, lag=lag, separate=separate)
        rows.append(row)
        print(f"{r:5} {row['victim']:>6} {row['kill_at']:5} {row['restart_at']:8} "
              f"{row['behind']:6} {row['events']:6} {row['missed']:6} {row['extra']:5} "
              f"{'ok' if row['cache_ok'] else 'BAD':>5} {row['relists']:7} "
              f"{row['catch_up_s']:10.3f}", flush=True)
    bad = [r for r in rows if r["missed"] or r["extra"] or not r["cache_ok"]]
    return {"rounds": rounds, "missed_rounds": len(bad),
            "events_missed": sum(r["missed"] for r in rows),
            "events_extra": sum(r["extra"] for r in rows),
            "relists": sum(r["relists"] for r in rows),
            "max_behind_at_kill": max(r["behind"] for r in rows),
            "max_catch_up_s": max(r["catch_up_s"] for r in rows)}


def _contention() -> list[subprocess.Popen[bytes]]:
    """Busy work on every core: stress-ng if installed, else one busy Python per core."""
    cores = os.cpu_count() or 1
    if shutil.which("stress-ng"):
        return [subprocess.Popen(["stress-ng", "--cpu", str(cores), "--timeout", "3600s",
                                  "--quiet"])]
    return [subprocess.Popen(["python3", "-c", "while True: pass"]) for _ in range(cores)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--informer-rounds", type=int, default=0,
                        help="run the informer kill-during-burst case this many times")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stress", action="store_true", help="keep every core busy")
    parser.add_argument("--separate", action="store_true",
                        help="run the informer in its own process (svcnet watch, nice 10)")
    parser.add_argument("--lag", type=float, default=0.0, metavar="SECONDS",
                        help="informer handler time per change (it falls behind the writers)")
    args = parser.parse_args()
    if shutil.which("etcd") is None:
        raise SystemExit("needs the etcd binary (apt install etcd-server)")
    load = _contention() if args.stress else []
    try:
        if args.informer_rounds:
            result = asyncio.run(run_informer(args.informer_rounds, args.seed, args.lag,
                                              args.separate))
            result["lag_s"] = args.lag
            result["separate_process"] = args.separate
            result["stress"] = bool(load)
        else:
            result = asyncio.run(run(args.rounds))
    finally:
        for proc in load:
            proc.terminate()
            proc.wait(10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
