"""bench/proxy_scale.py's figures for the IPVS backend, measured inside the VM.

The host kernel has no IP_VS, so on the host this script re-runs itself inside the VM
(``svcnet.lab.vm``, software emulation unless KVM works) and relays the result. Inside, like
proxy_scale.py, it re-executes itself in a fresh network namespace: N services x 10
endpoints go into a memory store, the real informers + change tracker + IPVS backend sync
them, then single EndpointSlices are rewritten.

- ``full_sync_s``: first sync (model, rendering, netlink writes of every virtual and real
  server, the dummy link's addresses, ipsets, iptables rules);
- ``floor_s``: the bare tools loading the same state into another fresh namespace:
  ``ipvsadm-restore`` of the same virtual/real servers plus the same ``ip -batch``,
  ``ipset restore`` and ``iptables-restore`` inputs our sync used;
- ``one_change_ms``: store write -> the backend sync carrying it returned (median);
- ``rss_mb``: peak RSS of the proxy process (includes the in-memory store).

Numbers taken inside a software-emulated VM are several times slower than on the host;
compare ``full_sync_ratio`` (ours / floor, both in the same VM), not absolute times.

Usage (root): .venv/bin/python bench/proxy_scale_ipvs.py [--services 10000]
The last line is JSON with backend, services, endpoints, full_sync_s, floor_s,
full_sync_ratio, one_change_ms, rss_mb.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_scale import (
    ENDPOINTS,
    RecordingCommands,
    changed_endpoint,
    cluster_ip,
    one_changes,
    rss_mb,
    slice_for,
)
from svcnet.lab import vm
from svcnet.proxy.builders import port, service
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.ipvs import IpvsBackend
from svcnet.proxy.ipvs_kernel import NetlinkIpvs
from svcnet.proxy.proxier import Proxier, SyncSettings
from svcnet.proxy.state import Changes, NodeConfig

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.memory import MemoryStore
from svcnet.watch import InformerFactory

STARTED = time.monotonic()


def progress(message: str) -> None:
    """A timestamped line on stderr, which in_guest passes through to the VM's output file:
    a long run under emulation can be followed (and judged) from the host while it goes."""
    print(f"[{time.monotonic() - STARTED:8.1f}s] {message}", file=sys.stderr, flush=True)


class CountingIpvs(NetlinkIpvs):
    """Says how far a full sync has come: its first IPVS write (the ipsets, rules and link
    addresses are in by then), then every 10,000 writes."""

    writes = 0

    def _count(self) -> None:
        self.writes += 1
        if self.writes == 1 or self.writes % 10_000 == 0:
            progress(f"{self.writes} IPVS writes")

    def add_service(self, vs: Any, options: Any) -> None:
        super().add_service(vs, options)
        self._count()

    def add_dest(self, vs: Any, rs: Any, weight: int) -> None:
        super().add_dest(vs, rs, weight)
        self._count()


class TimedBackend(IpvsBackend):
    """Records when each sync returned: IPVS changes go by netlink, not through commands."""

    returned: list[float]

    def sync(self, changes: Changes, *, full: bool) -> None:
        super().sync(changes, full=full)
        self.returned.append(time.monotonic())


async def inside(args: argparse.Namespace) -> dict[str, Any]:
    store = MemoryStore(history=1000)
    for i in range(args.services):
        await store.put(SERVICE, service(f"s{i}", cluster_ip(i), port(80, target=8080)))
        await store.put(ENDPOINT_SLICE, slice_for(i))
    store_rss = rss_mb()
    progress(f"{args.services} services in the store")
    commands = RecordingCommands()
    config = BackendConfig(families=(4,),
                           detect_local=LocalDetector("ClusterCIDR", ("10.128.0.0/9",)))
    backend = TimedBackend(CountingIpvs(), commands, config)
    backend.returned = []
    proxier = Proxier(backend, NodeConfig("n1"), settings=SyncSettings(
        min_sync_period=args.min_sync_period, sync_period=3600))
    factory = InformerFactory(store)
    proxier.attach(factory)
    factory.start()
    await factory.wait_for_sync(3600)
    progress("informers synced; full sync starts")
    started = time.monotonic()
    assert await proxier.sync_once()
    full_sync = time.monotonic() - started
    progress(f"full sync done in {full_sync:.1f} s")
    ipvsadm = [f"-A -t {vs.ip}:{vs.port} -s {opts.scheduler}\n"
               + "".join(f"-a -t {vs.ip}:{vs.port} -r {rs.ip}:{rs.port} -m -w 1\n"
                         for rs in sorted(reals))
               for r in backend._rendered.values() for vs, (opts, reals) in r.servers.items()]
    full_inputs = [*commands.inputs, (["ipvsadm-restore"], "".join(ipvsadm))]

    def check(i: int, generation: int) -> None:
        ep = changed_endpoint(i, generation)
        if ep not in subprocess.run(["ipvsadm", "-Ln", "-t", f"{cluster_ip(i)}:80"],
                                    capture_output=True, text=True).stdout:
            raise RuntimeError(f"endpoint {ep} not live after the change")

    progress("one-change measurements")
    try:
        changes = await one_changes(args, store, proxier, backend.returned, check, timeout=120)
    finally:
        await factory.stop()
    return {"full_sync_s": full_sync, "one_change_ms": statistics.median(changes),
            "one_change_all_ms": [round(c, 1) for c in changes], "rss_mb": rss_mb(),
            "store_rss_mb": store_rss, "full_inputs": full_inputs}


def floor(inputs: list[tuple[list[str], str]]) -> float:
    """The same state loaded by the bare tools into another fresh namespace."""
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


def in_guest(args: argparse.Namespace) -> int:
    subprocess.run(["modprobe", "-a", "ip_vs", "ip_vs_rr", "dummy"], check=True)
    ns = f"svcnet-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", *sys.argv[1:]],
            stdout=subprocess.PIPE, text=True, check=False)  # progress on stderr, live
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], file=sys.stderr)
        return 1
    inner = json.loads(proc.stdout.strip().splitlines()[-1])
    progress("floor: the bare tools load the same state")
    floor_s = floor(inner["full_inputs"])
    result = {
        "backend": "ipvs", "services": args.services, "endpoints": args.services * ENDPOINTS,
        "full_sync_s": round(inner["full_sync_s"], 3), "floor_s": round(floor_s, 3),
        "full_sync_ratio": round(inner["full_sync_s"] / floor_s, 3),
        "one_change_ms": round(inner["one_change_ms"], 1), "rss_mb": round(inner["rss_mb"], 1),
        "store_rss_mb": round(inner["store_rss_mb"], 1),
    }
    print(f"{'backend':<10} {'services':>8} {'endpoints':>9} {'full sync':>10} {'floor':>8} "
          f"{'ratio':>6} {'1 change':>9} {'RSS':>8} {'(store)':>8}")
    print(f"{'ipvs':<10} {result['services']:>8} {result['endpoints']:>9} "
          f"{result['full_sync_s']:>9.2f}s {result['floor_s']:>7.2f}s "
          f"{result['full_sync_ratio']:>6.2f} {result['one_change_ms']:>7.1f}ms "
          f"{result['rss_mb']:>6.0f}MB {result['store_rss_mb']:>6.0f}MB")
    print(f"one-change samples (ms): {inner['one_change_all_ms']}")
    print("(inside a VM: compare the ratio, not absolute times)")
    print(json.dumps(result))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("ipvs",), default="ipvs")
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--changes", type=int, default=5)
    p.add_argument("--min-sync-period", type=float, default=1.0)
    p.add_argument("--vm-timeout", type=float, default=7200)
    p.add_argument("--vm-cpus", type=int, default=2,
                   help="guest CPUs (1 halves what a long emulated run takes from the host)")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        print(json.dumps(asyncio.run(inside(args))))
        return 0
    if vm.in_vm():
        return in_guest(args)
    python = vm.PROJECT_ROOT / ".venv" / "bin" / "python"
    command = " ".join(shlex.quote(a) for a in [str(python), __file__, *sys.argv[1:]])
    result = vm.run_in_vm(command, timeout=args.vm_timeout, memory="4G", cpus=args.vm_cpus)
    sys.stdout.write(result.output)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
