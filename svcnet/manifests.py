"""``svcnet manifests``: the Kubernetes objects that install svcnet on a cluster, as YAML.

The objects are built here as plain data from one frozen ``Options`` value (no template
engine), so a test can check where each option lands and ``deploy/svcnet.yaml`` is just this
module's output with the defaults. What each object is for, and why the node agent runs
privileged: docs/deploy.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from dataclasses import dataclass, fields, replace
from typing import Any

from svcnet import __version__

NODE = "svcnet-node"
DNS = "svcnet-dns"
CONFIG = "svcnet-config"
DNS_LABELS = {"k8s-app": "kube-dns", "app.kubernetes.io/name": DNS}
NODE_LABELS = {"k8s-app": NODE, "app.kubernetes.io/name": NODE}
RBAC = "rbac.authorization.k8s.io/v1"
BACKENDS = ("vxlan", "host-gw")
PROXY_MODES = ("nftables", "iptables", "ipvs")
PROXY_HEALTHZ_PORT = 10256
DNS_HEALTH_PORT = 8080
DNS_METRICS_PORT = 9153
CONFIG_DIR = "/etc/svcnet"
RUN_DIR = "/run/svcnet"
SUBNET_FILE = f"{RUN_DIR}/subnet.env"
CNI_SOCKET = f"{RUN_DIR}/cni.sock"

# What the node agent's informers and the overlay's lease need (docs/deploy.md compares this
# with kube-proxy's system:node-proxier and Flannel's ClusterRole): read Nodes (podCIDRs and
# the peers' VTEP annotations), patch only the status subresource of Nodes (Flannel's way of
# publishing its annotations), read Services and EndpointSlices.
NODE_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["list", "watch"]},
)
# svcnet dns reads Services and EndpointSlices (CoreDNS's system:coredns also lists Endpoints,
# Namespaces and Pods: we use neither Endpoints nor Namespaces, Pods only for --pods verified).
DNS_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["list", "watch"]},
)
DNS_POD_RULE: dict[str, Any] = {"apiGroups": [""], "resources": ["pods"],
                                "verbs": ["list", "watch"]}
# svcnet node --policy (--network-policy) reads Pods, Namespaces and NetworkPolicies.
POLICY_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["list", "watch"]},
)


class ManifestError(ValueError):
    """An option value that cannot make a working cluster; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Options:
    namespace: str = "kube-system"
    image: str = f"localhost/svcnet:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    cluster_cidr: str = "10.244.0.0/16"
    subnet_len: int = 24
    service_cidr: str = "10.96.0.0/12"
    dns_ip: str = ""
    """Empty: the tenth address of the service CIDR (kubeadm's choice)."""
    cluster_domain: str = "cluster.local"
    backend: str = "vxlan"
    proxy_mode: str = "nftables"
    apiserver: str = ""
    """HOST:PORT the node agent reaches the API server at. Empty: the ``kubernetes`` Service's
    ClusterIP the kubelet passes, which works only where something already routes it."""
    dns_replicas: int = 2
    dns_pods: str = "insecure"
    network_policy: bool = False

    def checked(self) -> Options:
        """Validate and fill in derived defaults; raises ``ManifestError``."""
        try:
            pods = ipaddress.ip_network(self.cluster_cidr)
        except ValueError:
            raise ManifestError(f"--cluster-cidr {self.cluster_cidr!r} is not a CIDR") from None
        try:
            services = ipaddress.ip_network(self.service_cidr)
        except ValueError:
            raise ManifestError(f"--service-cidr {self.service_cidr!r} is not a CIDR") from None
        if pods.version != 4 or services.version != 4:
            raise ManifestError("--cluster-cidr and --service-cidr: IPv4 only for now")
        if pods.overlaps(services):
            raise ManifestError(f"--cluster-cidr {pods} overlaps --service-cidr {services}")
        if not pods.prefixlen < self.subnet_len <= 30:
            raise ManifestError(f"--subnet-len {self.subnet_len}: must be longer than "
                                f"/{pods.prefixlen} and at most 30")
        dns_ip = self.dns_ip or str(services.network_address + 10)
        try:
            dns = ipaddress.ip_address(dns_ip)
        except ValueError:
            raise ManifestError(f"--dns-ip {dns_ip!r} is not an IP address") from None
        if dns not in services or dns in (services.network_address, services.broadcast_address):
            raise ManifestError(f"--dns-ip {dns} is not a usable address of --service-cidr "
                                f"{services}")
        if self.backend not in BACKENDS:
            raise ManifestError(f"--backend {self.backend!r}: one of {', '.join(BACKENDS)}")
        if self.proxy_mode not in PROXY_MODES:
            raise ManifestError(f"--proxy-mode {self.proxy_mode!r}: one of "
                                f"{', '.join(PROXY_MODES)}")
        if not self.image or any(c.isspace() for c in self.image):
            raise ManifestError(f"--image {self.image!r} is not an image reference")
        if self.dns_replicas < 1:
            raise ManifestError("--dns-replicas must be at least 1")
        if self.apiserver:
            host, sep, port = self.apiserver.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ManifestError(f"--apiserver {self.apiserver!r}: HOST:PORT expected")
        return replace(self, cluster_cidr=str(pods), service_cidr=str(services),
                       dns_ip=str(dns))

    @property
    def apiserver_host_port(self) -> tuple[str, str]:
        host, _, port = self.apiserver.rpartition(":")
        return host.strip("[]"), port


