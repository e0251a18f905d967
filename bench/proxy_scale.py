"""Service proxy at scale: full sync, one endpoint change and memory, against the floor.

In a fresh network namespace (the process re-executes itself inside it, as the daemon runs
inside its node's namespace): N services x 10 endpoints go into an in-memory store, the
real informers + change tracker + backend sync them, then one EndpointSlice is rewritten.

- ``full_sync_s``: first sync after the informers listed everything: model computation,
  rendering and loading the rules (the kernel has them when it returns);
- ``floor_s``: the bare ``nft -f`` / ``iptables-restore`` of exactly the ruleset our full
  sync produced, into another fresh namespace;
- ``one_change_ms``: store write of one changed EndpointSlice -> the sync that carries it has
  returned from nft / iptables-restore (median of ``--changes`` runs);
- ``rss_mb``: peak RSS of this process (includes the in-memory store holding every object
  as JSON and as a dict, which a real node's proxy does not have); ``store_rss_mb`` is the
  RSS once the store was filled, before the proxy started.

Usage (root): .venv/bin/python bench/proxy_scale.py --backend nftables [--services 10000]
The last line is JSON with backend, services, endpoints, full_sync_s, floor_s,
full_sync_ratio, one_change_ms, rss_mb.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from svcnet.proxy.builders import endpoint, endpoint_slice, port, service
from svcnet.proxy.commands import SubprocessCommands
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.proxier import Proxier, SyncSettings
from svcnet.proxy.state import NodeConfig

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.memory import MemoryStore
from svcnet.watch import InformerFactory

ENDPOINTS = 10


class RecordingCommands:
    """The real runner, remembering the input of each restore/nft call."""

    def __init__(self) -> None:
        self.inner = SubprocessCommands()
        self.inputs: list[tuple[list[str], str]] = []
        self.returned: list[float] = []

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        out = self.inner.run(argv, input=input, check=check)
        if input is not None:
            self.inputs.append((list(argv), input))
            self.returned.append(time.monotonic())
        return out


    def stream(self, argv: Sequence[str], chunks: Iterable[str]) -> str:
        parts: list[str] = []

        def recorded() -> Iterator[str]:
            for chunk in chunks:
                parts.append(chunk)
                yield chunk

        out = self.inner.stream(argv, recorded())
        self.inputs.append((list(argv), "".join(parts)))
        self.returned.append(time.monotonic())
        return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cluster_ip(i: int) -> str:
    return f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"


def slice_for(i: int, generation: int = 0) -> dict[str, Any]:
    eps = [endpoint(f"10.{128 + j + generation}.{i // 256 % 256}.{i % 256}", node="n1")
           for j in range(ENDPOINTS)]
    return endpoint_slice(f"s{i}", *eps)


async def inside(args: argparse.Namespace) -> dict[str, Any]:
    store = MemoryStore(history=1000)
    for i in range(args.services):
        await store.put(SERVICE, service(f"s{i}", cluster_ip(i), port(80, target=8080)))
        await store.put(ENDPOINT_SLICE, slice_for(i))
    store_rss = rss_mb()
    commands = RecordingCommands()
    config = BackendConfig(families=(4,),
                           detect_local=LocalDetector("ClusterCIDR", ("10.128.0.0/9",)))
    backend: Any
    if args.backend == "nftables":
        from svcnet.proxy.nftables import NftablesBackend

        backend = NftablesBackend(commands, config)
    else:
        from svcnet.proxy.iptables import IptablesBackend

        backend = IptablesBackend(commands, config, legacy=args.legacy)
    proxier = Proxier(backend, NodeConfig("n1"), settings=SyncSettings(
        min_sync_period=args.min_sync_period, sync_period=3600))
    factory = InformerFactory(store)
    proxier.attach(factory)
    factory.start()
    await factory.wait_for_sync(600)
    started = time.monotonic()
    assert await proxier.sync_once()
    full_syncs = [time.monotonic() - started]
    full_inputs = list(commands.inputs)
    for _ in range(args.repeat - 1):
        # The machine is shared: repeat (a periodic full sync, table already there), keep
        # the best, as for the floor.
        proxier._need_full = True
        started = time.monotonic()
        assert await proxier.sync_once()
        full_syncs.append(time.monotonic() - started)
    full_sync = min(full_syncs)

    loop_task = asyncio.create_task(proxier.loop())
    changes: list[float] = []
    try:
        await asyncio.sleep(args.min_sync_period + 0.2)
        for n in range(args.changes):
            await asyncio.sleep(args.min_sync_period + 0.1)
            before = len(commands.returned)
            target = (n * 7919) % args.services
            wrote = time.monotonic()
            await store.put(ENDPOINT_SLICE, slice_for(target, generation=n + 1))
            deadline = time.monotonic() + 30
            while len(commands.returned) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.0005)
            if len(commands.returned) == before:
                raise RuntimeError("the change never reached the kernel")
            changes.append((commands.returned[before] - wrote) * 1000)
            check_live(args.backend, target, n + 1, args.legacy)
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        await factory.stop()
    return {
        "full_sync_s": full_sync,
        "full_sync_all_s": [round(f, 2) for f in full_syncs],
        "one_change_ms": statistics.median(changes),
        "one_change_all_ms": [round(c, 1) for c in changes],
        "rss_mb": rss_mb(),
        "store_rss_mb": store_rss,
        "full_inputs": full_inputs,
    }


def check_live(backend: str, i: int, generation: int, legacy: bool = False) -> None:
    """The changed endpoint really is in the kernel."""
    ep = f"10.{128 + generation}.{i // 256 % 256}.{i % 256}"
    if backend == "nftables":
        out = subprocess.run(["nft", "get", "element", "ip", "svcnet", "backends",
                              f"{{ {cluster_ip(i)} . tcp . 80 . 0 }}"],
                             capture_output=True, text=True, check=True).stdout
    else:
        save = "iptables-legacy-save" if legacy else "iptables-nft-save"
        out = subprocess.run([save, "-t", "nat"], capture_output=True, text=True,
                             check=True).stdout
    if ep not in out:
        raise RuntimeError(f"endpoint {ep} not live after the change")


def floor(inputs: list[tuple[list[str], str]], repeat: int) -> float:
    """Best time of the bare tool loading the same rule text into a fresh namespace."""
    return min(floor_once(inputs) for _ in range(repeat))


def floor_once(inputs: list[tuple[list[str], str]]) -> float:
    ns = f"svcnet-bench-floor-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        total = 0.0
        for argv, text in inputs:
            started = time.monotonic()
            subprocess.run(["ip", "netns", "exec", ns, *argv], input=text, text=True,
                           check=True, capture_output=True)
            total += time.monotonic() - started
        return total
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("nftables", "iptables", "ipvs"), default="nftables")
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--changes", type=int, default=5)
    p.add_argument("--repeat", type=int, default=2, help="full syncs and floor loads (best)")
    p.add_argument("--min-sync-period", type=float, default=1.0)
    p.add_argument("--legacy", action="store_true", help="iptables-legacy instead of nft")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.backend == "ipvs":  # needs IP_VS: proxy_scale_ipvs.py re-runs itself in a VM
        raise SystemExit(subprocess.call(
            [sys.executable, str(Path(__file__).with_name("proxy_scale_ipvs.py")), *sys.argv[1:]]))
    if args.inside:
        result = asyncio.run(inside(args))
        print(json.dumps(result))
        return 0
    ns = f"svcnet-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", *sys.argv[1:]],
            capture_output=True, text=True, check=False)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return 1
    inner = json.loads(proc.stdout.strip().splitlines()[-1])
    floor_s = floor(inner["full_inputs"], args.repeat)
    result = {
        "backend": args.backend,
        "services": args.services,
        "endpoints": args.services * ENDPOINTS,
        "full_sync_s": round(inner["full_sync_s"], 3),
        "floor_s": round(floor_s, 3),
        "full_sync_ratio": round(inner["full_sync_s"] / floor_s, 3),
        "one_change_ms": round(inner["one_change_ms"], 1),
        "rss_mb": round(inner["rss_mb"], 1),
        "store_rss_mb": round(inner["store_rss_mb"], 1),
    }
    print(f"{'backend':<10} {'services':>8} {'endpoints':>9} {'full sync':>10} {'floor':>8} "
          f"{'ratio':>6} {'1 change':>9} {'RSS':>8} {'(store)':>8}")
    print(f"{result['backend']:<10} {result['services']:>8} {result['endpoints']:>9} "
          f"{result['full_sync_s']:>9.2f}s {result['floor_s']:>7.2f}s "
          f"{result['full_sync_ratio']:>6.2f} {result['one_change_ms']:>7.1f}ms "
          f"{result['rss_mb']:>6.0f}MB {result['store_rss_mb']:>6.0f}MB")
    print(f"full syncs (s): {inner['full_sync_all_s']}; "
          f"one-change samples (ms): {inner['one_change_all_ms']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
