"""Prometheus metrics under kube-proxy's names, so existing dashboards and alerts work."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_SYNC_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
                 2.048, 4.096, 8.192, 16.384, 32.768, 65.536)
_PROGRAMMING_BUCKETS = (0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 20, 25,
                        30, 45, 60, 120, 180, 240, 300)

SYNC_DURATION = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
    buckets=_SYNC_BUCKETS)
SYNC_FULL_DURATION = Histogram(
    "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for full resyncs", buckets=_SYNC_BUCKETS)
SYNC_PARTIAL_DURATION = Histogram(
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for partial resyncs", buckets=_SYNC_BUCKETS)
NETWORK_PROGRAMMING = Histogram(
    "kubeproxy_network_programming_duration_seconds",
    "In Cluster Network Programming Latency in seconds", buckets=_PROGRAMMING_BUCKETS)
LAST_SYNC = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced")
LAST_QUEUED = Gauge(
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "The last time a sync of proxy rules was queued")
IPTABLES_TOTAL = Gauge(
    "kubeproxy_sync_proxy_rules_iptables_total",
    "Total number of iptables rules owned by kube-proxy", ["table"])
IPTABLES_PARTIAL_RESTORE_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
    "Cumulative proxy iptables partial restore failures")
IPTABLES_RESTORE_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    "Cumulative proxy iptables restore failures")
NFTABLES_SYNC_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    "Cumulative proxy nftables sync failures")
ENDPOINT_CHANGES_PENDING = Gauge(
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes")
ENDPOINT_CHANGES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes")
SERVICE_CHANGES_PENDING = Gauge(
    "kubeproxy_sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes")
SERVICE_CHANGES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes")
NO_LOCAL_ENDPOINTS = Gauge(
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    "Number of services with a Local traffic policy and no endpoints", ["traffic_policy"])
HEALTHZ = Counter("kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status",
                  ["code"])
LIVEZ = Counter("kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"])
CONNTRACK_DELETED = Counter(
    "svcnet_proxy_conntrack_entries_deleted_total",
    "Stale UDP conntrack entries deleted after endpoints went away")
IGNORED_ADDRESSES = Counter(
    "svcnet_proxy_ignored_service_addresses_total",
    "Service addresses not programmed because they fall outside --service-cluster-ip-range "
    "or --proxy-external-ip-cidrs (counted once per service and address)", ["kind"])