def net_conf(opts: Options) -> dict[str, Any]:
    """Flannel's net-conf.json, which ``svcnet node --overlay-config`` reads."""
    backend: dict[str, Any] = {"Type": opts.backend}
    if opts.backend == "vxlan":
        backend.update(VNI=1, Port=8472)
    return {"Network": opts.cluster_cidr, "SubnetLen": opts.subnet_len, "Backend": backend}


def render(opts: Options) -> list[dict[str, Any]]:
    """Every object, in the order ``kubectl apply`` should create them."""
    o = opts.checked()
    return [
        *_identity(o, NODE, (*NODE_RULES, *(POLICY_RULES if o.network_policy else ()))),
        *_identity(o, DNS, (*DNS_RULES, *([DNS_POD_RULE] if o.dns_pods == "verified" else []))),
        config_map(o), node_daemonset(o), dns_deployment(o), dns_service(o),
        dns_disruption_budget(o),
    ]


def to_yaml(docs: list[dict[str, Any]]) -> str:
    import yaml

    header = (f"# svcnet {__version__}: rendered by `svcnet manifests`; see docs/deploy.md\n")
    return header + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)


def _meta(o: Options, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": o.namespace}
    if labels:
        meta["labels"] = dict(labels)
    return meta


def _identity(o: Options, name: str, rules: tuple[dict[str, Any], ...]
              ) -> list[dict[str, Any]]:
    role = f"svcnet:{name.removeprefix('svcnet-')}"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(o, name)},
        {"apiVersion": RBAC, "kind": "ClusterRole", "metadata": {"name": role},
         "rules": [dict(r) for r in rules]},
        {"apiVersion": RBAC, "kind": "ClusterRoleBinding", "metadata": {"name": role},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": o.namespace}]},
    ]


def config_map(o: Options) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(o, CONFIG, NODE_LABELS),
            "data": {"net-conf.json": json.dumps(net_conf(o), indent=2) + "\n",
                     "service-cidr": o.service_cidr, "dns-ip": o.dns_ip,
                     "cluster-domain": o.cluster_domain}}


def _host_path(name: str, path: str, kind: str) -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": path, "type": kind}}


def node_command(o: Options) -> list[str]:
    return [
        "svcnet", "node", "--store", "kubernetes", "--overlay", "--proxy",
        "--overlay-config", f"{CONFIG_DIR}/net-conf.json",
        "--overlay-subnet-file", SUBNET_FILE,
        "--cni-server-socket", CNI_SOCKET,
        "--proxy-mode", o.proxy_mode,
        "--proxy-cluster-cidr", o.cluster_cidr,
        "--proxy-healthz-bind-address", f"0.0.0.0:{PROXY_HEALTHZ_PORT}",
        "--proxy-metrics-bind-address", "127.0.0.1:10249",
        *(["--policy"] if o.network_policy else []),  # node name: $NODE_NAME
    ]


