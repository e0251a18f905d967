"""``svcnet lab status``: nodes, pods, services and the health of every lab process."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from svcnet.lab.endpointslices import SERVICE_NAME_LABEL
from svcnet.lab.netns import in_netns_thread
from svcnet.lab.procs import Procs
from svcnet.lab.state import LabConfig

from svcnet.model import ENDPOINT_SLICE, NODE, POD, SERVICE
from svcnet.store.base import StoreError
from svcnet.store.open import open_store

OVERLAY_HEALTH_PORT = 9475
PROXY_HEALTH_PORT = 10256
POLICY_HEALTH_PORT = 10263
"""svcnet node --policy's default --policy-metrics-bind-address port."""


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def _subnet(cfg: LabConfig, node: str) -> str:
    try:
        text = (cfg.node_dir(node) / "subnet.env").read_text()
    except OSError:
        return "-"
    for line in text.splitlines():
        if line.startswith("FLANNEL_SUBNET="):
            return line.partition("=")[2]
    return "-"


def _healthz(ns: str, port: int, path: str) -> str:
    """HTTP status of a daemon's health endpoint on the node's loopback ('-' if closed)."""

    def get() -> str:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as conn:
                conn.settimeout(1.0)
                conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                line = conn.recv(64).split(b"\r\n", 1)[0].split()
                return line[1].decode() if len(line) > 1 else "?"
        except OSError:
            return "-"

    try:
        return in_netns_thread(ns, get)
    except Exception:
        return "-"


def node_health(cfg: LabConfig, node: str) -> str:
    """``overlay=200 proxy=200``: the daemons' own /healthz answers."""
    parts = []
    ns = cfg.node_ns(node)
    if cfg.overlay in ("vxlan", "host-gw"):
        parts.append(f"overlay={_healthz(ns, OVERLAY_HEALTH_PORT, '/healthz')}")
    if cfg.proxy:
        parts.append(f"proxy={_healthz(ns, PROXY_HEALTH_PORT, '/healthz')}")
    if cfg.policy:
        parts.append(f"policy={_healthz(ns, POLICY_HEALTH_PORT, '/healthz')}")
    return " ".join(parts) or "-"


def _ready(obj: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in obj.get("status", {}).get("conditions", ()))


async def render_status(cfg: LabConfig) -> str:
    procs = Procs(Path(cfg.dir))
    health = {r.name: ("up" if procs.running(r) else "DOWN") for r in procs.all()}
    out = [f"lab {cfg.name} ({cfg.dir}): cni={cfg.cni} overlay={cfg.overlay} "
           f"proxy={'on' if cfg.proxy else 'off'} dns={'on' if cfg.dns else 'off'} "
           + ("policy=on " if cfg.policy else "") +
           f"store={cfg.store_url}"]
    store = open_store(cfg.store_url, kubeconfig=cfg.kubeconfig)
    try:
        nodes = {r.name: json.loads(r.data) for r in (await store.list(NODE)).items}
        pods = [json.loads(r.data) for r in (await store.list(POD)).items]
        services = [json.loads(r.data) for r in (await store.list(SERVICE)).items]
        slices = [json.loads(r.data) for r in (await store.list(ENDPOINT_SLICE)).items]
    except StoreError as err:
        out.append(f"store unreachable: {err}")
        nodes, pods, services, slices = {}, [], [], []
    finally:
        await store.close()
    rows = []
    for node in cfg.node_names:
        n_pods = sum(1 for p in pods if p.get("spec", {}).get("nodeName") == node)
        rows.append([node, cfg.node_ip(node), cfg.node_zone(node), _subnet(cfg, node),
                     "Ready" if node in nodes else "NotRegistered", str(n_pods),
                     health.get(f"node-{node}", "-"), node_health(cfg, node),
                     health.get(f"kubelet-{node}", "-")])
    out += ["", table(["NODE", "UNDERLAY-IP", "ZONE", "POD-SUBNET", "STATUS", "PODS",
                       "SVCNET-NODE", "HEALTHZ", "KUBELET"], rows)]
    rows = []
    for p in sorted(pods, key=lambda p: (p["metadata"].get("namespace", ""),
                                        p["metadata"]["name"])):
        meta, status = p["metadata"], p.get("status", {})
        state = "Terminating" if meta.get("deletionTimestamp") else status.get("phase", "?")
        rows.append([f"{meta.get('namespace')}/{meta['name']}",
                     p.get("spec", {}).get("nodeName", "-"), status.get("podIP", "-"),
                     state, "1/1" if _ready(p) else "0/1"])
    out += ["", table(["POD", "NODE", "IP", "STATUS", "READY"], rows)]
    rows = []
    for s in sorted(services, key=lambda s: (s["metadata"].get("namespace", ""),
                                            s["metadata"]["name"])):
        meta, spec = s["metadata"], s.get("spec", {})
        ports = ",".join(f"{p['port']}"
                         + (f":{p['nodePort']}" if p.get("nodePort") else "")
                         + f"/{p.get('protocol', 'TCP')}" for p in spec.get("ports", ()))
        eps = [e for sl in slices
               if sl["metadata"].get("namespace") == meta.get("namespace")
               and (sl["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL) == meta["name"]
               for e in sl.get("endpoints") or ()]
        ready = sum(1 for e in eps if (e.get("conditions") or {}).get("ready") is not False)
        rows.append([f"{meta.get('namespace')}/{meta['name']}", spec.get("type", "ClusterIP"),
                     spec.get("clusterIP", "") or spec.get("externalName", "-"), ports or "-",
                     f"{ready}/{len(eps)}"])
    out += ["", table(["SERVICE", "TYPE", "CLUSTER-IP", "PORTS", "ENDPOINTS(READY/ALL)"],
                      rows)]
    rows = [[r.name, r.ns, str(r.pid), health[r.name]] for r in procs.all()
            if not r.name.startswith(("node-", "kubelet-"))]
    out += ["", table(["PROCESS", "NAMESPACE", "PID", "HEALTH"], rows)]
    return "\n".join(out)
