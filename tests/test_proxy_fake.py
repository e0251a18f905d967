"""The packet-flow tables without root: the nftables and iptables backends program stateful
fakes (``proxy/fake_nft.py``, ``proxy/fake_iptables.py``), IPVS ``FakeIpvs`` with them, and
the tracer answers every row from the fake's dump. The same tables run against the real
kernel in ``test_proxy_flows.py``; here the nft fake's dump is also compared with the
kernel's for the same syncs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import require_binary
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.commands import CommandFailed, SubprocessCommands
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.drift import iptables_items
from svcnet.proxy.fake_iptables import FakeIptables, FakeNodeTools
from svcnet.proxy.fake_nft import FakeNft
from svcnet.proxy.iptables import IptablesBackend
from svcnet.proxy.ipvs import IpvsBackend
from svcnet.proxy.ipvs_kernel import FakeIpvs
from svcnet.proxy.nft_model import nft_items
from svcnet.proxy.nftables import NftablesBackend
from svcnet.proxy.state import ChangeTracker, Family, NodeConfig
from svcnet.proxy.tracer import IptablesTracer, IpvsTracer, NftTracer, Packet
from test_proxy_flows import (
    DETECT_FLOWS,
    FLOWS,
    NODE_IP,
    OBJECTS,
    P1,
    P2,
    P3,
    TWO_CIDR_FLOWS,
    elsewhere,
    here,
    program,
    traced,
    tracer,
)

FlowRows = list[tuple[str, str, str, int, Any]]


def backend_on_fake(detect: LocalDetector, fake: FakeIptables | None = None
                    ) -> IptablesBackend:
    return IptablesBackend(fake or FakeIptables(), BackendConfig(families=(4,),
                                                                 detect_local=detect),
                           legacy=False, node_addresses={4: (NODE_IP,)})


def nft_on_fake(detect: LocalDetector, fake: FakeNft | None = None,
                families: tuple[Family, ...] = (4,)) -> NftablesBackend:
    return NftablesBackend(fake or FakeNft(), BackendConfig(families=families,
                                                            detect_local=detect))


def flow_table(backend: IptablesBackend | NftablesBackend, flows: FlowRows
               ) -> tuple[dict[Any, Any], dict[Any, Any]]:
    tr = tracer(backend.name, backend)
    got = {(s, p, d, port): traced(tr, s, p, d, port) for s, p, d, port, _ in flows}
    return got, {(s, p, d, port): e for s, p, d, port, e in flows}


@pytest.mark.parametrize(("detect", "objects", "flows"), [
    (LocalDetector("ClusterCIDR", ("10.1.0.0/16",)), OBJECTS, FLOWS),
    (LocalDetector("ClusterCIDR", ("10.1.0.0/16", "10.2.0.0/16")), OBJECTS[:2],
     TWO_CIDR_FLOWS),
    (LocalDetector("BridgeInterface", (), "br0"), OBJECTS[:2], DETECT_FLOWS),
    (LocalDetector("InterfaceNamePrefix", (), "br"), OBJECTS[:2], DETECT_FLOWS),
], ids=["every-feature", "two-cluster-cidrs", "bridge", "interface-prefix"])
@pytest.mark.parametrize("kind", ["nftables", "iptables"])
def test_flow_tables_on_the_fake(kind: str, detect: LocalDetector, objects: Any,
                                 flows: FlowRows) -> None:
    """Loaded as a full sync then a partial one, as the kernel tests do."""
    backend = nft_on_fake(detect) if kind == "nftables" else backend_on_fake(detect)
    program(backend, objects)
    got, want = flow_table(backend, flows)
    assert got == want


def test_the_fake_sees_the_old_two_cidr_bug() -> None:
    """A fake that could not show the detect-local bug would prove nothing: rendering only
    the first CIDR (the old code) masquerades the second CIDR's pods here too."""
    backend = backend_on_fake(LocalDetector("ClusterCIDR", ("10.1.0.0/16",)))
    program(backend, OBJECTS[:2])
    got, want = flow_table(backend, TWO_CIDR_FLOWS)
    assert got[("pod-net2", "TCP", "10.96.0.10", 80)] != want[
        ("pod-net2", "TCP", "10.96.0.10", 80)]


