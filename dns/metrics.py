"""Prometheus metrics under CoreDNS's names, so existing dashboards and alerts keep working.

The per-query counters are not prometheus_client objects: workers count into plain dicts and
ship them every second (``worker.relay_replies``); ``DNSStats`` folds them together with the
main process's own counts and a collector exposes the sums at scrape time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from svcnet.dns.wire import RCODE_NAMES, TYPE_NAMES
from svcnet.dns.worker import BUCKETS

CACHE_ENTRIES = Gauge("coredns_cache_entries", "The number of elements in the cache.",
                      ["server", "type", "zones", "view"])
CACHE_HITS = Counter("coredns_cache_hits_total", "The count of cache hits.",
                     ["server", "type", "zones", "view"])
CACHE_MISSES = Counter("coredns_cache_misses_total", "The count of cache misses.",
                       ["server", "zones", "view"])
CACHE_REQUESTS = Counter("coredns_cache_requests_total", "The count of cache requests.",
                         ["server", "zones", "view"])
CACHE_EVICTIONS = Counter("coredns_cache_evictions_total", "The count of cache evictions.",
                          ["server", "type", "zones", "view"])
FORWARD_REQUESTS = Counter("coredns_forward_requests_total",
                           "Counter of requests made per upstream.", ["to"])
FORWARD_RESPONSES = Counter("coredns_forward_responses_total",
                            "Counter of responses received per upstream.", ["to", "rcode"])
FORWARD_DURATION = Histogram("coredns_forward_request_duration_seconds",
                             "Histogram of the time each request took.", ["to", "rcode"],
                             buckets=BUCKETS)
FORWARD_HC_FAILURES = Counter("coredns_forward_healthcheck_failures_total",
                              "Counter of the number of failed healthchecks.", ["to"])
FORWARD_HC_BROKEN = Counter("coredns_forward_healthcheck_broken_total",
                            "Counter of the number of complete failures of the healthchecks.")
FORWARD_MAX_CONCURRENT = Counter("coredns_forward_max_concurrent_rejects_total",
                                 "Counter of the number of queries rejected because the "
                                 "concurrent queries were at maximum.")
HANDLER_ERRORS = Counter("svcnet_dns_handler_errors_total",
                         "Queries answered SERVFAIL because answering them raised an error "
                         "(a bug; the log shows one traceback per kind per minute).", ["error"])
FORWARD_LOOPS = Counter("svcnet_dns_forward_loops_total",
                        "Times one of our own forwarded queries or loop probes came back to "
                        "us: the upstream leads back here and is not used.", ["to"])
FORWARD_BAD_REPLIES = Counter("svcnet_dns_forward_bad_replies_total",
                              "Upstream replies dropped: wrong ID, not a response, or another "
                              "question (spoofed or broken).", ["to"])
TCP_REJECTED = Counter("svcnet_dns_tcp_rejected_total",
                       "TCP connections closed because the connection limit was reached "
                       "(the least recently active one goes).")
TCP_TIMEOUTS = Counter("svcnet_dns_tcp_aborted_total",
                       "TCP connections aborted: idle, slow to send a query, not reading "
                       "replies, or broken.")
PROGRAMMING = Histogram("coredns_kubernetes_dns_programming_duration_seconds",
                        "Histogram of the time (in seconds) it took to program a dns instance.",
                        ["service_kind"],
                        buckets=(0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                                 0.512, 1.024, 2.048, 4.096, 8.192, 16.384, 32.768, 65.536,
                                 131.072, 262.144, 524.288))


def type_name(qtype: int) -> str:
    """CoreDNS folds uncommon types into "other" to bound label cardinality."""
    return TYPE_NAMES.get(qtype, "other")


class DNSStats:
    """Sums of per-query counts from every worker and from the main process."""

    def __init__(self, server: str, zone: str) -> None:
        self.server = server
        self.zone = zone
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.responses: dict[tuple[str, str], int] = {}
        self.durations: dict[str, list[int]] = {}
        self.dropped = 0

    def count(self, proto: str, qtype: int, rcode: int, plugin: str, seconds: float) -> None:
        with self._lock:
            self._add(proto, qtype, rcode, plugin, 1)
            hist = self.durations.setdefault(type_name(qtype), [0] * (len(BUCKETS) + 2))
            i = sum(1 for b in BUCKETS if seconds > b)
            hist[i] += 1
            hist[-1] += int(seconds * 1e9)

    def _add(self, proto: str, qtype: int, rcode: int, plugin: str, n: int) -> None:
        key = (proto, "1", type_name(qtype))
        self.requests[key] = self.requests.get(key, 0) + n
        rkey = (RCODE_NAMES.get(rcode, str(rcode)), plugin)
        self.responses[rkey] = self.responses.get(rkey, 0) + n

    def fold(self, snapshot: dict[Any, Any]) -> None:
        """Add one worker's counts (``worker.serve``'s ``stats`` dict)."""
        with self._lock:
            for key, value in snapshot.items():
                if isinstance(key, int):
                    self._add("udp", key >> 4, key & 0xF, "kubernetes", value)
                elif key == "dropped":
                    self.dropped += value
                else:
                    hist = self.durations.setdefault(type_name(key[1]),
                                                     [0] * (len(BUCKETS) + 2))
                    for i, v in enumerate(value):
                        hist[i] += v

    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())


class StatsCollector(Collector):
    def __init__(self, stats: DNSStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        base = [s.server, s.zone, ""]
        req = CounterMetricFamily("coredns_dns_requests", "Counter of DNS requests made per "
                                  "zone, protocol and family.",
                                  labels=["server", "zone", "view", "proto", "family", "type"])
        resp = CounterMetricFamily("coredns_dns_responses", "Counter of response status codes.",
                                   labels=["server", "zone", "view", "rcode", "plugin"])
        dur = HistogramMetricFamily("coredns_dns_request_duration_seconds",
                                    "Histogram of the time (in seconds) each request took "
                                    "per zone.", labels=["server", "zone", "view", "type"])
        with s._lock:
            for (proto, family, qtype), n in s.requests.items():
                req.add_metric([*base, proto, family, qtype], n)
            for (rcode, plugin), n in s.responses.items():
                resp.add_metric([*base, rcode, plugin], n)
            for qtype, hist in s.durations.items():
                cumulative, running = [], 0
                for bound, count in zip(BUCKETS, hist, strict=False):
                    running += count
                    cumulative.append((repr(bound), running))
                running += hist[len(BUCKETS)]
                cumulative.append(("+Inf", running))
                dur.add_metric([*base, qtype], cumulative, hist[-1] / 1e9)
        yield req
        yield resp
        yield dur


_registered: dict[int, StatsCollector] = {}


def register(stats: DNSStats) -> None:
    """Expose ``stats``; a later server in the same process replaces an earlier one."""
    for old in list(_registered.values()):
        REGISTRY.unregister(old)
        _registered.clear()
    collector = StatsCollector(stats)
    REGISTRY.register(collector)
    _registered[id(stats)] = collector
