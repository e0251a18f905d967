"""Desired kernel state as plain frozen data, computed once from the lease snapshot.

``compute_desired`` is the only place that decides what the node should hold: which peers
exist (``peers_from``), what the backend renders for them (``svcnet.cni.overlay.vxlan`` /
``hostgw``) and what the firewall rules must do. It is pure: the same snapshot always gives the
same ``Desired``, which is what makes the reconciler's diff meaningful and testable without a
kernel.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from svcnet.cni.overlay.config import IPNetwork, NetworkConfig
from svcnet.cni.overlay.lease import Lease, Snapshot

ROUTE_PROTO = 205
"""Routes we own carry this ``proto`` number, so departed peers' routes can be found."""

VXLAN_OFFLOADS = ("tx-checksum-ip-generic",)
"""Kernel defaults on a new VXLAN device that we insist on (see docs/overlay.md): with TX
checksum offload off (Flannel's documented workaround for NATed VXLAN packets, which our
notrack rules make unnecessary) pod-to-pod throughput here drops to ~0.1x of host-gw. GRO
and RX checksumming off showed no consistent effect, so they are left alone."""

KUBE_PROXY_MASQ_MARK = 0x4000
"""Packets kube-proxy will masquerade itself: our rules leave them alone."""


@dataclass(frozen=True, slots=True, order=True)
class VxlanLink:
    name: str
    vni: int
    port: int
    local: str
    underlay: str
    mtu: int
    mac: str
    offloads: tuple[str, ...] = ()
    """``ethtool`` features that must be on (sorted); empty: whatever the device has."""


@dataclass(frozen=True, slots=True, order=True)
class Address:
    dev: str
    cidr: str


@dataclass(frozen=True, slots=True, order=True)
class Neighbour:
    dev: str
    ip: str
    mac: str


@dataclass(frozen=True, slots=True, order=True)
class FdbEntry:
    dev: str
    mac: str
    dst: str


RouteKind = Literal["unicast", "blackhole"]


@dataclass(frozen=True, slots=True, order=True)
class Route:
    """A route we own. ``kind="blackhole"`` has no ``via`` and no ``dev``: the kernel drops
    what matches it, silently (see ``network_blackhole``)."""

    dst: str
    via: str
    dev: str
    onlink: bool = False
    kind: RouteKind = "unicast"

    @property
    def blackhole(self) -> bool:
        return self.kind == "blackhole"


@dataclass(frozen=True, slots=True)
class KernelObjects:
    """What the overlay owns in the kernel; the same shape for desired and observed state."""

    links: frozenset[VxlanLink] = frozenset()
    addresses: frozenset[Address] = frozenset()
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    routes: frozenset[Route] = frozenset()


@dataclass(frozen=True, slots=True, order=True)
class TrafficRules:
    """What our firewall rules say for one address family, before any backend renders them.

    ``masquerade``: Flannel's ``--ip-masq`` set -- pods reach the outside via SNAT, never
    each other, and the FORWARD chain accepts the cluster network. ``notrack_ip`` /
    ``notrack_port``: this node's VXLAN packets (UDP to the VXLAN port from or to our own
    VTEP address) bypass conntrack. An untracked packet can never be NATed, so the
    outer header of an encapsulated packet that still carries kube-proxy's masquerade mark
    keeps its source port and checksum (the bug behind Flannel users disabling TX checksum
    offload, which costs ~8-10x throughput here), and the tunnel's flows take no conntrack
    entries.
    """

    family: int
    network: str
    subnet: str
    masquerade: bool = True
    notrack_ip: str = ""
    notrack_port: int = 0

    @property
    def multicast(self) -> str:
        return "224.0.0.0/4" if self.family == 4 else "ff00::/8"


@dataclass(frozen=True, slots=True)
class Underlay:
    """The node's underlay interface as the kernel reports it."""

    name: str
    mtu: int
    ipv4: str = ""
    ipv6: str = ""
    prefixes: tuple[str, ...] = ()
    """Connected prefixes, to tell whether a peer is on the same L2 segment."""

    def on_link(self, ip: str) -> bool:
        if not ip:
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in ipaddress.ip_network(p, strict=False) for p in self.prefixes)


@dataclass(frozen=True, slots=True, order=True)
class Peer:
    """Another node's subnet in one address family and how to reach it."""

    subnet: str
    public_ip: str
    vtep_mac: str
    direct: bool
    node: str = ""


@dataclass(frozen=True, slots=True)
class Desired:
    kernel: KernelObjects
    rules: tuple[TrafficRules, ...]
    peers: tuple[Peer, ...]
    mtu: int
    skipped: tuple[str, ...] = field(default=())
    """Peers that cannot be reached with this backend, with the reason."""


