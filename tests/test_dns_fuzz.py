"""Random and mutated packets at a running server (UDP workers and TCP), for a bounded time.

Between every few hostile packets a valid query must still get the right answer, and at the
end every worker process must still be alive. Hypothesis drives the packets: random bytes,
valid queries with bytes flipped / truncated / extended, and header fields set to odd values
(QR set, many questions, compression pointers, label lengths over 63, OPT versions).
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator

import dns.exception
import dns.message
import dns.rcode
import pytest
from dnskit import Running, query, serve, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from svcnet.dns.daemon import DNSOptions

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.memory import MemoryStore

NAME = "web.shop.svc.cluster.local."
VALID = dns.message.make_query(NAME, "A", use_edns=0).to_wire()


async def populate(store: MemoryStore) -> None:
    await store.put(SERVICE, {"metadata": {"name": "web", "namespace": "shop"},
                              "spec": {"clusterIP": "10.0.0.10",
                                       "ports": [{"name": "http", "port": 80}]}})
    await store.put(SERVICE, {"metadata": {"name": "h", "namespace": "shop"},
                              "spec": {"clusterIP": "None"}})
    await store.put(ENDPOINT_SLICE, {
        "metadata": {"name": "h-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "h"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [f"10.1.0.{i}"]} for i in range(1, 80)]})


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    with serve(DNSOptions(listen=("127.0.0.1", 0), workers=2, upstreams=[]), populate) as srv:
        yield srv


def mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None, extra: bytes) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        out[pos % len(out)] = value
    if cut is not None:
        out = out[: cut % (len(out) + 1)]
    return bytes(out) + extra


def header(qid: int, flags: int, qd: int, an: int, ns: int, ar: int) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def query_bytes(qid: int, labels: list[bytes], qtype: int, qclass: int, opt: bytes) -> bytes:
    name = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
    return header(qid, 0x0100, 1, 0, 0, 1 if opt else 0) + name + \
        struct.pack("!HH", qtype, qclass) + opt


ZONE_LABELS = [b"svc", b"cluster", b"local"]
labels = st.lists(st.binary(min_size=1, max_size=63), min_size=0, max_size=4)
opts = st.one_of(
    st.just(b""),
    st.builds(lambda size, ttl, rdata: b"\x00\x00\x29" + struct.pack("!HIH", size, ttl,
                                                                       len(rdata)) + rdata,
              st.integers(0, 65535), st.sampled_from([0, 0x8000, 0x01000000, 0x00008000]),
              st.binary(max_size=24)))
named_queries = st.builds(
    query_bytes, st.integers(0, 65535),
    st.one_of(labels.map(lambda ls: [*ls, b"shop", *ZONE_LABELS]),
              labels.map(lambda ls: [*ls, b"pod", *ZONE_LABELS]),
              labels.map(lambda ls: [*ls, b"in-addr", b"arpa"]),
              st.just([b"web", b"shop", *ZONE_LABELS])),
    st.sampled_from([1, 2, 5, 6, 12, 16, 28, 33, 255, 252, 65535]),
    st.sampled_from([1, 3, 4, 254, 255]), opts)

packets = st.one_of(
    st.binary(max_size=600),
    named_queries,
    st.builds(mutate, st.just(VALID),
              st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
              st.one_of(st.none(), st.integers(0, 100)), st.binary(max_size=40)),
    st.builds(lambda h, body: h + body,
              st.builds(header, st.integers(0, 65535), st.integers(0, 65535),
                        st.integers(0, 3), st.integers(0, 3), st.integers(0, 3),
                        st.integers(0, 3)),
              st.one_of(st.just(VALID[12:]), st.binary(max_size=80),
                        st.just(b"\xc0\x0c\x00\x01\x00\x01"),  # pointer to itself
                        st.just(b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"))),
)


def check_valid(srv: Running) -> None:
    """A valid query is answered right. Like any stub resolver it tries again on a timeout:
    under load the burst just sent may still fill the socket's queue (UDP drops, not a bug)."""
    for attempt in range(3):
        try:
            msg = query(srv.port, NAME, "A", timeout=2)
            break
        except dns.exception.Timeout:
            if attempt == 2:
                raise
    assert msg.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rr in msg.answer[0]] == ["10.0.0.10"]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


BASELINE: dict[str, int] = {}
FUZZ_SECONDS = 90.0  # the hypothesis run stops drawing batches after this


@pytest.fixture(scope="module", autouse=True)
def baseline(server: Running) -> None:
    for _ in range(10):  # warm the caches and code paths before measuring
        check_valid(server)
    BASELINE["workers"] = sum(rss_kb(w.proc.pid) for w in server.component.server._workers)
    BASELINE["started"] = int(time.monotonic())


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(packets, min_size=1, max_size=8))
def test_hostile_packets_never_stop_valid_answers(server: Running, batch: list[bytes]) -> None:
    if time.monotonic() - BASELINE["started"] > FUZZ_SECONDS:
        return  # bounded in time on a slow machine
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for packet in batch:
            s.sendto(packet, ("127.0.0.1", server.port))
    if random.random() < 0.1:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as t:
            t.sendall(struct.pack("!H", len(batch[0])) + batch[0])
            if random.random() < 0.5:
                t.sendall(b"\x00")  # half a length prefix, then gone
    check_valid(server)


def test_workers_survived(server: Running) -> None:
    """Runs after the fuzzing in this module: nobody crashed, answers still right."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        check_valid(server)
        time.sleep(0.05)
        break
    assert server.component.server.alive_workers() == 2
    big = query(server.port, "h.shop.svc.cluster.local.", "A", tcp=True)
    assert len(big.answer[0]) == 79


def test_memory_and_state_are_flat_after_fuzzing(server: Running) -> None:
    """After the fuzzing: no TCP connection or slow-path task left over, the forwarders
    hold no marks, and the workers' memory is what it was (their reply caches are
    bounded)."""
    srv = server.component.server
    assert wait_for(lambda: srv.tcp_connections == 0 and len(srv._tasks) <= 1, 15), \
        (srv.tcp_connections, len(srv._tasks))
    for fwd in srv.handler.forwarders():
        assert not fwd.marks
    workers = sum(rss_kb(w.proc.pid) for w in srv._workers)
    assert workers - BASELINE["workers"] < 8 * 1024, (BASELINE["workers"], workers)
    check_valid(server)


def test_killed_worker_is_replaced(server: Running) -> None:
    import os
    import signal

    victim = server.component.server._workers[0].proc
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
            server.component.server.alive_workers() < 2 or victim.poll() is None or
            any(w.proc is victim for w in server.component.server._workers)):
        time.sleep(0.1)
    assert server.component.server.alive_workers() == 2
    for _ in range(20):
        check_valid(server)
