"""Simulated overlay nodes in network namespaces, shared by the netns tests and the bench.

Topology: one "underlay" namespace holding a bridge (the L2 segment between nodes) and,
optionally, etcd listening on the bridge's address; one namespace per node with ``eth0`` on
that bridge; one namespace per pod, wired by veth to a ``cni0`` bridge in its node. Nothing is
created in the caller's namespace; the caller supplies the namespace factory (the tests'
``netns`` fixture, or ``NamespacePool`` here for the bench) so cleanup stays in one place.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

UNDERLAY_NET = ipaddress.IPv4Network("10.99.0.0/24")
UNDERLAY_NET6 = ipaddress.IPv6Network("fd99::/64")
ETCD_PORT = 2379
_link_ids = itertools.count()
"""Veth names unique in this process: a deleted namespace's veth peers vanish lazily."""


def sh(*argv: str, check: bool = True, timeout: float = 30, input: str | None = None
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout,
                          input=input)


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 30,
          input: str | None = None) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout, input=input)


def batch(ns: str, lines: Sequence[str]) -> None:
    sh("ip", "-n", ns, "-batch", "-", input="".join(f"{ln}\n" for ln in lines))


class NamespacePool:
    """Namespaces for the bench: all deleted (and their processes killed) on ``close``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.made: list[str] = []

    def __call__(self, tag: str = "ns") -> str:
        name = f"{self.prefix}-{tag}{len(self.made)}"[:40]
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def close(self) -> None:
        for name in reversed(self.made):
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "delete", name, check=False)
        self.made.clear()


@dataclass
class SimNode:
    name: str
    ns: str
    index: int
    ip: str
    ip6: str
    subnet_file: Path
    listen_port: int = 9475
    daemon: subprocess.Popen[bytes] | None = None
    pods: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        text = self.subnet_file.read_text() if self.subnet_file.exists() else ""
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@dataclass
class Testbed:
    __test__ = False

    make_ns: Callable[[str], str]
    workdir: Path
    ipv6: bool = False
    underlay: str = ""
    """An existing namespace to use as the underlay (default: a new one)."""
    use_cni: bool = False
    """Wire pods with the ``svcnet-cni`` plugin reading the overlay's subnet.env (as a
    kubelet would), instead of plain ``ip`` commands."""
    nodes: dict[str, SimNode] = field(default_factory=dict)
    etcd: subprocess.Popen[bytes] | None = None
    pod_ips: dict[str, str] = field(default_factory=dict)
    pod_ips6: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.underlay = self.underlay or self.make_ns("ul")
        gw = UNDERLAY_NET.network_address + 254
        lines = ["link add br0 type bridge", "link set br0 up", f"addr add {gw}/24 dev br0"]
        if self.ipv6:
            lines.append(f"addr add {UNDERLAY_NET6.network_address + 254}/64 dev br0 nodad")
        batch(self.underlay, lines)

    @property
    def etcd_endpoint(self) -> str:
        return f"{UNDERLAY_NET.network_address + 254}:{ETCD_PORT}"

    def start_etcd(self) -> None:
        """A one-member etcd inside the underlay namespace, reachable from every node."""
        data = self.workdir / "etcd"
        log = open(self.workdir / "etcd.log", "ab")  # noqa: SIM115 - lives as long as etcd
        self.etcd = subprocess.Popen(
            ["ip", "netns", "exec", self.underlay, "etcd", "--name", "m0", "--data-dir",
             str(data), "--listen-client-urls", f"http://{self.etcd_endpoint}",
             "--advertise-client-urls", f"http://{self.etcd_endpoint}",
             "--listen-peer-urls", "http://127.0.0.1:2380",
             "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", "m0=http://127.0.0.1:2380",
             "--heartbeat-interval", "50", "--election-timeout", "500"],
            stdout=log, stderr=log, env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "amd64"})
        deadline = time.monotonic() + 20
        while True:
            got = self.etcdctl("endpoint", "health", check=False)
            if got.returncode == 0:
                return
            if time.monotonic() > deadline or self.etcd.poll() is not None:
                raise RuntimeError(f"etcd did not start; see {self.workdir}/etcd.log")
            time.sleep(0.1)

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return in_ns(self.underlay, "env", "ETCDCTL_API=3", "etcdctl", "--endpoints",
                     self.etcd_endpoint, "--command-timeout=3s", *args, check=check)

    def add_node(self, name: str) -> SimNode:
        index = len(self.nodes) + 1
        ns = self.make_ns(name)
        ip = str(UNDERLAY_NET.network_address + index)
        ip6 = str(UNDERLAY_NET6.network_address + index)
        port = f"u{next(_link_ids)}-{os.getpid() % 10000}"[:15]
        sh("ip", "-n", self.underlay, "link", "add", port, "type", "veth", "peer", "name",
           "eth0", "netns", ns)
        batch(self.underlay, [f"link set {port} master br0", f"link set {port} up"])
        lines = [f"addr add {ip}/24 dev eth0", "link set eth0 up"]
        if self.ipv6:
            lines.append(f"addr add {ip6}/64 dev eth0 nodad")
        batch(ns, lines)
        in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if self.ipv6:
            in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        node = SimNode(name=name, ns=ns, index=index, ip=ip, ip6=ip6,
                       subnet_file=self.workdir / f"{name}.env")
        self.nodes[name] = node
        return node

    def start_daemon(self, node: SimNode, *extra: str, config_file: str = "",
                     resync: float = 1.0) -> None:
        log = open(self.workdir / f"{node.name}.log", "ab")  # noqa: SIM115
        argv = ["ip", "netns", "exec", node.ns, str(Path(sys.executable).parent / "svcnet"),
                "-v", "node", "--overlay", "--store", f"etcd://{self.etcd_endpoint}",
                "--overlay-node-name", node.name, "--overlay-iface", "eth0",
                "--overlay-subnet-file", str(node.subnet_file),
                "--overlay-listen", f"127.0.0.1:{node.listen_port}",
                "--overlay-resync", str(resync), *extra]
        if config_file:
            argv += ["--overlay-config", config_file]
        node.daemon = subprocess.Popen(argv, stdout=log, stderr=log)

    def wait_ready(self, node: SimNode, timeout: float = 20, *, since: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if node.subnet_file.stat().st_mtime > since and node.env().get("FLANNEL_MTU"):
                    return
            if node.daemon is not None and node.daemon.poll() is not None:
                raise RuntimeError(f"daemon {node.name} exited: "
                                   f"{(self.workdir / f'{node.name}.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon {node.name} not ready after {timeout}s")
            time.sleep(0.05)

    def kill_daemon(self, node: SimNode) -> None:
        if node.daemon is not None:
            node.daemon.kill()
            node.daemon.wait(10)
            node.daemon = None

    def add_pod(self, node: SimNode) -> str:
        """A pod namespace on ``node``'s ``cni0`` bridge, addressed from its subnet.env."""
        if self.use_cni:
            return self._add_pod_with_cni(node)
        env = node.env()
        gw = ipaddress.ip_interface(env["FLANNEL_SUBNET"])
        mtu = env["FLANNEL_MTU"]
        gw6 = ipaddress.ip_interface(env["FLANNEL_IPV6_SUBNET"]) if self.ipv6 else None
        if not node.pods:
            lines = ["link add cni0 type bridge", f"link set cni0 mtu {mtu} up",
                     f"addr add {gw} dev cni0"]
            if gw6 is not None:
                lines.append(f"addr add {gw6} dev cni0 nodad")
            batch(node.ns, lines)
        pod = self.make_ns(f"{node.name}p")
        n = len(node.pods) + 2
        ip = ipaddress.ip_interface(f"{gw.ip + n - 1}/{gw.network.prefixlen}")
        host_end = f"vp{next(_link_ids)}-{os.getpid() % 10000}"[:15]
        sh("ip", "-n", node.ns, "link", "add", host_end, "mtu", mtu, "type", "veth", "peer",
           "name", "eth0", "netns", pod)
        batch(node.ns, [f"link set {host_end} master cni0", f"link set {host_end} up"])
        lines = [f"link set eth0 mtu {mtu} up", f"addr add {ip} dev eth0",
                 f"route add default via {gw.ip}"]
        if gw6 is not None:
            ip6 = ipaddress.ip_interface(f"{gw6.ip + n - 1}/{gw6.network.prefixlen}")
            lines += [f"addr add {ip6} dev eth0 nodad", f"route add default via {gw6.ip}"]
            self.pod_ips6[pod] = str(ip6.ip)
        batch(pod, lines)
        node.pods.append(pod)
        self.pod_ips[pod] = str(ip.ip)
        return pod

    def _add_pod_with_cni(self, node: SimNode) -> str:
        pod = self.make_ns(f"{node.name}p")
        bin_dir = str(Path(sys.executable).parent)
        conf = {"cniVersion": "1.1.0", "name": "svcnet", "type": "svcnet-cni",
                "bridge": "cni0", "isGateway": True, "isDefaultGateway": True,
                "ipam": {"type": "svcnet-cni", "subnetFile": str(node.subnet_file),
                         "dataDir": str(self.workdir / f"ipam-{node.name}")}}
        env = {**os.environ, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": pod,
               "CNI_NETNS": f"/run/netns/{pod}", "CNI_IFNAME": "eth0", "CNI_PATH": bin_dir}
        got = subprocess.run(["ip", "netns", "exec", node.ns, f"{bin_dir}/svcnet-cni"],
                             input=json.dumps(conf), capture_output=True, text=True, env=env,
                             timeout=30)
        if got.returncode != 0:
            raise RuntimeError(f"svcnet-cni ADD failed: {got.stdout} {got.stderr}")
        result = json.loads(got.stdout)
        for ip in result.get("ips", []):
            address = ipaddress.ip_interface(ip["address"]).ip
            (self.pod_ips6 if address.version == 6 else self.pod_ips)[pod] = str(address)
        node.pods.append(pod)
        return pod

    def close(self) -> None:
        for node in self.nodes.values():
            self.kill_daemon(node)
        if self.etcd is not None:
            self.etcd.kill()
            self.etcd.wait(10)
            self.etcd = None
