"""What the DNS keeps per watched object, kept small: slim slices and pods, no rendered records.

Each test checks behaviour (what is answered) and the slimming itself (what is kept), so a
change that brings the memory back or breaks an answer fails here.
"""

from __future__ import annotations

import pytest
from svcnet.dns.daemon import POD_ADDRESSES, SLICE_ADDRESSES
from svcnet.dns.wire import AAAA, ANY, NOERROR, NXDOMAIN, RR, A
from svcnet.dns.zone import ClusterZone, table_key

from svcnet.model import SERVICE, InvalidObject


def test_zone_keeps_no_records_but_reads_them_back() -> None:
    """ANY and in-zone ExternalName targets read A/AAAA back from the shared table."""
    zone = ClusterZone()
    web = SERVICE.convert({"metadata": {"name": "web", "namespace": "ns"},
                           "spec": {"clusterIP": "10.0.0.1",
                                    "clusterIPs": ["10.0.0.1", "fd00::1"]}})
    hdls = SERVICE.convert({"metadata": {"name": "h", "namespace": "ns"},
                            "spec": {"clusterIP": "None"}})
    slice_ = SLICE_ADDRESSES.decode(
        b'{"metadata": {"name": "h-1", "namespace": "ns", "labels": '
        b'{"kubernetes.io/service-name": "h"}}, "addressType": "IPv4", "endpoints": ['
        b'{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.2"]}, '
        b'{"addresses": ["10.1.0.3"], "conditions": {"ready": false}}]}')
    zone.set_service("ns/web", web, [])
    zone.set_service("ns/h", hdls, [slice_])
    zone.mark_synced()
    assert all(not recs.rrsets for recs in zone._services.values())
    name = "web.ns.svc.cluster.local."
    assert zone.rrset(name, A) == [RR(name, A, 5, "10.0.0.1")]
    assert zone.rrset(name, AAAA) == [RR(name, AAAA, 5, "fd00::1")]
    assert zone.rrset("h.ns.svc.cluster.local.", A) == [
        RR("h.ns.svc.cluster.local.", A, 5, "10.1.0.1"),
        RR("h.ns.svc.cluster.local.", A, 5, "10.1.0.2")]
    any_ = zone.answer(name, ANY).prepared
    assert any_ is not None and any_.counts[2:4] == b"\x00\x02"
    zone.set_service("ns/web", None, [])
    assert zone.rrset(name, A) == [] and zone.table.get(table_key(name, A)) is None


def test_slim_slice_keeps_endpoints_packed_and_still_rejects_bad_ones() -> None:
    import json

    from svcnet.dns.daemon import _ENDPOINTS

    endpoints = [{"addresses": [f"10.1.0.{i}"], "conditions": {"ready": i % 2 == 0},
                  "nodeName": "node-1", "zone": "a",
                  "targetRef": {"kind": "Pod", "namespace": "ns", "name": f"web-{i}"}}
                 for i in range(10)]
    endpoints += [{"addresses": ["10.1.1.1", "10.1.1.2"], "hostname": "h"},
                  {"addresses": ["10.1.1.3"], "conditions": {"ready": None}}]
    text = json.dumps(endpoints).encode()
    good = SLICE_ADDRESSES.decode(
        b'{"metadata": {"name": "s", "namespace": "ns"}, "addressType": "IPv4", '
        b'"endpoints": ' + text + b"}")
    assert len(bytes(good.raw_endpoints)) * 4 < len(text), "packed, not the JSON text"
    assert good.endpoints == _ENDPOINTS.decode(text), "every field DNS reads survives"
    assert [e.ready for e in good.endpoints] == [i % 2 == 0 for i in range(10)] + [True, True]
    assert good.endpoints[0].target_ref is not None
    assert good.endpoints[0].target_ref.name == "web-0"
    assert good.endpoints[10].target_ref is None and good.endpoints[10].hostname == "h"
    empty = SLICE_ADDRESSES.decode(b'{"metadata": {"name": "e"}, "addressType": "IPv4"}')
    assert empty.endpoints == ()
    with pytest.raises(InvalidObject):
        SLICE_ADDRESSES.decode(b'{"metadata": {"name": "s"}, "addressType": "IPv4", '
                               b'"endpoints": [{"addresses": 5}]}')


def pod(name: str, namespace: str, ips: list[str]) -> bytes:
    import json

    return json.dumps({"metadata": {"name": name, "namespace": namespace,
                                    "resourceVersion": "7", "labels": {"app": "x"}},
                       "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                       "status": {"podIP": ips[0] if ips else "",
                                  "podIPs": [{"ip": ip} for ip in ips]}}).encode()


def test_slim_pods_and_verified_index() -> None:
    a = POD_ADDRESSES.decode(pod("a", "shop", ["10.2.0.1"]))
    b = POD_ADDRESSES.decode(pod("b", "shop", ["10.2.0.2", "fd00::2"]))
    c = POD_ADDRESSES.decode(pod("c", "other", []))
    assert a.ips == ("10.2.0.1",) and a.status.pod_ips == (), "single-stack keeps one string"
    assert b.ips == ("10.2.0.2", "fd00::2")
    assert c.ips == ()
    assert a.metadata.namespace is b.metadata.namespace, "namespaces are interned"
    assert a.metadata.resource_version == "7"
    zone = ClusterZone(pods="verified")
    zone.mark_synced()
    for p in (a, b, c):
        zone.set_pod(None, p)

    def rcode(name: str, qtype: int = A) -> int:
        look = zone.answer(name, qtype)
        assert look.prepared is not None
        return look.prepared.rcode

    assert rcode("10-2-0-1.shop.pod.cluster.local.") == NOERROR
    assert rcode("fd00--2.shop.pod.cluster.local.", AAAA) == NOERROR
    assert rcode("10-2-0-1.other.pod.cluster.local.") == NXDOMAIN, "wrong namespace"
    assert rcode("other.pod.cluster.local.") == NOERROR, "a namespace with pods exists"
    a2 = POD_ADDRESSES.decode(pod("a", "shop", ["10.2.0.9"]))
    zone.set_pod(a, a2)
    assert rcode("10-2-0-1.shop.pod.cluster.local.") == NXDOMAIN
    assert rcode("10-2-0-9.shop.pod.cluster.local.") == NOERROR
    zone.set_pod(a2, None)
    zone.set_pod(b, None)
    assert rcode("10-2-0-9.shop.pod.cluster.local.") == NXDOMAIN
    assert "shop" not in zone._pod_ips, "an empty namespace leaves the index"
