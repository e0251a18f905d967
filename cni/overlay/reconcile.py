"""Compare the kernel with the desired state and change only the difference.

``plan`` is pure: (desired, observed) -> ordered ops. The order keeps the datapath
consistent at every step: a peer's neighbour and FDB entry exist before its route is added,
and its route is gone before they are removed, so no packet is ever routed to a VTEP address
the kernel cannot resolve; the cluster network's blackhole route is added before everything
and removed after everything, so pod traffic always meets at least that route. Nothing is
flushed on start-up: a restarted daemon finds the kernel already right and changes nothing,
so pods lose no packets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from svcnet.cni.overlay.desired import Desired, KernelObjects, TrafficRules, VxlanLink
from svcnet.cni.overlay.firewall import Firewall
from svcnet.cni.overlay.netlink import Netlink, Observed, Op


def plan(desired: KernelObjects, observed: Observed) -> list[Op]:
    have = observed.objects
    want_links = {link.name: link for link in desired.links}
    have_links = {link.name: link for link in have.links}
    link_ops: list[Op] = [Op("del", got) for name, got in sorted(have_links.items())
                          if name not in want_links]
    fresh: set[str] = {op.obj.name for op in link_ops if isinstance(op.obj, VxlanLink)}
    for name, want in sorted(want_links.items()):
        got = have_links.get(name)
        if got is None:
            link_ops.append(Op("add", want))
            fresh.add(name)
        elif (got.vni, got.port, got.local, got.underlay, got.mac) != (
                want.vni, want.port, want.local, want.underlay, want.mac):
            # A MAC change makes the kernel flush even permanent neighbours, so a changed
            # MAC is a re-creation too: the plan then re-adds every entry of the device.
            link_ops += [Op("del", got), Op("add", want)]
            fresh.add(name)
        elif (got.mtu != want.mtu or not set(want.offloads) <= set(got.offloads)
              or name in observed.down):
            link_ops.append(Op("set", want))

    def alive(dev: str) -> bool:
        return dev not in fresh

    addresses = {a for a in have.addresses if alive(a.dev)}
    neighbours = {(n.dev, n.ip): n for n in have.neighbours if alive(n.dev)}
    fdb = {f for f in have.fdb if alive(f.dev)}
    routes = {r.dst: r for r in have.routes if alive(r.dev) and not r.blackhole}
    want_neigh = {(n.dev, n.ip): n for n in desired.neighbours}
    want_routes = {r.dst: r for r in desired.routes if not r.blackhole}
    holes = {r.dst: r for r in have.routes if r.blackhole}
    want_holes = {r.dst: r for r in desired.routes if r.blackhole}

    # Three batches at most (ip, bridge, ip); a pure add or a pure removal needs two. The
    # network's blackhole goes in first (it catches what a device re-creation or a departed
    # peer leaves without a route) and out last.
    ops = [Op("add", r) for dst, r in sorted(want_holes.items()) if holes.get(dst) != r]
    ops += link_ops
    ops += [Op("add", a) for a in sorted(desired.addresses - addresses)]
    ops += [Op("del", r) for dst, r in sorted(routes.items()) if dst not in want_routes]
    ops += [Op("del", n) for key, n in sorted(neighbours.items()) if key not in want_neigh]
    ops += [Op("del", f) for f in sorted(fdb - desired.fdb)]
    ops += [Op("add", f) for f in sorted(desired.fdb - fdb)]
    ops += [Op("add", n) for key, n in sorted(want_neigh.items()) if neighbours.get(key) != n]
    ops += [Op("add", r) for dst, r in sorted(want_routes.items()) if routes.get(dst) != r]
    ops += [Op("del", a) for a in sorted(addresses - desired.addresses)]
    ops += [Op("del", r) for dst, r in sorted(holes.items()) if dst not in want_holes]
    return ops


@dataclass(frozen=True, slots=True)
class SyncResult:
    ops: tuple[Op, ...]
    chains_rewritten: int
    """Firewall objects (iptables chains, or the nftables table) changed."""
    errors: tuple[str, ...]
    seconds: float

    @property
    def changed(self) -> bool:
        return bool(self.ops or self.chains_rewritten)


class Reconciler:
    """Observes, plans and applies.

    A full sync reads the kernel; a quick sync (for lease changes) diffs against what the
    last successful sync left in the kernel, which costs two ``ip``/``bridge`` runs instead of
    eight -- at 50 nodes that is the difference between 10 s and well under 2 s to converge
    on two shared cores. Drift is still found by the next full sync (periodic, link events,
    after any error).
    """

    def __init__(self, netlink: Netlink, firewall: Firewall) -> None:
        self.netlink = netlink
        self.firewall = firewall
        self.last_observed: Observed | None = None
        self._known: Observed | None = None
        self._known_rules: tuple[TrafficRules, ...] | None = None

    async def pending(self, desired: Desired) -> tuple[Observed, list[Op], list[str]]:
        """What a sync would change: kernel ops, and firewall differences in words."""
        devices = frozenset(link.name for link in desired.kernel.links)
        observed = await self.netlink.observe(devices)
        self.last_observed = observed
        return (observed, plan(desired.kernel, observed),
                await self.firewall.diff(desired.rules))

    async def sync(self, desired: Desired, *, full: bool = True) -> SyncResult:
        started = time.monotonic()
        devices = frozenset(link.name for link in desired.kernel.links)
        if full or self._known is None:
            observed = await self.netlink.observe(devices)
            self.last_observed = observed
        else:
            observed = self._known
        ops = plan(desired.kernel, observed)
        errors = await self.netlink.apply(ops) if ops else []
        rewritten = 0
        if full or self._known_rules != desired.rules:
            rewritten, failed = await self.firewall.sync(desired.rules)
            errors += failed
        ok = not errors
        self._known = Observed(desired.kernel) if ok else None
        self._known_rules = desired.rules if ok else None
        return SyncResult(tuple(ops), rewritten, tuple(errors), time.monotonic() - started)
