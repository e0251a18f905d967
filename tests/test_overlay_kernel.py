"""The kernel adapter on a real kernel: batched ``ip``/``bridge`` and direct rtnetlink writes
must leave identical state, which ``observe`` reads back exactly as desired."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from conftest import ns_sh, require_binary
from svcnet.cni.overlay.config import parse_network_config
from svcnet.cni.overlay.desired import Underlay, compute_desired
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


def test_masquerade_chains_round_trip_through_iptables(netns: Callable[[str], str]) -> None:
    """Our rule text is exactly what iptables-save prints, so a second sync finds nothing to
    do; the jumps are inserted once; other rules in the built-in chains are left alone."""
    require_binary("iptables-restore", "ip6tables-restore")
    from svcnet.cni.overlay.iptables import FakeFirewall, IptablesFirewall
    from svcnet.cni.overlay.reconcile import plan_chains

    ns = netns("fw")
    ns_sh(ns, "iptables", "-A", "FORWARD", "-s", "192.0.2.0/24", "-j", "DROP")
    config = parse_network_config(CONF)
    chains = compute_desired(config, lease(1, "10.99.0.1"), (), _underlay(), "n1").chains
    assert {c.family for c in chains} == {4, 6}

    async def main() -> None:
        fw = IptablesFirewall(ns)
        rewrite, jumps = plan_chains(chains, await fw.observe(chains))
        assert len(rewrite) == len(jumps) == 4
        assert not await fw.apply(rewrite, jumps)
        seen = await fw.observe(chains)
        assert plan_chains(chains, seen) == ([], []), seen
        fake = FakeFirewall()
        await fake.apply(rewrite, jumps)
        assert await fake.observe(chains) == seen
        stale = [c for c in chains if c.table == "nat" and c.family == 4]
        ns_sh(ns, "iptables", "-t", "nat", "-A", stale[0].chain, "-j", "RETURN")
        assert plan_chains(chains, await fw.observe(chains))[0] == stale
        assert not await fw.apply(stale, [])
        assert plan_chains(chains, await fw.observe(chains)) == ([], [])

    asyncio.run(main())
    saved = ns_sh(ns, "iptables-save", "-t", "filter").stdout
    assert "-A FORWARD -s 192.0.2.0/24 -j DROP" in saved
    assert saved.count("-j SVCNET-OVL-FWD") == 1


def _underlay() -> Underlay:
    return Underlay("eth0", 1500, "10.99.0.1", "fd99::1", ("10.99.0.0/24", "fd99::/64"))
