"""End-to-end tests on a real 3-node lab, modelled on the Kubernetes network e2e tests.

One lab is built per module (a few seconds) and always torn down. Pods run the lab's echo
server; the client pods call through real sockets with the pod's own resolv.conf.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require, require_binary, require_root
from svcnet.lab.cluster import component_available, down, lab_command, up
from svcnet.lab.demo import echo_call, pod_exec, resolve
from svcnet.lab.netns import RealKernel
from svcnet.lab.state import LabConfig

pytestmark = [pytest.mark.kernel, pytest.mark.etcd]

MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: svcnet/echo
        ports: [{name: http, containerPort: 8080}, {name: udp, containerPort: 5353,
                 protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: udp, port: 53, targetPort: udp,
           protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {name: client1}
spec: {nodeName: n1, containers: [{name: c, image: svcnet/echo}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client3}
spec: {nodeName: n3, containers: [{name: c, image: svcnet/echo}]}
"""


def until(check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``check`` until truthy or ``timeout``; return its last value."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = check()
    return value


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabConfig]:
    require_root()
    require_binary("ip", "etcd", "nsenter")
    root = tmp_path_factory.mktemp("lab")
    name = f"t{os.getpid() % 10_000_000}"
    cfg = LabConfig(name=name, nodes=3, lab_dir=str(root / name), python=sys.executable,
                    cni="auto", overlay="auto")
    cfg = up(cfg, RealKernel(), lambda msg: print(msg, file=sys.stderr))
    try:
        manifest = Path(cfg.lab_dir) / "e2e.yaml"
        manifest.write_text(MANIFEST)
        lab_command(cfg, "apply", "-f", str(manifest), "--lab-dir", cfg.lab_dir)
        lab_command(cfg, "wait-ready", "--pods", "--timeout", "60", "--lab-dir", cfg.lab_dir,
                    timeout=90)
        yield cfg
    finally:
        down(Path(cfg.lab_dir), RealKernel(), lambda msg: None)


def objects(cfg: LabConfig, kind: str) -> list[dict[str, Any]]:
    proc = lab_command(cfg, "status", "--lab-dir", cfg.lab_dir)  # proves status works too
    assert "NODE" in proc.stdout
    out = pod_exec_control(cfg, "get", kind, "-A", "-o", "json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def pod_exec_control(cfg: LabConfig, *args: str) -> str:
    import subprocess

    proc = subprocess.run(["nsenter", f"--net=/var/run/netns/{cfg.control_ns}",
                           *cfg.svcnet_argv, *args, "--store", cfg.store_url],
                          capture_output=True, text=True, timeout=30, check=True)
    return proc.stdout


def web_pods(cfg: LabConfig) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in objects(cfg, "pods")
            if p["metadata"]["name"].startswith("web-")
            and not p["metadata"].get("deletionTimestamp")}


def test_pods_spread_ready_with_ips_and_endpoint_slices(lab: LabConfig) -> None:
    pods = web_pods(lab)
    assert sorted(p["spec"]["nodeName"] for p in pods.values()) == ["n1", "n2", "n3"]
    assert all(p["status"]["podIP"] for p in pods.values())
    slices = [s for s in objects(lab, "endpointslices")
              if s["metadata"]["labels"]["kubernetes.io/service-name"] == "web"]
    eps = [e for s in slices for e in s["endpoints"]]
    assert sorted(e["addresses"][0] for e in eps) == sorted(
        p["status"]["podIP"] for p in pods.values())
    assert all(e["conditions"]["ready"] for e in eps)
    assert {e["zone"] for e in eps} == {"zone-a", "zone-b", "zone-c"}
    assert "endpoints.kubernetes.io/last-change-trigger-time" in slices[0]["metadata"][
        "annotations"]
    ports = {(p["name"], p["protocol"], p["port"]) for p in slices[0]["ports"]}
    assert ports == {("http", "TCP", 8080), ("udp", "UDP", 5353)}


