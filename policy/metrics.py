"""Prometheus metrics of NetworkPolicy enforcement; packet counters come from the kernel's
named nft counters, read when scraped (``PacketCounters``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SYNC_DURATION = Histogram(
    "svcnet_policy_sync_duration_seconds", "Time to compute and program the policy table",
    ["full"], buckets=(0.001, 0.004, 0.016, 0.064, 0.256, 1.024, 4.096, 16.384, 65.536))
SYNC_FAILURES = Counter(
    "svcnet_policy_sync_failures_total", "Policy table programming failures (the next sync "
    "is a full one)")
LAST_SYNC = Gauge(
    "svcnet_policy_last_sync_timestamp_seconds", "When the policy table was last programmed")
ISOLATED = Gauge(
    "svcnet_policy_isolated_pod_addresses", "Local pod addresses isolated, per direction",
    ["direction"])
POLICIES = Gauge("svcnet_policy_policies", "Valid NetworkPolicies known")


class PacketCounters(Collector):
    """Per-policy allow and deny packet counters from the table's named counters.

    ``allow-{in,out}-<policy id>`` count packets (new connections) a policy allowed (where
    several allow, the first by name is credited); ``deny-<group>`` count drops at pods a
    set of policies isolates, reported for each of those policies."""

    def __init__(self, read: Callable[[], str],
                 layout: Callable[[], tuple[Mapping[str, str], Mapping[str, tuple[str, ...]]]]
                 ) -> None:
        self.read = read
        self.layout = layout

    def collect(self) -> Iterator[CounterMetricFamily]:
        allowed = CounterMetricFamily(
            "svcnet_policy_allowed_packets", "Packets of new connections a NetworkPolicy "
            "allowed", labels=["policy", "direction"])
        denied = CounterMetricFamily(
            "svcnet_policy_denied_packets", "Packets dropped at pods a NetworkPolicy isolates",
            labels=["policy", "direction"])
        try:
            counts = counter_values(self.read())
        except Exception as err:  # scraping must not fail because nft did
            log.warning("reading policy counters failed: %s", err)
            counts = {}
        policies, groups = self.layout()
        denies: dict[tuple[str, str], int] = {}
        for name, packets in counts.items():
            kind, _, rest = name.partition("-")
            direction, _, ident = rest.partition("-")
            direction = "ingress" if direction == "in" else "egress"
            if kind == "allow" and ident in policies:
                allowed.add_metric([policies[ident], direction], packets)
            elif kind == "deny":
                for policy in groups.get(rest, ()):
                    denies[policy, direction] = denies.get((policy, direction), 0) + packets
        for (policy, direction), packets in sorted(denies.items()):
            denied.add_metric([policy, direction], packets)
        yield allowed
        yield denied


def counter_values(dump: str) -> dict[str, int]:
    """name -> packets from ``nft -j list counters table ...``."""
    out: dict[str, int] = {}
    for obj in json.loads(dump or "{}").get("nftables", []):
        c = obj.get("counter")
        if c:
            out[c["name"]] = int(c.get("packets", 0))
    return out