def test_restore_is_all_or_nothing_like_the_real_tool() -> None:
    fake = FakeIptables()
    fake.run(["iptables-nft-restore", "--noflush"], input="*nat\n:KUBE-A - [0:0]\n"
             "-A KUBE-A -j RETURN\nCOMMIT\n")
    before = fake.save(4)
    for bad in ("*nat\n-A KUBE-A -j RETURN\n-D KUBE-A -j DROP\nCOMMIT\n",  # no such rule
                "*nat\n-A KUBE-B -j RETURN\nCOMMIT\n",                    # no such chain
                "*nat\n-A KUBE-A -j KUBE-NOPE\nCOMMIT\n",                 # no such target
                "*nat\n-N KUBE-A\nCOMMIT\n",                              # exists
                "*nat\n:KUBE-C - [0:0]\n-A PREROUTING -j KUBE-C\n-X KUBE-C\nCOMMIT\n"):
        with pytest.raises(CommandFailed):
            fake.run(["iptables-nft-restore", "--noflush"], input=bad)
        assert fake.save(4) == before, bad
    fake.run(["iptables-nft-restore", "--noflush"], input="*nat\n-A KUBE-A -j DROP\n")
    assert fake.save(4) == before  # no COMMIT: nothing applied


def test_drift_items_and_canary_read_the_fake() -> None:
    fake = FakeIptables()
    backend = backend_on_fake(LocalDetector("ClusterCIDR", ("10.1.0.0/16",)), fake)
    program(backend, OBJECTS[:2])
    assert backend.healthy()
    items = backend.kernel_items()
    assert items == iptables_items(fake.save(4), 4) and any("KUBE-SVC-" in i for i in items)
    backend.cleanup()
    assert not backend.healthy()
    assert "KUBE-" not in fake.save(4)


# --- IPVS: FakeIpvs + the iptables/ipset fakes, traced ----------------------------------------

IPVS_NODE = "10.0.1.1"
CLIENT, POD_A, POD_B = "10.0.1.2", "10.1.1.2", "10.1.2.2"  # pods a (this node), b (n2)
NET1_POD, NET2_POD = "10.1.1.9", "10.1.2.9"  # clients in each cluster CIDR
BY_IP = {POD_A: "a", POD_B: "b"}
TWO_POD_CIDRS = LocalDetector("ClusterCIDR", ("10.1.1.0/24", "10.1.2.0/24"))

IPVS_OBJECTS: list[tuple[dict[str, Any], list[dict[str, Any]], list[tuple[str, int, str]]]] = [
    (service("web", "10.96.0.10", port(80, node_port=30080), type="NodePort",
             externalIPs=["10.99.0.1"]), [endpoint(POD_A, node="n1"), endpoint(POD_B)],
     [("", 8080, "TCP")]),
    (service("empty", "10.96.0.11", port(80)), [], [("", 8080, "TCP")]),
    (service("local-none", "10.96.0.12", port(80, node_port=30081), type="NodePort",
             externalTrafficPolicy="Local"), [endpoint(POD_B, node="n2")], [("", 8080, "TCP")]),
    (service("local", "10.96.0.13", port(80, node_port=30082), type="NodePort",
             externalTrafficPolicy="Local"), [endpoint(POD_A, node="n1"),
                                              endpoint(POD_B, node="n2")], [("", 8080, "TCP")]),
    (service("dns", "10.96.0.15", port(53, protocol="UDP")),
     [endpoint(POD_A, node="n1"), endpoint(POD_B, node="n2")], [("", 8080, "UDP")]),
    (service("self", "10.96.0.20", port(80)), [endpoint(POD_A, node="n1")],
     [("", 8080, "TCP")]),
]

