"""`svcnet dns` against the real CoreDNS 1.11.3, both reading the same objects from the same
real kube-apiserver (the session ``control_plane``), on every query class of the Kubernetes
DNS specification: same rcode, flags (AA, TC, RD, RA), answer, authority and additional
sections (as sets; TTLs compared where both are cluster answers, SOA serials ignored), without
and with EDNS.

CoreDNS runs a kubeadm-style Corefile without ``cache`` (so its TTLs are the kubernetes
plugin's own) with ``ttl 30``; svcnet runs with ``--ttl 30``. Both forward to one dnslib
upstream on loopback (ExternalName targets outside the zone, reverse names of unknown IPs).
Both use one identity with the ClusterRole kubeadm gives CoreDNS (``system:coredns``).

Objects are written directly (Services without selectors and the EndpointSlices a
controller would have made for them, e.g. the hostname a Pod with ``hostname``/``subdomain``
gets), so the endpoints' IPs, readiness and hostnames are exact.

Deliberate differences are in ``DIFFERENCES`` (case -> the sections that differ and why), also
listed in docs/dns.md ("Differences from CoreDNS"); the test checks that exactly those
sections differ, so the table cannot go stale silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from conftest import require
from dnskit import Upstream, upstream_server

ZONE = "cluster.local"
NS = "dnscmp"
TTL = 30

# Fixed addresses (ClusterIPs high in the session control plane's 10.96.0.0/12, unlikely to
# collide with ones the apiserver allocates for other tests of the session).
WEB_IP, NP_IP = "10.109.213.10", "10.109.213.11"


def _svc(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": spec}


def _ep(ip: str, *, ready: bool = True, hostname: str | None = None,
        pod: str | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": ready}}
    if hostname:
        ep["hostname"] = hostname
    if pod:
        ep["targetRef"] = {"kind": "Pod", "namespace": NS, "name": pod}
    return ep


def _slice(name: str, service: str, endpoints: list[dict[str, Any]],
           ports: list[dict[str, Any]], family: str = "IPv4") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "svcnet-test"}},
            "addressType": family, "endpoints": endpoints, "ports": ports}


HTTP = {"name": "http", "port": 8080, "protocol": "TCP"}
DNSP = {"name": "dns", "port": 5353, "protocol": "UDP"}


def objects() -> list[dict[str, Any]]:
    """Every Service type, named ports, headless with hostnames, IPv6, too big for 512."""
    return [
        _svc("web", {"clusterIP": WEB_IP, "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}),
        _slice("web-a", "web", [_ep("10.244.213.1", pod="web-1"),
                                _ep("10.244.213.2", hostname="web-two", pod="web-2"),
                                _ep("10.244.213.3", ready=False, pod="web-3")], [HTTP, DNSP]),
        _svc("np", {"type": "NodePort", "clusterIP": NP_IP, "ports": [
            {"name": "http", "port": 80, "protocol": "TCP"}]}),
        _slice("np-a", "np", [_ep("10.244.213.20")], [HTTP]),
        # A headless Service whose Pods set hostname + subdomain=hl (the controller then names
        # the endpoints), one without a hostname, one not ready, and an IPv6 slice.
        _svc("hl", {"clusterIP": "None", "ports": [{"name": "http", "port": 80,
                                                      "protocol": "TCP"}]}),
        _slice("hl-a", "hl", [_ep("10.244.214.1", hostname="host-a", pod="p-a"),
                              _ep("10.244.214.2", hostname="host-b", pod="p-b"),
                              _ep("10.244.214.3", pod="p-c"),
                              _ep("10.244.214.4", ready=False, hostname="host-d", pod="p-d")],
               [HTTP]),
        _slice("hl-6", "hl", [_ep("fd00:10:244::5", hostname="host-e", pod="p-e")], [HTTP],
               family="IPv6"),
        _svc("hl-noports", {"clusterIP": "None"}),
        _slice("hl-noports-a", "hl-noports", [_ep("10.244.215.1")], []),
        _svc("hl-empty", {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
        _slice("hl-empty-a", "hl-empty", [_ep("10.244.215.9", ready=False)], [HTTP]),
        # Emptied after both servers saw its endpoint (``servers``): the apiserver then sends
        # ``endpoints: null``.
        _svc("hl-gone", {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
        _slice("hl-gone-a", "hl-gone", [_ep("10.244.215.20")], [HTTP]),
        # Enough SRV targets that their A glue does not fit in 512 bytes (the answer does).
        _svc("hl8", {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
        _slice("hl8-a", "hl8", [_ep(f"10.244.218.{i}") for i in range(1, 7)]
               + [_ep("10.244.218.9", hostname="h-0"), _ep("10.244.218.10", ready=False)],
               [HTTP]),
        _svc("unnamed", {"clusterIP": "10.109.213.12", "ports": [{"port": 81,
                                                                   "protocol": "TCP"}]}),
        _svc("hl-noslice", {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
        _svc("big", {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
        _slice("big-a", "big", [_ep(f"10.244.217.{i}") for i in range(1, 61)], [HTTP]),
        _svc("ext", {"type": "ExternalName", "externalName": "www.example.org"}),
        _svc("ext-in", {"type": "ExternalName", "externalName": f"web.{NS}.svc.{ZONE}"}),
        _svc("ext-nx", {"type": "ExternalName", "externalName": f"nosuch.{NS}.svc.{ZONE}"}),
    ]


def _rev(ip: str) -> str:
    import ipaddress

    return ipaddress.ip_address(ip).reverse_pointer


S = f"{NS}.svc.{ZONE}"
# (case id, query name, type); ids are stable test names.
CASES: list[tuple[str, str, str]] = [
    # ClusterIP Service
    ("svc-a", f"web.{S}", "A"),
    ("svc-aaaa-nodata", f"web.{S}", "AAAA"),
    ("svc-txt-nodata", f"web.{S}", "TXT"),
    ("svc-srv", f"web.{S}", "SRV"),
    ("svc-srv-http", f"_http._tcp.web.{S}", "SRV"),
    ("svc-srv-dns-udp", f"_dns._udp.web.{S}", "SRV"),
    ("svc-srv-a-query", f"_http._tcp.web.{S}", "A"),
    ("svc-srv-aaaa-query", f"_http._tcp.web.{S}", "AAAA"),
    ("svc-mx-nodata", f"web.{S}", "MX"),
    ("svc-mixed-case", f"WeB.{S}", "A"),
    ("svc-unnamed-port-a", f"unnamed.{S}", "A"),
    ("svc-unnamed-port-srv", f"unnamed.{S}", "SRV"),
    ("svc-unknown-endpoint", f"10-244-213-9.web.{S}", "A"),
    ("svc-srv-wrong-proto", f"_http._udp.web.{S}", "SRV"),
    ("svc-srv-unknown-port", f"_nope._tcp.web.{S}", "SRV"),
    ("svc-endpoint-name", f"10-244-213-1.web.{S}", "A"),
    ("svc-endpoint-hostname", f"web-two.web.{S}", "A"),
    ("svc-endpoint-notready", f"10-244-213-3.web.{S}", "A"),
    ("svc-below-nx", f"x.y.web.{S}", "A"),
    ("svc-ptr", _rev(WEB_IP), "PTR"),
    ("svc-endpoint-ptr", _rev("10.244.213.1"), "PTR"),
    ("svc-endpoint-hostname-ptr", _rev("10.244.213.2"), "PTR"),
    ("kubernetes-svc", f"kubernetes.default.svc.{ZONE}", "A"),
    # NodePort
    ("nodeport-a", f"np.{S}", "A"),
    ("nodeport-srv", f"_http._tcp.np.{S}", "SRV"),
    # headless
    ("hl-a", f"hl.{S}", "A"),
    ("hl-aaaa", f"hl.{S}", "AAAA"),
    ("hl-srv", f"hl.{S}", "SRV"),
    ("hl-srv-http", f"_http._tcp.hl.{S}", "SRV"),
    ("hl-hostname-a", f"host-a.hl.{S}", "A"),
    ("hl-hostname-aaaa-nodata", f"host-a.hl.{S}", "AAAA"),
    ("hl-hostname-v6", f"host-e.hl.{S}", "AAAA"),
    ("hl-hostname-notready", f"host-d.hl.{S}", "A"),
    ("hl-ip-name", f"10-244-214-3.hl.{S}", "A"),
    ("hl-unknown-endpoint", f"nosuch.hl.{S}", "A"),
    ("hl-ptr-hostname", _rev("10.244.214.1"), "PTR"),
    ("hl-ptr-ip", _rev("10.244.214.3"), "PTR"),
    ("hl-ptr-v6", _rev("fd00:10:244::5"), "PTR"),
    ("hl-srv-a-query", f"_http._tcp.hl.{S}", "A"),
    ("hl-ip-name-aaaa", f"10-244-214-3.hl.{S}", "AAAA"),
    ("hl8-srv", f"hl8.{S}", "SRV"),
    ("hl8-srv-http", f"_http._tcp.hl8.{S}", "SRV"),
    ("hl-no-slice", f"hl-noslice.{S}", "A"),
    ("hl-no-slice-srv", f"hl-noslice.{S}", "SRV"),
    ("hl-noports-a", f"hl-noports.{S}", "A"),
    ("hl-noports-srv", f"hl-noports.{S}", "SRV"),
    ("hl-no-ready", f"hl-empty.{S}", "A"),
    ("hl-emptied", f"hl-gone.{S}", "A"),
    ("hl-big-a", f"big.{S}", "A"),
    ("hl-big-srv", f"_http._tcp.big.{S}", "SRV"),
    # ExternalName
    ("ext-cname", f"ext.{S}", "CNAME"),
    ("ext-a", f"ext.{S}", "A"),
    ("ext-aaaa", f"ext.{S}", "AAAA"),
    ("ext-in-a", f"ext-in.{S}", "A"),
    ("ext-in-aaaa-nodata", f"ext-in.{S}", "AAAA"),
    ("ext-in-nx", f"ext-nx.{S}", "A"),
    ("ext-below-nx", f"x.ext.{S}", "A"),
    # pods (insecure)
    ("pod-a", f"10-244-1-2.{NS}.pod.{ZONE}", "A"),
    ("pod-aaaa-nodata", f"10-244-1-2.{NS}.pod.{ZONE}", "AAAA"),
    ("pod-v6", f"fd00-10-244--5.{NS}.pod.{ZONE}", "AAAA"),
    ("pod-bad-name", f"1-2-3.{NS}.pod.{ZONE}", "A"),
    ("pod-unknown-namespace", f"10-244-1-2.nosuchns.pod.{ZONE}", "A"),
    ("pod-zone", f"pod.{ZONE}", "A"),
    ("pod-namespace", f"{NS}.pod.{ZONE}", "A"),
    ("pod-not-an-ip", f"bad-ip.{NS}.pod.{ZONE}", "A"),
    # namespaces, zone, negatives
    ("namespace-nodata", f"{NS}.svc.{ZONE}", "A"),
    ("namespace-srv-nodata", f"{NS}.svc.{ZONE}", "SRV"),
    ("kube-public-nodata", f"kube-public.svc.{ZONE}", "A"),
    ("namespace-unknown-nx", f"nosuchns.svc.{ZONE}", "A"),
    ("svc-zone-nodata", f"svc.{ZONE}", "A"),
    ("svc-unknown-nx", f"nosuch.{S}", "A"),
    ("search-miss-nx", f"web.{S}.{S}", "A"),
    ("search-miss-aaaa-nx", f"web.{S}.{S}", "AAAA"),
    ("search-miss-external-nx", f"www.example.org.{S}", "A"),
    ("zone-other-nx", f"foo.{ZONE}", "A"),
    ("apex-soa", ZONE, "SOA"),
    ("apex-ns", ZONE, "NS"),
    ("apex-a-nodata", ZONE, "A"),
    ("ns-dns-a", f"ns.dns.{ZONE}", "A"),
    ("dns-version", f"dns-version.{ZONE}", "TXT"),
    ("reverse-unknown", _rev("10.99.99.99"), "PTR"),
]

# case id (any mode) or "case id/mode" -> (sections that differ, reason). Also in docs/dns.md.
_CNAME_KEPT = (
    "an in-zone ExternalName whose target has no record of the type (or does not exist): "
    "CoreDNS answers an empty NOERROR, svcnet keeps the CNAME in the answer beside the SOA "
    "(RFC 1034 4.3.2, RFC 2308 2.2: the CNAME is part of a NODATA/NXDOMAIN chain answer and "
    "can be cached); rcode and authority agree")
_TRUNCATED = (
    "an answer over the UDP limit: CoreDNS keeps the records that fit (a shuffled subset, "
    "loadbalance) and sets TC, svcnet sends header + question with TC (RFC 2181 9 allows "
    "both; every resolver retries over TCP and uses only that answer, which is the same)")
_GLUE_DROPPED = (
    "the answer fits but not all A glue: both keep the glue that fits, CoreDNS (miekg/dns "
    "Truncate) also sets TC, svcnet leaves TC clear as RFC 2181 9 says for a dropped "
    "additional section (a TC would send the client to TCP for nothing)")
DIFFERENCES: dict[str, tuple[frozenset[str], str]] = {
    "ext-in-aaaa-nodata": (frozenset({"answer"}), _CNAME_KEPT),
    "ext-in-nx": (frozenset({"answer"}), _CNAME_KEPT),
    "apex-ns": (frozenset({"answer", "authority"}), (
        "CoreDNS leaves loopback addresses out of its own addresses (nsAddrs), so bound to "
        "127.0.0.1 with no kube-dns Service pointing at it, it has no NS to give and answers "
        "the apex NS with NODATA; svcnet always answers NS ns.dns.<zone> (in a cluster both "
        "answer NS ns.dns.<zone>)")),
    "hl-big-a/udp": (frozenset({"answer"}), _TRUNCATED),
    "hl-big-srv/udp": (frozenset({"answer"}), _TRUNCATED),
    "hl-big-srv/edns": (frozenset({"answer"}), _TRUNCATED),
    "hl8-srv/udp": (frozenset({"flags"}), _GLUE_DROPPED),
    "hl8-srv-http/udp": (frozenset({"flags"}), _GLUE_DROPPED),
}

MODES = ("udp", "edns", "tcp")

# Where only part of the additional section fits, which part is arbitrary (CoreDNS shuffles
# with loadbalance): there the section is compared by its size.
ADDITIONAL_BY_COUNT = {"hl8-srv/udp", "hl8-srv-http/udp"}

# Cases where svcnet should match CoreDNS and does not yet: "case[/mode]" -> reason.
# xfail(strict=True), so each one must be removed when fixed.
NOT_YET: dict[str, str] = {
}


def _params() -> list[Any]:
    out = []
    for case, name, rtype in CASES:
        for mode in MODES:
            reason = NOT_YET.get(f"{case}/{mode}", NOT_YET.get(case))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(case, name, rtype, mode, id=f"{case}-{mode}", marks=marks))
    return out


@dataclass
class Pair:
    coredns: int
    svcnet: int


@pytest.fixture(scope="module")
def servers(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    from svcnet.lab.controlplane import MissingBinaries
    from svcnet.lab.coredns import COREDNS_RULES, Config, CoreDNS, find_coredns

    try:
        binary = find_coredns()
    except MissingBinaries as err:
        require(False, str(err))
        raise
    work = tmp_path_factory.mktemp("coredns-cmp")
    kubeconfig = control_plane.service_account_kubeconfig(
        "dnscmp-coredns", namespace="kube-system", rules=COREDNS_RULES)
    up = Upstream(records={("www.example.org.", "A"): ["192.0.2.10"],
                           ("www.example.org.", "AAAA"): ["2001:db8::10"]})
    with control_plane.namespace(NS), upstream_server(up):
        control_plane.apply(objects())
        upstream = f"127.0.0.1:{up.port}"
        core = CoreDNS(Config.on_loopback(Path(kubeconfig), upstream, cache=None, ttl=TTL),
                       work, binary=binary)
        core.start()
        try:
            with _svcnet(kubeconfig, upstream, work) as port:
                pair = Pair(core.port, port)
                _wait_both(pair, f"big.{S}", lambda m: m.rcode() == dns.rcode.NOERROR
                           and len(m.answer) == 1 and len(m.answer[0]) == 60)
                _wait_both(pair, f"hl-gone.{S}", lambda m: bool(m.answer))
                gone = _slice("hl-gone-a", "hl-gone", [], [HTTP])
                control_plane.apply([gone])
                _wait_both(pair, f"hl-gone.{S}", nx, only=pair.coredns)
                # svcnet gets 10 s more to agree; test_coredns_same_answer[hl-emptied-*] judges
                _wait_both(pair, f"hl-gone.{S}", nx, only=pair.svcnet, must=False, timeout=10)
                yield pair
        finally:
            core.stop()


@contextmanager
def _svcnet(kubeconfig: str, upstream: str, work: Path) -> Iterator[int]:
    """``svcnet dns`` as a process (one worker: the fast path and the slow path both run)."""
    from svcnet.lab.controlplane import free_port
    from svcnet.lab.coredns import free_udp_tcp_port

    port, health = free_udp_tcp_port(), free_port()
    log = work / "svcnet-dns.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "svcnet.cli", "dns", "--store", "kubernetes",
             "--kubeconfig", kubeconfig, "--listen", f"127.0.0.1:{port}",
             "--ttl", str(TTL), "--upstream", upstream, "--workers", "1",
             "--health-port", str(health)],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd="/",
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready",
                                            timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "svcnet dns not ready:\n" + \
                log.read_text()[-3000:]
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def nx(m: dns.message.Message) -> bool:
    return bool(m.rcode() == dns.rcode.NXDOMAIN)


def _wait_both(pair: Pair, name: str, ok: Callable[[dns.message.Message], bool],
               only: int | None = None, must: bool = True, timeout: float = 30) -> None:
    """Both (or ``only`` one) have seen the last object written (watches are asynchronous)."""
    deadline = time.monotonic() + timeout
    for port in (pair.coredns, pair.svcnet) if only is None else (only,):
        while True:
            try:
                if ok(ask(port, name, "A", "edns")):
                    break
            except (OSError, dns.exception.DNSException):
                pass
            if time.monotonic() > deadline:
                assert not must, f"port {port} never answered {name} as expected"
                break
            time.sleep(0.1)


def ask(port: int, name: str, rtype: str, mode: str) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, use_edns=0 if mode == "edns" else False,
                               payload=1232)
    if mode == "tcp":
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=5)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=5)


def _in_cluster(name: str) -> bool:
    n = name.lower().rstrip(".")
    return n == ZONE or n.endswith(("." + ZONE, ".in-addr.arpa", ".ip6.arpa"))


def _rrsets(section: list[Any]) -> frozenset[tuple[str, str, int | None, str]]:
    out = set()
    for rrset in section:
        rtype = dns.rdatatype.to_text(rrset.rdtype)
        if rtype == "OPT":
            continue
        name = rrset.name.to_text().lower()
        ttl = rrset.ttl if _in_cluster(name) else None  # forwarded: aged by svcnet's cache
        for rd in rrset:
            text = rd.to_text().lower()
            if rtype == "SOA":  # serial: time of each server's last change
                parts = text.split()
                parts[2] = "SERIAL"
                text = " ".join(parts)
            out.add((name, rtype, ttl, text))
    return frozenset(out)


def normalise(msg: dns.message.Message) -> dict[str, Any]:
    flags = {f for f in ("QR", "AA", "TC", "RD", "RA")
             if msg.flags & getattr(dns.flags, f)}
    return {
        "rcode": dns.rcode.to_text(msg.rcode()),
        "flags": frozenset(flags),
        "edns": (msg.edns, bool(msg.ednsflags & dns.flags.DO)) if msg.edns >= 0 else None,
        "answer": _rrsets(msg.answer),
        "authority": _rrsets(msg.authority),
        "additional": _rrsets(msg.additional),
    }


def _show(n: dict[str, Any]) -> str:
    return "\n".join(f"    {k}: {sorted(v) if isinstance(v, frozenset) else v}"
                     for k, v in n.items())


@pytest.mark.parametrize(("case", "name", "rtype", "mode"), _params())
def test_coredns_same_answer(servers: Pair, case: str, name: str, rtype: str,
                             mode: str) -> None:
    core = normalise(ask(servers.coredns, name, rtype, mode))
    ours = normalise(ask(servers.svcnet, name, rtype, mode))
    if f"{case}/{mode}" in ADDITIONAL_BY_COUNT:
        core["additional"], ours["additional"] = len(core["additional"]), len(ours["additional"])
    differ = frozenset(k for k in core if core[k] != ours[k])
    expected, reason = DIFFERENCES.get(f"{case}/{mode}", DIFFERENCES.get(case, (frozenset(), "")))
    assert differ == expected, (
        f"{name} {rtype} over {mode}: sections differing {sorted(differ)}, expected "
        f"{sorted(expected)} ({reason or 'no deliberate difference'})\n"
        f"  CoreDNS:\n{_show(core)}\n  svcnet:\n{_show(ours)}")


def test_coredns_cases_cover_the_spec() -> None:
    """Every record class of the specification appears among the cases, and every listed
    difference names a real case."""
    types = {(c[0].split("-")[0], c[2]) for c in CASES}
    for need in (("svc", "A"), ("svc", "SRV"), ("svc", "PTR"), ("hl", "A"), ("hl", "SRV"),
                 ("hl", "PTR"), ("ext", "CNAME"), ("pod", "A"), ("apex", "SOA"),
                 ("apex", "NS"), ("dns", "TXT")):
        assert need in types, need
    ids = {c[0] for c in CASES}
    for key in DIFFERENCES:
        case, _, mode = key.partition("/")
        assert case in ids and (not mode or mode in MODES), key


def test_coredns_runner_checks_the_sum(tmp_path: Path) -> None:
    """An archive that unpacks to anything but the published binary is refused, and nothing
    is left behind for a later call to pick up."""
    import lzma

    from svcnet.lab.controlplane import MissingBinaries
    from svcnet.lab.coredns import unpack_coredns

    xz = tmp_path / "coredns.xz"
    xz.write_bytes(lzma.compress(b"#!/bin/sh\necho not coredns\n"))
    with pytest.raises(MissingBinaries, match="sha256"):
        unpack_coredns(xz, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]


def test_coredns_corefile_is_kubeadms(tmp_path: Path) -> None:
    from svcnet.lab.coredns import Config, corefile

    text = corefile(Config(tmp_path / "kc", "127.0.0.1:5300", 1053, 1, 2, 3))
    for line in (".:1053 {", "bind 127.0.0.1", "kubernetes cluster.local in-addr.arpa ip6.arpa {",
                 f"kubeconfig {tmp_path / 'kc'}", "pods insecure",
                 "fallthrough in-addr.arpa ip6.arpa", "ttl 30", "forward . 127.0.0.1:5300",
                 "cache 30", "health 127.0.0.1:1", "ready 127.0.0.1:2",
                 "prometheus 127.0.0.1:3"):
        assert line in text, line
    assert "cache" not in corefile(Config(tmp_path / "kc", "127.0.0.1:5300", 1053, 1, 2, 3,
                                          cache=None))
