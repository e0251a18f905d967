"""The lab on a real control plane (``--control-plane kubernetes``): etcd 3.5, kube-apiserver,
kube-controller-manager and kube-scheduler v1.28.7 in the lab's control namespace, node agents
speaking to them as kubelets, and svcnet's node daemons and DNS fed by the real controllers.

One 3-node lab per module, always torn down. The demo runs first and leaves its ``web``
Deployment (3 replicas, NodePort) and ``client`` pod (on n3) for the tests after it; the
control-plane kills come last.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RequestLoop, lab_in_sync, require_binary, running_lab, until
from svcnet.lab.cluster import lab_command
from svcnet.lab.demo import _show, echo_call, pod_exec, resolve
from svcnet.lab.k8s import (
    LabControlPlane,
    kubectl_argv,
    node_agent_kubeconfig,
    node_daemon_kubeconfig,
)
from svcnet.lab.netns import RealKernel
from svcnet.lab.state import POD_NETWORK, LabConfig

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

HEADLESS = """\
apiVersion: v1
kind: Service
metadata: {name: web-hl}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 8080}]
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabConfig]:
    with running_lab(tmp_path_factory.mktemp("lab"), "c", nodes=3, binaries=("dig",),
                     needs=("overlay", "proxy", "dns")) as cfg:
        yield cfg


