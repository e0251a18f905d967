"""Forwarding, caching, fail-over, the concurrency cap, loops and stub domains, for real.

Upstreams are dnslib servers on loopback started by the tests (UDP + TCP, truncating UDP
answers over 512 bytes like a real server).
"""

from __future__ import annotations

import concurrent.futures
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
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


def test_forwarded_reply_gets_opt_for_an_edns_client() -> None:
    """RFC 6891 6.1.1: the reply to an EDNS query carries an OPT record even when the
    upstream's reply has none (dnslib's has none), with the client's DO bit; from the
    upstream and from the cache; a client without EDNS gets none."""
    with upstream_server(Upstream(dict(RECORDS))) as up, serve(options(up.port)) as srv:
        for do in (False, True, False):  # the third from the cache
            msg = query(srv.port, "www.example.org.", "A", use_edns=0, want_dnssec=do)
            assert msg.rcode() == dns.rcode.NOERROR and msg.answer
            assert msg.edns == 0, msg
            assert bool(msg.ednsflags & dns.flags.DO) == do
            nx = query(srv.port, "nosuch.example.org.", "A", use_edns=0, want_dnssec=do)
            assert nx.rcode() == dns.rcode.NXDOMAIN and nx.edns == 0 and nx.authority
        plain = query(srv.port, "www.example.org.", "A")
        assert plain.edns < 0 and plain.answer


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

# --- a hostile upstream (issue 13, defect 4) -----------------------------------------------


