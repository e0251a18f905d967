"""Overlay throughput (VXLAN vs host-gw vs the bare underlay) and convergence at 10 and 50 nodes.

Throughput: pairs of simulated nodes (namespaces on a veth/bridge underlay), each running
``svcnet node --overlay`` against etcd, one pod each; iperf3 (one TCP stream) pod to pod over
VXLAN as svcnet sets it up, over VXLAN as Flannel does (``--no-overlay-vxlan-notrack``, and
again with Flannel's documented TX-checksum workaround), over host-gw, and node to node over
the underlay itself. Rounds interleave all paths (alternating order) and ratios are taken per
round, so the machine's changing load (2 cores shared with other jobs) hits all alike; host-gw
and the underlay get the kernel's defaults, and every path the same iperf3 priority. Besides
Gbit/s, each run's CPU seconds per Gbit (iperf3's own accounting) give a cost ratio that
other jobs disturb much less.

Convergence: N nodes whose daemons run in this process (one event loop, each with its own
etcd client, ``ip -n NS`` adapter and iptables adapter: 2 shared cores stand in for N
machines, which makes the figure pessimistic). Once N-1 have settled, one more node starts;
the time is from its start until its own datapath holds all N-1 peers and every other node
has synced the route to it; then every node pings the newcomer's VTEP address to prove it.

Usage (root): .venv/bin/python bench/overlay.py [--runs 9] [--seconds 2] [--nodes 10,50]
    [--settings] [--profile RUNS]
Last line: JSON with vxlan_gbps, hostgw_gbps, underlay_gbps, vxlan_vs_hostgw,
converge_10_s, converge_50_s (plus vxlan_cpu_efficiency_vs_hostgw, the Flannel-style ratios
and the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svcnet.cni.overlay.testbed import NamespacePool, SimNode, Testbed, in_ns, sh


@dataclass
class Sample:
    gbps: float
    cpu_s_per_gbit: float
    """CPU seconds (iperf3 client + server, user + system) per Gbit moved. Without
    CONFIG_IRQ_TIME_ACCOUNTING (our kernel) the softirq work done in their context -- on
    veths almost all of the datapath -- is charged to them, so this is the path's cost,
    and far less disturbed by other jobs on the machine than the throughput."""


def iperf(client: str, server: str, address: str, seconds: float,
          wrap: tuple[str, ...] = (), pin: bool = False) -> Sample:
    """One iperf3 run; ``wrap`` prefixes the client's command (``perf record ... --``);
    ``pin`` runs the client on CPU 0 and the server on CPU 1 (see ``--cpu-per-node``)."""
    cpu = (lambda n: ("taskset", "-c", str(n))) if pin else (lambda n: ())
    srv = subprocess.Popen(["ip", "netns", "exec", server, *NICE, *cpu(1), "iperf3", "-s"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        doc: dict[str, Any] = {}
        for _ in range(50):
            got = sh(*wrap, "ip", "netns", "exec", client, *NICE, *cpu(0), "iperf3", "-c",
                     address,
                     "-t", str(seconds), "-J", check=False, timeout=seconds + 60)
            with contextlib.suppress(ValueError):
                doc = json.loads(got.stdout)
            end = doc.get("end", {})
            if "sum_received" in end:
                gbps = float(end["sum_received"]["bits_per_second"]) / 1e9
                cpu = end["cpu_utilization_percent"]
                busy = (cpu["host_total"] + cpu["remote_total"]) / 100 * seconds
                return Sample(gbps, busy / (gbps * seconds))
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 {client} -> {address}: {doc.get('error')}")
    finally:
        srv.kill()
        srv.wait(5)


NICE = ("nice", "-n", "-10")
"""iperf3 runs above other jobs' priority: the machine is shared, and the same for all paths."""

