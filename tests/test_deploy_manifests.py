"""``svcnet manifests``: where each option lands, and every rendering accepted by a real
kube-apiserver (server-side dry-run), with RBAC that lets the node agent and DNS do exactly
their work."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from svcnet.cni.overlay.config import parse_network_config

from svcnet.cli import build_parser, main
from svcnet.manifests import ManifestError, Options, render, to_yaml

ROOT = Path(__file__).resolve().parents[1]

OPTION_SETS = [
    Options(),
    Options(backend="host-gw", proxy_mode="iptables", dns_ip="10.96.0.53",
            image="registry.example/svcnet:1.2", apiserver="192.0.2.1:6443"),
    Options(proxy_mode="ipvs", cluster_cidr="10.32.0.0/12", subnet_len=26, dns_replicas=3,
            dns_pods="verified", cluster_domain="corp.local", image_pull_policy="Never"),
    Options(network_policy=True),
]


def test_network_policy_option_runs_the_enforcer_with_read_access() -> None:
    from svcnet.manifests import POLICY_RULES, node_command

    assert "--policy" not in node_command(Options())
    assert "--policy" in node_command(Options(network_policy=True))
    roles = [d for d in render(Options(network_policy=True)) if d["kind"] == "ClusterRole"]
    node_rules = next(r["rules"] for r in roles if r["metadata"]["name"].endswith("node"))
    assert all(rule in node_rules for rule in POLICY_RULES)
    plain = next(r["rules"] for r in render(Options()) if r["kind"] == "ClusterRole"
                 and r["metadata"]["name"].endswith("node"))
    assert not any(rule in plain for rule in POLICY_RULES)


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def pod_spec(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(docs, kind)["spec"]["template"]["spec"]
    return spec


def arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# --- where options land -----------------------------------------------------------------------


def test_options_land_where_they_should() -> None:
    o = Options(namespace="net", image="reg/svcnet:9", cluster_cidr="10.32.0.0/12",
                subnet_len=26, service_cidr="10.100.0.0/16", dns_ip="10.100.0.53",
                backend="host-gw", proxy_mode="ipvs", apiserver="192.0.2.1:6443",
                cluster_domain="corp.local", dns_replicas=3)
    docs = render(o)
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "net", doc["kind"]
    for binding in (d for d in docs if d["kind"] == "ClusterRoleBinding"):
        assert binding["subjects"][0]["namespace"] == "net"
    node, dns = pod_spec(docs, "DaemonSet"), pod_spec(docs, "Deployment")
    images = {c["image"] for s in (node, dns) for c in s["containers"] + s.get(
        "initContainers", [])}
    assert images == {"reg/svcnet:9"}
    agent = node["containers"][0]
    assert arg(agent["command"], "--proxy-mode") == "ipvs"
    assert arg(agent["command"], "--proxy-cluster-cidr") == "10.32.0.0/12"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["KUBERNETES_SERVICE_HOST"]["value"] == "192.0.2.1"
    assert env["KUBERNETES_SERVICE_PORT"]["value"] == "6443"
    conf = by_kind(docs, "ConfigMap")["data"]
    net = parse_network_config(conf["net-conf.json"])
    assert net.backend.type == "host-gw"
    assert net.ipv4 is not None and str(net.ipv4.network) == "10.32.0.0/12"
    assert net.ipv4.subnet_len == 26
    assert (conf["service-cidr"], conf["dns-ip"], conf["cluster-domain"]) == (
        "10.100.0.0/16", "10.100.0.53", "corp.local")
    svc = by_kind(docs, "Service", "kube-dns")["spec"]
    assert svc["clusterIP"] == "10.100.0.53"
    assert {(p["port"], p["protocol"]) for p in svc["ports"]} == {
        (53, "UDP"), (53, "TCP"), (9153, "TCP")}
    assert by_kind(docs, "Deployment")["spec"]["replicas"] == 3
    assert arg(dns["containers"][0]["command"], "--zone") == "corp.local"


def test_node_daemonset_shape() -> None:
    docs = render(Options())
    node = pod_spec(docs, "DaemonSet")
    assert node["hostNetwork"] is True
    assert node["tolerations"] == [{"operator": "Exists"}]
    assert node["priorityClassName"] == "system-node-critical"
    assert node["serviceAccountName"] == "svcnet-node"
    install, agent = node["initContainers"][0], node["containers"][0]
    assert install["command"][:3] == ["svcnet", "cni", "install"]
    assert agent["command"][:2] == ["svcnet", "node"]
    assert {"--overlay", "--proxy"} <= set(agent["command"])
    paths = {v["hostPath"]["path"] for v in node["volumes"] if "hostPath" in v}
    assert {"/run/xtables.lock", "/lib/modules", "/opt/cni/bin", "/etc/cni/net.d",
            "/run/svcnet"} <= paths
    assert agent["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["livenessProbe"]["httpGet"]["port"] == 10256
    assert agent["resources"]["requests"]
    dns = pod_spec(docs, "Deployment")
    assert dns["dnsPolicy"] == "Default"
    assert dns["affinity"]["podAntiAffinity"]
    probes = dns["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    assert by_kind(docs, "Deployment")["spec"]["replicas"] == 2
    assert by_kind(docs, "PodDisruptionBudget")["spec"]["selector"] == {
        "matchLabels": {"k8s-app": "kube-dns"}}


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: f"{o.backend}-{o.proxy_mode}")
def test_every_rendered_command_parses(opts: Options) -> None:
    """The commands in the manifests are ones our CLI accepts, with the values we meant."""
    docs = render(opts)
    parser = build_parser()
    node = pod_spec(docs, "DaemonSet")
    for container in node["initContainers"] + node["containers"] + pod_spec(
            docs, "Deployment")["containers"]:
        command = container["command"]
        assert command[0] == "svcnet"
        args = parser.parse_args(command[1:])
        if command[1] == "node":
            assert args.proxy_mode == opts.proxy_mode
            assert args.overlay_config == "/etc/svcnet/net-conf.json"
            assert args.overlay_subnet_file == args.cni_server_socket.replace(
                "cni.sock", "subnet.env")
        if command[1] == "dns":
            assert args.pods == opts.dns_pods
            assert args.health_port == 8080 and args.metrics_port == 9153


@pytest.mark.parametrize("bad, message", [
    ({"cluster_cidr": "10.244.0.0/33"}, "--cluster-cidr"),
    ({"service_cidr": "10.244.0.0/20"}, "overlaps"),
    ({"dns_ip": "10.244.0.10"}, "--dns-ip"),
    ({"dns_ip": "10.96.0.0"}, "--dns-ip"),
    ({"backend": "udp"}, "--backend"),
    ({"proxy_mode": "userspace"}, "--proxy-mode"),
    ({"apiserver": "no-port"}, "--apiserver"),
    ({"subnet_len": 16}, "--subnet-len"),
    ({"image": "a b"}, "--image"),
])
def test_bad_options_are_refused_with_the_option_named(bad: dict[str, Any], message: str
                                                       ) -> None:
    with pytest.raises(ManifestError, match=message):
        render(Options(**bad))


def test_cli_prints_yaml_and_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifests", "--proxy-mode", "iptables", "--dns-ip", "10.96.0.99"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert by_kind(docs, "Service", "kube-dns")["spec"]["clusterIP"] == "10.96.0.99"
    assert main(["manifests", "--dns-ip", "10.0.0.1"]) == 2
    assert "--dns-ip 10.0.0.1 is not a usable address" in capsys.readouterr().err


def test_checked_in_manifest_is_the_default_rendering() -> None:
    """deploy/svcnet.yaml is ``svcnet manifests`` with the defaults; regenerate it with
    ``svcnet manifests > deploy/svcnet.yaml`` when the objects change."""
    assert (ROOT / "deploy" / "svcnet.yaml").read_text() == to_yaml(render(Options()))


# --- against a real kube-apiserver ------------------------------------------------------------


def _server_dry_run(cp: Any, text: str) -> str:
    result = cp.kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)
    assert result.returncode == 0, result.stderr
    return str(result.stdout)


def test_server_side_dry_run_of_every_rendering(control_plane: Any) -> None:
    cp = control_plane
    for opts in OPTION_SETS:
        out = _server_dry_run(cp, to_yaml(render(opts)))
        assert "daemonset.apps/svcnet-node created (server dry run)" in out, out
        assert "service/kube-dns created (server dry run)" in out, out
    with cp.namespace("svcnet-deploy-ns") as ns:
        out = _server_dry_run(cp, to_yaml(render(Options(namespace=ns))))
        assert out.count("(server dry run)") == len(render(Options()))
    # the checked-in file too
    _server_dry_run(cp, (ROOT / "deploy" / "svcnet.yaml").read_text())


def test_server_refuses_a_dns_ip_outside_its_service_range(control_plane: Any) -> None:
    """The dry-run is not a rubber stamp: a rendering for another service CIDR is refused."""
    text = to_yaml(render(Options(service_cidr="10.112.0.0/16")))
    result = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=text,
                                   check=False)
    assert result.returncode != 0
    assert "10.112.0.10" in result.stderr


def _can_i(cp: Any, account: str, verb: str, resource: str) -> bool:
    resource, _, sub = resource.partition("/")
    result = cp.kubectl("auth", "can-i", verb, resource, "--all-namespaces",
                        f"--as={account}", *([f"--subresource={sub}"] if sub else []),
                        check=False)
    return result.stdout.strip() == "yes"


NODE_ALLOWED = [("list", "nodes"), ("watch", "nodes"), ("get", "nodes"),
                ("patch", "nodes/status"), ("list", "services"), ("watch", "services"),
                ("list", "endpointslices.discovery.k8s.io"),
                ("watch", "endpointslices.discovery.k8s.io")]
NODE_DENIED = [("list", "secrets"), ("get", "secrets"), ("update", "nodes"),
               ("create", "nodes"), ("patch", "nodes"), ("delete", "nodes"),
               ("list", "pods"), ("list", "configmaps"), ("create", "services"),
               ("update", "endpointslices.discovery.k8s.io"), ("update", "nodes/status")]
DNS_ALLOWED = [("list", "services"), ("watch", "services"),
               ("list", "endpointslices.discovery.k8s.io")]
DNS_DENIED = [("list", "secrets"), ("list", "pods"), ("list", "nodes"),
              ("create", "services"), ("list", "configmaps")]


@pytest.fixture(scope="module")
def applied(control_plane: Any) -> Any:
    """The manifests applied for real into a namespace of their own (no kubelet runs their
    pods here), removed afterwards with the cluster-scoped RBAC objects."""
    cp = control_plane
    opts = Options(namespace="svcnet-deploy-rbac", dns_ip="10.96.201.53")
    text = to_yaml(render(opts))
    with cp.namespace(opts.namespace):
        cp.kubectl("apply", "-f", "-", input=text)
        try:
            yield cp, opts
        finally:
            cp.kubectl("delete", "-f", "-", "--wait=false", "--ignore-not-found",
                       input=text, check=False)


def test_rbac_is_least_privilege(applied: Any) -> None:
    cp, opts = applied
    node = f"system:serviceaccount:{opts.namespace}:svcnet-node"
    dns = f"system:serviceaccount:{opts.namespace}:svcnet-dns"
    assert [c for c in NODE_ALLOWED if not _can_i(cp, node, *c)] == []
    assert [c for c in NODE_DENIED if _can_i(cp, node, *c)] == []
    assert [c for c in DNS_ALLOWED if not _can_i(cp, dns, *c)] == []
    assert [c for c in DNS_DENIED if _can_i(cp, dns, *c)] == []


def test_node_agent_informers_and_lease_work_with_the_node_token(applied: Any,
                                                                 tmp_path: Path) -> None:
    """Real requests with the svcnet-node ServiceAccount's bound token: the informers list
    and watch Services, EndpointSlices and Nodes; the overlay publishes its VTEP annotations
    by patching nodes/status; Secrets stay out of reach."""
    from svcnet.cni.overlay.lease import KubeSubnetManager, LeaseAttrs
    from svcnet.lab.controlplane import write_kubeconfig

    from svcnet.model import ENDPOINT_SLICE, NODE, SERVICE
    from svcnet.store.kubernetes import KubernetesStore
    from svcnet.watch import InformerFactory

    cp, opts = applied
    token = cp.kubectl("create", "token", "svcnet-node", "-n", opts.namespace,
                       "--duration=1h").stdout.strip()
    config = write_kubeconfig(tmp_path / "node.kubeconfig", cp.url, cp.layout.ca_crt,
                              {"token": token})
    name = f"deploy-rbac-{int(time.time())}"
    cp.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
               "spec": {"podCIDR": "10.244.77.0/24", "podCIDRs": ["10.244.77.0/24"]}}])

    async def run() -> None:
        store = KubernetesStore.from_config(kubeconfig=str(config), context=None)
        factory = InformerFactory(store)
        try:
            informers = [factory.informer(k) for k in (SERVICE, ENDPOINT_SLICE)]
            nodes = factory.informer(NODE)
            factory.start()
            for informer in [*informers, nodes]:
                await informer.wait_synced(30)
            cfg = parse_network_config(json.dumps(
                {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}))
            manager = KubeSubnetManager(store, nodes, name, cfg, wait_timeout=30)
            lease = await manager.acquire(cfg, LeaseAttrs(public_ip="192.0.2.77",
                                                          backend_type="vxlan"))
            assert str(lease.subnet) == "10.244.77.0/24"
            status, _ = await store.call("GET", "/api/v1/secrets")
            assert status == 403
            status, _ = await store.call("GET", f"/api/v1/namespaces/{opts.namespace}/secrets")
            assert status == 403
        finally:
            await factory.stop()
            await store.close()

    try:
        asyncio.run(run())
        got = json.loads(cp.kubectl("get", "node", name, "-o", "json").stdout)
        annotations = got["metadata"]["annotations"]
        assert annotations["flannel.alpha.coreos.com/public-ip"] == "192.0.2.77"
        assert annotations["flannel.alpha.coreos.com/backend-type"] == "vxlan"
    finally:
        cp.kubectl("delete", "node", name, "--wait=false", check=False)



def test_controllers_create_the_pods(applied: Any) -> None:
    """The real DaemonSet and Deployment controllers accept the templates: one node-agent pod
    per Node (bound to it, the node name from the downward API, the ServiceAccount token
    projected by admission), and the DNS replicas."""
    cp, opts = applied
    name = f"deploy-ds-{int(time.time())}"
    cp.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}])
    room = {"cpu": "4", "memory": "8Gi", "pods": "110"}  # what a kubelet would report
    cp.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p",
               json.dumps({"status": {"capacity": room, "allocatable": room}}))

    def pods(selector: str) -> list[dict[str, Any]]:
        out = cp.kubectl("get", "pods", "-n", opts.namespace, "-l", selector, "-o", "json")
        items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
        return items

    def node_pod() -> dict[str, Any] | None:
        for pod in pods("k8s-app=svcnet-node"):
            terms = pod["spec"].get("affinity", {}).get("nodeAffinity", {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution", {}).get(
                "nodeSelectorTerms", [])
            if any(f.get("values") == [name] for t in terms
                   for f in t.get("matchFields", [])):
                return pod
        return None

    try:
        deadline = time.monotonic() + 60
        while (pod := node_pod()) is None or pod["spec"].get("nodeName") != name:
            assert time.monotonic() < deadline, "no scheduled svcnet-node pod for the node"
            time.sleep(0.5)
        spec = pod["spec"]
        assert spec["hostNetwork"] is True
        assert [c["name"] for c in spec["initContainers"]] == ["install-cni"]
        assert spec["containers"][0]["securityContext"]["privileged"] is True
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
        projected = [v for v in spec["volumes"] if "projected" in v]
        assert projected and any("serviceAccountToken" in s
                                 for s in projected[0]["projected"]["sources"])
        while len(pods("k8s-app=kube-dns")) < 2:
            assert time.monotonic() < deadline, "the DNS Deployment made fewer than 2 pods"
            time.sleep(0.5)
    finally:
        cp.kubectl("delete", "node", name, "--wait=false", check=False)
