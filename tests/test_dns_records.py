"""The Kubernetes DNS specification 1.1.0 and CoreDNS's extras, through real sockets.

One server (two SO_REUSEPORT worker processes + main) per module, fed from a MemoryStore
through the shared informers, queried with dnspython over UDP/TCP and with ``dig``. Cases
are tables of {name, type, rcode, answer as zone-file text}, like CoreDNS's handler tests.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from conftest import require
from svcnet.dns.daemon import DNSComponent, DNSOptions

from svcnet.model import ENDPOINT_SLICE, POD, SERVICE
from svcnet.store.memory import MemoryStore
from svcnet.watch import InformerFactory

SOA = ("cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. {serial} "
       "7200 1800 86400 5")


def svc(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def eps(ns: str, svc_name: str, slice_name: str, family: str, endpoints: list[dict[str, Any]],
        ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": slice_name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc_name}},
            "addressType": family, "endpoints": endpoints, "ports": ports or []}


FIXTURE_SERVICES = [
    svc("testns", "svc1", clusterIP="10.0.0.1", ports=[{"name": "http", "port": 80}]),
    svc("testns", "svc6", clusterIP="1234:abcd::1", ipFamilies=["IPv6"],
        ports=[{"name": "http", "port": 80}]),
    svc("testns", "dual", clusterIP="10.0.0.3", clusterIPs=["10.0.0.3", "10::3"],
        ports=[{"name": "http", "port": 80}]),
    svc("testns", "multi", clusterIP="10.0.0.4",
        ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
    svc("testns", "hdls1", clusterIP="None", ports=[{"name": "http", "port": 80}]),
    svc("testns", "hdlsprtls", clusterIP="None"),
    svc("testns", "notready", clusterIP="None"),
    svc("testns", "publish", clusterIP="None", publishNotReadyAddresses=True),
    svc("testns", "external", type="ExternalName", externalName="ext.interwebs.test"),
    svc("testns", "ext-internal", type="ExternalName",
        externalName="svc1.testns.svc.cluster.local"),
    svc("testns", "big", clusterIP="None"),
]
FIXTURE_SLICES = [
    eps("testns", "hdls1", "hdls1-v4", "IPv4", [
        {"addresses": ["172.0.0.2"]},
        {"addresses": ["172.0.0.3"], "conditions": {"ready": True}},
        {"addresses": ["172.0.0.4"], "hostname": "dup-name"},
        {"addresses": ["172.0.0.5"], "hostname": "dup-name"},
        {"addresses": ["172.0.0.9"], "conditions": {"ready": False}},
    ], [{"name": "http", "port": 80}]),
    eps("testns", "hdls1", "hdls1-v6", "IPv6", [
        {"addresses": ["5678:abcd::1"]}, {"addresses": ["5678:abcd::2"]},
    ], [{"name": "http", "port": 80}]),
    eps("testns", "hdlsprtls", "hdlsprtls-1", "IPv4", [{"addresses": ["172.0.0.20"]}]),
    eps("testns", "notready", "notready-1", "IPv4",
        [{"addresses": ["172.0.0.30"], "conditions": {"ready": False}}]),
    eps("testns", "publish", "publish-1", "IPv4",
        [{"addresses": ["172.0.0.40"], "conditions": {"ready": False},
          "targetRef": {"kind": "Pod", "name": "publish-pod-0", "namespace": "testns"}}]),
    eps("testns", "big", "big-1", "IPv4",
        [{"addresses": [f"10.9.{i // 250}.{i % 250 + 1}"]} for i in range(100)]),
]
FIXTURE_PODS = [
    {"metadata": {"name": "p1", "namespace": "podns"},
     "status": {"podIP": "10.240.0.1", "podIPs": [{"ip": "10.240.0.1"}]}},
]


@dataclass
class Running:
    port: int
    component: DNSComponent
    store: MemoryStore


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    yield from _serve(DNSOptions(listen=("127.0.0.1", 0), workers=2, upstreams=[]))


def _serve(options: DNSOptions, pods: bool = True) -> Iterator[Running]:
    """Run a DNS component on its own event loop thread for a whole module."""
    import threading

    loop = asyncio.new_event_loop()
    store = MemoryStore()
    component = DNSComponent(options)
    started = threading.Event()
    task_box: list[asyncio.Task[None]] = []

    async def setup() -> tuple[asyncio.Task[None], InformerFactory]:
        for obj in FIXTURE_SERVICES:
            await store.put(SERVICE, obj)
        for obj in FIXTURE_SLICES:
            await store.put(ENDPOINT_SLICE, obj)
        if pods:
            for obj in FIXTURE_PODS:
                await store.put(POD, obj)
        factory = InformerFactory(store)
        task_box.append(asyncio.create_task(component.run(factory, store)))
        await asyncio.wait_for(component.ready.wait(), 10)
        started.set()
        return task_box[0], factory

    thread = threading.Thread(target=lambda: loop.run_until_complete(_forever(setup)),
                              daemon=True)
    thread.start()
    assert started.wait(15), "dns server did not become ready"
    try:
        yield Running(component.server.port, component, store)
    finally:
        def cancel() -> None:
            for t in task_box:
                t.cancel()
        loop.call_soon_threadsafe(cancel)
        thread.join(10)


async def _forever(setup: Any) -> None:
    task, factory = await setup()
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        await factory.stop()


def query(port: int, name: str, rtype: str, *, tcp: bool = False, **kw: Any) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, **kw)
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=3)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=3)


def section_text(rrsets: list[dns.rrset.RRset]) -> list[str]:
    lines = []
    for rrset in rrsets:
        lines += [line for line in rrset.to_text().splitlines()]
    return sorted(" ".join(line.split()) for line in lines)


def soa_lines(msg: dns.message.Message) -> list[str]:
    """Authority section with the serial (a timestamp, as CoreDNS) normalised."""
    out = []
    for line in section_text(msg.authority):
        parts = line.split()
        if parts[3] == "SOA":
            parts[6] = "{serial}"
        out.append(" ".join(parts))
    return out


C = "cluster.local."
# name, type, rcode, answer lines, additional lines
POSITIVE = [
    ("dns-version.cluster.local.", "TXT", [f'dns-version.{C} 28800 IN TXT "1.1.0"'], []),
    ("svc1.testns.svc.cluster.local.", "A", [f"svc1.testns.svc.{C} 5 IN A 10.0.0.1"], []),
    ("SVC1.TestNS.svc.Cluster.Local.", "A", ["SVC1.TestNS.svc.Cluster.Local. 5 IN A 10.0.0.1"],
     []),
    ("svc6.testns.svc.cluster.local.", "AAAA", [f"svc6.testns.svc.{C} 5 IN AAAA 1234:abcd::1"],
     []),
    ("dual.testns.svc.cluster.local.", "A", [f"dual.testns.svc.{C} 5 IN A 10.0.0.3"], []),
    ("dual.testns.svc.cluster.local.", "AAAA", [f"dual.testns.svc.{C} 5 IN AAAA 10::3"], []),
    ("_http._tcp.svc1.testns.svc.cluster.local.", "SRV",
     [f"_http._tcp.svc1.testns.svc.{C} 5 IN SRV 0 100 80 svc1.testns.svc.{C}"],
     [f"svc1.testns.svc.{C} 5 IN A 10.0.0.1"]),
    ("svc1.testns.svc.cluster.local.", "SRV",
     [f"svc1.testns.svc.{C} 5 IN SRV 0 100 80 svc1.testns.svc.{C}"],
     [f"svc1.testns.svc.{C} 5 IN A 10.0.0.1"]),
    ("dual.testns.svc.cluster.local.", "SRV",
     [f"dual.testns.svc.{C} 5 IN SRV 0 50 80 dual.testns.svc.{C}"],
     [f"dual.testns.svc.{C} 5 IN A 10.0.0.3", f"dual.testns.svc.{C} 5 IN AAAA 10::3"]),
    ("_dns._udp.multi.testns.svc.cluster.local.", "SRV",
     [f"_dns._udp.multi.testns.svc.{C} 5 IN SRV 0 100 53 multi.testns.svc.{C}"],
     [f"multi.testns.svc.{C} 5 IN A 10.0.0.4"]),
    ("1.0.0.10.in-addr.arpa.", "PTR",
     ["1.0.0.10.in-addr.arpa. 5 IN PTR svc1.testns.svc.cluster.local."], []),
    ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.4.3.2.1.ip6.arpa.", "PTR",
     ["1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.c.b.a.4.3.2.1.ip6.arpa. 5 IN PTR "
      "svc6.testns.svc.cluster.local."], []),
    # headless: every ready endpoint (nil ready counts as ready), not the unready one
    ("hdls1.testns.svc.cluster.local.", "A",
     [f"hdls1.testns.svc.{C} 5 IN A 172.0.0.{i}" for i in (2, 3, 4, 5)], []),
    ("hdls1.testns.svc.cluster.local.", "AAAA",
     [f"hdls1.testns.svc.{C} 5 IN AAAA 5678:abcd::{i}" for i in (1, 2)], []),
    ("hdlsprtls.testns.svc.cluster.local.", "A", [f"hdlsprtls.testns.svc.{C} 5 IN A 172.0.0.20"],
     []),
    ("172-0-0-20.hdlsprtls.testns.svc.cluster.local.", "A",
     [f"172-0-0-20.hdlsprtls.testns.svc.{C} 5 IN A 172.0.0.20"], []),
    ("172-0-0-2.hdls1.testns.svc.cluster.local.", "A",
     [f"172-0-0-2.hdls1.testns.svc.{C} 5 IN A 172.0.0.2"], []),
    ("dup-name.hdls1.testns.svc.cluster.local.", "A",
     [f"dup-name.hdls1.testns.svc.{C} 5 IN A 172.0.0.{i}" for i in (4, 5)], []),
    ("5678-abcd--2.hdls1.testns.svc.cluster.local.", "AAAA",
     [f"5678-abcd--2.hdls1.testns.svc.{C} 5 IN AAAA 5678:abcd::2"], []),
    ("_http._tcp.hdls1.testns.svc.cluster.local.", "SRV",
     [f"_http._tcp.hdls1.testns.svc.{C} 5 IN SRV 0 16 80 {h}.hdls1.testns.svc.{C}"
      for h in ("172-0-0-2", "172-0-0-3", "5678-abcd--1", "5678-abcd--2", "dup-name")],
     [f"172-0-0-2.hdls1.testns.svc.{C} 5 IN A 172.0.0.2",
      f"172-0-0-3.hdls1.testns.svc.{C} 5 IN A 172.0.0.3",
      f"5678-abcd--1.hdls1.testns.svc.{C} 5 IN AAAA 5678:abcd::1",
      f"5678-abcd--2.hdls1.testns.svc.{C} 5 IN AAAA 5678:abcd::2",
      f"dup-name.hdls1.testns.svc.{C} 5 IN A 172.0.0.4",
      f"dup-name.hdls1.testns.svc.{C} 5 IN A 172.0.0.5"]),
    ("4.0.0.172.in-addr.arpa.", "PTR",
     ["4.0.0.172.in-addr.arpa. 5 IN PTR dup-name.hdls1.testns.svc.cluster.local."], []),
    ("2.0.0.172.in-addr.arpa.", "PTR",
     ["2.0.0.172.in-addr.arpa. 5 IN PTR 172-0-0-2.hdls1.testns.svc.cluster.local."], []),
    # publishNotReadyAddresses
    ("publish.testns.svc.cluster.local.", "A", [f"publish.testns.svc.{C} 5 IN A 172.0.0.40"], []),
    # ExternalName
    ("external.testns.svc.cluster.local.", "CNAME",
     [f"external.testns.svc.{C} 5 IN CNAME ext.interwebs.test."], []),
    ("ext-internal.testns.svc.cluster.local.", "A",
     [f"ext-internal.testns.svc.{C} 5 IN CNAME svc1.testns.svc.{C}",
      f"svc1.testns.svc.{C} 5 IN A 10.0.0.1"], []),
    # pods insecure (the default): any dashed IP
    ("10-240-0-1.podns.pod.cluster.local.", "A", [f"10-240-0-1.podns.pod.{C} 5 IN A 10.240.0.1"],
     []),
    ("172-0-0-2.anyns.pod.cluster.local.", "A", [f"172-0-0-2.anyns.pod.{C} 5 IN A 172.0.0.2"], []),
    # apex
    ("cluster.local.", "NS", [f"{C} 5 IN NS ns.dns.{C}"], []),
]


@pytest.mark.parametrize(("name", "rtype", "answer", "extra"), POSITIVE,
                         ids=[f"{c[0]}-{c[1]}" for c in POSITIVE])
def test_positive_answers(server: Running, name: str, rtype: str, answer: list[str],
                          extra: list[str]) -> None:
    for tcp in (False, True):
        msg = query(server.port, name, rtype, tcp=tcp)
        assert msg.rcode() == dns.rcode.NOERROR
        assert msg.flags & dns.flags.AA
        assert section_text(msg.answer) == sorted(" ".join(a.split()) for a in answer)
        if tcp or len(extra) < 3:  # over UDP a long additional section is dropped first
            assert section_text(msg.additional) == sorted(extra)
        assert msg.authority == []


NEGATIVE = [
    # NODATA: the name exists without this type
    ("svc1.testns.svc.cluster.local.", "AAAA", "NOERROR"),
    ("svc6.testns.svc.cluster.local.", "A", "NOERROR"),
    ("svc1.testns.svc.cluster.local.", "SOA", "NOERROR"),
    ("svc1.testns.svc.cluster.local.", "TXT", "NOERROR"),
    ("cluster.local.", "A", "NOERROR"),
    ("cluster.local.", "HINFO", "NOERROR"),
    ("svc.cluster.local.", "A", "NOERROR"),
    ("svc.cluster.local.", "NS", "NOERROR"),
    ("pod.cluster.local.", "A", "NOERROR"),
    ("testns.svc.cluster.local.", "A", "NOERROR"),
    ("testns.svc.cluster.local.", "NS", "NOERROR"),
    ("hdlsprtls.testns.svc.cluster.local.", "SRV", "NOERROR"),
    ("10-240-0-1.podns.pod.cluster.local.", "AAAA", "NOERROR"),
    ("dns-version.cluster.local.", "A", "NOERROR"),
    # NXDOMAIN
    ("svc0.testns.svc.cluster.local.", "A", "NXDOMAIN"),
    ("svc0.testns.svc.cluster.local.", "AAAA", "NXDOMAIN"),
    ("svc0.svc-nons.svc.cluster.local.", "A", "NXDOMAIN"),
    ("bogusendpoint.hdls1.testns.svc.cluster.local.", "A", "NXDOMAIN"),
    ("bogusendpoint.svc0.testns.svc.cluster.local.", "A", "NXDOMAIN"),
    ("endpoint.external.testns.svc.cluster.local.", "CNAME", "NXDOMAIN"),
    ("foo.cluster.local.", "NS", "NXDOMAIN"),
    ("foo.svc.cluster.local.", "NS", "NXDOMAIN"),
    ("notready.testns.svc.cluster.local.", "A", "NXDOMAIN"),
    ("_http._tcp.nope.testns.svc.cluster.local.", "SRV", "NXDOMAIN"),
    ("_nope._tcp.svc1.testns.svc.cluster.local.", "SRV", "NXDOMAIN"),
    ("not-an-ip.podns.pod.cluster.local.", "A", "NXDOMAIN"),
]


@pytest.mark.parametrize(("name", "rtype", "rcode"), NEGATIVE,
                         ids=[f"{c[0]}-{c[1]}" for c in NEGATIVE])
def test_negative_answers(server: Running, name: str, rtype: str, rcode: str) -> None:
    msg = query(server.port, name, rtype)
    assert dns.rcode.to_text(msg.rcode()) == rcode
    assert msg.answer == []
    assert soa_lines(msg) == [SOA]
    assert msg.flags & dns.flags.AA


def test_apex_soa(server: Running) -> None:
    msg = query(server.port, "cluster.local.", "SOA")
    (line,) = section_text(msg.answer)
    assert line.startswith(
        "cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. ")
    assert line.endswith(" 7200 1800 86400 5")


def test_axfr_refused(server: Running) -> None:
    q = dns.message.make_query("cluster.local.", "AXFR")
    msg = dns.query.tcp(q, "127.0.0.1", port=server.port, timeout=3)
    assert msg.rcode() == dns.rcode.REFUSED


def test_edns_echoed_and_buffer_honoured(server: Running) -> None:
    msg = query(server.port, "svc1.testns.svc.cluster.local.", "A", use_edns=0, payload=4096)
    assert msg.edns == 0 and msg.payload >= 512
    # 100 A records (~1.6 kB) fit a 4096-byte buffer but not 1232 or the plain 512
    big = "big.testns.svc.cluster.local."
    msg = query(server.port, big, "A", use_edns=0, payload=4096)
    assert not msg.flags & dns.flags.TC and len(msg.answer[0]) == 100
    msg = query(server.port, big, "A", use_edns=0, payload=1232)
    assert msg.flags & dns.flags.TC and msg.answer == [] and msg.edns == 0


def test_truncation_then_tcp_fallback(server: Running) -> None:
    q = dns.message.make_query("big.testns.svc.cluster.local.", "A")
    udp = dns.query.udp(q, "127.0.0.1", port=server.port, timeout=3)
    assert udp.flags & dns.flags.TC and udp.answer == []
    msg, used_tcp = dns.query.udp_with_fallback(q, "127.0.0.1", port=server.port, timeout=3)
    assert used_tcp and len(msg.answer[0]) == 100


def test_edns_version_unsupported_gets_badvers(server: Running) -> None:
    msg = query(server.port, "svc1.testns.svc.cluster.local.", "A", use_edns=1)
    assert msg.rcode() == dns.rcode.BADVERS


def test_dig(server: Running) -> None:
    require(shutil.which("dig") is not None, "dig not installed")
    out = subprocess.run(
        ["dig", "+short", "+time=2", "+tries=1", "-p", str(server.port), "@127.0.0.1",
         "_http._tcp.svc1.testns.svc.cluster.local", "SRV"],
        capture_output=True, text=True, timeout=10).stdout.split()
    assert out == ["0", "100", "80", "svc1.testns.svc.cluster.local."]
    out = subprocess.run(
        ["dig", "+tcp", "+short", "+time=2", "+tries=1", "-p", str(server.port), "@127.0.0.1",
         "-x", "10.0.0.1"], capture_output=True, text=True, timeout=10).stdout.split()
    assert out == ["svc1.testns.svc.cluster.local."]
    status = subprocess.run(
        ["dig", "+time=2", "+tries=1", "-p", str(server.port), "@127.0.0.1",
         "svc0.testns.svc.cluster.local", "A"], capture_output=True, text=True, timeout=10).stdout
    assert "status: NXDOMAIN" in status


def test_changes_are_served(server: Running) -> None:
    """A new Service and an endpoint change show up without a restart."""
    fut = asyncio.run_coroutine_threadsafe(
        server.store.put(SERVICE, svc("testns", "late", clusterIP="10.0.0.77")),
        _loop_of(server))
    fut.result(5)
    deadline = 50
    for _ in range(deadline):
        msg = query(server.port, "late.testns.svc.cluster.local.", "A")
        if msg.rcode() == dns.rcode.NOERROR and msg.answer:
            break
        import time

        time.sleep(0.1)
    assert section_text(msg.answer) == [f"late.testns.svc.{C} 5 IN A 10.0.0.77"]
    gone = asyncio.run_coroutine_threadsafe(server.store.delete(SERVICE, "testns", "late"),
                                            _loop_of(server))
    gone.result(5)
    for _ in range(deadline):
        msg = query(server.port, "late.testns.svc.cluster.local.", "A")
        if msg.rcode() == dns.rcode.NXDOMAIN:
            break
        import time

        time.sleep(0.1)
    assert msg.rcode() == dns.rcode.NXDOMAIN


def _loop_of(server: Running) -> asyncio.AbstractEventLoop:
    return server.component.ready._loop  # type: ignore[no-any-return,attr-defined]


@pytest.fixture(scope="module")
def verified() -> Iterator[Running]:
    yield from _serve(DNSOptions(listen=("127.0.0.1", 0), workers=0, pods="verified",
                                 endpoint_pod_names=True))


VERIFIED = [
    ("10-240-0-1.podns.pod.cluster.local.", "A", "NOERROR",
     [f"10-240-0-1.podns.pod.{C} 5 IN A 10.240.0.1"]),
    ("podns.pod.cluster.local.", "A", "NOERROR", []),
    ("pod-nons.pod.cluster.local.", "A", "NXDOMAIN", []),
    ("172-0-0-2.podns.pod.cluster.local.", "A", "NXDOMAIN", []),
    # endpoint_pod_names: the pod's name instead of the dashed IP
    ("publish-pod-0.publish.testns.svc.cluster.local.", "A", "NOERROR",
     [f"publish-pod-0.publish.testns.svc.{C} 5 IN A 172.0.0.40"]),
    ("172-0-0-40.publish.testns.svc.cluster.local.", "A", "NXDOMAIN", []),
]


@pytest.mark.parametrize(("name", "rtype", "rcode", "answer"), VERIFIED,
                         ids=[c[0] for c in VERIFIED])
def test_pods_verified_and_endpoint_pod_names(verified: Running, name: str, rtype: str,
                                              rcode: str, answer: list[str]) -> None:
    msg = query(verified.port, name, rtype)
    assert dns.rcode.to_text(msg.rcode()) == rcode
    assert section_text(msg.answer) == answer


def test_pods_disabled() -> None:
    for running in _serve(DNSOptions(listen=("127.0.0.1", 0), workers=0, pods="disabled"),
                          pods=False):
        msg = query(running.port, "10-240-0-1.podns.pod.cluster.local.", "A")
        assert msg.rcode() == dns.rcode.NXDOMAIN


async def _unused() -> AsyncIterator[None]:  # pragma: no cover - keeps mypy quiet on imports
    yield None