# (source, protocol, destination, port) -> ({pods}, masqueraded) | "REJECT" | "DROP";
# test_proxy_ipvs.py's VM table (client rows) plus pod sources of both cluster CIDRs
IPVS_FLOWS: FlowRows = [
    (CLIENT, "TCP", "10.96.0.10", 80, ({"a", "b"}, True)),      # not a pod: masqueraded
    (NET1_POD, "TCP", "10.96.0.10", 80, ({"a", "b"}, False)),   # first cluster CIDR
    (NET2_POD, "TCP", "10.96.0.10", 80, ({"a", "b"}, False)),   # second (the old bug)
    (CLIENT, "TCP", IPVS_NODE, 30080, ({"a", "b"}, True)),      # NodePort, Cluster policy
    (CLIENT, "TCP", "10.99.0.1", 80, ({"a", "b"}, True)),       # externalIP
    (CLIENT, "TCP", "10.96.0.11", 80, "REJECT"),                # no endpoints
    (CLIENT, "TCP", IPVS_NODE, 30081, "DROP"),                  # Local, none here
    (CLIENT, "TCP", IPVS_NODE, 30082, ({"a"}, False)),          # Local: local only, no SNAT
    (NET1_POD, "TCP", "10.96.0.13", 80, ({"a", "b"}, False)),   # its ClusterIP uses all
    (NET2_POD, "UDP", "10.96.0.15", 53, ({"a", "b"}, False)),   # UDP
    (POD_A, "TCP", "10.96.0.20", 80, ({"a"}, True)),            # hairpin
]


def ipvs_flow_table(detect: LocalDetector) -> dict[Any, Any]:
    tools, table = FakeNodeTools(), FakeIpvs()
    backend = IpvsBackend(table, tools, BackendConfig(detect_local=detect), grace_period=0)
    tracker = ChangeTracker(NodeConfig("n1", "", (IPVS_NODE,)))
    services = {f"default/{svc['metadata']['name']}": to_service(svc)
                for svc, _, _ in IPVS_OBJECTS}
    slices = {f"default/{svc['metadata']['name']}": [to_slice(endpoint_slice(
        svc["metadata"]["name"], *eps, ports=ports))] if eps else []
        for svc, eps, ports in IPVS_OBJECTS}
    for i, svc in enumerate(services.values()):  # a full sync, then a partial one
        tracker.service_changed(None, svc)
        if i in (2, len(services) - 1):
            backend.sync(tracker.drain(services.get, lambda k: slices.get(k, []),
                                       lambda: list(services)), full=i == 2)
    local = [IPVS_NODE, *{vs.ip for vs in table.services()}]
    tr = IpvsTracer.over(IptablesTracer(tools.iptables.save(4), local, tools.ipset.members()),
                         table)
    got: dict[Any, Any] = {}
    for src, proto, dst, dport, _ in IPVS_FLOWS:
        summary = tr.trace(Packet(src, dst, dport, proto, iif="eth0")).summary()
        got[(src, proto, dst, dport)] = summary[0] if len(summary) == 1 else (
            {BY_IP[e.split(":")[0]] for e in summary[0]}, summary[1])
    return got


def test_ipvs_flow_table_on_the_fakes() -> None:
    want = {(s, p, d, port): e for s, p, d, port, e in IPVS_FLOWS}
    assert ipvs_flow_table(TWO_POD_CIDRS) == want


# --- nftables: the fake against the kernel, and its transactions -------------------------------

EVOLVED = [  # a third sync after program(): endpoints move, a service goes, one gets endpoints
    (OBJECTS[0][0], endpoint_slice("web", here(P1), elsewhere(P3))),
    (OBJECTS[3][0], endpoint_slice("empty", here(P2), ports=[("", 8080, "TCP"),
                                                            ("u", 8080, "UDP")])),
    (OBJECTS[5][0], endpoint_slice("aff", here(P2), here(P3))),
    (OBJECTS[6][0], None),  # fw: deleted
]


