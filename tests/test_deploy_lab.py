"""svcnet installed from its manifests on a real control plane (issue 16, point 4).

``svcnet lab up --control-plane kubernetes --deploy manifests`` starts nodes with no svcnet
daemon and applies ``svcnet manifests`` with kubectl; the real DaemonSet and Deployment
controllers create the pods and the lab's node agents run them (netns-lab/podrun.py). One
lab for the module (the control plane is the expensive part); the tests run in file order
and the last one deletes the manifests.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import lab_in_sync, require_root, running_lab, until, wait_for
from svcnet.lab.cluster import lab_command
from svcnet.lab.demo import DEMO_MANIFEST, echo_call, resolve
from svcnet.lab.k8s import kubectl_argv
from svcnet.lab.netns import NETNS_DIR
from svcnet.lab.procs import Procs
from svcnet.lab.state import LabConfig

pytestmark = [pytest.mark.kernel]

HOST_PATHS = ("/etc/svcnet", "/run/svcnet", "/opt/cni/bin/svcnet-cni", "/var/lib/cni",
              "/run/secrets/kubernetes.io", "/etc/cni/net.d/10-svcnet.conflist")
SVCNET_FILES = ("etc/cni/net.d/10-svcnet.conflist", "opt/cni/bin/svcnet-cni",
                "opt/cni/bin/svcnet-cni-inprocess", "opt/cni/bin/svcnet-ipam",
                "run/svcnet/subnet.env", "run/svcnet/cni.sock", "run/svcnet/cni.sock.lock")

# Restarted on liveness failure (nothing listens on 9999); env from the downward API and
# the ConfigMap the manifests made.
PROBE_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: probed, namespace: kube-system}
spec:
  nodeName: n1
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: localhost/svcnet:test
    command: [python3, -m, svcnet.lab.echo, serve, --name, probed, --tcp, "8080"]
    args: ["--udp", "$(UDP_PORT)"]
    env:
    - {name: UDP_PORT, value: "5353"}
    - {name: MY_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: MY_NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    - {name: DNS_IP, valueFrom: {configMapKeyRef: {name: svcnet-config, key: dns-ip}}}
    ports: [{containerPort: 8080}]
    readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
    livenessProbe: {httpGet: {path: /, port: 9999}, periodSeconds: 1, failureThreshold: 2}
"""

LOADER = """\
import os, sys, time
from svcnet.lab.echo import http_get
targets, stop = sys.argv[1:3], sys.argv[3]
deadline = time.monotonic() + 240
for i in range(20000):
    if os.path.exists(stop) or time.monotonic() > deadline:
        break
    target = targets[i % len(targets)]
    try:
        print(f"{time.time():.3f} ok {target} {http_get(target, 2.0)}", flush=True)
    except OSError as err:
        print(f"{time.time():.3f} ERROR {target} {type(err).__name__}: {err}", flush=True)
    time.sleep(0.02)
"""


def kubectl(cfg: LabConfig, *args: str, timeout: float = 60, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", "netns", "exec", cfg.control_ns, *kubectl_argv(cfg, *args)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
    return proc


def pods(cfg: LabConfig, selector: str, namespace: str = "kube-system") -> list[dict[str, Any]]:
    out = kubectl(cfg, "get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", ()))


def sandbox(cfg: LabConfig, namespace: str, name: str) -> dict[str, Any]:
    for rec in (cfg.dir / "nodes").glob("*/pods/*.json"):
        data: dict[str, Any] = json.loads(rec.read_text())
        if data["key"] == f"{namespace}/{name}":
            return data
    raise AssertionError(f"no sandbox for {namespace}/{name}")


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(
        payload) % 4)))
    return claims


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabConfig]:
    before = {p: os.path.lexists(p) for p in HOST_PATHS}
    try:
        with running_lab(tmp_path_factory.mktemp("deploy-lab"), "d", nodes=2,
                         binaries=("nft", "iptables-save", "perl"), needs=(),
                         deploy="manifests") as cfg:
            manifest = cfg.dir / "demo.yaml"
            manifest.write_text(DEMO_MANIFEST % {"client_node": "n2"})
            lab_command(cfg, "apply", "-f", str(manifest), "--lab-dir", cfg.lab_dir)
            lab_command(cfg, "wait-ready", "--pods", "--timeout", "90", "--lab-dir",
                        cfg.lab_dir, timeout=120)
            yield cfg
    finally:
        # Containers saw their own /etc/svcnet, /run/svcnet ...: none of it reached the host.
        assert {p: os.path.lexists(p) for p in HOST_PATHS} == before


