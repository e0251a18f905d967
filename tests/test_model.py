"""Object model: decoding Kubernetes JSON into records, defaults, and one clear error."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from svcnet.model import ENDPOINT_SLICE, NODE, POD, SERVICE, InvalidObject, kind_named, object_key


def svc(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "prod", "resourceVersion": "7",
                         "labels": {"app": "web"}},
            "spec": spec}


def test_service_fields_the_proxy_and_dns_need() -> None:
    s = SERVICE.decode(json.dumps(svc(
        type="LoadBalancer", clusterIP="10.96.0.5", clusterIPs=["10.96.0.5", "fd00::5"],
        ipFamilies=["IPv4", "IPv6"], sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        externalTrafficPolicy="Local", internalTrafficPolicy="Cluster",
        externalIPs=["192.0.2.1"], loadBalancerSourceRanges=["203.0.113.0/24"],
        healthCheckNodePort=31000, publishNotReadyAddresses=True, selector={"app": "web"},
        ports=[{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
               {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}],
    ) | {"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1", "ipMode": "Proxy"}]}}}))
    assert s.cluster_ips == ("10.96.0.5", "fd00::5")
    assert s.spec.ip_families == ("IPv4", "IPv6")
    assert s.affinity_timeout == 60
    assert s.spec.external_traffic_policy == "Local"
    assert s.spec.external_ips == ("192.0.2.1",)
    assert s.spec.load_balancer_source_ranges == ("203.0.113.0/24",)
    assert s.spec.health_check_node_port == 31000
    assert s.spec.publish_not_ready_addresses
    http, dns = s.spec.ports
    assert (http.name, http.protocol, http.port, http.target_port, http.node_port) == (
        "http", "TCP", 80, "http", 30080)
    assert (dns.protocol, dns.effective_target_port) == ("UDP", 5353)
    assert s.status.load_balancer.ingress[0].ip_mode == "Proxy"
    assert s.metadata.labels == {"app": "web"}
    assert object_key(s) == "prod/web"


def test_service_defaults_headless_and_external_name() -> None:
    plain = SERVICE.convert(svc(clusterIP="10.0.0.1", ports=[{"port": 8080}]))
    assert plain.spec.type == "ClusterIP"
    assert plain.spec.ports[0].protocol == "TCP"
    assert plain.spec.ports[0].effective_target_port == 8080
    assert plain.affinity_timeout == 0
    headless = SERVICE.convert(svc(clusterIP="None", clusterIPs=["None"]))
    assert headless.is_headless and headless.cluster_ips == ()
    ext = SERVICE.convert(svc(type="ExternalName", externalName="db.example.org"))
    assert ext.spec.external_name == "db.example.org" and ext.cluster_ips == ()
    assert SERVICE.convert(svc(sessionAffinity="ClientIP")).affinity_timeout == 10800


def test_endpoint_slice_conditions_follow_kubernetes_nil_semantics() -> None:
    es = ENDPOINT_SLICE.convert({
        "metadata": {"name": "web-1", "namespace": "prod",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv6",
        "endpoints": [
            {"addresses": ["fd00::1"]},
            {"addresses": ["fd00::2"], "conditions": {"ready": False, "serving": True,
                                                      "terminating": True},
             "hostname": "w2", "nodeName": "n2", "zone": "z1",
             "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n2"}]},
             "targetRef": {"kind": "Pod", "namespace": "prod", "name": "web-2"}},
            {"addresses": ["fd00::3"], "conditions": {"ready": False}},
        ],
        "ports": [{"name": "http", "port": 8080}],
    })
    nil, term, down = es.endpoints
    assert (nil.ready, nil.serving, nil.terminating) == (True, True, False)
    assert (term.ready, term.serving, term.terminating) == (False, True, True)
    assert (down.ready, down.serving) == (False, False)
    assert term.hints is not None and term.hints.for_zones[0].name == "z1"
    assert term.hints.for_nodes[0].name == "n2"
    assert term.target_ref is not None and term.target_ref.name == "web-2"
    assert (term.hostname, term.node_name, term.zone) == ("w2", "n2", "z1")
    assert es.service_name == "web"
    assert es.ports[0].protocol == "TCP"


def test_node_and_pod() -> None:
    node = NODE.convert({"metadata": {"name": "n1", "annotations": {"a": "b"}},
                         "spec": {"podCIDR": "10.244.1.0/24",
                                  "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"],
                                  "taints": [{"key": "k", "effect": "NoSchedule"}]},
                         "status": {"addresses": [{"type": "InternalIP",
                                                   "address": "192.168.0.2"}]}})
    assert node.pod_cidrs == ("10.244.1.0/24", "fd00:1::/64")
    assert node.address() == "192.168.0.2"
    assert object_key(node) == "n1"
    pod = POD.convert({"metadata": {"name": "p", "namespace": "d"},
                       "spec": {"nodeName": "n1", "hostname": "h", "subdomain": "s"},
                       "status": {"phase": "Running", "podIP": "10.244.1.5",
                                  "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:1::5"}],
                                  "conditions": [{"type": "Ready", "status": "True"}]}})
    assert pod.ips == ("10.244.1.5", "fd00:1::5") and pod.ready
    assert (pod.spec.hostname, pod.spec.subdomain, pod.spec.node_name) == ("h", "s", "n1")


@pytest.mark.parametrize(("kind", "obj", "message"), [
    ("Service", svc(ports=[{"port": "80"}]),
     "invalid Service prod/web: spec.ports[0].port: Expected `int`, got `str`"),
    ("Service", svc(ports=[{"port": 70000}]),
     "invalid Service prod/web: spec.ports[0].port: Expected `int` <= 65535"),
    ("Service", svc(clusterIP="10.0.0.256"),
     "invalid Service prod/web: spec.clusterIP: '10.0.0.256' is not an IP address"),
    ("Service", svc(ports=[{"port": 53, "protocol": "ICMP"}]),
     "invalid Service prod/web: spec.ports[0].protocol: Invalid enum value 'ICMP'"),
    ("EndpointSlice", {"metadata": {"name": "s", "namespace": "d"}, "addressType": "IPv4",
                       "endpoints": [{"addresses": ["fd00::1"]}]},
     "invalid EndpointSlice d/s: endpoints[0].addresses[0]: 'fd00::1' is not an IPv4 address"),
    ("EndpointSlice", {"metadata": {"name": "s", "namespace": "d"}},
     "invalid EndpointSlice d/s: Object missing required field `addressType`"),
    ("Node", {"metadata": {"name": "n"}, "spec": {"podCIDR": "10.0.0.0/33"}},
     "invalid Node n: spec.podCIDR: '10.0.0.0/33' has a prefix longer than 32"),
    ("Pod", {"metadata": {}}, "invalid Pod <unnamed>: metadata: Object missing required field"),
])
def test_invalid_objects_raise_one_clear_error(kind: str, obj: dict[str, Any],
                                               message: str) -> None:
    k = kind_named(kind)
    with pytest.raises(InvalidObject) as from_bytes:
        k.decode(json.dumps(obj).encode())
    with pytest.raises(InvalidObject) as from_dict:
        k.convert(obj)
    assert str(from_bytes.value).startswith(message)
    assert str(from_dict.value).startswith(message)


def test_not_json_is_invalid() -> None:
    with pytest.raises(InvalidObject, match="invalid Service <unnamed>"):
        SERVICE.decode(b"{not json")


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    s = SERVICE.convert(svc(clusterIP="10.0.0.1", trafficDistribution="PreferClose",
                            someFutureField={"x": 1}))
    assert s.cluster_ips == ("10.0.0.1",)


def test_kind_lookup_accepts_kubectl_names() -> None:
    assert kind_named("svc") is SERVICE
    assert kind_named("EndpointSlices") is ENDPOINT_SLICE
    assert ENDPOINT_SLICE.api_path == "/apis/discovery.k8s.io/v1/endpointslices"
    assert SERVICE.api_path == "/api/v1/services"
    with pytest.raises(KeyError):
        kind_named("deployment")


# --- null lists (kube-apiserver's Go nil slices) ---------------------------------------------


def _tuple_fields(record: type, seen: set[type] | None = None) -> list[tuple[str, str, bool]]:
    """Every tuple-typed field reachable from ``record``: (struct, field, accepts null)."""
    seen = set() if seen is None else seen
    if record in seen:
        return []
    seen.add(record)
    info = msgspec.inspect.type_info(record)
    assert isinstance(info, msgspec.inspect.StructType)
    found = []
    for f in info.fields:
        types = f.type.types if isinstance(f.type, msgspec.inspect.UnionType) else (f.type,)
        nullable = any(isinstance(t, msgspec.inspect.NoneType) for t in types)
        for t in types:
            if isinstance(t, msgspec.inspect.VarTupleType):
                found.append((record.__name__, f.name, nullable))
                t = t.item_type
            if isinstance(t, msgspec.inspect.StructType):
                found += _tuple_fields(t.cls, seen)
    return found


def test_every_list_field_accepts_null() -> None:
    """Only ``addresses`` may not be null: kube-apiserver requires at least one address."""
    fields = [f for kind in (SERVICE, ENDPOINT_SLICE, NODE, POD)
              for f in _tuple_fields(kind.record)]
    assert len(fields) > 15
    assert [(s, n) for s, n, nullable in fields if not nullable] == [("Endpoint", "addresses")]


@pytest.mark.parametrize(("kind", "obj", "read"), [
    (ENDPOINT_SLICE, {"metadata": {"name": "s", "namespace": "d"}, "addressType": "IPv4",
                      "endpoints": None, "ports": None},
     lambda o: (o.endpoints, o.ports)),
    (ENDPOINT_SLICE, {"metadata": {"name": "s", "namespace": "d"}, "addressType": "IPv4",
                      "endpoints": [{"addresses": ["10.0.0.1"],
                                     "hints": {"forZones": None, "forNodes": None}}]},
     lambda o: (o.endpoints[0].hints.for_zones, o.endpoints[0].hints.for_nodes)),
    (SERVICE, svc(clusterIP="None", ports=None, clusterIPs=None, ipFamilies=None,
                  externalIPs=None, loadBalancerSourceRanges=None)
     | {"status": {"loadBalancer": {"ingress": None}}},
     lambda o: (o.spec.ports, o.spec.cluster_ips, o.spec.ip_families, o.spec.external_ips,
                o.spec.load_balancer_source_ranges, o.status.load_balancer.ingress)),
    (NODE, {"metadata": {"name": "n"}, "spec": {"podCIDRs": None, "taints": None},
            "status": {"addresses": None}},
     lambda o: (o.spec.pod_cidrs, o.spec.taints, o.status.addresses)),
    (POD, {"metadata": {"name": "p", "namespace": "d"},
           "status": {"podIPs": None, "conditions": None}},
     lambda o: (o.status.pod_ips, o.status.conditions)),
])
def test_null_lists_decode_as_empty(kind: Any, obj: dict[str, Any], read: Any) -> None:
    for record in (kind.decode(json.dumps(obj).encode()), kind.convert(obj)):
        values = read(record)
        assert all(v == () for v in values), values


# --- what kube-apiserver validates ------------------------------------------------------------


def _slice(**fields: Any) -> dict[str, Any]:
    return {"metadata": {"name": "s", "namespace": "d"}, "addressType": "IPv4", **fields}


@pytest.mark.parametrize(("kind", "obj", "message"), [
    ("Service", {"metadata": {"name": "wéb", "namespace": "prod"}},
     "invalid Service prod/wéb: metadata.name: 'wéb' is not a DNS-1035 label"),
    ("Service", {"metadata": {"name": "1web", "namespace": "prod"}},
     "invalid Service prod/1web: metadata.name: '1web' is not a DNS-1035 label"),
    ("Service", {"metadata": {"name": "w" * 64, "namespace": "prod"}},
     f"invalid Service prod/{'w' * 64}: metadata.name: '{'w' * 64}' is longer than 63"),
    ("Service", {"metadata": {"name": "web", "namespace": "Prod"}},
     "invalid Service Prod/web: metadata.namespace: 'Prod' is not a DNS-1123 label"),
    ("EndpointSlice", {**_slice(), "metadata": {"name": "s", "namespace": "pröd"}},
     "invalid EndpointSlice pröd/s: metadata.namespace: 'pröd' is not a DNS-1123 label"),
    ("Service", svc(ports=[{"name": "pört", "port": 80}]),
     "invalid Service prod/web: spec.ports[0].name: 'pört' is not a DNS-1123 label"),
    ("Service", svc(ports=[{"name": "p" * 64, "port": 80}]),
     "invalid Service prod/web: spec.ports[0].name: '" + "p" * 64 + "' is longer than 63"),
    ("Service", svc(ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]),
     "invalid Service prod/web: spec.ports[1].name: duplicate port name 'http'"),
    ("Service", svc(ports=[{"port": 80}, {"port": 81}]),
     "invalid Service prod/web: spec.ports[1].name: duplicate port name ''"),
    ("Service", svc(ports=[{"name": "http", "port": 80, "targetPort": "a" * 16}]),
     "invalid Service prod/web: spec.ports[0].targetPort: '" + "a" * 16 + "' is longer than 15"),
    ("Service", svc(ports=[{"name": "http", "port": 80, "targetPort": "web-ü"}]),
     "invalid Service prod/web: spec.ports[0].targetPort: 'web-ü' may contain only"),
    ("Service", svc(ports=[{"name": "http", "port": 80, "targetPort": "8080"}]),
     "invalid Service prod/web: spec.ports[0].targetPort: '8080' must contain at least one"),
    ("Service", svc(ports=[{"name": "http", "port": 80, "targetPort": "a--b"}]),
     "invalid Service prod/web: spec.ports[0].targetPort: 'a--b' must not begin or end"),
    ("Service", svc(type="ExternalName", externalName="wéb.example.org"),
     "invalid Service prod/web: spec.externalName: 'wéb.example.org' is not a DNS-1123"),
    ("EndpointSlice", _slice(endpoints=[{"addresses": ["10.0.0.1"], "hostname": "hé"}]),
     "invalid EndpointSlice d/s: endpoints[0].hostname: 'hé' is not a DNS-1123 label"),
    ("EndpointSlice", _slice(endpoints=[{"addresses": ["10.0.0.1"], "hostname": "Web-0"}]),
     "invalid EndpointSlice d/s: endpoints[0].hostname: 'Web-0' is not a DNS-1123 label"),
    ("EndpointSlice", _slice(ports=[{"name": "ü", "port": 80}]),
     "invalid EndpointSlice d/s: ports[0].name: 'ü' is not a DNS-1123 label"),
    ("EndpointSlice", _slice(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}]),
     "invalid EndpointSlice d/s: ports[1].name: duplicate port name 'a'"),
    ("EndpointSlice", _slice(endpoints=[{"addresses": None}]),
     "invalid EndpointSlice d/s: endpoints[0].addresses: Expected `array`, got `null`"),
])
def test_names_the_api_server_would_refuse_are_rejected(kind: str, obj: dict[str, Any],
                                                         message: str) -> None:
    k = kind_named(kind)
    for raised in (lambda: k.decode(json.dumps(obj).encode()), lambda: k.convert(obj)):
        with pytest.raises(InvalidObject) as err:
            raised()
        assert str(err.value).startswith(message), str(err.value)
        assert "\n" not in str(err.value)


def test_names_at_the_limits_are_accepted() -> None:
    """kube-apiserver checks Service and EndpointSlice port names as DNS-1123 labels (up to
    63 characters); only a named targetPort is an IANA service name (up to 15)."""
    s = SERVICE.convert({"metadata": {"name": "w" * 63, "namespace": "n" * 63},
                         "spec": {"ports": [{"name": "a-long-port-name-of-32-chars-xyz",
                                             "port": 80, "targetPort": "fifteen-chars-x"},
                                            {"name": "dns", "port": 53, "targetPort": 5353}]}})
    assert s.spec.ports[0].target_port == "fifteen-chars-x"
    ext = SERVICE.convert(svc(type="ExternalName", externalName="db.example.org."))
    assert ext.spec.external_name == "db.example.org."
    es = ENDPOINT_SLICE.convert(_slice(endpoints=[{"addresses": ["10.0.0.1"], "hostname": "0"}],
                                       ports=[{"port": 80}]))
    assert es.endpoints[0].hostname == "0"
