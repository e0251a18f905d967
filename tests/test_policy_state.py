"""NetworkPolicy desired state as packet tables, on the upstream e2e model.

Namespaces x, y, z with pods a, b, c each (dual stack), serving 80 and 81 on TCP, UDP and
SCTP with container ports named ``serve-80-tcp`` etc., as the Kubernetes network policy
e2e suite builds them. Every case is checked on all 9 x 9 pod pairs, both ports, the three
protocols and both families, through the state tracer and through the rendered ruleset
(RulesetTracer), against an expectation written as the upstream suite words it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from svcnet.policy.nftables import group_elements, render, render_full, update_script
from svcnet.policy.state import compute, ip_block_ranges
from svcnet.policy.trace import RulesetTracer, trace

from svcnet.model import NAMESPACE, NETWORK_POLICY, POD, InvalidObject, NetworkPolicy, Pod

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP", "SCTP")
ALL = [f"{n}/{p}" for n in NAMESPACES for p in PODS]


def ipv4(ref: str) -> str:
    ns, pod = ref.split("/")
    return f"10.0.{NAMESPACES.index(ns) + 1}.{PODS.index(pod) + 1}"


def ipv6(ref: str) -> str:
    ns, pod = ref.split("/")
    return f"fd00::{NAMESPACES.index(ns) + 1}:{PODS.index(pod) + 1}"


def make_pod(ref: str, node: str = "n1", ips: tuple[str, ...] = (), **labels: str) -> Pod:
    ns, name = ref.split("/")
    ips = ips or (ipv4(ref), ipv6(ref))
    ports = [{"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
             for port in PORTS for proto in PROTOCOLS]
    return POD.convert({
        "metadata": {"name": name, "namespace": ns, "labels": {"pod": name, **labels}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ips[0],
                   "podIPs": [{"ip": ip} for ip in ips]}})


def model_pods() -> list[Pod]:
    return [make_pod(ref) for ref in ALL]


NAMESPACE_OBJECTS = [NAMESPACE.convert({"metadata": {"name": n, "labels": {"ns": n}}})
                     for n in NAMESPACES]


def policy(name: str, ns: str = "x", **spec: Any) -> NetworkPolicy:
    return NETWORK_POLICY.convert({"metadata": {"name": name, "namespace": ns},
                                   "spec": {"podSelector": {}, **spec}})


def pod_sel(pod: str) -> dict[str, Any]:
    return {"matchLabels": {"pod": pod}}


def ns_sel(ns: str) -> dict[str, Any]:
    return {"matchLabels": {"ns": ns}}


Expect = Callable[[str, str, int, str], bool]
"""(source pod, destination pod, port, protocol) -> allowed."""


def isolated_in(targets: set[str], allow: Callable[[str, int, str], bool]) -> Expect:
    """Ingress to ``targets`` only as ``allow(source, port, protocol)`` says."""
    return lambda s, d, port, proto: d not in targets or allow(s, port, proto)


def everything(s: str, d: str, port: int, proto: str) -> bool:
    return True


X = {f"x/{p}" for p in PODS}

CASES: dict[str, tuple[list[NetworkPolicy], Expect]] = {
    "no policy": ([], everything),
    "default deny ingress": (
        [policy("deny", policyTypes=["Ingress"])], isolated_in(X, lambda s, p, pr: False)),
    "default deny ingress, policyTypes omitted": (
        [policy("deny")], isolated_in(X, lambda s, p, pr: False)),
    "default deny egress": (
        [policy("deny", policyTypes=["Egress"])], lambda s, d, p, pr: s not in X),
    "default deny all": (
        [policy("deny", policyTypes=["Ingress", "Egress"])],
        lambda s, d, p, pr: s not in X and d not in X),
    "allow all ingress": (
        [policy("deny"), policy("allow", ingress=[{}])], everything),
    "allow all egress over default deny egress": (
        [policy("deny", policyTypes=["Egress"]),
         policy("allow", policyTypes=["Egress"], egress=[{}])], everything),
    "isolation only for the selected pod": (
        [policy("a", podSelector=pod_sel("a"))], isolated_in({"x/a"}, lambda s, p, pr: False)),
    "allow from namespace": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"from": [
            {"namespaceSelector": ns_sel("y")}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: s.startswith("y/"))),
    "allow from namespace by its name label": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"from": [{"namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": "z"}}}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: s.startswith("z/"))),
    "allow from pod in the policy's namespace": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"from": [
            {"podSelector": pod_sel("b")}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: s == "x/b")),
    "allow from namespace AND pod": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"from": [
            {"namespaceSelector": ns_sel("y"), "podSelector": pod_sel("b")}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: s == "y/b")),
    "allow from namespace OR pod": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"from": [
            {"namespaceSelector": ns_sel("y")}, {"podSelector": pod_sel("b")}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: s.startswith("y/") or s == "x/b")),
    "allow from every namespace but y (NotIn)": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"from": [{"namespaceSelector": {
            "matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["y"]}]}}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: not s.startswith("y/"))),
    "allow from pods with a label (Exists), all namespaces": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"from": [{"namespaceSelector": {},
            "podSelector": {"matchExpressions": [
                {"key": "pod", "operator": "In", "values": ["c"]}]}}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: s.endswith("/c"))),
    "ipBlock with except": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"from": [{"ipBlock": {
            "cidr": "10.0.2.0/24", "except": ["10.0.2.1/32"]}}, {"ipBlock": {
            "cidr": "fd00::2:0/112", "except": ["fd00::2:1/128"]}}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: s in ("y/b", "y/c"))),
    "named port ingress": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"ports": [
            {"port": "serve-81-tcp"}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: (p, pr) == (81, "TCP"))),
    "named port with the wrong protocol matches nothing": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"ports": [
            {"port": "serve-81-tcp", "protocol": "UDP"}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: False)),
    "port number, protocol defaults to TCP": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"ports": [{"port": 80}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: (p, pr) == (80, "TCP"))),
    "endPort range": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"ports": [
            {"port": 79, "endPort": 81, "protocol": "UDP"}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: pr == "UDP")),
    "endPort range not reaching 81": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"ports": [
            {"port": 70, "endPort": 80}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: (p, pr) == (80, "TCP"))),
    "protocol without port: all its ports": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{"ports": [{"protocol": "SCTP"}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: pr == "SCTP")),
    "multiple policies are a union": (
        [policy("p1", podSelector=pod_sel("a"), ingress=[{
            "from": [{"namespaceSelector": ns_sel("y")}], "ports": [{"port": 80}]}]),
         policy("p2", podSelector=pod_sel("a"), ingress=[{
             "from": [{"namespaceSelector": ns_sel("z")}], "ports": [{"port": 81}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: pr == "TCP" and (
            (s.startswith("y/") and p == 80) or (s.startswith("z/") and p == 81)))),
    "ports and peers of one rule are an AND": (
        [policy("p", podSelector=pod_sel("a"), ingress=[{
            "from": [{"podSelector": pod_sel("b")}],
            "ports": [{"port": 80, "protocol": "UDP"}]}])],
        isolated_in({"x/a"}, lambda s, p, pr: s == "x/b" and (p, pr) == (80, "UDP"))),
    "egress to pods in namespace y": (
        [policy("p", podSelector=pod_sel("a"), policyTypes=["Egress"], egress=[{"to": [
            {"namespaceSelector": ns_sel("y")}]}])],
        lambda s, d, p, pr: s != "x/a" or d.startswith("y/")),
    "egress named port resolved on the destination pod": (
        [policy("p", podSelector=pod_sel("a"), policyTypes=["Egress"], egress=[{"ports": [
            {"port": "serve-80-udp", "protocol": "UDP"}]}])],
        lambda s, d, p, pr: s != "x/a" or (p, pr) == (80, "UDP")),
    "egress ipBlock": (
        [policy("p", podSelector=pod_sel("a"), policyTypes=["Egress"], egress=[{"to": [
            {"ipBlock": {"cidr": "10.0.3.0/24"}}, {"ipBlock": {"cidr": "fd00::3:0/112"}}],
            "ports": [{"port": 81, "protocol": "TCP"}]}])],
        lambda s, d, p, pr: s != "x/a" or (d.startswith("z/") and (p, pr) == (81, "TCP"))),
    "egress rules without policyTypes isolate both directions": (
        [policy("p", podSelector=pod_sel("a"), egress=[{"to": [
            {"namespaceSelector": ns_sel("z")}]}])],
        lambda s, d, p, pr: d != "x/a" and (s != "x/a" or d.startswith("z/"))),
    "ingress and egress both checked for pods on one node": (
        [policy("in", podSelector=pod_sel("b"), ingress=[{"from": [
            {"podSelector": pod_sel("a")}], "ports": [{"port": 80}]}]),
         policy("out", podSelector=pod_sel("a"), policyTypes=["Egress"], egress=[{"ports": [
             {"port": 80}, {"port": 81}]}])],
        lambda s, d, p, pr: (s != "x/a" or pr == "TCP") and (
            d != "x/b" or (s == "x/a" and (p, pr) == (80, "TCP")))),
    "policy in y does not isolate x": (
        [policy("deny", ns="y")], isolated_in({"y/a", "y/b", "y/c"}, lambda s, p, pr: False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reachability_table(case: str) -> None:
    policies, expect = CASES[case]
    state = compute(policies, model_pods(), NAMESPACE_OBJECTS, node_name=None)
    ruleset = RulesetTracer(render_full(state))
    wrong: list[str] = []
    for s, d in itertools.product(ALL, ALL):
        if s == d:
            continue
        for port, proto in itertools.product(PORTS, PROTOCOLS):
            want = expect(s, d, port, proto)
            for src, dst in ((ipv4(s), ipv4(d)), (ipv6(s), ipv6(d))):
                got = trace(state, src, dst, proto, port)
                kernel, _ = ruleset.verdict(src, dst, proto, port)
                if got.allowed != want or kernel != want:
                    wrong.append(f"{s} -> {d} {port}/{proto} {src}: want {want}, "
                                 f"state {got.allowed}, ruleset {kernel}")
    assert not wrong, "\n".join(wrong[:20])


def test_trace_names_the_deciding_policies() -> None:
    policies, _ = CASES["multiple policies are a union"]
    state = compute(policies, model_pods(), NAMESPACE_OBJECTS, node_name=None)
    allowed = trace(state, ipv4("y/b"), ipv4("x/a"), "TCP", 80)
    assert allowed.allowed and allowed.steps[1].allowed_by == ("x/p1 (ingress rule 0)",)
    denied = trace(state, ipv4("y/b"), ipv4("x/a"), "TCP", 81)
    assert not denied.allowed and denied.steps[1].isolated_by == ("x/p1", "x/p2")
    assert "no rule allows: DENIED" in denied.explain()
    node = trace(state, "10.0.0.254", ipv4("x/a"), "TCP", 81, node_addresses=["10.0.0.254"])
    assert node.allowed and "from the node" in node.note


def test_only_pods_of_the_node_are_enforced() -> None:
    pods = [make_pod("x/a", node="n1"), make_pod("x/b", node="n2"), make_pod("y/a", node="n1")]
    state = compute([policy("deny", policyTypes=["Ingress", "Egress"])], pods,
                    NAMESPACE_OBJECTS, node_name="n1")
    assert set(state.ingress) == set(state.egress) == {ipv4("x/a"), ipv6("x/a")}
    assert len(state.groups) == 2


def test_host_network_finished_and_addressless_pods_are_ignored() -> None:
    host = POD.convert({"metadata": {"name": "h", "namespace": "x"},
                        "spec": {"hostNetwork": True, "nodeName": "n1"},
                        "status": {"phase": "Running", "podIP": "192.168.0.1"}})
    done = POD.convert({"metadata": {"name": "d", "namespace": "x"},
                        "spec": {"nodeName": "n1"},
                        "status": {"phase": "Succeeded", "podIP": "10.0.9.9"}})
    pending = POD.convert({"metadata": {"name": "p", "namespace": "x"}})
    state = compute([policy("deny")], [host, done, pending], NAMESPACE_OBJECTS, node_name=None)
    assert not state.ingress and not state.pods


def test_pods_sharing_policies_share_one_group() -> None:
    pods = [make_pod(f"x/p{i}", ips=(f"10.9.0.{i}",)) for i in range(3)]
    state = compute([policy("deny"), policy("allow", ingress=[{"ports": [{"port": 80}]}])],
                    pods, NAMESPACE_OBJECTS, node_name=None)
    assert len(set(state.ingress.values())) == 1 and len(state.ingress) == 3


def test_ip_block_minus_excepts() -> None:
    ranges = ip_block_ranges("10.0.0.0/24", ["10.0.0.0/26", "10.0.0.128/30"])
    assert [str(r) for r in ranges] == ["10.0.0.64/26", "10.0.0.132-10.0.0.255"]


def test_overlapping_grants_render_to_disjoint_elements_credited_to_the_first_policy() -> None:
    policies = [
        policy("a-wide", podSelector=pod_sel("a"), ingress=[{"from": [
            {"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"port": 1, "endPort": 100}]}]),
        policy("b-narrow", podSelector=pod_sel("a"), ingress=[{"from": [
            {"namespaceSelector": {}}], "ports": [{"port": 80}, {"port": 90, "endPort": 200}]}]),
        policy("c-all", podSelector=pod_sel("a"), ingress=[{"from": [
            {"podSelector": pod_sel("b")}]}]),
    ]
    state = compute(policies, model_pods(), NAMESPACE_OBJECTS, node_name=None)
    (group,) = {state.groups[state.ingress[ipv4("x/a")]]}
    elements = dict(group_elements(group, 4))
    assert len(elements) == len(set(elements))
    tracer = RulesetTracer(render_full(state))  # raises if two elements overlap
    ok, passed = tracer.verdict(ipv4("y/b"), ipv4("x/a"), "TCP", 150)
    assert ok and passed == [f"allow-in-{_pid('x/b-narrow')}"]
    ok, passed = tracer.verdict(ipv4("x/b"), ipv4("x/a"), "UDP", 150)
    assert ok and passed == [f"allow-in-{_pid('x/c-all')}"]
    ok, passed = tracer.verdict(ipv4("x/b"), ipv4("x/a"), "TCP", 80)
    assert ok and passed == [f"allow-in-{_pid('x/a-wide')}"]
    assert not tracer.verdict(ipv4("x/c"), ipv4("x/a"), "UDP", 150)[0]


def _pid(key: str) -> str:
    from svcnet.policy.nftables import policy_id

    return policy_id(key)


def test_update_script_touches_only_what_changed() -> None:
    base = [policy("p", podSelector=pod_sel("a"), ingress=[{"from": [
        {"podSelector": pod_sel("b")}]}])]
    pods = model_pods()
    state = compute(base, pods, NAMESPACE_OBJECTS, node_name=None)
    old = render(state)
    name = state.ingress[ipv4("x/a")]
    assert update_script(old, old) == ""
    relabelled = [*pods[:2], make_pod("x/c", pod="b"), *pods[3:]]
    new = render(compute(base, relabelled, NAMESPACE_OBJECTS, node_name=None))
    script = update_script(old, new)
    lines = [ln for ln in script.splitlines() if f"{name}-4 " in ln]
    assert len(script.splitlines()) == 4  # the same two for -6
    assert lines == [f"delete element inet svcnet-policy {name}-4 {{ 10.0.1.2 . 0-255 . 0-65535 }}",
                     f"add element inet svcnet-policy {name}-4 {{ 10.0.1.2/31 . 0-255 . "
                     f"0-65535 : goto allow-in-{_pid('x/p')} }}"]  # x/b and x/c: one range


# --- bad input: one clear error per object ---------------------------------------------------

BAD = {
    "label key": ({"podSelector": {"matchLabels": {"bad key": "v"}}},
                  "spec.podSelector.matchLabels: 'bad key' is not a label key"),
    "label value": ({"podSelector": {"matchLabels": {"k": "-v"}}},
                    "spec.podSelector.matchLabels.k: '-v' is not a label value"),
    "operator": ({"podSelector": {"matchExpressions": [{"key": "k", "operator": "Gt",
                                                        "values": ["1"]}]}},
                 "spec.podSelector.matchExpressions[0].operator: 'Gt' is not a valid"),
    "In without values": (
        {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchExpressions": [
            {"key": "k", "operator": "In", "values": None}]}}]}]},
        "spec.ingress[0].from[0].podSelector.matchExpressions[0].values: must be non-empty"),
    "Exists with values": (
        {"podSelector": {"matchExpressions": [{"key": "k", "operator": "Exists",
                                               "values": ["v"]}]}},
        "spec.podSelector.matchExpressions[0].values: must be empty"),
    "cidr": ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
             "spec.egress[0].to[0].ipBlock.cidr: '10.0.0.0/33' has a prefix longer than 32"),
    "not a cidr": ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]},
                   "spec.egress[0].to[0].ipBlock.cidr: '10.0.0.1' is not a CIDR"),
    "except outside cidr": (
        {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {
            "cidr": "10.0.0.0/24", "except": ["10.0.1.0/28"]}}]}]},
        "spec.ingress[0].from[0].ipBlock.except[0]: '10.0.1.0/28' is not a strict subset"),
    "except equal to cidr": (
        {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {
            "cidr": "10.0.0.0/24", "except": ["10.0.0.0/24"]}}]}]},
        "is not a strict subset"),
    "ipBlock with a selector": (
        {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/24"},
                                                   "podSelector": {}}]}]},
        "spec.ingress[0].from[0].ipBlock: may not be combined"),
    "empty peer": ({"podSelector": {}, "ingress": [{"from": [{}]}]},
                   "spec.ingress[0].from[0]: must specify a peer"),
    "port 0": ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]},
               "spec.ingress[0].ports[0].port: 0 is not a port number"),
    "port 65536": ({"podSelector": {}, "ingress": [{"ports": [{"port": 65536}]}]},
                   "spec.ingress[0].ports[0].port: 65536 is not a port number"),
    "bad port name": ({"podSelector": {}, "ingress": [{"ports": [{"port": "Web_1"}]}]},
                      "spec.ingress[0].ports[0].port: 'Web_1' may contain only"),
    "endPort below port": ({"podSelector": {}, "egress": [{"ports": [
        {"port": 81, "endPort": 80}]}]}, "spec.egress[0].ports[0].endPort: 80 is less than"),
    "endPort with a named port": ({"podSelector": {}, "ingress": [{"ports": [
        {"port": "http", "endPort": 80}]}]}, "endPort: may not be specified when port is a"),
    "endPort without port": ({"podSelector": {}, "ingress": [{"ports": [{"endPort": 80}]}]},
                             "endPort: may not be specified when port is not specified"),
    "protocol": ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]},
                 "spec.ingress[0].ports[0].protocol: Invalid enum value 'ICMP'"),
    "policyTypes": ({"podSelector": {}, "policyTypes": ["Inbound"]},
                    "spec.policyTypes[0]: Invalid enum value 'Inbound'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_policy_is_refused_with_one_clear_error(case: str) -> None:
    spec, message = BAD[case]
    obj = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "bad", "namespace": "x"}, "spec": spec}
    with pytest.raises(InvalidObject) as err:
        NETWORK_POLICY.decode(json.dumps(obj).encode())
    assert str(err.value).startswith("invalid NetworkPolicy x/bad: ")
    assert message in str(err.value), str(err.value)


def test_invalid_named_container_port_is_refused() -> None:
    with pytest.raises(InvalidObject, match=r"spec\.containers\[0\]\.ports\[0\]\.name"):
        POD.decode(json.dumps({"metadata": {"name": "p", "namespace": "x"}, "spec": {
            "containers": [{"name": "c", "ports": [{"name": "HTTP", "containerPort": 80}]}]}}))


def test_null_lists_decode_as_empty() -> None:
    p = NETWORK_POLICY.decode(json.dumps({
        "metadata": {"name": "n", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": None, "matchExpressions": None},
                 "ingress": [{"from": None, "ports": None}], "egress": None,
                 "policyTypes": None}}))
    assert p.spec.ingress[0].from_ == () and p.spec.egress == ()
    assert p.policy_types == ("Ingress",)
    pod = POD.decode(json.dumps({"metadata": {"name": "p", "namespace": "x"},
                                 "spec": {"containers": [{"name": "c", "ports": None}]}}))
    assert pod.spec.containers[0].ports == ()


# --- the renderer's disjoint boxes agree with the grants, whatever overlaps -----------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from svcnet.policy.state import ANY, AddressRange, Grant, Group, PolicyState, PortRange  # noqa: E402

_addresses = st.tuples(st.integers(0, 40), st.integers(0, 12)).map(
    lambda t: AddressRange(4, (10 << 24) + t[0], (10 << 24) + t[0] + t[1]))
_ports = st.one_of(
    st.just(PortRange(ANY)),
    st.tuples(st.sampled_from(["TCP", "UDP", "SCTP"]), st.integers(1, 30), st.integers(0, 6))
    .map(lambda t: PortRange(t[0], t[1], t[1] + t[2])))
_grants = st.lists(st.tuples(st.sampled_from(["ns/p1", "ns/p2", "ns/p3"]),
                             st.lists(_addresses, min_size=1, max_size=4),
                             st.lists(_ports, min_size=1, max_size=3)), max_size=6)


@settings(max_examples=150, deadline=None)
@given(_grants, st.lists(st.tuples(st.integers(0, 60), st.sampled_from(
    ["TCP", "UDP", "SCTP", "ICMP"]), st.integers(0, 40)), min_size=1, max_size=30))
def test_rendered_elements_agree_with_the_grants(
        raw: list[tuple[str, list[AddressRange], list[PortRange]]],
        packets: list[tuple[int, str, int]]) -> None:
    import ipaddress

    grants = tuple(Grant(p, i, tuple(sorted(set(a))), tuple(sorted(set(ports))))
                   for i, (p, a, ports) in enumerate(raw))
    group = Group("in-g", "ingress", tuple(sorted({g.policy for g in grants})) or ("ns/p1",),
                  grants)
    state = PolicyState(groups={"in-g": group}, ingress={"10.200.0.1": "in-g"},
                        pods={"10.200.0.1": "ns/target"}, policies=group.policies)
    tracer = RulesetTracer(render_full(state))  # fails on overlapping elements
    for offset, proto, port in packets:
        src = str(ipaddress.IPv4Address((10 << 24) + offset))
        allowing = sorted(g.policy for g in grants
                          if g.allows(ipaddress.ip_address(src), proto, port))
        ok, passed = tracer.verdict(src, "10.200.0.1", proto, port)
        assert ok == bool(allowing)
        assert ok == trace(state, src, "10.200.0.1", proto, port).allowed
        if ok:
            assert passed == [f"allow-in-{_pid(allowing[0])}"]


def test_memo_gives_what_a_fresh_computation_gives_after_every_change() -> None:
    """A sequence of pod, namespace and policy changes: the state computed with the
    previous call's memo is the state computed from scratch, every time."""
    import random

    from svcnet.policy.state import Memo

    rng = random.Random(7)
    pods = {p.metadata.namespace + "/" + p.metadata.name: p for p in model_pods()}
    spaces = {n.metadata.name: n for n in NAMESPACE_OBJECTS}
    policies = {f"x/{name}": p for name, (ps, _) in list(CASES.items())[:1] for p in ps}
    all_policies = [p for ps, _ in CASES.values() for p in ps]
    memo = Memo()
    for step in range(200):
        what = rng.randrange(6)
        if what == 5 and pods:  # a status update: a new object policy sees the same way
            import msgspec

            ref = rng.choice(sorted(pods))
            raw = msgspec.to_builtins(pods[ref])
            raw["status"]["conditions"] = [{"type": "Ready", "status": rng.choice(
                ["True", "False"])}]
            pods[ref] = POD.convert(raw)
        elif what == 0:
            ref = rng.choice(ALL)
            pods[ref] = make_pod(ref, node=rng.choice(["n1", "n2"]),
                                 pod=rng.choice(PODS), tier=rng.choice(["web", "db"]))
        elif what == 1 and pods:
            ref = rng.choice(sorted(pods))
            del pods[ref]
        elif what == 2:
            name = rng.choice(NAMESPACES)
            spaces[name] = NAMESPACE.convert({"metadata": {"name": name, "labels": {
                "ns": rng.choice(NAMESPACES)}}})
        elif what == 3:
            p = rng.choice(all_policies)
            policies[f"{p.metadata.namespace}/{p.metadata.name}"] = p
        elif policies:
            del policies[rng.choice(sorted(policies))]
        for ref in ALL:
            if ref not in pods and rng.random() < 0.3:
                pods[ref] = make_pod(ref)
        node = "n1" if step % 2 else None
        args = (list(policies.values()), list(pods.values()), list(spaces.values()))
        assert compute(*args, node_name=node, memo=memo) == compute(*args, node_name=node), step