class Hostile:
    """A UDP + TCP upstream on loopback that answers every query with forged replies first
    (wrong ID, QR clear, no question with a poisoned answer, another question), then, if
    ``honest``, the right answer; over TCP it sends ``tcp_reply`` and closes. It records the
    source port of every UDP query. Its behaviour is hostile by design: we test against it."""

    def __init__(self, *, honest: bool, truncate: bool = False, tcp_reply: bytes = b"") -> None:
        import socket
        import threading

        from conftest import free_port

        self.honest, self.truncate, self.tcp_reply = honest, truncate, tcp_reply
        self.ports: list[int] = []
        for _ in range(20):
            self.port = free_port()
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.tcp = socket.socket()
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.udp.bind(("127.0.0.1", self.port))
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(8)
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self.threads:
            t.start()

    def _serve_udp(self) -> None:
        import dns.message

        self.udp.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                data, addr = self.udp.recvfrom(4096)
            except OSError:
                continue
            self.ports.append(addr[1])
            q = dns.message.from_wire(data)
            name = q.question[0].name
            good = dns.message.make_response(q)
            good.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "1.2.3.4"))
            wire = good.to_wire()
            poison = dns.message.make_response(q)
            poison.question = []
            poison.answer.append(dns.rrset.from_text("other.com.", 3600, "IN", "A", "6.6.6.6"))
            other = dns.message.make_query("other.com.", "A")
            other.id = q.id
            other_reply = dns.message.make_response(other)
            other_reply.answer.append(dns.rrset.from_text("other.com.", 3600, "IN", "A",
                                                          "6.6.6.6"))
            forged = [
                bytes([wire[0] ^ 0xFF, wire[1]]) + wire[2:],  # wrong ID
                wire[:2] + bytes([wire[2] & 0x7F]) + wire[3:],  # QR clear
                poison.to_wire(),  # QDCOUNT 0, poisoned answer
                other_reply.to_wire(),  # another question
                wire[:6],  # short
            ]
            for packet in forged:
                self.udp.sendto(packet, addr)
            if self.truncate:
                self.udp.sendto(wire[:2] + bytes([wire[2] | 0x02]) + wire[3:4] +
                                b"\x00" * 8, addr)
            elif self.honest:
                self.udp.sendto(wire, addr)

    def _serve_tcp(self) -> None:
        self.tcp.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    conn.recv(4096)
                    conn.sendall(self.tcp_reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()


def test_forged_upstream_replies_are_ignored() -> None:
    """Wrong ID, QR clear, no question (a poisoned answer for another name, which used to be
    cached and served for an hour), another question, a short packet: all dropped; the
    honest reply that follows is served; every query leaves from a new source port."""
    up = Hostile(honest=True)
    try:
        with serve(options(up.port, cache_min_ttl=0)) as srv:
            for i in range(6):
                msg = query(srv.port, f"n{i}.example.org.", "A")
                assert msg.rcode() == dns.rcode.NOERROR
                assert [r.to_text() for r in msg.answer[0]] == ["1.2.3.4"], msg
                assert msg.question[0].name.to_text() == f"n{i}.example.org."
            for i in range(6):
                assert query(srv.port, f"n{i}.example.org.", "A").answer[0][0].to_text() == \
                    "1.2.3.4"
            assert len(set(up.ports)) >= 5, up.ports
    finally:
        up.close()


def test_only_forged_replies_give_servfail() -> None:
    up = Hostile(honest=False)
    try:
        with serve(options(up.port, forward_timeout=0.3)) as srv:
            for _ in range(2):
                msg = query(srv.port, "victim.example.org.", "A")
                assert msg.rcode() == dns.rcode.SERVFAIL and not msg.answer
    finally:
        up.close()


@pytest.mark.parametrize("tcp_reply", [b"", b"\x00", b"\x00\x00", b"\x00\x05abc",
                                       b"\x00\x02\x00\x00"])
def test_short_tcp_reply_after_truncation(tcp_reply: bytes) -> None:
    """A TC reply, then over TCP nothing, one byte, a zero length, a short body or a
    2-byte message: the client gets SERVFAIL quickly (it used to get nothing)."""
    up = Hostile(honest=False, truncate=True, tcp_reply=tcp_reply)
    try:
        with serve(options(up.port, forward_timeout=1.0)) as srv:
            started = time.monotonic()
            msg = query(srv.port, "big.example.org.", "A")
            assert msg.rcode() == dns.rcode.SERVFAIL
            assert time.monotonic() - started < 1.5
    finally:
        up.close()


# --- forwarding loops built on purpose (issue 13, defect 1) --------------------------------


class Relay:
    """A UDP relay on loopback standing for a ClusterIP that leads back to the server: every
    datagram from a client goes to ``target`` from a socket of its own, replies go back.
    ``rewrite_id`` gives each relayed query a new ID, as a resolver in the loop would.
    It counts datagrams in both directions and stops relaying after ``limit``."""

    def __init__(self, target: int | list[int], *, rewrite_id: bool = False,
                 limit: int = 20000) -> None:
        import socket
        import threading

        self.targets = target if isinstance(target, list) else [target]
        self.rewrite_id = rewrite_id
        self.limit = limit
        self.packets = 0
        self.names: list[str] = []
        """Query names relayed towards the target, lower-cased (forwarders randomise case)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import os
        import random
        import selectors
        import socket

        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        inner: dict[tuple[str, int], socket.socket] = {}
        ids: dict[bytes, bytes] = {}
        while not self.stopped.is_set():
            for key, _ in sel.select(0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data, addr = sock.recvfrom(65535)
                except OSError:
                    continue
                self.packets += 1
                if self.packets > self.limit:
                    continue
                if key.data is None:  # a query for the target
                    try:
                        self.names.append(dns.message.from_wire(data).question[0].name
                                          .to_text().lower())
                    except Exception:  # any datagram is relayed as it is
                        self.names.append("")
                    out = inner.get(addr)
                    if out is None:  # each client stays with one target (conntrack)
                        out = inner[addr] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        out.connect(("127.0.0.1", random.choice(self.targets)))
                        sel.register(out, selectors.EVENT_READ, addr)
                    if self.rewrite_id:
                        new = os.urandom(2)
                        ids[new] = data[:2]
                        data = new + data[2:]
                    out.send(data)
                else:  # a reply from the target
                    if self.rewrite_id:
                        data = ids.pop(data[:2], data[:2]) + data[2:]
                    self.sock.sendto(data, key.data)
        for s in inner.values():
            s.close()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.sock.close()


def loop_metric(to: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("svcnet_dns_forward_loops_total", {"to": to}) or 0.0


def test_loop_through_the_server_itself_is_cut_at_once() -> None:
    """The server's upstream leads back to the server (as the lab's DNS pods' resolv.conf
    did). The loop appears after start-up, so the start-up probe saw nothing: the first
    query to a name outside the cluster comes back to us with our ID and letter case, is
    recognised, and the client gets SERVFAIL at once after a handful of packets; the
    upstream is not used again, the loop is logged and counted."""
    from conftest import free_port

    port = free_port()
    relay = Relay(port, limit=0)  # drops everything until the server is up
    try:
        with serve(options(relay.port, listen=("127.0.0.1", port), forward_timeout=1.0)) \
                as srv:
            fwd = srv.component.server.handler.forwarder
            name = f"127.0.0.1:{relay.port}"
            before = loop_metric(name)
            assert wait_for(lambda: relay.packets >= 1, 5), "the start-up probe was sent"
            relay.limit, relay.packets = 20000, 0  # now the loop is closed
            started = time.monotonic()
            msg = query(srv.port, "www.example.org.", "A")
            elapsed = time.monotonic() - started
            assert msg.rcode() == dns.rcode.SERVFAIL
            assert elapsed < 0.5, elapsed
            assert fwd.upstreams[0].looped
            assert relay.packets <= 6, relay.packets
            assert loop_metric(name) > before
            relay.packets = 0
            for i in range(5):
                assert query(srv.port, f"x{i}.example.org.", "A").rcode() == dns.rcode.SERVFAIL
            assert relay.packets == 0, "a looped upstream gets no queries"
    finally:
        relay.close()


def test_loop_through_a_resolver_that_changes_ids_is_found_by_probes() -> None:
    """A hop that gives each query a new ID hides it from the ID check; the periodic probe
    (a random name) still comes back, and from then on the loop is cut."""
    from conftest import free_port

    port = free_port()
    relay = Relay(port, rewrite_id=True, limit=0)
    try:
        with serve(options(relay.port, listen=("127.0.0.1", port), forward_timeout=0.5,
                           loop_probe_interval=0.3)) as srv:
            fwd = srv.component.server.handler.forwarder
            assert wait_for(lambda: relay.packets >= 1, 5), "the start-up probe was sent"
            assert not fwd.upstreams[0].looped
            relay.limit = 20000
            assert wait_for(lambda: fwd.upstreams[0].looped, 5)
            relay.names.clear()
            started = time.monotonic()
            assert query(srv.port, "www.example.org.", "A").rcode() == dns.rcode.SERVFAIL
            assert time.monotonic() - started < 0.5
            # Not forwarded (the periodic probes, random names, go on and may pass meanwhile).
            assert "www.example.org." not in relay.names, relay.names
            relay.limit = 0  # the path is cut: the next probe times out, no news
            time.sleep(0.5)
            assert fwd.upstreams[0].looped
            with upstream_server(Upstream(dict(RECORDS))) as good:
                relay.targets, relay.limit = [good.port], 20000  # the path is fixed
                assert wait_for(lambda: not fwd.upstreams[0].looped, 5)
                msg = query(srv.port, "www.example.org.", "A")
                assert msg.answer[0][0].to_text() == "192.0.2.1"
    finally:
        relay.close()


def test_loop_through_a_service_with_two_replicas_is_bounded() -> None:
    """The lab's case: two DNS replicas behind one ClusterIP that both forward to that
    ClusterIP. Each replica forwards with its own ID and case, so a query hops between
    them until one meets its own query; that one stops using the upstream. Every client
    query gets SERVFAIL quickly and the packets stay few."""
    from conftest import free_port

    port_a, port_b = free_port(), free_port()
    relay = Relay([port_a, port_b], limit=0)
    try:
        with serve(options(relay.port, listen=("127.0.0.1", port_a), forward_timeout=1.0)) \
                as a, serve(options(relay.port, listen=("127.0.0.1", port_b),
                                    forward_timeout=1.0)) as b:
            assert wait_for(lambda: relay.packets >= 2, 5), "both start-up probes were sent"
            relay.limit, relay.packets = 20000, 0
            for i in range(10):
                started = time.monotonic()
                msg = query(a.port if i % 2 else b.port, f"q{i}.example.org.", "A")
                assert msg.rcode() == dns.rcode.SERVFAIL
                assert time.monotonic() - started < 1.0
            assert relay.packets <= 200, relay.packets
            looped = [srv.component.server.handler.forwarder.upstreams[0].looped
                      for srv in (a, b)]
            assert any(looped), looped
    finally:
        relay.close()
