"""Forwarding, caching, fail-over, the concurrency cap, loops and stub domains, for real.

Upstreams are dnslib servers on loopback started by the tests (UDP + TCP, truncating UDP
answers over 512 bytes like a real server).
"""

from __future__ import annotations

import concurrent.futures
import time

import dns.flags
import dns.rcode
from dnskit import Upstream, query, serve, upstream_server, wait_for
from svcnet.dns.daemon import DNSOptions
from svcnet.dns.forward import drop_self

from svcnet.model import SERVICE
from svcnet.store.memory import MemoryStore


def options(*upstreams: int, **kw: object) -> DNSOptions:
    base: dict[str, object] = {"listen": ("127.0.0.1", 0), "workers": 1,
                               "upstreams": [("127.0.0.1", p) for p in upstreams],
                               "forward_timeout": 0.5}
    base.update(kw)
    return DNSOptions(**base)  # type: ignore[arg-type]


RECORDS = {
    ("www.example.org.", "A"): ["192.0.2.1"],
    ("short.example.org.", "A"): ["192.0.2.2"],
    ("big.example.org.", "TXT"): [f'"{"x" * 40} {i}"' for i in range(40)],
    ("ext.interwebs.test.", "A"): ["1.2.3.4"],
}


def test_forward_cache_and_expiry() -> None:
    with upstream_server(Upstream(dict(RECORDS), ttl=1)) as up, \
            serve(options(up.port, cache_min_ttl=0)) as srv:
        first = query(srv.port, "www.example.org.", "A")
        assert first.rcode() == dns.rcode.NOERROR
        assert [r.to_text() for r in first.answer] == ["www.example.org. 1 IN A 192.0.2.1"]
        second = query(srv.port, "WWW.example.org.", "A")
        assert second.answer[0][0].to_text() == "192.0.2.1"
        assert len([q for q in up.queries if q[0] == "www.example.org."]) == 1, "cache hit"
        time.sleep(1.2)
        query(srv.port, "www.example.org.", "A")
        assert len([q for q in up.queries if q[0] == "www.example.org."]) == 2, "expired"


def test_ttl_capped_and_aged() -> None:
    with upstream_server(Upstream(dict(RECORDS), ttl=86400)) as up, \
            serve(options(up.port)) as srv:
        first = query(srv.port, "short.example.org.", "A")
        assert first.answer[0].ttl == 3600  # capped like CoreDNS's cache (success 3600)
        time.sleep(1.1)
        assert query(srv.port, "short.example.org.", "A").answer[0].ttl <= 3599


def test_negative_caching() -> None:
    with upstream_server(Upstream(dict(RECORDS), ttl=60)) as up, \
            serve(options(up.port)) as srv:
        for _ in range(3):
            msg = query(srv.port, "nothing.example.org.", "A")
            assert msg.rcode() == dns.rcode.NXDOMAIN
            assert msg.authority and msg.authority[0].rdtype == dns.rdatatype.SOA
        assert len([q for q in up.queries if q[0] == "nothing.example.org."]) == 1


def test_truncated_upstream_answer_retried_over_tcp() -> None:
    with upstream_server(Upstream(dict(RECORDS))) as up, serve(options(up.port)) as srv:
        udp = query(srv.port, "big.example.org.", "TXT")
        assert udp.flags & dns.flags.TC  # too big for the client's 512 bytes
        msg = query(srv.port, "big.example.org.", "TXT", tcp=True)
        assert len(msg.answer[0]) == 40
        protos = [q[2] for q in up.queries if q[0] == "big.example.org."]
        assert protos == ["udp", "tcp"]


def test_failover_to_second_upstream() -> None:
    """Every query is answered although a silent upstream is tried (random order) until it
    has failed twice and is marked down."""
    dead = Upstream(dict(RECORDS), silent=True)  # accepts and never answers
    with upstream_server(dead) as bad, upstream_server(Upstream(dict(RECORDS))) as good, \
            serve(options(bad.port, good.port)) as srv:
        forwarder = srv.component.server.handler.forwarder
        for i in range(40):
            name = f"n{i}.example.org."
            good.records[(name, "A")] = ["192.0.2.9"]
            msg = query(srv.port, name, "A", timeout=4)
            assert msg.rcode() == dns.rcode.NOERROR, i
            if not forwarder.upstreams[0].healthy:
                break
        assert not forwarder.upstreams[0].healthy, "the silent upstream is marked down"
        assert forwarder.upstreams[1].healthy
        tried = len(bad.queries)
        for i in range(5):
            good.records[(f"m{i}.example.org.", "A")] = ["192.0.2.9"]
            assert query(srv.port, f"m{i}.example.org.", "A").rcode() == dns.rcode.NOERROR
        assert len([q for q in bad.queries[tried:] if q[1] == "A"]) == 0, "down: not tried"


