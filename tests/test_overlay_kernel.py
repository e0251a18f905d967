"""The kernel adapter on a real kernel: batched ``ip``/``bridge`` and direct rtnetlink writes
must leave identical state, which ``observe`` reads back exactly as desired."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

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
    require_binary("ip", "bridge", "ethtool")
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
        assert len(want.kernel.routes) == 2 * 29 + 2  # and a blackhole per family
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
        # Offloads someone turned off (Flannel's checksum workaround) are turned back on.
        ns_sh(ns, "ethtool", "-K", "flannel.1", "tx-checksum-ip-generic", "off", "gro", "off")
        drifted = await kernel.observe(devices)
        assert [link.offloads for link in drifted.objects.links if link.name == "flannel.1"
                ] == [()]
        fix = plan(want.kernel, drifted)
        assert [(op.verb, getattr(op.obj, "name", "")) for op in fix] == [("set", "flannel.1")]
        assert not await kernel.apply(fix)
        assert (await kernel.observe(devices)).objects == want.kernel
        fewer = compute_desired(config, peers[0], peers[:10], underlay, "n1")
        assert not await kernel.apply(plan(fewer.kernel, seen))
        assert (await kernel.observe(devices)).objects == fewer.kernel

    asyncio.run(main())


def test_masquerade_chains_round_trip_through_iptables(netns: Callable[[str], str]) -> None:
    """Our rule text is exactly what iptables-save prints, so a second sync finds nothing to
    do; the jumps are inserted once; drift is reported and healed; rules no longer wanted
    are removed; other rules in the built-in chains are left alone."""
    require_binary("iptables-restore", "ip6tables-restore")
    from svcnet.cni.overlay.iptables import IptablesFirewall

    ns = netns("fw")
    ns_sh(ns, "iptables", "-A", "FORWARD", "-s", "192.0.2.0/24", "-j", "DROP")
    config = parse_network_config(CONF)
    rules = compute_desired(config, lease(1, "10.99.0.1"), (), _underlay(), "n1").rules
    assert {r.family for r in rules} == {4, 6} and all(r.notrack_ip for r in rules)

    async def main() -> None:
        fw = IptablesFirewall(ns)
        assert len(await fw.diff(rules)) == 16  # 2 families x 4 chains x (rules, jump)
        assert await fw.sync(rules) == (16, [])
        assert await fw.diff(rules) == []
        assert await fw.sync(rules) == (0, [])
        ns_sh(ns, "iptables", "-t", "nat", "-A", "SVCNET-OVL-POSTRTG", "-j", "RETURN")
        ns_sh(ns, "ip6tables", "-t", "raw", "-D", "OUTPUT", "-m", "comment", "--comment",
              "svcnet overlay", "-j", "SVCNET-OVL-RAW-OUT")
        assert sorted(await fw.diff(rules)) == [
            "IPv4 nat SVCNET-OVL-POSTRTG: rules differ",
            "IPv6 raw SVCNET-OVL-RAW-OUT: jump from OUTPUT missing"]
        assert await fw.sync(rules) == (2, [])
        assert await fw.diff(rules) == []
        no_masq = tuple(replace(r, masquerade=False) for r in rules)
        assert await fw.sync(no_masq) == (4, [])
        assert await fw.diff(no_masq) == []
        assert await fw.sync(()) == (4, [])

    asyncio.run(main())
    saved = ns_sh(ns, "iptables-save").stdout + ns_sh(ns, "ip6tables-save").stdout
    assert "-A FORWARD -s 192.0.2.0/24 -j DROP" in saved
    assert "SVCNET-OVL" not in saved


def test_nftables_table_round_trips_and_leaves_other_tables(
        netns: Callable[[str], str]) -> None:
    """The rendered table is exactly what ``nft list table`` prints; a second sync is a
    no-op; a changed rule is reported and healed; an empty rule set deletes our table and
    nothing else."""
    require_binary("nft")
    from svcnet.cni.overlay.nftables import NftablesFirewall

    ns = netns("nft")
    ns_sh(ns, "nft", "add", "table", "inet", "filter")
    config = parse_network_config(CONF)
    rules = compute_desired(config, lease(1, "10.99.0.1"), (), _underlay(), "n1").rules

    async def main() -> None:
        fw = NftablesFirewall(ns)
        assert await fw.diff(rules) == ["nftables inet svcnet-overlay: table missing"]
        assert await fw.sync(rules) == (1, [])
        assert await fw.diff(rules) == []
        assert await fw.sync(rules) == (0, [])
        ns_sh(ns, "nft", "add", "rule", "inet", "svcnet-overlay", "forward", "accept")
        assert await fw.diff(rules) == ["nftables inet svcnet-overlay: unexpected: accept"]
        assert await fw.sync(rules) == (1, [])
        assert await fw.diff(rules) == []
        assert await fw.sync(()) == (1, [])
        assert await fw.diff(()) == []

    asyncio.run(main())
    assert ns_sh(ns, "nft", "list", "tables").stdout.split() == ["table", "inet", "filter"]


def test_auto_backend_follows_the_host(netns: Callable[[str], str]) -> None:
    """auto: nothing on the host -> iptables; a native nft table -> nftables; our own
    rules keep a restart on the same backend; cleanup removes both backends' rules."""
    require_binary("nft", "iptables-restore")
    from svcnet.cni.overlay.cli import cleanup
    from svcnet.cni.overlay.firewall import detect_backend, make_firewall

    empty, native, mixed = netns("a"), netns("b"), netns("c")
    ns_sh(native, "nft", "add", "table", "inet", "filter")
    ns_sh(mixed, "nft", "add", "table", "inet", "filter")
    ns_sh(mixed, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    rules = compute_desired(parse_network_config(CONF), lease(1, "10.99.0.1"), (),
                            _underlay(), "n1").rules

    async def main() -> None:
        assert await detect_backend(empty) == "iptables"
        assert await detect_backend(native) == "nftables"
        assert await detect_backend(mixed) == "iptables"
        assert (await make_firewall("nftables", empty).sync(rules))[1] == []
        assert await detect_backend(empty) == "nftables", "our own table decides"
        assert (await make_firewall("iptables", empty).sync(rules))[1] == []
        assert await cleanup(empty) == ["iptables: removed 8 objects",
                                        "nftables: removed 1 objects"]
        assert await cleanup(empty) == ["iptables: removed 0 objects",
                                        "nftables: removed 0 objects"]

    asyncio.run(main())
    assert "svcnet" not in ns_sh(empty, "nft", "list", "ruleset").stdout


def _underlay() -> Underlay:
    return Underlay("eth0", 1500, "10.99.0.1", "fd99::1", ("10.99.0.0/24", "fd99::/64"))


def test_switching_backend_removes_the_other_backends_rules(netns: Callable[[str], str]) -> None:
    """A daemon started with another backend than the last run removes the old rules, so
    two rule sets never coexist."""
    require_binary("nft", "iptables-restore")
    from svcnet.cni.overlay.daemon import OverlayDaemon, OverlayOptions
    from svcnet.cni.overlay.firewall import make_firewall

    ns = netns("sw")
    rules = compute_desired(parse_network_config(CONF), lease(1, "10.99.0.1"), (),
                            _underlay(), "n1").rules

    async def main() -> None:
        assert (await make_firewall("iptables", ns).sync(rules))[1] == []
        daemon = OverlayDaemon(OverlayOptions(node_name="n1", masq_backend="nftables"))
        chosen = await daemon._choose_firewall(ns)
        assert chosen.name == "nftables"

    asyncio.run(main())
    assert "SVCNET-OVL" not in ns_sh(ns, "iptables-save").stdout
    assert "SVCNET-OVL" not in ns_sh(ns, "ip6tables-save").stdout


def test_cleanup_datapath_removes_devices_and_routes(netns: Callable[[str], str]) -> None:
    require_binary("ip", "bridge")
    from svcnet.cni.overlay.cli import cleanup

    ns = netns("cd")
    ns_sh(ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    for cmd in (["link", "set", "eth0", "up"], ["addr", "add", "10.99.0.1/24", "dev", "eth0"],
                ["addr", "add", "fd99::1/64", "dev", "eth0", "nodad"]):
        ns_sh(ns, "ip", *cmd)
    peers = (lease(1, "10.99.0.1"), lease(2, "10.99.0.2"), lease(40, "172.16.0.40", "fd98::40"))

    async def main() -> None:
        kernel = IpCommandNetlink(ns)
        want = compute_desired(parse_network_config(CONF), peers[0], peers,
                               await kernel.underlay("eth0"), "n1", ip_masq=False,
                               notrack=False)
        devices = frozenset(link.name for link in want.kernel.links)
        assert not await kernel.apply(plan(want.kernel, await kernel.observe(devices)))
        assert "blackhole 10.244.0.0/16 proto 205" in ns_sh(ns, "ip", "route").stdout
        messages = await cleanup(ns, datapath=True)
        assert messages[-1].startswith("datapath: removed ") and messages[-1] != \
            "datapath: removed 0 objects", messages

    asyncio.run(main())
    assert "flannel" not in ns_sh(ns, "ip", "link").stdout
    assert "blackhole" not in ns_sh(ns, "ip", "-6", "route").stdout
    assert not ns_sh(ns, "ip", "route", "show", "proto", "205").stdout.strip()
    assert not ns_sh(ns, "ip", "-6", "route", "show", "proto", "205").stdout.strip()
