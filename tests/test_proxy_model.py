"""The typed rule model: a transaction applied to the stateful fake as objects gives the same
table as its serialized text parsed by the fake, so the one serializer per tool writes what
the objects mean; and the backends' transactions are built from the diff engine."""

from __future__ import annotations

from typing import Any

import pytest
from svcnet.proxy.builders import endpoint, endpoint_slice, service, to_service, to_slice
from svcnet.proxy.commands import CommandFailed
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.fake_nft import FakeNft, NftError
from svcnet.proxy.nft_model import to_dump
from svcnet.proxy.nftables import NftablesBackend
from svcnet.proxy.objects import Chain, Element, Map, Rule, Set, Table, Transaction
from svcnet.proxy.serialize import ELEMENT_BATCH, nft_script
from svcnet.proxy.state import ChangeTracker, Family, NodeConfig
from test_proxy_flows import NODE_IP, NODE_NAME, OBJECTS


class Cluster:
    """OBJECTS in a change tracker, synced by the backend on a fake; each step's
    transactions are kept."""

    def __init__(self, families: tuple[Family, ...], detect: LocalDetector) -> None:
        self.fake = FakeNft()
        self.backend = NftablesBackend(self.fake, BackendConfig(families=families,
                                                                detect_local=detect))
        self.tracker = ChangeTracker(NodeConfig(NODE_NAME, nodeport_addresses=(NODE_IP,)))
        self.services: dict[str, Any] = {}
        self.slices: dict[str, list[Any]] = {}

    def put(self, objects: list[tuple[dict[str, Any], dict[str, Any] | None]]) -> None:
        for svc, sl in objects:
            s = to_service(svc)
            key = f"default/{s.metadata.name}"
            old = self.services.get(key)
            self.services[key] = s
            self.slices[key] = [to_slice(sl)] if sl else []
            self.tracker.service_changed(old, s)

    def remove(self, names: list[str]) -> None:
        for name in names:
            s = self.services.pop(f"default/{name}")
            self.slices.pop(f"default/{name}")
            self.tracker.service_changed(s, None)

    def drain(self, *, full: bool) -> list[Transaction]:
        changes = self.tracker.drain(self.services.get, lambda k: self.slices.get(k, []),
                                     lambda: list(self.services))
        if full:
            return list(self.backend.full_transaction(changes.state.values()))
        return self.backend.partial_transactions(changes)


def check_step(c: Cluster, txs: list[Transaction]) -> None:
    """Apply ``txs`` to copies of the fake as objects and as text: same tables; then
    keep the result as the fake's state for the next step."""
    typed = FakeNft(tables=dict(c.fake.tables))
    text = FakeNft(tables=dict(c.fake.tables))
    typed.apply_transactions(txs)
    text.apply(nft_script(txs))
    assert to_dump(typed.tables.values()) == to_dump(text.tables.values())
    c.fake.tables = text.tables


@pytest.mark.parametrize("families", [(4,), (4, 6)], ids=["ipv4", "dual-stack"])
@pytest.mark.parametrize("detect", [LocalDetector("ClusterCIDR", ("10.1.0.0/16",)),
                                    LocalDetector("BridgeInterface", (), "br0")],
                         ids=["cidr", "bridge"])
