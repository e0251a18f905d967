"""Packet-flow tables: kube-proxy's behaviour, traced over the rules and as real traffic.

One node namespace with a pod bridge (10.1.0.0/24) and an uplink to an "external" client
(192.168.1.0/24); pods answer with their own name and the source address they saw, so a
masqueraded request is visible. Each row: (source, protocol, destination, port) -> the
set of pods reached and whether the source was masqueraded, or REJECT/DROP, or PASS (not a
service: left untranslated). Both backends, both ways.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ns_sh, require_binary, sh
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.commands import SubprocessCommands
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.iptables import IptablesBackend
from svcnet.proxy.nftables import NftablesBackend
from svcnet.proxy.state import ChangeTracker, NodeConfig
from svcnet.proxy.tracer import IptablesTracer, NftTracer, Packet

pytestmark = pytest.mark.kernel

NODE_NAME = "n1"
NODE_IP = "192.168.1.1"
BRIDGE_IP = "10.1.0.1"
EXT_IP = "192.168.1.2"
PODS = {"pod1": "10.1.0.11", "pod2": "10.1.0.12", "pod3": "10.1.0.13", "cpod": "10.1.0.20"}
POD_NET2 = "10.2.0.20"  # a pod of a second cluster CIDR (test_detect_local_two_cluster_cidrs)
SOURCES = {**PODS, "ext": EXT_IP, "node": NODE_IP, "pod-net2": POD_NET2}
ALL = {"pod1", "pod2", "pod3"}

ECHO = r'''
import socket, sys, threading
name = sys.argv[1]
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(128)
    while True:
        c, peer = s.accept()
        def serve(c=c, peer=peer):
            try:
                while True:
                    data = c.recv(100)
                    if not data:
                        break
                    c.sendall(f"{name} {peer[0]}\n".encode())
            finally:
                c.close()
        threading.Thread(target=serve, daemon=True).start()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(100)
        s.sendto(f"{name} {peer[0]}".encode(), peer)
for p in (8080, 9090):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
    threading.Thread(target=udp, args=(p,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''

CLIENT = r'''
import json, socket, sys, time
host, proto = sys.argv[1], sys.argv[3]
port, count, want = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
answers, errors = [], []
for _ in range(count):
    try:
        if proto == "TCP":
            s = socket.create_connection((host, port), timeout=1.0)
            s.sendall(b"hi"); data = s.recv(100).decode().strip(); s.close()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
            s.connect((host, port)); s.send(b"hi"); data = s.recv(100).decode().strip(); s.close()
        answers.append(data)
    except ConnectionRefusedError:
        errors.append("REJECT")
    except (socket.timeout, TimeoutError):
        errors.append("DROP")
    except OSError as e:
        errors.append(f"ERR {e}")
    if errors or len({a.split()[0] for a in answers}) >= want:
        break
print(json.dumps({"answers": answers, "errors": errors}))
'''


@dataclass
class Lab:
    node: str
    ns: dict[str, str]
    dir: Path

    def client(self, source: str, host: str, port: int, proto: str = "TCP", count: int = 1,
               want: int = 1) -> dict[str, Any]:
        script = self.dir / "client.py"
        ns = self.node if source == "node" else self.ns[source]
        out = ns_sh(ns, sys.executable, str(script), host, str(port), proto, str(count),
                    str(want), timeout=60).stdout
        result: dict[str, Any] = json.loads(out)
        return result


def build_lab(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Lab]:
    require_binary("ip", "nft", "iptables-restore")
    node = netns("node")
    (tmp_path / "echo.py").write_text(ECHO)
    (tmp_path / "client.py").write_text(CLIENT)
    ns = {name: netns(name) for name in [*PODS, "ext"]}
    ns_sh(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    ns_sh(node, "ip", "link", "add", "br0", "type", "bridge")
    ns_sh(node, "ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", "br0")
    ns_sh(node, "ip", "link", "set", "br0", "up")
    for i, (name, ip) in enumerate(PODS.items()):
        host_if = f"vp{i}"
        ns_sh(node, "ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
              "netns", ns[name])
        ns_sh(node, "ip", "link", "set", host_if, "master", "br0", "up")
        # As the CNI bridge plugin's hairpinMode: with br_netfilter, a pod's packet DNATed
        # back to itself leaves by the bridge port it came in on.
        ns_sh(node, "ip", "link", "set", host_if, "type", "bridge_slave", "hairpin", "on")
        ns_sh(ns[name], "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        ns_sh(ns[name], "ip", "link", "set", "eth0", "up")
        ns_sh(ns[name], "ip", "route", "add", "default", "via", BRIDGE_IP)
    ns_sh(node, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
          "netns", ns["ext"])
    ns_sh(node, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
    ns_sh(node, "ip", "link", "set", "eth0", "up")
    ns_sh(node, "ip", "route", "add", "default", "via", EXT_IP)
    ns_sh(ns["ext"], "ip", "addr", "add", f"{EXT_IP}/24", "dev", "eth0")
    ns_sh(ns["ext"], "ip", "link", "set", "eth0", "up")
    ns_sh(ns["ext"], "ip", "route", "add", "default", "via", NODE_IP)
    procs = []
    try:
        for name in ("pod1", "pod2", "pod3"):
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns[name], sys.executable, str(tmp_path / "echo.py"),
                 name], stdout=subprocess.PIPE, text=True)
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield Lab(node, ns, tmp_path)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def lab(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Lab]:
    yield from build_lab(netns, tmp_path)


def here(ip: str) -> dict[str, Any]:
    return endpoint(ip, node=NODE_NAME)


def elsewhere(ip: str) -> dict[str, Any]:
    return endpoint(ip, node="n2")


P1, P2, P3 = PODS["pod1"], PODS["pod2"], PODS["pod3"]

OBJECTS: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    (service("web", "10.96.0.10", port(80, node_port=30080, target=8080), type="LoadBalancer",
             lb_ips=["203.0.113.10"], externalIPs=["203.0.113.20"]),
     endpoint_slice("web", here(P1), here(P2), elsewhere(P3))),
    (service("local", "10.96.0.11", port(80, node_port=30081), type="NodePort",
             externalTrafficPolicy="Local"),
     endpoint_slice("local", here(P1), elsewhere(P2))),
    (service("localnone", "10.96.0.12", port(80, node_port=30082), type="NodePort",
             externalTrafficPolicy="Local"),
     endpoint_slice("localnone", elsewhere(P2))),
    (service("empty", "10.96.0.13", port(80), port(81, "u", "UDP")), None),
    (service("dns", "10.96.0.14", port(53, "dns", "UDP"), port(53, "dns-tcp", "TCP")),
     endpoint_slice("dns", here(P1), elsewhere(P2),
                    ports=[("dns", 8080, "UDP"), ("dns-tcp", 9090, "TCP")])),
    (service("aff", "10.96.0.15", port(80), sessionAffinity="ClientIP",
             sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
     endpoint_slice("aff", here(P1), here(P2), here(P3))),
    (service("fw", "10.96.0.16", port(80, node_port=30086), type="LoadBalancer",
             lb_ips=["203.0.113.30"], loadBalancerSourceRanges=["10.1.0.0/24"]),
     endpoint_slice("fw", here(P1), here(P2), here(P3))),
    (service("itp", "10.96.0.17", port(80), internalTrafficPolicy="Local"),
     endpoint_slice("itp", elsewhere(P2))),
    (service("self", "10.96.0.18", port(80)), endpoint_slice("self", here(P1))),
    (service("notready", "10.96.0.19", port(80)),
     endpoint_slice("notready", endpoint(P1, ready=False),
                    endpoint(P3, ready=False, serving=True, terminating=True))),
    (service("other-proxy", "10.96.0.21", port(80),
             labels={"service.kubernetes.io/service-proxy-name": "someone-else"}),
     endpoint_slice("other-proxy", here(P1))),
]

# (source, protocol, destination, port) -> ({pods}, masqueraded) | "REJECT" | "DROP" | "PASS"
FLOWS: list[tuple[str, str, str, int, Any]] = [
    ("cpod", "TCP", "10.96.0.10", 80, (ALL, False)),              # balancing, pod source
    ("ext", "TCP", "10.96.0.10", 80, (ALL, True)),                # off-cluster source
    ("node", "TCP", "10.96.0.10", 80, (ALL, True)),               # the node itself
    ("ext", "TCP", NODE_IP, 30080, (ALL, True)),                  # NodePort, Cluster policy
    ("ext", "TCP", "203.0.113.10", 80, (ALL, True)),              # LoadBalancer IP
    ("ext", "TCP", "203.0.113.20", 80, (ALL, True)),              # externalIP
    ("cpod", "TCP", BRIDGE_IP, 30080, "PASS"),                    # not a --nodeport-addresses
    ("ext", "TCP", NODE_IP, 30081, ({"pod1"}, False)),            # Local: local only, no SNAT
    ("cpod", "TCP", NODE_IP, 30081, ({"pod1", "pod2"}, False)),   # pods short-circuit
    ("node", "TCP", NODE_IP, 30081, ({"pod1", "pod2"}, True)),    # node short-circuits + SNAT
    ("ext", "TCP", NODE_IP, 30082, "DROP"),                       # Local, no local endpoint
    ("cpod", "TCP", "10.96.0.12", 80, ({"pod2"}, False)),         # ...its ClusterIP works
    ("cpod", "TCP", "10.96.0.13", 80, "REJECT"),                  # no endpoints: TCP
    ("cpod", "UDP", "10.96.0.13", 81, "REJECT"),                  # no endpoints: UDP
    ("node", "TCP", "10.96.0.13", 80, "REJECT"),                  # ... from the node
    ("cpod", "UDP", "10.96.0.14", 53, ({"pod1", "pod2"}, False)),  # UDP, named port
    ("cpod", "TCP", "10.96.0.14", 53, ({"pod1", "pod2"}, False)),  # same name, other port
    ("ext", "TCP", "203.0.113.30", 80, "DROP"),                   # source range denies
    ("cpod", "TCP", "203.0.113.30", 80, (ALL, True)),             # source range allows
    ("cpod", "TCP", "10.96.0.17", 80, "DROP"),                    # internal Local, none here
    ("pod1", "TCP", "10.96.0.18", 80, ({"pod1"}, True)),          # hairpin
    ("cpod", "TCP", "10.96.0.19", 80, ({"pod3"}, False)),         # serving+terminating only
    ("cpod", "TCP", "10.96.0.21", 80, "PASS"),                    # another proxy's service
]

BY_IP = {ip: name for name, ip in PODS.items()}


def make_backend(kind: str, node: str) -> Any:
    config = BackendConfig(families=(4,),
                           detect_local=LocalDetector("ClusterCIDR", ("10.1.0.0/16",)))
    commands = SubprocessCommands(node)
    if kind == "nftables":
        return NftablesBackend(commands, config)
    return IptablesBackend(commands, config, legacy=False, node_addresses={4: (NODE_IP,)})


def program(backend: Any, objects: list[tuple[dict[str, Any], dict[str, Any] | None]]
            ) -> ChangeTracker:
    """Apply the first half with a full sync and the rest as a partial one, like a live
    proxy would: so the tables also check incremental updates."""
    tracker = ChangeTracker(NodeConfig(NODE_NAME, nodeport_addresses=(NODE_IP,)))
    services: dict[str, Any] = {}
    slices: dict[str, list[Any]] = {}
    half = len(objects) // 2
    for i, (svc, sl) in enumerate(objects):
        s = to_service(svc)
        key = f"default/{s.metadata.name}"
        services[key] = s
        slices[key] = [to_slice(sl)] if sl else []
        tracker.service_changed(None, s)
        if i in (half - 1, len(objects) - 1):
            changes = tracker.drain(services.get, lambda k: slices.get(k, []),
                                    lambda: list(services))
            backend.sync(changes, full=i == half - 1)
    return tracker


def tracer(kind: str, backend: Any) -> Any:
    local = [NODE_IP, BRIDGE_IP]
    if kind == "nftables":
        return NftTracer(backend.dump(4), local)
    return IptablesTracer(backend.dump(4), local)


def traced(tr: Any, source: str, proto: str, dst: str, dport: int) -> Any:
    pkt = Packet(SOURCES[source], dst, dport, proto, from_node=source == "node",
                 iif="eth0" if source == "ext" else "br0")
    summary = tr.trace(pkt).summary()
    if summary == ("ACCEPT",):
        return "PASS"
    if len(summary) == 1:
        return summary[0]
    endpoints, masq = summary
    return ({BY_IP[e.split(":")[0]] for e in endpoints}, masq)


def real(lab: Lab, source: str, proto: str, dst: str, dport: int, expected: Any) -> Any:
    want = len(expected[0]) if isinstance(expected, tuple) else 1
    result = lab.client(source, dst, dport, proto, count=40 if want > 1 else 3, want=want)
    if result["errors"]:
        error = result["errors"][0]
        # Untranslated: the node refuses or routes it on; either way no pod answers.
        return "PASS" if expected == "PASS" and error in ("REJECT", "DROP") else error
    names = {a.split()[0] for a in result["answers"]}
    masq = {a.split()[1] not in (SOURCES[source],) for a in result["answers"]}
    return (names, masq.pop() if len(masq) == 1 else "mixed")


BACKENDS = ["nftables", "iptables"]


@pytest.mark.parametrize("kind", BACKENDS)
def test_flow_table_traced(kind: str, lab: Lab) -> None:
    backend = make_backend(kind, lab.node)
    program(backend, OBJECTS)
    tr = tracer(kind, backend)
    got = {(s, p, d, port): traced(tr, s, p, d, port) for s, p, d, port, _ in FLOWS}
    want = {(s, p, d, port): e for s, p, d, port, e in FLOWS}
    assert got == want


@pytest.mark.parametrize("kind", BACKENDS)
def test_flow_table_real_traffic(kind: str, lab: Lab) -> None:
    backend = make_backend(kind, lab.node)
    program(backend, OBJECTS)
    got: dict[Any, Any] = {}
    for s, p, d, dport, expected in FLOWS:
        started = time.monotonic()
        got[(s, p, d, dport)] = real(lab, s, p, d, dport, expected)
        if expected == "REJECT":
            assert time.monotonic() - started < 0.9, f"{(s, p, d, dport)} not rejected at once"
    want = {(s, p, d, port): e for s, p, d, port, e in FLOWS}
    assert got == want


@pytest.mark.parametrize("kind", BACKENDS)
def test_affinity_pins_a_client(kind: str, lab: Lab) -> None:
    backend = make_backend(kind, lab.node)
    program(backend, OBJECTS)
    for source in ("cpod", "ext"):
        result = lab.client(source, "10.96.0.15", 80, count=12, want=99)
        assert not result["errors"]
        assert len({a.split()[0] for a in result["answers"]}) == 1, result
        assert len(result["answers"]) == 12


def test_cleanup_removes_everything(lab: Lab) -> None:
    for kind in BACKENDS:
        program(make_backend(kind, lab.node), OBJECTS)
    sh(sys.executable, "-m", "svcnet.cli", "proxy", "cleanup", "--netns", lab.node)
    assert "svcnet" not in ns_sh(lab.node, "nft", "list", "tables").stdout
    assert "KUBE-" not in ns_sh(lab.node, "iptables-save").stdout
    assert lab.client("cpod", "10.96.0.13", 80)["errors"] == ["DROP"]


UDP_PINNED = r'''
import socket, sys, time
host, port, sport, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport)); s.settimeout(1.0); s.connect((host, port))
out = []
for _ in range(count):
    try:
        s.send(b"hi"); out.append(s.recv(100).decode().split()[0])
    except OSError as e:
        out.append(type(e).__name__)
print(" ".join(out))
'''


@pytest.mark.parametrize("kind", BACKENDS)
def test_udp_client_fails_over_at_once_when_its_endpoint_goes(kind: str, lab: Lab) -> None:
    """The same source port keeps its conntrack entry; only deleting it moves the client."""
    from svcnet.proxy.conntrack import NetlinkConntrack, stale_flows

    (lab.dir / "udp.py").write_text(UDP_PINNED)
    backend = make_backend(kind, lab.node)
    svc = to_service(service("dns", "10.96.0.53", port(53, "", "UDP")))
    tracker = ChangeTracker(NodeConfig(NODE_NAME))
    both = [to_slice(endpoint_slice("dns", here(P1), here(P2), ports=[("", 8080, "UDP")]))]
    tracker.service_changed(None, svc)
    backend.sync(tracker.drain(lambda k: svc, lambda k: both, lambda: ["default/dns"]),
                 full=True)

    def ask(count: int) -> list[str]:
        return ns_sh(lab.ns["cpod"], sys.executable, str(lab.dir / "udp.py"), "10.96.0.53",
                     "53", "40000", str(count)).stdout.split()

    first = ask(3)
    assert len(set(first)) == 1 and first[0] in ("pod1", "pod2"), first
    hit = first[0]
    keep = P2 if hit == "pod1" else P1
    remaining = [to_slice(endpoint_slice("dns", here(keep), ports=[("", 8080, "UDP")]))]
    tracker.slice_changed(None, remaining[0])
    changes = tracker.drain(lambda k: svc, lambda k: remaining)
    backend.sync(changes, full=False)
    assert ask(2) == [hit, hit]  # the old NAT entry still steers this flow
    deleted = NetlinkConntrack(lab.node).delete(stale_flows(changes))
    assert deleted >= 1
    assert ask(2) == [BY_IP[keep]] * 2


DETECT_FLOWS: list[tuple[str, str, str, int, Any]] = [
    ("cpod", "TCP", "10.96.0.10", 80, (ALL, False)),
    ("ext", "TCP", "10.96.0.10", 80, (ALL, True)),
    ("node", "TCP", "10.96.0.10", 80, (ALL, True)),
    ("cpod", "TCP", NODE_IP, 30081, ({"pod1", "pod2"}, False)),
    ("ext", "TCP", NODE_IP, 30081, ({"pod1"}, False)),
]


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize(("mode", "iface"), [("BridgeInterface", "br0"),
                                             ("InterfaceNamePrefix", "br")])
def test_detect_local_by_interface(kind: str, mode: str, iface: str, lab: Lab) -> None:
    config = BackendConfig(families=(4,), detect_local=LocalDetector(mode, (), iface))
    commands = SubprocessCommands(lab.node)
    backend: Any = (NftablesBackend(commands, config) if kind == "nftables" else
                    IptablesBackend(commands, config, legacy=False,
                                    node_addresses={4: (NODE_IP,)}))
    program(backend, OBJECTS[:2])
    tr = tracer(kind, backend)
    want = {(s, p, d, port): e for s, p, d, port, e in DETECT_FLOWS}
    assert {(s, p, d, port): traced(tr, s, p, d, port) for s, p, d, port, _ in DETECT_FLOWS
            } == want
    if mode == "BridgeInterface":  # the prefix form renders the same match, with a *
        assert {(s, p, d, port): real(lab, s, p, d, port, e)
                for s, p, d, port, e in DETECT_FLOWS} == want


TWO_CIDR_FLOWS: list[tuple[str, str, str, int, Any]] = [
    ("cpod", "TCP", "10.96.0.10", 80, (ALL, False)),              # first cluster CIDR
    ("pod-net2", "TCP", "10.96.0.10", 80, (ALL, False)),          # second cluster CIDR
    ("ext", "TCP", "10.96.0.10", 80, (ALL, True)),                # not a pod
    ("node", "TCP", "10.96.0.10", 80, (ALL, True)),
    ("pod-net2", "TCP", NODE_IP, 30081, ({"pod1", "pod2"}, False)),  # pods short-circuit
    ("ext", "TCP", NODE_IP, 30081, ({"pod1"}, False)),
]


@pytest.mark.parametrize("kind", BACKENDS)
def test_detect_local_two_cluster_cidrs(kind: str, lab: Lab,
                                        netns: Callable[[str], str]) -> None:
    """Pods of either cluster CIDR are local: not masqueraded to a ClusterIP, and short-
    circuited on a Local-policy NodePort. iptables used to match only the first CIDR."""
    pod = netns("podnet2")
    ns_sh(lab.node, "ip", "addr", "add", "10.2.0.1/24", "dev", "br0")
    ns_sh(lab.node, "ip", "link", "add", "vp9", "type", "veth", "peer", "name", "eth0",
          "netns", pod)
    ns_sh(lab.node, "ip", "link", "set", "vp9", "master", "br0", "up")
    ns_sh(pod, "ip", "addr", "add", f"{POD_NET2}/24", "dev", "eth0")
    ns_sh(pod, "ip", "link", "set", "eth0", "up")
    ns_sh(pod, "ip", "route", "add", "default", "via", "10.2.0.1")
    lab.ns["pod-net2"] = pod
    config = BackendConfig(families=(4,), detect_local=LocalDetector(
        "ClusterCIDR", ("10.1.0.0/16", "10.2.0.0/16")))
    commands = SubprocessCommands(lab.node)
    backend: Any = (NftablesBackend(commands, config) if kind == "nftables" else
                    IptablesBackend(commands, config, legacy=False,
                                    node_addresses={4: (NODE_IP,)}))
    program(backend, OBJECTS[:2])
    want = {(s, p, d, port): e for s, p, d, port, e in TWO_CIDR_FLOWS}
    tr = tracer(kind, backend)
    assert {(s, p, d, port): traced(tr, s, p, d, port) for s, p, d, port, _ in TWO_CIDR_FLOWS
            } == want
    assert {(s, p, d, port): real(lab, s, p, d, port, e)
            for s, p, d, port, e in TWO_CIDR_FLOWS} == want


@pytest.mark.parametrize("kind", BACKENDS)
def test_dual_stack_one_table_per_family(kind: str, netns: Callable[[str], str]) -> None:
    node = netns("node6")
    config = BackendConfig(families=(4, 6), detect_local=LocalDetector(
        "ClusterCIDR", ("10.1.0.0/16", "fd00:1::/64")))
    commands = SubprocessCommands(node)
    backend: Any = (NftablesBackend(commands, config) if kind == "nftables" else
                    IptablesBackend(commands, config, legacy=False,
                                    node_addresses={4: (NODE_IP,), 6: ("fd00:9::1",)}))
    tracker = ChangeTracker(NodeConfig(NODE_NAME, nodeport_addresses=(NODE_IP, "fd00:9::1")))
    svc = to_service(service("web", ["10.96.0.10", "fd00:96::10"], port(80, node_port=30080),
                             type="NodePort"))
    slices = [to_slice(endpoint_slice("web", here(P1), name="v4")),
              to_slice(endpoint_slice("web", here("fd00:1::11"), here("fd00:1::12"),
                                      name="v6"))]
    tracker.service_changed(None, svc)
    backend.sync(tracker.drain(lambda k: svc, lambda k: slices, lambda: ["default/web"]),
                 full=True)
    v6 = (NftTracer(backend.dump(6), ["fd00:9::1"]) if kind == "nftables" else
          IptablesTracer(backend.dump(6), ["fd00:9::1"]))
    v4 = tracer(kind, backend)
    eps6 = ["[fd00:1::11]:8080", "[fd00:1::12]:8080"]
    assert v6.trace(Packet("fd00:1::20", "fd00:96::10", 80)).summary() == (eps6, False)
    assert v6.trace(Packet("fd00:2::5", "fd00:9::1", 30080)).summary() == (eps6, True)
    assert v6.trace(Packet("fd00:1::20", "10.96.0.10", 80)).summary() == ("ACCEPT",)
    assert v4.trace(Packet("10.1.0.20", "10.96.0.10", 80)).summary() == (
        [f"{P1}:8080"], False)
