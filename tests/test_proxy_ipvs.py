from __future__ import annotations

import ctypes
import os
import selectors
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import ns_sh, require, require_binary, sh
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.commands import SubprocessCommands
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.ipvs import IpvsBackend
from svcnet.proxy.ipvs_kernel import NetlinkIpvs, RealServer, VirtualServer
from svcnet.proxy.state import ChangeTracker, NodeConfig

from svcnet.model import EndpointSlice, Service

pytestmark = [pytest.mark.vm, pytest.mark.kernel]

NODE_IP = "10.0.1.1"
CLIENT_IP = "10.0.1.2"
PODS = {"a": ("10.1.1.2", "10.1.1.1", "n1"), "b": ("10.1.2.2", "10.1.2.1", "n2")}
REJECT, DROP = "REJECT", "DROP"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(ns: str, kind: int) -> socket.socket:
    """A socket created inside namespace ``ns`` by a throwaway thread (ours never moves).

    Spawning ``ip netns exec ... socat`` per request costs seconds under software
    emulation; an in-process socket costs nothing.
    """
    box: dict[str, Any] = {}

    def make() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns}")
            box["sock"] = socket.socket(socket.AF_INET, kind)
        except BaseException as err:  # handed to the caller below
            box["err"] = err
        finally:
            os.close(fd)

    worker = threading.Thread(target=make)
    worker.start()
    worker.join()
    if "err" in box:
        raise box["err"]
    sock: socket.socket = box["sock"]
    return sock


class PodServer:
    """TCP and UDP port 8080 in a pod namespace, answering ``<name> <peer ip>:<port>``."""

    def __init__(self, ns: str, name: str) -> None:
        self.name = name
        self.tcp = socket_in(ns, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("0.0.0.0", 8080))
        self.tcp.listen(64)
        self.udp = socket_in(ns, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", 8080))
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.tcp, selectors.EVENT_READ, "accept")
        self.sel.register(self.udp, selectors.EVENT_READ, "udp")
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.2):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if key.data == "accept":
                    conn, peer = sock.accept()
                    conn.sendall(f"{self.name} {peer[0]}:{peer[1]}\n".encode())
                    self.sel.register(conn, selectors.EVENT_READ, "conn")
                elif key.data == "udp":
                    _, peer = sock.recvfrom(512)
                    sock.sendto(f"{self.name} {peer[0]}:{peer[1]}\n".encode(), peer)
                else:  # the client closed (or sent something): we are done with it
                    self.sel.unregister(sock)
                    sock.close()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


