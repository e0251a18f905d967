"""Look-up: the neutral DNS records one Service (with its EndpointSlices) stands for.

Implements the Kubernetes DNS-Based Service Discovery specification 1.1.0 with CoreDNS's
choices where the specification leaves room (SRV priority 0 and weight 100/n, dashed-IP
endpoint hostnames, ``endpoint_pod_names``). The result is plain data; ``zone.py`` renders it.
EndpointSlices may be full records or the DNS's slim ``daemon.SliceAddresses``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from svcnet.dns import names
from svcnet.dns.wire import AAAA, CNAME, RR, SRV, A

from svcnet.model import Service

RRSet = tuple[tuple[RR, ...], tuple[RR, ...]]
"""(answer, additional)"""


@dataclass(frozen=True, slots=True)
class ServiceRecords:
    """Everything one Service contributes to the zone."""

    rrsets: dict[tuple[str, int], RRSet] = field(default_factory=dict)
    names: frozenset[str] = frozenset()
    ptrs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    external: str = ""  # ExternalName target; its CNAME answers every type


def _family(ip: str) -> int:
    return AAAA if ":" in ip else A


def _address_rrs(owner: str, ips: list[str], ttl: int) -> dict[int, list[RR]]:
    out: dict[int, list[RR]] = {}
    for ip in ips:
        rr = RR(owner, _family(ip), ttl, ip)
        bucket = out.setdefault(rr.rtype, [])
        if rr not in bucket:
            bucket.append(rr)
    return out


def _srv_rrs(owner: str, targets: list[tuple[str, int]], ttl: int) -> list[RR]:
    """CoreDNS: priority 0, weight 100 / (records before de-duplication)."""
    weight = 100 // max(1, len(targets))
    out: list[RR] = []
    for target, port in targets:
        rr = RR(owner, SRV, ttl, f"0 {weight} {port} {target}")
        if rr not in out:
            out.append(rr)
    return out


def service_records(svc: Service, slices: Sequence[Any], zone: str, ttl: int, *,
                    endpoint_pod_names: bool = False) -> ServiceRecords:
    meta = svc.metadata
    owner = names.service_name(meta.name, meta.namespace, zone)
    if svc.spec.type == "ExternalName":
        target = names.fqdn(svc.spec.external_name) if svc.spec.external_name else ""
        if not target:
            return ServiceRecords()
        cname = RR(owner, CNAME, ttl, target)
        return ServiceRecords({(owner, CNAME): ((cname,), ())}, frozenset({owner}),
                              external=target)
    if svc.is_headless:
        return _headless(svc, slices, owner, ttl, endpoint_pod_names)
    return _cluster_ip(svc, owner, ttl)


def _cluster_ip(svc: Service, owner: str, ttl: int) -> ServiceRecords:
    ips = list(svc.cluster_ips)
    if not ips:
        return ServiceRecords()
    by_type = _address_rrs(owner, ips, ttl)
    extra = tuple(rr for rtype in (A, AAAA) for rr in by_type.get(rtype, ()))
    rrsets: dict[tuple[str, int], RRSet] = {
        (owner, rtype): (tuple(rrs), ()) for rtype, rrs in by_type.items()}
    ports = svc.spec.ports
    all_targets = [(owner, p.port) for p in ports for _ in ips]
    if all_targets:
        rrsets[(owner, SRV)] = (tuple(_srv_rrs(owner, all_targets, ttl)), extra)
    existing = {owner}
    for port in ports:
        if not port.name:
            continue
        srv_owner = names.srv_name(port.name, port.protocol, owner)
        rrsets[(srv_owner, SRV)] = (
            tuple(_srv_rrs(srv_owner, [(owner, port.port) for _ in ips], ttl)), extra)
        # CoreDNS answers A/AAAA of a port name too: the Service's addresses.
        for rtype, rrs in _address_rrs(srv_owner, ips, ttl).items():
            rrsets[(srv_owner, rtype)] = (tuple(rrs), ())
        existing.add(srv_owner)
    ptrs: dict[str, tuple[str, ...]] = {names.reverse_name(ip): (owner,) for ip in ips}
    return ServiceRecords(rrsets, frozenset(existing), ptrs)


def _headless(svc: Service, slices: Sequence[Any], owner: str, ttl: int,
              pod_names: bool) -> ServiceRecords:
    publish_all = svc.spec.publish_not_ready_addresses
    # (hostname fqdn, address, ports of its slice), in a stable order
    members: list[tuple[str, str, tuple[tuple[str, str, int], ...]]] = []
    ports: tuple[tuple[str, str, int], ...]
    for sl in sorted(slices, key=lambda s: s.metadata.name):
        if sl.address_type == "FQDN":
            continue
        ports = tuple((p.name, p.protocol, p.port) for p in sl.ports if p.port)
        for ep in sl.endpoints:
            if not (ep.ready or publish_all):
                continue
            for addr in ep.addresses:
                host = names.endpoint_hostname(ep, addr, pod_names=pod_names)
                members.append((names.fqdn(host, owner), addr, ports))
    if not members:
        return ServiceRecords()
    rrsets: dict[tuple[str, int], RRSet] = {}
    for rtype, rrs in _address_rrs(owner, [m[1] for m in members], ttl).items():
        rrsets[(owner, rtype)] = (tuple(rrs), ())
    hosts: dict[str, list[str]] = {}
    for host, addr, _ in members:
        hosts.setdefault(host, []).append(addr)
    host_rrs: dict[str, list[RR]] = {}
    for host, addrs in hosts.items():
        for rtype, rrs in _address_rrs(host, addrs, ttl).items():
            rrsets[(host, rtype)] = (tuple(rrs), ())
            host_rrs.setdefault(host, []).extend(rrs)
    existing = {owner, *hosts}

    def extra_for(targets: list[tuple[str, int]]) -> tuple[RR, ...]:
        out: list[RR] = []
        for target, _ in targets:
            for rr in host_rrs.get(target, ()):
                if rr not in out:
                    out.append(rr)
        return tuple(out)

    all_targets = [(host, port) for host, _, ports in members for _, _, port in ports]
    if all_targets:
        rrsets[(owner, SRV)] = (tuple(_srv_rrs(owner, all_targets, ttl)), extra_for(all_targets))
    named: dict[str, list[tuple[str, int]]] = {}
    named_ips: dict[str, list[str]] = {}
    for host, addr, ports in members:
        for pname, proto, port in ports:
            if pname:
                srv_owner = names.srv_name(pname, proto, owner)
                named.setdefault(srv_owner, []).append((host, port))
                named_ips.setdefault(srv_owner, []).append(addr)
    for srv_owner, targets in named.items():
        rrsets[(srv_owner, SRV)] = (tuple(_srv_rrs(srv_owner, targets, ttl)), extra_for(targets))
        # CoreDNS answers A/AAAA of a port name too: the addresses of its endpoints.
        for rtype, rrs in _address_rrs(srv_owner, named_ips[srv_owner], ttl).items():
            rrsets[(srv_owner, rtype)] = (tuple(rrs), ())
        existing.add(srv_owner)
    ptrs: dict[str, list[str]] = {}
    for host, addr, _ in members:
        bucket = ptrs.setdefault(names.reverse_name(addr), [])
        if host not in bucket:
            bucket.append(host)
    return ServiceRecords(rrsets, frozenset(existing), {k: tuple(v) for k, v in ptrs.items()})
