"""The cluster zone: prepared wire answers kept current from the watch cache.

Services are looked up (``records.py``) and rendered (``wire.prepare``) when they or their
EndpointSlices change, never per query. Each change yields a batch of table updates
``{key: Prepared | None}`` that is written into the shared table (``table.py``) every worker
process reads; subscribers (the server) are then told, so workers drop cached replies.
Names that are not prepared (pods, negative answers, ExternalName targets) are answered by
``answer`` on the slow path, like CoreDNS's handler: SERVFAIL until synced, NODATA for a
name that exists without the asked type, NXDOMAIN otherwise, with the zone's SOA.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from svcnet.dns import names
from svcnet.dns.records import ServiceRecords, service_records
from svcnet.dns.table import SharedTable
from svcnet.dns.wire import (
    AAAA,
    ANY,
    CNAME,
    NOERROR,
    NS,
    NXDOMAIN,
    POINTER_TO_QUESTION,
    PTR,
    RR,
    SERVFAIL,
    SOA,
    TXT,
    A,
    Prepared,
    encode_name,
    prepare,
)

from svcnet.model import Service

log = logging.getLogger(__name__)

PodMode = Literal["insecure", "verified", "disabled"]


class _Meta(Protocol):
    @property
    def namespace(self) -> str: ...


class PodLike(Protocol):
    """A Pod record or the DNS's slim ``PodAddresses``."""

    @property
    def metadata(self) -> _Meta: ...

    @property
    def ips(self) -> tuple[str, ...]: ...
Updates = dict[bytes, Prepared | None]
VERSION_TTL = 28800  # CoreDNS answers dns-version with this TTL


NO_KEY = b"\xff"
"""What ``table_key`` gives a name no table entry can have (``names.py`` never builds one)."""


def table_key(name: str, qtype: int) -> bytes:
    """The fast path's key: the lower-case wire name, type and class IN, as in the query.

    A query name with escaped bytes (``wire.labels_to_text``) names nothing we serve."""
    if "\\" in name:
        return NO_KEY
    return encode_name(name) + struct.pack("!HH", qtype, 1)


def split_keys(joined: bytes) -> set[bytes]:
    """Table keys concatenated (wire names are self-delimiting) back into a set."""
    out = set()
    start = pos = 0
    while pos < len(joined):
        length = joined[pos]
        if length:
            pos += 1 + length
            continue
        out.add(joined[start:pos + 5])
        start = pos = pos + 5
    return out


def address_records(name: str, prepared: Prepared) -> list[RR]:
    """The A/AAAA answer records of a prepared answer (owners point at the question)."""
    out = []
    body = prepared.body
    pos = 0
    for _ in range(int.from_bytes(prepared.counts[2:4], "big")):
        rtype, _, ttl, rdlen = struct.unpack_from("!HHIH", body, pos + 2)
        rdata = body[pos + 12:pos + 12 + rdlen]
        if body[pos:pos + 2] == POINTER_TO_QUESTION and rtype in (A, AAAA):
            out.append(RR(name, rtype, ttl, str(ipaddress.ip_address(rdata))))
        pos += 12 + rdlen
    return out


NO_RRSETS: dict[tuple[str, int], Any] = {}
NO_PODS: Counter[str] = Counter()  # never written: a missing key reads 0


@dataclass(frozen=True, slots=True)
class Lookup:
    """The slow path's result: a prepared answer, or an ExternalName to chase, or an error."""

    prepared: Prepared | None = None
    cname: RR | None = None  # ExternalName: answer CNAME + the target's records
    rcode: int = NOERROR


