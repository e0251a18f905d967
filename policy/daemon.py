"""NetworkPolicy enforcement as a node component (``svcnet node --policy``).

Watches Pods, Namespaces and NetworkPolicies through the node's shared informers, computes
the desired state for this node's pods and programs table ``inet svcnet-policy``: one
``nft`` transaction per sync, incremental (only changed chains and elements) after a full
first sync, after any failure and every ``--policy-full-sync-period``. A policy the API
would have refused never reaches us: the informer rejects it at decode (logged, counted in
``svcnet_watch_rejected_objects_total``) and keeps its last good version, so nothing already
enforced is torn down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from svcnet.store.base import Store
from svcnet.watch import InformerFactory

if TYPE_CHECKING:
    from svcnet.policy.nflog import Logged
    from svcnet.policy.nftables import Rendered
    from svcnet.policy.state import PolicyState
    from svcnet.proxy.commands import Commands

log = logging.getLogger(__name__)


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (NetworkPolicy enforcement)")
    g.add_argument("--policy-node-name",
                   default=os.environ.get("NODE_NAME", socket.gethostname()),
                   help="enforce for the pods scheduled on this node")
    g.add_argument("--policy-netns", default=None,
                   help="program this named network namespace instead of our own")
    g.add_argument("--policy-log", action="store_true",
                   help="log denied connections (rate-limited, 10/s per group of pods) with "
                        "the pod pair, port and isolating policies")
    g.add_argument("--policy-log-file", default="",
                   help="append those lines to this file (default: the daemon's log)")
    g.add_argument("--policy-log-group", type=int, default=1717,
                   help="NFLOG group the table logs denied packets to")
    g.add_argument("--policy-min-sync-period", type=float, default=0.05,
                   help="at most one sync per this many seconds (a burst of changes is "
                        "gathered; a change after a quiet spell syncs at once)")
    g.add_argument("--policy-full-sync-period", type=float, default=3600.0)
    g.add_argument("--policy-metrics-bind-address", default="127.0.0.1:10263",
                   help="host:port serving /metrics, /healthz ('' = off)")


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    node_name: str
    netns: str | None = None
    log_denied: bool = False
    log_file: str = ""
    log_group: int = 1717
    min_sync_period: float = 0.05
    full_sync_period: float = 3600.0
    retry_delay: float = 1.0
    metrics: str = ""

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> PolicyOptions:
        return cls(node_name=a.policy_node_name, netns=a.policy_netns, log_denied=a.policy_log,
                   log_file=a.policy_log_file, log_group=a.policy_log_group,
                   min_sync_period=a.policy_min_sync_period,
                   full_sync_period=a.policy_full_sync_period,
                   metrics=a.policy_metrics_bind_address)


class PolicyEnforcer:
    """The sync loop: informer events wake it, it computes, renders and applies."""

    def __init__(self, opts: PolicyOptions, commands: Commands) -> None:
        from svcnet.policy.nftables import ElementCache, Rendered
        from svcnet.policy.state import Memo

        self.opts = opts
        self.commands = commands
        self.applied: Rendered | None = None
        self.state: PolicyState | None = None
        self.syncs = 0
        self.full_syncs = 0
        self.synced = asyncio.Event()
        self._wake = asyncio.Event()
        self._need_full = True
        self._last_full = -1e9
        self._sources: tuple[Any, Any, Any] | None = None
        self._empty = Rendered()
        self._elements = ElementCache()
        self._memo = Memo()

    def attach(self, factory: InformerFactory) -> None:
        from svcnet.model import NAMESPACE, NETWORK_POLICY, POD
        from svcnet.watch import Callbacks

        informers = (factory.informer(NETWORK_POLICY), factory.informer(POD),
                     factory.informer(NAMESPACE))
        for inf in informers:
            inf.add_handler(Callbacks(self._changed))
        self._sources = informers

    def _changed(self, old: Any, new: Any) -> None:
        from svcnet.policy.state import policy_view

        from svcnet.model import Pod

        if old is not None and new is not None and (old == new or (
                isinstance(old, Pod) and isinstance(new, Pod)
                and policy_view(old) == policy_view(new))):
            return  # e.g. a pod's readiness changed: nothing to enforce differently
        self._wake.set()

    async def run(self, factory: InformerFactory) -> None:
        self.attach(factory)
        assert self._sources is not None
        for inf in self._sources:
            inf.start()
        for inf in self._sources:
            await inf.synced.wait()
        await self.loop()

    async def loop(self) -> None:
        """At most one sync per ``min_sync_period``, as kube-proxy's minSyncPeriod: a change
        after a quiet spell is applied at once, a burst is gathered until the period since
        the last sync has passed."""
        self._wake.set()
        last = -1e9
        while True:
            await self._wake.wait()
            # sleep(0) still lets the events already queued (one watch batch) arrive first
            await asyncio.sleep(max(0.0, last + self.opts.min_sync_period - time.monotonic()))
            self._wake.clear()
            last = time.monotonic()
            if not await self.sync_once():
                await asyncio.sleep(self.opts.retry_delay)
                self._wake.set()

    def snapshot(self) -> tuple[list[Any], list[Any], list[Any]]:
        """The informers' objects, taken on the event loop (which alone changes them)."""
        assert self._sources is not None
        policies, pods, namespaces = (inf.cache.values() for inf in self._sources)
        return policies, pods, namespaces

    def desired(self, objects: tuple[list[Any], list[Any], list[Any]]) -> PolicyState:
        from svcnet.policy.state import compute

        return compute(*objects, node_name=self.opts.node_name, memo=self._memo)

    async def sync_once(self) -> bool:
        from svcnet.policy import metrics
        from svcnet.policy.state import Memo

        now = time.monotonic()
        full = (self._need_full or now - self._last_full >= self.opts.full_sync_period
                or self.applied is None or not self._memo.started)
        try:
            await asyncio.to_thread(self._sync if full else self._sync_changes,
                                    self.snapshot())
        except Exception:
            log.exception("policy sync failed (full=%s); the next one is full", full)
            metrics.SYNC_FAILURES.inc()
            self._need_full = True
            self._memo = Memo()  # whatever failed, the next sync starts from nothing
            self._elements.clear()
            return False
        elapsed = time.monotonic() - now
        metrics.SYNC_DURATION.labels(str(full).lower()).observe(elapsed)
        metrics.LAST_SYNC.set(time.time())
        self._need_full = False
        if full:
            self._last_full = now
            self.full_syncs += 1
        self.syncs += 1
        self.synced.set()
        return True

    def _sync_changes(self, objects: tuple[list[Any], list[Any], list[Any]]) -> None:
        """An incremental sync: the objects that are not the very ones of the last sync
        (found by identity, ~1 ms at 10k pods) and their reach are computed again; only
        the changed chains and elements are sent."""
        from svcnet.policy.nftables import render, update_script

        state = self.desired(objects)
        new = render(state, log=self.opts.log_denied, cache=self._elements,
                     log_group=self.opts.log_group)
        assert self.applied is not None
        script = update_script(self.applied, new)
        if script:
            apply_script(self.commands, [script])
        self._applied(new, state)

    def _applied(self, new: Rendered, state: PolicyState) -> None:
        from svcnet.policy import metrics

        self.applied, self.state = new, state
        metrics.ISOLATED.labels("ingress").set(len(state.ingress))
        metrics.ISOLATED.labels("egress").set(len(state.egress))
        metrics.POLICIES.set(len(state.policies))

    def _sync(self, objects: tuple[list[Any], list[Any], list[Any]]) -> None:
        """A full sync: the table replaced in one transaction, written while the state is
        computed. A periodic one is for the kernel's sake: the computation's caches stay
        valid (they depend on the objects only), so it costs little more than nft itself."""
        from svcnet.policy.nftables import stream_full_computing
        from svcnet.policy.state import compute_stream, gc_paused

        states: list[PolicyState] = []
        out: list[Rendered] = []
        groups = compute_stream(*objects, node_name=self.opts.node_name, memo=self._memo,
                                out=states)
        with gc_paused(long_lived=True):
            apply_script(self.commands, stream_full_computing(
                groups, states, out, log=self.opts.log_denied, cache=self._elements,
                log_group=self.opts.log_group))
        self._applied(out[0], states[0])

    def layout(self) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
        r = self.applied or self._empty
        return dict(r.policies), dict(r.groups)

    def describe(self, record: Logged) -> str:
        """One denied packet as a line naming the pods, the port and the policies."""
        from svcnet.policy.nftables import LOG_PREFIX

        state, applied = self.state, self.applied or self._empty
        pods = state.pods if state is not None else {}
        direction, _, group = record.prefix.removeprefix(LOG_PREFIX).strip(": ").partition(" ")
        isolated = record.dst if direction == "ingress" else record.src
        src = f"{pods.get(record.src, 'outside')} ({record.src})"
        dst = f"{pods.get(record.dst, 'outside')} ({record.dst})"
        port = f"{record.port}/{record.protocol}" if record.port else record.protocol
        return (f"deny {direction or '?'}: {src} -> {dst} port {port}; "
                f"{pods.get(isolated, isolated)} isolated by "
                f"{', '.join(applied.groups.get(group, ())) or group}")

    def log_denied(self, stop: threading.Event) -> None:
        """Read the NFLOG group until ``stop``; a line per denied packet (worker thread)."""
        from svcnet.policy.nflog import NflogSocket

        try:
            sock = NflogSocket(self.opts.log_group, self.opts.netns)
        except OSError as err:  # enforcement goes on without the log
            log.error("cannot read NFLOG group %d: denied connections are not logged: %s",
                      self.opts.log_group, err)
            return
        out = open(self.opts.log_file, "a", buffering=1) if self.opts.log_file else None  # noqa: SIM115
        try:
            for record in sock.records(stop):
                line = self.describe(record)
                if out is not None:
                    out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {line}\n")
                else:
                    log.warning("%s", line)
        finally:
            sock.close()
            if out is not None:
                out.close()

    def read_counters(self) -> str:
        from svcnet.policy.nftables import T

        return self.commands.run(["nft", "-j", "list", "counters", "table", *T.split()])


