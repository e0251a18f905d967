"""The slow path: every query the prepared table cannot answer by itself.

Like CoreDNS's handler.go this only decides which answer to give: malformed -> FORMERR,
not a query -> NOTIMP, EDNS version > 0 -> BADVERS, zone transfers -> REFUSED, cluster names
-> ``ClusterZone.answer`` (SERVFAIL until synced), everything else -> cache, then stub
domain or default upstreams.
"""

from __future__ import annotations

import json
import logging
import struct
import time

from svcnet.dns import metrics
from svcnet.dns.cache import ResponseCache
from svcnet.dns.forward import ConcurrencyLimit, Forwarder, ForwardError
from svcnet.dns.metrics import DNSStats
from svcnet.dns.names import in_reverse_zone
from svcnet.dns.wire import (
    AAAA,
    AXFR,
    BADVERS,
    CLASS_IN,
    CNAME,
    FORMERR,
    IXFR,
    NOERROR,
    NOTIMP,
    PTR,
    REFUSED,
    RR,
    SERVFAIL,
    A,
    Query,
    WireError,
    answer_from_prepared,
    build_response,
    encode_name,
    header_only,
    parse_query,
    prepare,
    with_opt,
)
from svcnet.dns.zone import ClusterZone, table_key

CLASS_ANY = 255

log = logging.getLogger(__name__)
query_log = logging.getLogger("svcnet.dns.query")


