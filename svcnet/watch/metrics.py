"""Prometheus metrics of the watch client, shared by every informer in the process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

EVENTS = Counter(
    "svcnet_watch_events_total", "Watch events applied to the cache.", ["kind", "type"]
)
RELISTS = Counter(
    "svcnet_watch_relists_total", "Full lists, by reason (initial, expired, error).",
    ["kind", "reason"],
)
RESTARTS = Counter(
    "svcnet_watch_restarts_total", "Watch streams re-opened after an error or timeout.",
    ["kind", "reason"],
)
REJECTED = Counter(
    "svcnet_watch_rejected_objects_total",
    "Objects that failed to decode; the last good version is kept.", ["kind"],
)
LAST_EVENT = Gauge(
    "svcnet_watch_last_event_timestamp_seconds",
    "Unix time the last event (or bookmark) of this kind arrived; lag = now - this.", ["kind"],
)
CACHED = Gauge("svcnet_watch_cached_objects", "Objects in the informer cache.", ["kind"])
HANDLER_ERRORS = Counter(
    "svcnet_watch_handler_errors_total",
    "Handler calls that raised; that object is skipped for that handler, the rest carry on.",
    ["kind", "handler"],
)
INFORMER_FAILURES = Counter(
    "svcnet_watch_informer_failures_total",
    "Informer tasks that ended with an exception (readiness turns false).", ["kind"],
)