def program_and_evolve(backend: NftablesBackend) -> None:
    """program()'s full and partial sync, then a partial sync of ``EVOLVED``."""
    tracker = program(backend, OBJECTS)
    services = {f"default/{s['metadata']['name']}": to_service(s) for s, _ in OBJECTS}
    slices = {k: [to_slice(sl)] if sl else [] for k, (_, sl) in zip(services, OBJECTS,
                                                                     strict=True)}
    for svc, sl in EVOLVED:
        key = f"default/{svc['metadata']['name']}"
        old = services[key]
        if sl is None:
            del services[key]
            slices.pop(key)
            tracker.service_changed(old, None)
        else:
            slices[key] = [to_slice(sl)]
            tracker.service_changed(old, old)
    backend.sync(tracker.drain(services.get, lambda k: slices.get(k, []),
                               lambda: list(services)), full=False)


def test_nft_flow_tables_after_changes_on_the_fake() -> None:
    backend = nft_on_fake(LocalDetector("ClusterCIDR", ("10.1.0.0/16",)))
    program_and_evolve(backend)
    tr = NftTracer(backend.dump(4), [NODE_IP])
    assert traced(tr, "cpod", "TCP", "10.96.0.10", 80) == ({"pod1", "pod3"}, False)
    assert traced(tr, "ext", "TCP", NODE_IP, 30080) == ({"pod1", "pod3"}, True)
    assert traced(tr, "cpod", "TCP", "10.96.0.13", 80) == ({"pod2"}, False)
    assert traced(tr, "cpod", "UDP", "10.96.0.13", 81) == ({"pod2"}, False)
    assert traced(tr, "cpod", "TCP", "10.96.0.15", 80) == ({"pod2", "pod3"}, False)
    assert traced(tr, "cpod", "TCP", "203.0.113.30", 80) == "PASS"  # fw is gone
    assert traced(tr, "ext", "TCP", "203.0.113.30", 80) == "PASS"


@pytest.mark.parametrize("detect", [
    LocalDetector("ClusterCIDR", ("10.1.0.0/16", "10.2.0.0/16", "fd00:1::/64")),
    LocalDetector("ClusterCIDR", ("10.1.0.0/16", "10.3.0.0/16", "fd00:1::/64",
                                  "fd00:2::/64")),
    LocalDetector("BridgeInterface", (), "br0"),
    LocalDetector("InterfaceNamePrefix", (), "veth"),
], ids=["adjacent-cidrs", "apart-cidrs", "bridge", "interface-prefix"])
def test_nft_fake_dumps_what_the_kernel_dumps(detect: LocalDetector,
                                              netns: Callable[[str], str]) -> None:
    """The same three syncs into the kernel and into the fake: equal ``nft -j`` items (every
    chain, rule expression, set and element), both families. A fake that answered
    otherwise would make the flow tables above prove nothing."""
    require_binary("nft")
    real = NftablesBackend(SubprocessCommands(netns("nftfake")),
                           BackendConfig(families=(4, 6), detect_local=detect))
    fake = nft_on_fake(detect, families=(4, 6))
    for backend in (real, fake):
        program_and_evolve(backend)
    for family in (4, 6):
        want, got = nft_items(real.dump(family)), nft_items(fake.dump(family))
        assert (sorted(want - got), sorted(got - want)) == ([], [])
    assert real.kernel_items() == fake.kernel_items()


def test_nft_drift_items_and_health_read_the_fake() -> None:
    fake = FakeNft()
    backend = nft_on_fake(LocalDetector("ClusterCIDR", ("10.1.0.0/16",)), fake)
    assert not backend.healthy()
    program(backend, OBJECTS[:2])
    assert backend.healthy()
    assert any("element service-ips" in i for i in backend.kernel_items())
    backend.cleanup()
    assert not backend.healthy()
    assert fake.tables == {}


NFT_BASE = ("add table ip t\nadd chain ip t a\nadd chain ip t b\n"
            "add map ip t m { type ipv4_addr . inet_proto . inet_service : verdict ; }\n"
            "add map ip t be { typeof ip daddr . meta l4proto . th dport . numgen random mod 1"
            " : ip daddr . th dport ; }\n"
            "add element ip t m { 10.0.0.1 . tcp . 80 : goto a }\n"
            "add rule ip t b jump a\n")


