"""The kernel adapter on a real kernel: batched ``ip``/``bridge`` and direct rtnetlink writes
must leave identical state, which ``observe`` reads back exactly as desired."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from conftest import ns_sh, require_binary
from svcnet.cni.overlay.config import parse_network_config
from svcnet.cni.overlay.desired import compute_desired
from svcnet.cni.overlay.lease import Lease, LeaseAttrs
from svcnet.cni.overlay.netlink import FakeNetlink, IpCommandNetlink
from svcnet.cni.overlay.reconcile import plan

pytestmark = pytest.mark.kernel

CONF = (b'{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:1::/56",'
        b' "IPv6SubnetLen": 64, "Backend": {"Type": "vxlan", "DirectRouting": true}}')


def lease(n: int, public: str, public6: str = "") -> Lease:
    import ipaddress

    return Lease(ipaddress.IPv4Network(f"10.244.{n}.0/24"),
                 ipaddress.IPv6Network(f"fd00:1:0:{n}::/64"),
                 LeaseAttrs(public_ip=public, public_ip6=public6 or f"fd99::{n}",
                            vtep_mac=f"02:00:00:00:04:{n:02x}",
                            vtep_mac6=f"02:00:00:00:06:{n:02x}", node_name=f"n{n}"))


@pytest.mark.parametrize("native", [True, False], ids=["rtnetlink", "ip-batch"])
def test_apply_then_observe_round_trips(netns: Callable[[str], str], native: bool) -> None:
    require_binary("ip", "bridge")
    ns = netns("k")
    ns_sh(ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    for cmd in (["link", "set", "eth0", "up"], ["addr", "add", "10.99.0.1/24", "dev", "eth0"],
                ["addr", "add", "fd99::1/64", "dev", "eth0", "nodad"]):
        ns_sh(ns, "ip", *cmd)
    config = parse_network_config(CONF)
    peers = (lease(1, "10.99.0.1"), *(lease(n, f"10.99.0.{n}") for n in range(2, 30)),
             lease(40, "172.16.0.40", "fd98::40"))

    async def main() -> None:
        kernel = IpCommandNetlink(ns, native=native)
        underlay = await kernel.underlay("eth0")
        assert underlay.ipv4 == "10.99.0.1" and underlay.mtu == 1500
        want = compute_desired(config, peers[0], peers, underlay, "n1")
        assert len(want.kernel.routes) == 2 * 29
        assert len(want.kernel.neighbours) == 2  # only the peer behind a router: 4 and 6
        devices = frozenset(link.name for link in want.kernel.links)
        ops = plan(want.kernel, await kernel.observe(devices))
        assert not await kernel.apply(ops)
        seen = await kernel.observe(devices)
        assert seen.objects == want.kernel and not seen.down
        fake = FakeNetlink(iface=underlay)
        assert not await fake.apply(ops)
        assert (await fake.observe(devices)) == seen, "the fake must match the kernel"
        assert plan(want.kernel, seen) == []
        fewer = compute_desired(config, peers[0], peers[:10], underlay, "n1")
        assert not await kernel.apply(plan(fewer.kernel, seen))
        assert (await kernel.observe(devices)).objects == fewer.kernel

    asyncio.run(main())