@dataclass
class Lab:
    node: str
    client: str
    pods: dict[str, str]
    backend: IpvsBackend
    tracker: ChangeTracker
    services: dict[str, Service] = field(default_factory=dict)
    slices: dict[str, list[EndpointSlice]] = field(default_factory=dict)

    def put(self, svc: dict[str, Any], *pods: str, ports: list[tuple[str, int, str]] | None = None,
            **ep: Any) -> None:
        s = to_service(svc)
        key = f"default/{s.metadata.name}"
        eps = [endpoint(PODS[p][0], node=PODS[p][2], **ep) for p in pods]
        self.services[key] = s
        self.slices[key] = [to_slice(endpoint_slice(s.metadata.name, *eps, ports=ports))]
        self.tracker.service_changed(None, s)

    def sync(self, full: bool = False) -> None:
        changes = self.tracker.drain(self.services.get, lambda k: self.slices.get(k, []),
                                     lambda: list(self.services))
        self.backend.sync(changes, full=full)

    def connect(self, src: str, ip: str, port: int, timeout: float = 1.0) -> socket.socket:
        sock = socket_in(src, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect((ip, port))
        return sock

    def request(self, src: str, ip: str, port: int, proto: str = "TCP") -> str:
        """``name peer`` as the backend answered, or REJECT / DROP."""
        try:
            if proto == "UDP":
                with socket_in(src, socket.SOCK_DGRAM) as udp:
                    udp.settimeout(1.0)
                    udp.sendto(b"ping", (ip, port))
                    return udp.recv(512).decode().strip()
            with self.connect(src, ip, port) as sock:
                return sock.makefile().readline().strip() or DROP
        except ConnectionRefusedError:
            return REJECT
        except (TimeoutError, OSError):
            return DROP


def _link(node: str, other: str, node_ip: str, other_ip: str, tag: str) -> None:
    """A veth between the node and ``other``, whose default route is the node."""
    sh("ip", "link", "add", f"n{tag}", "netns", node, "type", "veth", "peer", "name", "eth0",
       "netns", other)
    sh("ip", "-n", node, "-batch", "-", input=f"addr add {node_ip}/24 dev n{tag}\n"
       f"link set n{tag} up\n")
    sh("ip", "-n", other, "-batch", "-", input=f"addr add {other_ip}/24 dev eth0\n"
       f"link set eth0 up\nroute add default via {node_ip}\n")


@pytest.fixture
def lab(netns: Callable[[str], str]) -> Iterator[Lab]:
    require(subprocess.run(["modprobe", "-a", "ip_vs", "ip_vs_rr", "dummy"],
                           capture_output=True).returncode == 0,
            "needs the ip_vs and dummy modules (run inside the VM: python -m svcnet.lab.vm)")
    require_binary("ipset", "iptables-restore")
    node, client = netns("node"), netns("client")
    _link(node, client, NODE_IP, CLIENT_IP, "c")
    pods: dict[str, str] = {}
    servers: list[PodServer] = []
    table = NetlinkIpvs(node)
    try:
        for i, (name, (ip, gw, _)) in enumerate(PODS.items()):
            pods[name] = netns(f"pod{name}")
            _link(node, pods[name], gw, ip, f"p{i}")
            servers.append(PodServer(pods[name], name))
        backend = IpvsBackend(table, SubprocessCommands(node), BackendConfig(), grace_period=30)
        tracker = ChangeTracker(NodeConfig("n1", "", (NODE_IP,)))
        yield Lab(node, client, pods, backend, tracker)
    finally:
        table.close()
        for server in servers:
            server.stop()


def _names(replies: list[str]) -> set[str]:
    return {r.split()[0] for r in replies}


def test_packet_flow_table(lab: Lab) -> None:
    """kube-proxy's behaviour as (destination -> endpoints or REJECT/DROP, masqueraded?)."""
    lab.put(service("web", "10.96.0.10", port(80, node_port=30080), type="NodePort",
                    externalIPs=["10.99.0.1"]), "a", "b")
    lab.put(service("empty", "10.96.0.11", port(80)))
    lab.put(service("local-none", "10.96.0.12", port(80, node_port=30081), type="NodePort",
                    externalTrafficPolicy="Local"), "b")
    lab.put(service("local", "10.96.0.13", port(80, node_port=30082), type="NodePort",
                    externalTrafficPolicy="Local"), "a", "b")
    lab.put(service("sticky", "10.96.0.14", port(80), sessionAffinity="ClientIP",
                    sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}}), "a", "b")
    lab.put(service("dns", "10.96.0.15", port(53, protocol="UDP")), "a", "b",
            ports=[("", 8080, "UDP")])
    lab.sync(full=True)

    # (destination, port, protocol, expected backends or verdict, masqueraded)
    table: list[tuple[str, int, str, set[str] | str, bool]] = [
        ("10.96.0.10", 80, "TCP", {"a", "b"}, False),     # ClusterIP balances
        (NODE_IP, 30080, "TCP", {"a", "b"}, True),        # NodePort, Cluster policy: SNAT
        ("10.99.0.1", 80, "TCP", {"a", "b"}, True),       # externalIP: SNAT
        ("10.96.0.11", 80, "TCP", REJECT, False),         # no endpoints: rejected at once
        (NODE_IP, 30081, "TCP", DROP, False),             # Local policy, none local: dropped
        (NODE_IP, 30082, "TCP", {"a"}, False),            # Local policy: local only, no SNAT
        ("10.96.0.13", 80, "TCP", {"a", "b"}, False),     # its ClusterIP still uses all
        ("10.96.0.15", 53, "UDP", {"a", "b"}, False),     # UDP balances
    ]
    wrong = []
    for ip, p, proto, want, masq in table:
        replies = [lab.request(lab.client, ip, p, proto)
                   for _ in range(2 if isinstance(want, str) else 4)]
        if isinstance(want, str):
            got: object = set(replies)
            ok = got == {want}
        else:
            got = _names(replies)
            peers = {r.split()[1].split(":")[0] for r in replies if len(r.split()) > 1}
            ok = got == want and (peers != {CLIENT_IP}) == masq
            got = (got, peers)
        if not ok:
            wrong.append(f"{proto} {ip}:{p}: want {want} masq={masq}, got {got}")
    sticky = _names([lab.request(lab.client, "10.96.0.14", 80) for _ in range(4)])
    if len(sticky) != 1:
        wrong.append(f"ClientIP affinity reached {sticky}")
    assert not wrong, "\n".join(wrong)


