"""A lab's directory: its configuration, its address plan and the ledger of what it made.

Everything the lab creates outside its directory (namespaces, /etc/netns entries) is written
to the ledger *before* it is created, one file per resource so several processes (the CLI,
every kubelet stand-in) can record concurrently. ``down`` walks the ledger, so it works after
a crash of anything.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("SVCNET_LAB_ROOT", "/run/svcnet-lab"))
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")

UNDERLAY = ipaddress.IPv4Network("10.250.0.0/16")
POD_NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
SERVICE_NETWORK = ipaddress.IPv4Network("10.96.0.0/16")
# The only addresses a lab Service may claim as externalIPs / LoadBalancer IPs (TEST-NET-3):
# never the underlay, where etcd and the nodes live (CVE-2020-8554).
EXTERNAL_IP_RANGE = ipaddress.IPv4Network("203.0.113.0/24")
DNS_SERVICE_IP = "10.96.0.10"
ZONES = ("zone-a", "zone-b", "zone-c")
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380


@dataclass(frozen=True)
class LabConfig:
    """What the user asked for; saved as ``lab.json`` and read by every lab process."""

    name: str
    nodes: int
    lab_dir: str
    etcd_members: int = 1
    store: str = "etcd"
    kubeconfig: str | None = None
    cni: str = "svcnet"
    overlay: str = "vxlan"
    proxy: bool = True
    proxy_mode: str = ""
    dns: bool = True
    dns_replicas: int = 2
    """kube-dns replicas (CoreDNS runs two, so a restart of one is no outage)."""
    zone: str = "cluster.local"
    python: str = ""
    extra_node_args: tuple[str, ...] = ()
    apiserver_argv: tuple[str, ...] = ()
    """With ``store="kubernetes"``: an API server the lab starts in its control namespace."""
    control_plane: str = "etcd"
    """``etcd``: etcd plus the lab's own controllers; ``kubernetes``: a real control plane
    (svcnet.lab.k8s) in the control namespace, with ``store="kubernetes"``."""
    k8s_bin: str = ""
    """With the real control plane: where its binaries are (found by ``up``)."""
    deploy: str = ""
    """``manifests``: no svcnet daemon started by the lab; ``svcnet manifests`` applied with
    kubectl instead, its pods run by the node agents (svcnet.lab.podrun, deploy.py)."""
    policy: bool = False
    """NetworkPolicy enforcement: ``--policy`` on every node daemon (issue 17)."""

    @property
    def real_control_plane(self) -> bool:
        return self.control_plane == "kubernetes"

    @property
    def dir(self) -> Path:
        return Path(self.lab_dir)

    # --- namespaces ------------------------------------------------------------------
    @property
    def underlay_ns(self) -> str:
        return f"{self.name}-ul"

    def etcd_ns(self, i: int) -> str:
        return f"{self.name}-e{i}"

    def node_ns(self, node: str) -> str:
        return f"{self.name}-{node}"

    def pod_ns(self, namespace: str, pod: str) -> str:
        return f"{self.name}-{namespace}.{pod}"

    @property
    def control_ns(self) -> str:
        """Where the lab controller and the CLI talk to the store from."""
        return self.etcd_ns(1)

    # --- addresses -------------------------------------------------------------------
    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def node_index(self, node: str) -> int:
        return int(node[1:])

    def node_ip(self, node: str) -> str:
        i = self.node_index(node)
        return str(UNDERLAY.network_address + 256 + i)

    def etcd_ip(self, i: int) -> str:
        return str(UNDERLAY.network_address + 1 + i)

    def node_subnet(self, node: str) -> str:
        """The pod subnet the lab assigns (Node.spec.podCIDR; used as-is without the overlay)."""
        return f"10.244.{self.node_index(node)}.0/24"

    def node_zone(self, node: str) -> str:
        return ZONES[(self.node_index(node) - 1) % len(ZONES)]

    @property
    def etcd_endpoints(self) -> list[str]:
        return [f"{self.etcd_ip(i)}:{ETCD_CLIENT_PORT}"
                for i in range(1, self.etcd_members + 1)]

    @property
    def store_url(self) -> str:
        if self.store == "kubernetes":
            return "kubernetes"
        return "etcd://" + ",".join(self.etcd_endpoints)

    def store_args(self, kubeconfig: str | None = None) -> list[str]:
        """``--store`` and, for Kubernetes, ``--kubeconfig`` (the admin's unless a process
        gets an identity of its own)."""
        args = ["--store", self.store_url]
        if kubeconfig or self.kubeconfig:
            args += ["--kubeconfig", kubeconfig or self.kubeconfig or ""]
        return args

    # --- files -----------------------------------------------------------------------
    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    def log(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    @property
    def svcnet_argv(self) -> list[str]:
        """How lab processes run the ``svcnet`` command (the same interpreter as the CLI)."""
        return [self.python, "-m", "svcnet.cli"]

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        tmp = self.dir / "lab.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.dir / "lab.json")

    @staticmethod
    def load(lab_dir: Path) -> LabConfig:
        data = json.loads((lab_dir / "lab.json").read_text())
        data["extra_node_args"] = tuple(data.get("extra_node_args", ()))
        data["apiserver_argv"] = tuple(data.get("apiserver_argv", ()))
        return LabConfig(**data)


def lab_dir_for(name: str, root: Path | None = None) -> Path:
    return (root or DEFAULT_ROOT) / name


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(f"lab name {name!r}: use 1-8 lowercase letters/digits, "
                         "starting with a letter (it prefixes every namespace name)")


@dataclass(frozen=True)
class Ledger:
    """Append-only record of namespaces and /etc/netns entries, one file per resource."""

    root: Path
    kinds: tuple[str, ...] = field(default=("netns", "etc"))

    def _dir(self, kind: str) -> Path:
        d = self.root / "ledger" / kind
        d.mkdir(parents=True, exist_ok=True)
        return d

    def record(self, kind: str, name: str) -> None:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad ledger name {name!r}")
        path = self._dir(kind) / name
        path.write_text(str(os.getpid()))

    def forget(self, kind: str, name: str) -> None:
        (self._dir(kind) / name).unlink(missing_ok=True)

    def entries(self, kind: str) -> list[str]:
        d = self.root / "ledger" / kind
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir())
