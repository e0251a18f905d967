"""The upstream NetworkPolicy reachability matrix, with real traffic in the lab (issue 17).

Kubernetes' e2e suite (test/e2e/network/netpol) builds namespaces x, y, z with pods a, b, c
serving 80 and 81 on TCP, UDP and SCTP, applies a policy and probes every pod pair against a
truth table. This is that model on a 2-node lab on the real control plane (kube-apiserver
validates and defaults every policy, and labels each Namespace with
``kubernetes.io/metadata.name``), with ``svcnet node --policy`` on both nodes: one lab for the
module, policies removed after each case (and the all-allowed matrix back within 2 s).

Every change must show in the matrix within ``DEADLINE`` seconds of kubectl returning: probe
rounds (~0.5 s each: every pair, port and protocol at once) repeat until the observed tables
equal the expected ones, and no round may start after the deadline. See svcnet.lab.netpol.
Then ``svcnet policy trace``'s verdicts, computed from the objects listed afresh, must equal
the same tables: the tracer explains what the datapath does.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import require, running_lab, until
from svcnet.lab import netpol
from svcnet.lab.netns import RealKernel
from svcnet.lab.netpol import (
    ALL_PODS,
    Model,
    PodRef,
    Probe,
    Prober,
    Reachability,
    kubectl,
    policy,
)
from svcnet.lab.state import LabConfig

DEADLINE = 2.0
"""Seconds from a policy change (kubectl returned) to the matrix showing it (issue 17)."""
FIRST_DEADLINE = 60.0
"""The first matrix of a fresh lab: pods just became Ready, Services just got endpoints."""
ALL_PROBES: tuple[Probe, ...] = tuple((port, proto) for proto in netpol.PROTOCOLS
                                      for port in netpol.PORTS)
TCP80: tuple[Probe, ...] = ((80, "TCP"),)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def P(ref: str) -> PodRef:
    ns, _, name = ref.partition("/")
    return PodRef(ns, name)


# --- the lab ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabConfig]:
    with running_lab(tmp_path_factory.mktemp("lab"), "m", nodes=2, binaries=("nft",),
                     dns=False, policy=True) as cfg:
        yield cfg


def bridge_netfilter(ns: str) -> str:
    from svcnet.lab.netns import in_netns_thread

    def read() -> str:
        try:
            return Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip()
        except OSError:
            return "missing"

    return str(in_netns_thread(ns, read))


@pytest.fixture(scope="module")
def model(lab: LabConfig) -> Model:
    # Same-node pairs are bridged: only br_netfilter shows them to the policy's hooks.
    for node in lab.node_names:
        state = bridge_netfilter(lab.node_ns(node))
        require(state == "1", f"bridge-nf-call-iptables is {state} in {node}: needs "
                "br_netfilter (same-node pod pairs are not judged without it)")
    m = netpol.deploy(lab, timeout=180)
    assert len(set(m.nodes.values())) == 2, m.nodes
    return m


@pytest.fixture(scope="module")
def prober(model: Model) -> Prober:
    return Prober(model.netns)


@pytest.fixture
def enforcing(lab: LabConfig, model: Model, prober: Prober) -> Iterator[LabConfig]:
    """A case that needs enforcement; afterwards its policies are deleted and the whole
    matrix must be connected again within the deadline (that is the delete test of every
    case)."""
    require(lab.policy, "needs svcnet.policy (svcnet node --policy)")
    yield lab
    netpol.remove_policies(lab)
    expect(prober, model.pod_targets(), {p: Reachability.all() for p in ALL_PROBES},
           "after removing the case's policies")


TIMES: list[tuple[float, str]] = []
"""Seconds from each change to the start of the probe round that saw it all (printed at the
end of the module)."""


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    if TIMES:
        ordered = sorted(TIMES)
        slowest = ", ".join(f"{title} {t:.2f} s" for t, title in ordered[-3:])
        print(f"\n{len(ordered)} changes: the first matching round started after: median "
              f"{ordered[len(ordered) // 2][0]:.2f} s, max {ordered[-1][0]:.2f} s "
              f"(slowest: {slowest})", file=sys.stderr)


def expect(prober: Prober, targets: Mapping[PodRef, netpol.Target],
           tables: Mapping[Probe, Reachability], title: str,
           deadline: float = DEADLINE) -> netpol.Outcome:
    outcome = netpol.check(prober, targets, tables, deadline=deadline)
    print(f"{title}: {outcome.rounds} rounds, matching round started after "
          f"{outcome.last_round_start:.2f} s, ended after {outcome.seconds:.2f} s", file=sys.stderr)
    if deadline == DEADLINE and outcome.matched:
        TIMES.append((outcome.last_round_start, title))
    assert outcome.matched, outcome.report(title)
    return outcome


def apply(lab: LabConfig, *docs: dict[str, Any]) -> None:
    netpol.apply(lab, docs)


def case(lab: LabConfig, model: Model, prober: Prober, docs: list[dict[str, Any]],
         allowed: Callable[[PodRef, PodRef, Probe], bool],
         probes: tuple[Probe, ...] = ALL_PROBES, title: str = "") -> None:
    """Apply ``docs``; within the deadline every probe must be connected iff ``allowed``."""
    apply(lab, *docs)
    tables = {p: Reachability.where(lambda s, d, p=p: allowed(s, d, p)) for p in probes}
    title = title or docs[0]["metadata"]["name"]
    expect(prober, model.pod_targets(), tables, title)
    agree_with_tracer(lab, model, tables, title)


def agree_with_tracer(lab: LabConfig, model: Model, tables: Mapping[Probe, Reachability],
                      title: str) -> None:
    """``svcnet policy trace`` (the desired state) says what the datapath just did."""
    for probe, table in netpol.traced(lab, model, tables).items():
        table.expected = dict(tables[probe].expected)
        assert not table.wrong(), table.report(f"{title}: the tracer, {probe}")


def test_every_node_daemon_enforces_policy(lab: LabConfig, model: Model) -> None:
    """``LabConfig.policy``: ``--policy --policy-node-name nI`` on every node daemon, which
    serves its health page (``svcnet lab status``) once synced."""
    from svcnet.lab.procs import Procs
    from svcnet.lab.status import node_health

    require(lab.policy, "needs svcnet.policy (svcnet node --policy)")
    procs = Procs(Path(lab.lab_dir))
    for node in lab.node_names:
        rec = procs.get(f"node-{node}")
        assert rec is not None and procs.running(rec)
        argv = list(rec.argv)
        assert argv[argv.index("--policy-node-name") + 1] == node and "--policy" in argv
        assert until(lambda n=node: "policy=200" in node_health(lab, n), 30, 0.2), (
            node, node_health(lab, node))


def test_every_pair_connects_on_every_port_and_protocol_without_policies(
        model: Model, prober: Prober) -> None:
    start = time.monotonic()
    expect(prober, model.pod_targets(), {p: Reachability.all() for p in ALL_PROBES},
           "no policies", deadline=FIRST_DEADLINE)
    # Once warm, a whole matrix (9x9 pairs x 6 port/protocols) is one bounded round.
    outcome = expect(prober, model.pod_targets(), {p: Reachability.all() for p in ALL_PROBES},
                     "no policies, again")
    assert outcome.rounds == 1, outcome.report("warm")
    print(f"first matrix after {time.monotonic() - start:.1f} s", file=sys.stderr)


def test_services_reach_their_pod_without_policies(model: Model, prober: Prober) -> None:
    tables = {p: Reachability.all() for p in ((80, "TCP"), (81, "UDP"), (80, "SCTP"))}
    expect(prober, model.service_targets(), tables, "services, no policies",
           deadline=FIRST_DEADLINE)


# --- the suite's cases -----------------------------------------------------------------------


def test_default_deny_ingress(enforcing: LabConfig, model: Model, prober: Prober) -> None:
    case(enforcing, model, prober,
         [policy("x", "deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})],
         lambda _s, d, _p: d.namespace != "x")


def test_default_deny_egress(enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """Probed by IP, so DNS needs no exception (upstream allows port 53 for its names)."""
    case(enforcing, model, prober,
         [policy("x", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]})],
         lambda s, _d, _p: s.namespace != "x")


def test_default_deny_all_and_the_node_still_reaches_its_own_pods(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """x is isolated both ways, yet each node still reaches its own pods of x (kubelet
    probes, as every implementation allows), so they stay Ready."""
    case(enforcing, model, prober,
         [policy("x", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})],
         lambda s, d, _p: s.namespace != "x" and d.namespace != "x")
    nodes = {PodRef("node", n): enforcing.node_ns(n) for n in enforcing.node_names}
    from_nodes = Prober(nodes)
    jobs = [netpol.Job(PodRef("node", model.nodes[pod]), pod, model.pod_ips[pod], port,
                       proto, pod.name)
            for pod in ALL_PODS if pod.namespace == "x" for port, proto in ALL_PROBES]
    results = from_nodes.probe(jobs, 1.5)
    assert all(ok for ok, _ in results.values()), {
        f"{j.src.name} -> {j.dst} {j.port}/{j.protocol}": why for j, (ok, why) in
        results.items() if not ok}
    ready = kubectl(enforcing, "get", "pods", "-n", "x", "-o",
                    "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}")
    assert ready.stdout.split() == ["True"] * 3, ready.stdout


def test_policy_types_default_to_ingress_plus_egress_when_egress_rules_exist(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """No policyTypes + egress rules = [Ingress, Egress]: x/a is isolated for ingress too."""
    case(enforcing, model, prober,
         [policy("x", "egress-to-x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                      "egress": [{"to": [{"podSelector": {}}]}]})],
         lambda s, d, _p: (d != P("x/a")) and (s != P("x/a") or d.namespace == "x"),
         probes=((80, "TCP"), (81, "UDP")))


def test_allow_from_namespace_by_its_metadata_name_label(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    selector = {"matchLabels": {"kubernetes.io/metadata.name": "y"}}
    case(enforcing, model, prober,
         [policy("x", "from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                                 "ingress": [{"from": [{"namespaceSelector": selector}]}]})],
         lambda s, d, _p: d != P("x/a") or s.namespace == "y")


def test_allow_from_namespace_with_match_expressions(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    selector = {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["y"]}]}
    case(enforcing, model, prober,
         [policy("x", "not-from-y", {"podSelector": {"matchLabels": {"pod": "a"}},
                                     "ingress": [{"from": [{"namespaceSelector": selector}]}]})],
         lambda s, d, _p: d != P("x/a") or s.namespace != "y", probes=TCP80)


def test_allow_from_pod_in_the_same_namespace(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    case(enforcing, model, prober,
         [policy("x", "from-b", {"podSelector": {"matchLabels": {"pod": "a"}},
                                 "ingress": [{"from": [{"podSelector": {
                                     "matchLabels": {"pod": "b"}}}]}]})],
         lambda s, d, _p: d != P("x/a") or s == P("x/b"))


def test_allow_from_namespace_and_pod_together(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    peer = {"namespaceSelector": {"matchLabels": {"ns": "y"}},
            "podSelector": {"matchLabels": {"pod": "b"}}}
    case(enforcing, model, prober,
         [policy("x", "from-y-b", {"podSelector": {"matchLabels": {"pod": "a"}},
                                   "ingress": [{"from": [peer]}]})],
         lambda s, d, _p: d != P("x/a") or s == P("y/b"))


def test_allow_from_namespace_or_pod(enforcing: LabConfig, model: Model, prober: Prober) -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"ns": "y"}}},
             {"podSelector": {"matchLabels": {"pod": "b"}}}]
    case(enforcing, model, prober,
         [policy("x", "from-y-or-b", {"podSelector": {"matchLabels": {"pod": "a"}},
                                      "ingress": [{"from": peers}]})],
         lambda s, d, _p: d != P("x/a") or s.namespace == "y" or s == P("x/b"))


def test_ingress_ip_block_with_except(enforcing: LabConfig, model: Model, prober: Prober
                                      ) -> None:
    yb = model.pod_ips[P("y/b")]
    block = {"cidr": "10.244.0.0/16", "except": [f"{yb}/32"]}
    case(enforcing, model, prober,
         [policy("x", "ipblock", {"podSelector": {"matchLabels": {"pod": "a"}},
                                  "ingress": [{"from": [{"ipBlock": block}]}]})],
         lambda s, d, _p: d != P("x/a") or s != P("y/b"))


def test_egress_ip_block_with_except(enforcing: LabConfig, model: Model, prober: Prober
                                     ) -> None:
    xa = model.pod_ips[P("x/a")]
    block = {"cidr": "10.244.0.0/16", "except": [f"{xa}/32"]}
    case(enforcing, model, prober,
         [policy("y", "egress-ipblock", {"podSelector": {}, "policyTypes": ["Egress"],
                                         "egress": [{"to": [{"ipBlock": block}]}]})],
         lambda s, d, _p: s.namespace != "y" or d != P("x/a"), probes=((80, "TCP"),
                                                                         (80, "UDP")))


def test_ip_in_an_except_is_allowed_by_another_policy(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """Upstream: 'should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is
    allowed' -- the union of the policies decides."""
    yb = model.pod_ips[P("y/b")]
    on_a = {"matchLabels": {"pod": "a"}}
    docs = [policy("x", "ipblock", {"podSelector": on_a, "ingress": [{"from": [{"ipBlock": {
                "cidr": "10.244.0.0/16", "except": [f"{yb}/32"]}}]}]}),
            policy("x", "ipblock-yb", {"podSelector": on_a, "ingress": [{"from": [{
                "ipBlock": {"cidr": f"{yb}/32"}}]}]})]
    case(enforcing, model, prober, docs, lambda _s, _d, _p: True,
         probes=((80, "TCP"), (80, "UDP")))
    kubectl(enforcing, "delete", "networkpolicy", "-n", "x", "ipblock-yb")
    expect(prober, model.pod_targets(),
           {p: Reachability.where(lambda s, d: d != P("x/a") or s != P("y/b"))
            for p in ((80, "TCP"), (80, "UDP"))}, "only the except left")