def test_nft_transaction_as_objects_equals_its_text(families: tuple[Family, ...],
                                                    detect: LocalDetector) -> None:
    """Every feature, as a full sync, a partial one adding the rest, a partial one
    changing endpoints and one removing everything (affinity chains and sets too)."""
    c = Cluster(families, detect)
    half = len(OBJECTS) // 2
    c.put(OBJECTS[:half])
    full = c.drain(full=True)
    assert any(isinstance(o, Element) for tx in full for _, o in tx.operations())
    check_step(c, full)
    c.put(OBJECTS[half:])
    check_step(c, c.drain(full=False))
    c.put([(service("aff", "10.96.0.15", sessionAffinity="ClientIP",
                    sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
            endpoint_slice("aff", endpoint("10.1.0.99")))])
    step = c.drain(full=False)
    verbs = {(v, type(o).__name__) for tx in step for v, o in tx.operations()}
    assert {("delete", "Chain"), ("delete", "Set"), ("add", "Chain"), ("flush", "Chain"),
            ("add", "Set"), ("add", "Rule")} <= verbs
    check_step(c, step)
    c.remove([to_service(svc).metadata.name for svc, _ in OBJECTS])
    step = c.drain(full=False)
    assert ("delete", "Element") in {(v, type(o).__name__) for tx in step
                                     for v, o in tx.operations()}
    check_step(c, step)
    for table in c.fake.tables.values():
        assert not [s.name for s in table.sets.values() if s.elems], "all elements gone"
        assert not [n for n in table.chains if n.startswith("aff-")]


def test_nft_serializer_batches_long_element_runs() -> None:
    """Runs longer than one command split into several; delete writes keys only."""
    table = Table("ip", "t")
    tx = Transaction(table)
    tx.add(table)
    tx.add_all([Map("m", "ipv4_addr : verdict"), Set("s", "ipv4_addr"), Chain("c"),
                Rule("c", "return")])
    n = ELEMENT_BATCH + 5
    ips = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(n)]
    tx.add_all(Element("m", ip, "goto c") for ip in ips)
    tx.add_all(Element("s", ip) for ip in ips[:3])
    tx.delete_all(Element("m", ip, "goto c") for ip in ips[:2])
    text = nft_script([tx])
    assert text.count("add element ip t m {") == 2
    assert "delete element ip t m { 10.0.0.0, 10.0.0.1 }\n" in text
    typed, parsed = FakeNft(), FakeNft()
    typed.apply_transactions([tx])
    parsed.apply(text)
    assert to_dump(typed.tables.values()) == to_dump(parsed.tables.values())
    assert len(parsed.tables["ip", "t"].sets["m"].elems) == n - 2


def test_fake_refuses_typed_operations_as_the_kernel_refuses_their_text() -> None:
    """An element jumping to a missing chain fails as objects and as text, all or nothing."""
    table = Table("ip", "t")
    tx = Transaction(table)
    tx.add(table)
    tx.add(Map("m", "ipv4_addr : verdict"))
    tx.add(Element("m", "10.0.0.1", "goto nowhere"))
    for apply in (lambda f: f.apply_transactions([tx]), lambda f: f.apply(nft_script([tx]))):
        fake = FakeNft()
        with pytest.raises(NftError, match="nowhere"):
            apply(fake)
        assert fake.tables == {}


def test_iptables_transaction_as_objects_equals_its_text() -> None:
    """The iptables backend's full and partial transactions of the every-feature cluster,
    applied to the iptables fake as objects and as ``restore_lines`` text."""
    from svcnet.proxy.fake_iptables import FakeIptables
    from svcnet.proxy.iptables import IptablesBackend, _Current
    from svcnet.proxy.objects import IptRule, Op
    from svcnet.proxy.serialize import restore_lines

    typed, text = FakeIptables(), FakeIptables()
    backend = IptablesBackend(text, BackendConfig(
        families=(4,), detect_local=LocalDetector("ClusterCIDR", ("10.1.0.0/16", "10.2.0.0/16"))),
        legacy=False, node_addresses={4: (NODE_IP,)})
    c = Cluster((4,), LocalDetector("ClusterCIDR", ("10.1.0.0/16",)))
    half = len(OBJECTS) // 2
    c.put(OBJECTS[:half])
    changes = c.tracker.drain(c.services.get, lambda k: c.slices.get(k, []),
                              lambda: list(c.services))
    totals = {"nat": 0, "filter": 0}

    def apply(ops: list[Op]) -> None:
        typed.apply_transaction(4, ops)
        text.run(["iptables-nft-restore", "--noflush"], input="".join(restore_lines(ops)))
        assert typed.save(4) == text.save(4)

    apply(list(backend._full_ops(4, changes.state.values(), _Current(), totals)))
    c.put(OBJECTS[half:])
    c.remove(["web", "local"])
    changes = c.tracker.drain(c.services.get, lambda k: c.slices.get(k, []),
                              lambda: list(c.services))
    ops = backend.partial_transaction(changes, 4, totals).ops
    assert {("delete", "IptRule"), ("add", "IptRule"), ("delete", "IptChain"),
            ("flush", "IptChain")} <= {(v, type(o).__name__) for v, objs in ops for o in objs}
    apply(ops)
    assert "KUBE-SVC-" in typed.save(4)
    bad = [Op("add", (IptRule("nat", "KUBE-NOWHERE", "-j RETURN"),))]
    for apply in (lambda: typed.apply_transaction(4, bad),
                  lambda: typed.run(["iptables-nft-restore", "--noflush"],
                                    input="".join(restore_lines(bad)))):
        before = typed.save(4)
        with pytest.raises(CommandFailed):
            apply()
        assert typed.save(4) == before


