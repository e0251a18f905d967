"""The VXLAN backend: renders peers into a VTEP device, neighbours, FDB entries and routes.

Per peer, like Flannel's ``pkg/backend/vxlan``: a permanent neighbour (peer VTEP address ->
peer VTEP MAC), an FDB entry (peer VTEP MAC -> peer public IP) and an onlink route for the
peer's subnet via its VTEP address. With ``DirectRouting``, a peer on our L2 segment gets a
plain route via its public IP instead, skipping encapsulation.
"""

from __future__ import annotations

from svcnet.cni.overlay.config import BackendConfig, IPNetwork
from svcnet.cni.overlay.desired import (
    Address,
    FdbEntry,
    KernelObjects,
    Neighbour,
    Peer,
    Route,
    Underlay,
    VxlanLink,
    device_name,
    vtep_address,
    vtep_mac,
    vxlan_mtu,
)


def render(backend: BackendConfig, family: int, subnet: IPNetwork, peers: tuple[Peer, ...],
           underlay: Underlay, node_name: str, *, offloads: tuple[str, ...] = (),
           mac: str = "") -> KernelObjects:
    """``mac``: the VTEP MAC we publish (an adopted device's); default derived from the name."""
    dev = device_name(family, backend.vni)
    local = underlay.ipv4 if family == 4 else underlay.ipv6
    link = VxlanLink(name=dev, vni=backend.vni, port=backend.port, local=local,
                     underlay=underlay.name, mtu=vxlan_mtu(underlay, family, backend.mtu),
                     mac=mac or vtep_mac(node_name, dev), offloads=offloads)
    host_len = 32 if family == 4 else 128
    neighbours: set[Neighbour] = set()
    fdb: set[FdbEntry] = set()
    routes: set[Route] = set()
    for peer in peers:
        if peer.direct:
            routes.add(Route(dst=peer.subnet, via=peer.public_ip, dev=underlay.name))
            continue
        gateway = peer.subnet.split("/")[0]
        neighbours.add(Neighbour(dev=dev, ip=gateway, mac=peer.vtep_mac))
        fdb.add(FdbEntry(dev=dev, mac=peer.vtep_mac, dst=peer.public_ip))
        routes.add(Route(dst=peer.subnet, via=gateway, dev=dev, onlink=True))
    return KernelObjects(
        links=frozenset({link}),
        addresses=frozenset({Address(dev=dev, cidr=f"{vtep_address(subnet)}/{host_len}")}),
        neighbours=frozenset(neighbours), fdb=frozenset(fdb), routes=frozenset(routes),
    )
