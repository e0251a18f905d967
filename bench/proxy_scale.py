"""Service proxy at scale: full sync, one endpoint change and memory, against the floor.

In a fresh network namespace (the process re-executes itself inside it, as the daemon runs
inside its node's namespace): N services x 10 endpoints go into an in-memory store, the
real informers + change tracker + backend sync them, then one EndpointSlice is rewritten.

- ``full_sync_s``: median cold full sync: model computation, rendering and loading the
  rules into a namespace without them (the kernel has them when it returns). The first
  one runs at start; each of ``--repeat`` rounds then forgets the model and syncs into
  another fresh namespace;
- ``floor_s``: median time of the bare tool loading exactly the ruleset our first full sync
  produced into a fresh namespace (``nft -f FILE`` / ``nft -f -`` alternately;
  ``iptables-restore`` with our arguments, input on stdin), one right after each of our
  syncs so each pair sees the same machine load;
- ``full_sync_ratio``: the median of the pairs' ratios (the machine is shared: absolute
  times swing 2-5x with other jobs; a pair's ratio much less). The best-of values are
  printed and in the JSON too;
- ``one_change_ms``: store write of one changed EndpointSlice -> the sync that carries it has
  returned from nft / iptables-restore (median of ``--changes`` runs);
- ``rss_mb``: peak RSS of this process, i.e. the daemon's parts plus the in-memory store
  holding every object as JSON and as a dict (a real node's proxy talks to etcd or the API
  server instead); ``store_rss_mb`` is the RSS once the store was filled.

Every kernel tool run is bounded by ``--timeout``; a full sync that does not finish in time
is reported as such, next to the floor's own time (or its own timeout).

Usage (root): .venv/bin/python bench/proxy_scale.py --backend nftables [--services 10000]
The last line is JSON with backend, services, endpoints, full_sync_s, floor_s,
full_sync_ratio, one_change_ms, rss_mb (null when the full sync timed out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from svcnet.proxy.builders import endpoint, endpoint_slice, port, service
from svcnet.proxy.commands import SubprocessCommands
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.proxier import Proxier, SyncSettings
from svcnet.proxy.sealed_input import Seal
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


    def stream(self, argv: Sequence[str], chunks: Iterable[str], *,
               seal: Seal | None = None, quiet: bool = False) -> str:
        parts: list[str] = []

        def recorded() -> Iterator[str]:
            for chunk in chunks:
                parts.append(chunk)
                yield chunk

        out = self.inner.stream(argv, recorded(), seal=seal, quiet=quiet)
        self.inputs.append((list(argv), "".join(parts)))
        self.returned.append(time.monotonic())
        return out


class FileRecordingCommands:
    """The real runner, writing the input of each restore/nft call to a file (not kept in
    this process's memory, whose peak RSS is measured) so the floor can replay it."""

    def __init__(self, directory: str, timeout: float) -> None:
        self.inner = SubprocessCommands(timeout=timeout)
        self.directory = directory
        self.inputs: list[tuple[list[str], str]] = []  # (argv, file holding the input)
        self.returned: list[float] = []
        self.record_streams = True  # off once the first full sync's text is on disk

    def _file(self) -> str:
        return os.path.join(self.directory, f"input-{len(self.inputs)}")

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        if input is not None:
            path = self._file()
            Path(path).write_text(input)
            self.inputs.append((list(argv), path))
        out = self.inner.run(argv, input=input, check=check)
        if input is not None:
            self.returned.append(time.monotonic())
        return out

    def stream(self, argv: Sequence[str], chunks: Iterable[str], *,
               seal: Seal | None = None, quiet: bool = False) -> str:
        """The recorded input is the script itself, unsealed, for the floor to replay."""
        if not self.record_streams:  # later full syncs: no bench work inside the timing
            out = self.inner.stream(argv, chunks, seal=seal, quiet=quiet)
            self.returned.append(time.monotonic())
            return out
        path = self._file()
        self.inputs.append((list(argv), path))
        with open(path, "w") as f:

            def recorded() -> Iterator[str]:
                for chunk in chunks:
                    f.write(chunk)
                    yield chunk

            out = self.inner.stream(argv, recorded(), seal=seal, quiet=quiet)
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
    tmp = tempfile.mkdtemp(prefix="svcnet-bench-")
    commands = FileRecordingCommands(tmp, args.timeout)
    config = BackendConfig(families=(4,),
                           detect_local=LocalDetector("ClusterCIDR", ("10.128.0.0/9",)))
    backend: Any
    result: dict[str, Any] = {"store_rss_mb": store_rss}
    if args.backend == "nftables":
        from svcnet.proxy.nftables import NftablesBackend

        backend = NftablesBackend(commands, config)
    else:
        from svcnet.proxy.iptables import IptablesBackend, detect_legacy

        # "auto" is the daemon's detection (kube-proxy's rule), here in a fresh namespace.
        legacy = detect_legacy(commands) if args.variant == "auto" else args.variant == "legacy"
        result["variant"] = "legacy" if legacy else "nft"
        backend = IptablesBackend(commands, config, legacy=legacy)
    proxier = Proxier(backend, NodeConfig("n1"), settings=SyncSettings(
        min_sync_period=args.min_sync_period, sync_period=3600))
    factory = InformerFactory(store)
    proxier.attach(factory)
    factory.start()
    await factory.wait_for_sync(600)
    try:
        # 1. The first sync, into this fresh namespace: the model, rendering and loading.
        first, ok, cpu = await timed_sync(proxier)
        full_inputs = list(commands.inputs)
        commands.record_streams = False
        result["first_sync_s"] = first
        floors = [floor_once(full_inputs, "stdin", args.timeout)]
        if not ok:
            # Failed or timed out (bounded by --timeout): report it with the floor's own time.
            result["floors_s"] = [f for f, _ in floors]
            result["rss_mb"] = rss_mb()
            return result
        # 2. More rounds of (cold full sync, floor), each pair back to back so both see the
        # same machine load: the model is forgotten and rebuilt, the namespace is fresh.
        syncs, cpus = [first], [cpu]
        for r in range(args.repeat):
            with fresh_netns("sync") as ns:
                commands.inner = SubprocessCommands(netns=ns, timeout=args.timeout)
                proxier.tracker.forget()
                proxier.request_full_sync()
                took, ok, cpu = await timed_sync(proxier)
                assert ok, "cold full sync failed"
                syncs.append(took)
                cpus.append(cpu)
            how = "file" if args.backend == "nftables" and r % 2 == 0 else "stdin"
            floors.append(floor_once(full_inputs, how, args.timeout))
        result["full_syncs_s"] = syncs
        result["full_syncs_cpu_s"] = cpus
        result["floors_s"] = [f for f, _ in floors]
        result["floors_cpu_s"] = [c for _, c in floors]
        # 3. Back in our namespace (whose table is still the first sync's): a periodic
        # full re-sync, model kept, the table replaced in one transaction.
        commands.inner = SubprocessCommands(timeout=args.timeout)
        proxier.request_full_sync()
        result["resync_s"], ok, _ = await timed_sync(proxier)
        assert ok, "full re-sync failed"
        # 4. One EndpointSlice change at a time: store write -> rules in the kernel.
        result["one_change_all_ms"] = await one_changes(
            args, store, proxier, commands.returned,
            lambda i, generation: check_live(args, i, generation, proxier.backend))
    finally:
        await factory.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result["rss_mb"] = rss_mb()
    return result


async def timed_sync(proxier: Proxier) -> tuple[float, bool, tuple[float, float]]:
    """(wall seconds, succeeded, (CPU seconds of this process, of the tools it ran))."""
    started, cpu = time.monotonic(), cpu_now()
    ok = await proxier.sync_once()
    after = cpu_now()
    return time.monotonic() - started, ok, (after[0] - cpu[0], after[1] - cpu[1])


def cpu_now() -> tuple[float, float]:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


async def one_changes(args: argparse.Namespace, store: MemoryStore, proxier: Proxier,
                      returned: list[float], check: Callable[[int, int], None],
                      timeout: float = 30) -> list[float]:
    """Store write to the kernel tool's return, for ``args.changes`` endpoint changes run
    by the proxier's own loop; ``returned`` gets a time whenever the tool returns, and
    ``check(service, generation)`` confirms the new endpoint is live."""
    loop_task = asyncio.create_task(proxier.loop())
    changes: list[float] = []
    try:
        await asyncio.sleep(args.min_sync_period + 0.2)
        for n in range(args.changes):
            await asyncio.sleep(args.min_sync_period + 0.1)
            before = len(returned)
            target = (n * 7919) % args.services
            wrote = time.monotonic()
            await store.put(ENDPOINT_SLICE, slice_for(target, generation=n + 1))
            deadline = time.monotonic() + timeout
            while len(returned) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.0005)
            if len(returned) == before:
                raise RuntimeError("the change never reached the kernel")
            changes.append((returned[before] - wrote) * 1000)
            check(target, n + 1)
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
    return changes


