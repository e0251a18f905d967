"""NetworkPolicy at scale: sync time against the bare ``nft -f``, one label change, memory,
and the datapath cost of 1,000 policies (issue 17).

Workload: ``policy_gen.generate`` -- 10,000 pods over 100 namespaces, 1,000 policies of the
shapes operators write (default deny, same app, tier to tier, namespace selectors, ipBlock
with except, named ports, port ranges, egress to DNS and the internet).

Sync (in a fresh network namespace: the process re-executes itself inside it, as the
daemon runs inside its node's namespace; every pod is on this node, the worst case):
- ``full_sync_s``: the real node component, fed from an in-memory store through the real
  informers, from start to the whole table in the kernel; then ``--repeat`` cold rounds
  (state forgotten, fresh namespace). ``floor_s``: the bare ``nft -f`` of exactly the
  ruleset that sync loaded, into a fresh namespace, right after each sync (same load).
  ``full_sync_ratio``: median of the pairs' ratios;
- ``one_change_ms``: store write of one pod label change -> the changed element is in the
  kernel (polled with ``nft get element``), median of ``--changes``;
- ``rss_mb``: peak RSS of that process (component + informers + the memory store holding
  every object; a real node talks to the API server instead).

Datapath: two simulated nodes (namespaces on a bridge underlay) running ``svcnet node
--overlay`` (VXLAN) against etcd, one pod each, as ``bench/overlay.py`` builds them. The
cluster gets the two real pods (client on n0, server on n1, allowed by policies on named
ports) and the synthetic pods spread over n0/n1; each node loads the table rendered for
its own pods. Rounds alternate table / no table (A/B, B/A, ...), each measuring:
- iperf3 throughput, one TCP stream, client pod -> server pod (``throughput_ratio`` =
  median of per-round table/no-table ratios);
- new TCP connections per second: one Python client connecting and closing in a loop
  against a listener in the server pod, each connection a new conntrack entry judged by
  the policy (``conn_rate_ratio``, same pairing).
Before the rounds it checks that the table enforces: a port no policy allows is refused.

Usage (root): .venv/bin/python bench/policy_scale.py [--quick] [--pods 10000 --policies 1000]
The last line is one JSON object: full_sync_ratio, one_change_ms, rss_mb, throughput_ratio,
conn_rate_ratio, plus the raw figures.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import policy_gen
from overlay import iperf, two_nodes
from svcnet.cni.overlay.testbed import NamespacePool, in_ns

TABLE = ("inet", "svcnet-policy")
IPERF_PORT = 5201
CONN_PORT = 8080
DENIED_PORT = 9099
SERVER_PORTS = (("iperf", IPERF_PORT, "TCP"), ("http", CONN_PORT, "TCP"))


# --- rendering (the real renderer, or a stand-in while it is not there) -----------------------

def render_table(cluster: policy_gen.Cluster, node: str | None) -> str:
    """The ``nft -f`` script for ``node``'s pods (None: every pod)."""
    try:
        from svcnet.policy import nftables, state
    except ImportError:
        return placeholder_table(cluster, node)

    from svcnet.model import NAMESPACE, NETWORK_POLICY, POD  # type: ignore[attr-defined]

    desired = state.compute([NETWORK_POLICY.convert(o) for o in cluster.policies],
                            [POD.convert(o) for o in cluster.pods],
                            [NAMESPACE.convert(o) for o in cluster.namespaces], node_name=node)
    return str(nftables.render_full(desired))


def placeholder_table(cluster: policy_gen.Cluster, node: str | None) -> str:
    """Until the renderer lands: a table of the same order of size (isolated pods, allowed
    (src, dst, proto, port) tuples), judged per new connection."""
    local = [p for p in cluster.pods if node is None or p["spec"]["nodeName"] == node]
    ip = lambda p: p["status"]["podIP"]  # noqa: E731
    pair = [p for p in cluster.pods if p["metadata"]["namespace"] == policy_gen.PAIR_NAMESPACE]
    allowed = [f"{ip(pair[0])} . {ip(pair[1])} . tcp . {port}" for _, port, _ in SERVER_PORTS]
    allowed += [f"{ip(a)} . {ip(b)} . tcp . 8080" for a, b in zip(
        cluster.pods, local[::-1], strict=False)][:20_000]
    return "\n".join([
        f"table {' '.join(TABLE)} {{",
        f"  set isolated {{ type ipv4_addr; elements = {{ {', '.join(map(ip, local))} }} }}",
        "  set allowed { type ipv4_addr . ipv4_addr . inet_proto . inet_service;",
        f"    elements = {{ {', '.join(allowed)} }} }}",
        "  chain forward { type filter hook forward priority filter; policy accept;",
        "    ct state established,related accept",
        "    ip daddr != @isolated accept",
        "    ip saddr . ip daddr . meta l4proto . th dport @allowed accept",
        "    drop", "  }", "}", ""])


# --- the kernel, read over netlink (nft's own "get element" loads the whole table first:
# about a second at this size, too slow to poll) ----------------------------------------------

