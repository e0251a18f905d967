"""The shared answer table (``dns/table.py``) and the workers' reply cache.

Unit tests of the table's storage (what one process writes another maps and reads, rebuilds,
compaction), then a running server with two workers: after a Service changes, is deleted, or
enough Services arrive to rebuild the table, every worker answers the new state. Queries come
from 32 sockets with distinct source ports, so SO_REUSEPORT spreads them over both workers
(all on one worker: probability 2^-31), and each socket asks first so both caches hold the
old answer.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from dnskit import Running, serve, wait_for
from svcnet.dns.daemon import DNSOptions
from svcnet.dns.table import SharedTable, TableView
from svcnet.dns.wire import AAAA, RR, A, prepare
from svcnet.dns.zone import split_keys, table_key

from svcnet.model import SERVICE
from svcnet.store.memory import MemoryStore


def answer_for(name: str, ip: str):  # type: ignore[no-untyped-def]
    return prepare(0, [RR(name, A, 5, ip)], [], [], name, qtype=A)


def test_table_set_get_delete_and_unchanged() -> None:
    table = SharedTable()
    key = table_key("a.ns.svc.cluster.local.", A)
    assert table.get(key) is None and key not in table and len(table) == 0
    table.set(key, answer_for("a.ns.svc.cluster.local.", "10.0.0.1"))
    assert table.get(key) == answer_for("a.ns.svc.cluster.local.", "10.0.0.1")
    assert key in table and len(table) == 1
    end = table._end
    assert table.set(key, answer_for("a.ns.svc.cluster.local.", "10.0.0.1")) is False
    assert table._end == end, "an unchanged answer must not append a record"
    table.set(key, answer_for("a.ns.svc.cluster.local.", "10.0.0.2"))
    assert table[key].body.endswith(bytes([10, 0, 0, 2]))
    table.set(key, None)
    assert table.get(key) is None and len(table) == 0
    table.set(key, None)  # deleting twice is harmless
    table.close()


def test_longest_name_fits() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]) + "."
    key = table_key(name, A)
    assert len(key) == 255 + 4
    table = SharedTable()
    table.set(key, answer_for(name, "10.0.0.1"))
    assert table.get(key) == answer_for(name, "10.0.0.1")
    assert TableView(table.fd).find(key)
    assert list(table.keys()) == [key]
    table.close()


def test_reader_in_another_mapping_sees_writes_and_rebuilds() -> None:
    table = SharedTable()
    names = [f"s{i}.ns.svc.cluster.local." for i in range(3000)]
    table.set(table_key(names[0], A), answer_for(names[0], "10.0.0.1"))
    view = TableView(table.fd)  # what a worker maps
    builds = table.builds
    # A write after mapping is visible through the mapping: shared memory, not a copy.
    table.set(table_key(names[0], A), answer_for(names[0], "10.0.0.9"))
    off = view.find(table_key(names[0], A))
    assert off and view.mm[off:table._record_end(off)].endswith(bytes([10, 0, 0, 9]))
    rebuilt = False
    for i, name in enumerate(names[1:], 1):
        rebuilt |= table.set(table_key(name, A), answer_for(name, f"10.1.{i // 250}.{i % 250}"))
    assert rebuilt and table.builds > builds, "3000 keys must outgrow the first table"
    assert len(table) == 3000
    assert all(table.get(table_key(n, A)) is not None for n in names)
    # The old mapping still reads what it had (a worker switches when told).
    assert view.find(table_key(names[0], A))
    fresh = TableView(table.fd)
    assert all(fresh.find(table_key(n, A)) for n in names)
    assert not fresh.find(table_key("nope.ns.svc.cluster.local.", A))
    assert sorted(table.keys()) == sorted(table_key(n, A) for n in names)
    table.close()


def test_compaction_drops_dead_records() -> None:
    table = SharedTable()
    keys = [table_key(f"s{i}.ns.svc.cluster.local.", A) for i in range(200)]
    builds = table.builds
    for round_ in range(100):
        for i, key in enumerate(keys):
            table.set(key, answer_for(f"s{i}.ns.svc.cluster.local.", f"10.{round_}.0.{i}"))
    assert table.builds > builds
    assert table.garbage_bytes * 2 <= table._end - table._data_at + (1 << 20)
    assert table.size_bytes < 4 << 20, "replacing answers must not grow the table forever"
    assert table.get(keys[5]) == answer_for("s5.ns.svc.cluster.local.", "10.99.0.5")
    table.close()


def test_split_keys_round_trip() -> None:
    keys = {table_key("a.b.svc.cluster.local.", A), table_key("b.svc.cluster.local.", AAAA),
            table_key("_http._tcp.a.b.svc.cluster.local.", 33), table_key(".", 2)}
    assert split_keys(b"".join(sorted(keys))) == keys
    assert split_keys(b"") == set()


async def one_service(store: MemoryStore) -> None:
    await store.put(SERVICE, service("web", "10.0.0.1"))


def service(name: str, ip: str) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}}


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    with serve(DNSOptions(listen=("127.0.0.1", 0), workers=2, upstreams=[]),
               one_service) as srv:
        yield srv


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(32):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def ask_all(port: int, socks: list[socket.socket], name: str) -> set[str]:
    """Every socket's answer: the A record's address, or the rcode's name."""
    seen = set()
    for s in socks:
        msg = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port,
                            sock=s, timeout=3)
        if msg.rcode() != dns.rcode.NOERROR or not msg.answer:
            seen.add(dns.rcode.to_text(msg.rcode()))
        else:
            seen.add(msg.answer[0][0].to_text())
    return seen