@dataclass(frozen=True)
class Row:
    """One measured row: which pair of nodes, pod or node endpoints, and an ``ethtool -K``
    setting applied on both nodes just for this measurement (then undone)."""

    what: str
    bed: str
    pods: bool = True
    dev: str = ""
    feature: str = ""
    value: str = ""
    big_tcp: int = 0
    """If set: GSO/GRO maximum size (IPv4 and IPv6, BIG TCP) of every device of the pair --
    pods, nodes, underlay -- for this measurement (then back to 64 KiB)."""

    def toggle(self, bed: tuple[Testbed, list[SimNode], list[str]], on: bool) -> None:
        tb, nodes, pods = bed
        if self.dev:
            undo = {"on": "off", "off": "on"}[self.value]
            for n in nodes:
                in_ns(n.ns, "ethtool", "-K", self.dev, self.feature, self.value if on else undo)
        if self.big_tcp:
            for ns in (tb.underlay, *(n.ns for n in nodes), *pods):
                in_ns(ns, sys.executable, "-c", SET_GSO_SIZE,
                      str(self.big_tcp if on else 65536))


SET_GSO_SIZE = """
import sys
from svcnet.cni import rtnl
size = int(sys.argv[1])
with rtnl.Rtnl() as r:
    for link in r.links():
        if link.name != "lo":
            body = rtnl._IFINFOMSG.pack(rtnl.AF_UNSPEC, 0, link.index, 0, 0) + b"".join(
                rtnl.attr_u32(kind, size) for kind in (41, 58, 63, 64))
            r.request(rtnl.RTM_NEWLINK, 0, body, f"set {link.name} gso/gro max size")
"""
"""IFLA_GSO_MAX_SIZE, IFLA_GRO_MAX_SIZE, IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE:
Debian 12's ``ip`` (iproute2 6.1) cannot set the IPv4 ones."""


PATHS = {
    "underlay": Row("node to node, no overlay", "host-gw", pods=False),
    "host-gw": Row("pod to pod, host-gw", "host-gw"),
    "vxlan": Row("pod to pod, VXLAN (svcnet: notrack, offloads kept on)", "vxlan"),
    "vxlan-flannel": Row("pod to pod, VXLAN as Flannel programs it", "vxlan-flannel"),
    "vxlan-flannel-csum-off": Row("same + Flannel's 'tx-checksum-ip-generic off' fix",
                                    "vxlan-flannel", dev="flannel.1",
                                    feature="tx-checksum-ip-generic", value="off"),
}
SETTINGS = {
    "vxlan-gro-off": Row("Flannel-style VXLAN, GRO off on flannel.1", "vxlan-flannel",
                           dev="flannel.1", feature="gro", value="off"),
    "vxlan-rx-csum-off": Row("Flannel-style VXLAN, rx-checksumming off on flannel.1 (Flannel "
                             "PR #1282 turned rx and tx off)", "vxlan-flannel",
                             dev="flannel.1", feature="rx", value="off"),
    "host-gw-veth-gro": Row("host-gw, GRO (NAPI) on the underlay veths", "host-gw",
                              dev="eth0", feature="gro", value="on"),
    "vxlan-veth-gro": Row("svcnet VXLAN, GRO (NAPI) on the underlay veths", "vxlan",
                            dev="eth0", feature="gro", value="on"),
    "host-gw-big-tcp": Row("host-gw, BIG TCP (192 KiB GSO/GRO) on every device", "host-gw",
                           big_tcp=196608),
    "vxlan-big-tcp": Row("svcnet VXLAN, BIG TCP (192 KiB GSO/GRO) on every device incl. "
                         "flannel.1", "vxlan", big_tcp=196608),
}
"""``--settings``: device settings tried, measured in the same interleaved rounds."""


