"""NetworkPolicy on the real kernel: ``svcnet node --policy`` programs a node namespace whose
pods (namespaces on a bridge, dual stack) then really connect, or not.

A real etcd is the store: a policy written straight into it, as the API server would have
refused it, must be rejected while the previous version keeps being enforced.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import EtcdCluster, free_port, ns_sh, require_binary, sh

pytestmark = pytest.mark.kernel

BRIDGE = ("10.1.0.1", "fd01::1")
PODS = {"x/a": ("10.1.0.11", "fd01::11"), "x/b": ("10.1.0.12", "fd01::12"),
        "y/c": ("10.1.0.13", "fd01::13")}
PORTS = (80, 81)

SERVER = r'''
import socket, sys, threading
def tcp(port):
    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(128)
    while True:
        c, _ = s.accept()
        def serve(c=c):
            try:
                if c.recv(100):
                    c.sendall(b"ok")
            finally:
                c.close()
        threading.Thread(target=serve, daemon=True).start()
def udp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", port))
    while True:
        data, peer = s.recvfrom(100)
        s.sendto(b"ok", peer)
for p in (80, 81):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
    threading.Thread(target=udp, args=(p,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''

CLIENT = r'''
import json, socket, sys, threading
probes = json.loads(sys.argv[1]); results = [None] * len(probes)
def probe(i, host, port, proto):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if proto == "TCP":
            s = socket.socket(fam); s.settimeout(1.0); s.connect((host, port))
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(1.0); s.connect((host, port))
        s.send(b"hi"); results[i] = s.recv(10) == b"ok"; s.close()
    except OSError:
        results[i] = False
threads = [threading.Thread(target=probe, args=(i, *p)) for i, p in enumerate(probes)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
'''

Probe = tuple[str, str, int, str]
"""(source pod or "node", destination pod, port, protocol)."""


@dataclass
class Lab:
    node: str
    ns: dict[str, str]
    dir: Path

    def run(self, probes: list[Probe]) -> dict[Probe, bool]:
        """Every probe over both families; a probe holds only if it does for both."""
        by_source: dict[str, list[tuple[Probe, str, int, str]]] = {}
        for p in probes:
            src, dst, port, proto = p
            for fam in (0, 1):
                by_source.setdefault(src, []).append((p, PODS[dst][fam], port, proto))
        procs = {src: subprocess.Popen(
            ["ip", "netns", "exec", self.node if src == "node" else self.ns[src],
             sys.executable, str(self.dir / "client.py"),
             json.dumps([rest for _, *rest in items])], stdout=subprocess.PIPE, text=True)
            for src, items in by_source.items()}
        out: dict[Probe, bool] = {}
        for src, proc in procs.items():
            stdout, _ = proc.communicate(timeout=60)
            for (p, *_), ok in zip(by_source[src], json.loads(stdout), strict=True):
                out[p] = out.get(p, True) and ok
        return out

    def expect(self, table: dict[Probe, bool], timeout: float = 20) -> None:
        """Poll until the real verdicts are the table's (the daemon syncs asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.run(list(table))
            wrong = {p: ok for p, ok in got.items() if ok != table[p]}
            if not wrong:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"verdicts differ (probe: got): {wrong}")
            time.sleep(0.3)