def test_pod_to_pod_same_node_and_across_nodes(lab: LabConfig) -> None:
    client_ip = next(p["status"]["podIP"] for p in objects(lab, "pods")
                     if p["metadata"]["name"] == "client1")
    for name, pod in web_pods(lab).items():
        ip = pod["status"]["podIP"]
        assert echo_call(lab, "client1", f"http://{ip}:8080/", 3) == [name] * 3
        # No masquerading inside the cluster network: the server sees the client pod's IP.
        assert echo_call(lab, "client1", f"http://{ip}:8080/clientip", 1) == [client_ip]


def test_pod_resolv_conf_points_at_kube_dns_with_search_path(lab: LabConfig) -> None:
    out = pod_exec(lab, "client3", "cat", "/etc/resolv.conf").stdout
    assert out == ("nameserver 10.96.0.10\nsearch default.svc.cluster.local "
                   "svc.cluster.local cluster.local\noptions ndots:5\n")


def test_deleted_pod_is_removed_everywhere(lab: LabConfig) -> None:
    victim = sorted(web_pods(lab))[0]
    netns = lab.pod_ns("default", victim)
    assert Path(f"/var/run/netns/{netns}").exists()
    lab_command(lab, "delete", "pod", victim, "--lab-dir", lab.lab_dir)
    assert until(lambda: not Path(f"/var/run/netns/{netns}").exists(), 10)
    assert not Path(f"/etc/netns/{netns}").exists()
    assert until(lambda: victim not in {p["metadata"]["name"]
                                        for p in objects(lab, "pods")}, 10)
    # The Deployment does not replace deleted pods by itself; scaling puts it back to 3.
    lab_command(lab, "scale", "deploy", "web", "--replicas", "3", "--lab-dir", lab.lab_dir)
    assert until(lambda: len(web_pods(lab)) == 3, 10)
    lab_command(lab, "wait-ready", "--pods", "--timeout", "30", "--lab-dir", lab.lab_dir,
                timeout=60)


def _require_proxy(lab: LabConfig) -> None:
    require(lab.proxy, "svcnet proxy is not installed (svcnet.proxy.daemon)")


def _require_dns(lab: LabConfig) -> None:
    require(lab.dns, "svcnet dns is not installed (svcnet.dns.cli)")


def test_cluster_ip_reaches_every_backend(lab: LabConfig) -> None:
    _require_proxy(lab)
    cluster_ip = next(s["spec"]["clusterIP"] for s in objects(lab, "services")
                      if s["metadata"]["name"] == "web")
    names = set(web_pods(lab))
    answers = until(lambda: (a := echo_call(lab, "client3", f"http://{cluster_ip}/", 30))
                    and set(a) == names and a, 20, 0.5)
    assert set(answers) == names


def test_node_port_from_another_node(lab: LabConfig) -> None:
    _require_proxy(lab)
    node_port = next(s["spec"]["ports"][0]["nodePort"] for s in objects(lab, "services")
                     if s["metadata"]["name"] == "web")
    names = set(web_pods(lab))
    target = f"http://{lab.node_ip('n1')}:{node_port}/"
    answers = until(lambda: set(echo_call(lab, "client3", target, 20)), 20, 0.5)
    assert answers <= names and answers


def test_dns_resolves_service_through_search_path(lab: LabConfig) -> None:
    _require_dns(lab)
    cluster_ip = next(s["spec"]["clusterIP"] for s in objects(lab, "services")
                      if s["metadata"]["name"] == "web")
    assert until(lambda: resolve(lab, "client3", "web") == cluster_ip, 15)
    assert resolve(lab, "client3", "web.default") == cluster_ip
    assert resolve(lab, "client3", "web.default.svc.cluster.local") == cluster_ip


def test_components_in_use(lab: LabConfig) -> None:
    """Records what this run exercised; under CI every component must be present."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        assert lab.cni == "svcnet" and lab.overlay == "vxlan"
    assert component_available("svcnet.lab.echo")
