"""containerd (Debian's 1.6, runc) drives svcnet-cni through the CRI, the kubelet's path.

A containerd started by the test in a :class:`svcnet.lab.runtimes.Sandbox` (own network and
private mount namespace, own root/state/sockets) has its CNI ``bin_dir``/``conf_dir`` pointing
at ``svcnet cni install``'s output (chained with the reference portmap plugin) and a sandbox
image imported offline. The CRI client :mod:`svcnet.lab.cri` runs, inspects, stops and
removes pod sandboxes. Every plugin call is recorded (environment and stdin) by a wrapper, to
check what containerd passes. The root namespaces are compared before and after the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import require, require_binary, require_root
from svcnet.lab.cri import CriClient, PodSpec, PortMapping
from svcnet.lab.runtimes import Containerd, Sandbox, root_state
from test_cni_helpers import REFERENCE_DIR

from svcnet.cli import main as svcnet_main

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

SUBNET_PREFIX = "10.89.60."
GATEWAY = "10.89.60.1"
RECORDED = ("svcnet-cni", "portmap")
WRAPPER = """#!/bin/sh
# records each call of {name} (CNI_* environment and stdin), then runs it
f={log}/$(date +%s%N)-$$-{name}
env | grep '^CNI_' | sort > "$f.env"
cat > "$f.stdin"
exec {real} "$@" < "$f.stdin"
"""


@dataclass
class Call:
    plugin: str
    env: dict[str, str]
    stdin: dict[str, Any]

    @property
    def args(self) -> dict[str, str]:
        return dict(p.split("=", 1) for p in self.env.get("CNI_ARGS", "").split(";") if p)


@dataclass
class ContainerdEnv:
    box: Sandbox
    containerd: Containerd
    cri: CriClient
    calls_dir: Path
    ipam_dir: Path

    def calls(self, container_id: str = "", command: str = "") -> list[Call]:
        out = []
        def started(path: Path) -> int:
            return int(path.name.split("-")[0])

        for env_file in sorted(self.calls_dir.glob("*.env"), key=started):
            env = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                       if "=" in line)
            stdin_file = env_file.with_suffix(".stdin")
            text = stdin_file.read_text() if stdin_file.exists() else ""
            call = Call(env_file.stem.split("-", 2)[2], env, json.loads(text) if text else {})
            if container_id and env.get("CNI_CONTAINERID") != container_id:
                continue
            if command and env.get("CNI_COMMAND") != command:
                continue
            out.append(call)
        return out

    def pod_ns(self, sandbox_id: str) -> str:
        """The pod's network namespace, as a path any process can enter."""
        pid = self.cri.pod_sandbox_status(sandbox_id).info["info"]["pid"]
        return f"/proc/{pid}/ns/net"

    def in_pod(self, sandbox_id: str, *cmd: str, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--net={self.pod_ns(sandbox_id)}", *cmd],
                              capture_output=True, text=True, check=check, timeout=30)

    def bridge_ports(self) -> list[str]:
        out = self.box.run("ip", "-o", "link", "show", "master", "cni0", check=False).stdout
        return [line.split(":", 2)[1].strip() for line in out.splitlines()]

    def ipam_files(self) -> list[str]:
        return sorted(p.name for p in self.ipam_dir.rglob(f"{SUBNET_PREFIX}*"))


def _install(base: Path) -> tuple[Path, Path, Path]:
    """The default ``svcnet cni install`` (no node daemon here: the in-process plugin
    serves), chained with portmap; every plugin containerd runs is in its one bin_dir."""
    bindir, confdir = base / "bin", base / "net.d"
    assert svcnet_main(["cni", "install", "--bin-dir", str(bindir), "--conf-dir", str(confdir),
                        "--subnet", f"{SUBNET_PREFIX}0/24", "--socket",
                        str(base / "no-daemon.sock"), "--python", sys.executable,
                        "--chain", "portmap"]) == 0
    path = confdir / "10-svcnet.conflist"
    conflist = json.loads(path.read_text())
    conflist["plugins"][0]["ipam"]["dataDir"] = str(base / "ipam")
    path.write_text(json.dumps(conflist, indent=2))
    Containerd.link_plugins(bindir, REFERENCE_DIR, ["portmap", "loopback"])
    calls = base / "calls"
    calls.mkdir()
    for name in RECORDED:
        real = bindir / f".real-{name}"
        (bindir / name).rename(real)
        (bindir / name).write_text(WRAPPER.format(name=name, log=calls, real=real))
        (bindir / name).chmod(0o755)
    return bindir, confdir, calls