def test_streamed_full_sync_is_the_full_script() -> None:
    from svcnet.policy.nftables import Rendered, full_script, stream_full, stream_full_computing
    from svcnet.policy.state import compute_stream

    for policies, _ in list(CASES.values())[::5]:
        state = compute(policies, model_pods(), NAMESPACE_OBJECTS, node_name=None)
        out: list[Rendered] = []
        streamed = "".join(stream_full(state, out, log=True, log_group=5))
        rendered = render(state, log=True, log_group=5)
        assert out == [rendered]
        assert sorted(streamed.splitlines()) == sorted("".join(full_script(rendered)).splitlines())
        states: list[PolicyState] = []
        out = []
        computing = "".join(stream_full_computing(
            compute_stream(policies, model_pods(), NAMESPACE_OBJECTS, node_name=None,
                           out=states), states, out, log=True, log_group=5))
        assert states == [state] and out == [rendered]
        assert sorted(computing.splitlines()) == sorted(streamed.splitlines())


def test_label_index_selects_what_matching_every_pod_selects(monkeypatch: Any) -> None:
    import random

    from svcnet.policy import state as state_module

    rng = random.Random(3)
    pods = [make_pod(f"x/p{i}", ips=(f"10.7.{i // 250}.{i % 250 + 1}",),
                     app=rng.choice(["a", "b", "c"]), tier=rng.choice(["web", "db"]))
            for i in range(60)]
    policies = [
        policy("web", podSelector={"matchLabels": {"app": "a", "tier": "web"}},
               ingress=[{"from": [{"podSelector": {"matchLabels": {"tier": "db"},
                                                   "matchExpressions": [
                   {"key": "app", "operator": "NotIn", "values": ["c"]}]}}]}]),
        policy("none", podSelector={"matchLabels": {"app": "zzz"}}),
        policy("eg", podSelector={"matchLabels": {"app": "b"}}, policyTypes=["Egress"],
               egress=[{"to": [{"namespaceSelector": {}, "podSelector": {
                   "matchLabels": {"app": "c"}}}]}]),
    ]
    indexed = compute(policies, pods, NAMESPACE_OBJECTS, node_name=None)
    monkeypatch.setattr(state_module, "INDEX_MIN_PODS", 10**9)
    assert indexed == compute(policies, pods, NAMESPACE_OBJECTS, node_name=None)
    assert indexed.ingress and indexed.egress


def test_gc_paused_long_lived_promotes_without_a_young_collection() -> None:
    """A full sync's state goes to the oldest generation when the collector resumes (no
    young collection scanning it), and stays collectable: a cycle made inside is freed by
    the next full collection."""
    import gc
    import weakref

    from svcnet.policy.state import gc_paused

    class Node:
        other: Any = None

    collections: list[int] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    assert gc.isenabled()
    gc.callbacks.append(on_gc)
    try:
        with gc_paused(long_lived=True):
            kept = [[i] for i in range(5000)]  # far past the young threshold
            a, b = Node(), Node()
            a.other, b.other = b, a
            gone = weakref.ref(a)
            del a, b
        assert gc.isenabled()
        survivor = [[]]  # an allocation that would start the young collection
        assert collections == []
        assert gc.get_count()[0] < 10
        assert any(x is kept for x in gc.get_objects(generation=2))
        assert gone() is not None
        gc.collect()
        assert gone() is None
    finally:
        gc.callbacks.remove(on_gc)
    assert survivor and len(kept) == 5000