class RateLimitedLog:
    """At most one log line per key per ``interval``, saying how many were suppressed:
    one client repeating a query that trips a bug must not fill the disk."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0, keys: int = 64) -> None:
        self.logger = logger
        self.interval = interval
        self.keys = keys
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last logged, suppressed)

    def exception(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-self.interval, 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) >= self.keys:
            self._last.clear()  # bounded: forgetting only means one more line
        self._last[key] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} more like it in the last {self.interval:.0f} s)"
        self.logger.exception(msg, *args)


class Handler:
    def __init__(self, zone: ClusterZone, *, forwarder: Forwarder | None = None,
                 stubs: dict[str, Forwarder] | None = None, cache: ResponseCache | None = None,
                 stats: DNSStats | None = None, log_queries: bool = False) -> None:
        self.zone = zone
        self.forwarder = forwarder
        self.stubs = dict(sorted((stubs or {}).items(), key=lambda kv: -len(kv[0])))
        self.cache = cache if cache is not None else ResponseCache()
        self.stats = stats
        self.log_queries = log_queries
        self.errors = RateLimitedLog(log)

    def forwarders(self) -> list[Forwarder]:
        return [f for f in (self.forwarder, *self.stubs.values()) if f is not None]

    async def handle(self, data: bytes, proto: str = "udp", client: str = "") -> bytes | None:
        return (await self.handle_cacheable(data, proto, client))[0]

    async def handle_cacheable(self, data: bytes, proto: str = "udp", client: str = ""
                               ) -> tuple[bytes | None, bool]:
        """The response, and whether it depends only on the zone (not on an upstream or a
        clock), so a worker may keep it until the zone's next change."""
        started = time.perf_counter()
        try:
            query = parse_query(data)
        except WireError:
            return header_only(data, FORMERR), False
        if query.flags & 0x8000:
            return None, False
        try:
            response, plugin, cacheable = await self._answer(data, query, proto)
        except Exception as err:  # a bug: answer SERVFAIL, count, log rarely
            kind = type(err).__name__
            metrics.HANDLER_ERRORS.labels(kind).inc()
            self.errors.exception(kind, "answering %s %d failed", query.qname, query.qtype)
            response, plugin, cacheable = build_response(query, SERVFAIL), "handler", False
        rcode = response[3] & 0xF if response else SERVFAIL
        elapsed = time.perf_counter() - started
        if self.stats is not None:
            self.stats.count(proto, query.qtype, rcode, plugin, elapsed)
        if self.log_queries:
            query_log.info(json.dumps({
                "client": client, "proto": proto, "id": query.id, "name": query.qname,
                "type": query.qtype, "rcode": rcode, "plugin": plugin,
                "size": len(response or b""), "duration_ms": round(elapsed * 1000, 3)}))
        return response, cacheable and rcode != SERVFAIL and not self.log_queries

    async def _answer(self, data: bytes, q: Query, proto: str) -> tuple[bytes, str, bool]:
        limit = 65535 if proto == "tcp" else (q.udp_size if q.edns else 512)
        if q.opcode != 0:
            return build_response(q, NOTIMP), "handler", True
        if q.edns and q.edns_version > 0:
            return build_response(q, BADVERS), "handler", True
        if q.qtype in (AXFR, IXFR):
            return build_response(q, REFUSED), "handler", True
        if any(f.seen(data, q.qname) for f in self.forwarders()):
            return build_response(q, SERVFAIL), "loop", False
        if in_reverse_zone(q.qname) and q.qtype == PTR and self.zone.synced and \
                table_key(q.qname, PTR) not in self.zone.table and q.qclass == CLASS_IN:
            found = self.zone.endpoint_ptr(q.qname)  # a ClusterIP Service's endpoint
            if found is not None and found.prepared is not None:
                return answer_from_prepared(data, q, found.prepared, limit), "kubernetes", True
        if self.zone.contains(q.qname) or (
                in_reverse_zone(q.qname) and q.qtype == PTR
                and table_key(q.qname, PTR) in self.zone.table):
            if q.qclass not in (CLASS_IN, CLASS_ANY):  # CHAOS, HESIOD: not our data
                return build_response(q, REFUSED), "kubernetes", True
            result = self.zone.answer(q.qname, q.qtype)
            if result.prepared is not None:
                return answer_from_prepared(data, q, result.prepared, limit), "kubernetes", True
            if result.cname is not None:
                inside = self.zone.contains(result.cname.rdata)
                return (await self._external(data, q, result.cname, limit), "kubernetes",
                        inside)
            return build_response(q, result.rcode), "kubernetes", True
        return (*await self._forward(data, q, limit), False)

    async def _forward(self, data: bytes, q: Query, limit: int) -> tuple[bytes, str]:
        forwarder = self.forwarder
        for suffix, stub in self.stubs.items():
            if q.qname == suffix or q.qname.endswith("." + suffix):
                forwarder = stub
                break
        key = q.qname_wire.lower() + struct.pack("!HHB", q.qtype, q.qclass, q.do)
        cached = self.cache.get(key, data[:2])
        if cached is not None:
            return _fit(with_opt(cached, q), q, limit), "cache"
        if forwarder is None:
            return build_response(q, SERVFAIL), "forward"
        try:
            reply = await forwarder.forward(data)
        except ConcurrencyLimit:
            return build_response(q, REFUSED), "forward"
        except ForwardError as err:
            log.debug("forwarding %s failed: %s", q.qname, err)
            return build_response(q, SERVFAIL), "forward"
        reply = self.cache.put(key, reply)
        return _fit(with_opt(reply, q), q, limit), "forward"

    async def _external(self, data: bytes, q: Query, cname: RR, limit: int) -> bytes:
        """ExternalName: the CNAME, then the target's A/AAAA records when we can get them;
        a chain ending in our zone without data carries our SOA (RFC 2308 NODATA)."""
        records = [cname]
        authority: list[RR] = []
        target = cname.rdata
        if self.zone.contains(target):
            if q.qtype in (A, AAAA):
                records += self.zone.rrset(target, q.qtype)
            if len(records) == 1:
                authority.append(self.zone.soa())
        elif q.qtype in (A, AAAA):
            records += await self._resolve(target, q.qtype)
        prepared = prepare(NOERROR, records, authority, [], q.qname, qtype=q.qtype)
        return answer_from_prepared(data, q, prepared, limit)

    async def _resolve(self, name: str, qtype: int) -> list[RR]:
        """Resolve an ExternalName target upstream (through the cache); dnslib parses."""
        import dnslib

        query = struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + encode_name(name) + \
            struct.pack("!HH", qtype, 1)
        key = encode_name(name) + struct.pack("!HHB", qtype, 1, 0)
        reply = self.cache.get(key, b"\x00\x00")
        if reply is None and self.forwarder is not None:
            try:
                reply = await self.forwarder.forward(query)
            except ForwardError:
                return []
            self.cache.put(key, reply)
        if reply is None:
            return []
        try:
            parsed = dnslib.DNSRecord.parse(reply)
        except dnslib.DNSError:
            return []
        out = []
        for rr in parsed.rr:
            if rr.rtype in (A, AAAA, CNAME):
                out.append(RR(str(rr.rname), rr.rtype, rr.ttl, str(rr.rdata)))
        return out


def _fit(response: bytes, q: Query, limit: int) -> bytes:
    """Truncate to the header and question (plus OPT) with TC set when over ``limit``."""
    if len(response) <= limit:
        return response
    return build_response(q, response[3] & 0xF, truncated=True,
                          authoritative=bool(response[2] & 0x04))