def changed_endpoint(i: int, generation: int) -> str:
    """The endpoint ``slice_for(i, generation)`` adds."""
    return f"10.{128 + generation}.{i // 256 % 256}.{i % 256}"


def check_live(args: argparse.Namespace, i: int, generation: int, backend: Any) -> None:
    """The changed endpoint really is in the kernel."""
    ep = changed_endpoint(i, generation)
    if args.backend == "nftables":
        out = subprocess.run(["nft", "get", "element", "ip", "svcnet", "backends",
                              f"{{ {cluster_ip(i)} . tcp . 80 . 0 }}"],
                             capture_output=True, text=True, check=True).stdout
    else:  # grep outside this process, whose peak RSS is measured
        save = "iptables-legacy-save" if backend.legacy else "iptables-nft-save"
        out = subprocess.run(f"{save} -t nat | grep -F -m1 -- '{ep}:'", shell=True,
                             capture_output=True, text=True, check=False).stdout
    if ep not in out:
        raise RuntimeError(f"endpoint {ep} not live after the change")


@contextlib.contextmanager
def fresh_netns(what: str) -> Iterator[str]:
    ns = f"svcnet-bench-{what}-{os.getpid()}-{time.monotonic_ns()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def floor_once(inputs: list[tuple[list[str], str]], how: str,
               timeout: float) -> tuple[float | None, float]:
    """The bare tool loading the recorded full-sync input into a fresh namespace: (wall
    seconds or None if it did not finish within ``timeout``, CPU seconds of the tool).

    nft reads it with ``nft -f FILE`` (how="file") or ``nft -f -`` from stdin; the
    iptables-restore tools get it on stdin with the arguments our sync used.
    """
    with fresh_netns("floor") as ns:
        total = 0.0
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        for argv, path in inputs:
            if argv[0] == "nft":
                argv = ["nft", "-f", path if how == "file" else "-"]
            started = time.monotonic()
            with open(path) as stdin:
                try:
                    subprocess.run(["ip", "netns", "exec", ns, *argv], stdin=stdin,
                                   check=True, capture_output=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    return None, 0.0
                except subprocess.CalledProcessError as e:
                    raise SystemExit(f"floor: {' '.join(argv)} failed: "
                                     f"{e.stderr.decode(errors='replace')[-2000:]}") from e
            total += time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("nftables", "iptables", "ipvs"), default="nftables")
    p.add_argument("--services", type=int, default=10_000)
    p.add_argument("--changes", type=int, default=5)
    p.add_argument("--repeat", type=int, default=2,
                   help="rounds of (floor, cold full sync) after the first sync; best counts")
    p.add_argument("--min-sync-period", type=float, default=1.0)
    p.add_argument("--variant", choices=("auto", "nft", "legacy"), default="auto",
                   help="iptables flavour; auto = the daemon's detection, in a fresh namespace")
    p.add_argument("--legacy", action="store_true", help="same as --variant legacy")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="limit for each kernel tool run (full sync or floor), seconds")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.legacy:
        args.variant = "legacy"
    if args.backend == "ipvs":  # needs IP_VS: proxy_scale_ipvs.py re-runs itself in a VM
        raise SystemExit(subprocess.call(
            [sys.executable, str(Path(__file__).with_name("proxy_scale_ipvs.py")), *sys.argv[1:]]))
    if args.inside:
        print(json.dumps(asyncio.run(inside(args))))
        return 0
    ns = f"svcnet-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--inside", *sys.argv[1:]],
            capture_output=True, text=True, check=False,
            timeout=args.timeout * (2 * args.repeat + 3) + 600)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return 1
    inner = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report(args, inner)))
    return 0