class ClusterZone:
    def __init__(self, zone: str = "cluster.local", *, ttl: int = 5,
                 pods: PodMode = "insecure", endpoint_pod_names: bool = False) -> None:
        self.zone = names.normalize_zone(zone)
        self.zones = (self.zone,)
        self.ttl = ttl
        self.pods: PodMode = pods
        self.endpoint_pod_names = endpoint_pod_names
        self.synced = False
        self.generation = 0  # counts changes that may change any answer (see ``touch``)
        self.serial = int(time.time())
        self.table = SharedTable()
        self._services: dict[str, ServiceRecords] = {}
        self._keys: dict[str, bytes] = {}  # per Service: its table keys, concatenated
        self._names: Counter[str] = Counter()
        self._ptr_owners: dict[str, dict[str, tuple[str, ...]]] = {}
        self._externals: dict[str, str] = {}
        self._svc_namespaces: Counter[str] = Counter()
        self._pod_namespaces: Counter[str] = Counter()
        self._pod_ips: dict[str, Counter[str]] = {}  # namespace -> pod IP -> pods with it
        self._subscribers: list[Callable[[], None]] = []
        self._namespaces: set[str] = set()  # Namespace objects (empty: the store has none)
        # ClusterIP Services' endpoints are not prepared (10 per Service would triple the
        # table): the slow path asks the watch cache for a Service's (hostname, IP) pairs,
        # None when it is not a ClusterIP Service, and keeps IP -> Service for PTRs.
        self.endpoints_of: Callable[[str], list[tuple[str, str]] | None] = lambda key: None
        self._endpoint_ips: dict[int, str] = {}
        self.ns_addresses: list[str] = []  # what ns.dns.<zone> answers (``set_ns_addresses``)
        self.apply(self._static())

    # --- publishing ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Be told after every change to the table once synced (the server tells workers)."""
        self._subscribers.append(callback)

    def apply(self, updates: Updates) -> None:
        """Change the table; tell subscribers now, or at ``mark_synced`` while the first list
        runs (workers are not given the table before that)."""
        if not updates:
            return
        serial = int(time.time())
        if serial != self.serial:
            # The apex SOA answer carries the serial too: workers build their negative
            # answers' authority from it (``worker.soa_authority``), so keep it current.
            self.serial = serial
            updates = {**updates, table_key(self.zone, SOA): prepare(
                NOERROR, [self.soa()], [], [], self.zone, qtype=SOA)}
        for key, value in updates.items():
            self.table.set(key, value)
        self.touch()

    def touch(self) -> None:
        """Something an answer may depend on changed (the table, namespaces, pods, endpoints
        of ClusterIP Services): tell subscribers, so workers drop replies they cached,
        including the slow path's."""
        self.generation += 1
        if self.synced:
            for callback in self._subscribers:
                callback()

    def mark_synced(self) -> None:
        """The watch cache is complete: publish the table and start answering."""
        self.synced = True
        self.generation += 1
        for callback in self._subscribers:
            callback()

    def rrset(self, name: str, qtype: int) -> list[RR]:
        """A name's A or AAAA records (ExternalName targets inside the zone, ANY), read back
        from the table: the zone keeps no records of its own once they are rendered."""
        if qtype not in (A, AAAA):
            return []
        prepared = self.table.get(table_key(name, qtype))
        return address_records(name, prepared) if prepared is not None else []

    # --- SOA and static names --------------------------------------------------------------

    def soa(self) -> RR:
        """CoreDNS's SOA: TTL min(ttl, 300), minimum = ttl, serial = last change."""
        return RR(self.zone, SOA, min(self.ttl, 300),
                  f"ns.dns.{self.zone} hostmaster.{self.zone} {self.serial} 7200 1800 86400 "
                  f"{self.ttl}")

    def _nodata(self, name: str, qtype: int = 0) -> Prepared:
        return prepare(NOERROR, [], [self.soa()], [], name, qtype=qtype)

    def _static(self) -> Updates:
        z = self.zone
        version = names.fqdn(names.VERSION_LABEL, z)
        ups: Updates = {
            table_key(z, SOA): prepare(NOERROR, [self.soa()], [], [], z, qtype=SOA),
            table_key(z, NS): prepare(NOERROR, [RR(z, NS, self.ttl, f"ns.dns.{z}")], [], [], z,
                                      qtype=NS),
            table_key(version, TXT): prepare(
                NOERROR, [RR(version, TXT, VERSION_TTL, f'"{names.SCHEMA_VERSION}"')], [], [],
                version, qtype=TXT),
        }
        # ns.dns.<zone>, which the SOA and NS name, exists even without an address to give
        # (``set_ns_addresses`` fills it in): NODATA, as CoreDNS, not NXDOMAIN.
        for name in (z, names.fqdn("svc", z), names.fqdn("pod", z), f"ns.dns.{z}"):
            for qtype in (A, AAAA):
                ups[table_key(name, qtype)] = self._nodata(name, qtype)
        return ups

    # --- changes from the watch cache ------------------------------------------------------

    def set_service(self, key: str, svc: Service | None, slices: Sequence[Any]) -> None:
        """Recompute one Service's names; publish only the keys that changed."""
        old = self._services.pop(key, None)
        new = service_records(svc, slices, self.zone, self.ttl,
                              endpoint_pod_names=self.endpoint_pod_names) if svc else None
        if old is not None:
            for name in old.names:
                self._names[name] -= 1
                if self._names[name] <= 0:
                    del self._names[name]
            if old.external:
                for name in old.names:
                    self._externals.pop(name, None)
        namespace = key.partition("/")[0]
        if old is not None:
            self._svc_namespaces[namespace] -= 1
            if self._svc_namespaces[namespace] <= 0:
                del self._svc_namespaces[namespace]
        updates: Updates = {}
        old_keys = split_keys(self._keys.pop(key, b""))
        new_keys: set[bytes] = set()
        if new is not None:
            self._services[key] = new
            self._svc_namespaces[namespace] += 1
            self._names.update(new.names)
            if new.external:
                for name in new.names:
                    self._externals[name] = new.external
            for (name, qtype), (answer, extra) in new.rrsets.items():
                k = table_key(name, qtype)
                prepared = prepare(NOERROR, list(answer), [], list(extra), name, qtype=qtype)
                new_keys.add(k)
                if self.table.get(k) != prepared:
                    updates[k] = prepared
            for name in new.names:
                if name.startswith("_"):
                    continue  # SRV owners: their rare A/AAAA NODATA come from the slow path
                for qtype in (A, AAAA):
                    if (name, qtype) in new.rrsets or (name, CNAME) in new.rrsets:
                        continue
                    k = table_key(name, qtype)
                    new_keys.add(k)
                    if k not in old_keys:
                        updates[k] = self._nodata(name, qtype)
            self._keys[key] = b"".join(sorted(new_keys))
            # Records live on only as prepared answers; keep the names, PTRs, ExternalName.
            self._services[key] = replace(new, rrsets=NO_RRSETS)
        for k in old_keys - new_keys:
            updates[k] = None
        updates.update(self._update_ptrs(key, old, new))
        updates.update(self._pod_marker(namespace))
        self.apply(updates)

    def _update_ptrs(self, key: str, old: ServiceRecords | None,
                     new: ServiceRecords | None) -> Updates:
        touched = set(old.ptrs if old else ()) | set(new.ptrs if new else ())
        for ptr in touched:
            owners = self._ptr_owners.setdefault(ptr, {})
            owners.pop(key, None)
            if new is not None and ptr in new.ptrs:
                owners[key] = new.ptrs[ptr]
        updates: Updates = {}
        for ptr in touched:
            owners = self._ptr_owners.get(ptr, {})
            targets = sorted({t for ts in owners.values() for t in ts})
            k = table_key(ptr, PTR)
            if not targets:
                self._ptr_owners.pop(ptr, None)
                updates[k] = None
            else:
                updates[k] = prepare(
                    NOERROR, [RR(ptr, PTR, self.ttl, t) for t in targets], [], [], ptr,
                    qtype=PTR)
        return updates

    def set_pod(self, old: PodLike | None, new: PodLike | None) -> None:
        """Index pods by (namespace, IP) for ``pods verified``."""
        if old is not None:
            self._pod_namespaces[old.metadata.namespace] -= 1
            if self._pod_namespaces[old.metadata.namespace] <= 0:
                del self._pod_namespaces[old.metadata.namespace]
            ips = self._pod_ips.get(old.metadata.namespace)
            for ip in old.ips:
                if ips is not None and ip in ips:
                    ips[ip] -= 1
                    if ips[ip] <= 0:
                        del ips[ip]
            if not ips:
                self._pod_ips.pop(old.metadata.namespace, None)
        if new is not None:
            self._pod_namespaces[new.metadata.namespace] += 1
            if new.ips:
                self._pod_ips.setdefault(new.metadata.namespace, Counter()).update(new.ips)
        for namespace in {p.metadata.namespace for p in (old, new) if p is not None}:
            self.apply(self._pod_marker(namespace))
        self.touch()

    def set_namespace(self, name: str, exists: bool) -> None:
        """Namespaces exist for CoreDNS's NODATA (``<ns>.svc.<zone>``) and for pod names."""
        if exists:
            self._namespaces.add(sys.intern(name))
        else:
            self._namespaces.discard(name)
        self.apply(self._pod_marker(name))
        self.touch()

    def _pod_marker(self, namespace: str) -> Updates:
        """``<ns>.pod.<zone>`` A/AAAA (NODATA) is prepared while the namespace exists for pod
        names: it answers that name, and tells a worker it may answer pod names in that
        namespace itself (``worker.pod_answer``)."""
        name = names.fqdn(namespace, "pod", self.zone)
        keys = [table_key(name, A), table_key(name, AAAA)]
        exists = self.pods != "disabled" and (
            self.namespace_exists(namespace) or namespace in self._pod_namespaces)
        if not exists:
            return {k: None for k in keys if k in self.table}
        return {k: self._nodata(name, qtype) for k, qtype in zip(keys, (A, AAAA), strict=True)
                if k not in self.table}

    def index_endpoints(self, key: str, old: Sequence[str], new: Sequence[str]) -> None:
        """Keep IP -> Service key for the endpoint addresses of one EndpointSlice."""
        key = sys.intern(key)
        for ip in set(old) - set(new):
            with contextlib.suppress(ValueError):
                packed = int(ipaddress.ip_address(ip))
                if self._endpoint_ips.get(packed) == key:
                    del self._endpoint_ips[packed]
        for ip in new:
            with contextlib.suppress(ValueError):
                self._endpoint_ips[int(ipaddress.ip_address(ip))] = key
        self.touch()

    def set_ns_addresses(self, ips: Sequence[str]) -> None:
        """The addresses ``ns.dns.<zone>`` (the apex NS and SOA name it) answers with: the
        DNS Service's ClusterIPs, else our own addresses, as CoreDNS."""
        ips = list(ips)
        if ips == self.ns_addresses:
            return
        self.ns_addresses = ips
        name = f"ns.dns.{self.zone}"
        ups: Updates = {}
        for rtype in (A, AAAA):
            rrs = [RR(name, rtype, self.ttl, ip) for ip in ips if (AAAA if ":" in ip else A)
                   == rtype]
            ups[table_key(name, rtype)] = prepare(NOERROR, rrs, [], [], name, qtype=rtype) \
                if rrs else self._nodata(name, rtype)
        self.apply(ups)

    def dns_service_ips(self, local: Sequence[str]) -> list[str]:
        """The addresses of the Service that stands for us: one whose ClusterIP is one of
        our addresses (``svcnet node`` listening on it) or that has one of them as an
        endpoint (a DNS pod), as CoreDNS's ``nsAddrs``. Empty if there is none."""
        owners: list[str] = []
        for ip in local:
            for targets in self._ptr_owners.get(names.reverse_name(ip), {}).values():
                owners += targets
            with contextlib.suppress(ValueError):
                key = self._endpoint_ips.get(int(ipaddress.ip_address(ip)))
                if key is not None:
                    namespace, _, service = key.partition("/")
                    owners.append(names.service_name(service, namespace, self.zone))
        out: list[str] = []
        for owner in dict.fromkeys(owners):
            for rtype in (A, AAAA):
                out += [rr.rdata for rr in self.rrset(owner, rtype) if rr.rdata not in out]
        return out

    # --- the slow path ---------------------------------------------------------------------

    def contains(self, qname: str) -> bool:
        return names.split_zone(qname, self.zones) is not None

    def answer(self, qname: str, qtype: int) -> Lookup:
        """Answer a name inside the zone that has no prepared answer for this type."""
        if not self.synced:
            return Lookup(rcode=SERVFAIL)
        if "\\" in qname:  # an escaped byte: no object name has one
            return Lookup(prepare(NXDOMAIN, [], [self.soa()], [], qname))
        prepared = self.table.get(table_key(qname, qtype))
        if prepared is not None:
            return Lookup(prepared)
        external = self._externals.get(qname)
        if external is not None:
            return Lookup(cname=RR(qname, CNAME, self.ttl, external))
        if qtype == ANY:
            return self._any(qname)
        where = names.split_zone(qname, self.zones)
        if where is not None and where.where == "pod":
            return self._pod(qname, qtype, where)
        if where is not None and where.where == "svc" and len(where.labels) == 3:
            found = self._endpoint(qname, qtype, where)
            if found is not None:
                return found
        if self._exists(qname, where):
            return Lookup(self._nodata(qname))
        return Lookup(prepare(NXDOMAIN, [], [self.soa()], [], qname))

    def _any(self, qname: str) -> Lookup:
        answer: list[RR] = []
        for qtype in (A, AAAA, TXT, SOA, NS):
            p = self.table.get(table_key(qname, qtype))
            if p is not None and p.counts[2:4] != b"\x00\x00":
                answer += self._records_of(qname, qtype)
        if answer:
            return Lookup(prepare(NOERROR, answer, [], [], qname))
        where = names.split_zone(qname, self.zones)
        if self._exists(qname, where):
            return Lookup(self._nodata(qname))
        return Lookup(prepare(NXDOMAIN, [], [self.soa()], [], qname))

    def _records_of(self, qname: str, qtype: int) -> list[RR]:
        if qname == self.zone and qtype in (SOA, NS):
            return [self.soa()] if qtype == SOA else [RR(qname, NS, self.ttl,
                                                           f"ns.dns.{self.zone}")]
        if qtype == TXT:
            return [RR(qname, TXT, VERSION_TTL, f'"{names.SCHEMA_VERSION}"')]
        return self.rrset(qname, qtype)

    def _endpoint(self, qname: str, qtype: int, where: names.ZoneName) -> Lookup | None:
        """``<endpoint>.<service>.<ns>.svc.<zone>`` of a ClusterIP Service (headless ones
        are prepared): its A or AAAA, NODATA for other types, None if there is none."""
        host, service, namespace = where.labels
        owner = names.service_name(service, namespace, self.zone)
        # A Service without an address has no name, so nothing below it has one either
        # (workers answer NXDOMAIN below a Service name the table lacks).
        if table_key(owner, A) not in self.table and table_key(owner, AAAA) not in self.table:
            return None
        pairs = self.endpoints_of(f"{namespace}/{service}")
        ips = [ip for h, ip in pairs or () if h == host]
        if not ips:
            return None
        rtype = qtype if qtype in (A, AAAA) else 0
        rrs = [RR(qname, rtype, self.ttl, ip) for ip in ips if (AAAA if ":" in ip else A)
               == rtype]
        if not rrs:
            return Lookup(self._nodata(qname))
        return Lookup(prepare(NOERROR, rrs, [], [], qname))

    def endpoint_ptr(self, qname: str) -> Lookup | None:
        """PTR of an endpoint address of a ClusterIP Service (CoreDNS answers these too)."""
        try:
            ip = names.reverse_to_ip(qname)
        except ValueError:
            return None
        if ip is None:
            return None
        key = self._endpoint_ips.get(int(ipaddress.ip_address(ip)))
        if key is None:
            return None
        pairs = self.endpoints_of(key)
        namespace, _, service = key.partition("/")
        targets = sorted({names.fqdn(h, service, namespace, "svc", self.zone)
                          for h, addr in pairs or () if addr == ip})
        if not targets:
            return None
        return Lookup(prepare(NOERROR, [RR(qname, PTR, self.ttl, t) for t in targets], [], [],
                              qname, qtype=PTR))

    def namespace_exists(self, namespace: str) -> bool:
        return namespace in self._namespaces or namespace in self._svc_namespaces

    def _exists(self, qname: str, where: names.ZoneName | None) -> bool:
        if self._names.get(qname, 0) > 0:
            return True
        if where is None:
            return False
        if where.where in ("apex", "version") or qname == f"ns.dns.{self.zone}":
            return True
        if where.where == "svc":
            return not where.labels or (
                len(where.labels) == 1 and self.namespace_exists(where.labels[0]))
        if where.where == "pod":
            return not where.labels or (
                len(where.labels) == 1 and self.pods != "disabled" and (
                    self._pod_namespace(where.labels[0])))
        return False

    def _pod_namespace(self, namespace: str) -> bool:
        """A namespace pod names may be in: an existing one, as CoreDNS (a Namespace object
        or one holding a Service or, verified, a Pod); with ``insecure`` and a store holding
        no Namespace objects at all (the lab, tests), any."""
        return self.namespace_exists(namespace) or namespace in self._pod_namespaces or (
            self.pods == "insecure" and not self._namespaces)

    def _pod(self, qname: str, qtype: int, where: names.ZoneName) -> Lookup:
        nx = Lookup(prepare(NXDOMAIN, [], [self.soa()], [], qname))
        if self.pods == "disabled" or len(where.labels) != 2:
            return Lookup(self._nodata(qname)) if self._exists(qname, where) else nx
        ip = names.undashed(where.labels[0])
        namespace = where.labels[1]
        if ip is None or not self._pod_namespace(namespace):
            return nx
        if self.pods == "verified" and self._pod_ips.get(namespace, NO_PODS)[ip] <= 0:
            return nx
        rtype = AAAA if ":" in ip else A
        if qtype != rtype:
            return Lookup(self._nodata(qname))
        return Lookup(prepare(NOERROR, [RR(qname, rtype, self.ttl, ip)], [], [], qname))
