"""The lab on a real Kubernetes control plane (``svcnet lab up --control-plane kubernetes``).

etcd 3.5, kube-apiserver, kube-controller-manager and kube-scheduler run in the lab's control
namespace (10.250.0.2), kept by ``Procs`` like every other lab process, so ``lab down`` and
restarts work from any later command. Deployments, ReplicaSets, EndpointSlices, node podCIDRs
and scheduling come from the real controllers; the lab's node agents (``kubelet.py`` with
``KubeNodeAPI``) register Nodes, run the Pods bound to them and report their status.

Identities, each a client certificate signed by the cluster CA (nothing expires mid-run):
- ``system:node:<node>`` in ``system:nodes`` for each node agent: the Node authorizer and the
  NodeRestriction admission plugin confine it to its own Node, Lease and Pods;
- ``svcnet:node-daemon:<node>`` in ``svcnet:node-daemons`` for ``svcnet node`` (overlay +
  proxy): what kube-proxy (``system:node-proxier``) and Flannel need; the overlay writes its
  VTEP annotations with a patch of ``nodes/status``, as Flannel does;
- ``svcnet:dns`` for the DNS pods: what CoreDNS's ClusterRole grants.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from svcnet.lab.controlplane import (
    COMPONENTS,
    Binaries,
    ControlPlane,
    Layout,
    api_get,
    cert_user,
    client_certificate,
    compact_etcd,
    etcd_revision,
    find_binaries,
    write_kubeconfig,
)
from svcnet.lab.netns import Kernel, in_netns_thread
from svcnet.lab.procs import Procs
from svcnet.lab.state import POD_NETWORK, SERVICE_NETWORK, LabConfig

RBAC = "rbac.authorization.k8s.io/v1"
NODE_DAEMON_GROUP = "svcnet:node-daemons"
DNS_USER = "svcnet:dns"

NODE_DAEMON_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["services", "endpoints", "pods"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["get", "list", "watch"]},
    # NetworkPolicy enforcement (--policy), what kube-router's and Calico's agents read.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
     "verbs": ["create", "patch", "update"]},
]
DNS_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
     "verbs": ["list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["list", "watch"]},
]


def k8s_dir(cfg: LabConfig) -> Path:
    return cfg.dir / "k8s"


def admin_kubeconfig(cfg: LabConfig) -> str:
    return str(k8s_dir(cfg) / "admin.kubeconfig")


def node_agent_kubeconfig(cfg: LabConfig, node: str) -> str:
    return str(cfg.node_dir(node) / "kubelet.kubeconfig")


def node_daemon_kubeconfig(cfg: LabConfig, node: str) -> str:
    return str(cfg.node_dir(node) / "daemon.kubeconfig")


def dns_kubeconfig(cfg: LabConfig) -> str:
    return str(k8s_dir(cfg) / "dns.kubeconfig")


def lab_layout(cfg: LabConfig) -> Layout:
    directory = k8s_dir(cfg)
    if (directory / "layout.json").exists():
        return Layout.load(directory)
    return Layout(directory, host=cfg.etcd_ip(1), service_cidr=str(SERVICE_NETWORK),
                  cluster_cidr=str(POD_NETWORK))


class LabControlPlane(ControlPlane):
    """``ControlPlane`` whose processes live in the lab's control namespace under ``Procs``."""

    def __init__(self, cfg: LabConfig, kernel: Kernel, bins: Binaries | None = None) -> None:
        super().__init__(lab_layout(cfg), bins or lab_binaries(cfg),
                         netns=cfg.control_ns, die_with_parent=False)
        self.cfg = cfg
        self.kernel = kernel
        self.lab_procs = Procs(cfg.dir)

    def log_path(self, component: str) -> Path:
        return self.cfg.log(component)

    def _spawn(self, component: str, argv: list[str]) -> None:
        assert self.netns is not None
        self.lab_procs.start(self.kernel, component, self.netns, argv, mount_ns=False)

    def running(self, component: str) -> bool:
        rec = self.lab_procs.get(component)
        return rec is not None and self.lab_procs.running(rec)

    def _stop(self, component: str, *, grace: float) -> None:
        self.lab_procs.stop(component, grace=grace, signal_kill=grace <= 0)

    def pids(self) -> dict[str, int]:
        out = {}
        for component in COMPONENTS:
            rec = self.lab_procs.get(component)
            if rec is not None and self.lab_procs.running(rec):
                out[component] = rec.pid
        return out

    def _in_ns(self, fn: Callable[[], Any]) -> Any:
        assert self.netns is not None
        return in_netns_thread(self.netns, fn)

    def api_get(self, path: str, *, token: str | None = None, timeout: float = 5.0
                ) -> tuple[int, bytes]:
        result: tuple[int, bytes] = self._in_ns(
            lambda: api_get(self.layout, path, token=token, timeout=timeout))
        return result

    def etcd_revision(self) -> int:
        return int(self._in_ns(lambda: etcd_revision(self.layout)))

    def compact_etcd(self, revision: int | None = None) -> int:
        return int(self._in_ns(lambda: compact_etcd(self.layout, revision)))

    # --- what the lab adds -------------------------------------------------------------

    def write_identities(self) -> None:
        """Client-certificate kubeconfigs for every node agent, node daemon and DNS."""
        pki = self.layout.pki
        for node in self.cfg.node_names:
            self.cfg.node_dir(node).mkdir(parents=True, exist_ok=True)
            crt, key = client_certificate(pki, f"kubelet-{node}", f"system:node:{node}",
                                          ["system:nodes"])
            write_kubeconfig(Path(node_agent_kubeconfig(self.cfg, node)), self.url,
                             self.layout.ca_crt, cert_user(crt, key))
            crt, key = client_certificate(pki, f"daemon-{node}", f"svcnet:node-daemon:{node}",
                                          [NODE_DAEMON_GROUP])
            write_kubeconfig(Path(node_daemon_kubeconfig(self.cfg, node)), self.url,
                             self.layout.ca_crt, cert_user(crt, key))
        crt, key = client_certificate(pki, "dns", DNS_USER)
        write_kubeconfig(Path(dns_kubeconfig(self.cfg)), self.url, self.layout.ca_crt,
                         cert_user(crt, key))

    def apply_rbac(self) -> None:
        self.apply([
            {"apiVersion": RBAC, "kind": "ClusterRole",
             "metadata": {"name": "svcnet:node-daemon"}, "rules": NODE_DAEMON_RULES},
            _binding("svcnet:node-daemon", "Group", NODE_DAEMON_GROUP),
            {"apiVersion": RBAC, "kind": "ClusterRole", "metadata": {"name": "svcnet:dns"},
             "rules": DNS_RULES},
            _binding("svcnet:dns", "User", DNS_USER),
        ])


def _binding(role: str, kind: str, subject: str) -> dict[str, Any]:
    return {"apiVersion": RBAC, "kind": "ClusterRoleBinding", "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind,
                          "name": subject}]}


def lab_binaries(cfg: LabConfig) -> Binaries:
    """The binaries ``up`` found, recorded in the lab's config for later commands."""
    if cfg.k8s_bin:
        from svcnet.lab.controlplane import find_etcd

        etcd, etcdctl = find_etcd()
        return Binaries(Path(cfg.k8s_bin), etcd, etcdctl)
    return find_binaries()


def kubectl_argv(cfg: LabConfig, *args: str) -> list[str]:
    return [str(Path(cfg.k8s_bin) / "kubectl"), f"--kubeconfig={admin_kubeconfig(cfg)}", *args]
