"""``svcnet overlay status``: the node's lease and peers, and the kernel against desired state.

Desired state comes from the running daemon (``/status``); the kernel is read here, by the
same adapter the daemon uses, so the report shows drift the daemon has not fixed yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from dataclasses import dataclass
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("overlay", help="overlay network tools")
    osub = p.add_subparsers(dest="overlay_command", required=True, metavar="COMMAND")
    s = osub.add_parser("status", help="peers, and what the kernel holds versus what it should")
    s.add_argument("--url", default="http://127.0.0.1:9475",
                   help="the daemon's --overlay-listen address")
    s.add_argument("--netns", default="", help="read the kernel of this named namespace")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_status)
    c = osub.add_parser("cleanup", help="remove the overlay's firewall rules (both backends) "
                        "and, with --datapath, its VXLAN devices and routes")
    c.add_argument("--netns", default="", help="clean up this named namespace")
    c.add_argument("--datapath", action="store_true",
                   help="also delete flannel.* devices and our routes (cuts pods off)")
    c.set_defaults(func=_cleanup)


def _cleanup(args: argparse.Namespace) -> int:
    import asyncio

    messages = asyncio.run(cleanup(args.netns or None, datapath=args.datapath))
    for line in messages:
        print(line)
    return 1 if any(line.startswith("error") for line in messages) else 0


async def cleanup(netns: str | None, *, datapath: bool = False) -> list[str]:
    """Remove everything of ours: both firewall backends' rules; with ``datapath`` also the
    devices (which takes their neighbours and FDB entries) and our routes, the cluster
    network's blackhole included."""
    import shutil

    from svcnet.cni.overlay.desired import KernelObjects
    from svcnet.cni.overlay.firewall import BACKENDS, make_firewall
    from svcnet.cni.overlay.netlink import IpCommandNetlink
    from svcnet.cni.overlay.reconcile import plan

    out: list[str] = []
    for backend in BACKENDS:
        if not shutil.which("nft" if backend == "nftables" else "iptables-save"):
            continue
        try:
            removed, errors = await make_firewall(backend, netns).sync(())
        except OSError as err:
            out.append(f"error: {backend}: {err}")
            continue
        out += [f"error: {e}" for e in errors]
        out.append(f"{backend}: removed {removed} objects")
    if datapath:
        kernel = IpCommandNetlink(netns, native=False)
        links = (await kernel.observe(frozenset())).objects.links
        observed = await kernel.observe(frozenset(link.name for link in links))
        ops = plan(KernelObjects(), observed)
        out += [f"error: {e}" for e in await kernel.apply(ops)]
        out.append(f"datapath: removed {len(ops)} objects")
    return out


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from svcnet.cli import UsageError

    try:
        with urllib.request.urlopen(args.url.rstrip("/") + "/status", timeout=5) as resp:
            status = json.loads(resp.read())
    except OSError as unreachable:
        raise UsageError(f"cannot reach the overlay daemon at {args.url}: {unreachable}"
                         ) from None
    cmp = asyncio.run(compare(status, args.netns or None))
    pending, rules = cmp.ops, cmp.chains
    if args.json:
        print(json.dumps({"status": status, "pending": pending, "pending_chains": rules}))
        return 0 if not pending and not rules else 1
    lease = status.get("lease", {})
    print(f"node {status['node']}: {'ready' if status['ready'] else 'NOT READY'}, "
          f"subnets {', '.join(lease.get('subnets', []))}, backend {lease.get('backend')}, "
          f"mtu {lease.get('mtu')}, {status['syncs']} syncs, last "
          f"{status['last_sync_seconds'] * 1000:.1f} ms")
    print(f"{'SUBNET':<28} {'PUBLIC IP':<24} {'VTEP MAC':<18} {'PATH':<7} NODE")
    for p in status.get("peers", []):
        print(f"{p['subnet']:<28} {p['public_ip']:<24} {p['vtep_mac'] or '-':<18} "
              f"{'direct' if p['direct'] else 'vxlan':<7} {p['node'] or '-'}")
    for route in (status.get("desired") or {}).get("routes", []):
        if route.get("kind") == "blackhole":
            print(f"blackhole {route['dst']}: drops pod traffic that no peer route matches")
    for line in status.get("skipped", []):
        print(f"skipped: {line}")
    for err in status.get("last_errors", []):
        print(f"error: {err}")
    print(f"kernel holds {cmp.held}; desired {cmp.wanted}")
    if not pending and not rules:
        print("kernel: in sync with desired state")
        return 0
    print(f"kernel: {len(pending)} differences from desired state")
    for op in pending:
        what = {"add": "missing", "del": "stale"}.get(op.split(" ", 1)[0], "differs")
        print(f"  {what}: {op}")
    for line in rules:
        print(f"  firewall ({status.get('firewall') or 'iptables'}): {line}")
    return 1


@dataclass(frozen=True, slots=True)
class Comparison:
    ops: list[str]
    chains: list[str]
    held: str
    wanted: str


def _counts(objects: Any) -> str:
    holes = sum(1 for r in objects.routes if r.blackhole)
    return (f"{len(objects.links)} links, {len(objects.routes) - holes} routes, "
            f"{holes} blackhole, "
            f"{len(objects.neighbours)} neighbours, {len(objects.fdb)} FDB entries")


async def pending_changes(status: dict[str, Any], netns: str | None
                          ) -> tuple[list[str], list[str]]:
    """Differences between the kernel and a daemon's ``/status`` desired state, as op text."""
    cmp = await compare(status, netns)
    return cmp.ops, cmp.chains


async def compare(status: dict[str, Any], netns: str | None) -> Comparison:
    """Read the kernel and diff it against the daemon's desired state."""
    from svcnet.cni.overlay.desired import (
        Address,
        Desired,
        FdbEntry,
        KernelObjects,
        Neighbour,
        Route,
        TrafficRules,
        VxlanLink,
    )
    from svcnet.cni.overlay.firewall import make_firewall
    from svcnet.cni.overlay.netlink import IpCommandNetlink
    from svcnet.cni.overlay.reconcile import Reconciler

    d = status.get("desired") or {}
    kernel = KernelObjects(
        links=frozenset(VxlanLink(**{**x, "offloads": tuple(x.get("offloads", ()))})
                        for x in d.get("links", [])),
        addresses=frozenset(Address(**x) for x in d.get("addresses", [])),
        neighbours=frozenset(Neighbour(**x) for x in d.get("neighbours", [])),
        fdb=frozenset(FdbEntry(**x) for x in d.get("fdb", [])),
        routes=frozenset(Route(**x) for x in d.get("routes", [])),
    )
    rules = tuple(TrafficRules(**r) for r in d.get("rules", []))
    desired = Desired(kernel=kernel, rules=rules, peers=(), mtu=0)
    firewall = make_firewall(status.get("firewall") or "iptables", netns)
    reconciler = Reconciler(IpCommandNetlink(netns), firewall)
    try:
        observed, ops, differ = await reconciler.pending(desired)
    except OSError as failure:
        print(f"cannot read the kernel: {failure}", file=sys.stderr)
        return Comparison([f"unknown: {failure}"], [], "unknown", _counts(kernel))
    return Comparison([str(op) for op in ops], differ,
                      _counts(observed.objects), _counts(kernel))
