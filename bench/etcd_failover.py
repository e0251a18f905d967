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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from svcnet.lab.etcdfault import (
    Burst,
    EtcdCluster,
    history,
    kill_during_burst,
    retry,
)

from svcnet.model import ENDPOINT_SLICE
from svcnet.store.base import (
    EventType,
    Unavailable,
)
from svcnet.store.etcd import EtcdClient, EtcdStore


@contextmanager
def _cluster() -> Iterator[EtcdCluster]:
    base = Path(tempfile.mkdtemp(prefix="svcnet-bench-etcd3-"))
    cluster = EtcdCluster(base, 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


async def one_round(fault: str) -> tuple[float, int]:
    with _cluster() as cluster:
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
        if fault == "kill":
            cluster.kill(victim)
        else:
            cluster.freeze(victim)
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


async def informer_round(seed: int, writes: int = 200, objects: int = 8,
                         restart: bool = False, lag: float = 0.0, separate: bool = False
                         ) -> dict[str, Any]:
    """One kill during a burst; the informer's view is compared with etcd's history."""
    rng = random.Random(seed)
    with _cluster() as cluster:
        victim = rng.choice(cluster.names)
        if separate:
            return await _separate_round(rng, cluster, victim, writes, objects, restart, seed)
        r = await kill_during_burst(cluster, victim, rng, restart=restart, writes=writes,
                                    objects=objects, handler=_Slow(lag) if lag else None)
        return {"seed": seed, "victim": victim, "kill_at": r.kill_at,
                "restart_at": r.restart_at, "events": len(r.want), "missed": r.missed,
                "extra": r.extra, "cache_ok": r.cache_ok, "relists": r.lists - 1,
                "behind": r.behind, "catch_up_s": r.catch_up_s}


async def _separate_round(rng: random.Random, cluster: EtcdCluster, victim: str, writes: int,
                          objects: int, restart: bool, seed: int) -> dict[str, Any]:
    """``informer_round`` with the informer in a child process (see ``_ChildInformer``)."""
    others = [n for n in cluster.names if n != victim]
    order = [victim, *others]
    writer = EtcdStore([cluster.endpoint(n) for n in reversed(order)], timeout=2)
    burst = Burst(writer, rng, {f"s{i}": [i] for i in range(objects)}, writes)
    await burst.seed()
    child = _ChildInformer([cluster.endpoint(n) for n in order])
    try:
        deadline = time.monotonic() + 60
        while len(child.state()) < objects and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        listed = str(await retry(writer.client.revision))
        kill_at = rng.randrange(writes)
        restart_at = rng.randrange(kill_at, writes) if restart else -1
        behind = 0

        async def step(at: int) -> None:
            nonlocal behind
            if at == kill_at:
                cluster.kill(victim)
                behind = int(await retry(writer.client.revision)) - child.seen
            if at == restart_at:
                await asyncio.to_thread(cluster.start, victim)

        await burst.run(step)
        wrote = time.monotonic()
        truth = await retry(lambda: writer.list(ENDPOINT_SLICE))
        want = {o.key: o.revision for o in truth.items}
        deadline = time.monotonic() + 30
        while child.state() != want and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        caught_up = time.monotonic() - wrote
        events = await history(writer, listed, truth.revision)
        puts = {int(e.revision) for e in events if e.type is not EventType.DELETED}
        got_puts = {rv for verb, _k, rv in child.lines if verb != "DELETED"
                    and rv > int(listed)}
        deletes = sorted(e.obj.key for e in events if e.type is EventType.DELETED and e.obj)
        got_deletes = sorted(k for verb, k, rv in child.lines if verb == "DELETED")
        return {"seed": seed, "victim": victim, "kill_at": kill_at, "restart_at": restart_at,
                "events": len(events),
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