def kubectl(cfg: LabConfig, *args: str, kubeconfig: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = kubectl_argv(cfg, *args)
    if kubeconfig:
        argv[1] = f"--kubeconfig={kubeconfig}"
    return subprocess.run(["ip", "netns", "exec", cfg.control_ns, *argv], capture_output=True,
                          text=True, timeout=timeout, check=check)


def get(cfg: LabConfig, *what: str) -> Any:
    return json.loads(kubectl(cfg, "get", *what, "-o", "json").stdout)


def web_url(cfg: LabConfig) -> str:
    """The web ClusterIP by address: the loops test the proxy, not the resolver (DNS has its
    own tests; under heavy load its exec probes can flap)."""
    return f"http://{get(cfg, 'service', 'web')['spec']['clusterIP']}/"


def web_backends(cfg: LabConfig, pod: str, n: int, timeout: float) -> set[str]:
    """Until ``n`` web backends answer through the ClusterIP in one failure-free round."""
    seen: set[str] = set()
    url = web_url(cfg)

    def round_ok() -> bool:
        nonlocal seen
        got = echo_call(cfg, pod, url, 3 * n + 3, timeout=1)
        seen = {a for a in got if a.startswith("web-")}
        return len(seen) == n and not [a for a in got if a.startswith("ERROR")]

    until(round_ok, timeout, 0.1)
    return seen


def test_demo_runs_on_the_real_control_plane(lab: LabConfig) -> None:
    assert _show(lab, 9, lambda msg: print(msg, file=sys.stderr))
    lab_in_sync(lab, 60)


def test_nodes_get_pod_cidrs_from_the_controller_manager_and_heartbeat(lab: LabConfig) -> None:
    nodes = {n["metadata"]["name"]: n for n in get(lab, "nodes")["items"]}
    assert sorted(nodes) == lab.node_names
    cidrs = {n["spec"].get("podCIDR") for n in nodes.values()}
    assert len(cidrs) == 3 and all(c and c.startswith("10.244.") for c in cidrs), cidrs
    for name, node in nodes.items():
        subnet = (lab.node_dir(name) / "subnet.env").read_text()
        gateway = node["spec"]["podCIDR"].replace(".0/24", ".1/24")
        assert f"FLANNEL_SUBNET={gateway}" in subnet, (name, subnet)
        assert f"FLANNEL_NETWORK={POD_NETWORK}" in subnet
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
    leases = get(lab, "leases", "-n", "kube-node-lease")["items"]
    assert sorted(le["spec"]["holderIdentity"] for le in leases) == lab.node_names
    # The real controllers made the web objects: a ReplicaSet, and slices with pod targets.
    assert get(lab, "replicasets", "-l", "app=web")["items"]
    [slice_] = get(lab, "endpointslices", "-l", "kubernetes.io/service-name=web")["items"]
    assert len(slice_["endpoints"]) == 3
    assert all(e["targetRef"]["kind"] == "Pod" and e["nodeName"] in lab.node_names
               for e in slice_["endpoints"])


def test_node_identities_are_least_privilege(lab: LabConfig) -> None:
    daemon = node_daemon_kubeconfig(lab, "n1")
    agent = node_agent_kubeconfig(lab, "n1")

    def can(kubeconfig: str, *what: str) -> bool:
        proc = kubectl(lab, "auth", "can-i", *what, kubeconfig=kubeconfig, check=False)
        return proc.stdout.strip() == "yes"

    assert can(daemon, "watch", "endpointslices.discovery.k8s.io")
    assert can(daemon, "patch", "nodes", "--subresource=status")
    assert not can(daemon, "update", "nodes")
    assert not can(daemon, "list", "secrets")
    assert not can(daemon, "create", "pods")
    other = kubectl(lab, "label", "node", "n2", "x=y", kubeconfig=agent, check=False)
    assert other.returncode != 0 and 'node "n1" is not allowed to modify node "n2"' in (
        other.stderr), other.stderr
    assert kubectl(lab, "get", "secrets", "-A", kubeconfig=agent, check=False).returncode != 0


def dig_status(cfg: LabConfig, name: str) -> str:
    return pod_exec(cfg, "client", "dig", "+time=1", "+tries=2", name).stdout


def test_scale_to_zero_rejects_at_once_and_back(lab: LabConfig) -> None:
    (Path(lab.lab_dir) / "hl.yaml").write_text(HEADLESS)
    lab_command(lab, "apply", "-f", str(Path(lab.lab_dir) / "hl.yaml"), "--lab-dir", lab.lab_dir)
    assert until(lambda: resolve(lab, "client", "web-hl")[:1].isdigit(), 20)
    lab_command(lab, "scale", "deploy", "web", "--replicas", "0", "--lab-dir", lab.lab_dir)

    def rejected() -> bool:
        start = time.monotonic()
        answers = echo_call(lab, "client", "http://web/", 3, timeout=3)
        return all("ConnectionRefused" in a for a in answers) and (
            time.monotonic() - start < 3)

    assert until(rejected, 30, 0.5), "a Service scaled to zero must reject at once"
    assert until(lambda: "status: NXDOMAIN" in dig_status(lab, "web-hl.default.svc.cluster.local"),
                 20), "a headless Service without endpoints must answer NXDOMAIN"
    lab_command(lab, "scale", "deploy", "web", "--replicas", "3", "--lab-dir", lab.lab_dir)
    assert len(web_backends(lab, "client", 3, 60)) == 3
    assert until(lambda: resolve(lab, "client", "web-hl")[:1].isdigit(), 20)
    lab_in_sync(lab, 60)


def web_pod_names(cfg: LabConfig) -> set[str]:
    return {p["metadata"]["name"] for p in get(cfg, "pods", "-l", "app=web")["items"]}


def test_rollout_restart_under_50_requests_per_second_fails_none(lab: LabConfig) -> None:
    """Old pods are deleted one by one as new ones turn Ready; each deleted pod turns not
    Ready, its endpoint terminating, and it drains (lameduck) before it exits: not one of the
    requests through the ClusterIP may fail."""
    old = web_pod_names(lab)
    loop = RequestLoop(lab, "client", web_url(lab), count=9000, interval=0.02)
    try:
        time.sleep(1)
        kubectl(lab, "rollout", "restart", "deployment/web")
        kubectl(lab, "rollout", "status", "deployment/web", "--timeout=240s", timeout=260)
        assert until(lambda: not (web_pod_names(lab) & old), 90), "old pods still there"
        time.sleep(1)
    finally:
        lines = loop.stop()
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(lines) > 100 and errors == [], (len(lines), errors[:5])
    new = web_pod_names(lab)
    assert len(new) == 3 and new <= set(lines[-60:]), (new, lines[-10:])
    lab_in_sync(lab, 60)


BIG = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: big}
spec:
  replicas: 250
  selector: {matchLabels: {app: big}}
  template:
    metadata: {labels: {app: big}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: httpd
        image: busybox
        command: [sh, -c, 'mkdir -p %(www)s/$POD_NAME && echo $POD_NAME >
          %(www)s/$POD_NAME/index.html && exec busybox httpd -f -p 8080 -h %(www)s/$POD_NAME']
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: big}
spec: {selector: {app: big}, ports: [{port: 80, targetPort: 8080}]}
"""


def rulesets_hold(cfg: LabConfig, ips: set[str]) -> bool:
    for node in cfg.node_names:
        rules = subprocess.run(["ip", "netns", "exec", cfg.node_ns(node), "nft", "list",
                                "ruleset"], capture_output=True, text=True, timeout=30,
                               check=False).stdout
        if not all(f"{ip} " in rules or f"{ip}:" in rules for ip in ips):
            return False
    return True


@pytest.mark.timeout(900)
def test_a_service_of_250_endpoints_in_three_slices_balances_over_all(lab: LabConfig) -> None:
    """250 pods (busybox httpd, ~1 MB each): the real EndpointSlice controller splits them
    100/100/50; every node's proxy programs all of them; calls spread over all of them."""
    require_binary("busybox", "nft")
    www = Path(lab.lab_dir) / "www"
    (Path(lab.lab_dir) / "big.yaml").write_text(BIG % {"www": www})
    started = time.monotonic()

    def progress(what: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {what}", file=sys.stderr)

    lab_command(lab, "apply", "-f", str(Path(lab.lab_dir) / "big.yaml"), "--lab-dir", lab.lab_dir)
    try:
        slices: list[dict[str, Any]] = []

        def all_ready() -> bool:
            nonlocal slices
            slices = get(lab, "endpointslices", "-l", "kubernetes.io/service-name=big")["items"]
            return sum(1 for s in slices for e in s.get("endpoints") or ()
                       if e["conditions"].get("ready")) == 250

        assert until(all_ready, 600, 2), f"{len(slices)} slices, not 250 ready endpoints"
        progress("250 endpoints ready")
        assert sorted(len(s["endpoints"]) for s in slices) == [50, 100, 100]
        ips = {a for s in slices for e in s["endpoints"] for a in e["addresses"]}
        assert len(ips) == 250
        assert until(lambda: rulesets_hold(lab, ips), 60, 1), "a node lacks some endpoints"
        progress("all 250 in every node's ruleset")
        answers = echo_call(lab, "client", "http://big/", 600, timeout=2)
        errors = [a for a in answers if a.startswith("ERROR")]
        assert errors == [] and len(answers) == 600, errors[:5]
        # 600 uniform draws over 250 backends hit ~228 of them; far fewer means imbalance.
        assert len(set(answers)) >= 190, len(set(answers))
    finally:
        kubectl(lab, "delete", "deployment", "big", "--wait=false", check=False)
        kubectl(lab, "delete", "service", "big", "--wait=false", check=False)
        assert until(lambda: not get(lab, "pods", "-l", "app=big")["items"], 300, 2)
        progress("all 250 pods gone")


@pytest.mark.parametrize("component", ["kube-apiserver", "kube-controller-manager"])
def test_kill_9_of_a_control_plane_component_under_traffic(lab: LabConfig, component: str
                                                             ) -> None:
    """Existing services keep working while it is dead; a change made meanwhile (a scale-up)
    converges once it is back."""
    cp = LabControlPlane(lab, RealKernel())
    url = web_url(lab)
    loop = RequestLoop(lab, "client", web_url(lab), count=6000, interval=0.02)
    try:
        time.sleep(1)
        cp.kill(component)
        dead = echo_call(lab, "client", url, 6, timeout=2)
        assert [a for a in dead if a.startswith("ERROR")] == [], dead
        if component == "kube-controller-manager":
            lab_command(lab, "scale", "deploy", "web", "--replicas", "4", "--lab-dir", lab.lab_dir)
        cp.start_component(component)
        if component == "kube-apiserver":
            cp.wait_apiserver(60)
            lab_command(lab, "scale", "deploy", "web", "--replicas", "4", "--lab-dir", lab.lab_dir)
        assert len(web_backends(lab, "client", 4, 90)) == 4
    finally:
        lines = loop.stop()
        if not cp.running(component):
            cp.start_component(component)
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(lines) > 50 and errors == [], errors[:5]
    lab_command(lab, "scale", "deploy", "web", "--replicas", "3", "--lab-dir", lab.lab_dir)
    assert len(web_backends(lab, "client", 3, 60)) == 3
    lab_in_sync(lab, 60)