def test_ipvs_and_ipset_serializers() -> None:
    """IPVS operations become adapter calls in order; ipset members restore lines."""
    from svcnet.proxy.ipvs_kernel import FakeIpvs, RealServer, ServiceOptions, VirtualServer
    from svcnet.proxy.objects import IpsetMember, IpvsDest, IpvsService
    from svcnet.proxy.serialize import apply_ipvs, ipset_lines

    table = FakeIpvs()
    vs, rs = VirtualServer("10.96.0.1", "TCP", 80), RealServer("10.1.0.1", 8080)
    tx = Transaction()
    tx.add(IpvsService(vs, ServiceOptions("rr", 0)))
    tx.add_all([IpvsDest(vs, rs, 1), IpvsDest(vs, RealServer("10.1.0.2", 8080), 1)])
    tx.update(IpvsDest(vs, rs, 0))
    tx.update(IpvsService(vs, ServiceOptions("rr", 60)))
    tx.delete(IpvsDest(vs, RealServer("10.1.0.2", 8080)))
    apply_ipvs(table, tx.ops)
    assert table.services() == {vs: ServiceOptions("rr", 60)}
    assert {r: d.weight for r, d in table.dests(vs).items()} == {rs: 0}
    gone = Transaction()
    gone.delete(IpvsService(vs))
    apply_ipvs(table, gone.ops)
    assert table.services() == {}
    members = Transaction()
    members.delete(IpsetMember("KUBE-CLUSTER-IP", "10.96.0.1,tcp:80"))
    members.add(IpsetMember("KUBE-CLUSTER-IP", "10.96.0.2,tcp:80"))
    assert "".join(ipset_lines(members.ops)) == (
        "del KUBE-CLUSTER-IP 10.96.0.1,tcp:80 -exist\n"
        "add KUBE-CLUSTER-IP 10.96.0.2,tcp:80 -exist\n")


IPVS_DETECT = {
    "cidr": BackendConfig(families=(4, 6), detect_local=LocalDetector(
        "ClusterCIDR", ("10.1.0.0/16", "fd00:1::/64"))),
    "two-cidrs": BackendConfig(families=(4,), detect_local=LocalDetector(
        "ClusterCIDR", ("10.1.0.0/16", "10.2.0.0/16"))),
    "bridge": BackendConfig(families=(4, 6), detect_local=LocalDetector(
        "BridgeInterface", (), "br0")),
    "masquerade-all": BackendConfig(families=(4,), masquerade_all=True),
}


@pytest.mark.parametrize("config", IPVS_DETECT.values(), ids=IPVS_DETECT.keys())
def test_ipvs_rules_and_removal_as_objects_equal_their_text(config: BackendConfig) -> None:
    """The IPVS backend's own chains, the jumps into them (put first, once) and their
    removal, applied to the iptables fake as objects and as ``restore_lines`` text."""
    from svcnet.proxy.fake_iptables import FakeIptables
    from svcnet.proxy.ipvs import CHAIN_SERVICES, IpvsBackend
    from svcnet.proxy.ipvs_kernel import FakeIpvs
    from svcnet.proxy.serialize import restore_lines

    backend = IpvsBackend(FakeIpvs(), FakeIptables(), config)
    for family in config.families:
        tool = "iptables-restore" if family == 4 else "ip6tables-restore"
        typed, text = FakeIptables(), FakeIptables()
        for fake in (typed, text):
            fake.run([tool], input="*nat\n:OTHER - [0:0]\n-A PREROUTING -j OTHER\nCOMMIT\n")

        def apply(tx: Transaction, typed: FakeIptables = typed, text: FakeIptables = text,
                  family: Family = family, tool: str = tool) -> None:
            typed.apply_transaction(family, tx.ops)
            text.run([tool, "--noflush"], input="".join(restore_lines(tx.ops)))
            assert typed.save(family) == text.save(family)

        first = backend.rules_transaction(family, typed.save(family))
        assert ("insert", "IptRule") in {(v, type(o).__name__) for v, o in first.operations()}
        apply(first)
        again = backend.rules_transaction(family, typed.save(family))
        assert "insert" not in {v for v, _ in again.operations()}, "jumps already there"
        apply(again)
        nat = typed.tables[family, "nat"]
        assert nat["PREROUTING"] == [f"-j {CHAIN_SERVICES}", "-j OTHER"]
        assert nat["OUTPUT"] == [f"-j {CHAIN_SERVICES}"]
        removal = backend.removal_transaction(typed.save(family))
        assert {v for v, _ in removal.operations()} == {"delete", "flush"}
        apply(removal)
        assert "SVCNET" not in typed.save(family)
        assert typed.tables[family, "nat"]["PREROUTING"] == ["-j OTHER"]
        assert not backend.removal_transaction(typed.save(family))