@pytest.fixture(scope="module")
def ctrd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdEnv]:
    require_root()
    require_binary("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "nsenter")
    for kind in ("portmap", "loopback"):
        require(Path(REFERENCE_DIR, kind).exists(), f"needs the reference {kind} plugin")
    require(os.path.exists("/bin/busybox"), "needs busybox-static")
    base = tmp_path_factory.mktemp("containerd")
    before = root_state()
    box = Sandbox(f"snt{os.getpid()}-ctrd", base / "box")
    box.start()
    containerd: Containerd | None = None
    cri: CriClient | None = None
    try:
        bindir, confdir, calls = _install(base)
        containerd = Containerd(box, base / "containerd", bindir, confdir)
        containerd.start()
        containerd.import_busybox()
        cri = CriClient(containerd.address)
        yield ContainerdEnv(box, containerd, cri, calls, base / "ipam")
    finally:
        if cri is not None:
            cri.close()
        if containerd is not None:
            containerd.stop()
        box.close()
        subprocess.run(["rm", "-rf", str(base / "containerd" / "root")], check=False)
    after = root_state()
    deadline = time.monotonic() + 10  # killed processes may take a moment to be reaped
    while after != before and time.monotonic() < deadline:
        time.sleep(0.2)
        after = root_state()
    assert after == before, {k: sorted(set(before[k]) ^ set(after[k])) for k in before}


@pytest.fixture
def pods(ctrd: ContainerdEnv) -> Iterator[list[str]]:
    """Sandbox ids the test ran; whatever is left is stopped and removed."""
    ids: list[str] = []
    try:
        yield ids
    finally:
        for sandbox_id in ids:
            try:
                ctrd.cri.stop_pod_sandbox(sandbox_id)
                ctrd.cri.remove_pod_sandbox(sandbox_id)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise


def test_containerd_pods_get_addresses_and_reach_each_other(ctrd: ContainerdEnv,
                                                            pods: list[str]) -> None:
    assert ctrd.cri.version().runtime_api_version == "v1"
    for name in ("pa", "pb"):
        pods.append(ctrd.cri.run_pod_sandbox(PodSpec(name, namespace="team")))
    status_a, status_b = (ctrd.cri.pod_sandbox_status(s) for s in pods)
    assert status_a.ready and status_b.ready
    assert status_a.ip.startswith(SUBNET_PREFIX) and status_b.ip.startswith(SUBNET_PREFIX)
    assert status_a.ip != status_b.ip
    address = ctrd.in_pod(pods[0], "ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert f"{status_a.ip}/24" in address
    for target in (status_b.ip, GATEWAY):
        assert ctrd.in_pod(pods[0], "ping", "-c", "1", "-W", "2", target, check=False
                           ).returncode == 0, target
    assert ctrd.in_pod(pods[1], "ping", "-c", "1", "-W", "2", status_a.ip, check=False
                       ).returncode == 0
    assert ctrd.ipam_files() == sorted([status_a.ip, status_b.ip])


def test_containerd_passes_k8s_args_and_port_mappings(ctrd: ContainerdEnv, pods: list[str]
                                                      ) -> None:
    """What the CRI plugin hands the plugins: K8S_POD_* in CNI_ARGS, the conflist's version
    (1.0.0, which containerd 1.6 loads), and the pod's port mappings as runtimeConfig to the
    plugin declaring the ``portMappings`` capability, which then answers on the host."""
    spec = PodSpec("web", namespace="shop", uid="0f1e2d3c-web",
                   ports=[PortMapping(container_port=80, host_port=18080)])
    sandbox_id = ctrd.cri.run_pod_sandbox(spec)
    pods.append(sandbox_id)
    ip = ctrd.cri.pod_sandbox_status(sandbox_id).ip
    adds = ctrd.calls(sandbox_id, "ADD")
    assert [c.plugin for c in adds] == ["svcnet-cni", "portmap"]
    ours, portmap = adds
    assert ours.args["K8S_POD_NAMESPACE"] == "shop"
    assert ours.args["K8S_POD_NAME"] == "web"
    assert ours.args["K8S_POD_INFRA_CONTAINER_ID"] == sandbox_id
    assert ours.args["K8S_POD_UID"] == "0f1e2d3c-web"
    assert ours.args.get("IgnoreUnknown") in ("1", "true")
    assert ours.env["CNI_IFNAME"] == "eth0" and ours.env["CNI_NETNS"].startswith("/")
    assert ours.stdin["cniVersion"] == "1.0.0" and ours.stdin["name"] == "svcnet"
    assert "runtimeConfig" not in ours.stdin  # svcnet-cni declares no capability
    # containerd 1.6 (go-cni) writes Go field names (HostPort, ...), not the conventions'
    # camelCase: Go plugins decode either; a plugin reading these must match case-insensitively
    (mapping,) = portmap.stdin["runtimeConfig"]["portMappings"]
    assert {k.lower(): v for k, v in mapping.items() if v != ""} == {
        "hostport": 18080, "containerport": 80, "protocol": "tcp"}
    assert portmap.stdin["prevResult"]["ips"][0]["address"] == f"{ip}/24"
    server = subprocess.Popen(
        ["nsenter", f"--net={ctrd.pod_ns(sandbox_id)}", "busybox", "nc", "-l", "-p", "80",
         "-e", "echo", "svcnet-pod"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fetch = ("import socket, sys, time\n"
                 "for _ in range(100):\n"
                 "    try:\n"
                 "        s = socket.create_connection((sys.argv[1], 18080), timeout=2)\n"
                 "        break\n"
                 "    except OSError:\n"
                 "        time.sleep(0.1)\n"
                 "print(s.makefile().read().strip())\n")
        got = ctrd.box.run(sys.executable, "-c", fetch, GATEWAY, timeout=60)
        assert got.stdout.strip() == "svcnet-pod"
    finally:
        server.kill()
        server.wait(10)


def test_containerd_stop_and_remove_call_del(ctrd: ContainerdEnv, pods: list[str]) -> None:
    """StopPodSandbox runs DEL for every plugin: the address is released and the veth is
    gone; RemovePodSandbox forgets the pod, the node is as before it ran."""
    ports_before, ipam_before = ctrd.bridge_ports(), ctrd.ipam_files()
    sandbox_id = ctrd.cri.run_pod_sandbox(PodSpec("short-lived"))
    pods.append(sandbox_id)
    ip = ctrd.cri.pod_sandbox_status(sandbox_id).ip
    assert ip in ctrd.ipam_files()
    assert len(ctrd.bridge_ports()) == len(ports_before) + 1
    ctrd.cri.stop_pod_sandbox(sandbox_id)
    dels = ctrd.calls(sandbox_id, "DEL")
    assert {c.plugin for c in dels} == {"svcnet-cni", "portmap"}
    assert all(c.args["K8S_POD_NAME"] == "short-lived" for c in dels)
    assert ctrd.ipam_files() == ipam_before
    assert ctrd.bridge_ports() == ports_before
    assert not ctrd.cri.pod_sandbox_status(sandbox_id).ready
    ctrd.cri.remove_pod_sandbox(sandbox_id)
    with pytest.raises(grpc.RpcError) as err:
        ctrd.cri.pod_sandbox_status(sandbox_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_containerd_many_pods_leak_nothing(ctrd: ContainerdEnv, pods: list[str]) -> None:
    """10 pods up and down: links, addresses, firewall rules and IPAM files as before."""
    def state() -> dict[str, Any]:
        return {"links": [ln.split(":", 2)[1] for ln in
                          ctrd.box.run("ip", "-o", "link").stdout.splitlines()],
                "addrs": sorted(ln.replace(" tentative", "") for ln in  # IPv6 DAD under way
                                ctrd.box.run("ip", "-o", "addr").stdout.splitlines()),
                "nat": sorted(ln for ln in ctrd.box.run("iptables-save").stdout.splitlines()
                              if not ln.startswith(("#", ":"))),
                "ipam": ctrd.ipam_files()}

    warm = ctrd.cri.run_pod_sandbox(PodSpec("warm"))  # the bridge exists from here on
    ctrd.cri.stop_pod_sandbox(warm)
    ctrd.cri.remove_pod_sandbox(warm)
    before = state()
    for i in range(10):
        pods.append(ctrd.cri.run_pod_sandbox(PodSpec(f"p{i}")))
    assert len({ctrd.cri.pod_sandbox_status(s).ip for s in pods}) == 10
    for sandbox_id in pods:
        ctrd.cri.stop_pod_sandbox(sandbox_id)
        ctrd.cri.remove_pod_sandbox(sandbox_id)
    assert state() == before