@pytest.fixture
def lab(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Lab]:
    require_binary("ip", "nft")
    node = netns("node")
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "client.py").write_text(CLIENT)
    ns = {name: netns(name.replace("/", "")) for name in PODS}
    ns_sh(node, "ip", "link", "add", "br0", "type", "bridge")
    ns_sh(node, "ip", "addr", "add", f"{BRIDGE[0]}/24", "dev", "br0")
    ns_sh(node, "ip", "addr", "add", f"{BRIDGE[1]}/64", "dev", "br0", "nodad")
    ns_sh(node, "ip", "link", "set", "br0", "up")
    # Pods on one bridge reach each other bridged: br_netfilter (on by default in a new
    # namespace where the module is loaded) hands those packets to the inet forward hook.
    ns_sh(node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1",
          "net.bridge.bridge-nf-call-ip6tables=1")
    for i, (name, (ip4, ip6)) in enumerate(PODS.items()):
        ns_sh(node, "ip", "link", "add", f"vp{i}", "type", "veth", "peer", "name", "eth0",
              "netns", ns[name])
        ns_sh(node, "ip", "link", "set", f"vp{i}", "master", "br0", "up")
        ns_sh(ns[name], "ip", "addr", "add", f"{ip4}/24", "dev", "eth0")
        ns_sh(ns[name], "ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
        ns_sh(ns[name], "ip", "link", "set", "eth0", "up")
    procs = [subprocess.Popen(["ip", "netns", "exec", ns[name], sys.executable,
                               str(tmp_path / "server.py")], stdout=subprocess.PIPE, text=True)
             for name in PODS]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield Lab(node, ns, tmp_path)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


def pod(ref: str, **labels: str) -> dict[str, Any]:
    ns, name = ref.split("/")
    return {"metadata": {"name": name, "namespace": ns, "labels": {"pod": name, **labels}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "serve-80-tcp", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": PODS[ref][0],
                       "podIPs": [{"ip": ip} for ip in PODS[ref]]}}


def policy(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def put(etcd: EtcdCluster, *objects: tuple[Any, dict[str, Any]]) -> None:
    from svcnet.store.etcd import EtcdStore

    async def go() -> None:
        store = EtcdStore(etcd.endpoints)
        try:
            for kind, obj in objects:
                await store.put(kind, obj)
        finally:
            await store.close()

    asyncio.run(go())


def put_raw(etcd: EtcdCluster, key: str, obj: dict[str, Any]) -> None:
    """Bytes straight into etcd, past any validation (as anything with etcd access can)."""
    from svcnet.store.etcd_client import EtcdClient

    async def go() -> None:
        async with EtcdClient(etcd.endpoints) as c:
            await c.put(key.encode(), json.dumps(obj).encode())

    asyncio.run(go())


@pytest.fixture
def daemon(lab: Lab, etcd: EtcdCluster, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    from svcnet.model import NAMESPACE, POD

    put(etcd, *((NAMESPACE, {"metadata": {"name": n, "labels": {"team": n}}})
                for n in ("x", "y")), *((POD, pod(ref)) for ref in PODS))
    metrics = f"127.0.0.1:{free_port()}"
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "svcnet.cli", "-v", "node", "--policy",
             "--store", f"etcd://{etcd.endpoints[0]}", "--policy-node-name", "n1",
             "--policy-netns", lab.node, "--policy-metrics-bind-address", metrics,
             "--policy-log", "--policy-log-file", str(tmp_path / "denied.log")],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while ns_sh(lab.node, "nft", "list", "tables", check=False).stdout.find(
                "svcnet-policy") < 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield metrics, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def scrape(metrics: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def test_enforcement_with_real_traffic(lab: Lab, etcd: EtcdCluster,
                                       daemon: tuple[str, Path], tmp_path: Path) -> None:
    from svcnet.model import NETWORK_POLICY

    metrics, log = daemon
    open_table = {("x/b", "x/a", 80, "TCP"): True, ("y/c", "x/a", 81, "UDP"): True}
    lab.expect(open_table)  # no policy: everything reaches everything

    # x/a: ingress only from pods labelled pod=b, on the named port serve-80-tcp; y/c:
    # egress only to port 81.
    put(etcd, (NETWORK_POLICY, policy("a-from-b", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                     "ports": [{"port": "serve-80-tcp"}]}]})),
        (NETWORK_POLICY, policy("c-out-81", "y", {
            "podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 81, "protocol": "TCP"},
                                  {"port": 81, "protocol": "UDP"}]}]})))
    table = {
        ("x/b", "x/a", 80, "TCP"): True,    # allowed, and its reply passes
        ("x/b", "x/a", 81, "TCP"): False,   # wrong port
        ("x/b", "x/a", 80, "UDP"): False,   # named port is TCP
        ("y/c", "x/a", 80, "TCP"): False,   # c's egress allows only 81
        ("y/c", "x/b", 81, "TCP"): True,    # x/b not isolated; c's egress allows 81
        ("y/c", "x/b", 81, "UDP"): True,    # UDP reply passes (conntrack)
        ("y/c", "x/b", 80, "UDP"): False,   # c's egress
        ("x/a", "x/b", 80, "TCP"): True,    # a is not isolated for egress
        ("node", "x/a", 81, "TCP"): True,   # the node reaches its pods (kubelet probes)
        ("node", "y/c", 80, "UDP"): True,
    }
    lab.expect(table)
    # Denied connections are logged with the pod pair, port and isolating policies.
    denied = tmp_path / "denied.log"
    deadline = time.monotonic() + 20
    while "x/b (10.1.0.12) -> x/a (10.1.0.11) port 81/TCP; x/a isolated by x/a-from-b" \
            not in (denied.read_text() if denied.exists() else ""):
        assert time.monotonic() < deadline, denied.read_text() if denied.exists() else log
        lab.run([("x/b", "x/a", 81, "TCP")])
    assert "deny egress: y/c (fd01::13) -> x/b (fd01::12) port 80/UDP; y/c isolated by " \
        "y/c-out-81" in denied.read_text()

    # An update changes the verdict: a now also from namespace y, every port.
    put(etcd, (NETWORK_POLICY, policy("a-from-b", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                     "ports": [{"port": "serve-80-tcp"}]},
                    {"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}]}]})))
    lab.expect({**table, ("y/c", "x/a", 81, "TCP"): True, ("y/c", "x/a", 80, "TCP"): False,
                ("x/b", "x/a", 81, "TCP"): False})

    # svcnet policy status: the kernel holds what the store says.
    assert policy_status(etcd, lab).returncode == 0

    # A policy the API server would refuse (endPort below port) reaches etcd directly: it is
    # rejected and counted, and the previous version keeps being enforced.
    put_raw(etcd, "/registry/networkpolicies/x/a-from-b", policy("a-from-b", "x", {
        "podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}))
    deadline = time.monotonic() + 20
    while 'svcnet_watch_rejected_objects_total{kind="NetworkPolicy"} 1.0' not in scrape(metrics):
        assert time.monotonic() < deadline, scrape(metrics)
        time.sleep(0.2)
    assert "endPort: 80 is less than port 90" in log.read_text()
    lab.expect({**table, ("y/c", "x/a", 81, "TCP"): True, ("x/b", "x/a", 81, "TCP"): False})

    # Counters per policy: allowed packets credited to the allowing policy, drops to the
    # isolating one.
    text = scrape(metrics)
    allowed = [ln for ln in text.splitlines() if ln.startswith(
        'svcnet_policy_allowed_packets_total{direction="ingress",policy="x/a-from-b"}')]
    denied = [ln for ln in text.splitlines() if ln.startswith(
        'svcnet_policy_denied_packets_total{direction="egress",policy="y/c-out-81"}')]
    assert allowed and float(allowed[0].split()[-1]) > 0, text
    assert denied and float(denied[0].split()[-1]) > 0, text

    # Drift is reported: the rejected policy as such, a lost element as missing.
    ns_sh(lab.node, "nft", "flush", "map", "inet", "svcnet-policy", "egress-pods4")
    status = policy_status(etcd, lab)
    assert status.returncode == 1, status.stdout
    assert "missing: ('element', 'egress-pods4', '10.1.0.13', 'jump out-" in status.stdout
    assert "rejected NetworkPolicy x/a-from-b" in status.stdout, status.stdout


def policy_status(etcd: EtcdCluster, lab: Lab) -> subprocess.CompletedProcess[str]:
    status = subprocess.run(
        [sys.executable, "-m", "svcnet.cli", "policy", "status", "--store",
         f"etcd://{etcd.endpoints[0]}", "--node-name", "n1", "--netns", lab.node],
        capture_output=True, text=True, timeout=60)
    assert ("in sync" in status.stdout) == (status.returncode == 0), status
    return status


def test_deleting_the_policies_opens_everything(lab: Lab, etcd: EtcdCluster,
                                                daemon: tuple[str, Path]) -> None:
    from svcnet.model import NETWORK_POLICY
    from svcnet.store.etcd import EtcdStore

    put(etcd, (NETWORK_POLICY, policy("deny", "x", {"podSelector": {},
                                                   "policyTypes": ["Ingress", "Egress"]})))
    table = {("x/b", "x/a", 80, "TCP"): False, ("y/c", "x/a", 81, "UDP"): False,
             ("x/a", "y/c", 80, "TCP"): False, ("y/c", "x/b", 80, "TCP"): False,
             ("node", "x/b", 80, "TCP"): True}
    lab.expect(table)
    trace = subprocess.run(
        [sys.executable, "-m", "svcnet.cli", "policy", "trace", "--store",
         f"etcd://{etcd.endpoints[0]}", "--from", "x/b", "--to", "x/a", "--port", "80"],
        capture_output=True, text=True, timeout=60)
    assert trace.returncode == 1, trace.stdout + trace.stderr
    assert trace.stdout.splitlines()[1:] == [
        "egress: x/b isolated by x/deny; no rule allows: DENIED",
        "ingress: x/a isolated by x/deny; no rule allows: DENIED", "verdict: DENY"]

    async def delete() -> None:
        store = EtcdStore(etcd.endpoints)
        try:
            await store.delete(NETWORK_POLICY, "x", "deny")
        finally:
            await store.close()

    asyncio.run(delete())
    lab.expect(dict.fromkeys(table, True))
    dump = ns_sh(lab.node, "nft", "list", "table", "inet", "svcnet-policy").stdout
    assert "goto in-" not in dump and "counter deny-" not in dump, dump


def test_sctp_rules_match_raw_sctp_packets(lab: Lab) -> None:
    """No SCTP sockets on this kernel: hand-made SCTP INIT packets (raw IP protocol 132)
    from x/b to x/a, counted by the allow or deny counter of the rendered table."""
    from svcnet.policy.nftables import policy_id, render_full
    from svcnet.policy.state import compute

    from svcnet.model import NAMESPACE, NETWORK_POLICY, POD

    pods = [POD.convert(pod(ref)) for ref in PODS]
    spaces = [NAMESPACE.convert({"metadata": {"name": n}}) for n in ("x", "y")]
    pol = NETWORK_POLICY.convert(policy("sctp", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}))
    state = compute([pol], pods, spaces, node_name="n1")
    sh("ip", "netns", "exec", lab.node, "nft", "-f", "-", input=render_full(state))
    sender = (
        "import socket, struct, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 132)\n"
        "for port in (80, 81):\n"
        "    hdr = struct.pack('!HHII', 5000, port, 0, 0)\n"
        "    chunk = struct.pack('!BBHIIHHI', 1, 0, 20, 1, 65535, 1, 1, 1)\n"
        "    s.sendto(hdr + chunk, (sys.argv[1], 0))\n")
    ns_sh(lab.ns["x/b"], sys.executable, "-c", sender, PODS["x/a"][0])
    group = state.ingress[PODS["x/a"][0]]

    def packets(name: str) -> int:
        out = ns_sh(lab.node, "nft", "-j", "list", "counter", "inet", "svcnet-policy", name)
        return int(json.loads(out.stdout)["nftables"][1]["counter"]["packets"])

    deadline = time.monotonic() + 10
    while packets(f"allow-in-{policy_id('x/sctp')}") < 1 or packets(f"deny-{group}") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert packets(f"allow-in-{policy_id('x/sctp')}") == 1
    assert packets(f"deny-{group}") == 1


def test_log_rules_and_incremental_scripts_load(netns: Callable[[str], str]) -> None:
    """--policy-log's rules, and an incremental transaction that moves a pod between groups,
    deletes a group and adds one, are accepted by the kernel as rendered."""
    from svcnet.policy.nftables import full_script, render, update_script
    from svcnet.policy.state import compute
    from svcnet.policy.status import compare, kernel_items
    from svcnet.proxy.commands import SubprocessCommands

    from svcnet.model import NAMESPACE, NETWORK_POLICY, POD

    require_binary("nft")
    node = netns("node")
    pods = [POD.convert(pod(ref)) for ref in PODS]
    spaces = [NAMESPACE.convert({"metadata": {"name": n}}) for n in ("x", "y")]
    first = [NETWORK_POLICY.convert(policy("deny", "x", {"podSelector": {}})),
             NETWORK_POLICY.convert(policy("web", "x", {
                 "podSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"ports": [{"port": 80}, {"port": "serve-80-tcp"}]}]}))]
    second = [NETWORK_POLICY.convert(policy("deny", "x", {
                  "podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"]})),
              NETWORK_POLICY.convert(policy("c", "y", {"podSelector": {}, "ingress": [{}]}))]
    commands = SubprocessCommands(node)
    old = render(compute(first, pods, spaces, node_name="n1"), log=True)
    commands.run(["nft", "-f", "-"], input="".join(full_script(old)))
    group = compute(first, pods, spaces, node_name="n1").ingress[PODS["x/a"][0]]
    assert f'log prefix "svcnet-policy deny ingress {group}: "' in commands.run(
        ["nft", "list", "table", "inet", "svcnet-policy"])
    for policies in (second, first, []):
        new = render(compute(policies, pods, spaces, node_name="n1"), log=True)
        commands.run(["nft", "-f", "-"], input=update_script(old, new))
        assert compare(new, kernel_items(commands)) == (set(), set())
        old = new