@pytest.mark.parametrize("bad", [
    "add rule ip t a jump nope",                               # no such chain
    "add rule ip t nope accept",                               # rule in a missing chain
    "add element ip t m { 10.0.0.2 . tcp . 80 : goto nope }",  # element to a missing chain
    "add element ip t m { 10.0.0.1 . tcp . 80 : goto b }",     # exists with another value
    "delete element ip t m { 10.0.0.9 . tcp . 80 }",           # absent element
    "delete chain ip t a",                                     # referenced
    "delete chain ip t b",                                     # holds a rule
    "add rule ip t a ip saddr @nope accept",                   # no such set
    "delete table ip nope",
    # nft 1.0.6 cannot add a rule using a typeof map made by an earlier transaction
    "add rule ip t a dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 "
    "map @be",
])
def test_nft_fake_fails_where_nft_fails_and_applies_nothing(bad: str) -> None:
    fake = FakeNft()
    fake.run(["nft", "-f", "-"], input=NFT_BASE)
    before = fake.run(["nft", "-j", "list", "ruleset"])
    with pytest.raises(CommandFailed):
        fake.run(["nft", "-f", "-"], input=f"add chain ip t c\nadd rule ip t c accept\n{bad}\n")
    assert fake.run(["nft", "-j", "list", "ruleset"]) == before


def test_nft_fake_applies_what_nft_applies() -> None:
    fake = FakeNft()
    fake.run(["nft", "-f", "-"], input=NFT_BASE + (
        "add rule ip t a dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 "
        "map @be\n"))  # the typeof map made in this same transaction: fine
    fake.run(["nft", "-f", "-"], input=(
        "delete element ip t m { 10.0.0.1 . tcp . 80 }\n"
        "add element ip t m { 10.0.0.1 . tcp . 80 : goto b }\n"
        "add element ip t m { 10.0.0.1 . tcp . 80 : goto b }\n"  # same value again: no error
        "flush chain ip t b\n"))
    (table,) = fake.tables.values()
    assert list(table.sets["m"].elems.values()) == [
        [{"concat": ["10.0.0.1", "tcp", 80]}, {"goto": {"target": "b"}}]]
    assert table.chains["b"].rules == []
    fake.run(["nft", "-f", "-"], input="delete element ip t m { 10.0.0.1 . tcp . 80 }\n"
                                        "delete chain ip t b\n")
    assert "b" not in fake.tables["ip", "t"].chains


def test_nft_dual_stack_on_the_fake() -> None:
    backend = nft_on_fake(LocalDetector("ClusterCIDR", ("10.1.0.0/16", "fd00:1::/64")),
                          families=(4, 6))
    tracker = ChangeTracker(NodeConfig("n1", nodeport_addresses=(NODE_IP, "fd00:9::1")))
    svc = to_service(service("web", ["10.96.0.10", "fd00:96::10"], port(80, node_port=30080),
                             type="NodePort"))
    slices = [to_slice(endpoint_slice("web", here(P1), name="v4")),
              to_slice(endpoint_slice("web", here("fd00:1::11"), here("fd00:1::12"),
                                      name="v6"))]
    tracker.service_changed(None, svc)
    backend.sync(tracker.drain(lambda k: svc, lambda k: slices, lambda: ["default/web"]),
                 full=True)
    v6 = NftTracer(backend.dump(6), ["fd00:9::1"])
    eps6 = ["[fd00:1::11]:8080", "[fd00:1::12]:8080"]
    assert v6.trace(Packet("fd00:1::20", "fd00:96::10", 80)).summary() == (eps6, False)
    assert v6.trace(Packet("fd00:2::5", "fd00:9::1", 30080)).summary() == (eps6, True)
    assert v6.trace(Packet("fd00:1::20", "10.96.0.10", 80)).summary() == ("ACCEPT",)