def test_ipvs_set_replacement_as_objects_equals_its_text() -> None:
    """The full sync's ipset replacement (create sized, fill a temporary set, swap,
    destroy; a leftover temporary set destroyed first), and the cleanup's destroys, applied
    to the ipset fake as objects and as ``ipset_lines`` text: same members and headers."""
    from svcnet.proxy.fake_iptables import FakeIpset
    from svcnet.proxy.ipvs import SET_TYPES, set_name, set_size, sets_transaction
    from svcnet.proxy.objects import IpsetMember, IpsetSet
    from svcnet.proxy.serialize import ipset_lines

    typed, text = FakeIpset(), FakeIpset()
    for fake in (typed, text):
        fake.run(["ipset", "restore"], input=(
            "create SVCNET-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536\n"
            "add SVCNET-CLUSTER-IP 10.96.9.9,tcp:80\n"
            "create SVCNET-LOOP-BACK-T hash:ip,port,ip family inet hashsize 1024 "
            "maxelem 65536\n"))

    def apply(tx: Transaction) -> None:
        typed.apply_transaction(tx.ops)
        text.run(["ipset", "restore", "-exist"], input="".join(ipset_lines(tx.ops)))
        assert typed.members() == text.members()
        assert typed.headers == text.headers

    loop_back = [f"10.1.{i // 256}.{i % 256},tcp:8080,10.1.{i // 256}.{i % 256}"
                 for i in range(70_000)]  # past ipset's default maxelem
    members = {"SVCNET-CLUSTER-IP": ["10.96.0.1,tcp:80", "10.96.0.2,udp:53"],
               "SVCNET-LOOP-BACK": loop_back}
    capacity: dict[str, int] = {}
    apply(sets_transaction((4, 6), members, set(typed.sets), capacity))
    names = {set_name(base, f) for f in (4, 6) for base in SET_TYPES}
    assert set(typed.sets) == names, "temporary sets gone"
    assert typed.sets["SVCNET-CLUSTER-IP"] == set(members["SVCNET-CLUSTER-IP"])
    assert len(typed.sets["SVCNET-LOOP-BACK"]) == len(loop_back)
    hashsize, maxelem = set_size(len(loop_back))
    assert typed.headers["SVCNET-LOOP-BACK"] == IpsetSet(
        "SVCNET-LOOP-BACK", "hash:ip,port,ip", "inet", hashsize, maxelem)
    assert typed.headers["SVCNET-CLUSTER-IP-6"].family == "inet6"
    assert capacity["SVCNET-LOOP-BACK"] == maxelem
    full = Transaction()
    full.add(IpsetSet("SMALL", "hash:ip,port", "inet", 1024, 1))
    full.add_all([IpsetMember("SMALL", "10.96.0.1,tcp:80"),
                  IpsetMember("SMALL", "10.96.0.2,tcp:80")])
    for run in (lambda: typed.apply_transaction(full.ops),
                lambda: typed.run(["ipset", "restore", "-exist"],
                                  input="".join(ipset_lines(full.ops)))):
        with pytest.raises(CommandFailed, match="Hash is full"):
            run()
        assert "SMALL" not in typed.sets, "all or nothing"
    gone = Transaction()
    gone.delete_all(IpsetSet(name) for name in sorted(names))
    apply(gone)
    assert typed.sets == {}
