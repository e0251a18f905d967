"""The backend-independent desired state: endpoint selection and change tracking."""

from __future__ import annotations

from typing import Any

import pytest
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.state import (
    ChangeTracker,
    FrontendKind,
    NodeConfig,
    PortKey,
    ServicePortState,
    service_ports,
)

NODE = NodeConfig(name="n1", zone="z1", nodeport_addresses=("192.168.1.1", "fd00::1"))


def ports(svc: dict[str, Any], *slices: dict[str, Any], node: NodeConfig = NODE
          ) -> list[ServicePortState]:
    return service_ports(to_service(svc), [to_slice(s) for s in slices], node)


def ips(backends: Any) -> list[str]:
    return [b.ip for b in backends]


def test_frontends_of_every_kind() -> None:
    svc = service("web", "10.96.0.10", port(80, node_port=30080), type="LoadBalancer",
                  externalIPs=["203.0.113.5"], lb_ips=["198.51.100.7"])
    [p] = ports(svc)
    assert [(f.kind, f.ip, f.port) for f in p.frontends] == [
        (FrontendKind.CLUSTER_IP, "10.96.0.10", 80),
        (FrontendKind.NODE_PORT, "192.168.1.1", 30080),
        (FrontendKind.EXTERNAL_IP, "203.0.113.5", 80),
        (FrontendKind.LOAD_BALANCER, "198.51.100.7", 80),
    ]


def test_load_balancer_ip_mode_proxy_is_not_a_frontend() -> None:
    svc = service("web", "10.96.0.10", type="LoadBalancer", lb_ips=["198.51.100.7"],
                  lb_ip_mode="Proxy")
    [p] = ports(svc)
    assert [f.kind for f in p.frontends] == [FrontendKind.CLUSTER_IP]


@pytest.mark.parametrize("svc", [
    service("h", "None"),
    service("x", "10.96.0.3", type="ExternalName", externalName="example.com"),
    service("o", "10.96.0.4", labels={"service.kubernetes.io/service-proxy-name": "other"}),
])
def test_skipped_services(svc: dict[str, Any]) -> None:
    assert ports(svc) == []


def test_ready_endpoints_then_serving_terminating_fallback() -> None:
    svc = service("web", "10.96.0.10")
    both = endpoint_slice("web", endpoint("10.1.0.1"), endpoint("10.1.0.2", ready=False),
                          endpoint("10.1.0.3", ready=False, serving=True, terminating=True))
    [p] = ports(svc, both)
    assert ips(p.cluster_endpoints) == ["10.1.0.1"]
    only_terminating = endpoint_slice(
        "web", endpoint("10.1.0.2", ready=False),
        endpoint("10.1.0.3", ready=False, serving=True, terminating=True))
    [p] = ports(svc, only_terminating)
    assert ips(p.cluster_endpoints) == ["10.1.0.3"]
    assert p.has_endpoints


def test_no_endpoints() -> None:
    sl = endpoint_slice("web", endpoint("10.1.0.1", ready=False))
    [p] = ports(service("web", "10.96.0.10"), sl)
    assert p.cluster_endpoints == () and not p.has_endpoints


def test_named_ports_matched_by_name_and_protocol() -> None:
    svc = service("dns", "10.96.0.10", port(53, "dns", "UDP", target="dns"),
                  port(53, "dns-tcp", "TCP", target="dns-tcp"))
    sl = endpoint_slice("dns", endpoint("10.1.0.1"),
                        ports=[("dns", 5353, "UDP"), ("dns-tcp", 5354, "TCP")])
    got = {(p.key.port_name, p.protocol): [str(b) for b in p.cluster_endpoints]
           for p in ports(svc, sl)}
    assert got == {("dns", "UDP"): ["10.1.0.1:5353"], ("dns-tcp", "TCP"): ["10.1.0.1:5354"]}


def test_endpoints_merged_across_slices_sorted() -> None:
    svc = service("web", "10.96.0.10")
    a = endpoint_slice("web", endpoint("10.1.0.9"), endpoint("10.1.0.1"), name="a")
    b = endpoint_slice("web", endpoint("10.1.0.1"), endpoint("10.1.0.5"), name="b")
    [p] = ports(svc, a, b)
    assert ips(p.cluster_endpoints) == ["10.1.0.1", "10.1.0.5", "10.1.0.9"]


def test_traffic_policies_local() -> None:
    svc = service("web", "10.96.0.10", port(80, node_port=30080), type="NodePort",
                  externalTrafficPolicy="Local")
    sl = endpoint_slice("web", endpoint("10.1.0.1", node="n1"), endpoint("10.1.0.2", node="n2"))
    [p] = ports(svc, sl)
    assert ips(p.internal_endpoints) == ["10.1.0.1", "10.1.0.2"]
    assert ips(p.external_endpoints) == ["10.1.0.1"]
    [p] = ports(svc, sl, node=NodeConfig(name="n3", nodeport_addresses=("192.168.1.3",)))
    assert p.external_endpoints == () and p.has_endpoints
    itp = service("web", "10.96.0.10", internalTrafficPolicy="Local")
    [p] = ports(itp, sl)
    assert ips(p.internal_endpoints) == ["10.1.0.1"]


