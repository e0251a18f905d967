"""The overlay part of ``svcnet node --overlay``: lease a subnet, program the datapath, keep it.

Start-up order matters to the CNI plugin, which reads ``subnet.env``: acquire the lease,
reconcile the kernel, and only then write ``subnet.env`` (atomically). After that one loop
turns every wake-up -- a lease snapshot, a link event, the periodic resync -- into "compute
desired, reconcile"; bursts of events coalesce into one sync.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svcnet.cni.overlay.config import BACKENDS, IPNetwork, NetworkConfig, parse_network_config

from svcnet.store.etcd_config import NO_CREDENTIALS, EtcdCredentials

if TYPE_CHECKING:
    from svcnet.cni.overlay.desired import Desired, Underlay
    from svcnet.cni.overlay.firewall import Firewall
    from svcnet.cni.overlay.lease import Lease, Snapshot, SubnetManager
    from svcnet.cni.overlay.netlink import Netlink
    from svcnet.cni.overlay.reconcile import SyncResult

    from svcnet.store.base import Store
    from svcnet.watch import InformerFactory

log = logging.getLogger(__name__)

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_LISTEN = "127.0.0.1:9475"


@dataclass(frozen=True, slots=True)
class OverlayOptions:
    node_name: str
    config_file: str = ""
    backend: str = ""
    iface: str = ""
    public_ip: str = ""
    public_ip6: str = ""
    subnet_manager: str = "auto"
    store_url: str = "memory"
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/coreos.com/network"
    etcd_credentials: EtcdCredentials = NO_CREDENTIALS  # from --store and --etcd-*
    lease_ttl: int = 86400
    subnet_file: str = DEFAULT_SUBNET_FILE
    ip_masq: bool = True
    masq_backend: str = "auto"
    vxlan_notrack: bool = True
    resync: float = 10.0
    listen: str = DEFAULT_LISTEN
    netns: str = ""
    watch_links: bool = True
    flannel_subnet_file: str = "/run/flannel/subnet.env"
    cleanup_flannel: bool = True


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("overlay (--overlay)")
    g.add_argument("--overlay-config", default="", metavar="FILE",
                   help="Flannel net-conf.json; default: read <prefix>/config from etcd")
    g.add_argument("--overlay-backend", default="", choices=["", *BACKENDS],
                   help="override Backend.Type of the network config")
    g.add_argument("--overlay-iface", default="", help="underlay interface (default: the "
                   "default route's)")
    g.add_argument("--overlay-public-ip", default="", help="address peers send to "
                   "(default: the underlay interface's first)")
    g.add_argument("--overlay-public-ipv6", default="")
    g.add_argument("--overlay-node-name", default="",
                   help="this node's name (default: $NODE_NAME or the host name)")
    g.add_argument("--overlay-subnet-manager", default="auto",
                   choices=["auto", "etcd", "kube", "memory"],
                   help="where leases live; auto: etcd for an etcd:// store, else kube")
    g.add_argument("--overlay-etcd-endpoints", default="",
                   help="host:port[,...] for leases (default: the --store etcd endpoints)")
    g.add_argument("--overlay-etcd-prefix", default="/coreos.com/network")
    g.add_argument("--overlay-lease-ttl", type=int, default=86400, metavar="SECONDS")
    g.add_argument("--overlay-subnet-file", default=DEFAULT_SUBNET_FILE)
    g.add_argument("--overlay-ip-masq", action=argparse.BooleanOptionalAction, default=True,
                   help="masquerade pod traffic leaving the cluster network")
    g.add_argument("--overlay-masq-backend", default="auto",
                   choices=["auto", "iptables", "nftables"],
                   help="how to program the masquerade/FORWARD/notrack rules; auto: what the "
                   "host uses (our own rules, then other iptables rules, then native nftables "
                   "tables; else iptables)")
    g.add_argument("--overlay-vxlan-notrack", action=argparse.BooleanOptionalAction,
                   default=True, help="exempt this node's VXLAN packets from conntrack (and "
                   "so from NAT)")
    g.add_argument("--overlay-resync", type=float, default=10.0, metavar="SECONDS",
                   help="periodic full reconcile")
    g.add_argument("--overlay-listen", default=DEFAULT_LISTEN,
                   help="host:port for /healthz, /metrics and /status ('' = off)")
    g.add_argument("--overlay-netns", default="", help=argparse.SUPPRESS)
    g.add_argument("--overlay-flannel-subnet-file", default="/run/flannel/subnet.env",
                   help="Flannel's lease, our previous subnet when we have no subnet file yet")
    g.add_argument("--overlay-cleanup-flannel", action=argparse.BooleanOptionalAction,
                   default=True, help="after our first reconcile, remove Flannel's "
                   "FLANNEL-POSTRTG/FLANNEL-FWD chains and flannel-ipv4/6 nftables tables")


def options_from_args(args: argparse.Namespace) -> OverlayOptions:
    from svcnet.store.base import Invalid
    from svcnet.store.open import etcd_credentials_from_args, etcd_target_from_args

    endpoints = tuple(e for e in args.overlay_etcd_endpoints.split(",") if e)
    store_url = getattr(args, "store", "memory")
    try:
        target = etcd_target_from_args(args)
        credentials = target.credentials if target else etcd_credentials_from_args(args)
    except Invalid as err:
        from svcnet.cli import UsageError

        raise UsageError(str(err)) from None
    if not endpoints and target is not None:
        endpoints = target.endpoints
    return OverlayOptions(
        node_name=args.overlay_node_name or os.environ.get("NODE_NAME") or socket.gethostname(),
        config_file=args.overlay_config, backend=args.overlay_backend, iface=args.overlay_iface,
        public_ip=args.overlay_public_ip, public_ip6=args.overlay_public_ipv6,
        subnet_manager=args.overlay_subnet_manager, store_url=store_url,
        etcd_endpoints=endpoints, etcd_prefix=args.overlay_etcd_prefix,
        etcd_credentials=credentials,
        lease_ttl=args.overlay_lease_ttl, subnet_file=args.overlay_subnet_file,
        ip_masq=args.overlay_ip_masq, masq_backend=args.overlay_masq_backend,
        vxlan_notrack=args.overlay_vxlan_notrack, resync=args.overlay_resync,
        listen=args.overlay_listen,
        netns=args.overlay_netns,
        flannel_subnet_file=getattr(args, "overlay_flannel_subnet_file", ""),
        cleanup_flannel=getattr(args, "overlay_cleanup_flannel", True),
    )


def node_component(args: argparse.Namespace) -> OverlayDaemon:
    """The overlay component; bad flags or an unreadable config file are usage errors."""
    from svcnet.cli import UsageError

    options = options_from_args(args)
    if options.config_file:
        try:
            parse_network_config(Path(options.config_file).read_bytes())
        except (OSError, ValueError) as err:
            raise UsageError(f"--overlay-config {options.config_file}: {err}") from None
    manager = options.subnet_manager
    if manager == "etcd" and not options.etcd_endpoints:
        raise UsageError("--overlay-subnet-manager etcd needs --store etcd://... or "
                         "--overlay-etcd-endpoints")
    memory = manager == "memory" or (manager == "auto" and options.store_url == "memory")
    if memory and not options.config_file:
        raise UsageError("the memory subnet manager needs --overlay-config FILE")
    return OverlayDaemon(options)


# --- subnet.env ----------------------------------------------------------------------------


def subnet_env(config: NetworkConfig, lease: Lease, mtu: int, ip_masq: bool) -> str:
    """Flannel's ``subnet.env``: the subnet is written as its first host address (the bridge
    gateway), which is what the CNI plugin's ``subnetFile`` expects."""
    lines = []
    if config.ipv4 and lease.subnet:
        lines += [f"FLANNEL_NETWORK={config.ipv4.network}",
                  f"FLANNEL_SUBNET={lease.subnet.network_address + 1}/{lease.subnet.prefixlen}"]
    if config.ipv6 and lease.subnet6:
        lines += [f"FLANNEL_IPV6_NETWORK={config.ipv6.network}",
                  f"FLANNEL_IPV6_SUBNET={lease.subnet6.network_address + 1}/"
                  f"{lease.subnet6.prefixlen}"]
    lines += [f"FLANNEL_MTU={mtu}", f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}"]
    return "\n".join(lines) + "\n"