def test_hairpin_is_masqueraded(lab: Lab) -> None:
    lab.put(service("self", "10.96.0.20", port(80)), "a")
    lab.sync(full=True)
    reply = lab.request(lab.pods["a"], "10.96.0.20", 80)
    name, peer = reply.split()
    assert name == "a" and not peer.startswith(PODS["a"][0] + ":"), reply


def test_endpoint_change_is_incremental_and_graceful(lab: Lab) -> None:
    lab.put(service("web", "10.96.0.30", port(80)), "a", "b")
    lab.put(service("other", "10.96.0.31", port(80)), "a")
    lab.sync(full=True)
    vs = VirtualServer("10.96.0.30", "TCP", 80)
    table = NetlinkIpvs(lab.node)
    try:
        assert set(table.dests(vs)) == {RealServer("10.1.1.2", 8080), RealServer("10.1.2.2", 8080)}
        # Hold a connection to b open, then take b away: weight 0, the connection survives.
        held: list[socket.socket] = []
        try:
            for _ in range(4):
                held.append(lab.connect(lab.client, "10.96.0.30", 80, timeout=5))
                if held[-1].recv(64).startswith(b"b "):
                    break
            b = RealServer("10.1.2.2", 8080)
            assert table.dests(vs)[b].active_connections >= 1, table.dests(vs)
            lab.put(service("web", "10.96.0.30", port(80)), "a")
            lab.sync()
            assert table.dests(vs)[b].weight == 0
            lab.backend.finish_graceful()  # still busy: stays
            assert b in table.dests(vs)
            assert _names([lab.request(lab.client, "10.96.0.30", 80) for _ in range(3)]) == {"a"}
            held[-1].sendall(b"still here\n")  # the established connection still works
        finally:
            for sock in held:
                sock.close()
        assert set(table.dests(VirtualServer("10.96.0.31", "TCP", 80))) == {
            RealServer("10.1.1.2", 8080)}
        lab.backend.grace_period = 0
        lab.backend.finish_graceful()
        assert set(table.dests(vs)) == {RealServer("10.1.1.2", 8080)}
    finally:
        table.close()


def test_full_resync_and_cleanup(lab: Lab) -> None:
    lab.put(service("web", "10.96.0.40", port(80)), "a", "b")
    lab.sync(full=True)
    before = lab.request(lab.client, "10.96.0.40", 80)
    lab.sync(full=True)  # a full resync of an unchanged state changes nothing visible
    assert lab.backend.healthy()
    assert _names([before, lab.request(lab.client, "10.96.0.40", 80)]) == {"a", "b"}
    lab.backend.cleanup()
    assert not lab.backend.healthy()
    table = NetlinkIpvs(lab.node)
    try:
        assert table.services() == {}
    finally:
        table.close()
    assert "SVCNET" not in ns_sh(lab.node, "iptables-save").stdout
    assert "svcnet-ipvs0" not in ns_sh(lab.node, "ip", "link").stdout
    assert ns_sh(lab.node, "ipset", "list", "-n").stdout.strip() == ""


def test_detect_local_with_two_cluster_cidrs(lab: Lab) -> None:
    """Pods of either cluster CIDR reach a ClusterIP unmasqueraded, other sources are
    masqueraded (the IPVS rules used to masquerade every pod with two CIDRs)."""
    table = NetlinkIpvs(lab.node)
    try:
        lab.backend = IpvsBackend(table, SubprocessCommands(lab.node), BackendConfig(
            detect_local=LocalDetector("ClusterCIDR", ("10.1.1.0/24", "10.1.2.0/24"))))
        lab.put(service("to-b", "10.96.0.50", port(80)), "b")
        lab.put(service("to-a", "10.96.0.51", port(80)), "a")
        lab.sync(full=True)
        seen = {src: lab.request(lab.pods.get(src, lab.client), ip, 80)
                for src, ip in (("a", "10.96.0.50"), ("b", "10.96.0.51"),
                                ("client", "10.96.0.50"))}
        peers = {src: reply.split()[1].split(":")[0] if len(reply.split()) > 1 else reply
                 for src, reply in seen.items()}
        assert peers["a"] == PODS["a"][0] and peers["b"] == PODS["b"][0], seen
        assert peers["client"] not in (CLIENT_IP, DROP, REJECT), seen
    finally:
        table.close()
