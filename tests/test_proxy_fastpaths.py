"""The hand-optimised fast paths equal the plain code they shortcut, as hypothesis
properties: ``_plain_endpoints`` vs ``categorize`` (state.py), ``_new_backend`` vs the
frozen ``Backend`` (every field set), the nftables full script vs ``render`` (the full
sync now renders every port; the property stays to keep its batching honest)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from svcnet.proxy import state
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.commands import FakeCommands
from svcnet.proxy.config import BackendConfig
from svcnet.proxy.nftables import NftablesBackend
from svcnet.proxy.state import Backend, ChangeTracker, NodeConfig, ServicePortState

NODE = NodeConfig(name="n1", zone="z1", nodeport_addresses=("192.168.1.1",))
PORTS = [("", 8080, "TCP"), ("other", 80, "TCP"), ("u", 8080, "UDP"), ("d", 5353, "UDP")]
# Port names are unique within a slice (kube-apiserver refuses duplicates, "" included).
POLICIES: list[dict[str, str]] = [{}, {"internalTrafficPolicy": "Local"},
                                  {"externalTrafficPolicy": "Local"}]

# Biased towards the plain case (one slice, every endpoint ready, the port present), where
# the fast path answers, with enough of everything else to leave it.
endpoints = st.builds(
    endpoint,
    st.sampled_from([f"10.1.0.{i}" for i in range(1, 13)]),
    node=st.sampled_from(["", "n1", "n2"]),
    ready=st.sampled_from([True, True, True, False]),
    serving=st.sampled_from([None, None, True, False]),
    terminating=st.sampled_from([None, None, False, True]),
    zones=st.sampled_from([None, None, ["z1"], ["z2"]]),
    nodes=st.sampled_from([None, None, None, ["n1"], ["n2"]]),
)


@st.composite
def slice_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        eps = draw(st.lists(endpoints, max_size=5))
        ports = [PORTS[0]] if draw(st.integers(0, 3)) else []
        ports += draw(st.lists(st.sampled_from(PORTS[1:]), max_size=2, unique=True))
        family = draw(st.sampled_from(["IPv4", "IPv4", "IPv4", "IPv6"]))
        if family == "IPv6":
            eps = [{**e, "addresses": [f"fd00::{e['addresses'][0].rsplit('.', 1)[1]}"]}
                   for e in eps]
        out.append(endpoint_slice("web", *eps, ports=ports or [PORTS[1]], name=f"web-{i}",
                                  address_type=family))
    return out


def all_fields(backends: tuple[Backend, ...]) -> list[tuple[Any, ...]]:
    return [tuple(getattr(b, f.name) for f in dataclasses.fields(Backend)) for b in backends]


def endpoint_fields(ports: list[ServicePortState]) -> list[Any]:
    return [(p.key, all_fields(p.cluster_endpoints), all_fields(p.local_endpoints),
             p.has_endpoints) for p in ports]


@settings(max_examples=500, deadline=None)
@given(slices=slice_sets(), policy=st.sampled_from(POLICIES))
def test_plain_fast_path_equals_categorize(slices: list[dict[str, Any]],
                                           policy: dict[str, str]) -> None:
    svc = to_service(service("web", "10.96.0.10", port(80, node_port=30080),
                             port(53, "d", "UDP"), type="NodePort", **policy))
    objs = [to_slice(s) for s in slices]
    fast = state.service_ports(svc, objs, NODE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state, "_plain_endpoints", lambda *a: None)  # always the slow path
        slow = state.service_ports(svc, objs, NODE)
    assert fast == slow
    assert endpoint_fields(fast) == endpoint_fields(slow)  # also fields eq= ignores


@given(ip=st.ip_addresses().map(str), number=st.integers(1, 65535), local=st.booleans(),
       ready=st.booleans())
def test_new_backend_sets_every_field_as_the_dataclass_does(
        ip: str, number: int, local: bool, ready: bool) -> None:
    """A field added to ``Backend`` and not to ``_new_backend`` fails here (unset slot)."""
    fast = state._new_backend(ip, number, local, ready)
    slow = Backend(ip, number, local, ready)
    assert all_fields((fast,)) == all_fields((slow,))


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    services: dict[str, Any] = {}
    slices: dict[str, list[Any]] = {}
    for i in range(draw(st.integers(1, 5))):
        name = f"s{i}"
        kind = draw(st.sampled_from(["ClusterIP", "NodePort"]))
        policy = draw(st.sampled_from(POLICIES if kind == "NodePort" else POLICIES[:2]))
        extra: dict[str, Any] = dict(policy)
        if draw(st.booleans()) and draw(st.booleans()):
            extra.update(sessionAffinity="ClientIP",
                         sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}})
        services[f"default/{name}"] = to_service(service(
            name, f"10.96.0.{i + 1}", port(80, node_port=30000 + i if kind == "NodePort"
                                           else 0), port(53, "d", "UDP"),
            type=kind, **extra))
        eps = [endpoint(f"10.1.{i}.{j}", node=draw(st.sampled_from(["n1", "n2"])))
               for j in range(1, draw(st.integers(0, 4)) + 1)]
        slices[f"default/{name}"] = [to_slice(endpoint_slice(
            name, *eps, ports=[("", 8080, "TCP"), ("d", 5353, "UDP")]))] if eps else []
    return services, slices


def script_elements(script: str) -> dict[str, set[str]]:
    got: dict[str, set[str]] = {}
    for line in script.splitlines():
        if line.startswith("add element"):
            name, body = line.split(" ", 5)[4:]
            got.setdefault(name, set()).update(body.strip("{} ").split(", "))
    return got


@settings(max_examples=100, deadline=None)
@given(cluster=clusters())
def test_nftables_full_script_equals_render(
        cluster: tuple[dict[str, Any], dict[str, list[Any]]]) -> None:
    """Every element of the full script is what ``render`` gives for its port, and
    nothing else."""
    services, slices = cluster
    backend = NftablesBackend(FakeCommands(), BackendConfig())
    tracker = ChangeTracker(NodeConfig("n1", nodeport_addresses=("192.168.1.1",)))
    current = tracker.drain(services.get, lambda k: slices.get(k, []), lambda: services).state
    want: dict[str, set[str]] = {}
    for sp in current.values():
        r = backend.render(sp)
        for name, elems in r.elements.items():
            want.setdefault(name, set()).update(f"{e.key} : {e.value}" if e.value else e.key
                                                for e in elems)
        if r.hairpin:
            want.setdefault("hairpin", set()).update(f"{ip} . {ip}" for ip in r.hairpin)
    got = script_elements(backend._full_script(current))
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in want.items() if v}
