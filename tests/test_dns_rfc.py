"""RFC details and CoreDNS compatibility found missing in issue 13 (defects 5 and 6), and
the one answer policy every path shares (issue 18, point 6).

One server (a UDP worker + main) on a MemoryStore; the case names say which RFC or which
CoreDNS behaviour each checks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from dnskit import Running, query, serve, wait_for
from svcnet.dns import daemon
from svcnet.dns.daemon import NAMESPACE_NAMES, DNSOptions

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.memory import MemoryStore

Z = "cluster.local."
LOCAL_IP = "10.244.9.9"  # "our" address: an endpoint of kube-dns


def svc(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def eps(ns: str, service: str, name: str, endpoints: list[dict[str, Any]],
        ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports or []}


async def populate(store: MemoryStore) -> None:
    for obj in [
        svc("shop", "web", clusterIP="10.0.0.10", ports=[{"name": "http", "port": 80}]),
        svc("shop", "hl", clusterIP="None", ports=[{"name": "http", "port": 80}]),
        svc("shop", "hl9", clusterIP="None", ports=[{"name": "http", "port": 80}]),
        svc("shop", "alias", type="ExternalName", externalName="web.shop.svc.cluster.local"),
        svc("kube-system", "kube-dns", clusterIP="10.96.0.10",
            ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
    ]:
        await store.put(SERVICE, obj)
    for obj in [
        eps("shop", "web", "web-1", [{"addresses": ["10.1.0.5"]},
                                     {"addresses": ["10.1.0.6"], "hostname": "db-0"},
                                     {"addresses": ["10.1.0.7"],
                                      "conditions": {"ready": False}}],
            [{"name": "http", "port": 8080}]),
        eps("shop", "hl", "hl-1", [{"addresses": [f"10.2.0.{i}"]} for i in range(1, 7)],
            [{"name": "http", "port": 80}]),
        eps("shop", "hl9", "hl9-1", [{"addresses": [f"10.2.1.{i}"]} for i in range(1, 9)],
            [{"name": "http", "port": 80}]),
        eps("kube-system", "kube-dns", "kube-dns-1", [{"addresses": [LOCAL_IP]}],
            [{"name": "dns", "port": 53, "protocol": "UDP"}]),
    ]:
        await store.put(ENDPOINT_SLICE, obj)
    for name in ("shop", "kube-system", "kube-public", "default"):
        await store.put(NAMESPACE_NAMES, {"metadata": {"name": name}})


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    mp = pytest.MonkeyPatch()
    mp.setattr(daemon, "local_addresses", lambda host: [LOCAL_IP])
    try:
        with serve(DNSOptions(listen=("127.0.0.1", 0), workers=1, upstreams=[]),
                   populate) as srv:
            yield srv
    finally:
        mp.undo()


def lines(section: list[Any]) -> list[str]:
    return sorted(" ".join(line.split()) for rrset in section
                  for line in rrset.to_text().splitlines())


# --- defect 5: RFC details -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["web.shop.svc.cluster.local.", "nope.shop.svc.cluster.local.",
                                  "hl.shop.svc.cluster.local."])
@pytest.mark.parametrize("tcp", [False, True])
def test_do_bit_is_copied(server: Running, name: str, tcp: bool) -> None:
    """RFC 3225: the DO bit of the query is copied into the response's OPT, on every path
    (a worker's table answer, TCP, the slow path's negative answer)."""
    for _ in range(2):  # the second time from a worker's reply cache
        msg = query(server.port, name, "A", tcp=tcp, use_edns=0, want_dnssec=True)
        assert msg.ednsflags & dns.flags.DO, msg
        plain = query(server.port, name, "A", tcp=tcp, use_edns=0)
        assert not plain.ednsflags & dns.flags.DO


def test_nodata_at_the_end_of_a_cname_chain_has_soa(server: Running) -> None:
    """RFC 2308: a CNAME into our zone whose target lacks the type is NODATA with our SOA
    (negatively cacheable)."""
    msg = query(server.port, "alias.shop.svc.cluster.local.", "AAAA")
    assert msg.rcode() == dns.rcode.NOERROR
    assert lines(msg.answer) == ["alias.shop.svc.cluster.local. 5 IN CNAME "
                                 "web.shop.svc.cluster.local."]
    assert [rrset.rdtype for rrset in msg.authority] == [dns.rdatatype.SOA]
    a = query(server.port, "alias.shop.svc.cluster.local.", "A")
    assert "web.shop.svc.cluster.local. 5 IN A 10.0.0.10" in lines(a.answer)
    assert not a.authority


def test_ns_dns_name_answers_the_dns_service_ip(server: Running) -> None:
    """``ns.dns.<zone>``, named by the apex NS and SOA, answers A with the ClusterIP of
    the Service our address is an endpoint of (CoreDNS's nsAddrs)."""
    msg = query(server.port, "ns.dns.cluster.local.", "A")
    assert msg.rcode() == dns.rcode.NOERROR
    assert lines(msg.answer) == ["ns.dns.cluster.local. 5 IN A 10.96.0.10"]
    six = query(server.port, "ns.dns.cluster.local.", "AAAA")
    assert six.rcode() == dns.rcode.NOERROR and not six.answer and six.authority


@pytest.mark.parametrize("rdclass", [dns.rdataclass.CH, dns.rdataclass.HS])
def test_other_classes_are_refused(server: Running, rdclass: int) -> None:
    for name, rtype in (("web.shop.svc.cluster.local.", "A"), ("cluster.local.", "SOA"),
                        ("nope.cluster.local.", "TXT")):
        msg = query(server.port, name, rtype, rdclass=rdclass)
        assert msg.rcode() == dns.rcode.REFUSED and not msg.answer, (name, rtype)


def test_srv_with_glue_fits_512_bytes(server: Running) -> None:
    """Names are compressed against each other (glue owners point into the SRV targets),
    so six SRV records and their A glue fit a 512-byte reply without EDNS, as CoreDNS's."""
    for name in ("hl.shop.svc.cluster.local.", "_http._tcp.hl.shop.svc.cluster.local."):
        q = dns.message.make_query(name, "SRV")
        msg = dns.query.udp(q, "127.0.0.1", port=server.port, timeout=3)
        assert not msg.flags & dns.flags.TC
        assert len(msg.answer[0]) == 6
        assert sum(len(rrset) for rrset in msg.additional) == 6, msg
        raw = _raw_udp(server.port, q.to_wire())
        assert len(raw) <= 512 and struct.unpack_from("!H", raw, 10)[0] == 6


def test_glue_that_fits_is_kept_without_tc(server: Running) -> None:
    """Eight SRV records leave room for only some of their glue in 512 bytes: the glue that
    fits is kept, the rest dropped, and TC stays clear (RFC 2181 9); CoreDNS keeps the same
    glue but sets TC."""
    q = dns.message.make_query("hl9.shop.svc.cluster.local.", "SRV")
    raw = _raw_udp(server.port, q.to_wire())
    msg = dns.message.from_wire(raw)
    assert len(raw) <= 512 and not msg.flags & dns.flags.TC
    assert len(msg.answer[0]) == 8
    glue = sum(len(rrset) for rrset in msg.additional)
    assert 0 < glue < 8, glue


def _raw_udp(port: int, packet: bytes) -> bytes:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(packet, ("127.0.0.1", port))
        return s.recv(4096)


# --- defect 6: CoreDNS compatibility ---------------------------------------------------------


@pytest.mark.parametrize(("name", "rtype", "rcode", "answer"), [
    ("10-1-0-5.web.shop.svc.cluster.local.", "A", "NOERROR",
     ["10-1-0-5.web.shop.svc.cluster.local. 5 IN A 10.1.0.5"]),
    ("_http._tcp.web.shop.svc.cluster.local.", "A", "NOERROR",
     ["_http._tcp.web.shop.svc.cluster.local. 5 IN A 10.0.0.10"]),
    ("_http._tcp.hl.shop.svc.cluster.local.", "A", "NOERROR",
     [f"_http._tcp.hl.shop.svc.cluster.local. 5 IN A 10.2.0.{i}" for i in range(1, 7)]),
    ("db-0.web.shop.svc.cluster.local.", "A", "NOERROR",
     ["db-0.web.shop.svc.cluster.local. 5 IN A 10.1.0.6"]),
    ("10-1-0-5.web.shop.svc.cluster.local.", "AAAA", "NOERROR", []),
    ("10-1-0-6.web.shop.svc.cluster.local.", "A", "NXDOMAIN", []),  # named db-0
    ("10-1-0-7.web.shop.svc.cluster.local.", "A", "NXDOMAIN", []),  # not ready
    ("5.0.1.10.in-addr.arpa.", "PTR", "NOERROR",
     ["5.0.1.10.in-addr.arpa. 5 IN PTR 10-1-0-5.web.shop.svc.cluster.local."]),
    ("6.0.1.10.in-addr.arpa.", "PTR", "NOERROR",
     ["6.0.1.10.in-addr.arpa. 5 IN PTR db-0.web.shop.svc.cluster.local."]),
    ("kube-public.svc.cluster.local.", "A", "NOERROR", []),
    ("default.svc.cluster.local.", "TXT", "NOERROR", []),
    ("nosuchns.svc.cluster.local.", "A", "NXDOMAIN", []),
    ("10-0-0-1.kube-public.pod.cluster.local.", "A", "NOERROR",
     ["10-0-0-1.kube-public.pod.cluster.local. 5 IN A 10.0.0.1"]),
    ("10-0-0-1.nosuchns.pod.cluster.local.", "A", "NXDOMAIN", []),
    ("kube-public.pod.cluster.local.", "A", "NOERROR", []),
])
def test_coredns_compatibility(server: Running, name: str, rtype: str, rcode: str,
                               answer: list[str]) -> None:
    msg = query(server.port, name, rtype)
    assert dns.rcode.to_text(msg.rcode()) == rcode
    assert lines(msg.answer) == answer
    if not answer:
        assert [r.rdtype for r in msg.authority] == [dns.rdatatype.SOA]


def test_namespace_changes_are_followed(server: Running) -> None:
    server.call(server.store.put(NAMESPACE_NAMES, {"metadata": {"name": "fresh"}}))
    assert wait_for(lambda: query(server.port, "fresh.svc.cluster.local.", "A").rcode()
                    == dns.rcode.NOERROR)
    server.call(server.store.delete(NAMESPACE_NAMES, "", "fresh"))
    assert wait_for(lambda: query(server.port, "fresh.svc.cluster.local.", "A").rcode()
                    == dns.rcode.NXDOMAIN)


def test_endpoint_changes_are_followed(server: Running) -> None:
    server.call(server.store.put(ENDPOINT_SLICE, eps(
        "shop", "web", "web-2", [{"addresses": ["10.1.1.1"]}])))
    assert wait_for(lambda: lines(query(server.port, "1.1.1.10.in-addr.arpa.", "PTR").answer)
                    == ["1.1.1.10.in-addr.arpa. 5 IN PTR 10-1-1-1.web.shop.svc.cluster.local."])
    server.call(server.store.delete(ENDPOINT_SLICE, "shop", "web-2"))
    assert wait_for(lambda: query(server.port, "10-1-1-1.web.shop.svc.cluster.local.",
                                  "A").rcode() == dns.rcode.NXDOMAIN)


import dns.rdatatype  # noqa: E402

# --- one answer policy (issue 18, point 6) ---------------------------------------------------


def test_every_path_gives_the_same_reply() -> None:
    """A worker (``make_answer``), the main process's fast path (``fast_answer``) and the
    slow path (``answer_from_prepared`` after a full parse) build the same bytes for every
    prepared answer and every query shape: letter case, RD/CD bits, no EDNS or EDNS with
    small/large buffers (forcing the additional section out, or TC), DO set or not."""
    from svcnet.dns.server import fast_answer
    from svcnet.dns.wire import answer_from_prepared, parse_query
    from svcnet.dns.worker import GEN, TABLE, ReplyCache, make_answer
    from svcnet.dns.zone import ClusterZone

    from svcnet.model import ENDPOINT_SLICE as SLICE_KIND
    from svcnet.model import SERVICE as SERVICE_KIND

    zone = ClusterZone("cluster.local")
    services = [
        svc("shop", "web", clusterIP="10.0.0.10", clusterIPs=["10.0.0.10", "fd00::10"],
            ipFamilies=["IPv4", "IPv6"], ports=[{"name": "http", "port": 80}]),
        svc("shop", "hl", clusterIP="None", ports=[{"name": "http", "port": 80}]),
        svc("shop", "big", clusterIP="None", ports=[{"name": "http", "port": 80}]),
    ]
    slices = {
        "shop/hl": [eps("shop", "hl", "hl-1", [{"addresses": [f"10.2.0.{i}"]}
                                                for i in range(1, 9)],
                        [{"name": "http", "port": 80}])],
        "shop/big": [eps("shop", "big", "big-1", [{"addresses": [f"10.3.0.{i}"]}
                                                  for i in range(1, 80)],
                         [{"name": "http", "port": 80}])],
    }
    for obj in services:
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        zone.set_service(key, SERVICE_KIND.convert(obj),
                         [SLICE_KIND.convert(s) for s in slices.get(key, [])])
    box: list[Any] = [(zone.table.mm, zone.table.slots, zone.table.mask), 0]
    worker = make_answer(box, ReplyCache(), False)
    assert box[GEN] == 0 and box[TABLE] is not None
    checked = 0
    for key, prepared in list(zone.table.items()):
        name = key[:-4]
        qtype = struct.unpack("!H", key[-4:-2])[0]
        for upper in (False, True):
            wire_name = bytes(b ^ 0x20 if upper and 97 <= b <= 122 else b for b in name)
            for flags in (0x0000, 0x0100, 0x0110):
                for edns in (None, (512, False), (1232, False), (4096, True), (1232, True)):
                    data = struct.pack("!HHHHHH", 0x1234, flags, 1, 0, 0,
                                       0 if edns is None else 1) + wire_name + \
                        struct.pack("!HH", qtype, 1)
                    if edns is not None:
                        data += b"\x00" + struct.pack("!HHIH", 41, edns[0],
                                                      0x8000 if edns[1] else 0, 0)
                    q = parse_query(data)
                    limit = q.udp_size if q.edns else 512
                    slow = answer_from_prepared(data, q, prepared, limit)
                    assert fast_answer(zone.table, data, False) == slow
                    assert data[:2] + (worker(data) or b"") == slow, (name, qtype, edns)
                    reply = dns.message.from_wire(slow)
                    assert len(slow) <= limit
                    assert bool(reply.ednsflags & dns.flags.DO) == bool(edns and edns[1])
                    checked += 1
    assert checked > 500
    zone.table.close()


# --- defect 7: every query class stays in the workers ------------------------------------------


@pytest.mark.parametrize(("name", "rtype", "edns"), [
    ("10-9-8-7.shop.pod.cluster.local.", "A", True),  # pod name
    ("10-9-8-7.shop.pod.cluster.local.", "AAAA", False),  # pod name, NODATA
    ("www.google.com.shop.svc.cluster.local.", "A", True),  # search-path miss
    ("nope.cluster.local.", "AAAA", False),  # negative
    ("kube-public.svc.cluster.local.", "A", True),  # namespace NODATA
    ("10-1-0-5.web.shop.svc.cluster.local.", "A", False),  # ClusterIP endpoint name
    ("alias.shop.svc.cluster.local.", "A", True),  # in-zone CNAME
    ("5.0.1.10.in-addr.arpa.", "PTR", False),  # endpoint PTR
])
def test_repeated_queries_of_every_class_stay_in_the_worker(
        server: Running, name: str, rtype: str, edns: bool) -> None:
    """The first query of a kind the table does not hold is answered by the main process;
    the worker keeps that reply (it depends only on the zone, and every zone change empties
    the cache), so the next 50 never leave the worker."""
    srv = server.component.server
    first = query(server.port, name, rtype, use_edns=0 if edns else False)
    before = srv.handoffs
    for _ in range(50):
        again = query(server.port, name, rtype, use_edns=0 if edns else False)
        assert again.rcode() == first.rcode()
        assert lines(again.answer) == lines(first.answer)
        assert lines(again.authority) == lines(first.authority)
    assert srv.handoffs - before <= 1, srv.handoffs - before


def test_truncation_is_handled_in_the_worker(server: Running) -> None:
    """Answers that need the additional section dropped, or TC, are built by the worker."""
    srv = server.component.server
    before = srv.handoffs
    for _ in range(20):
        msg = dns.query.udp(dns.message.make_query("hl.shop.svc.cluster.local.", "SRV",
                                                   use_edns=0, payload=512),
                            "127.0.0.1", port=server.port, timeout=3)
        assert len(msg.answer[0]) == 6
    assert srv.handoffs == before


def test_worker_pod_answers_equal_the_main_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``pods insecure`` a worker answers pod names itself (from the name, once the
    namespace's marker ``<ns>.pod.<zone>`` is prepared); its bytes are the main process's
    for A, AAAA, NODATA, IPv6 names, letter case and EDNS; names it cannot decide (no
    marker, other types) go to the main process, and names that are not pod names (not an
    address, extra labels) are NXDOMAIN from the worker too."""
    from svcnet.dns import zone as zone_module
    from svcnet.dns.wire import answer_from_prepared, encode_name, parse_query
    from svcnet.dns.worker import ReplyCache, make_answer
    from svcnet.dns.zone import ClusterZone

    from svcnet.model import SERVICE as SERVICE_KIND

    monkeypatch.setattr(zone_module.time, "time", lambda: 1_700_000_000.0)
    zone = ClusterZone("cluster.local", pods="insecure")
    zone.set_service("shop/web", SERVICE_KIND.convert(svc("shop", "web", clusterIP="10.0.0.1")),
                     [])
    zone.set_namespace("empty", True)
    zone.mark_synced()
    worker = make_answer([(zone.table.mm, zone.table.slots, zone.table.mask), 1], ReplyCache(),
                         False, encode_name(zone.zone), "insecure")
    answered = 0
    for name in ("10-1-2-3.shop.pod.cluster.local.", "10-1-2-3.EMPTY.pod.Cluster.Local.",
                 "fd00--1.shop.pod.cluster.local.", "1--2-3.shop.pod.cluster.local.",
                 "10-1-2-3.nons.pod.cluster.local.", "bad.shop.pod.cluster.local.",
                 "x.10-1-2-3.shop.pod.cluster.local.", "10-1-2-3.shop.pod.other.local."):
        for qtype in (1, 28, 16):
            for edns in (False, True):
                data = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, int(edns)) + \
                    b"".join(bytes((len(p),)) + p.encode() for p in name.split(".") if p) + \
                    b"\x00" + struct.pack("!HH", qtype, 1)
                if edns:
                    data += b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
                tail = worker(data)
                q = parse_query(data)
                negative = "bad" in name or name.startswith("x.")
                decidable = negative or (
                    qtype in (1, 28) and ".pod.cluster.local." in name.lower() and
                    "nons" not in name)
                if not decidable:
                    assert tail is None, name
                    continue
                assert tail is not None, (name, qtype)
                result = zone.answer(q.qname, q.qtype)
                assert result.prepared is not None
                assert data[:2] + tail == answer_from_prepared(data, q, result.prepared,
                                                               q.udp_size), (name, qtype, edns)
                assert (tail[1] & 0xF == 3) == negative, name
                answered += 1
    assert answered == 4 * 2 * 2 + 2 * 3 * 2
    zone.table.close()


def test_first_time_pod_names_stay_in_the_worker(server: Running) -> None:
    """Pod names are computable from the name: even never-seen ones do not reach the main
    process once their namespace exists."""
    srv = server.component.server
    before = srv.handoffs
    for i in range(30):
        msg = query(server.port, f"10-77-0-{i + 1}.shop.pod.cluster.local.", "A")
        assert lines(msg.answer) == [f"10-77-0-{i + 1}.shop.pod.cluster.local. 5 IN A "
                                     f"10.77.0.{i + 1}"]
    assert srv.handoffs == before


# --- workers answer negatives themselves (issue 13: the "mixed" query mix) ----------------------

NEGATIVE_NAMES = [
    # (name, decided by the worker for A)
    ("nosuch.shop.svc.cluster.local.", True),  # no such Service in an existing namespace
    ("web.shop.svc.cluster.local.shop.svc.cluster.local.", True),  # search-path misses
    ("web.shop.svc.cluster.local.svc.cluster.local.", True),
    ("web.shop.svc.cluster.local.cluster.local.", True),  # extra labels, not under svc/pod
    ("web.shop.default.svc.cluster.local.", True),  # "web.shop" searched in default
    ("a.b.c.d.nons.svc.cluster.local.", True),
    ("nope.cluster.local.", True),
    ("dns.cluster.local.", True),
    ("x.dns-version.cluster.local.", True),
    ("empty.shop.svc.cluster.local.", True),  # headless without endpoints: no name
    ("10-1-0-5.noip.shop.svc.cluster.local.", True),  # below a Service without an address
    ("bad.shop.pod.cluster.local.", True),
    ("x.10-1-2-3.shop.pod.cluster.local.", True),
    ("web.shop.svc.cluster.local.Cluster.LOCAL.", True),  # letter case
    # the main process decides (and the worker caches its reply)
    ("shop.svc.cluster.local.", False),  # an existing namespace: NODATA
    ("nons.svc.cluster.local.", False),
    ("svc.cluster.local.", False),  # prepared for A
    ("pod.cluster.local.", False),
    ("cluster.local.", False),
    ("dns-version.cluster.local.", False),
    ("ns.dns.cluster.local.", False),
    ("web.shop.svc.cluster.local.", False),  # prepared
    ("x.web.shop.svc.cluster.local.", False),  # below an existing Service (spec: NXDOMAIN)
    ("10-1-0-5.web.shop.svc.cluster.local.", False),  # an endpoint of a ClusterIP Service
    ("_tcp.web.shop.svc.cluster.local.", False),
    ("x.db-0.hl.shop.svc.cluster.local.", False),
    ("alias.shop.svc.cluster.local.", False),  # ExternalName: CNAME
    ("x.alias.shop.svc.cluster.local.", False),
    ("10-1-2-3.shop.pod.cluster.local.", False),  # pods verified: the main process
    ("www.example.com.", False),  # outside the zone
    ("5.0.1.10.in-addr.arpa.", False),
]


def _wire(name: str) -> bytes:
    return b"".join(bytes((len(p),)) + p.encode() for p in name.split(".") if p) + b"\x00"


@pytest.mark.parametrize("pods", ["verified", "insecure", "disabled"])
def test_worker_negative_answers_equal_the_main_process(pods: str) -> None:
    """Every name a worker answers without the table holding it (NXDOMAIN below a missing
    Service, search-path misses, names outside ``svc``/``pod``, non-address pod names) gets
    the bytes the main process's handler gives, for every query type (and class CH,
    zone transfers), letter case, RD/CD and EDNS with or without DO; the names that need
    the main process (an existing namespace's NODATA, names below an existing Service,
    ClusterIP endpoint names, ExternalNames) are left to it."""
    import asyncio

    from svcnet.dns.handler import Handler
    from svcnet.dns.worker import ReplyCache, make_answer
    from svcnet.dns.zone import ClusterZone

    from svcnet.model import ENDPOINT_SLICE as SLICE_KIND
    from svcnet.model import SERVICE as SERVICE_KIND

    zone = ClusterZone("cluster.local", pods=pods)  # type: ignore[arg-type]
    services = [
        svc("shop", "web", clusterIP="10.0.0.10", ports=[{"name": "http", "port": 80}]),
        svc("shop", "noip", clusterIP="", ports=[{"name": "http", "port": 80}]),
        svc("shop", "hl", clusterIP="None", ports=[{"name": "http", "port": 80}]),
        svc("shop", "empty", clusterIP="None", ports=[{"name": "http", "port": 80}]),
        svc("shop", "alias", type="ExternalName", externalName="web.shop.svc.cluster.local"),
    ]
    slices = {"shop/hl": [eps("shop", "hl", "hl-1", [{"addresses": ["10.2.0.1"],
                                                       "hostname": "db-0"}],
                              [{"name": "http", "port": 80}])]}
    for obj in services:
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        zone.set_service(key, SERVICE_KIND.convert(obj),
                         [SLICE_KIND.convert(s) for s in slices.get(key, [])])
    zone.endpoints_of = lambda key: [("10-1-0-5", "10.1.0.5")] if key in (
        "shop/web", "shop/noip") else None
    zone.set_namespace("default", True)
    zone.set_ns_addresses(["10.96.0.10"])
    zone.mark_synced()
    handler = Handler(zone)
    worker = make_answer([(zone.table.mm, zone.table.slots, zone.table.mask), 1], ReplyCache(),
                         False, _wire(zone.zone), pods)
    decided: dict[str, bool] = {}

    async def check() -> int:
        checked = 0
        for name, _ in NEGATIVE_NAMES:
            for qtype, qclass in ((1, 1), (28, 1), (33, 1), (16, 1), (12, 1), (5, 1), (15, 1),
                                  (255, 1), (6, 1), (2, 1), (252, 1), (251, 1), (1, 3)):
                for flags, edns in ((0x0100, None), (0x0000, (1232, False)),
                                    (0x0110, (4096, True)), (0x0100, (512, True))):
                    data = struct.pack("!HHHHHH", 0x4242, flags, 1, 0, 0,
                                       0 if edns is None else 1) + _wire(name) + \
                        struct.pack("!HH", qtype, qclass)
                    if edns is not None:
                        data += b"\x00" + struct.pack("!HHIH", 41, edns[0],
                                                      0x8000 if edns[1] else 0, 0)
                    tail = worker(data)
                    if qtype == 1 and qclass == 1 and edns is None:
                        decided[name] = tail is not None and tail[1] & 0xF == 3
                    if tail is None:
                        continue
                    main, cacheable = await handler.handle_cacheable(data)
                    assert data[:2] + tail == main, (name, qtype, qclass, edns)
                    assert cacheable
                    checked += 1
        return checked

    assert asyncio.run(check()) > 500
    expected = {name: worker_decides for name, worker_decides in NEGATIVE_NAMES}
    if pods == "disabled":
        expected["10-1-2-3.shop.pod.cluster.local."] = True  # no pod names at all
    assert decided == expected
    zone.table.close()


def test_first_time_negative_answers_stay_in_the_worker(server: Running) -> None:
    """Search-path misses never asked before are answered by the worker (NXDOMAIN with the
    zone's SOA, as the main process would), not handed to the main process: a realistic
    mix has more distinct ones than any reply cache holds."""
    srv = server.component.server
    before = srv.handoffs
    for i in range(30):
        for name in (f"svc-{i}.shop.svc.cluster.local.default.svc.cluster.local.",
                     f"svc-{i}.shop.default.svc.cluster.local.", f"nosuch-{i}.cluster.local."):
            msg = query(server.port, name, "AAAA" if i % 2 else "A", use_edns=0 if i % 3 else False)
            assert msg.rcode() == dns.rcode.NXDOMAIN, name
            assert not msg.answer
            assert [(r.name.to_text(), r.rdtype) for r in msg.authority] == [
                ("cluster.local.", dns.rdatatype.SOA)]
    assert srv.handoffs == before


def test_reply_cache_evicts_instead_of_emptying() -> None:
    """A full reply cache keeps its recently used replies and at least half its entries,
    and never holds more than its bound, however many distinct queries pass."""
    from svcnet.dns.worker import ReplyCache, make_answer
    from svcnet.dns.zone import ClusterZone

    zone = ClusterZone("cluster.local")
    zone.mark_synced()
    cache = ReplyCache(64)
    worker = make_answer([(zone.table.mm, zone.table.slots, zone.table.mask), 1], cache, False,
                         _wire(zone.zone), "insecure")

    def q(name: str) -> bytes:
        return struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + _wire(name) + \
            struct.pack("!HH", 1, 1)

    hot = q("hot.nowhere.svc.cluster.local.")
    assert worker(hot) is not None
    for i in range(1000):
        data = q(f"n{i}.nowhere.svc.cluster.local.")
        assert worker(data) is not None
        assert min(i, 32) <= len(cache) <= 64, (i, len(cache))
        if i % 10 == 0:  # what serve does: the young generation, then ``answer``
            assert cache.young.get(hot[2:]) is not None or worker(hot) is not None
            assert hot[2:] in cache.young
    zone.table.close()


def test_ns_dns_name_is_nodata_without_addresses() -> None:
    """``ns.dns.<zone>``, named by the SOA and NS, exists even when there is no address to
    give it (only loopback, no kube-dns Service): NODATA with the SOA, as CoreDNS, for every
    type, not NXDOMAIN; addresses once known, NODATA again when they go."""
    from svcnet.dns.wire import NOERROR, TXT, A
    from svcnet.dns.zone import ClusterZone

    zone = ClusterZone("cluster.local")
    zone.set_ns_addresses([])
    zone.mark_synced()
    name = "ns.dns.cluster.local."
    for qtype in (A, 28, TXT):
        found = zone.answer(name, qtype).prepared
        assert found is not None and found.flags2 == NOERROR
        assert found.counts == b"\x00\x01\x00\x00\x00\x01\x00\x00", qtype  # SOA only
    zone.set_ns_addresses(["10.96.0.10"])
    found = zone.answer(name, A).prepared
    assert found is not None and found.counts[2:4] == b"\x00\x01"
    zone.set_ns_addresses([])
    found = zone.answer(name, A).prepared
    assert found is not None and found.flags2 == NOERROR and found.counts[2:4] == b"\x00\x00"
    zone.table.close()
