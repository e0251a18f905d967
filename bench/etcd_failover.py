"""How long a watch is blind when the etcd member it uses dies or freezes.

Starts a three-member etcd cluster on loopback. A watcher uses all three members (it starts
on one of them); a writer on the two others creates a key every 20 ms. Then the watcher's
member is killed (SIGKILL), or frozen (SIGSTOP: no reset, the socket just goes quiet), and
we measure the watcher's blindness: the longest delay between a write being confirmed to
the writer (after the fault) and the watcher receiving it; and check that no write was lost.

Prints a table and, as the last line, JSON with ``kill_blind_s``, ``freeze_blind_s`` (median of
--rounds) and ``lost`` (events missing, must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from contextlib import suppress

from svcnet.store.base import Unavailable
from svcnet.store.etcd import EtcdClient


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

    def start(self) -> None:
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer[n]}" for n in self.names)
        for n in self.names:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("etcd") is None:
        raise SystemExit("needs the etcd binary (apt install etcd-server)")
    print(json.dumps(asyncio.run(run(args.rounds))))


if __name__ == "__main__":
    main()