def vtep_mac(node_name: str, device: str) -> str:
    """A locally administered unicast MAC derived from the node name.

    Stable across restarts and re-creations of the device, so peers' neighbour and FDB
    entries stay valid when a daemon restarts (Flannel persists a random one instead).
    """
    digest = hashlib.sha256(f"{node_name}/{device}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def device_name(family: int, vni: int) -> str:
    return f"flannel.{vni}" if family == 4 else f"flannel-v6.{vni}"


def is_overlay_device(name: str) -> bool:
    """Names only the overlay uses: a device of another VNI or backend is ours to remove."""
    return name.startswith(("flannel.", "flannel-v6."))


def vxlan_mtu(underlay: Underlay, family: int, override: int = 0) -> int:
    """Underlay MTU minus the VXLAN encapsulation: 50 bytes over IPv4, 70 over IPv6."""
    if override:
        return override
    return underlay.mtu - (50 if family == 4 else 70)


def peers_from(own: Lease, snapshot: Snapshot, family: int, underlay: Underlay,
               backend: str, *, prefer_direct: bool = False
               ) -> tuple[tuple[Peer, ...], tuple[str, ...]]:
    """This family's peers: every other lease of our backend type with usable data.

    A peer is ``direct`` (plain route, no encapsulation) when direct paths are wanted
    (host-gw, or VXLAN's ``DirectRouting``) and its public IP is on our underlay segment.
    """
    peers: list[Peer] = []
    skipped: list[str] = []
    own_subnet = own.subnet if family == 4 else own.subnet6
    for lease in sorted(snapshot, key=lambda le: le.key):
        subnet = lease.subnet if family == 4 else lease.subnet6
        if subnet is None or subnet == own_subnet:
            continue
        a = lease.attrs
        public = a.public_ip if family == 4 else a.public_ip6
        mac = a.vtep_mac if family == 4 else a.vtep_mac6
        if a.backend_type != backend:
            skipped.append(f"{subnet}: backend {a.backend_type}, we run {backend}")
            continue
        if not public:
            skipped.append(f"{subnet}: no IPv{family} public address")
            continue
        if backend == "vxlan" and not mac:
            skipped.append(f"{subnet}: no VTEP MAC")
            continue
        peers.append(Peer(subnet=str(subnet), public_ip=public, vtep_mac=mac,
                          direct=prefer_direct and underlay.on_link(public),
                          node=a.node_name))
    return tuple(peers), tuple(skipped)


def network_blackhole(network: IPNetwork) -> Route:
    """The catch-all for the whole cluster network, less specific than every peer's and our
    own subnet's route: pod traffic with no better route (the VXLAN device is being
    re-created and took its routes along, a departed node's subnet, before convergence) is
    dropped silently. Without it the node answers ICMP net-unreachable -- ``connect()``
    fails at once instead of retransmitting -- or, with a default route, sends pod traffic
    unencapsulated out of the underlay."""
    return Route(dst=str(network), via="", dev="", kind="blackhole")


def traffic_rules(config: NetworkConfig, own: Lease, underlay: Underlay, *, masquerade: bool,
                  notrack: bool) -> tuple[TrafficRules, ...]:
    """The firewall's job per family; a family with nothing to do gets no entry."""
    out: list[TrafficRules] = []
    vxlan = config.backend.type == "vxlan"
    for family, fam, subnet in ((4, config.ipv4, own.subnet), (6, config.ipv6, own.subnet6)):
        if fam is None or subnet is None:
            continue
        local = (underlay.ipv4 if family == 4 else underlay.ipv6) if vxlan and notrack else ""
        if masquerade or local:
            out.append(TrafficRules(family, str(fam.network), str(subnet), masquerade,
                                    local, config.backend.port if local else 0))
    return tuple(out)


def compute_desired(config: NetworkConfig, own: Lease, snapshot: Snapshot, underlay: Underlay,
                    node_name: str, *, ip_masq: bool = True, notrack: bool = True) -> Desired:
    from svcnet.cni.overlay import hostgw, vxlan

    backend = config.backend.type
    all_peers: list[Peer] = []
    skipped: list[str] = []
    kernel = KernelObjects()
    for family, subnet in ((4, own.subnet), (6, own.subnet6)):
        if subnet is None:
            continue
        peers, skip = peers_from(own, snapshot, family, underlay, backend,
                                 prefer_direct=backend == "host-gw"
                                 or config.backend.direct_routing)
        skipped.extend(skip)
        if backend == "vxlan":
            part = vxlan.render(config.backend, family, subnet, peers, underlay, node_name,
                                offloads=VXLAN_OFFLOADS if notrack else (),
                                mac=own.attrs.vtep_mac if family == 4 else own.attrs.vtep_mac6)
        else:
            part, skip = hostgw.render(family, peers, underlay)
            skipped.extend(skip)
        kernel = merge(kernel, part)
        fam = config.ipv4 if family == 4 else config.ipv6
        if fam is not None:
            kernel = merge(kernel, KernelObjects(routes=frozenset({
                network_blackhole(fam.network)})))
        all_peers.extend(peers)
    mtu = (min(vxlan_mtu(underlay, f, config.backend.mtu) for f in _families(own))
           if backend == "vxlan" else underlay.mtu)
    rules = traffic_rules(config, own, underlay, masquerade=ip_masq, notrack=notrack)
    return Desired(kernel=kernel, rules=rules,
                   peers=tuple(all_peers), mtu=mtu, skipped=tuple(skipped))


def _families(own: Lease) -> tuple[int, ...]:
    return tuple(f for f, s in ((4, own.subnet), (6, own.subnet6)) if s is not None)


def merge(a: KernelObjects, b: KernelObjects) -> KernelObjects:
    return KernelObjects(links=a.links | b.links, addresses=a.addresses | b.addresses,
                         neighbours=a.neighbours | b.neighbours, fdb=a.fdb | b.fdb,
                         routes=a.routes | b.routes)


def vtep_address(subnet: IPNetwork) -> str:
    """The VTEP's own address: the subnet's network address (``10.244.1.0``)."""
    return str(subnet.network_address)