def cni_install_command() -> list[str]:
    return ["svcnet", "cni", "install", "--bin-dir", "/opt/cni/bin",
            "--conf-dir", "/etc/cni/net.d", "--subnet-file", SUBNET_FILE,
            "--socket", CNI_SOCKET, "--chain", "portmap"]


def node_daemonset(o: Options) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    if o.apiserver:
        host, port = o.apiserver_host_port
        env += [{"name": "KUBERNETES_SERVICE_HOST", "value": host},
                {"name": "KUBERNETES_SERVICE_PORT", "value": port}]
    cni_mounts = [{"name": "cni-bin", "mountPath": "/opt/cni/bin"},
                  {"name": "cni-conf", "mountPath": "/etc/cni/net.d"}]
    probe_port = {"port": PROXY_HEALTHZ_PORT, "scheme": "HTTP"}
    agent = {
        "name": "svcnet-node", "image": o.image, "imagePullPolicy": o.image_pull_policy,
        "command": node_command(o), "env": env,
        # privileged: the runtime mounts /proc/sys read-only otherwise, and the agent writes
        # sysctls in the host's and the pods' network namespaces (docs/deploy.md)
        "securityContext": {"privileged": True},
        "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}},
        "ports": [{"name": "healthz", "containerPort": PROXY_HEALTHZ_PORT, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/livez", **probe_port},
                          "initialDelaySeconds": 15, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 6},
        "readinessProbe": {"httpGet": {"path": "/healthz", **probe_port},
                           "periodSeconds": 5, "timeoutSeconds": 3},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "run-svcnet", "mountPath": RUN_DIR},
            {"name": "xtables-lock", "mountPath": "/run/xtables.lock"},
            {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True},
            {"name": "netns", "mountPath": "/run/netns", "mountPropagation": "HostToContainer"},
            {"name": "cni-data", "mountPath": "/var/lib/cni"},
            *cni_mounts,
        ],
    }
    install = {
        "name": "install-cni", "image": o.image, "imagePullPolicy": o.image_pull_policy,
        "command": cni_install_command(),
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": cni_mounts,
    }
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta(o, NODE, NODE_LABELS),
        "spec": {
            "selector": {"matchLabels": {"k8s-app": NODE}},
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": dict(NODE_LABELS)},
                "spec": {
                    "hostNetwork": True, "dnsPolicy": "Default",
                    "priorityClassName": "system-node-critical",
                    "serviceAccountName": NODE,
                    "tolerations": [{"operator": "Exists"}],
                    "terminationGracePeriodSeconds": 30,
                    "initContainers": [install], "containers": [agent],
                    "volumes": [
                        {"name": "config", "configMap": {"name": CONFIG}},
                        _host_path("run-svcnet", RUN_DIR, "DirectoryOrCreate"),
                        _host_path("xtables-lock", "/run/xtables.lock", "FileOrCreate"),
                        _host_path("lib-modules", "/lib/modules", "Directory"),
                        _host_path("netns", "/run/netns", "DirectoryOrCreate"),
                        _host_path("cni-data", "/var/lib/cni", "DirectoryOrCreate"),
                        _host_path("cni-bin", "/opt/cni/bin", "DirectoryOrCreate"),
                        _host_path("cni-conf", "/etc/cni/net.d", "DirectoryOrCreate"),
                    ],
                },
            },
        },
    }


def dns_command(o: Options) -> list[str]:
    return ["svcnet", "dns", "--store", "kubernetes", "--listen", "0.0.0.0:53",
            "--zone", o.cluster_domain, "--pods", o.dns_pods,
            "--health-host", "0.0.0.0", "--health-port", str(DNS_HEALTH_PORT),
            "--metrics-host", "0.0.0.0", "--metrics-port", str(DNS_METRICS_PORT),
            "--lameduck", "5",
            # one UDP worker per CPU by default: pinned, so the memory limit holds on big nodes
            "--workers", "2"]


