"""CoreDNS 1.11.3 and ``svcnet dns`` side by side, both watching the same objects in a real
kube-apiserver (the ``control_plane`` fixture), asked every query class the Kubernetes DNS
specification defines; rcode, flags, answer and authority must match (the SOA serial is
each server's own clock). Deliberate differences are listed in ``DIFFERENCES`` with their
reason, and in docs/dns.md.

CoreDNS runs a kubeadm-style Corefile without ``cache`` (a cached answer would hide a
difference) on loopback; names outside the zone are not compared (no upstream here).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from conftest import require, stop

COREDNS_SHA256 = "2fabce23de3d9cdf3b03708354753c70d05955c2f7a92680ac3cbb507ee070cb"
NS = "dnscmp"
Z = "cluster.local"

# (name, type, edns) -> (the fields that differ, why): the test checks that exactly these
# differ, so a difference that goes away or grows is seen. Also in docs/dns.md.
_TC = ("flags", "svcnet leaves TC clear when only additional (glue) records were left out, "
       "as RFC 2181 9 says; CoreDNS (miekg's Truncate) sets TC")
DIFFERENCES: dict[tuple[str, str, bool], tuple[tuple[str, ...], str]] = {
    (f"{Z}.", "NS", False): (("answer", "authority"), "apex NS names ns.dns.<zone> (what "
                             "the SOA names); CoreDNS names the Service it finds itself in, "
                             "or, bound to loopback as here, nothing (NODATA)"),
    (f"hl.{NS}.svc.{Z}.", "SRV", False): (_TC[:1], _TC[1]),
    (f"_http._tcp.hl.{NS}.svc.{Z}.", "SRV", False): (_TC[:1], _TC[1]),
    (f"alias.{NS}.svc.{Z}.", "AAAA", False): (
        ("answer",), "a CNAME into our zone whose target lacks the type: svcnet answers the "
        "CNAME and the SOA (RFC 1034 4.3.2, RFC 2308), CoreDNS only the SOA"),
}
DIFFERENCES[(f"{Z}.", "NS", True)] = DIFFERENCES[(f"{Z}.", "NS", False)]
DIFFERENCES[(f"alias.{NS}.svc.{Z}.", "AAAA", True)] = \
    DIFFERENCES[(f"alias.{NS}.svc.{Z}.", "AAAA", False)]


def coredns_binary() -> Path:
    """The shared CoreDNS binary, unpacked once into the cache outside the checkout."""
    from svcnet.lab.controlplane import cache_root

    dest = cache_root() / "coredns-1.11.3" / "coredns"
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == COREDNS_SHA256:
        return dest
    source = next((p / "shared" / "coredns" / "coredns-1.11.3-linux-amd64.xz"
                   for p in Path(__file__).resolve().parents
                   if (p / "shared" / "coredns" / "coredns-1.11.3-linux-amd64.xz").is_file()),
                  None)
    require(source is not None, "../shared/coredns/coredns-1.11.3-linux-amd64.xz not found")
    assert source is not None
    data = lzma.decompress(source.read_bytes())
    assert hashlib.sha256(data).hexdigest() == COREDNS_SHA256, "CoreDNS binary sum"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.rename(dest)
    return dest


def free_udp_tcp_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def objects() -> list[dict[str, Any]]:
    def svc(name: str, **spec: Any) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": NS}, "spec": spec}

    def eps(service: str, name: str, endpoints: list[dict[str, Any]],
            ports: list[dict[str, Any]]) -> dict[str, Any]:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": NS,
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4", "endpoints": endpoints, "ports": ports}

    http = [{"name": "http", "port": 80, "protocol": "TCP"}]
    return [
        svc("web", ports=[*http, {"name": "dns", "port": 53, "protocol": "UDP"}]),
        eps("web", "web-1", [{"addresses": ["10.244.5.1"]},
                             {"addresses": ["10.244.5.2"], "hostname": "db-0"}],
            [{"name": "http", "port": 8080, "protocol": "TCP"}]),
        svc("noports", ports=[{"port": 81, "protocol": "TCP"}]),
        svc("hl", clusterIP="None", ports=http),
        eps("hl", "hl-1", [{"addresses": [f"10.244.6.{i}"]} for i in range(1, 7)] +
            [{"addresses": ["10.244.6.9"], "hostname": "h-0"},
             {"addresses": ["10.244.6.10"], "conditions": {"ready": False}}],
            [{"name": "http", "port": 80, "protocol": "TCP"}]),
        svc("hlempty", clusterIP="None", ports=http),
        svc("alias", type="ExternalName", externalName=f"web.{NS}.svc.{Z}"),
    ]


def queries() -> list[tuple[str, str]]:
    s = f"{NS}.svc.{Z}."
    out = [
        (f"web.{s}", "A"), (f"web.{s}", "AAAA"), (f"web.{s}", "SRV"), (f"web.{s}", "TXT"),
        (f"web.{s}", "MX"), (f"WeB.{s}", "A"),
        (f"_http._tcp.web.{s}", "SRV"), (f"_dns._udp.web.{s}", "SRV"),
        (f"_http._udp.web.{s}", "SRV"), (f"_nope._tcp.web.{s}", "SRV"),
        (f"_http._tcp.web.{s}", "A"), (f"_http._tcp.web.{s}", "AAAA"),
        (f"_http._tcp.hl.{s}", "A"), (f"_http._tcp.hl.{s}", "AAAA"),
        (f"noports.{s}", "A"), (f"noports.{s}", "SRV"),
        (f"10-244-5-1.web.{s}", "A"), (f"db-0.web.{s}", "A"), (f"10-244-5-9.web.{s}", "A"),
        (f"hl.{s}", "A"), (f"hl.{s}", "AAAA"), (f"hl.{s}", "SRV"),
        (f"_http._tcp.hl.{s}", "SRV"), (f"h-0.hl.{s}", "A"), (f"10-244-6-1.hl.{s}", "A"),
        (f"10-244-6-10.hl.{s}", "A"), (f"10-244-6-1.hl.{s}", "AAAA"),
        (f"hlempty.{s}", "A"), (f"hlempty.{s}", "SRV"),
        (f"alias.{s}", "CNAME"), (f"alias.{s}", "A"), (f"alias.{s}", "AAAA"),
        (f"nope.{s}", "A"), (f"nope.{s}", "AAAA"), (s, "A"), (s, "SRV"),
        (f"kube-public.svc.{Z}.", "A"), (f"nosuchns.svc.{Z}.", "A"), (f"svc.{Z}.", "A"),
        (f"10-244-5-1.{NS}.pod.{Z}.", "A"), (f"10-244-5-1.{NS}.pod.{Z}.", "AAAA"),
        (f"fd00--1.{NS}.pod.{Z}.", "AAAA"), (f"bad-ip.{NS}.pod.{Z}.", "A"),
        (f"10-244-5-1.nosuchns.pod.{Z}.", "A"), (f"{NS}.pod.{Z}.", "A"), (f"pod.{Z}.", "A"),
        (f"dns-version.{Z}.", "TXT"), (f"{Z}.", "SOA"), (f"{Z}.", "NS"), (f"{Z}.", "A"),
        (f"nope.{Z}.", "A"), (f"www.google.com.{NS}.svc.{Z}.", "A"),
        ("1.5.244.10.in-addr.arpa.", "PTR"), ("2.5.244.10.in-addr.arpa.", "PTR"),
        ("9.6.244.10.in-addr.arpa.", "PTR"),
    ]
    return out


def normalize(msg: dns.message.Message) -> dict[str, Any]:
    def lines(section: list[Any]) -> list[str]:
        out = []
        for rrset in section:
            for line in rrset.to_text().splitlines():
                text = " ".join(line.split())
                if " SOA " in text:  # each server's serial is its own clock
                    text = re.sub(r"( SOA \S+ \S+ )\d+", r"\1SERIAL", text)
                out.append(text.lower())
        return sorted(out)

    return {"rcode": dns.rcode.to_text(msg.rcode()),
            "flags": dns.flags.to_text(msg.flags & (dns.flags.AA | dns.flags.TC | dns.flags.RA
                                                   | dns.flags.QR)),
            "answer": lines(msg.answer), "authority": lines(msg.authority)}


def ask(port: int, name: str, rtype: str, edns: bool = False) -> dict[str, Any]:
    q = dns.message.make_query(name, rtype, use_edns=0 if edns else False)
    return normalize(dns.query.udp(q, "127.0.0.1", port=port, timeout=5))


def answers_web(port: int) -> bool:
    try:
        return bool(ask(port, f"hl.{NS}.svc.{Z}.", "A")["answer"])
    except (OSError, dns.exception.Timeout):
        return False


@pytest.fixture(scope="module")
def servers(control_plane: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[int, int]]:
    binary = coredns_binary()
    cp = control_plane
    tmp = tmp_path_factory.mktemp("coredns")
    dead = free_udp_tcp_port()
    with cp.namespace(NS):
        for name in ("kube-public",):
            cp.kubectl("create", "namespace", name, check=False)
        cp.apply(objects())
        core_port, svc_port = free_udp_tcp_port(), free_udp_tcp_port()
        corefile = tmp / "Corefile"
        corefile.write_text(
            f".:{core_port} {{\n  bind 127.0.0.1\n  errors\n"
            f"  kubernetes {Z} in-addr.arpa ip6.arpa {{\n"
            f"    kubeconfig {cp.admin_kubeconfig}\n    pods insecure\n"
            f"    fallthrough in-addr.arpa ip6.arpa\n    ttl 5\n  }}\n"
            f"  forward . 127.0.0.1:{dead}\n}}\n")
        core = subprocess.Popen([str(binary), "-conf", str(corefile)], stdout=subprocess.DEVNULL,
                                stderr=open(tmp / "coredns.log", "w"))  # noqa: SIM115
        ours = subprocess.Popen(
            [sys.executable, "-m", "svcnet.cli", "dns", "--store", "kubernetes",
             "--kubeconfig", str(cp.admin_kubeconfig), "--listen", f"127.0.0.1:{svc_port}",
             "--zone", Z, "--ttl", "5", "--workers", "1", "--upstream", f"127.0.0.1:{dead}"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "svcnet.log", "w"))  # noqa: SIM115
        try:
            deadline = time.monotonic() + 60
            while not (answers_web(core_port) and answers_web(svc_port)):
                assert core.poll() is None, (tmp / "coredns.log").read_text()[-2000:]
                assert ours.poll() is None, (tmp / "svcnet.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "servers did not answer"
                time.sleep(0.3)
            yield core_port, svc_port
        finally:
            stop(core)
            stop(ours)


@pytest.mark.parametrize(("name", "rtype"), queries())
def test_same_answers_as_coredns(servers: tuple[int, int], name: str, rtype: str) -> None:
    core_port, svc_port = servers
    for edns in (False, True):
        theirs = ask(core_port, name, rtype, edns)
        ours = ask(svc_port, name, rtype, edns)
        fields, why = DIFFERENCES.get((name, rtype, edns), ((), ""))
        differ = tuple(k for k in ours if ours[k] != theirs[k])
        assert differ == fields, (f"{name} {rtype} edns={edns}: expected to differ in "
                                  f"{fields} ({why}); ours {ours}, CoreDNS {theirs}")


import dns.exception  # noqa: E402