PERF_PERIOD_NS = 250_000
"""``perf record -e cpu-clock -c``: one sample per 0.25 ms of CPU, so samples convert to CPU
time (hardware counters are not available in every VM; the clock event is)."""
IDLE = re.compile(r"(safe_halt|_idle\b|^poll_idle|mwait|^default_idle|cpuidle)")
CATEGORIES = (
    ("netfilter: nft chains, conntrack, NAT hooks, xt compat",
     r"^(nft_|__nft|nf_|__nf_|xt_|ipt_|ipv4_conntrack|ipv4_confirm|hash_conntrack|"
     r"tcp_in_window|tcp_error|get_l4proto|ip_sabotage)"),
    ("bridge netfilter (br_netfilter)", r"^(br_nf|brnf|nf_bridge|setup_pre_routing)"),
    ("VXLAN, UDP tunnel, outer UDP, GRO cells",
     r"^(vxlan|udp_tunnel|iptunnel|__iptunnel|ip_tunnel|gro_cell|udp4|__udp4|udp_|__udp|"
     r"skb_tunnel|__ip_select_ident|ip_md_tunnel|dst_cache)"),
    ("GRO / NAPI", r"^(dev_gro|napi_gro|gro_|inet_gro|tcp4_gro|tcp_gro|skb_gro|napi_|__napi)"),
    ("checksum (software)", r"(csum|checksum)"),
    ("software segmentation, skb copies",
     r"^(skb_segment|__skb_gso_segment|skb_mac_gso|inet_gso|tcp_gso|tcp4_gso|udp4_ufo|"
     r"__udp_gso|skb_udp_tunnel_segment|skb_copy|pskb_expand_head|__pskb_pull_tail|"
     r"skb_checksum_help)"),
    ("copy to/from the iperf3 sockets", r"^(_copy_from_iter|_copy_to_iter|copy_user|"
     r"rep_movs|__check_object_size|check_heap_object|__virt_addr_valid)"),
    ("memcpy/memset", r"(memcpy|memset|memmove)"),
    ("softirq dispatch, scheduler, wake-ups (and irq-restore points*)",
     r"^(handle_softirqs|__do_softirq|net_rx_action|__local_bh_enable_ip|do_softirq|"
     r"finish_task_switch|__schedule|schedule|try_to_wake_up|_raw_spin_unlock_irq|__wake_up|"
     r"pick_next|dequeue_|enqueue_|update_curr|psi_|ttwu_)"),
)
OTHER = "rest: TCP, IP, routing, bridges, veth, skb alloc/free, softirq, locks"
"""Self time of the leaf symbol, by category: VXLAN's extra work shows up where it is done."""


def categorize(symbol: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, symbol):
            return name
    return OTHER


def perf_symbols(data: Path) -> dict[str, int]:
    """Samples per kernel/user symbol in the datapath's contexts: iperf3 (on veths almost
    all softirq work runs in the sender's context), ksoftirqd and the idle task's
    interrupts -- not the other jobs sharing the machine, and not idling."""
    comms = ["iperf3", "swapper", *(f"ksoftirqd/{i}" for i in range(os.cpu_count() or 1))]
    got = sh("perf", "report", "-i", str(data), "--no-children", "--sort", "sym", "-n",
             "--stdio", "-g", "none", "--comms", ",".join(comms), timeout=300)
    counts: dict[str, int] = {}
    for line in got.stdout.splitlines():
        m = re.match(r"\s+[\d.]+%\s+(\d+)\s+\[.\]\s+(\S+)", line)
        if m and not IDLE.search(m.group(2)):
            counts[m.group(2)] = counts.get(m.group(2), 0) + int(m.group(1))
    return counts