def test_no_daemon_started_by_the_lab(lab: LabConfig) -> None:
    names = {rec.name for rec in Procs(lab.dir).all()}
    assert not any(n.startswith("node-") for n in names), names
    assert {f"kubelet-{n}" for n in lab.node_names} <= names


def test_controllers_pods_run_with_their_volumes_env_and_token(lab: LabConfig) -> None:
    agents = pods(lab, "k8s-app=svcnet-node")
    assert sorted(p["spec"]["nodeName"] for p in agents) == lab.node_names
    assert all(ready(p) for p in agents), agents
    ca = (lab.dir / "k8s" / "pki" / "ca.crt").read_text()
    for pod in agents:
        node, name = pod["spec"]["nodeName"], pod["metadata"]["name"]
        assert pod["status"]["podIP"] == lab.node_ip(node)  # hostNetwork
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
        assert [(i["name"], i["state"]["terminated"]["reason"])
                for i in pod["status"]["initContainerStatuses"]] == [("install-cni", "Completed")]
        # the init container ran first and installed the CNI files into this node's dirs
        assert (lab.node_dir(node) / "etc/cni/net.d/10-svcnet.conflist").is_file()
        assert (lab.node_dir(node) / "opt/cni/bin/svcnet-cni").is_file()
        sb = sandbox(lab, "kube-system", name)
        env = environ(sb["pid"])
        assert env["NODE_NAME"] == node and env["POD_NAME"] == name
        assert env["KUBERNETES_SERVICE_HOST"] == lab.etcd_ip(1)  # --apiserver
        # The container's own view (/proc/PID/root is its mount namespace).
        root = Path(f"/proc/{sb['pid']}/root")
        assert json.loads((root / "etc/svcnet/net-conf.json").read_text())["Network"] == \
            "10.244.0.0/16"
        sa = root / "run/secrets/kubernetes.io/serviceaccount"  # /var/run -> /run
        assert (sa / "ca.crt").read_text() == ca
        assert (sa / "namespace").read_text() == "kube-system"
        claims = jwt_claims((sa / "token").read_text())
        assert claims["sub"] == "system:serviceaccount:kube-system:svcnet-node"
        assert claims["kubernetes.io"]["pod"]["name"] == name  # bound to the pod
        assert claims["exp"] - claims["iat"] >= 3600
        assert (root / "run/svcnet/subnet.env").read_text() == (
            lab.node_dir(node) / "run/svcnet/subnet.env").read_text()
    dns = pods(lab, "k8s-app=kube-dns")
    assert len(dns) == 2 and all(ready(p) for p in dns), dns
    cidrs = {n["metadata"]["name"]: n["spec"]["podCIDR"] for n in json.loads(
        kubectl(lab, "get", "nodes", "-o", "json").stdout)["items"]}
    import ipaddress

    for pod in dns:
        # an address from the CNI the init container installed, in the node's podCIDR
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(
            cidrs[pod["spec"]["nodeName"]]), (pod["status"], cidrs)
        env = environ(sandbox(lab, "kube-system", pod["metadata"]["name"])["pid"])
        assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"  # as a kubelet sets it


def answers_all(lab: LabConfig, url: str, n: int) -> bool:
    answers = echo_call(lab, "client", url, n)
    return len(answers) == n and not [a for a in answers if a.startswith("ERROR")]


