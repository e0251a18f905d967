"""Hostile and odd clients against a running server: bytes outside ASCII in names, labels
holding dots, TCP clients that never read. Each case here once cost the server replies,
log space or memory (issue 13)."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Iterator

import dns.message
import dns.rcode
import pytest
from dnskit import Running, query, serve, wait_for
from svcnet.dns.daemon import DNSOptions

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.memory import MemoryStore

ZONE = "cluster.local"


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
    with serve(DNSOptions(listen=("127.0.0.1", 0), workers=1, upstreams=[],
                          tcp_idle_timeout=1.0, tcp_write_timeout=1.0,
                          tcp_max_connections=64), populate) as srv:
        yield srv


def raw_query(qid: int, labels: list[bytes], qtype: int = 1, flags: int = 0x0100) -> bytes:
    name = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
    return struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, 1)


def exchange_many(port: int, packets: list[bytes], window: int = 200,
                  timeout: float = 2.0) -> dict[int, bytes]:
    """Send ``packets`` (distinct IDs) ``window`` at a time; the replies by ID."""
    replies: dict[int, bytes] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.settimeout(timeout)
        for start in range(0, len(packets), window):
            chunk = packets[start:start + window]
            for p in chunk:
                s.sendto(p, ("127.0.0.1", port))
            wanted = {struct.unpack_from("!H", p)[0] for p in chunk}
            deadline = time.monotonic() + timeout
            while wanted and time.monotonic() < deadline:
                try:
                    data = s.recv(4096)
                except TimeoutError:
                    break
                (qid,) = struct.unpack_from("!H", data)
                wanted.discard(qid)
                replies[qid] = data
    return replies


class _Bytes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.size = 0
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.size += len(self.format(record))
        self.records += 1


def test_non_ascii_names_answered_and_log_stays_small(server: Running) -> None:
    """5000 queries with bytes outside ASCII in cluster names: every one gets NXDOMAIN, and
    the log does not grow with them (it used to be a 1.4 KB traceback each and no reply)."""
    handler = _Bytes()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        packets = [raw_query(i, [b"w\xe9b-%d" % i, b"sh\xffop", b"svc", b"cluster", b"local"])
                   for i in range(5000)]
        replies = exchange_many(server.port, packets)
    finally:
        root.removeHandler(handler)
    assert len(replies) == 5000
    rcodes = {r[3] & 0xF for r in replies.values()}
    assert rcodes == {dns.rcode.NXDOMAIN}
    msg = dns.message.from_wire(next(iter(replies.values())))
    assert msg.authority and msg.authority[0].rdtype == dns.rdatatype.SOA
    assert handler.size < 20_000, f"{handler.records} log records, {handler.size} bytes"


def test_non_ascii_namespace_and_pod_names(server: Running) -> None:
    for labels in ([b"\xc3\xa9", b"svc", b"cluster", b"local"],
                   [b"1-2-3-4", b"n\x00s", b"pod", b"cluster", b"local"],
                   [b"\xff" * 63, b"\xfe" * 63, b"svc", b"cluster", b"local"]):
        replies = exchange_many(server.port, [raw_query(7, labels)])
        assert replies and replies[7][3] & 0xF == dns.rcode.NXDOMAIN, labels


def test_label_with_a_dot_is_one_label(server: Running) -> None:
    """Wire label ``web.shop`` under svc.cluster.local is the namespace ``web.shop`` (which
    does not exist), not the Service web in shop."""
    replies = exchange_many(server.port, [
        raw_query(1, [b"web.shop", b"svc", b"cluster", b"local"]),
        raw_query(2, [b"web", b"shop.svc", b"cluster", b"local"]),
        raw_query(3, [b"web", b"shop", b"svc", b"cluster.local"]),
        raw_query(4, [b"web", b"shop", b"svc", b"cluster", b"local"])])
    assert [replies[i][3] & 0xF for i in (1, 2, 4)] == [3, 3, 0]
    assert replies[3][3] & 0xF in (dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL)  # not in our zone
    assert dns.message.from_wire(replies[4]).answer[0][0].to_text() == "10.0.0.10"


import dns.rdatatype  # noqa: E402


def server_side_connections(port: int) -> int:
    """Our server's TCP sockets on ``port`` other than the listener and TIME_WAIT (from
    /proc/net/tcp): a socket closed with unsent data stays in FIN_WAIT1 and counts."""
    count = 0
    with open("/proc/net/tcp") as f:
        lines = f.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] not in ("0A", "06"):
            count += 1
    return count


def socket_states(port: int) -> dict[str, int]:
    with open("/proc/net/tcp") as f:
        lines = f.read().splitlines()[1:]
    out: dict[str, int] = {}
    for line in lines:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            out[fields[3]] = out.get(fields[3], 0) + 1
    return out


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_tcp_clients_that_never_read(server: Running) -> None:
    """100 clients each pipeline 300 queries for a 1.3 KB answer and never read: the server
    keeps answering others, holds at most its connection limit, closes them all after the
    write/idle timeout, and its memory comes back."""
    q = dns.message.make_query("h.shop.svc.cluster.local.", "A").to_wire()
    burst = (struct.pack("!H", len(q)) + q) * 300
    base = rss_kb()
    hogs: list[socket.socket] = []
    try:
        for _ in range(100):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", server.port))
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError, ConnectionError):
                    s.send(burst)
            except OSError:
                pass
            hogs.append(s)
        assert server.component.server.tcp_connections <= 64
        for tcp in (False, True):
            msg = query(server.port, "web.shop.svc.cluster.local.", "A", tcp=tcp)
            assert msg.answer[0][0].to_text() == "10.0.0.10"
        peak = rss_kb()
        assert wait_for(lambda: server_side_connections(server.port) == 0, 30), \
            f"{server_side_connections(server.port)} connections still open " \
            f"({server.component.server.tcp_connections} in the server; states " \
            f"{socket_states(server.port)})"
        assert server.component.server.tcp_connections == 0
    finally:
        for s in hogs:
            s.close()
    after = rss_kb()
    assert after - base < 20_000, f"RSS {base} -> peak {peak} -> {after} KB"
    assert query(server.port, "web.shop.svc.cluster.local.", "A", tcp=True).answer