def write_atomically(path: str, text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def previous_subnets(path: str) -> tuple[IPNetwork, ...]:
    """Our subnets before a restart, from the ``subnet.env`` we wrote then."""
    try:
        text = Path(path).read_text()
    except OSError:
        return ()
    found: list[IPNetwork] = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"):
            with contextlib.suppress(ValueError):
                found.append(ipaddress.ip_network(value.strip(), strict=False))
    return tuple(found)


# --- the daemon -----------------------------------------------------------------------------


@dataclass
class Status:
    node: str = ""
    ready: bool = False
    firewall: str = ""
    lease: dict[str, Any] = field(default_factory=dict)
    peers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    desired: dict[str, Any] = field(default_factory=dict)
    last_sync: float = 0.0
    last_sync_seconds: float = 0.0
    last_errors: list[str] = field(default_factory=list)
    syncs: int = 0


class OverlayDaemon:
    name = "overlay"

    def __init__(self, options: OverlayOptions, *, netlink: Netlink | None = None,
                 firewall: Firewall | None = None, manager: SubnetManager | None = None
                 ) -> None:
        self.options = options
        self._netlink = netlink
        self._firewall = firewall
        self._manager = manager
        self.status = Status(node=options.node_name)
        self.ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._full = True
        self._snapshot: Snapshot = ()
        self._last_desired: Desired | None = None
        self._env_written = ""
        self._lease: Lease | None = None
        self._adopted_macs: dict[int, str] = {}

    # -- wiring --

    def _build_manager(self, store: Store, factory: InformerFactory | None,
                       config: NetworkConfig | None) -> SubnetManager:
        from svcnet.cni.overlay import lease as leases

        kind = self.options.subnet_manager
        if kind == "auto":
            kind = "etcd" if self.options.etcd_endpoints else (
                "memory" if self.options.store_url == "memory" else "kube")
        if kind == "etcd":
            from svcnet.store.etcd import EtcdClient

            if not self.options.etcd_endpoints:
                from svcnet.cli import UsageError

                raise UsageError("--overlay-subnet-manager etcd needs --store etcd://... or "
                                 "--overlay-etcd-endpoints")
            return leases.EtcdSubnetManager(
                EtcdClient(list(self.options.etcd_endpoints),
                           credentials=self.options.etcd_credentials),
                prefix=self.options.etcd_prefix,
                ttl=self.options.lease_ttl, config=config)
        if kind == "kube":
            from svcnet.model import NODE
            from svcnet.watch import InformerFactory

            informer = (factory or InformerFactory(store)).informer(NODE)
            return leases.KubeSubnetManager(store, informer, self.options.node_name, config)
        return leases.MemorySubnetManager(leases.MemoryLeaseRegistry(config))

    async def run(self, factory: InformerFactory | None, store: Store | None) -> None:
        from svcnet.cni.overlay.netlink import IpCommandNetlink
        from svcnet.cni.overlay.reconcile import Reconciler

        opts = self.options
        netns = opts.netns or None
        netlink = self._netlink or IpCommandNetlink(netns)
        firewall = self._firewall or await self._choose_firewall(netns)
        self.status.firewall = firewall.name
        file_config = (parse_network_config(Path(opts.config_file).read_bytes())
                       if opts.config_file else None)
        if self._manager is None:
            from svcnet.store.memory import MemoryStore

            self._manager = self._build_manager(store or MemoryStore(), factory, file_config)
        manager = self._manager
        config = file_config or await self._network_config(manager)
        if opts.backend:
            config = replace(config, backend=replace(config.backend, type=opts.backend))
        metrics = _Metrics.get()
        server = await self._serve()
        try:
            underlay = await netlink.underlay(opts.iface or None)
            if config.backend.type == "vxlan":
                from svcnet.cni.overlay.migrate import adoptable_macs

                self._adopted_macs = await adoptable_macs(
                    netlink, config.backend.vni, config.backend.port,
                    tuple(f for f, net in ((4, config.ipv4), (6, config.ipv6)) if net))
                for family, mac in self._adopted_macs.items():
                    log.info("adopting the existing IPv%d VXLAN device, MAC %s", family, mac)
            lease = await self._acquire(manager, config, underlay)
            self._lease = lease
            log.info("node %s leased %s", opts.node_name,
                     ", ".join(str(s) for s in lease.subnets))
            reconciler = Reconciler(netlink, firewall)
            snapshots = manager.watch()
            self._snapshot = await anext(snapshots)
            for attempt in range(3):
                desired = self._desired(config, underlay)
                result = await reconciler.sync(desired)
                self._record(desired, result, metrics)
                if not result.errors:
                    break
                await asyncio.sleep(0.2 * (attempt + 1))
            self._write_env(config, desired)
            self.status.ready = True
            metrics.ready.set(1)
            self.ready.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._follow(snapshots))
                tg.create_task(self._tick())
                if manager.renew_interval > 0:
                    tg.create_task(self._renew(manager, config, underlay))
                if opts.watch_links and self._netlink is None:
                    tg.create_task(self._watch_links(netns))
                if opts.cleanup_flannel and self._firewall is None:
                    from svcnet.cni.overlay.migrate import after_first_sync

                    tg.create_task(after_first_sync(self.ready, netns))
                while True:
                    await self._wake.wait()
                    self._wake.clear()
                    full, self._full = self._full, False
                    try:
                        if full:
                            underlay = await netlink.underlay(opts.iface or None)
                        desired = self._desired(config, underlay)
                        result = await reconciler.sync(desired, full=full)
                    except (OSError, ValueError) as err:
                        self._full = True
                        log.error("reconcile failed: %s", err)
                        metrics.errors.inc()
                        self.status.last_errors = [str(err)]
                        continue
                    self._record(desired, result, metrics)
                    self._write_env(config, desired)
        finally:
            metrics.ready.set(0)
            if server is not None:
                await server.stop()

    async def _choose_firewall(self, netns: str | None) -> Firewall:
        """The configured (or detected) backend; the other one's rules, left by an earlier
        run with another choice, are removed so two rule sets never coexist."""
        from svcnet.cni.overlay.firewall import BACKENDS, detect_backend, make_firewall

        backend = self.options.masq_backend
        if backend == "auto":
            backend = await detect_backend(netns)
        log.info("firewall backend: %s", backend)
        for other in BACKENDS:
            if other != backend:
                try:
                    removed, errors = await make_firewall(other, netns).sync(())
                except OSError as err:
                    log.debug("no %s to clean up: %s", other, err)
                    continue
                if removed:
                    log.info("removed our %s rules left by an earlier run", other)
                if errors:
                    log.warning("could not remove our %s rules: %s", other, errors)
        return make_firewall(backend, netns)

    def _write_env(self, config: NetworkConfig, desired: Desired) -> None:
        """(Re)write subnet.env when its content changes: after start-up, a re-lease that
        moved our subnet, or an underlay MTU change."""
        assert self._lease is not None
        text = subnet_env(config, self._lease, desired.mtu, self.options.ip_masq)
        if text != self._env_written:
            write_atomically(self.options.subnet_file, text)
            self._env_written = text

    async def _network_config(self, manager: SubnetManager) -> NetworkConfig:
        """The network config from the store, waiting out an unreachable store."""
        from svcnet.store.base import Unavailable
        from svcnet.watch import Backoff

        backoff = Backoff(base=0.5, cap=10.0)
        while True:
            try:
                return await manager.network_config()
            except (Unavailable, OSError, TimeoutError) as err:
                delay = backoff.next()
                log.warning("cannot read the network config yet (%s); retrying in %.1fs",
                            err, delay)
                await asyncio.sleep(delay)

    async def _acquire(self, manager: SubnetManager, config: NetworkConfig,
                       underlay: Underlay) -> Lease:
        """Lease a subnet, waiting out an unreachable store; a full pool is fatal."""
        from svcnet.store.base import Unavailable
        from svcnet.watch import Backoff

        backoff = Backoff(base=0.5, cap=10.0)
        while True:
            try:
                return await manager.acquire(config, self._attrs(config, underlay),
                                             previous_subnets(self.options.subnet_file)
                                             or previous_subnets(
                                                 self.options.flannel_subnet_file))
            except (Unavailable, OSError, TimeoutError) as err:
                delay = backoff.next()
                log.warning("cannot lease a subnet yet (%s); retrying in %.1fs", err, delay)
                await asyncio.sleep(delay)

    def _attrs(self, config: NetworkConfig, underlay: Underlay) -> Any:
        from svcnet.cni.overlay.desired import device_name, vtep_mac
        from svcnet.cni.overlay.lease import LeaseAttrs

        vni = config.backend.vni
        return LeaseAttrs(
            public_ip=self.options.public_ip or (underlay.ipv4 if config.ipv4 else ""),
            public_ip6=self.options.public_ip6 or (underlay.ipv6 if config.ipv6 else ""),
            backend_type=config.backend.type, vni=vni,
            vtep_mac=self._adopted_macs.get(4)
            or vtep_mac(self.options.node_name, device_name(4, vni)) if config.ipv4 else "",
            vtep_mac6=self._adopted_macs.get(6)
            or vtep_mac(self.options.node_name, device_name(6, vni)) if config.ipv6 else "",
            node_name=self.options.node_name,
        )

    def _desired(self, config: NetworkConfig, underlay: Underlay) -> Desired:
        from svcnet.cni.overlay.desired import compute_desired

        assert self._lease is not None
        snapshot = self._snapshot
        if not any(le.key == self._lease.key for le in snapshot):
            snapshot = (*snapshot, self._lease)
        if self.options.public_ip:
            underlay = replace(underlay, ipv4=self.options.public_ip)
        if self.options.public_ip6:
            underlay = replace(underlay, ipv6=self.options.public_ip6)
        return compute_desired(config, self._lease, snapshot, underlay, self.options.node_name,
                               ip_masq=self.options.ip_masq,
                               notrack=self.options.vxlan_notrack)

    def _record(self, desired: Desired, result: SyncResult, metrics: _Metrics) -> None:
        s = self.status
        s.syncs += 1
        s.last_sync = time.time()
        s.last_sync_seconds = result.seconds
        s.last_errors = list(result.errors)
        s.peers = [asdict(p) for p in desired.peers]
        s.skipped = list(desired.skipped)
        self._last_desired = desired
        if self._lease is not None:
            s.lease = {"subnets": [str(x) for x in self._lease.subnets],
                       "public_ip": self._lease.attrs.public_ip,
                       "public_ip6": self._lease.attrs.public_ip6,
                       "backend": self._lease.attrs.backend_type, "mtu": desired.mtu}
        metrics.peers.set(len(desired.peers))
        metrics.duration.observe(result.seconds)
        metrics.changes.inc(len(result.ops) + result.chains_rewritten)
        if result.errors:
            metrics.errors.inc(len(result.errors))
            log.warning("reconcile left %d errors: %s", len(result.errors), result.errors[:3])
        if result.changed:
            log.info("reconciled: %d changes in %.3fs", len(result.ops), result.seconds)

    # -- wake-up sources --

    async def _follow(self, snapshots: AsyncIterator[Snapshot]) -> None:
        async for snapshot in snapshots:
            self._snapshot = snapshot
            self._wake.set()

    def wake(self, *, full: bool) -> None:
        """Ask for a sync; ``full`` re-reads the kernel instead of trusting the last sync."""
        self._full = self._full or full
        self._wake.set()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.options.resync)
            self.wake(full=True)

    async def _renew(self, manager: SubnetManager, config: NetworkConfig,
                     underlay: Underlay) -> None:
        from svcnet.cni.overlay.lease import LeaseError, LeaseLost

        from svcnet.store.base import StoreError

        while True:
            await asyncio.sleep(manager.renew_interval)
            assert self._lease is not None
            try:
                self._lease = await manager.renew(self._lease)
            except LeaseLost as err:
                log.warning("%s; leasing again", err)
                try:
                    lease = await manager.acquire(config, self._lease.attrs,
                                                  self._lease.subnets)
                except (LeaseError, StoreError, OSError) as again:
                    log.error("could not lease again: %s", again)
                    _Metrics.get().errors.inc()
                    continue
                if lease.subnets != self._lease.subnets:
                    log.error("our subnet changed from %s to %s: pods must be recreated",
                              self._lease.key, lease.key)
                self._lease = lease
                self.wake(full=True)
            except (StoreError, OSError, TimeoutError) as err:
                log.warning("lease renewal failed: %s; retrying", err)

    async def _watch_links(self, netns: str | None) -> None:
        """Wake on link changes so a deleted VXLAN device comes back at once."""
        argv = ["ip", *(["-n", netns] if netns else []), "monitor", "link"]
        while True:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            try:
                assert proc.stdout is not None
                while line := await proc.stdout.readline():
                    if b"Deleted" in line or b"state DOWN" in line or b"flannel" in line:
                        self.wake(full=True)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            await asyncio.sleep(1.0)

    # -- HTTP --

    async def _serve(self) -> Any:
        if not self.options.listen:
            return None
        from svcnet.httpserve import HTTPServer, Response, metrics_route

        host, _, port = self.options.listen.rpartition(":")

        def healthz() -> Response:
            stale = time.time() - self.status.last_sync > max(3 * self.options.resync, 30)
            if not self.status.ready or stale:
                return Response(503, b"not ready\n" if not self.status.ready else b"stale\n")
            return Response(200, b"ok\n")

        def status() -> Response:
            if self._last_desired is not None:
                self.status.desired = desired_json(self._last_desired)
            return Response(200, json.dumps(asdict(self.status)).encode(), "application/json")

        server = HTTPServer({"/healthz": healthz, "/metrics": metrics_route, "/status": status},
                            host or "127.0.0.1", int(port))
        await server.start()
        return server


def desired_json(desired: Desired) -> dict[str, Any]:
    """Desired kernel objects as JSON-ready lists, built only when someone asks (/status)."""
    kernel = desired.kernel
    out: dict[str, Any] = {
        name: [asdict(o) for o in sorted(getattr(kernel, name))]
        for name in ("links", "addresses", "neighbours", "fdb", "routes")
    }
    out["rules"] = [asdict(r) for r in desired.rules]
    return out


class _Metrics:
    _instance: _Metrics | None = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.peers = Gauge("svcnet_overlay_peers", "peers the datapath is programmed for")
        self.duration = Histogram("svcnet_overlay_reconcile_seconds",
                                  "time to observe and fix the kernel",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.errors = Counter("svcnet_overlay_errors_total",
                              "failed kernel changes and reconcile failures")
        self.changes = Counter("svcnet_overlay_changes_total",
                               "kernel objects and rule chains changed")
        self.ready = Gauge("svcnet_overlay_ready", "1 once the lease and datapath are ready")

    @classmethod
    def get(cls) -> _Metrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance
