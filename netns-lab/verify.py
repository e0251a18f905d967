"""``svcnet lab verify``: each node's kernel against desired state recomputed from the store.

This is the chaos tests' "after each fault, the kernel state on every node equals the
desired state". The daemons' own status pages compare the kernel with what they last
computed (``svcnet overlay status``) or applied (``svcnet proxy status``), so a daemon that
computed the wrong thing -- a missed watch event, a stale cache -- would pass them. Here
nothing a daemon holds is used: inside each node's namespace a fresh list of the store gives
the overlay's lease snapshot and the proxy's Services and EndpointSlices; the overlay's own
``compute_desired`` and reconciler plan, and the proxy's ``desired_check`` (a full render
into a scratch namespace), compare that with the kernel. The flags are parsed from the node
daemon's own command line, so the check assumes exactly what the daemon was told.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from svcnet.lab.cluster import node_daemon_argv
from svcnet.lab.netns import NETNS_DIR
from svcnet.lab.state import LabConfig

from svcnet.store.base import Store


def daemon_args(cfg: LabConfig, node: str) -> argparse.Namespace:
    """The node daemon's flags as ``svcnet node`` parses them."""
    from svcnet.node import register

    parser = argparse.ArgumentParser(prog="svcnet")
    register(parser.add_subparsers(dest="command"))
    argv = node_daemon_argv(cfg, node)
    if cfg.deploy:  # the command of the DaemonSet's pod on this node
        from svcnet.lab.podrun import running_argv

        deployed = running_argv(cfg, node, "kube-system/svcnet-node-")
        if deployed is None:
            raise RuntimeError(f"no svcnet-node pod runs on {node}")
        args = parser.parse_args(deployed[deployed.index("node"):])
        # $NODE_NAME (the downward API's spec.nodeName) is this node in the pod
        args.overlay_node_name = args.overlay_node_name or node
        args.proxy_node_name = node
        return args
    return parser.parse_args(argv[argv.index("node"):])


# --- overlay --------------------------------------------------------------------------------


async def overlay_leases(args: argparse.Namespace, store: Store, config: Any) -> Any:
    """Every node's lease, listed now (not what the daemon's watch last delivered)."""
    from svcnet.cni.overlay.daemon import options_from_args
    from svcnet.cni.overlay.lease import EtcdSubnetManager, lease_from_node

    from svcnet.model import NODE, InvalidObject

    opts = options_from_args(args)
    if opts.etcd_endpoints and opts.subnet_manager in ("auto", "etcd"):
        from svcnet.store.etcd import EtcdClient

        manager = EtcdSubnetManager(EtcdClient(list(opts.etcd_endpoints),
                                               credentials=opts.etcd_credentials),
                                    prefix=opts.etcd_prefix, config=config)
        snapshots = manager.watch()
        try:
            return await anext(snapshots)  # the first snapshot is a fresh list
        finally:
            await snapshots.aclose()  # type: ignore[attr-defined]
            await manager.close()
    leases = []
    for raw in (await store.list(NODE)).items:
        try:
            lease = lease_from_node(NODE.decode(raw.data))
        except InvalidObject:
            continue
        if lease is not None:
            leases.append(lease)
    return tuple(leases)