NETLINK_NETFILTER = 12
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NFT = 10 << 8  # NFNL_SUBSYS_NFTABLES
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_GETGEN = 12, 13, 16
NLA_F_NESTED = 0x8000
NFPROTO_INET = 1


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind) + payload
    return head + b"\0" * (-len(head) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        out[kind & 0x3FFF] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return out


class Nfnl:
    """Single nf_tables requests over a netlink socket in this process's namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _request(self, msg_type: int, family: int, body: bytes) -> tuple[int, bytes]:
        """(message type, or -errno; attributes after the nfgenmsg header)."""
        self.seq += 1
        payload = struct.pack("=BBH", family, 0, 0) + body
        self.sock.send(struct.pack("=IHHII", 16 + len(payload), NFT | msg_type,
                                   NLM_F_REQUEST, self.seq, 0) + payload)
        for _ in range(1000):
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", data, off)
                if seq == self.seq:
                    if kind == NLMSG_ERROR:
                        return struct.unpack_from("=i", data, off + 16)[0], b""
                    return kind, data[off + 20:off + length]
                off += (length + 3) & ~3
        raise RuntimeError("no netlink reply")

    def genid(self) -> int:
        """The ruleset generation: it changes with every committed transaction."""
        kind, body = self._request(NFT_MSG_GETGEN, 0, b"")
        if kind < 0:
            raise OSError(-kind, os.strerror(-kind))
        return int(struct.unpack(">I", _attrs(body)[1])[0])

    def verdict(self, table: str, map_name: str, key: bytes) -> str | None:
        """The verdict an element of a verdict map holds ("goto CHAIN", "accept", ...),
        or None if there is no such element."""
        elem = _attr(1 | NLA_F_NESTED, _attr(1 | NLA_F_NESTED, _attr(1, key)))
        body = (_attr(1, table.encode() + b"\0") + _attr(2, map_name.encode() + b"\0")
                + _attr(3 | NLA_F_NESTED, elem))
        kind, reply = self._request(NFT_MSG_GETSETELEM, NFPROTO_INET, body)
        if kind == -errno.ENOENT:
            return None
        if kind != NFT | NFT_MSG_NEWSETELEM:
            raise OSError(-kind, os.strerror(-kind)) if kind < 0 else RuntimeError(kind)
        elem_attrs = _attrs(_attrs(_attrs(reply)[3])[1])  # LIST_ELEMENTS > LIST_ELEM
        data = _attrs(_attrs(elem_attrs.get(2, b"")).get(2, b""))  # DATA > DATA_VERDICT
        if not data:
            return ""
        code = struct.unpack(">i", data[1])[0]
        chain = data.get(2, b"").rstrip(b"\0").decode()
        return {-3: f"jump {chain}", -4: f"goto {chain}", 1: "accept", 0: "drop",
                -5: "return"}.get(code, str(code))


def ip_key(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


# --- datapath ---------------------------------------------------------------------------------

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""

CLIENT = """
import socket, sys, time
address, port, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
done = failed = 0
start = time.monotonic()
while done < count and time.monotonic() - start < limit:
    c = socket.socket()
    c.settimeout(2)
    try:
        c.connect((address, port))
        done += 1
    except OSError:
        failed += 1
        if failed > 20:
            break
    finally:
        c.close()
print(done, failed, time.monotonic() - start)
"""
"""New connections, one after another: connect (SYN, SYN-ACK, ACK: a new conntrack entry,
the policy's verdict), close. Python's per-connection cost is the same in both runs."""


def conn_rate(client: str, address: str, count: int, limit: float) -> float:
    """Connections per second of one bounded client run."""
    got = in_ns(client, "nice", "-n", "-10", sys.executable, "-c", CLIENT, address,
                str(CONN_PORT), str(count), str(limit), timeout=limit + 30)
    done, failed, took = got.stdout.split()
    if int(failed) > 20 or int(done) == 0:
        raise RuntimeError(f"connection loop failed: {done} made, {failed} failed")
    return int(done) / float(took)


def reachable(client: str, address: str, port: int, timeout: float = 1.0) -> bool:
    probe = ("import socket, sys\n"
             "try:\n"
             f"    socket.create_connection(('{address}', {port}), timeout={timeout}).close()\n"
             "except OSError:\n    sys.exit(1)\n")
    return in_ns(client, sys.executable, "-c", probe, check=False,
                 timeout=timeout + 20).returncode == 0


@contextlib.contextmanager
def listener(ns: str, port: int) -> Iterator[None]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"listener on {port} did not start")
        yield
    finally:
        proc.kill()
        proc.wait(10)


def datapath(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    pool = NamespacePool(f"pbd{os.getpid()}")
    tb = None
    try:
        workdir = Path(tempfile.mkdtemp(prefix="policy-bench-"))
        tb, nodes, pods = two_nodes(pool, workdir, "vxlan")
        for p in pods:  # the loop's connections must not run out of local ports
            in_ns(p, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000")
            in_ns(p, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
        client_ip, server_ip = tb.pod_ips[pods[0]], tb.pod_ips[pods[1]]
        cluster = policy_gen.with_pair(
            policy_gen.generate(args.pods, args.namespaces, args.policies,
                                nodes=[n.name for n in nodes]),
            (client_ip, nodes[0].name), (server_ip, nodes[1].name), SERVER_PORTS)
        started = time.monotonic()
        scripts = {n.ns: render_table(cluster, n.name) for n in nodes}
        log(f"datapath: tables rendered for {len(nodes)} nodes in "
            f"{time.monotonic() - started:.1f} s ({sum(map(len, scripts.values())) >> 10} KiB)")

        def table(on: bool) -> float:
            took = 0.0
            for ns, script in scripts.items():
                in_ns(ns, "nft", "delete", "table", *TABLE, check=False)
                if on:
                    t = time.monotonic()
                    got = in_ns(ns, "nft", "-f", "-", input=script, timeout=600, check=False)
                    if got.returncode:
                        raise RuntimeError(f"nft -f of the table failed: {got.stderr[-2000:]}")
                    took += time.monotonic() - t
            return took

        result: dict[str, Any] = {"table_load_s": []}
        with listener(pods[1], CONN_PORT), listener(pods[1], DENIED_PORT):
            result["table_load_s"].append(table(True))
            if not reachable(pods[0], server_ip, CONN_PORT):
                raise RuntimeError("the policies allow client -> server:http, yet it fails")
            if reachable(pods[0], server_ip, DENIED_PORT):
                raise RuntimeError(f"port {DENIED_PORT} is allowed by no policy, yet reachable:"
                                   " the table does not enforce")
            table(False)
            if not reachable(pods[0], server_ip, DENIED_PORT):
                raise RuntimeError("without the table every port must be reachable")
            iperf(pods[0], pods[1], server_ip, 1.0)  # warm-up (neighbours, caches): discarded
            conn_rate(pods[0], server_ip, args.connections, 0.5)
            samples: dict[bool, dict[str, list[float]]] = {
                on: {"gbps": [], "cpu_s_per_gbit": [], "conn_per_s": []} for on in (True, False)}
            for i in range(args.rounds):
                for on in ((True, False) if i % 2 == 0 else (False, True)):
                    load = table(on)
                    if on:
                        result["table_load_s"].append(load)
                    s = iperf(pods[0], pods[1], server_ip, args.seconds)
                    rate = conn_rate(pods[0], server_ip, args.connections, args.conn_seconds)
                    samples[on]["gbps"].append(s.gbps)
                    samples[on]["cpu_s_per_gbit"].append(s.cpu_s_per_gbit)
                    samples[on]["conn_per_s"].append(rate)
                    log(f"  round {i + 1} {'table' if on else 'none '}: {s.gbps:6.2f} Gbit/s "
                        f"{rate:7.0f} conn/s")
            table(False)
        result["with"] = samples[True]
        result["without"] = samples[False]
        return result
    finally:
        if tb is not None:
            tb.close()
        pool.close()


def ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True) if y]


# --- main -------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke size: 300 pods, 12 namespaces, 40 policies, 2 short rounds")
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--policies", type=int, default=1_000)
    p.add_argument("--rounds", type=int, default=6, help="datapath rounds (A/B each)")
    p.add_argument("--seconds", type=float, default=3.0, help="iperf3 run length")
    p.add_argument("--conn-seconds", type=float, default=2.0,
                   help="length of a connection-rate run")
    p.add_argument("--connections", type=int, default=40_000,
                   help="at most this many connections per connection-rate run")
    p.add_argument("--skip-datapath", action="store_true")
    p.add_argument("--skip-sync", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.pods, args.namespaces, args.policies = 300, 12, 40
        args.rounds, args.seconds, args.conn_seconds = 2, 1.0, 0.5
    if os.geteuid() != 0:
        print("bench/policy_scale.py needs root (network namespaces)", file=sys.stderr)
        return 2
    out: dict[str, Any] = {}
    if not args.skip_datapath:
        dp = datapath(args, print)
        out["datapath"] = dp
    print(json.dumps(summary(args, out)))
    return 0


def summary(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"pods": args.pods, "policies": args.policies}
    dp = out.get("datapath")
    if dp:
        w, wo = dp["with"], dp["without"]
        result.update(
            throughput_ratio=round(statistics.median(ratios(w["gbps"], wo["gbps"])), 3),
            conn_rate_ratio=round(statistics.median(ratios(w["conn_per_s"],
                                                           wo["conn_per_s"])), 3),
            gbps_with=round(statistics.median(w["gbps"]), 2),
            gbps_without=round(statistics.median(wo["gbps"]), 2),
            conn_per_s_with=round(statistics.median(w["conn_per_s"])),
            conn_per_s_without=round(statistics.median(wo["conn_per_s"])),
            cpu_efficiency_ratio=round(statistics.median(
                ratios(wo["cpu_s_per_gbit"], w["cpu_s_per_gbit"])), 3),
            datapath_table_load_s=round(statistics.median(dp["table_load_s"]), 2),
        )
    return result


if __name__ == "__main__":
    sys.exit(main())
