"""The proxy as a node component: flags, backend choice, health server, sync loop.

``svcnet node --proxy`` and ``svcnet proxy`` both build a ``ProxyComponent`` from the
``--proxy-*`` flags. It runs in the node's network namespace (the lab starts it with
``ip netns exec``); ``--proxy-netns`` instead drives another namespace from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from svcnet.store.base import Store
from svcnet.watch import InformerFactory

if TYPE_CHECKING:
    from svcnet.proxy.backend import ProxyBackend
    from svcnet.proxy.commands import Commands
    from svcnet.proxy.state import NodeConfig

log = logging.getLogger(__name__)

MODES = ("nftables", "iptables", "ipvs")
DETECT_LOCAL_MODES = ("", "ClusterCIDR", "NodeCIDR", "InterfaceNamePrefix", "BridgeInterface")


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("proxy")
    g.add_argument("--proxy-mode", choices=MODES, default="nftables")
    g.add_argument("--proxy-drift-check", action="store_true",
                   help="snapshot our rules after each sync so /status and 'svcnet proxy "
                        "status' can report drift (one extra rule dump per sync)")
    g.add_argument("--proxy-ipvs-scheduler", default="rr",
                   help="IPVS scheduler for --proxy-mode ipvs: rr, lc, wrr, sh, ...")
    g.add_argument("--proxy-node-name", default=os.environ.get("NODE_NAME", socket.gethostname()))
    g.add_argument("--proxy-zone", default="", help="this node's topology zone")
    g.add_argument("--proxy-nodeport-addresses", default="",
                   help="comma-separated CIDRs; NodePorts answer on local addresses in them "
                        "(default: every non-loopback address)")
    g.add_argument("--proxy-cluster-cidr", default="", help="comma-separated pod CIDRs")
    g.add_argument("--proxy-detect-local-mode", choices=DETECT_LOCAL_MODES, default="",
                   help="default: ClusterCIDR if --proxy-cluster-cidr is set")
    g.add_argument("--proxy-pod-interface-name-prefix", default="")
    g.add_argument("--proxy-pod-bridge-interface", default="")
    g.add_argument("--proxy-masquerade-all", action="store_true")
    g.add_argument("--proxy-ip-families", default="4,6", help="4, 6 or 4,6")
    g.add_argument("--proxy-iptables-variant", choices=("auto", "nft", "legacy"), default="auto")
    g.add_argument("--proxy-min-sync-period", type=float, default=1.0)
    g.add_argument("--proxy-sync-period", type=float, default=30.0)
    g.add_argument("--proxy-full-sync-period", type=float, default=3600.0)
    g.add_argument("--proxy-healthz-bind-address", default="0.0.0.0:10256",
                   help="host:port serving only /healthz and /livez ('' = off)")
    g.add_argument("--proxy-metrics-bind-address", default="127.0.0.1:10249",
                   help="host:port serving /metrics and /status ('' = off)")
    g.add_argument("--proxy-service-cluster-ip-range", "--service-cluster-ip-range",
                   dest="proxy_service_cluster_ip_range", default="",
                   help="comma-separated service CIDRs; ClusterIPs outside them are not "
                        "programmed (default: any)")
    g.add_argument("--proxy-external-ip-cidrs", default="",
                   help="comma-separated CIDRs externalIPs and LoadBalancer IPs must be in "
                        "(default: any, as kube-proxy; see docs/proxy.md)")
    g.add_argument("--proxy-netns", default=None,
                   help="program this named network namespace instead of our own")
    g.add_argument("--proxy-cleanup-kube-proxy", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="after our first sync, remove the rules a stopped kube-proxy left "
                        "(its iptables chains and jumps of every mode, its nftables tables, "
                        "ipsets, kube-ipvs0); stop kube-proxy first (docs/deploy.md)")


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    mode: str
    node_name: str
    zone: str
    nodeport_cidrs: tuple[str, ...]
    families: tuple[int, ...]
    cluster_cidrs: tuple[str, ...]
    detect_local_mode: str
    interface: str
    masquerade_all: bool
    iptables_variant: str
    min_sync_period: float
    sync_period: float
    full_sync_period: float
    healthz: str
    metrics: str
    netns: str | None
    ipvs_scheduler: str = "rr"
    drift_check: bool = False
    service_cidrs: tuple[str, ...] = ()
    external_ip_cidrs: tuple[str, ...] = ()
    cleanup_kube_proxy: bool = True

    def node_config(self, nodeport_addresses: tuple[str, ...]) -> NodeConfig:
        from svcnet.proxy.state import AddressFilter, NodeConfig

        return NodeConfig(self.node_name, self.zone, nodeport_addresses,
                          cluster_ips=AddressFilter(self.service_cidrs),
                          external_ips=AddressFilter(self.external_ip_cidrs))

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> ProxyOptions:
        from svcnet.cli import UsageError

        def split(text: str) -> tuple[str, ...]:
            return tuple(x.strip() for x in text.split(",") if x.strip())

        cidrs = split(a.proxy_cluster_cidr)
        service_cidrs = split(getattr(a, "proxy_service_cluster_ip_range", ""))
        external_cidrs = split(getattr(a, "proxy_external_ip_cidrs", ""))
        for c in (*cidrs, *split(a.proxy_nodeport_addresses), *service_cidrs, *external_cidrs):
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise UsageError(f"not a CIDR: {c!r}") from None
        mode = a.proxy_detect_local_mode or ("ClusterCIDR" if cidrs else "")
        iface = a.proxy_pod_interface_name_prefix or a.proxy_pod_bridge_interface
        if mode in ("ClusterCIDR", "NodeCIDR") and not cidrs:
            raise UsageError(f"--proxy-detect-local-mode {mode} needs --proxy-cluster-cidr")
        if mode in ("InterfaceNamePrefix", "BridgeInterface") and not iface:
            raise UsageError(f"--proxy-detect-local-mode {mode} needs an interface flag")
        families = tuple(sorted({int(f) for f in split(a.proxy_ip_families)}))
        if not families or any(f not in (4, 6) for f in families):
            raise UsageError("--proxy-ip-families: 4, 6 or 4,6")
        return cls(
            mode=a.proxy_mode, ipvs_scheduler=a.proxy_ipvs_scheduler,
            drift_check=a.proxy_drift_check,
            node_name=a.proxy_node_name, zone=a.proxy_zone,
            nodeport_cidrs=split(a.proxy_nodeport_addresses), families=families,
            cluster_cidrs=cidrs, detect_local_mode=mode, interface=iface,
            masquerade_all=a.proxy_masquerade_all, iptables_variant=a.proxy_iptables_variant,
            min_sync_period=a.proxy_min_sync_period, sync_period=a.proxy_sync_period,
            full_sync_period=a.proxy_full_sync_period, healthz=a.proxy_healthz_bind_address,
            metrics=a.proxy_metrics_bind_address, netns=a.proxy_netns,
            service_cidrs=service_cidrs, external_ip_cidrs=external_cidrs,
            cleanup_kube_proxy=getattr(a, "proxy_cleanup_kube_proxy", True),
        )


def node_addresses(commands: Any, cidrs: tuple[str, ...]) -> tuple[str, ...]:
    """Local addresses NodePorts answer on: in ``cidrs`` (if any), never loopback/link-local."""
    out = commands.run(["ip", "-j", "addr", "show"])
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    found: list[str] = []
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            addr = ipaddress.ip_address(info["local"])
            if addr.is_loopback or addr.is_link_local:
                continue
            if nets and not any(addr in n for n in nets):
                continue
            found.append(str(addr))
    return tuple(dict.fromkeys(found))


def build_backend(opts: ProxyOptions, commands: Commands) -> ProxyBackend:
    from svcnet.proxy.config import BackendConfig, LocalDetector

    config = BackendConfig(
        families=opts.families,  # type: ignore[arg-type]
        detect_local=LocalDetector(opts.detect_local_mode, opts.cluster_cidrs,  # type: ignore[arg-type]
                                   opts.interface),
        masquerade_all=opts.masquerade_all,
    )
    if opts.mode == "nftables":
        from svcnet.proxy.nftables import NftablesBackend

        return NftablesBackend(commands, config)
    if opts.mode == "iptables":
        from svcnet.proxy.iptables import IptablesBackend

        legacy = None if opts.iptables_variant == "auto" else opts.iptables_variant == "legacy"
        return IptablesBackend(commands, config, legacy=legacy)
    ipvs = importlib.import_module("svcnet.proxy.ipvs")
    backend: ProxyBackend = ipvs.build_backend(opts, commands, config)
    return backend


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class ProxyComponent:
    name = "proxy"

    def __init__(self, opts: ProxyOptions) -> None:
        self.opts = opts

    async def run(self, factory: InformerFactory, store: Store) -> None:
        from svcnet.proxy.commands import SubprocessCommands
        from svcnet.proxy.conntrack import NetlinkConntrack
        from svcnet.proxy.health import (
            NodePortHealthServers,
            StatusPage,
            health_routes,
            metrics_routes,
        )
        from svcnet.proxy.proxier import Proxier, SyncSettings

        from svcnet.httpserve import HTTPServer

        opts = self.opts
        commands = SubprocessCommands(opts.netns)
        backend = build_backend(opts, commands)

        def node() -> NodeConfig:
            addrs = node_addresses(commands, opts.nodeport_cidrs)
            backend.set_node_addresses({
                f: tuple(a for a in addrs if (":" in a) == (f == 6)) for f in (4, 6)})
            return opts.node_config(addrs)

        proxier = Proxier(
            backend, await asyncio.to_thread(node),
            settings=SyncSettings(opts.min_sync_period, opts.sync_period, opts.full_sync_period),
            conntrack=NetlinkConntrack(opts.netns),
            health_check_servers=NodePortHealthServers() if opts.netns is None else None,
            node_refresh=node,
            drift_check=opts.drift_check and bool(opts.metrics),
        )
        servers = []
        if opts.healthz:
            servers.append(HTTPServer(health_routes(proxier.health), *_host_port(opts.healthz)))
        if opts.metrics:
            servers.append(HTTPServer(metrics_routes(StatusPage(proxier.status)),
                                      *_host_port(opts.metrics)))
        for s in servers:
            await s.start()
        log.info("proxy %s running for node %s", backend.name, opts.node_name)
        migration = None
        if opts.cleanup_kube_proxy:
            from svcnet.proxy.iptables import IptablesBackend
            from svcnet.proxy.migrate import after_first_sync

            # In iptables mode the chains kube-proxy and we both name stay on our variant.
            own_legacy = backend.legacy if isinstance(backend, IptablesBackend) else None
            migration = asyncio.create_task(after_first_sync(proxier.synced, commands,
                                                             own_legacy))
        try:
            await proxier.run(factory)
        finally:
            if migration is not None:
                migration.cancel()
            for s in servers:
                await s.stop()


def node_component(args: argparse.Namespace) -> ProxyComponent:
    return ProxyComponent(ProxyOptions.from_args(args))