def test_external_policy_local_ignored_without_external_frontends() -> None:
    svc = service("web", "10.96.0.10", externalTrafficPolicy="Local")
    [p] = ports(svc, endpoint_slice("web", endpoint("10.1.0.2", node="n2")))
    assert not p.external_local and ips(p.internal_endpoints) == ["10.1.0.2"]


def test_local_falls_back_to_local_serving_terminating() -> None:
    svc = service("web", "10.96.0.10", internalTrafficPolicy="Local")
    sl = endpoint_slice("web", endpoint("10.1.0.1", node="n1", ready=False, serving=True,
                                        terminating=True), endpoint("10.1.0.2", node="n2"))
    [p] = ports(svc, sl)
    assert ips(p.internal_endpoints) == ["10.1.0.1"]


def test_health_check_node_port_only_for_local_load_balancers() -> None:
    svc = service("web", "10.96.0.10", port(80, node_port=30080), type="LoadBalancer",
                  externalTrafficPolicy="Local", healthCheckNodePort=32000)
    sl = endpoint_slice("web", endpoint("10.1.0.1", node="n1"), endpoint("10.1.0.2", node="n1"))
    [p] = ports(svc, sl)
    assert p.health_check_node_port == 32000 and p.local_ready_count == 2


@pytest.mark.parametrize(("eps", "expected"), [
    # every endpoint hinted, one for our zone: only ours
    ([endpoint("10.1.0.1", zones=["z1"]), endpoint("10.1.0.2", zones=["z2"])], ["10.1.0.1"]),
    # one endpoint without a hint: hints ignored
    ([endpoint("10.1.0.1", zones=["z1"]), endpoint("10.1.0.2")], ["10.1.0.1", "10.1.0.2"]),
    # no endpoint for our zone: hints ignored
    ([endpoint("10.1.0.1", zones=["z2"]), endpoint("10.1.0.2", zones=["z3"])],
     ["10.1.0.1", "10.1.0.2"]),
    # node hints win over zone hints
    ([endpoint("10.1.0.1", zones=["z1"], nodes=["n2"]),
      endpoint("10.1.0.2", zones=["z1"], nodes=["n1"])], ["10.1.0.2"]),
])
def test_topology_hints(eps: list[dict[str, Any]], expected: list[str]) -> None:
    [p] = ports(service("web", "10.96.0.10"), endpoint_slice("web", *eps))
    assert ips(p.cluster_endpoints) == expected


def test_dual_stack_one_state_per_family() -> None:
    svc = service("web", ["10.96.0.10", "fd00:96::10"], port(80, node_port=30080),
                  type="NodePort")
    v4 = endpoint_slice("web", endpoint("10.1.0.1"), name="v4")
    v6 = endpoint_slice("web", endpoint("fd00:1::1"), name="v6")
    got = {p.family: (p.frontends[0].ip, [f.ip for f in p.frontends[1:]], ips(p.cluster_endpoints))
           for p in ports(svc, v4, v6)}
    assert got == {4: ("10.96.0.10", ["192.168.1.1"], ["10.1.0.1"]),
                   6: ("fd00:96::10", ["fd00::1"], ["fd00:1::1"])}


def test_affinity_and_source_ranges() -> None:
    svc = service("web", "10.96.0.10", type="LoadBalancer", lb_ips=["198.51.100.7"],
                  sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
                  loadBalancerSourceRanges=["203.0.113.0/24", "2001:db8::/64"])
    [p] = ports(svc)
    assert p.affinity_timeout == 60 and p.source_ranges == ("203.0.113.0/24",)


class FakeCache:
    def __init__(self) -> None:
        self.services: dict[str, Any] = {}
        self.slices: dict[str, Any] = {}

    def svc(self, key: str) -> Any:
        return self.services.get(key)

    def eps(self, key: str) -> list[Any]:
        return [s for s in self.slices.values()
                if f"{s.metadata.namespace}/{s.service_name}" == key]


