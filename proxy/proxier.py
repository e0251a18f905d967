"""The sync loop: watch events -> change tracker -> one backend transaction per sync.

kube-proxy's timing (its BoundedFrequencyRunner): a change syncs at once while the sync
budget allows (``burst_syncs`` back to back, refilled at one per ``min_sync_period``);
beyond it changes coalesce into one sync when a token is back. Only syncs that reach the
backend spend the budget. Every ``sync_period`` the loop checks that the rules are still in
place (canary chain / table) and a full sync runs at start, after any failure, when the
rules went missing, and every ``full_sync_period``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from svcnet.proxy import drift, metrics
from svcnet.proxy.backend import ProxyBackend
from svcnet.proxy.conntrack import ConntrackTable, stale_flows
from svcnet.proxy.health import HealthCheck, NodePortHealthServers, SyncHealth
from svcnet.proxy.state import (
    Changes,
    ChangeTracker,
    Drain,
    FrontendKind,
    NodeConfig,
    ServicePortState,
)

from svcnet.model import ENDPOINT_SLICE, SERVICE, EndpointSlice, Service
from svcnet.watch import Callbacks, InformerFactory

log = logging.getLogger(__name__)

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


@dataclass(frozen=True, slots=True)
class SyncSettings:
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    full_sync_period: float = 3600.0
    retry_delay: float = 1.0
    burst_syncs: int = 2  # kube-proxy's burstSyncs

    @property
    def health_timeout(self) -> float:
        return 2 * self.sync_period


class SyncBudget:
    """A token bucket holding ``burst`` syncs, refilled at one per ``min_interval``
    (kube-proxy's BoundedFrequencyRunner). The caller passes the clock's time, so the
    bucket is plain arithmetic; ``take`` only for a sync that reached the backend -- a
    periodic check that found nothing to do must not delay the next change."""

    def __init__(self, min_interval: float, burst: int) -> None:
        self.min_interval = min_interval
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._stamp: float | None = None

    def delay(self, now: float) -> float:
        """Seconds until a sync may run (0: now)."""
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) * self.min_interval

    def take(self, now: float) -> None:
        self._refill(now)
        self._tokens = max(0.0, self._tokens - 1)

    def _refill(self, now: float) -> None:
        if self.min_interval <= 0:
            self._tokens = float(self.burst)
        elif self._stamp is not None:
            self._tokens = min(float(self.burst),
                               self._tokens + (now - self._stamp) / self.min_interval)
        self._stamp = now


@dataclass(slots=True)
class SyncStats:
    syncs: int = 0
    full_syncs: int = 0
    failures: int = 0
    last_duration: float = 0.0
    history: list[tuple[float, bool]] = field(default_factory=list)


class Proxier:
    def __init__(
        self, backend: ProxyBackend, node: NodeConfig, *,
        settings: SyncSettings = SyncSettings(),
        conntrack: ConntrackTable | None = None,
        health_check_servers: NodePortHealthServers | None = None,
        node_refresh: Callable[[], NodeConfig] | None = None,
        drift_check: bool = False,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.tracker = ChangeTracker(node, on_ignored=_log_ignored)
        self.conntrack = conntrack
        self.hc_servers = health_check_servers
        self.node_refresh = node_refresh
        self.health = SyncHealth(settings.health_timeout)
        self.stats = SyncStats()
        self.synced = asyncio.Event()
        self.drift_check = drift_check  # snapshot after each sync; /status compares with it
        self.applied: frozenset[str] | None = None  # kernel snapshot after the last sync
        self._wake = asyncio.Event()
        self._applying = False  # a sync is changing the kernel (read by the /status thread)
        self._generation = 0  # syncs that started changing the kernel
        self._need_full = True
        self._budget = SyncBudget(settings.min_sync_period, settings.burst_syncs)
        self._last_full = -1e9
        self._trigger_times: list[float] = []
        self._services: Callable[[str], Service | None] = lambda key: None
        self._slices: Callable[[str], list[EndpointSlice]] = lambda key: []
        self._service_keys: Callable[[], list[str]] = list

    # --- event intake ----------------------------------------------------------------------

    def on_service(self, old: Service | None, new: Service | None) -> None:
        if old is not None and new is not None and old == new:
            return
        self.tracker.service_changed(old, new)
        metrics.SERVICE_CHANGES_TOTAL.inc()
        self._queued()

    def on_slice(self, old: EndpointSlice | None, new: EndpointSlice | None) -> None:
        if old is not None and new is not None and old == new:
            return
        self.tracker.slice_changed(old, new)
        metrics.ENDPOINT_CHANGES_TOTAL.inc()
        if new is not None:
            stamp = new.metadata.annotations.get(TRIGGER_TIME_ANNOTATION)
            if stamp:
                with contextlib.suppress(ValueError):
                    self._trigger_times.append(
                        datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        self._queued()

    def _queued(self) -> None:
        self.health.queued()
        metrics.LAST_QUEUED.set(time.time())
        self._wake.set()

    # --- running -----------------------------------------------------------------------------

    def attach(self, factory: InformerFactory) -> None:
        """Read Services and EndpointSlices from the factory's shared informers."""
        services = factory.informer(SERVICE)
        slices = factory.informer(ENDPOINT_SLICE)
        self._services = services.cache.get
        self._slices = lambda key: slices.cache.by_index("service", key)
        self._service_keys = services.cache.keys_snapshot
        services.add_handler(Callbacks(self.on_service))
        slices.add_handler(Callbacks(self.on_slice))

    async def run(self, factory: InformerFactory) -> None:
        self.attach(factory)
        services = factory.informer(SERVICE)
        slices = factory.informer(ENDPOINT_SLICE)
        services.start()
        slices.start()
        await services.synced.wait()
        await slices.synced.wait()
        try:
            await self.loop()
        finally:
            if self.hc_servers is not None:
                await self.hc_servers.stop()

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_periodic = loop.time() + self.settings.sync_period
        self._wake.set()
        while True:
            timeout = max(0.0, next_periodic - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            periodic = loop.time() >= next_periodic
            if periodic:
                next_periodic = loop.time() + self.settings.sync_period
            wait = self._budget.delay(loop.time())
            if wait > 0:
                await asyncio.sleep(wait)
            self._wake.clear()
            ok = await self.sync_once(check_rules=periodic)
            if not ok:
                await asyncio.sleep(self.settings.retry_delay)
                self._wake.set()

    async def sync_once(self, *, check_rules: bool = False) -> bool:
        """One sync; returns False if the backend failed (the next one will be full)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        full = self._need_full or now - self._last_full >= self.settings.full_sync_period
        if self.node_refresh is not None and (full or check_rules):
            self.tracker.set_node(await asyncio.to_thread(self.node_refresh))
        if check_rules and not full and not await asyncio.to_thread(self.backend.healthy):
            log.warning("proxy rules missing (canary gone); doing a full sync")
            full = True
        if (check_rules and not full and self.drift_check
                and await asyncio.to_thread(self._drifted)):
            log.warning("proxy rules differ from the last applied ones; doing a full sync")
            full = True
        drain = self.tracker.start_drain(self._services, self._slices, self._service_keys)
        metrics.SERVICE_CHANGES_PENDING.set(0)
        metrics.ENDPOINT_CHANGES_PENDING.set(0)
        stream: Callable[[Iterable[ServicePortState]], None] | None = (
            self.backend.sync_full if full else None)
        started = time.monotonic()
        self._applying = True
        self._generation += 1
        try:
            return await self._apply(drain, stream, full, now, started)
        finally:
            self._applying = False

    async def _apply(self, drain: Drain,
                     stream: Callable[[Iterable[ServicePortState]], None] | None,
                     full: bool, now: float, started: float) -> bool:
        changes: Changes | None = None
        if stream is None:
            # Partial syncs compute the (small) model here; a full one in the worker thread.
            changes = drain.finish() if not full else await asyncio.to_thread(drain.finish)
            if not changes and not full:
                self.health.updated()
                return True
        self._budget.take(asyncio.get_running_loop().time())
        try:
            if stream is not None:
                # The backend renders and loads ports while the model is being computed.
                await asyncio.to_thread(_streamed, stream, drain)
            else:
                assert changes is not None
                await asyncio.to_thread(self.backend.sync, changes, full=full)
        except Exception:
            log.exception("%s sync failed (full=%s)", self.backend.name, full)
            self.stats.failures += 1
            self._need_full = True
            self.backend.record_failure(full=full)
            return False
        elapsed = time.monotonic() - started
        changes = drain.finish()
        self._need_full = False
        if self.drift_check:
            await asyncio.to_thread(self._record_applied)
        if full:
            self._last_full = now
        self._observe(changes, full, elapsed)
        await self._after_sync(changes)
        return True

    def request_full_sync(self) -> None:
        """Make the next sync a full one (as after a failure)."""
        self._need_full = True
        self._wake.set()

    def _record_applied(self) -> None:
        try:
            self.applied = drift.snapshot(self.backend)
        except Exception:
            log.exception("cannot snapshot the applied rules for the drift check")
            self.applied = None

    def _drifted(self) -> bool:
        if self.applied is None:
            return False
        return drift.status(self.backend, self.applied)["in_sync"] is False

    def status(self) -> dict[str, object]:
        """Kernel vs last applied rules, for ``GET /status`` and ``svcnet proxy status``.

        Runs in a worker thread while syncs go on, never holding them up: a dump during a
        sync is compared with the snapshots before and after it; one that saw several
        syncs is taken again (a few times).
        """
        def settled() -> frozenset[str] | None:
            deadline = time.monotonic() + 30
            while self._applying and time.monotonic() < deadline:
                time.sleep(0.02)
            return self.applied

        body: dict[str, object] = {}
        for _ in range(3):
            applied, generation, busy = self.applied, self._generation, self._applying
            body = drift.status(self.backend, applied, settled)
            # Covered: the kernel before and after at most one sync.
            if self._generation - generation <= (0 if busy else 1):
                break
        return body

    def _observe(self, changes: Changes, full: bool, elapsed: float) -> None:
        self.stats.syncs += 1
        self.stats.full_syncs += int(full)
        self.stats.last_duration = elapsed
        self.stats.history = [*self.stats.history[-99:], (elapsed, full)]
        metrics.SYNC_DURATION.observe(elapsed)
        (metrics.SYNC_FULL_DURATION if full else metrics.SYNC_PARTIAL_DURATION).observe(elapsed)
        metrics.LAST_SYNC.set(time.time())
        wall = time.time()
        for stamp in self._trigger_times:
            metrics.NETWORK_PROGRAMMING.observe(max(0.0, wall - stamp))
        self._trigger_times.clear()
        for table, count in self.backend.rules_total().items():
            metrics.IPTABLES_TOTAL.labels(table).set(count)
        internal = sum(1 for p in changes.state.values()
                       if p.internal_local and p.has_endpoints and not p.local_endpoints)
        external = sum(1 for p in changes.state.values()
                       if p.external_local and p.has_endpoints and not p.local_endpoints)
        metrics.NO_LOCAL_ENDPOINTS.labels("internal").set(internal)
        metrics.NO_LOCAL_ENDPOINTS.labels("external").set(external)
        self.health.updated()
        self.synced.set()

    async def _after_sync(self, changes: Changes) -> None:
        if self.conntrack is not None:
            flows = stale_flows(changes)
            if flows:
                try:
                    deleted = await asyncio.to_thread(self.conntrack.delete, flows)
                    metrics.CONNTRACK_DELETED.inc(deleted)
                except Exception:
                    log.exception("deleting stale conntrack entries failed")
        if self.hc_servers is not None:
            wanted: dict[int, HealthCheck] = {}
            for p in changes.state.values():
                if p.health_check_node_port:
                    prev = wanted.get(p.health_check_node_port)
                    count = max(p.local_ready_count, prev.local_endpoints if prev else 0)
                    wanted[p.health_check_node_port] = HealthCheck(
                        p.key.namespace, p.key.name, p.health_check_node_port, count)
            await self.hc_servers.reconcile(wanted)


def _log_ignored(service: str, addresses: list[tuple[FrontendKind, str]]) -> None:
    """A service claiming an address outside the allowed ranges: refused, said, counted."""
    for kind, _ip in addresses:
        metrics.IGNORED_ADDRESSES.labels(kind.value).inc()
    log.warning("service %s: not programming %s (outside the allowed ranges: see "
                "--service-cluster-ip-range, --proxy-external-ip-cidrs)", service,
                ", ".join(f"{kind.value} {ip}" for kind, ip in addresses))


def _streamed(sync_full: Callable[[Iterable[ServicePortState]], None], drain: Drain) -> None:
    """A full sync fed by the drain as it computes; the drain is completed even on failure."""
    try:
        sync_full(drain.ports())
    finally:
        drain.finish()