def test_demo_checks_pass(lab: LabConfig) -> None:
    """DNS through kube-dns (the svcnet-dns pods), ClusterIP and NodePort balance across
    both nodes."""
    answer = wait_for(lambda: (a := resolve(lab, "client", "web"))[:1].isdigit() and a, 30,
                      "web to resolve", 0.5)
    assert answer.startswith("10.96."), answer
    web = {p["metadata"]["name"]: p["spec"]["nodeName"]
           for p in pods(lab, "app=web", namespace="default")}
    node_port = json.loads(kubectl(lab, "get", "svc", "web", "-o", "json").stdout)[
        "spec"]["ports"][0]["nodePort"]
    for target in ("http://web/", f"http://{lab.node_ip('n1')}:{node_port}/"):
        # Ready pods reach the proxies through the EndpointSlice controller a moment later
        # (as on any cluster); from the first full answer on, nothing may fail.
        wait_for(lambda url=target: answers_all(lab, url, 4), 15, f"{target} to answer", 0.5)
        seen: set[str] = set()
        for _ in range(10):
            answers = echo_call(lab, "client", target, 12)
            assert len(answers) == 12 and not [a for a in answers if a.startswith("ERROR")], \
                answers
            seen |= {web[a] for a in answers}
            if seen == set(lab.node_names):
                break
        assert seen == set(lab.node_names), (target, seen)
    assert_kernels_match_the_api(lab)


def assert_kernels_match_the_api(lab: LabConfig) -> None:
    """Every node's kernel against the desired state recomputed from the API server, with the
    flags the DaemonSet's pod on that node runs with (``lab verify``)."""
    reports = lab_in_sync(lab, 30)
    assert all(r["overlay"]["peers"] == len(lab.node_names) - 1 for r in reports), reports


def test_liveness_failure_restarts_and_env_is_resolved(lab: LabConfig) -> None:
    path = lab.dir / "probed.yaml"
    path.write_text(PROBE_POD)
    kubectl(lab, "apply", "-f", str(path))
    try:
        def restarted() -> bool:
            out = kubectl(lab, "get", "pod", "probed", "-n", "kube-system", "-o", "json",
                          check=False).stdout
            statuses = json.loads(out or "{}").get("status", {}).get("containerStatuses", [])
            return bool(statuses) and statuses[0].get("restartCount", 0) >= 1

        wait_for(restarted, 60, "a restart after the liveness probe failed", 0.5)
        sb = sandbox(lab, "kube-system", "probed")
        env = environ(sb["pid"])
        assert env["MY_IP"] == sb["ip"] and env["MY_NODE"] == "n1"
        assert env["DNS_IP"] == "10.96.0.10"
        cmdline = Path(f"/proc/{sb['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"5353" in cmdline  # $(UDP_PORT) expanded
    finally:
        kubectl(lab, "delete", "-f", str(path), "--wait=false", check=False)


def test_rollout_restart_of_the_daemonset_fails_no_request(lab: LabConfig,
                                                            tmp_path: Path) -> None:
    """ClusterIP and NodePort requests from a pod while every node agent is replaced: the
    rules stay in the kernel while the daemon restarts (no flush on SIGTERM)."""
    old = {p["metadata"]["name"] for p in pods(lab, "k8s-app=svcnet-node")}
    node_port = json.loads(kubectl(lab, "get", "svc", "web", "-o", "json").stdout)[
        "spec"]["ports"][0]["nodePort"]
    stop = tmp_path / "stop"
    loader = subprocess.Popen(
        ["ip", "netns", "exec", lab.pod_ns("default", "client"), lab.python, "-c", LOADER,
         "http://web/", f"http://{lab.node_ip('n1')}:{node_port}/", str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        began = time.time()
        kubectl(lab, "-n", "kube-system", "rollout", "restart", "daemonset/svcnet-node")
        kubectl(lab, "-n", "kube-system", "rollout", "status", "daemonset/svcnet-node",
                "--timeout=150s", timeout=180)
        rolled = time.time()
        time.sleep(2)
    finally:
        stop.touch()
        out, err = loader.communicate(timeout=30)
    new = {p["metadata"]["name"] for p in pods(lab, "k8s-app=svcnet-node")}
    assert len(new) == len(lab.node_names) and not new & old, (old, new)
    lines = out.splitlines()
    failed = [line for line in lines if " ERROR " in line]
    stamps = [float(line.split()[0]) for line in lines]
    print(f"rollout restart took {rolled - began:.1f}s; {len(lines)} requests, "
          f"{len(failed)} failed", file=sys.stderr)
    assert stamps and stamps[0] < began and stamps[-1] > rolled, (err, lines[:3])
    assert len(lines) >= 50, (err, lines)
    assert not failed, failed[:10]
    assert_kernels_match_the_api(lab)  # the new agents adopted and kept the node's state


def test_deleting_the_manifests_removes_everything(lab: LabConfig) -> None:
    kubectl(lab, "delete", "-f", str(lab.dir / "svcnet.yaml"), timeout=120)

    def leftovers() -> list[str]:
        out = []
        for node in lab.node_names:
            ns = lab.node_ns(node)
            tables = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"],
                                    capture_output=True, text=True, check=True).stdout
            out += [f"{node}: {t}" for t in tables.splitlines() if "svcnet" in t]
            for save in ("iptables-save", "ip6tables-save"):
                dump = subprocess.run(["ip", "netns", "exec", ns, save], capture_output=True,
                                      text=True, check=False).stdout
                # only built-in chains with no rules may stay (what an empty table lists)
                out += [f"{node}: {line}" for line in dump.splitlines()
                        if line.startswith("-A ") or (line.startswith(":") and line.split()[
                            0][1:] not in ("INPUT", "OUTPUT", "FORWARD", "PREROUTING",
                                           "POSTROUTING"))]
            links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True,
                                   text=True, check=True).stdout
            out += [f"{node}: {line.split(':')[1].strip()}" for line in links.splitlines()
                    if line.split(":")[1].strip().startswith("flannel")]
            out += [f"{node}: {f}" for f in SVCNET_FILES
                    if (lab.node_dir(node) / f).exists()]
        if pods(lab, "k8s-app=svcnet-node") or pods(lab, "k8s-app=kube-dns"):
            out.append("svcnet pods still there")
        return out

    left: list[str] = []

    def clean() -> bool:
        nonlocal left
        left = leftovers()
        return not left

    assert until(clean, 90, 0.5), left
    # the node agents keep running the other pods
    assert (NETNS_DIR / lab.pod_ns("default", "client")).exists()


# --- the node agent's pieces, without a lab ---------------------------------------------------


def test_field_refs_and_var_expansion() -> None:
    from svcnet.lab.podrun import PodError, expand, field_value

    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"a": "b"}},
           "spec": {"nodeName": "n2", "serviceAccountName": "sa"}}
    got = {path: field_value(pod, path, "n2", "10.244.2.5", "10.250.1.2") for path in (
        "metadata.name", "metadata.namespace", "spec.nodeName", "status.podIP",
        "status.hostIP", "spec.serviceAccountName", "metadata.labels['a']")}
    assert got == {"metadata.name": "p", "metadata.namespace": "ns", "spec.nodeName": "n2",
                   "status.podIP": "10.244.2.5", "status.hostIP": "10.250.1.2",
                   "spec.serviceAccountName": "sa", "metadata.labels['a']": "b"}
    with pytest.raises(PodError, match="not supported"):
        field_value(pod, "spec.containers", "n2", "", "")
    env = {"A": "1", "B": "x"}
    assert expand("$(A)-$(B)-$(C)-$$(A)", env) == "1-x-$(C)-$(A)"