def dns_deployment(o: Options) -> dict[str, Any]:
    probe_port = {"port": DNS_HEALTH_PORT, "scheme": "HTTP"}
    container = {
        "name": "svcnet-dns", "image": o.image, "imagePullPolicy": o.image_pull_policy,
        "command": dns_command(o),
        "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                  {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": DNS_METRICS_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "100m", "memory": "70Mi"},
                      "limits": {"memory": "170Mi"}},
        "livenessProbe": {"httpGet": {"path": "/health", **probe_port},
                          "initialDelaySeconds": 10, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 5},
        "readinessProbe": {"httpGet": {"path": "/ready", **probe_port}, "periodSeconds": 5},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(o, DNS, DNS_LABELS),
        "spec": {
            "replicas": o.dns_replicas,
            "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": dict(DNS_LABELS)},
                "spec": {
                    "serviceAccountName": DNS, "dnsPolicy": "Default",
                    "priorityClassName": "system-cluster-critical",
                    "tolerations": [
                        {"key": "CriticalAddonsOnly", "operator": "Exists"},
                        {"key": "node-role.kubernetes.io/control-plane",
                         "effect": "NoSchedule"}],
                    "affinity": {"podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [{
                            "weight": 100,
                            "podAffinityTerm": {
                                "labelSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                                "topologyKey": "kubernetes.io/hostname"}}]}},
                    # port 53 without any capability: a namespaced sysctl in the safe set
                    "securityContext": {"sysctls": [
                        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}]},
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def dns_service(o: Options) -> dict[str, Any]:
    meta = _meta(o, "kube-dns", {"k8s-app": "kube-dns", "kubernetes.io/name": "svcnet-dns"})
    meta["annotations"] = {"prometheus.io/port": str(DNS_METRICS_PORT),
                           "prometheus.io/scrape": "true"}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"selector": {"k8s-app": "kube-dns"}, "clusterIP": o.dns_ip,
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                               {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                               {"name": "metrics", "port": DNS_METRICS_PORT,
                                "protocol": "TCP"}]}}


def dns_disruption_budget(o: Options) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(o, DNS, DNS_LABELS),
            "spec": {"maxUnavailable": 1,
                     "selector": {"matchLabels": {"k8s-app": "kube-dns"}}}}


# --- the command ------------------------------------------------------------------------------


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "manifests", help="print the Kubernetes objects that install svcnet (kubectl apply -f -)")
    d = Options()
    p.add_argument("--namespace", default=d.namespace)
    p.add_argument("--image", default=d.image, help="the svcnet image (Containerfile)")
    p.add_argument("--image-pull-policy", default=d.image_pull_policy,
                   choices=("IfNotPresent", "Always", "Never"))
    p.add_argument("--cluster-cidr", default=d.cluster_cidr,
                   help="pod network (kube-controller-manager --cluster-cidr)")
    p.add_argument("--subnet-len", type=int, default=d.subnet_len,
                   help="prefix length of each node's pod subnet (--node-cidr-mask-size)")
    p.add_argument("--service-cidr", default=d.service_cidr,
                   help="kube-apiserver --service-cluster-ip-range")
    p.add_argument("--dns-ip", default="", help="kube-dns ClusterIP (default: the tenth "
                   "address of --service-cidr; the kubelets' --cluster-dns)")
    p.add_argument("--cluster-domain", default=d.cluster_domain)
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--proxy-mode", choices=PROXY_MODES, default=d.proxy_mode)
    p.add_argument("--apiserver", default="", metavar="HOST:PORT",
                   help="where node agents reach the API server (needed where nothing else "
                        "routes the kubernetes Service yet, i.e. without kube-proxy)")
    p.add_argument("--dns-replicas", type=int, default=d.dns_replicas)
    p.add_argument("--dns-pods", choices=("insecure", "verified", "disabled"),
                   default=d.dns_pods)
    p.add_argument("--network-policy", action="store_true",
                   help="enforce NetworkPolicy in the node agents (svcnet node --policy)")
    p.set_defaults(func=_run)


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(**{f.name: getattr(args, f.name) for f in fields(Options)})


def _run(args: argparse.Namespace) -> int:
    from svcnet.cli import UsageError

    try:
        docs = render(options_from_args(args))
    except ManifestError as err:
        raise UsageError(str(err)) from None
    sys.stdout.write(to_yaml(docs))
    return 0
