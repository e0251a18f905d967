"""Overlay logic against fakes: config, subnet choice, desired state, the reconcile plan."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from svcnet.cni.overlay.config import ConfigError, NetworkConfig, parse_network_config
from svcnet.cni.overlay.daemon import OverlayDaemon, OverlayOptions, previous_subnets
from svcnet.cni.overlay.desired import (
    FdbEntry,
    Neighbour,
    Route,
    TrafficRules,
    Underlay,
    compute_desired,
    vtep_mac,
)
from svcnet.cni.overlay.firewall import FakeFirewall
from svcnet.cni.overlay.iptables import parse_saved, plan_chains, render_chains, restore_text
from svcnet.cni.overlay.lease import (
    Lease,
    LeaseAttrs,
    MemoryLeaseRegistry,
    MemorySubnetManager,
    OutOfSubnets,
)
from svcnet.cni.overlay.netlink import FakeNetlink, Op, command_lines
from svcnet.cni.overlay.reconcile import Reconciler, plan

NET = b'{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'
BLACKHOLE = Route("10.244.0.0/16", "", "", kind="blackhole")
UNDERLAY = Underlay("eth0", 1500, "192.168.0.1", "", ("192.168.0.0/24",))


def lease(n: int, backend: str = "vxlan") -> Lease:
    return Lease(ipaddress.IPv4Network(f"10.244.{n}.0/24"), None,
                 LeaseAttrs(public_ip=f"192.168.0.{n}", backend_type=backend,
                            vtep_mac=vtep_mac(f"n{n}", "flannel.1"), node_name=f"n{n}"))


def test_config_defaults_follow_flannel() -> None:
    cfg = parse_network_config(NET)
    assert cfg.ipv4 is not None
    assert str(cfg.ipv4.subnet_min) == "10.244.1.0/24"
    assert str(cfg.ipv4.subnet_max) == "10.244.255.0/24"
    assert cfg.ipv4.count == 255
    assert cfg.backend.port == 8472 and cfg.backend.vni == 1
    assert parse_network_config(cfg.to_json()) == cfg


@pytest.mark.parametrize("doc, message", [
    (b'{"Network": "10.244.0.0/16", "SubnetLen": 8}', "SubnetLen"),
    (b'{"Network": "nonsense"}', "Network"),
    (b'{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}', "Backend.Type"),
    (b'{"Network": "10.244.0.0/16", "SubnetMin": "10.9.0.0"}', "outside"),
    (b'{}', "needs Network"),
])
def test_config_errors_name_the_field(doc: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_network_config(doc)


def test_memory_leases_are_distinct_reused_and_run_out() -> None:
    cfg = parse_network_config(b'{"Network": "10.0.0.0/22", "SubnetLen": 24}')

    async def main() -> None:
        reg = MemoryLeaseRegistry(cfg)
        got = [await MemorySubnetManager(reg).acquire(cfg, LeaseAttrs(public_ip=f"1.1.1.{i}"))
               for i in range(3)]
        assert len({le.subnet for le in got}) == 3
        again = await MemorySubnetManager(reg).acquire(cfg, LeaseAttrs(public_ip="1.1.1.1"))
        assert again.subnet == got[1].subnet
        with pytest.raises(OutOfSubnets, match="out of subnets: all 3 /24 subnets"):
            await MemorySubnetManager(reg).acquire(cfg, LeaseAttrs(public_ip="1.1.1.9"))

    asyncio.run(main())


def test_lease_json_is_flannels_shape() -> None:
    le = lease(3)
    assert le.key == "10.244.3.0-24"
    assert le.to_json().startswith(b'{"PublicIP":"192.168.0.3","BackendType":"vxlan",'
                                   b'"BackendData":{"VNI":1,"VtepMAC":"02:')
    assert Lease.from_etcd(le.key, le.to_json()) == le


def test_desired_vxlan_has_neighbour_fdb_and_onlink_route_per_peer() -> None:
    cfg = parse_network_config(NET)
    d = compute_desired(cfg, lease(1), (lease(1), lease(2), lease(3)), UNDERLAY, "n1")
    (link,) = d.kernel.links
    assert (link.name, link.mtu, link.port, link.local) == ("flannel.1", 1450, 8472,
                                                           "192.168.0.1")
    assert link.mac == vtep_mac("n1", "flannel.1")
    assert Route("10.244.2.0/24", "10.244.2.0", "flannel.1", True) in d.kernel.routes
    assert Neighbour("flannel.1", "10.244.3.0", lease(3).attrs.vtep_mac) in d.kernel.neighbours
    assert FdbEntry("flannel.1", lease(3).attrs.vtep_mac, "192.168.0.3") in d.kernel.fdb
    assert BLACKHOLE in d.kernel.routes
    assert len(d.kernel.routes) == 3 and d.mtu == 1450


def test_direct_routing_and_host_gw_use_plain_routes() -> None:
    direct = parse_network_config(b'{"Network": "10.244.0.0/16", "Backend": '
                                  b'{"Type": "vxlan", "DirectRouting": true}}')
    d = compute_desired(direct, lease(1), (lease(1), lease(2)), UNDERLAY, "n1")
    assert d.kernel.routes == {Route("10.244.2.0/24", "192.168.0.2", "eth0"), BLACKHOLE}
    assert not d.kernel.neighbours
    hostgw = parse_network_config(b'{"Network": "10.244.0.0/16", "Backend": '
                                  b'{"Type": "host-gw"}}')
    far = Lease(ipaddress.IPv4Network("10.244.9.0/24"), None,
                LeaseAttrs(public_ip="172.16.0.9", backend_type="host-gw"))
    d = compute_desired(hostgw, lease(1, "host-gw"), (lease(2, "host-gw"), far), UNDERLAY, "n1")
    assert d.kernel.routes == {Route("10.244.2.0/24", "192.168.0.2", "eth0"), BLACKHOLE}
    assert not d.kernel.links and d.mtu == 1500
    assert any("172.16.0.9" in s for s in d.skipped)


def test_masquerade_rules_render_as_one_restore() -> None:
    d = compute_desired(parse_network_config(NET), lease(1), (), UNDERLAY, "n1")
    assert d.rules == (TrafficRules(4, "10.244.0.0/16", "10.244.1.0/24", True,
                                    "192.168.0.1", 8472),)
    chains = render_chains(d.rules)
    text = restore_text(plan_chains(chains, {}))
    assert "-A SVCNET-OVL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4" in text
    assert "! -s 10.244.0.0/16 -d 10.244.1.0/24" in text
    assert '-I FORWARD 1 -m comment --comment "svcnet overlay" -j SVCNET-OVL-FWD' in text
    assert ("-A SVCNET-OVL-RAW-PRE -d 192.168.0.1/32 -p udp -m udp --dport 8472 "
            '-m comment --comment "svcnet overlay" -j NOTRACK') in text
    assert "-I OUTPUT 1 " in text and "-I PREROUTING 1 " in text
    assert text.count("COMMIT") == 3
    # No masquerade and no notrack: nothing to render, and our old chains are stale.
    quiet = compute_desired(parse_network_config(NET), lease(1), (), UNDERLAY, "n1",
                            ip_masq=False, notrack=False)
    assert quiet.rules == ()
    saved = parse_saved(4, "*nat\n:POSTROUTING ACCEPT [0:0]\n:SVCNET-OVL-POSTRTG - [0:0]\n"
                        '-A POSTROUTING -m comment --comment "svcnet overlay" '
                        "-j SVCNET-OVL-POSTRTG\n-A SVCNET-OVL-POSTRTG -j RETURN\nCOMMIT\n")
    plan_ = plan_chains(render_chains(quiet.rules), saved)
    assert [str(c) for c in plan_.stale] == ["IPv4 nat SVCNET-OVL-POSTRTG"]
    assert restore_text(plan_).splitlines() == [
        "*nat", '-D POSTROUTING -m comment --comment "svcnet overlay" -j SVCNET-OVL-POSTRTG',
        "-F SVCNET-OVL-POSTRTG", "-X SVCNET-OVL-POSTRTG", "COMMIT"]


def test_nftables_table_renders_like_nft_lists_it() -> None:
    from svcnet.cni.overlay.nftables import differences, render, script

    cfg = parse_network_config(b'{"Network": "10.244.0.0/16", "EnableIPv6": true, '
                               b'"IPv6Network": "fd00:1::/56", "IPv6SubnetLen": 64}')
    own = Lease(ipaddress.IPv4Network("10.244.1.0/24"), ipaddress.IPv6Network("fd00:1::/64"),
                LeaseAttrs(public_ip="192.168.0.1"))
    dual = Underlay("eth0", 1500, "192.168.0.1", "fd99::1", ("192.168.0.0/24", "fd99::/64"))
    lines = render(compute_desired(cfg, own, (), dual, "n1").rules)
    assert lines[0] == "table inet svcnet-overlay {" and lines[-1] == "}"
    assert "meta mark & 0x00004000 == 0x00004000 return" in lines
    assert "ip6 saddr fd00:1::/56 ip6 daddr != ff00::/8 masquerade fully-random" in lines
    assert "ip daddr 192.168.0.1 udp dport 8472 notrack" in lines
    assert "ip6 saddr fd99::1 udp dport 8472 notrack" in lines
    assert differences(lines, lines) == []
    assert differences(lines, None) == ["nftables inet svcnet-overlay: table missing"]
    assert differences([], lines) == ["nftables inet svcnet-overlay: not wanted"]
    assert differences(lines, lines[:-3] + lines[-2:]) == [
        f"nftables inet svcnet-overlay: missing: {lines[-3]}"]
    assert script([]).splitlines() == ["add table inet svcnet-overlay",
                                       "delete table inet svcnet-overlay"]
    host_gw = compute_desired(parse_network_config(
        b'{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}'), own, (), dual, "n1")
    assert not any("notrack" in ln for ln in render(host_gw.rules)), "no VXLAN, no notrack"


def _kinds(ops: list[Op]) -> list[str]:
    def name(o: object) -> str:
        return "Blackhole" if isinstance(o, Route) and o.blackhole else type(o).__name__

    return [f"{op.verb} {name(op.obj)}" for op in ops]


def test_plan_orders_neighbours_before_routes_and_routes_before_removal() -> None:
    cfg = parse_network_config(NET)
    fake, fw = FakeNetlink(iface=UNDERLAY), FakeFirewall()
    rec = Reconciler(fake, fw)

    async def main() -> None:
        three = compute_desired(cfg, lease(1), (lease(1), lease(2), lease(3)), UNDERLAY, "n1")
        first = await rec.sync(three)
        kinds = _kinds(list(first.ops))
        assert kinds.index("add Neighbour") < kinds.index("add Route")
        assert kinds.index("add FdbEntry") < kinds.index("add Route")
        assert first.ops[0] == Op("add", BLACKHOLE), "the blackhole goes in before anything"
        assert first.chains_rewritten == 1 and not first.errors
        assert not (await rec.sync(three)).changed, "a second sync must change nothing"
        two = compute_desired(cfg, lease(1), (lease(1), lease(2)), UNDERLAY, "n1")
        gone = await rec.sync(two)
        assert _kinds(list(gone.ops)) == ["del Route", "del Neighbour", "del FdbEntry"]
        assert fake.state == two.kernel

    asyncio.run(main())


def test_deleted_device_is_recreated_with_its_entries() -> None:
    cfg = parse_network_config(NET)
    fake = FakeNetlink(iface=UNDERLAY)
    d = compute_desired(cfg, lease(1), (lease(1), lease(2)), UNDERLAY, "n1")

    async def main() -> None:
        rec = Reconciler(fake, FakeFirewall())
        await rec.sync(d)
        (link,) = d.kernel.links
        await fake.apply([Op("del", link)])
        assert fake.state.routes == {BLACKHOLE}, "the blackhole outlives the device"
        healed = await rec.sync(d)
        assert _kinds(list(healed.ops))[0] == "add VxlanLink"
        assert Op("add", BLACKHOLE) not in healed.ops
        assert fake.state == d.kernel

    asyncio.run(main())


def test_changed_vni_recreates_and_mtu_change_only_sets() -> None:
    cfg = parse_network_config(NET)
    d = compute_desired(cfg, lease(1), (lease(1),), UNDERLAY, "n1")
    (link,) = d.kernel.links
    from dataclasses import replace

    fake = FakeNetlink(iface=UNDERLAY)

    async def main() -> None:
        await fake.apply([Op("add", replace(link, vni=7)), Op("add", *d.kernel.addresses)])
        ops = plan(d.kernel, await fake.observe(frozenset({link.name})))
        assert _kinds(ops)[:3] == ["add Blackhole", "del VxlanLink", "add VxlanLink"]
        await fake.apply(ops)
        await fake.apply([Op("add", replace(link, mtu=1300))])
        fake.state = replace(fake.state, links=frozenset({replace(link, mtu=1300)}))
        ops = plan(d.kernel, await fake.observe(frozenset({link.name})))
        assert [(op.verb, type(op.obj).__name__) for op in ops] == [("set", "VxlanLink")]

    asyncio.run(main())


def test_offloads_are_enforced_only_when_wanted() -> None:
    """Offloads are a floor: missing ones are set; with enforcement off (no notrack), what
    the device has is left alone and a sync plans nothing."""
    from dataclasses import replace

    from svcnet.cni.overlay.netlink import Observed

    cfg = parse_network_config(NET)
    for notrack in (True, False):
        want = compute_desired(cfg, lease(1), (lease(1), lease(2)), UNDERLAY, "n1",
                               notrack=notrack).kernel
        (link,) = want.links
        assert bool(link.offloads) == notrack
        on = replace(want, links=frozenset({replace(link, offloads=(
            "generic-receive-offload", "tx-checksum-ip-generic"))}))
        assert plan(want, Observed(on)) == []
        off = replace(want, links=frozenset({replace(link, offloads=())}))
        assert [op.verb for op in plan(want, Observed(off))] == (["set"] if notrack else [])


def test_command_lines_are_ip_batch_syntax() -> None:
    link = next(iter(compute_desired(parse_network_config(NET), lease(1), (), UNDERLAY,
                                     "n1").kernel.links))
    assert command_lines(Op("add", link))[0].endswith(
        "type vxlan id 1 local 192.168.0.1 dev eth0 dstport 8472 nolearning")
    assert command_lines(Op("add", Route("10.244.2.0/24", "10.244.2.0", "flannel.1", True))
                         ) == ["route replace 10.244.2.0/24 via 10.244.2.0 dev flannel.1 "
                               "onlink proto 205"]
    assert command_lines(Op("add", BLACKHOLE)) == [
        "route replace blackhole 10.244.0.0/16 proto 205"]
    assert command_lines(Op("del", BLACKHOLE)) == ["route del blackhole 10.244.0.0/16 proto 205"]
    assert command_lines(Op("del", FdbEntry("flannel.1", "02:00:00:00:00:01", "1.2.3.4"))
                         ) == ["fdb del 02:00:00:00:00:01 dev flannel.1 dst 1.2.3.4 self"]


def test_daemons_share_leases_and_write_subnet_env_after_sync(tmp_path: Path) -> None:
    cfg_file = tmp_path / "net-conf.json"
    cfg_file.write_bytes(NET)
    reg = MemoryLeaseRegistry(parse_network_config(NET))

    async def main() -> None:
        daemons, fakes, tasks = [], [], []
        for i in (1, 2, 3):
            fake = FakeNetlink(iface=Underlay("eth0", 1500, f"192.168.0.{i}", "",
                                              ("192.168.0.0/24",)))
            opts = OverlayOptions(node_name=f"n{i}", config_file=str(cfg_file),
                                  subnet_file=str(tmp_path / f"n{i}.env"), listen="",
                                  resync=0.05, watch_links=False)
            d = OverlayDaemon(opts, netlink=fake, firewall=FakeFirewall(),
                              manager=MemorySubnetManager(reg))
            daemons.append(d)
            fakes.append(fake)
            tasks.append(asyncio.create_task(d.run(None, None)))
            await asyncio.wait_for(d.ready.wait(), 5)
            env = (tmp_path / f"n{i}.env").read_text()
            assert "FLANNEL_NETWORK=10.244.0.0/16\n" in env and "FLANNEL_MTU=1450\n" in env
            assert fake.state.links, "subnet.env must only appear once the datapath exists"
        for _ in range(100):
            if all(len(f.state.routes) == 3 for f in fakes):
                break
            await asyncio.sleep(0.02)
        assert all(len(f.state.routes) == 3 for f in fakes)  # a peer each, and the blackhole
        subnet = previous_subnets(str(tmp_path / "n1.env"))
        assert subnet and reg.leases[f"{subnet[0].network_address}-24"].attrs.node_name == "n1"
        await reg.set(None, remove=f"{subnet[0].network_address}-24")
        for _ in range(100):
            if all(len(f.state.routes) == 2 for f in fakes[1:]):
                break
            await asyncio.sleep(0.02)
        assert all(len(f.state.routes) == 2 for f in fakes[1:])
        assert all(BLACKHOLE in f.state.routes for f in fakes[1:])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def test_device_of_an_old_vni_is_removed_with_its_routes() -> None:
    from dataclasses import replace

    cfg = parse_network_config(NET)
    old = compute_desired(replace(cfg, backend=replace(cfg.backend, vni=9)), lease(1),
                          (lease(1), lease(2)), UNDERLAY, "n1")
    new = compute_desired(cfg, lease(1), (lease(1), lease(2)), UNDERLAY, "n1")
    fake = FakeNetlink(iface=UNDERLAY)

    async def main() -> None:
        rec = Reconciler(fake, FakeFirewall())
        await rec.sync(old)
        assert {link.name for link in fake.state.links} == {"flannel.9"}
        result = await rec.sync(new)
        assert _kinds(list(result.ops))[:2] == ["del VxlanLink", "add VxlanLink"]
        assert not result.errors and fake.state == new.kernel

    asyncio.run(main())


def test_ipv6_only_network() -> None:
    cfg = parse_network_config(b'{"EnableIPv4": false, "EnableIPv6": true, '
                               b'"IPv6Network": "fd00:1::/56", "IPv6SubnetLen": 64}')
    assert cfg.ipv4 is None and cfg.ipv6 is not None
    underlay = Underlay("eth0", 1500, "", "fd99::1", ("fd99::/64",))

    def v6(n: int) -> Lease:
        return Lease(None, ipaddress.IPv6Network(f"fd00:1:0:{n}::/64"),
                     LeaseAttrs(public_ip6=f"fd99::{n}",
                                vtep_mac6=vtep_mac(f"n{n}", "flannel-v6.1")))

    assert v6(2).key == "fd00:1:0:2::-64"
    assert Lease.from_etcd(v6(2).key, v6(2).to_json()) == v6(2)
    d = compute_desired(cfg, v6(1), (v6(1), v6(2)), underlay, "n1")
    (link,) = d.kernel.links
    assert (link.name, link.mtu, link.local) == ("flannel-v6.1", 1430, "fd99::1")
    assert Route("fd00:1:0:2::/64", "fd00:1:0:2::", "flannel-v6.1", True) in d.kernel.routes
    assert Route("fd00:1::/56", "", "", kind="blackhole") in d.kernel.routes
    assert BLACKHOLE not in d.kernel.routes
    assert [r.family for r in d.rules] == [6]
    assert "ff00::/8" in render_chains(d.rules)[0].rules[3]


def test_daemon_waits_out_an_unreachable_store(tmp_path: Path) -> None:
    from svcnet.store.base import Unavailable

    reg = MemoryLeaseRegistry(parse_network_config(NET))

    class Flaky(MemorySubnetManager):
        failures = 2

        async def network_config(self) -> NetworkConfig:
            if Flaky.failures:
                Flaky.failures -= 1
                raise Unavailable("etcd: no member reachable")
            return await super().network_config()

    async def main() -> None:
        d = OverlayDaemon(OverlayOptions(node_name="n1", listen="", watch_links=False,
                                         subnet_file=str(tmp_path / "env")),
                          netlink=FakeNetlink(iface=UNDERLAY), firewall=FakeFirewall(),
                          manager=Flaky(reg))
        task = asyncio.create_task(d.run(None, None))
        try:
            await asyncio.wait_for(d.ready.wait(), 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert Flaky.failures == 0 and "FLANNEL_SUBNET=10.244." in (tmp_path / "env").read_text()

    asyncio.run(main())


def test_kube_subnet_manager_over_a_memory_store() -> None:
    from svcnet.cni.overlay.lease import KubeSubnetManager, LeaseError

    from svcnet.model import NODE
    from svcnet.store.memory import MemoryStore
    from svcnet.watch import InformerFactory

    async def main() -> None:
        store = MemoryStore()
        for i in (1, 2):
            await store.put(NODE, {"apiVersion": "v1", "kind": "Node",
                                   "metadata": {"name": f"n{i}", "labels": {"keep": "me"}},
                                   "spec": {"podCIDR": f"10.244.{i}.0/24"}})
        informer = InformerFactory(store).informer(NODE)
        cfg = parse_network_config(NET)
        managers = [KubeSubnetManager(store, informer, f"n{i}", cfg, wait_timeout=2)
                    for i in (1, 2)]
        try:
            for i, mgr in enumerate(managers, 1):
                got = await mgr.acquire(cfg, LeaseAttrs(public_ip=f"192.168.0.{i}",
                                                        vtep_mac=f"02:00:00:00:00:0{i}"))
                assert str(got.subnet) == f"10.244.{i}.0/24" and got.attrs.node_name == f"n{i}"
            snapshots = managers[0].watch()
            for _ in range(50):
                snap = await asyncio.wait_for(anext(snapshots), 2)
                if len(snap) == 2:
                    break
            assert {le.attrs.public_ip for le in snap} == {"192.168.0.1", "192.168.0.2"}
            raw = next(r for r in (await store.list(NODE)).items if r.name == "n1")
            assert b'"keep":"me"' in raw.data.replace(b" ", b""), "no field may be lost"
            dual = parse_network_config(b'{"Network": "10.244.0.0/16", "EnableIPv6": true, '
                                        b'"IPv6Network": "fd00::/56"}')
            with pytest.raises(LeaseError, match="no IPv6 podCIDR"):
                await managers[0].acquire(dual, LeaseAttrs(public_ip="192.168.0.1"))
        finally:
            await informer.stop()

    asyncio.run(main())


@pytest.mark.parametrize("argv, message", [
    ([], "needs --overlay-config"),
    (["--overlay-subnet-manager", "etcd"], "needs --store etcd"),
    (["--overlay-config", "/nonexistent/net-conf.json"], "--overlay-config"),
])
def test_node_flags_are_checked_up_front(argv: list[str], message: str) -> None:
    from svcnet.cni.overlay.daemon import node_component

    from svcnet.cli import UsageError, build_parser

    args = build_parser().parse_args(["node", "--overlay", *argv])
    with pytest.raises(UsageError, match=message):
        node_component(args)


def test_node_flags_reach_the_daemon_options(tmp_path: Path) -> None:
    from svcnet.cni.overlay.daemon import node_component

    from svcnet.cli import build_parser

    conf = tmp_path / "net-conf.json"
    conf.write_bytes(NET)
    args = build_parser().parse_args([
        "node", "--overlay", "--store", "etcd://10.0.0.1:2379,10.0.0.2:2379/reg",
        "--overlay-config", str(conf), "--overlay-iface", "ens3", "--overlay-node-name", "w1",
        "--overlay-backend", "host-gw", "--no-overlay-ip-masq", "--overlay-resync", "5",
        "--overlay-masq-backend", "nftables", "--no-overlay-vxlan-notrack"])
    opts = node_component(args).options
    assert (opts.masq_backend, opts.vxlan_notrack) == ("nftables", False)
    assert opts.etcd_endpoints == ("10.0.0.1:2379", "10.0.0.2:2379")
    assert (opts.iface, opts.node_name, opts.backend, opts.ip_masq, opts.resync) == (
        "ens3", "w1", "host-gw", False, 5.0)


def test_network_blackhole_is_added_first_removed_last_and_kept_for_departed_peers() -> None:
    """The cluster network's blackhole route stays while peers come and go; only a network
    that is no longer ours loses it, after everything else (and cleanup removes it)."""
    from dataclasses import replace

    from svcnet.cni.overlay.netlink import Observed

    cfg = parse_network_config(NET)
    fake = FakeNetlink(iface=UNDERLAY)
    three = compute_desired(cfg, lease(1), (lease(1), lease(2), lease(3)), UNDERLAY, "n1")
    one = compute_desired(cfg, lease(1), (lease(1),), UNDERLAY, "n1")
    assert one.kernel.routes == {BLACKHOLE}

    async def main() -> None:
        rec = Reconciler(fake, FakeFirewall())
        await rec.sync(three)
        gone = await rec.sync(one)
        assert {op.obj for op in gone.ops if op.verb == "del" and isinstance(op.obj, Route)
                } == {r for r in three.kernel.routes if not r.blackhole}
        assert fake.state.routes == {BLACKHOLE}
        observed = await fake.observe(frozenset({"flannel.1"}))
        moved = replace(cfg, ipv4=replace(cfg.ipv4, network=ipaddress.IPv4Network(
            "10.245.0.0/16"))) if cfg.ipv4 else cfg
        other = compute_desired(moved, lease(1), (lease(1),), UNDERLAY, "n1")
        ops = plan(other.kernel, observed)
        assert ops[0] == Op("add", Route("10.245.0.0/16", "", "", kind="blackhole"))
        assert ops[-1] == Op("del", BLACKHOLE)
        everything = plan(replace(one.kernel, links=frozenset(), addresses=frozenset(),
                                  routes=frozenset()), Observed(fake.state))
        assert everything[-1] == Op("del", BLACKHOLE), "cleanup removes it, last"

    asyncio.run(main())


def test_host_gw_owns_a_blackhole_per_family() -> None:
    cfg = parse_network_config(b'{"Network": "10.244.0.0/16", "EnableIPv6": true, '
                               b'"IPv6Network": "fd00:1::/56", "IPv6SubnetLen": 64, '
                               b'"Backend": {"Type": "host-gw"}}')
    own = Lease(ipaddress.IPv4Network("10.244.1.0/24"), ipaddress.IPv6Network("fd00:1:0:1::/64"),
                LeaseAttrs(public_ip="192.168.0.1", backend_type="host-gw"))
    d = compute_desired(cfg, own, (own,), UNDERLAY, "n1")
    assert d.kernel.routes == {BLACKHOLE, Route("fd00:1::/56", "", "", kind="blackhole")}
