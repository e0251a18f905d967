"""Overlay throughput (VXLAN vs host-gw vs the bare underlay) and convergence at 10 and 50 nodes.

Throughput: two simulated nodes (namespaces on a veth/bridge underlay), each running
``svcnet node --overlay`` against etcd, one pod each; iperf3 (one TCP stream, median of
``--runs``) pod to pod over VXLAN, then over host-gw, and node to node over the underlay
itself, all in one run so the ratios compare like with like.

Convergence: N nodes whose daemons run in this process (one event loop, each with its own
etcd client, ``ip -n NS`` adapter and iptables adapter: 2 shared cores stand in for N
machines, which makes the figure pessimistic). Once N-1 have settled, one more node starts;
the time is from its start until its own datapath holds all N-1 peers and every other node
has synced the route to it; then every node pings the newcomer's VTEP address to prove it.

Usage (root): .venv/bin/python bench/overlay.py [--runs 3] [--seconds 3] [--nodes 10,50]
Last line: JSON with vxlan_gbps, hostgw_gbps, underlay_gbps, vxlan_vs_hostgw,
converge_10_s, converge_50_s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from svcnet.cni.overlay.testbed import NamespacePool, SimNode, Testbed, in_ns, sh


def iperf(tb: Testbed, client: str, server: str, address: str, seconds: float) -> float:
    srv = subprocess.Popen(["ip", "netns", "exec", server, "iperf3", "-s"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        doc: dict[str, Any] = {}
        for _ in range(50):
            got = in_ns(client, "iperf3", "-c", address, "-t", str(seconds), "-J",
                        check=False, timeout=seconds + 30)
            with contextlib.suppress(ValueError):
                doc = json.loads(got.stdout)
            if "sum_received" in doc.get("end", {}):
                return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 {client} -> {address}: {doc.get('error')}")
    finally:
        srv.kill()
        srv.wait(5)


def two_nodes(pool: NamespacePool, workdir: Path, backend: str
              ) -> tuple[Testbed, list[SimNode], list[str]]:
    tb = Testbed(pool, workdir)
    tb.start_etcd()
    tb.etcdctl("put", "/coreos.com/network/config",
               json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": backend}}))
    nodes = [tb.add_node(f"n{i}") for i in range(2)]
    for n in nodes:
        tb.start_daemon(n, resync=30)
    for n in nodes:
        tb.wait_ready(n)
    pods = [tb.add_pod(n) for n in nodes]
    deadline = time.monotonic() + 20
    while in_ns(pods[0], "ping", "-c1", "-W1", tb.pod_ips[pods[1]], check=False).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{backend}: pods cannot reach each other")
    return tb, nodes, pods


def throughput(runs: int, seconds: float) -> dict[str, float]:
    results: dict[str, list[float]] = {"vxlan": [], "host-gw": [], "underlay": []}
    beds = {}
    pool = NamespacePool(f"ovb{os.getpid()}")
    try:
        for backend in ("vxlan", "host-gw"):
            workdir = Path(tempfile.mkdtemp(prefix=f"overlay-{backend}-"))
            beds[backend] = two_nodes(pool, workdir, backend)
        for _ in range(runs):
            for backend, (tb, _, pods) in beds.items():
                results[backend].append(iperf(tb, pods[0], pods[1], tb.pod_ips[pods[1]],
                                              seconds))
            tb, nodes, _ = beds["host-gw"]
            results["underlay"].append(iperf(tb, nodes[0].ns, nodes[1].ns, nodes[1].ip,
                                             seconds))
    finally:
        for tb, _, _ in beds.values():
            tb.close()
        pool.close()
    return {k: statistics.median(v) for k, v in results.items()}


async def converge(n: int, underlay: str, workdir: Path) -> tuple[float, int, float]:
    """Seconds until a new node is programmed everywhere; pings that reached it; setup s."""
    from svcnet.cni.overlay.config import parse_network_config
    from svcnet.cni.overlay.daemon import OverlayDaemon, OverlayOptions
    from svcnet.cni.overlay.iptables import IptablesFirewall
    from svcnet.cni.overlay.lease import EtcdSubnetManager
    from svcnet.cni.overlay.netlink import IpCommandNetlink

    from svcnet.store.etcd import EtcdClient

    pool = NamespacePool(f"ovc{os.getpid()}-{n}")
    tb = Testbed(pool, workdir, underlay=underlay)
    config = parse_network_config(b'{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    daemons: list[OverlayDaemon] = []
    tasks: list[asyncio.Task[None]] = []
    clients: list[EtcdClient] = []

    def start(node: SimNode) -> OverlayDaemon:
        client = EtcdClient([tb.etcd_endpoint])
        clients.append(client)
        d = OverlayDaemon(
            OverlayOptions(node_name=node.name, iface="eth0", listen="", resync=300,
                           subnet_file=str(node.subnet_file), netns=node.ns),
            netlink=IpCommandNetlink(node.ns), firewall=IptablesFirewall(node.ns),
            manager=EtcdSubnetManager(client, config=config))
        daemons.append(d)
        tasks.append(asyncio.create_task(d.run(None, None)))
        return d

    try:
        tb.start_etcd()
        setup = time.monotonic()
        nodes = [tb.add_node(f"c{i}") for i in range(n)]
        old = [start(node) for node in nodes[:-1]]
        await asyncio.wait_for(asyncio.gather(*(d.ready.wait() for d in old)), 300)
        while not all(len(d.status.peers) == n - 2 for d in old):
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        setup = time.monotonic() - setup
        started = time.monotonic()
        new = start(nodes[-1])
        await asyncio.wait_for(new.ready.wait(), 60)
        assert new.status.lease, "new node has no lease"
        subnet = new.status.lease["subnets"][0]
        deadline = time.monotonic() + 60
        while not (len(new.status.peers) == n - 1 and not new.status.last_errors and all(
                any(p["subnet"] == subnet for p in d.status.peers) and not d.status.last_errors
                for d in old)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} nodes did not converge")
            await asyncio.sleep(0.002)
        elapsed = time.monotonic() - started
        target = subnet.split("/")[0]
        pings = await asyncio.gather(*(asyncio.create_subprocess_exec(
            "ip", "netns", "exec", node.ns, "ping", "-c", "1", "-W", "2", target,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            for node in nodes[:-1]))
        codes = [await p.wait() for p in pings]
        return elapsed, codes.count(0), setup
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
        tb.close()
        pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--nodes", default="10,50")
    parser.add_argument("--inside", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/overlay.py needs root (network namespaces)", file=sys.stderr)
        return 2
    if not args.inside:
        # The convergence part talks to etcd on the simulated underlay, so this process must
        # live in the underlay namespace: create it and re-run ourselves inside.
        ctl = f"ovctl{os.getpid()}"
        sh("ip", "netns", "add", ctl)
        try:
            return subprocess.call(["ip", "netns", "exec", ctl, sys.executable,
                                    os.path.abspath(__file__), *sys.argv[1:], "--inside", ctl])
        finally:
            for pid in sh("ip", "netns", "pids", ctl, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "delete", ctl, check=False)
    sh("ip", "link", "set", "lo", "up")

    tput = throughput(args.runs, args.seconds)
    print(f"{'path (iperf3, 1 TCP stream, median of ' + str(args.runs) + ')':<44} Gbit/s")
    for name in ("underlay", "host-gw", "vxlan"):
        print(f"  {name:<42} {tput[name]:6.2f}")
    ratio = tput["vxlan"] / tput["host-gw"]
    print(f"  vxlan / host-gw {ratio:.2f}x   host-gw / underlay "
          f"{tput['host-gw'] / tput['underlay']:.2f}x")

    converged: dict[int, float] = {}
    print(f"\n{'nodes':>5} {'converge s':>11} {'reached':>8} {'setup s':>8}")
    for n in (int(x) for x in args.nodes.split(",") if x):
        # Each size gets a fresh underlay bridge and etcd in this namespace.
        sh("ip", "link", "del", "br0", check=False)
        workdir = Path(tempfile.mkdtemp(prefix=f"overlay-converge-{n}-"))
        seconds, reached, setup = asyncio.run(converge(n, args.inside, workdir))
        converged[n] = seconds
        print(f"{n:>5} {seconds:>11.3f} {reached:>5}/{n - 1:<2} {setup:>8.1f}")
        if reached != n - 1:
            print(f"warning: only {reached} of {n - 1} nodes reached the new node",
                  file=sys.stderr)
    print(json.dumps({
        "vxlan_gbps": round(tput["vxlan"], 3), "hostgw_gbps": round(tput["host-gw"], 3),
        "underlay_gbps": round(tput["underlay"], 3), "vxlan_vs_hostgw": round(ratio, 3),
        "converge_10_s": round(converged.get(10, float("nan")), 3),
        "converge_50_s": round(converged.get(50, float("nan")), 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