def test_liveness_counts_failures_in_a_row() -> None:
    from svcnet.lab.podrun import Liveness

    probe = {"initialDelaySeconds": 5, "periodSeconds": 2, "failureThreshold": 3}
    state = Liveness(started=100.0)
    assert not state.due(probe, 104.0) and state.due(probe, 105.0)
    assert not state.record(probe, False, 105.0) and not state.due(probe, 106.0)
    assert not state.record(probe, False, 107.0)
    assert not state.record(probe, True, 109.0)  # a success resets the count
    assert not state.record(probe, False, 111.0) and not state.record(probe, False, 113.0)
    assert state.record(probe, False, 115.0)


def test_host_paths_map_to_the_node_and_atomic_writes(tmp_path: Path) -> None:
    from svcnet.lab.podrun import host_path, write_atomic

    cfg = LabConfig(name="x", nodes=2, lab_dir=str(tmp_path))
    assert host_path(cfg, "n2", "/etc/cni/net.d/") == tmp_path / "nodes/n2/etc/cni/net.d"
    assert host_path(cfg, "n1", "/run/xtables.lock") == tmp_path / "nodes/n1/run/xtables.lock"
    assert host_path(cfg, "n1", "/run/netns") == (
        Path("/run/netns") if Path("/run/netns").exists() else tmp_path / "nodes/n1/run/netns")
    d = tmp_path / "sa"
    write_atomic(d, {"token": b"one", "ca.crt": b"ca"})
    first = (d / "..data").resolve()
    write_atomic(d, {"token": b"two", "ca.crt": b"ca"})
    assert (d / "token").read_text() == "two" and (d / "token").is_symlink()
    assert not first.exists()  # the old generation is removed after the swap
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith("..")) == [
        "ca.crt", "token"]