@dataclass
class Profile:
    ms_per_gbit: dict[str, float]
    """CPU milliseconds per Gbit moved, by symbol."""
    gbit: float

    def by_category(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for symbol, ms in self.ms_per_gbit.items():
            name = categorize(symbol)
            out[name] = out.get(name, 0.0) + ms
        return out


def profile(path: Row, beds: dict[str, tuple[Testbed, list[SimNode], list[str]]],
            runs: int, seconds: float) -> Profile:
    """``runs`` iperf3 runs of one path under system-wide ``perf record``."""
    tb, _, pods = beds[path.bed]
    samples: dict[str, int] = {}
    gbit = 0.0
    with tempfile.TemporaryDirectory(prefix="overlay-perf-") as tmp:
        data = Path(tmp) / "perf.data"
        for _ in range(runs):
            wrap = ("perf", "record", "-q", "-a", "-e", "cpu-clock", "-c",
                    str(PERF_PERIOD_NS), "-o", str(data), "--")
            sample = iperf(pods[0], pods[1], tb.pod_ips[pods[1]], seconds, wrap)
            gbit += sample.gbps * seconds
            for symbol, n in perf_symbols(data).items():
                samples[symbol] = samples.get(symbol, 0) + n
    ms = PERF_PERIOD_NS / 1e6
    return Profile({k: n * ms / gbit for k, n in samples.items()}, gbit)


def print_profile(vxlan: Profile, hostgw: Profile, runs: int, seconds: float) -> None:
    a, b = vxlan.by_category(), hostgw.by_category()
    ta, tb = sum(a.values()), sum(b.values())
    print(f"\nperf: {runs} runs x {seconds:g} s per path, CPU ms per Gbit by leaf symbol "
          f"(iperf3, softirq and interrupt context; {vxlan.gbit:.0f} / {hostgw.gbit:.0f} Gbit)")
    print(f"{'category':<58} {'VXLAN':>7} {'share':>6} {'host-gw':>8} {'share':>6} "
          f"{'extra':>6} {'of gap':>7}")
    gap = ta - tb
    for name in sorted(set(a) | set(b), key=lambda k: -a.get(k, 0.0)):
        x, y = a.get(name, 0.0), b.get(name, 0.0)
        print(f"{name[:58]:<58} {x:7.2f} {x / ta:6.1%} {y:8.2f} {y / tb:6.1%} {x - y:+6.2f} "
              f"{(x - y) / gap if gap > 0 else 0:7.0%}")
    print(f"{'total':<58} {ta:7.2f} {'':6} {tb:8.2f} {'':6} {gap:+6.2f}   "
          f"(VXLAN / host-gw {ta / tb:.2f}x)")
    print("* the clock event cannot sample with interrupts off; such time lands where they "
          "are turned back on")
    extra = sorted(vxlan.ms_per_gbit, key=lambda k: -(vxlan.ms_per_gbit[k]
                                                      - hostgw.ms_per_gbit.get(k, 0.0)))
    print("largest extra symbols (ms/Gbit): " + ", ".join(
        f"{k} +{vxlan.ms_per_gbit[k] - hostgw.ms_per_gbit.get(k, 0.0):.2f}" for k in extra[:12]))


def two_nodes(pool: NamespacePool, workdir: Path, backend: str, *extra: str
              ) -> tuple[Testbed, list[SimNode], list[str]]:
    tb = Testbed(pool, workdir)
    tb.start_etcd()
    tb.etcdctl("put", "/coreos.com/network/config",
               json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": backend}}))
    nodes = [tb.add_node(f"n{i}") for i in range(2)]
    for n in nodes:
        tb.start_daemon(n, *extra, resync=30)
    for n in nodes:
        tb.wait_ready(n)
    pods = [tb.add_pod(n) for n in nodes]
    deadline = time.monotonic() + 20
    while in_ns(pods[0], "ping", "-c1", "-W1", tb.pod_ips[pods[1]], check=False).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{backend}: pods cannot reach each other")
    return tb, nodes, pods


def throughput(runs: int, seconds: float, paths: dict[str, Row], profile_runs: int = 0,
               pin: bool = False) -> tuple[dict[str, list[Sample]], dict[str, Profile]]:
    """``runs`` rounds; each measures every path once, in alternating order, so slow changes
    in the machine's load hit all paths alike. Then, if asked, VXLAN and host-gw under
    ``perf``. ``pin``: one CPU per node (``--cpu-per-node``)."""
    results: dict[str, list[Sample]] = {name: [] for name in paths}
    profiles: dict[str, Profile] = {}
    beds = {}
    pool = NamespacePool(f"ovb{os.getpid()}")
    try:
        for name, backend, extra in (("vxlan", "vxlan", ()),
                                     ("vxlan-flannel", "vxlan", ("--no-overlay-vxlan-notrack",)),
                                     ("host-gw", "host-gw", ())):
            workdir = Path(tempfile.mkdtemp(prefix=f"overlay-{name}-"))
            beds[name] = two_nodes(pool, workdir, backend, *extra)
            if pin:  # each node's receive work on its own CPU (RPS), as on two machines
                for node, mask in zip(beds[name][1], ("1", "2"), strict=True):
                    in_ns(node.ns, "sh", "-c",
                          f"echo {mask} > /sys/class/net/eth0/queues/rx-0/rps_cpus")
        for i in range(runs):
            order = list(paths) if i % 2 == 0 else list(reversed(paths))
            for name in order:
                path = paths[name]
                tb, nodes, pods = beds[path.bed]
                path.toggle(beds[path.bed], True)
                try:
                    if path.pods:
                        sample = iperf(pods[0], pods[1], tb.pod_ips[pods[1]], seconds,
                                       pin=pin)
                    else:
                        sample = iperf(nodes[0].ns, nodes[1].ns, nodes[1].ip, seconds,
                                       pin=pin)
                    results[name].append(sample)
                finally:
                    path.toggle(beds[path.bed], False)
        for name in ("vxlan", "host-gw") if profile_runs else ():
            profiles[name] = profile(paths[name], beds, profile_runs, seconds)
    finally:
        for tb, _, _ in beds.values():
            tb.close()
        pool.close()
    return results, profiles


def paired(a: list[Sample], b: list[Sample], field: str) -> list[float]:
    """Per-round ratios a/b: each pair ran seconds apart, under nearly the same load."""
    return [getattr(x, field) / getattr(y, field) for x, y in zip(a, b, strict=True)]


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}-{fmt.format(max(values))})")


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
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=2)
    parser.add_argument("--nodes", default="10,50")
    parser.add_argument("--settings", action="store_true",
                        help="also measure the device settings we tried and did not keep")
    parser.add_argument("--profile", type=int, default=0, metavar="RUNS",
                        help="also run VXLAN and host-gw RUNS times under perf record -a "
                             "and print where the CPU per Gbit goes")
    parser.add_argument("--cpu-per-node", action="store_true",
                        help="iperf3 client on CPU 0, server on CPU 1, and each node's "
                             "receive processing steered (RPS) to its own CPU: on veths the "
                             "sender's CPU otherwise carries every packet through both nodes")
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

    load_before = os.getloadavg()
    paths = {**PATHS, **(SETTINGS if args.settings else {})}
    samples, profiles = throughput(args.runs, args.seconds, paths, args.profile,
                                   args.cpu_per_node)
    load_after = os.getloadavg()
    tput = {k: statistics.median(x.gbps for x in v) for k, v in samples.items()}
    hostgw = samples["host-gw"]
    print(f"iperf3, 1 TCP stream, {args.runs} interleaved rounds of {args.seconds:g} s; "
          f"median (min-max); load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after (2 cores)"
          + ("; one CPU per node" if args.cpu_per_node else ""))
    print(f"{'path':<24} {'Gbit/s':>19} {'vs host-gw':>17} {'CPU s/Gbit':>21} "
          f"{'CPU efficiency':>17}")
    for name in paths:
        got = samples[name]
        print(f"{name:<24} {spread([x.gbps for x in got]):>19} "
              f"{spread(paired(got, hostgw, 'gbps')):>17} "
              f"{spread([x.cpu_s_per_gbit for x in got], '{:.3f}'):>21} "
              f"{spread(paired(hostgw, got, 'cpu_s_per_gbit')):>17}")
    for name, path in paths.items():
        print(f"  {name}: {path.what}")
    ratio = statistics.median(paired(samples["vxlan"], hostgw, "gbps"))
    efficiency = statistics.median(paired(hostgw, samples["vxlan"], "cpu_s_per_gbit"))
    print(f"vxlan / host-gw: throughput {ratio:.2f}x (median of per-round ratios), "
          f"CPU efficiency {efficiency:.2f}x")
    if profiles:
        print_profile(profiles["vxlan"], profiles["host-gw"], args.profile, args.seconds)

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
        "vxlan_cpu_efficiency_vs_hostgw": round(efficiency, 3),
        "vxlan_flannel_vs_hostgw": round(statistics.median(
            paired(samples["vxlan-flannel"], hostgw, "gbps")), 3),
        "vxlan_flannel_csum_off_vs_hostgw": round(statistics.median(
            paired(samples["vxlan-flannel-csum-off"], hostgw, "gbps")), 3),
        "load_average": round(max(load_before[0], load_after[0]), 1),
        "cpu_per_node": args.cpu_per_node,
        **({"vxlan_perf_ms_per_gbit": round(sum(profiles["vxlan"].ms_per_gbit.values()), 2),
            "hostgw_perf_ms_per_gbit": round(sum(profiles["host-gw"].ms_per_gbit.values()), 2)}
           if profiles else {}),
        "converge_10_s": round(converged.get(10, float("nan")), 3),
        "converge_50_s": round(converged.get(50, float("nan")), 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
