"""The host-gw backend: one route per peer subnet via the peer's underlay address.

No encapsulation, so it needs every node on one L2 segment; a peer elsewhere is reported
as skipped rather than given a route the kernel would reject.
"""

from __future__ import annotations

from svcnet.cni.overlay.desired import KernelObjects, Peer, Route, Underlay


def render(family: int, peers: tuple[Peer, ...], underlay: Underlay
           ) -> tuple[KernelObjects, tuple[str, ...]]:
    routes: set[Route] = set()
    skipped: list[str] = []
    for peer in peers:
        if not peer.direct:
            skipped.append(f"{peer.subnet}: {peer.public_ip} is not on {underlay.name}'s "
                           "segment; host-gw needs one L2 network")
            continue
        routes.add(Route(dst=peer.subnet, via=peer.public_ip, dev=underlay.name))
    return KernelObjects(routes=frozenset(routes)), tuple(skipped)