def apply_script(commands: Commands, chunks: Any) -> None:
    """One sealed ``nft -f`` transaction (see svcnet.proxy.sealed_input)."""
    from svcnet.proxy.sealed_input import NFT_SEAL

    commands.stream(["nft", "-f", "/proc/self/fd/0"], chunks, seal=NFT_SEAL)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class PolicyComponent:
    name = "policy"

    def __init__(self, opts: PolicyOptions) -> None:
        self.opts = opts

    async def run(self, factory: InformerFactory, store: Store) -> None:
        from prometheus_client import REGISTRY
        from svcnet.policy.metrics import PacketCounters
        from svcnet.proxy.commands import SubprocessCommands

        from svcnet.httpserve import HTTPServer, Response, metrics_route

        enforcer = PolicyEnforcer(self.opts, SubprocessCommands(self.opts.netns))
        collector = PacketCounters(enforcer.read_counters, enforcer.layout)
        REGISTRY.register(collector)
        server = None
        if self.opts.metrics:
            async def page() -> Response:
                return await asyncio.to_thread(metrics_route)

            def healthz() -> Response:
                return Response(200 if enforcer.synced.is_set() else 503, b"ok\n")

            server = HTTPServer({"/metrics": page, "/healthz": healthz},
                                *_host_port(self.opts.metrics))
            await server.start()
        log.info("policy enforcement running for node %s", self.opts.node_name)
        stop = threading.Event()
        logger = None
        if self.opts.log_denied:
            logger = asyncio.create_task(asyncio.to_thread(enforcer.log_denied, stop),
                                         name="policy-log")
        try:
            await enforcer.run(factory)
        finally:
            stop.set()
            if logger is not None:
                await asyncio.gather(logger, return_exceptions=True)
            REGISTRY.unregister(collector)
            if server is not None:
                await server.stop()


def node_component(args: argparse.Namespace) -> PolicyComponent:
    return PolicyComponent(PolicyOptions.from_args(args))


def cleanup(netns: str | None) -> list[str]:
    """Remove the policy table; the errors, if any, as text."""
    from svcnet.policy.nftables import delete_script
    from svcnet.proxy.commands import SubprocessCommands

    try:
        SubprocessCommands(netns).run(["nft", "-f", "-"], input=delete_script())
    except Exception as err:  # the other components' cleanup goes on
        return [f"cannot remove table inet svcnet-policy: {err}"]
    return []
