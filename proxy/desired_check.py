"""Kernel against desired state recomputed from the store: the proxy's end-to-end self-check.

``drift.py`` compares the kernel with the rules the running daemon last applied, so it cannot
notice a daemon that applied the wrong thing (a missed watch event, a stale cache, a partial
sync that rendered a change wrongly). This check trusts nothing the daemon holds: it lists
Services and EndpointSlices from the store, computes the model with the same
``ChangeTracker``, renders it as a full sync with the same backend into a scratch network
namespace -- so the kernel normalises both sides alike -- and compares that dump with the
node's, ignoring counters, handles and the entries traffic adds to ClientIP-affinity sets.

The nftables backend keeps spare ``lb-N``/``lbl-N`` chains (one per endpoint count, made at
the last full sync for up to twice the largest count then); chains present on one side only
are reported as ``spare``, not as drift -- an element can only point at a chain that exists.
IPVS is not covered (``supported: false``), as in ``drift.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # ``svcnet proxy`` registers ``check`` at start-up: stay cheap to import
    import concurrent.futures

    from svcnet.proxy.backend import ProxyBackend
    from svcnet.proxy.sealed_input import Seal
    from svcnet.proxy.state import Changes, NodeConfig

    from svcnet.model import EndpointSlice, Service
    from svcnet.store.base import Store

CLONE_NEWNET = 0x40000000
_SPARE_LB = re.compile(r"^\S+ (?:chain|rule) (lbl?-\d+)(?: |$)")


# --- the desired model, from a fresh list of the store ------------------------------------


async def desired_changes(store: Store, node: NodeConfig) -> Changes:
    """Every service port's desired state for ``node``, from one list of each kind."""
    from svcnet.proxy.state import ChangeTracker

    from svcnet.model import ENDPOINT_SLICE, SERVICE, InvalidObject

    services: dict[str, Service] = {}
    slices: dict[str, list[EndpointSlice]] = {}
    for raw in (await store.list(SERVICE)).items:
        try:
            services[raw.key] = SERVICE.decode(raw.data)
        except InvalidObject:
            continue  # the daemon's informer skips it too
    for raw in (await store.list(ENDPOINT_SLICE)).items:
        try:
            es = ENDPOINT_SLICE.decode(raw.data)
        except InvalidObject:
            continue
        if es.service_name:
            slices.setdefault(f"{es.metadata.namespace}/{es.service_name}", []).append(es)
    tracker = ChangeTracker(node)
    for svc in services.values():
        tracker.service_changed(None, svc)
    for group in slices.values():
        for es in group:
            tracker.slice_changed(None, es)
    return tracker.drain(services.get, lambda key: slices.get(key, []), lambda: list(services))


# --- a scratch network namespace to render into --------------------------------------------


def _unshare_net() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


@dataclasses.dataclass(frozen=True, slots=True)
class ScratchCommands:
    """Runs tools from a thread that alone moved into a new, empty network namespace, so
    they program and dump it and nothing else; the namespace goes when the thread ends."""

    pool: concurrent.futures.ThreadPoolExecutor
    timeout: float = 600.0

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        from svcnet.proxy.commands import CommandFailed

        proc = self.pool.submit(subprocess.run, list(argv), input=input, capture_output=True,
                                text=True, timeout=self.timeout, check=False).result()
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr)
        return proc.stdout

    def stream(self, argv: Sequence[str], chunks: Iterable[str], *,
               seal: Seal | None = None, quiet: bool = False) -> str:
        """Joined, not streamed: this checks the rules, it is not timed."""
        out = self.run(argv, input="".join(chunks))
        return "" if quiet else out


@contextmanager
def scratch_netns() -> Iterator[ScratchCommands]:
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1, initializer=_unshare_net)
    try:
        pool.submit(lambda: None).result()  # fail here if the namespace cannot be made
        yield ScratchCommands(pool)
    finally:
        pool.shutdown(wait=True)


# --- comparing -------------------------------------------------------------------------------


def items(backend: ProxyBackend) -> frozenset[str] | None:
    """The backend's kernel objects as the drift check normalises them; None if not
    covered."""
    return backend.kernel_items()