def test_unreachable_upstream_then_recovery() -> None:
    """All upstreams down: SERVFAIL; the health check brings one back."""
    from conftest import free_port

    port = free_port()
    with serve(options(port)) as srv:
        assert query(srv.port, "www.example.org.", "A").rcode() == dns.rcode.SERVFAIL
        with upstream_server(Upstream(dict(RECORDS), port=port)) as up:
            if up.port != port:
                return  # the port was taken meanwhile; the first half still held
            assert wait_for(lambda: query(srv.port, "www.example.org.", "A").rcode()
                            == dns.rcode.NOERROR, 5)


def test_concurrency_cap_refuses() -> None:
    slow = Upstream(dict(RECORDS), delay=0.4)
    with upstream_server(slow) as up, serve(options(up.port, max_concurrent=1,
                                                    forward_timeout=2)) as srv:
        slow.records[("a.example.org.", "A")] = ["192.0.2.3"]
        slow.records[("b.example.org.", "A")] = ["192.0.2.4"]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(query, srv.port, f"{n}.example.org.", "A") for n in "ab"]
            rcodes = sorted(f.result().rcode() for f in futures)
        assert rcodes == [dns.rcode.NOERROR, dns.rcode.REFUSED]


def test_stub_domain() -> None:
    with upstream_server(Upstream(dict(RECORDS))) as main, \
            upstream_server(Upstream({("db.corp.test.", "A"): ["10.1.1.1"]})) as stub, \
            serve(options(main.port, stub_domains={"corp.test.": [("127.0.0.1", stub.port)]})
                  ) as srv:
        assert query(srv.port, "db.corp.test.", "A").answer[0][0].to_text() == "10.1.1.1"
        assert [q[0] for q in stub.queries if "loop-check" not in q[0]] == ["db.corp.test."]
        assert not [q for q in main.queries if q[0] == "db.corp.test."]


def test_external_name_target_resolved_upstream() -> None:
    async def populate(store: MemoryStore) -> None:
        await store.put(SERVICE, {"metadata": {"name": "external", "namespace": "testns"},
                                  "spec": {"type": "ExternalName",
                                           "externalName": "ext.interwebs.test"}})

    with upstream_server(Upstream(dict(RECORDS), ttl=5)) as up, \
            serve(options(up.port), populate) as srv:
        msg = query(srv.port, "external.testns.svc.cluster.local.", "A")
        lines = sorted(" ".join(r.to_text().split()) for r in msg.answer)
        assert lines == ["ext.interwebs.test. 5 IN A 1.2.3.4",
                         "external.testns.svc.cluster.local. 5 IN CNAME ext.interwebs.test."]


def test_refuses_to_forward_to_itself() -> None:
    assert drop_self([("127.0.0.1", 53), ("10.0.0.1", 53)], ("127.0.0.1", 53)) == [
        ("10.0.0.1", 53)]
    assert drop_self([("127.0.0.53", 53)], ("0.0.0.0", 53)) == []
    assert drop_self([("127.0.0.53", 53)], ("127.0.0.1", 5353)) == [("127.0.0.53", 53)]


def test_loop_detected_between_two_servers() -> None:
    """A forwards to B and B to A: A's loop probe comes back to A and A stops using B."""
    from conftest import free_port

    port_a, port_b = free_port(), free_port()
    with serve(options(port_b, listen=("127.0.0.1", port_a), forward_timeout=0.3)) as a, \
            serve(options(port_a, listen=("127.0.0.1", port_b), forward_timeout=0.3)) as b:
        fa = a.component.server.handler.forwarder
        fb = b.component.server.handler.forwarder
        assert wait_for(lambda: fa.upstreams[0].looped or fb.upstreams[0].looped, 5)
        assert query(a.port, "anything.example.", "A").rcode() == dns.rcode.SERVFAIL


import dns.rdatatype  # noqa: E402