def report(args: argparse.Namespace, inner: dict[str, Any]) -> dict[str, Any]:
    """Print the table; return the JSON summary."""
    floors = [f for f in inner["floors_s"] if f is not None]
    floor_s = min(floors) if floors else None
    name = args.backend + (f" ({inner['variant']})" if "variant" in inner else "")
    result: dict[str, Any] = {
        "backend": args.backend, "services": args.services,
        "endpoints": args.services * ENDPOINTS,
        "full_sync_s": None, "floor_s": None if floor_s is None else round(floor_s, 3),
        "full_sync_ratio": None, "one_change_ms": None, "rss_mb": None,
        "store_rss_mb": round(inner["store_rss_mb"], 1),
    }
    if "variant" in inner:
        result["variant"] = inner["variant"]
    if "full_syncs_s" not in inner:  # the first full sync failed or timed out
        floor_text = (f"{floor_s:.1f} s" if floor_s is not None
                      else f"did not finish within {args.timeout:.0f} s either")
        print(f"{name}: {args.services} services x {ENDPOINTS}: our full sync did not finish "
              f"within {args.timeout:.0f} s (gave up after {inner['first_sync_s']:.1f} s); "
              f"the bare tool loading the same ruleset (floor): {floor_text}")
        result.update(timed_out=True, timeout_s=args.timeout, rss_mb=round(inner["rss_mb"], 1))
        return result
    syncs = inner["full_syncs_s"]
    best = min(syncs)
    paired = [sy / fl for sy, fl in zip(syncs, inner["floors_s"], strict=False) if fl]
    changes = inner["one_change_all_ms"]
    result.update(
        full_sync_s=round(statistics.median(syncs), 3),
        floor_s=round(statistics.median(floors), 3) if floors else None,
        full_sync_ratio=round(statistics.median(paired), 3) if paired else None,
        best_full_sync_s=round(best, 3),
        best_floor_s=None if floor_s is None else round(floor_s, 3),
        best_ratio=None if floor_s is None else round(best / floor_s, 3),
        first_sync_s=round(inner["first_sync_s"], 3),
        resync_s=round(inner["resync_s"], 3),
        one_change_ms=round(statistics.median(changes), 1),
        rss_mb=round(inner["rss_mb"], 1),
    )
    ratio = "-" if result["full_sync_ratio"] is None else f"{result['full_sync_ratio']:.2f}"
    print(f"{'backend':<18} {'services':>8} {'endpoints':>9} {'full sync':>10} {'floor':>8} "
          f"{'ratio':>6} {'1 change':>9} {'RSS':>7} {'(store)':>8}")
    print(f"{name:<18} {args.services:>8} {args.services * ENDPOINTS:>9} "
          f"{result['full_sync_s']:>9.2f}s {(result['floor_s'] or 0):>7.2f}s {ratio:>6} "
          f"{result['one_change_ms']:>7.1f}ms "
          f"{result['rss_mb']:>5.0f}MB {result['store_rss_mb']:>6.0f}MB")
    print(f"medians of {len(syncs)} pairs (cold full sync, floor) measured back to back, the "
          "first pair's sync at start; ratio = median of the pairs' ratios:")
    for i, (sy, fl) in enumerate(zip(syncs, inner["floors_s"], strict=False)):
        ours, tools = inner["full_syncs_cpu_s"][i]
        fcpu = inner["floors_cpu_s"][i]
        pr = f"{sy / fl:.2f}" if fl else "-"
        print(f"  cold full sync {sy:6.2f}s (CPU: Python {ours:5.2f}s + tools {tools:5.2f}s)"
              f"   floor {(fl or 0):6.2f}s (CPU {fcpu:5.2f}s)   ratio {pr}")
    if floor_s:
        print(f"best cold full sync {best:.2f}s / best floor {floor_s:.2f}s = "
              f"{best / floor_s:.2f}")
    print(f"periodic full re-sync with the table present (s): {inner['resync_s']:.2f}; "
          f"one-change samples (ms): {[round(c, 1) for c in changes]}")
    return result


if __name__ == "__main__":
    sys.exit(main())