def test_tracker_reports_only_what_changed() -> None:
    cache, tracker = FakeCache(), ChangeTracker(NODE)
    a, b = to_service(service("a", "10.96.0.1")), to_service(service("b", "10.96.0.2"))
    cache.services = {"default/a": a, "default/b": b}
    tracker.service_changed(None, a)
    tracker.service_changed(None, b)
    first = tracker.drain(cache.svc, cache.eps, lambda: cache.services)
    assert sorted(str(k) for k in first.changed) == ["default/a/tcp/v4", "default/b/tcp/v4"]
    assert all(c.previous is None for c in first.changed.values())

    sl = to_slice(endpoint_slice("a", endpoint("10.1.0.1")))
    cache.slices["default/a-slice"] = sl
    tracker.slice_changed(None, sl)
    second = tracker.drain(cache.svc, cache.eps)
    key = PortKey("default", "a", "", "TCP", 4)
    assert list(second.changed) == [key]
    change = second.changed[key]
    assert change.previous is not None and change.previous.cluster_endpoints == ()
    assert change.current is not None and ips(change.current.cluster_endpoints) == ["10.1.0.1"]
    assert len(second.state) == 2

    assert not tracker.drain(cache.svc, cache.eps)  # nothing dirty
    tracker.service_changed(b, b)  # resync event, same object
    assert not tracker.drain(cache.svc, cache.eps)

    del cache.services["default/b"]
    tracker.service_changed(b, None)
    third = tracker.drain(cache.svc, cache.eps)
    [(k, c)] = third.changed.items()
    assert k.name == "b" and c.current is None and c.previous is not None
    assert list(third.state) == [key]


def test_tracker_set_node_recomputes_everything() -> None:
    cache, tracker = FakeCache(), ChangeTracker(NODE)
    svc = to_service(service("a", "10.96.0.1", port(80, node_port=30001), type="NodePort"))
    cache.services = {"default/a": svc}
    tracker.drain(cache.svc, cache.eps, lambda: cache.services)
    tracker.set_node(NodeConfig(name="n1", nodeport_addresses=("192.168.1.9",)))
    changes = tracker.drain(cache.svc, cache.eps, lambda: cache.services)
    [c] = changes.changed.values()
    assert c.current is not None and c.current.frontends[1].ip == "192.168.1.9"


@pytest.mark.parametrize("slices", [
    [endpoint_slice("web", endpoint("10.1.0.9", node="n1"), endpoint("10.1.0.1"),
                    endpoint("10.1.0.5", node="n2"))],
    [endpoint_slice("web", endpoint("10.1.0.1"), endpoint("10.1.0.1", ready=False))],
    [endpoint_slice("web", endpoint("10.1.0.1"), endpoint("10.1.0.2", ready=False))],
    [endpoint_slice("web", endpoint("10.1.0.1", zones=["z1"]), endpoint("10.1.0.2"))],
    [endpoint_slice("web", endpoint("10.1.0.3", ready=False, serving=True, terminating=True))],
    [endpoint_slice("web", endpoint("10.1.0.1"), ports=[("other", 80, "TCP")])],
    [endpoint_slice("web", endpoint("10.1.0.9"), name="a"),
     endpoint_slice("web", endpoint("10.1.0.2"), name="b")],
    [endpoint_slice("web", endpoint("fd00::1"))],
    [],
])
@pytest.mark.parametrize("policy", [{}, {"internalTrafficPolicy": "Local"},
                                    {"externalTrafficPolicy": "Local"}])
def test_plain_fast_path_agrees_with_categorize(
    slices: list[dict[str, Any]], policy: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The full sync's fast path for plain slices picks what kube-proxy's rules pick."""
    from svcnet.proxy import state

    svc = service("web", "10.96.0.10", port(80, node_port=30080), type="NodePort", **policy)
    fast = ports(svc, *slices)
    calls: list[object] = []
    real = state._plain_endpoints
    monkeypatch.setattr(state, "_plain_endpoints",
                        lambda *a: calls.append(real(*a)))  # always "not plain"
    slow = ports(svc, *slices)
    assert calls  # the fast path was consulted ...
    assert fast == slow  # ... and gives the same states
    assert [b.local for b in fast[0].cluster_endpoints] == [
        b.local for b in slow[0].cluster_endpoints]


def test_streamed_drain_yields_every_port_and_survives_abandonment() -> None:
    cache, tracker = FakeCache(), ChangeTracker(NODE)
    for i in range(6):
        svc = to_service(service(f"s{i}", f"10.96.0.{i}", port(80), port(81, "b")))
        cache.services[f"default/s{i}"] = svc
        tracker.service_changed(None, svc)
    first = tracker.start_drain(cache.svc, cache.eps, lambda: cache.services)
    streamed = {p.key: p for p in first.ports()}
    changes = first.finish()
    assert streamed == changes.state and len(streamed) == 12
    assert set(changes.changed) == set(streamed)
    # a second drain streams the unchanged ports from the tracker plus the recomputed one
    cache.slices["default/s0-slice"] = to_slice(endpoint_slice("s0", endpoint("10.1.0.1")))
    tracker.slice_changed(None, cache.slices["default/s0-slice"])
    second = tracker.start_drain(cache.svc, cache.eps)
    assert {p.key: p for p in second.ports()} == second.finish().state
    assert {k.name for k in second.finish().changed} == {"s0"}
    # a consumer that gives up half way (a failed sync): finish still computes the rest
    for i in range(6):
        tracker.service_changed(None, cache.services[f"default/s{i}"])
    tracker.set_node(NodeConfig(name="n2"))
    third = tracker.start_drain(cache.svc, cache.eps, lambda: cache.services)
    it = third.ports()
    next(it)
    assert len(third.finish().state) == 12
    assert not tracker.pending