def compare(desired: frozenset[str], actual: frozenset[str]) -> dict[str, Any]:
    """``in_sync`` plus what is missing from / extra in the kernel, spare lb chains apart."""
    def chain(item: str) -> str | None:
        m = _SPARE_LB.match(item)
        return m.group(1) if m else None

    desired_lb = {c for i in desired if (c := chain(i))}
    actual_lb = {c for i in actual if (c := chain(i))}
    one_sided = desired_lb ^ actual_lb
    missing = sorted(i for i in desired - actual if chain(i) not in one_sided)
    extra = sorted(i for i in actual - desired if chain(i) not in one_sided)
    return {"supported": True, "in_sync": not missing and not extra, "missing": missing,
            "extra": extra, "spare_lb_chains": len(one_sided), "desired_items": len(desired),
            "kernel_items": len(actual)}


async def check(opts: Any, store: Store) -> dict[str, Any]:
    """Kernel vs desired for the node these ``ProxyOptions`` describe (its daemon's flags)."""
    from svcnet.proxy.commands import SubprocessCommands
    from svcnet.proxy.daemon import build_backend, node_addresses

    commands = SubprocessCommands(opts.netns)
    if opts.mode == "iptables" and opts.iptables_variant == "auto":
        # Decide here: the scratch namespace has no rules, so detection there picks nft.
        from svcnet.proxy.iptables import detect_legacy

        legacy = await asyncio.to_thread(detect_legacy, commands)
        opts = dataclasses.replace(opts, iptables_variant="legacy" if legacy else "nft")
    kernel = await asyncio.to_thread(build_backend, opts, commands)
    actual = await asyncio.to_thread(items, kernel)
    if actual is None:
        return {"supported": False, "in_sync": None, "missing": [], "extra": []}
    addrs = await asyncio.to_thread(node_addresses, commands, opts.nodeport_cidrs)
    changes = await desired_changes(store, opts.node_config(addrs))
    return await asyncio.to_thread(_compare_kernel, opts, kernel, actual, addrs, changes)


def _compare_kernel(opts: Any, kernel: ProxyBackend, actual: frozenset[str],
                    addrs: tuple[str, ...], changes: Changes) -> dict[str, Any]:
    from svcnet.proxy.daemon import build_backend

    with scratch_netns() as scratch:
        rendered = build_backend(opts, scratch)
        rendered.set_node_addresses({
            f: tuple(a for a in addrs if (":" in a) == (f == 6)) for f in (4, 6)})
        rendered.sync(changes, full=True)
        desired = items(rendered)
    assert desired is not None
    return {**compare(desired, actual), "mode": kernel.name,
            "service_ports": len(changes.state)}


# --- ``svcnet proxy check`` ---------------------------------------------------------------


def register(actions: Any) -> None:
    """Add ``check`` to ``svcnet proxy``'s actions; it takes the daemon's own flags."""
    from svcnet.proxy.daemon import add_node_arguments

    from svcnet.store.open import add_store_arguments

    p: argparse.ArgumentParser = actions.add_parser(
        "check", help="kernel vs desired state recomputed from the store (exit 1 on drift); "
                      "pass the daemon's --store and --proxy-* flags")
    add_store_arguments(p)
    add_node_arguments(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_check_command)


def _check_command(args: argparse.Namespace) -> int:
    from svcnet.proxy.daemon import ProxyOptions

    from svcnet.store.open import store_from_args

    opts = ProxyOptions.from_args(args)

    async def run() -> dict[str, Any]:
        store = store_from_args(args)
        try:
            return await check(opts, store)
        finally:
            await store.close()

    report = asyncio.run(run())
    print_report(report, as_json=args.json)
    return 1 if report.get("in_sync") is False else 0


def print_report(report: dict[str, Any], *, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if report.get("in_sync") is None:
        print("proxy check: not supported for this mode")
        return
    print(f"proxy check ({report['mode']}, {report['service_ports']} service ports, "
          f"{report['kernel_items']} kernel items): "
          + ("in sync with the store" if report["in_sync"] else "DIFFERS from the store"))
    for item in report["missing"]:
        print(f"  missing: {item}")
    for item in report["extra"]:
        print(f"  extra: {item}")
