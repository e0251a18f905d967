"""The overlay on real kernels: simulated nodes in namespaces on an underlay bridge, each
running ``svcnet node --overlay`` against a real etcd that lives in the underlay namespace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require_binary
from svcnet.cni.overlay.cli import pending_changes
from svcnet.cni.overlay.testbed import SimNode, Testbed, in_ns

pytestmark = [pytest.mark.kernel, pytest.mark.etcd]

NET_CONF = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
SVCNET = str(Path(sys.executable).parent / "svcnet")


@pytest.fixture
def bed(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Testbed]:
    require_binary("etcd", "etcdctl", "ping", "socat", "bridge", "iptables-restore", "conntrack",
                   "ethtool")
    tb = Testbed(netns, tmp_path, use_cni=True)
    try:
        tb.start_etcd()
        yield tb
    finally:
        tb.close()


def start_nodes(tb: Testbed, count: int, conf: dict[str, object] = NET_CONF,
                *extra: str) -> list[SimNode]:
    tb.etcdctl("put", "/coreos.com/network/config", json.dumps(conf))
    nodes = [tb.add_node(f"n{i}") for i in range(count)]
    for node in nodes:
        tb.start_daemon(node, *extra)
    for node in nodes:
        tb.wait_ready(node)
    return nodes


def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        time.sleep(0.1)


def pings(src: str, dst: str, *args: str) -> bool:
    return in_ns(src, "ping", "-c", "1", "-W", "1", *args, dst, check=False).returncode == 0


def reach(src: str, dst: str, *args: str, timeout: float = 5.0) -> None:
    """Ping until one reply (bounded): the first packets may wait for ARP under load."""
    until(lambda: pings(src, dst, *args), timeout, f"{src} reaching {dst}")


def routes(node: SimNode) -> str:
    return (in_ns(node.ns, "ip", "route", "show", "proto", "205").stdout
            + in_ns(node.ns, "ip", "-6", "route", "show", "proto", "205").stdout)


def status(node: SimNode) -> subprocess.CompletedProcess[str]:
    return in_ns(node.ns, SVCNET, "overlay", "status", "--url",
                 f"http://127.0.0.1:{node.listen_port}", check=False)


def tcp_echo(tb: Testbed, client: str, server: str, payload: int, rounds: int = 20) -> None:
    """``rounds`` exchanges of ``payload`` bytes echoed back by socat in ``server``."""
    srv = subprocess.Popen(["ip", "netns", "exec", server, "socat",
                            "TCP-LISTEN:7000,reuseaddr", "PIPE"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        code = (
            "import socket,sys,time\n"
            f"data = bytes(range(256)) * ({payload} // 256 + 1)\n"
            f"data = data[:{payload}]\n"
            "for attempt in range(50):\n"
            "    try:\n"
            f"        s = socket.create_connection(('{tb.pod_ips[server]}', 7000), 2)\n"
            "        break\n"
            "    except OSError:\n"
            "        time.sleep(0.1)\n"
            "s.settimeout(5)\n"
            f"for _ in range({rounds}):\n"
            "    s.sendall(data)\n"
            "    got = b''\n"
            "    while len(got) < len(data):\n"
            "        chunk = s.recv(65536)\n"
            "        assert chunk, 'connection closed'\n"
            "        got += chunk\n"
            "    assert got == data, 'payload corrupted'\n"
            "print('ok')\n"
        )
        out = in_ns(client, "python3", "-c", code, timeout=30)
        assert out.stdout.strip() == "ok"
    finally:
        srv.kill()
        srv.wait(5)


def test_three_nodes_pods_talk_heal_and_forget_departed_node(bed: Testbed) -> None:
    nodes = start_nodes(bed, 3)
    pods = [bed.add_pod(n) for n in nodes]
    subnets = {n.name: n.env()["FLANNEL_SUBNET"] for n in nodes}
    assert len(set(subnets.values())) == 3
    until(lambda: all(routes(n).count("flannel.1") == 2 for n in nodes), what="full mesh")
    for a in pods:
        for b in pods:
            if a != b:
                reach(a, bed.pod_ips[b])
    tcp_echo(bed, pods[0], pods[2], payload=1400)
    assert vxlan_conntrack_entries(nodes[0]) == 0, "VXLAN packets must not be tracked"

    # Path MTU: 1450 - 28 bytes of IP + ICMP header fits with DF set, one byte more does not.
    assert nodes[0].env()["FLANNEL_MTU"] == "1450"
    assert pings(pods[0], bed.pod_ips[pods[1]], "-M", "do", "-s", "1422")
    assert not pings(pods[0], bed.pod_ips[pods[1]], "-M", "do", "-s", "1423")

    report = status(nodes[0])
    assert report.returncode == 0, report.stdout + report.stderr
    assert "in sync" in report.stdout and report.stdout.count("vxlan") >= 2
    assert "kernel holds 1 links, 2 routes, 1 blackhole, 2 neighbours, 2 FDB entries" \
        in report.stdout
    assert "blackhole 10.244.0.0/16: drops pod traffic" in report.stdout
    assert "blackhole 10.244.0.0/16 proto 205" in in_ns(nodes[1].ns, "ip", "route").stdout
    health = in_ns(nodes[0].ns, "python3", "-c", "import urllib.request as u; print(u.urlopen("
                   f"'http://127.0.0.1:{nodes[0].listen_port}/healthz').read().decode())")
    assert health.stdout.strip() == "ok"
    metrics = in_ns(nodes[0].ns, "python3", "-c", "import urllib.request as u; print(u.urlopen("
                    f"'http://127.0.0.1:{nodes[0].listen_port}/metrics').read().decode())")
    assert "svcnet_overlay_peers 2.0" in metrics.stdout
    assert "svcnet_overlay_reconcile_seconds_count" in metrics.stdout

    # A deleted VXLAN device is recreated with its neighbours, FDB entries and routes, and
    # while it is gone the blackhole drops the pod's SYNs silently instead of the node
    # answering net-unreachable: TCP retransmits, and not one connection fails. The daemon
    # is paused for 0.5 s (it notices within 0.1-1 s) so the gap is there in every run.
    # The kernel rate-limits the net-unreachables a node sends (ICMP: icmp_ratelimit; route
    # errors: 5, then 1/s per source, not settable outside the root namespace), which hides
    # most of them and is why the gap only made the lab's chaos test flake. Lifting the
    # one we can makes more connections in the gap show it (5 of ~25 without the blackhole).
    in_ns(nodes[1].ns, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0")
    assert nodes[1].daemon is not None
    with connect_loop(pods[1], pods[0], bed.pod_ips[pods[0]], seconds=3.0) as results:
        time.sleep(0.5)
        nodes[1].daemon.send_signal(signal.SIGSTOP)
        try:
            in_ns(nodes[1].ns, "ip", "link", "del", "flannel.1")
            time.sleep(0.5)
        finally:
            nodes[1].daemon.send_signal(signal.SIGCONT)
    assert len(results) >= 20 and not [r for r in results if r != "ok"], results
    until(lambda: pings(pods[0], bed.pod_ips[pods[1]]), 10, "ping after device deletion")
    until(lambda: status(nodes[1]).returncode == 0, 10, "kernel back in sync")

    # Flannel's documented checksum workaround costs ~8-10x throughput; with our notrack rules
    # it is unnecessary, and the daemon turns the offload back on.
    in_ns(nodes[1].ns, "ethtool", "-K", "flannel.1", "tx-checksum-ip-generic", "off")
    until(lambda: "tx-checksum-ip-generic: on" in in_ns(
        nodes[1].ns, "ethtool", "-k", "flannel.1").stdout, 10, "TX checksum offload back on")

    # Drift in one entry is reported by `svcnet overlay status` and repaired without
    # touching the rest. The daemon is paused so the report is not raced by its resync.
    victim = nodes[0]
    snapshot = json.loads(in_ns(victim.ns, SVCNET, "overlay", "status", "--json", "--url",
                                f"http://127.0.0.1:{victim.listen_port}").stdout)["status"]
    peer_vtep = subnets["n2"].rsplit(".", 1)[0] + ".0"
    mac_of_n2 = next(p["vtep_mac"] for p in snapshot["peers"] if p["node"] == "n2")
    assert victim.daemon is not None
    victim.daemon.send_signal(signal.SIGSTOP)
    try:
        in_ns(victim.ns, "ip", "neigh", "del", peer_vtep, "dev", "flannel.1")
        pending, chains = asyncio.run(pending_changes(snapshot, victim.ns))
        assert pending == [f"add Neighbour(dev='flannel.1', ip='{peer_vtep}', "
                           f"mac='{mac_of_n2}')"], pending
        assert not chains
    finally:
        victim.daemon.send_signal(signal.SIGCONT)
    until(lambda: status(victim).returncode == 0, 5, "neighbour repaired")
    reach(pods[0], bed.pod_ips[pods[2]])

    # A node leaving the cluster: its lease goes, and every node drops its route,
    # neighbour and FDB entry.
    bed.kill_daemon(nodes[2])
    key = subnets["n2"].rsplit(".", 1)[0] + ".0-24"
    assert bed.etcdctl("del", f"/coreos.com/network/subnets/{key}").stdout.strip() == "1"
    gone = subnets["n2"].rsplit(".", 1)[0] + ".0"
    until(lambda: all(gone not in routes(n) for n in nodes[:2]), 10, "departed routes removed")
    for n in nodes[:2]:
        assert gone not in in_ns(n.ns, "ip", "neigh", "show", "dev", "flannel.1").stdout
        assert routes(n).count("flannel.1") == 1
        assert "blackhole 10.244.0.0/16" in routes(n), "a departed peer's removal keeps it"
    # The departed subnet now meets the blackhole: silence, not net-unreachable.
    assert connect_once(pods[0], bed.pod_ips[pods[2]], 1.0) == "timeout"
    reach(pods[0], bed.pod_ips[pods[1]])


CONNECT = """
import socket, sys, time
dst, port = sys.argv[1], int(sys.argv[2])
seconds, timeout = float(sys.argv[3]), float(sys.argv[4])
end = time.monotonic() + seconds
for attempt in range(1000):
    if attempt and time.monotonic() > end:
        break
    try:
        with socket.create_connection((dst, port), timeout) as s:
            s.sendall(b"x")
            print("ok" if s.recv(1) == b"x" else "no echo", flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    except OSError as err:
        print(f"{type(err).__name__} {err}", flush=True)
    time.sleep(0.02)
"""


def connect_once(client: str, dst: str, timeout: float) -> str:
    got = in_ns(client, sys.executable, "-c", CONNECT, dst, "7002", "0", str(timeout))
    return got.stdout.strip()


@contextlib.contextmanager
def connect_loop(client: str, server: str, dst: str, seconds: float
                 ) -> Iterator[list[str]]:
    """New TCP connections (3 s timeout each, a byte echoed) from ``client`` to ``dst`` (in
    namespace ``server``) for ``seconds``; the list holds one result per connection once the
    block has run."""
    srv = subprocess.Popen(["ip", "netns", "exec", server, "socat",
                            "TCP-LISTEN:7002,reuseaddr,fork", "PIPE"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: list[str] = []
    try:
        until(lambda: connect_once(client, dst, 1.0) == "ok", 5, "echo server up")
        loop = subprocess.Popen(["ip", "netns", "exec", client, sys.executable, "-c", CONNECT,
                                 dst, "7002", str(seconds), "3"], stdout=subprocess.PIPE,
                                text=True)
        try:
            yield results
            out, _ = loop.communicate(timeout=seconds + 15)
        finally:
            loop.kill()
            loop.wait(5)
        results.extend(out.splitlines())
    finally:
        srv.kill()
        srv.wait(5)


def test_daemon_restart_under_ping_loses_nothing(bed: Testbed) -> None:
    nodes = start_nodes(bed, 3)
    pods = [bed.add_pod(n) for n in nodes]
    until(lambda: all(routes(n).count("flannel.1") == 2 for n in nodes), what="full mesh")
    reach(pods[0], bed.pod_ips[pods[1]])
    index_before = in_ns(nodes[0].ns, "cat", "/sys/class/net/flannel.1/ifindex").stdout
    subnet_before = nodes[0].env()["FLANNEL_SUBNET"]
    ping = subprocess.Popen(
        ["ip", "netns", "exec", pods[0], "ping", "-i", "0.01", "-c", "400", "-W", "1",
         bed.pod_ips[pods[1]]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for node in nodes[:2]:
            bed.kill_daemon(node)
            started = time.time()
            bed.start_daemon(node)
            bed.wait_ready(node, since=started - 0.01)
        out, _ = ping.communicate(timeout=30)
    finally:
        ping.kill()
    assert " 0% packet loss" in out, out[-400:]
    assert "400 received" in out
    assert nodes[0].env()["FLANNEL_SUBNET"] == subnet_before, "subnet must survive a restart"
    assert in_ns(nodes[0].ns, "cat", "/sys/class/net/flannel.1/ifindex").stdout == index_before
    metrics = in_ns(nodes[0].ns, "python3", "-c", "import urllib.request as u; print(u.urlopen("
                    f"'http://127.0.0.1:{nodes[0].listen_port}/metrics').read().decode())")
    assert "svcnet_overlay_changes_total 0.0" in metrics.stdout, "a restart must change nothing"
    assert status(nodes[0]).returncode == 0


def test_host_gw_backend(bed: Testbed) -> None:
    conf = {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}
    nodes = start_nodes(bed, 3, conf)
    pods = [bed.add_pod(n) for n in nodes]
    until(lambda: all(routes(n).count("dev eth0") == 2 for n in nodes), what="host-gw routes")
    assert "flannel" not in in_ns(nodes[0].ns, "ip", "link").stdout
    assert nodes[0].env()["FLANNEL_MTU"] == "1500"
    assert f"via {nodes[1].ip} dev eth0" in routes(nodes[0])
    # FORWARD-accept rules carry pod traffic even where the FORWARD policy is DROP.
    for n in nodes:
        in_ns(n.ns, "iptables", "-P", "FORWARD", "DROP")
    reach(pods[0], bed.pod_ips[pods[2]])
    reach(pods[2], bed.pod_ips[pods[1]], "-M", "do", "-s", "1472")
    tcp_echo(bed, pods[1], pods[0], payload=1400, rounds=5)
    # Masquerade: traffic leaving the cluster network carries the node's address; traffic
    # between pods keeps the pod's.
    assert peer_address_seen(bed.underlay, "10.99.0.254", pods[0]) == nodes[0].ip
    assert peer_address_seen(pods[1], bed.pod_ips[pods[1]], pods[0]) == bed.pod_ips[pods[0]]


def peer_address_seen(server_ns: str, server_ip: str, client_ns: str) -> str:
    """The source address a TCP server in ``server_ns`` sees for ``client_ns``."""
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "socat",
                            "TCP-LISTEN:7001,reuseaddr", "SYSTEM:echo $SOCAT_PEERADDR"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            got = in_ns(client_ns, "socat", "-T", "2", "-", f"TCP:{server_ip}:7001",
                        check=False, timeout=10)
            if got.returncode == 0 and got.stdout.strip():
                return got.stdout.strip()
            time.sleep(0.1)
        raise AssertionError(f"no answer from {server_ip}: {got.stderr}")
    finally:
        srv.kill()
        srv.wait(5)


def test_dual_stack_vxlan(netns: Callable[[str], str],
                                             tmp_path: Path) -> None:
    require_binary("etcd", "etcdctl", "ping")
    tb = Testbed(netns, tmp_path, ipv6=True, use_cni=True)
    try:
        tb.start_etcd()
        conf = {"Network": "10.244.0.0/16", "EnableIPv6": True,
                "IPv6Network": "fd00:10:244::/56", "IPv6SubnetLen": 64,
                "Backend": {"Type": "vxlan"}}
        nodes = start_nodes(tb, 2, conf)
        pods = [tb.add_pod(n) for n in nodes]
        assert "FLANNEL_IPV6_SUBNET" in nodes[0].env()
        until(lambda: all("flannel-v6.1" in routes(n) for n in nodes), what="IPv6 routes")
        link = in_ns(nodes[0].ns, "ip", "-d", "link", "show", "flannel-v6.1").stdout
        assert "mtu 1430" in link and f"local {nodes[0].ip6}" in link
        reach(pods[0], tb.pod_ips6[pods[1]], "-6")
        reach(pods[1], tb.pod_ips[pods[0]])
        tcp_echo(tb, pods[1], pods[0], payload=1400, rounds=5)
    finally:
        tb.close()


def test_direct_routing_skips_encapsulation_on_one_segment(bed: Testbed) -> None:
    conf = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": True}}
    nodes = start_nodes(bed, 2, conf)
    pods = [bed.add_pod(n) for n in nodes]
    until(lambda: f"via {nodes[1].ip} dev eth0" in routes(nodes[0]), what="direct route")
    assert "flannel.1" not in routes(nodes[0])
    assert nodes[0].env()["FLANNEL_MTU"] == "1450", "MTU stays safe for peers behind routers"
    reach(pods[0], bed.pod_ips[pods[1]])


def test_kube_subnet_manager_uses_pod_cidrs_and_annotations(bed: Testbed) -> None:
    """Subnets from Node objects' podCIDRs, VTEP data published as Flannel's annotations."""
    conf_file = bed.workdir / "net-conf.json"
    conf_file.write_text(json.dumps(NET_CONF))
    nodes = [bed.add_node(f"n{i}") for i in range(3)]
    objects = [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name},
                "spec": {"podCIDR": f"10.244.{10 + i}.0/24"}} for i, n in enumerate(nodes)]
    store = f"etcd://{bed.etcd_endpoint}"
    in_ns(bed.underlay, SVCNET, "apply", "--store", store, "-f", "-",
          input="\n---\n".join(json.dumps(o) for o in objects))
    for n in nodes:
        bed.start_daemon(n, "--overlay-subnet-manager", "kube", config_file=str(conf_file))
    for n in nodes:
        bed.wait_ready(n)
    assert [n.env()["FLANNEL_SUBNET"] for n in nodes] == [f"10.244.{10 + i}.1/24"
                                                           for i in range(3)]
    pods = [bed.add_pod(n) for n in nodes]
    until(lambda: all(routes(n).count("flannel.1") == 2 for n in nodes), what="full mesh")
    reach(pods[0], bed.pod_ips[pods[2]])
    got = json.loads(in_ns(bed.underlay, SVCNET, "get", "--store", store, "nodes", "n1",
                           "-o", "json").stdout)
    ann = got["metadata"]["annotations"]
    assert ann["flannel.alpha.coreos.com/public-ip"] == nodes[1].ip
    assert ann["flannel.alpha.coreos.com/backend-type"] == "vxlan"
    assert json.loads(ann["flannel.alpha.coreos.com/backend-data"])["VNI"] == 1
    bed.kill_daemon(nodes[2])
    in_ns(bed.underlay, SVCNET, "delete", "--store", store, "nodes", "n2")
    until(lambda: all("10.244.12.0" not in routes(n) for n in nodes[:2]), 10,
          "deleted node's routes removed")


def test_etcd_outage_keeps_datapath_and_daemons_recover(bed: Testbed) -> None:
    """Leases are renewed (short TTL); while etcd is down pods keep talking; afterwards the
    daemons' watches resume and a new node is seen by everyone."""
    nodes = start_nodes(bed, 2, NET_CONF, "--overlay-lease-ttl", "3")
    pods = [bed.add_pod(n) for n in nodes]
    until(lambda: all("flannel.1" in routes(n) for n in nodes), what="mesh")
    time.sleep(4)  # longer than the TTL: only renewal keeps the leases
    keys = bed.etcdctl("get", "--prefix", "--keys-only", "/coreos.com/network/subnets/")
    assert keys.stdout.count("/subnets/") == 2
    assert bed.etcd is not None
    bed.etcd.kill()
    bed.etcd.wait(10)
    for _ in range(3):
        reach(pods[0], bed.pod_ips[pods[1]])
        time.sleep(0.5)
    assert all(n.daemon is not None and n.daemon.poll() is None for n in nodes)
    bed.start_etcd()
    late = bed.add_node("n9")
    bed.start_daemon(late, "--overlay-lease-ttl", "3")
    bed.wait_ready(late)
    until(lambda: all(routes(n).count("flannel.1") == 2 for n in [*nodes, late]), 30,
          "mesh including the node that joined after the outage")
    reach(bed.add_pod(late), bed.pod_ips[pods[0]])


def vxlan_conntrack_entries(node: SimNode) -> int:
    got = in_ns(node.ns, "conntrack", "-L", "-p", "udp", "--dport", "8472", check=False)
    return len([ln for ln in got.stdout.splitlines() if "dport=8472" in ln])


def test_nftables_backend_masquerades_only_outside_heals_and_cleans_up(bed: Testbed) -> None:
    """The same rules as an nftables table of our own: traffic leaving the pod network is
    masqueraded, pod-to-pod traffic is not, the VXLAN packets bypass conntrack, a deleted
    rule is reported and restored, and ``svcnet overlay cleanup`` removes the table."""
    require_binary("nft", "conntrack")
    nodes = start_nodes(bed, 2, NET_CONF, "--overlay-masq-backend", "nftables")
    pods = [bed.add_pod(n) for n in nodes]
    until(lambda: all("flannel.1" in routes(n) for n in nodes), what="mesh")
    reach(pods[0], bed.pod_ips[pods[1]])
    assert peer_address_seen(bed.underlay, "10.99.0.254", pods[0]) == nodes[0].ip
    assert peer_address_seen(pods[1], bed.pod_ips[pods[1]], pods[0]) == bed.pod_ips[pods[0]]
    tcp_echo(bed, pods[0], pods[1], payload=1400, rounds=5)
    assert vxlan_conntrack_entries(nodes[0]) == 0, "VXLAN packets must not be tracked"
    table = in_ns(nodes[0].ns, "nft", "list", "table", "inet", "svcnet-overlay").stdout
    assert f"ip daddr {nodes[0].ip} udp dport 8472 notrack" in table
    assert "masquerade fully-random" in table
    assert "SVCNET-OVL" not in in_ns(nodes[0].ns, "iptables-save").stdout
    report = status(nodes[0])
    assert report.returncode == 0 and "in sync" in report.stdout, report.stdout

    # Drift, seen while the daemon is paused so its resync does not race the report.
    victim = nodes[0]
    snapshot = json.loads(in_ns(victim.ns, SVCNET, "overlay", "status", "--json", "--url",
                                f"http://127.0.0.1:{victim.listen_port}").stdout)["status"]
    assert snapshot["firewall"] == "nftables"
    assert victim.daemon is not None
    victim.daemon.send_signal(signal.SIGSTOP)
    try:
        in_ns(victim.ns, "nft", "flush", "chain", "inet", "svcnet-overlay", "postrouting")
        pending, rules = asyncio.run(pending_changes(snapshot, victim.ns))
        assert not pending
        assert "nftables inet svcnet-overlay: missing: meta mark & 0x00004000 == 0x00004000 " \
               "return" in rules, rules
    finally:
        victim.daemon.send_signal(signal.SIGCONT)
    until(lambda: status(victim).returncode == 0, 10, "nftables table healed")
    assert peer_address_seen(bed.underlay, "10.99.0.254", pods[0]) == nodes[0].ip

    bed.kill_daemon(victim)
    done = in_ns(victim.ns, SVCNET, "overlay", "cleanup")
    assert "nftables: removed 1 objects" in done.stdout
    assert "svcnet-overlay" not in in_ns(victim.ns, "nft", "list", "tables").stdout
    reach(pods[0], bed.pod_ips[pods[1]])  # the datapath stays unless --datapath is given
