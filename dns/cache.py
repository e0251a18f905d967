"""A bounded cache of upstream answers, in wire form, aged on the way out.

Like CoreDNS's cache plugin: positive answers live for their smallest TTL capped at
``max_ttl``; NXDOMAIN and NODATA for the SOA's negative TTL capped at ``max_denial_ttl``;
both at least ``min_ttl``. Served answers carry TTLs reduced by the time they spent here.
SERVFAIL and truncated answers are never cached. When full, the oldest entry goes.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from svcnet.dns import metrics
from svcnet.dns.wire import NOERROR, NXDOMAIN, SOA, WireError, read_name, skip_rr

_TTL = struct.Struct("!I")


@dataclass(slots=True)
class _Entry:
    response: bytes
    stored: float
    expires: float
    ttls: list[tuple[int, int]]  # (offset, original ttl)
    denial: bool


def _classify(data: bytes) -> tuple[int, bool, list[tuple[int, int]]] | None:
    """(cache seconds, denial?, ttl fields) for a cacheable response, else None."""
    if len(data) < 12 or data[2] & 0x02:
        return None
    rcode = data[3] & 0xF
    if rcode not in (NOERROR, NXDOMAIN):
        return None
    qd, an, ns, ar = struct.unpack_from("!HHHH", data, 4)
    pos = 12
    for _ in range(qd):
        pos = read_name(data, pos)[1] + 4
    ttls: list[tuple[int, int]] = []
    answer_ttls: list[int] = []
    soa_ttl: int | None = None
    for i in range(an + ns + ar):
        rtype, _, ttl, at, end = skip_rr(data, pos)
        if rtype != 41:
            ttls.append((at, ttl))
            if i < an:
                answer_ttls.append(ttl)
            elif i < an + ns and rtype == SOA:
                (minimum,) = _TTL.unpack_from(data, end - 4)
                soa_ttl = min(ttl, minimum)
        pos = end
    if rcode == NOERROR and answer_ttls:
        return min(answer_ttls), False, ttls
    if soa_ttl is None:
        return None
    return soa_ttl, True, ttls


class ResponseCache:
    def __init__(self, capacity: int = 9984, *, max_ttl: int = 3600, max_denial_ttl: int = 1800,
                 min_ttl: int = 5, server: str = "dns://:53", zones: str = ".") -> None:
        self.capacity = capacity
        self.max_ttl = max_ttl
        self.max_denial_ttl = max_denial_ttl
        self.min_ttl = min_ttl
        self._entries: dict[bytes, _Entry] = {}
        self._denials = 0
        self._labels = (server, zones, "")
        self.clock = time.monotonic

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, query_id: bytes) -> bytes | None:
        metrics.CACHE_REQUESTS.labels(*self._labels).inc()
        entry = self._entries.get(key)
        now = self.clock()
        if entry is not None and entry.expires <= now:
            self._drop(key)
            self._gauge()
            entry = None
        if entry is None:
            metrics.CACHE_MISSES.labels(*self._labels).inc()
            return None
        server, zones, view = self._labels
        metrics.CACHE_HITS.labels(server, "denial" if entry.denial else "success", zones,
                                  view).inc()
        out = bytearray(entry.response)
        out[:2] = query_id
        age = int(now - entry.stored)
        for offset, ttl in entry.ttls:
            _TTL.pack_into(out, offset, max(0, ttl - age))
        return bytes(out)

    def put(self, key: bytes, response: bytes) -> bytes:
        """Store a reply; returns it with TTLs capped as it will be served from here on."""
        try:
            info = _classify(response)
        except (WireError, struct.error):
            return response
        if info is None:
            return response
        seconds, denial, ttls = info
        seconds = min(seconds, self.max_denial_ttl if denial else self.max_ttl)
        seconds = max(seconds, self.min_ttl)
        if key not in self._entries and len(self._entries) >= self.capacity:
            gone = self._drop(next(iter(self._entries)))
            server, zones, view = self._labels
            metrics.CACHE_EVICTIONS.labels(server, "denial" if gone.denial else "success",
                                           zones, view).inc()
        now = self.clock()
        capped = [(at, min(ttl, seconds)) for at, ttl in ttls]
        if any(ttl > seconds for _, ttl in ttls):
            out = bytearray(response)
            for at, ttl in capped:
                _TTL.pack_into(out, at, ttl)
            response = bytes(out)
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(response, now, now + seconds, capped, denial)
        self._denials += denial
        self._gauge()
        return response

    def _drop(self, key: bytes) -> _Entry:
        gone = self._entries.pop(key)
        self._denials -= gone.denial
        return gone

    def _gauge(self) -> None:
        server, zones, view = self._labels
        denial = self._denials
        metrics.CACHE_ENTRIES.labels(server, "denial", zones, view).set(denial)
        metrics.CACHE_ENTRIES.labels(server, "success", zones, view).set(
            len(self._entries) - denial)