NAME = "web.shop.svc.cluster.local."


def test_change_reaches_every_worker(server: Running, clients: list[socket.socket]) -> None:
    assert server.component.server.alive_workers() == 2
    assert ask_all(server.port, clients, NAME) == {"10.0.0.1"}  # both caches primed
    server.call(server.store.put(SERVICE, service("web", "10.0.0.2")))
    assert wait_for(lambda: ask_all(server.port, clients, NAME) == {"10.0.0.2"})
    server.call(server.store.delete(SERVICE, "shop", "web"))
    assert wait_for(lambda: ask_all(server.port, clients, NAME) == {"NXDOMAIN"})
    server.call(server.store.put(SERVICE, service("web", "10.0.0.3")))
    assert wait_for(lambda: ask_all(server.port, clients, NAME) == {"10.0.0.3"})


def test_rebuilt_table_reaches_every_worker(server: Running,
                                            clients: list[socket.socket]) -> None:
    builds = server.component.zone.table.builds

    async def many() -> None:
        for i in range(800):
            await server.store.put(SERVICE, service(f"m{i}", f"10.2.{i // 250}.{i % 250 + 1}"))

    server.call(many(), timeout=30)
    assert server.component.zone.table.builds > builds, "800 Services must rebuild the table"
    assert wait_for(lambda: ask_all(server.port, clients, "m799.shop.svc.cluster.local.") ==
                    {"10.2.3.50"})
    assert ask_all(server.port, clients, "m0.shop.svc.cluster.local.") == {"10.2.0.1"}
    assert ask_all(server.port, clients, NAME) == {"10.0.0.3"}


def test_cached_reply_follows_the_query_shape(server: Running) -> None:
    """The cache is keyed by everything after the ID: case, RD and EDNS size each get
    their own reply, and the ID is always the client's."""
    for name, flags, edns in [("WEB.shop.svc.cluster.local.", dns.flags.RD, -1),
                              ("web.shop.svc.cluster.local.", 0, -1),
                              ("web.shop.svc.cluster.local.", dns.flags.RD, 0),
                              ("wEb.SHOP.svc.cluster.local.", 0, 0)]:
        for _ in range(3):
            q = dns.message.make_query(name, "A", use_edns=edns, flags=flags)
            msg = dns.query.udp(q, "127.0.0.1", port=server.port, timeout=3)
            assert msg.id == q.id
            assert str(msg.question[0].name) == name
            assert bool(msg.flags & dns.flags.RD) == bool(flags & dns.flags.RD)
            assert msg.flags & dns.flags.AA
            assert (msg.edns >= 0) == (edns >= 0)
            assert msg.answer[0][0].to_text() == "10.0.0.3"


def test_no_stale_reply_after_changes_under_load(server: Running,
                                                clients: list[socket.socket]) -> None:
    """Queries keep arriving while a Service changes 40 times and the table is rebuilt in
    between; once the changes stop, every worker answers the last address (a reply cached
    from an older table would stay wrong until the next change)."""
    name = "churn.shop.svc.cluster.local."
    stop = threading.Event()
    sent = [0]

    def hammer() -> None:
        q = dns.message.make_query(name, "A").to_wire()
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            for s in clients[:8]:
                s.sendto(q, ("127.0.0.1", server.port))
                sent[0] += 1
            time.sleep(0.001)

    async def churn() -> None:
        for i in range(40):
            await server.store.put(SERVICE, service("churn", f"10.3.0.{i + 1}"))
            if i % 10 == 5:  # grow the table: a rebuild hands workers a new one
                for j in range(300):
                    await server.store.put(SERVICE, service(f"g{i}-{j}", f"10.4.{i}.{j % 250}"))
            await asyncio.sleep(0.01)

    builds = server.component.zone.table.builds
    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        server.call(churn(), timeout=60)
    finally:
        stop.set()
        thread.join(10)
    for s in clients[:8]:  # drop the replies the hammer never read
        s.setblocking(False)
        try:
            while True:
                s.recv(4096)
        except BlockingIOError:
            pass
        s.setblocking(True)
    assert sent[0] > 100 and server.component.zone.table.builds > builds
    assert wait_for(lambda: ask_all(server.port, clients, name) == {"10.3.0.40"})
    time.sleep(0.3)
    assert ask_all(server.port, clients, name) == {"10.3.0.40"}