def test_projected_token_from_token_request_and_its_rotation(control_plane: Any,
                                                              tmp_path: Path) -> None:
    """The projected volume the API server's admission adds to a pod, written as the node
    agent writes it: a TokenRequest token bound to the pod, the cluster CA, the namespace;
    rewritten (a new token, atomically) once 80% of its lifetime has passed."""
    import asyncio

    from svcnet.lab.podrun import TOKEN_SECONDS, PodRunner

    from svcnet.store.open import open_store

    cp = control_plane
    with cp.namespace(f"podrun-{os.getpid()}") as ns:
        cp.kubectl("create", "serviceaccount", "agent", "-n", ns)
        cp.apply([{"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "p", "namespace": ns},
                   "spec": {"serviceAccountName": "agent",
                            "containers": [{"name": "c", "image": "localhost/svcnet:t"}]}}])
        pod = json.loads(cp.kubectl("get", "pod", "p", "-n", ns, "-o", "json").stdout)
        volume = next(v for v in pod["spec"]["volumes"] if "projected" in v)
        cfg = LabConfig(name="t", nodes=1, lab_dir=str(tmp_path))

        async def run() -> tuple[dict[str, Any], dict[str, Any], float, bool]:
            store = open_store("kubernetes", kubeconfig=str(cp.admin_kubeconfig))
            try:
                runner = PodRunner(cfg, "n1", store)
                start = time.time()
                await runner.write_volumes(pod, "10.244.1.9")
                d = runner.volume_path(pod, volume)
                first = jwt_claims((d / "token").read_text())
                assert (d / "ca.crt").read_text() == cp.layout.ca_crt.read_text()
                assert (d / "namespace").read_text() == ns
                due = runner.refresh_at[pod["metadata"]["uid"]] - start
                not_yet = await runner.refresh(pod, "10.244.1.9")
                await asyncio.sleep(1.1)  # a new iat
                runner.refresh_at[pod["metadata"]["uid"]] = 0.0  # as if 80% had passed
                assert await runner.refresh(pod, "10.244.1.9")
                return first, jwt_claims((d / "token").read_text()), due, not_yet
            finally:
                await store.close()

        first, second, due, not_yet = asyncio.run(run())
    assert first["kubernetes.io"]["pod"]["uid"] == pod["metadata"]["uid"]
    assert first["sub"] == f"system:serviceaccount:{ns}:agent"
    assert 0.75 * TOKEN_SECONDS < due <= 0.8 * TOKEN_SECONDS + 5 and not not_yet
    assert second["iat"] > first["iat"]
    assert second["kubernetes.io"]["pod"] == first["kubernetes.io"]["pod"]


def test_the_local_install_stays_visible_under_a_volume_over_it(tmp_path: Path) -> None:
    """The image's command runs from the local install: a volume over the checkout (the DNS
    pod's emptyDir on /tmp when CI clones into /tmp) must not hide it."""
    require_root()
    from svcnet.lab.podrun import Bind, ContainerSpec, install_binds, mountexec_argv, venv_bin

    import svcnet

    cfg = LabConfig(name="t", nodes=1, lab_dir=str(tmp_path), python=sys.executable)
    checkout = str(Path(svcnet.__file__).resolve().parents[1])
    empty = tmp_path / "empty"
    empty.mkdir()
    covering = Bind(str(empty), checkout)
    assert install_binds(cfg, ["/nowhere"]) == []
    spec_path = tmp_path / "spec.json"
    ContainerSpec(argv=("svcnet", "--version"), env={"PATH": venv_bin(cfg) + ":/usr/bin:/bin"},
                  scratch=str(tmp_path / "scratch"),
                  binds=(covering, *install_binds(cfg, [checkout]))).write(spec_path)
    done = subprocess.run(mountexec_argv(cfg, spec_path), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and svcnet.__version__ in done.stdout, done.stderr