def test_named_ports_resolve_per_protocol(enforcing: LabConfig, model: Model, prober: Prober
                                          ) -> None:
    ports = [{"port": "serve-81-tcp"}, {"port": "serve-80-udp", "protocol": "UDP"},
             {"port": "serve-81-sctp", "protocol": "SCTP"}]
    opened = {(81, "TCP"), (80, "UDP"), (81, "SCTP")}
    case(enforcing, model, prober,
         [policy("x", "named", {"podSelector": {"matchLabels": {"pod": "a"}},
                                "ingress": [{"ports": ports}]})],
         lambda _s, d, p: d != P("x/a") or p in opened)


def test_egress_named_port_resolves_on_the_destination_pods(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """An egress rule's named port is the peer's container port of that name."""
    case(enforcing, model, prober,
         [policy("x", "egress-named", {"podSelector": {}, "policyTypes": ["Egress"],
                                       "egress": [{"ports": [{"port": "serve-80-udp",
                                                              "protocol": "UDP"}]}]})],
         lambda s, _d, p: s.namespace != "x" or p == (80, "UDP"),
         probes=((80, "TCP"), (80, "UDP"), (81, "UDP")))


def test_protocol_without_port_opens_every_port_of_that_protocol(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    case(enforcing, model, prober,
         [policy("x", "any-udp", {"podSelector": {"matchLabels": {"pod": "a"}},
                                  "ingress": [{"ports": [{"protocol": "UDP"}]}]})],
         lambda _s, d, p: d != P("x/a") or p[1] == "UDP")


def test_sctp_and_udp_ports_are_not_tcp(enforcing: LabConfig, model: Model, prober: Prober
                                        ) -> None:
    """Upstream: 'should not mistakenly treat protocol: SCTP as protocol: TCP' (and UDP)."""
    case(enforcing, model, prober,
         [policy("x", "sctp-udp-81", {"podSelector": {"matchLabels": {"pod": "a"}},
                                      "ingress": [{"ports": [
                                          {"port": 81, "protocol": "SCTP"},
                                          {"port": 81, "protocol": "UDP"}]}]})],
         lambda _s, d, p: d != P("x/a") or p in ((81, "SCTP"), (81, "UDP")))


def test_end_port_range(enforcing: LabConfig, model: Model, prober: Prober) -> None:
    ports = [{"port": 81, "endPort": 90, "protocol": "TCP"},
             {"port": 70, "endPort": 80, "protocol": "UDP"}]
    opened = {(81, "TCP"), (80, "UDP")}
    case(enforcing, model, prober,
         [policy("x", "endport", {"podSelector": {"matchLabels": {"pod": "a"}},
                                  "ingress": [{"ports": ports}]})],
         lambda _s, d, p: d != P("x/a") or p in opened,
         probes=((80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")))


def test_multiple_policies_are_a_union(enforcing: LabConfig, model: Model, prober: Prober
                                       ) -> None:
    """One policy opens 80/TCP to x/a from x/b, another 81/TCP from namespace z."""
    on_a = {"matchLabels": {"pod": "a"}}
    docs = [policy("x", "from-b-80", {"podSelector": on_a, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                 "ports": [{"port": 80}]}]}),
            policy("x", "from-z-81", {"podSelector": on_a, "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}],
                 "ports": [{"port": 81}]}]})]

    def allowed(s: PodRef, d: PodRef, p: Probe) -> bool:
        return d != P("x/a") or (p == (80, "TCP") and s == P("x/b")) or (
            p == (81, "TCP") and s.namespace == "z")

    case(enforcing, model, prober, docs, allowed, probes=((80, "TCP"), (81, "TCP")))


def test_allow_all_ingress_overrides_default_deny(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    case(enforcing, model, prober,
         [policy("x", "deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})],
         lambda _s, d, _p: d.namespace != "x", probes=((80, "TCP"), (81, "UDP")))
    case(enforcing, model, prober,
         [policy("x", "allow-all", {"podSelector": {}, "ingress": [{}]})],
         lambda _s, _d, _p: True, probes=((80, "TCP"), (81, "UDP")), title="+ allow-all")


def test_allow_all_egress_overrides_default_deny(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    case(enforcing, model, prober,
         [policy("y", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]})],
         lambda s, _d, _p: s.namespace != "y", probes=((80, "TCP"), (81, "SCTP")))
    case(enforcing, model, prober,
         [policy("y", "allow-all", {"podSelector": {}, "policyTypes": ["Egress"],
                                    "egress": [{}]})],
         lambda _s, _d, _p: True, probes=((80, "TCP"), (81, "SCTP")), title="+ allow-all")


def test_deny_egress_and_ingress_together_and_both_ends_must_allow(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """x/a's ingress allows y/b, but y denies all egress except to namespace z: blocked."""
    docs = [policy("x", "from-y-b", {"podSelector": {"matchLabels": {"pod": "a"}},
                                     "ingress": [{"from": [{
                                         "namespaceSelector": {"matchLabels": {"ns": "y"}},
                                         "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            policy("y", "egress-to-z", {"podSelector": {}, "egress": [{"to": [{
                "namespaceSelector": {"matchLabels": {"ns": "z"}}}]}],
                "policyTypes": ["Egress"]})]
    case(enforcing, model, prober, docs,
         lambda s, d, _p: d != P("x/a") and (s.namespace != "y" or d.namespace == "z"),
         probes=((80, "TCP"), (80, "UDP")))


def test_policy_update_changes_the_matrix_within_the_deadline(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    on_a = {"matchLabels": {"pod": "a"}}

    def from_ns(ns: str) -> dict[str, Any]:
        return policy("x", "allow-ns", {"podSelector": on_a, "ingress": [{"from": [{
            "namespaceSelector": {"matchLabels": {"ns": ns}}}]}]})

    probes = ((80, "TCP"), (81, "UDP"))
    case(enforcing, model, prober, [from_ns("y")],
         lambda s, d, _p: d != P("x/a") or s.namespace == "y", probes)
    case(enforcing, model, prober, [from_ns("z")],
         lambda s, d, _p: d != P("x/a") or s.namespace == "z", probes, title="updated to z")
    kubectl(enforcing, "delete", "networkpolicy", "-n", "x", "allow-ns")
    expect(prober, model.pod_targets(), {p: Reachability.all() for p in probes}, "deleted")


def test_namespace_label_change_changes_the_matrix_within_the_deadline(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    probes = ((80, "TCP"),)
    case(enforcing, model, prober,
         [policy("x", "from-red", {"podSelector": {"matchLabels": {"pod": "a"}},
                                   "ingress": [{"from": [{"namespaceSelector": {
                                       "matchLabels": {"team": "red"}}}]}]})],
         lambda _s, d, _p: d != P("x/a"), probes)
    try:
        kubectl(enforcing, "label", "ns", "z", "team=red")
        tables = {p: Reachability.where(lambda s, d: d != P("x/a") or s.namespace == "z")
                  for p in probes}
        expect(prober, model.pod_targets(), tables, "z labelled team=red")
        agree_with_tracer(enforcing, model, tables, "z labelled team=red")
    finally:
        kubectl(enforcing, "label", "ns", "z", "team-")


def test_pod_label_change_changes_the_matrix_within_the_deadline(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    probes = ((80, "TCP"),)
    case(enforcing, model, prober,
         [policy("x", "from-clients", {"podSelector": {"matchLabels": {"pod": "a"}},
                                       "ingress": [{"from": [{
                                           "namespaceSelector": {},
                                           "podSelector": {"matchLabels": {"role": "client"}}
                                       }]}]})],
         lambda _s, d, _p: d != P("x/a"), probes)
    try:
        kubectl(enforcing, "label", "pod", "-n", "y", "c", "role=client")
        tables = {p: Reachability.where(lambda s, d: d != P("x/a") or s == P("y/c"))
                  for p in probes}
        expect(prober, model.pod_targets(), tables, "y/c labelled role=client")
        agree_with_tracer(enforcing, model, tables, "y/c labelled role=client")
    finally:
        kubectl(enforcing, "label", "pod", "-n", "y", "c", "role-")


def test_pod_newly_selected_by_a_policy_is_isolated_within_the_deadline(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """Upstream: 'should deny ingress access to updated pod'."""
    probes = ((80, "TCP"), (80, "UDP"))
    case(enforcing, model, prober,
         [policy("x", "deny-targets", {"podSelector": {"matchLabels": {"target": "yes"}},
                                       "policyTypes": ["Ingress"]})],
         lambda _s, _d, _p: True, probes)
    try:
        kubectl(enforcing, "label", "pod", "-n", "x", "c", "target=yes")
        tables = {p: Reachability.where(lambda _s, d: d != P("x/c")) for p in probes}
        expect(prober, model.pod_targets(), tables, "x/c labelled target=yes")
        agree_with_tracer(enforcing, model, tables, "x/c labelled target=yes")
    finally:
        kubectl(enforcing, "label", "pod", "-n", "x", "c", "target-")


def test_enforcement_outlives_a_killed_node_daemon_and_converges_after_restart(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """SIGKILL n1's daemon: its rules stay in force; a policy added meanwhile is enforced on
    n2 only (n1's kernel is untouched); restarted, n1 converges (a full sync)."""
    from svcnet.lab.procs import Procs

    probes = ((80, "TCP"), (81, "UDP"))
    case(enforcing, model, prober,
         [policy("x", "deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})],
         lambda _s, d, _p: d.namespace != "x", probes)
    procs = Procs(Path(enforcing.lab_dir))
    procs.stop("node-n1", signal_kill=True)
    try:
        deny = {p: Reachability.where(lambda _s, d: d.namespace != "x") for p in probes}
        expect(prober, model.pod_targets(), deny, "n1's daemon dead", deadline=0)
        apply(enforcing, policy("x", "from-y", {"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}))

        def split(s: PodRef, d: PodRef) -> bool:
            if d.namespace != "x":
                return True
            return s.namespace == "y" and model.nodes[d] != "n1"

        expect(prober, model.pod_targets(), {p: Reachability.where(split) for p in probes},
               "from-y added while n1's daemon is dead: n2 only")
    finally:
        procs.restart(RealKernel(), "node-n1")
    expect(prober, model.pod_targets(),
           {p: Reachability.where(lambda s, d: d.namespace != "x" or s.namespace == "y")
            for p in probes}, "n1's daemon restarted", deadline=FIRST_DEADLINE)


def test_egress_to_a_service_is_judged_on_its_endpoint(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """y may only talk to x/a; through the Services' ClusterIPs that is s-a in x only:
    the proxy's DNAT happens first and the policy sees the endpoint."""
    to_xa = {"namespaceSelector": {"matchLabels": {"ns": "x"}},
             "podSelector": {"matchLabels": {"pod": "a"}}}
    apply(enforcing, policy("y", "egress-to-x-a", {
        "podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [to_xa]}]}))
    probes = ((80, "TCP"), (81, "UDP"), (81, "SCTP"))
    tables = {p: Reachability.where(lambda s, d: s.namespace != "y" or d == P("x/a"))
              for p in probes}
    expect(prober, model.service_targets(), tables, "egress through ClusterIPs")
    expect(prober, model.pod_targets(), tables, "egress to pod IPs")
    agree_with_tracer(enforcing, model, tables, "egress")


def test_ingress_through_a_service_is_judged_on_the_client(
        enforcing: LabConfig, model: Model, prober: Prober) -> None:
    """x/b admits only namespace z: a client in y is refused through s-b's ClusterIP too
    (the proxy does not masquerade pod-to-service traffic)."""
    case(enforcing, model, prober,
         [policy("x", "b-from-z", {"podSelector": {"matchLabels": {"pod": "b"}},
                                   "ingress": [{"from": [{"namespaceSelector": {
                                       "matchLabels": {"ns": "z"}}}]}]})],
         lambda s, d, _p: d != P("x/b") or s.namespace == "z", ((80, "TCP"),))
    expect(prober, model.service_targets(),
           {(80, "TCP"): Reachability.where(lambda s, d: d != P("x/b") or s.namespace == "z")},
           "ingress through ClusterIPs")


def test_prober_sees_cells_a_filter_blocks(lab: LabConfig, model: Model, prober: Prober
                                           ) -> None:
    """The harness can fail: a drop rule for port 81 inside x/a's own namespace blocks
    exactly the 81 cells into x/a on every protocol, and nothing else."""
    ns = model.netns[P("x/a")]
    rules = ("table inet mtx {\n chain in {\n  type filter hook input priority 0;\n"
             "  meta l4proto { tcp, udp, sctp } th dport 81 drop\n }\n}\n")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
                   check=True, timeout=30)
    try:
        tables = {p: Reachability.where(lambda _s, d, p=p: d != P("x/a") or p[0] != 81)
                  for p in ALL_PROBES}
        outcome = netpol.check(prober, model.pod_targets(), tables, deadline=DEADLINE)
        assert outcome.matched, outcome.report("drop 81 into x/a")
        wrong = {p: Reachability.all() for p in ALL_PROBES}
        outcome = netpol.check(prober, model.pod_targets(), wrong, deadline=0)
        assert not outcome.matched
        report = outcome.report("all expected")
        assert "81/TCP: 8 of 72 cells wrong" in report, report
        assert "z/c -> x/a: expected connected, observed timeout" in report, report
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "mtx"],
                       check=True, timeout=30)
