"""``svcnet lab up --control-plane kubernetes --deploy manifests``: svcnet installed the way
an operator installs it, with ``svcnet manifests | kubectl apply -f -``.

The lab builds nodes with no svcnet daemon: each node gets a default route (a real node has
one; the overlay picks its underlay interface from it) and empty CNI directories with the
reference plugins (podrun.prepare_node). Then it renders the manifests with the lab's
addresses and applies them; the DaemonSet and Deployment controllers create the pods, the
node agents run them (podrun), and ``up`` waits for both rollouts.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

from svcnet.lab.netns import Kernel
from svcnet.lab.podrun import prepare_node
from svcnet.lab.state import DNS_SERVICE_IP, POD_NETWORK, SERVICE_NETWORK, LabConfig

from svcnet.manifests import Options, render, to_yaml

ROLLOUT_TIMEOUT_S = 150


def options(cfg: LabConfig) -> Options:
    """The lab's network plan as ``svcnet manifests`` options; the node agents reach the API
    server at its own address (nothing routes the ``kubernetes`` Service before they run)."""
    return Options(
        cluster_cidr=str(POD_NETWORK), subnet_len=24, service_cidr=str(SERVICE_NETWORK),
        dns_ip=DNS_SERVICE_IP, cluster_domain=cfg.zone,
        backend=cfg.overlay if cfg.overlay in ("vxlan", "host-gw") else "vxlan",
        proxy_mode=cfg.proxy_mode or "nftables", apiserver=f"{cfg.etcd_ip(1)}:6443",
        dns_replicas=cfg.dns_replicas, network_policy=cfg.policy)


def check(cfg: LabConfig) -> str:
    """'' or why this lab cannot be deployed from the manifests."""
    if not cfg.real_control_plane:
        return "--deploy manifests needs --control-plane kubernetes"
    if cfg.cni != "svcnet" or cfg.overlay not in ("vxlan", "host-gw") or not (
            cfg.proxy and cfg.dns):
        return ("--deploy manifests installs svcnet's CNI, overlay, proxy and DNS: it needs "
                "all of them installed (and no --overlay static / --cni reference)")
    return ""


def prepare(cfg: LabConfig, kernel: Kernel) -> None:
    for node in cfg.node_names:
        kernel.ip_batch(cfg.node_ns(node), ["route add default dev eth0"])
        prepare_node(cfg, node)


def apply_manifests(cfg: LabConfig, control_plane: Any, progress: Callable[[str], None],
                    elapsed: Callable[[], float]) -> None:
    """Render, ``kubectl apply``, then wait for the DaemonSet and the Deployment."""
    path = cfg.dir / "svcnet.yaml"
    path.write_text(to_yaml(render(options(cfg))))
    control_plane.kubectl("apply", "-f", str(path))
    progress(f"[{elapsed():5.1f}s] applied {path} (svcnet manifests) with kubectl")
    for kind in ("daemonset/svcnet-node", "deployment/svcnet-dns"):
        try:
            control_plane.kubectl("-n", "kube-system", "rollout", "status", kind,
                                  f"--timeout={ROLLOUT_TIMEOUT_S}s",
                                  timeout=ROLLOUT_TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{kind} did not roll out") from None
        progress(f"[{elapsed():5.1f}s] {kind} rolled out")