async def verify_overlay(args: argparse.Namespace, store: Store) -> dict[str, Any]:
    from svcnet.cni.overlay.config import parse_network_config
    from svcnet.cni.overlay.daemon import options_from_args
    from svcnet.cni.overlay.desired import compute_desired
    from svcnet.cni.overlay.firewall import detect_backend, make_firewall
    from svcnet.cni.overlay.netlink import IpCommandNetlink
    from svcnet.cni.overlay.reconcile import Reconciler

    opts = options_from_args(args)
    config = parse_network_config(Path(opts.config_file).read_bytes())
    if opts.backend:
        config = dataclasses.replace(
            config, backend=dataclasses.replace(config.backend, type=opts.backend))
    snapshot = await overlay_leases(args, store, config)
    own = [le for le in snapshot if le.attrs.node_name == opts.node_name]
    if len(own) != 1:
        return {"in_sync": False, "ops": [f"{len(own)} leases name node {opts.node_name}"],
                "chains": []}
    netlink = IpCommandNetlink(None)
    underlay = await netlink.underlay(opts.iface or None)
    if opts.public_ip:
        underlay = dataclasses.replace(underlay, ipv4=opts.public_ip)
    desired = compute_desired(config, own[0], snapshot, underlay, opts.node_name,
                              ip_masq=opts.ip_masq, notrack=opts.vxlan_notrack)
    backend = opts.masq_backend if opts.masq_backend != "auto" else await detect_backend(None)
    firewall = make_firewall(backend, None)
    _observed, ops, chains = await Reconciler(netlink, firewall).pending(desired)
    return {"in_sync": not ops and not chains, "ops": [str(op) for op in ops],
            "chains": [_rules_name(c) for c in chains],
            "peers": len(desired.peers)}


def _rules_name(rules: Any) -> str:
    parts = [str(getattr(rules, a)) for a in ("family", "table", "chain") if hasattr(rules, a)]
    return " ".join(parts) or str(rules)


# --- one node, and all of them ----------------------------------------------------------------


async def verify_node(cfg: LabConfig, node: str) -> dict[str, Any]:
    """Run inside the node's namespace: overlay and proxy against the store."""
    from svcnet.store.open import open_store

    args = daemon_args(cfg, node)
    store = open_store(cfg.store_url, kubeconfig=cfg.kubeconfig)
    report: dict[str, Any] = {"node": node}
    try:
        if args.overlay:
            report["overlay"] = await verify_overlay(args, store)
        if args.proxy:
            from svcnet.proxy.daemon import ProxyOptions
            from svcnet.proxy.desired_check import check

            report["proxy"] = await check(ProxyOptions.from_args(args), store)
    finally:
        await store.close()
    report["in_sync"] = all(report[part]["in_sync"] is not False
                            for part in ("overlay", "proxy") if part in report)
    return report


def verify_nodes(cfg: LabConfig, nodes: list[str], timeout: float = 60) -> list[dict[str, Any]]:
    """``verify_node`` for each node, in its namespace, all at once."""
    procs = {node: subprocess.Popen(
        ["nsenter", f"--net={NETNS_DIR / cfg.node_ns(node)}", *cfg.svcnet_argv, "lab",
         "verify", "--node", node, "--json", "--lab-dir", str(cfg.dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SVCNET_LAB_NS": cfg.node_ns(node)}) for node in nodes}
    reports = []
    for node, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        try:
            reports.append(json.loads(out))
        except ValueError:
            reports.append({"node": node, "in_sync": False,
                            "error": err.strip()[-2000:] or f"exit {proc.returncode}"})
    return reports


def format_report(report: dict[str, Any]) -> list[str]:
    node = report["node"]
    if "error" in report:
        return [f"{node}: cannot verify: {report['error']}"]
    lines = [f"{node}: " + ("in sync with the store" if report["in_sync"]
                            else "DIFFERS from the store")]
    if "overlay" in report:
        o = report["overlay"]
        lines.append(f"  overlay: {'in sync' if o['in_sync'] else 'DIFFERS'}"
                     f" ({o.get('peers', 0)} peers)")
        lines += [f"    pending: {op}" for op in o["ops"]]
        lines += [f"    rules differ: {c}" for c in o["chains"]]
    if "proxy" in report:
        p = report["proxy"]
        if p["in_sync"] is None:
            lines.append("  proxy: not checked (mode not covered)")
        else:
            lines.append(f"  proxy ({p['mode']}): {'in sync' if p['in_sync'] else 'DIFFERS'}"
                         f" ({p['service_ports']} service ports, {p['kernel_items']} items)")
            lines += [f"    missing: {i}" for i in p["missing"]]
            lines += [f"    extra: {i}" for i in p["extra"]]
    return lines
