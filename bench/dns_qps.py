"""svcnet dns against dnsmasq and unbound with dnsperf, on the same 10,000 names, in one run.

A throwaway etcd holds 10k ClusterIP Services (each with a 10-endpoint EndpointSlice, 100k
endpoints) and the 100k Pods behind them; ``svcnet dns --store etcd://...`` (default
``--pods insecure``, like CoreDNS's default Corefile, which is what its memory formula
(pods + services)/1000 + 54 MB describes) watches Services and EndpointSlices, and its
memory is measured at that scale; a second instance with ``--pods verified`` also watches the
100k Pods and its memory is reported too (``rss_verified_mb``).
dnsmasq (``--addn-hosts``) and unbound (``local-data``) serve the same 10k service names.
dnsperf sends A queries for those names from ``--clients`` clients for ``--seconds`` to each
server in turn (``-v`` gives every query's latency, from which p99 comes).

The servers run one after another in ``--rounds`` interleaved rounds (the machine is shared
and noisy) with identical dnsperf settings and the same query file; each figure is the mean
over the rounds, with the range, and the ratio is svcnet's mean over dnsmasq's mean from the
same rounds (per-round ratios are printed too). CPU time per answered query (all of a
server's processes, from /proc around each run) is reported as a steadier figure than QPS.

Memory: ``rss_mb`` is the proportional set size (PSS) summed over svcnet's main process and
workers. The workers map one shared answer table and share the interpreter's pages with the
main process; plain RSS would count those pages once per process, PSS divides each shared
page among the processes that map it, so the sum is what the node actually spends.
``rss_sum_mb`` (plain RSS summed) is reported alongside.

Prints a table; the last line is JSON with ``svcnet_qps``, ``dnsmasq_qps``, ``unbound_qps``,
``ratio`` (svcnet / dnsmasq), ``svcnet_p99_ms``, ``lost`` (svcnet's, all rounds), ``rss_mb``
and ``rss_limit_mb``; then (``--mixes``; ``--mixes-only`` runs just these) the query
mixes of bench/dns_mixes.py against the real CoreDNS and dnsmasq on a real kube-apiserver:
``mixes``, ``min_ratio_coredns``, ``min_ratio_dnsmasq`` and its memory figures.
``--small``: 500 services, 5000 pods, one round, for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svcnet.model import ENDPOINT_SLICE, POD, SERVICE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_tcp_port() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def service_ip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def service_name(i: int) -> str:
    return f"svc-{i}.ns-{i % 100}.svc.cluster.local"


def make_service(i: int) -> dict[str, Any]:
    return {"metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % 100}"},
            "spec": {"clusterIP": service_ip(i),
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def pod_ip(j: int) -> str:
    return f"10.{128 + j // 62500}.{j // 250 % 250}.{j % 250 + 1}"


def make_slice(i: int, per: int) -> dict[str, Any]:
    return {"metadata": {"name": f"svc-{i}-a", "namespace": f"ns-{i % 100}",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [pod_ip(i * per + k)], "conditions": {"ready": True},
                           "nodeName": f"node-{k}",
                           "targetRef": {"kind": "Pod", "namespace": f"ns-{i % 100}",
                                         "name": f"svc-{i}-{k}"}} for k in range(per)],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def make_pod(j: int, per: int) -> dict[str, Any]:
    i = j // per
    return {"metadata": {"name": f"svc-{i}-{j % per}", "namespace": f"ns-{i % 100}",
                         "labels": {"app": f"svc-{i}"}},
            "spec": {"nodeName": f"node-{j % per}"},
            "status": {"phase": "Running", "podIP": pod_ip(j), "podIPs": [{"ip": pod_ip(j)}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


@contextmanager
def etcd_server(workdir: Path) -> Iterator[str]:
    client, peer = free_port(), free_port()
    proc = subprocess.Popen(
        ["etcd", "--data-dir", str(workdir / "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}",
         "--quota-backend-bytes", str(4 << 30)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "amd64"})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"127.0.0.1:{client}"
    finally:
        proc.kill()
        proc.wait(10)


async def load(endpoint: str, services: int, pods: int) -> None:
    """Put everything with 64 writers; retry a put whose outcome a busy etcd left unknown."""
    from svcnet.store.base import Unavailable
    from svcnet.store.etcd import EtcdStore

    store = EtcdStore([endpoint])
    per = max(1, pods // services)
    objects: list[tuple[Any, Any]] = (
        [(SERVICE, lambda i=i: make_service(i)) for i in range(services)]
        + [(ENDPOINT_SLICE, lambda i=i: make_slice(i, per)) for i in range(services)]
        + [(POD, lambda j=j: make_pod(j, per)) for j in range(pods)])
    it = iter(objects)

    async def writer() -> None:
        for kind, build in it:
            obj = build()
            for attempt in range(20):
                try:
                    await store.put(kind, obj)
                    break
                except Unavailable:
                    await asyncio.sleep(0.2 * (attempt + 1))
            else:
                raise RuntimeError("etcd kept failing")

    try:
        await asyncio.gather(*(writer() for _ in range(64)))
    finally:
        await store.close()


@contextmanager
def process(cmd: list[str], **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_udp(port: int, name: str, timeout: float = 120) -> None:
    """Until the server answers ``name`` with NOERROR."""
    import dns.message
    import dns.query
    import dns.rcode

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port,
                                timeout=0.5)
            if msg.rcode() == dns.rcode.NOERROR and msg.answer:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} never answered {name}")


@dataclass
class PerfResult:
    qps: float
    avg_ms: float
    p99_ms: float
    lost: int
    sent: int
    cpu_us: float = 0.0  # the server's CPU time per answered query


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def dnsperf(port: int, queries: Path, seconds: float, clients: int, outstanding: int
            ) -> PerfResult:
    out = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-c", str(clients),
         "-T", str(min(clients, 2)), "-l", str(seconds), "-q", str(outstanding), "-t", "2",
         "-v"], capture_output=True, text=True, timeout=seconds + 60).stdout
    lat = sorted(float(m.group(1)) for m in re.finditer(r"^> \S+ .* ([0-9.]+)$", out, re.M))
    qps = float(re.search(r"Queries per second:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    avg = float(re.search(r"Average Latency \(s\):\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else float("nan")
    return PerfResult(qps, avg * 1000, p99, lost, sent)


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    i = 0
    while i < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        except OSError:
            pass
        i += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants."""
    ticks = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_by_process(pid: int) -> list[tuple[int, float, float]]:
    """(pid, PSS, RSS) in MB of a process and each of its descendants."""
    out = []
    for p in process_tree(pid):
        pss = rss = 0
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except OSError:
            continue
        out.append((p, pss / 1024, rss / 1024))
    return out


def pss_mb(pid: int) -> tuple[float, float]:
    """(PSS, RSS) in MB of a process and all its descendants, summed."""
    procs = memory_by_process(pid)
    return sum(p[1] for p in procs), sum(p[2] for p in procs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--pods", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--outstanding", type=int, default=100)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved runs to average")
    ap.add_argument("--mixes", action="store_true",
                    help="also the query mixes beside CoreDNS and dnsmasq (bench/dns_mixes.py)")
    ap.add_argument("--mixes-only", action="store_true", help="only the query mixes")
    ap.add_argument("--small", action="store_true", help="500 services, 5000 pods, 1 round")
    args = ap.parse_args()
    if args.small:
        args.services, args.pods, args.seconds, args.rounds = 500, 5000, 4, 1
    if args.mixes_only:
        print(json.dumps(run_mixes(args)))
        return 0
    for tool in ("etcd", "dnsperf", "dnsmasq", "unbound"):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="svcnet-dnsbench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        names = [service_name(i) for i in range(args.services)]
        queries = work / "queries"
        queries.write_text("".join(f"{n} A\n" for n in names))
        hosts = work / "hosts"
        hosts.write_text("".join(f"{service_ip(i)} {n}\n" for i, n in enumerate(names)))
        endpoint = stack.enter_context(etcd_server(work))
        t0 = time.monotonic()
        asyncio.run(load(endpoint, args.services, args.pods))
        print(f"loaded {args.services} services + slices and {args.pods} pods into etcd "
              f"in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        ports: dict[str, int] = {}
        ports["svcnet"] = free_udp_tcp_port()
        t0 = time.monotonic()
        svcnet = stack.enter_context(process(
            [sys.executable, "-m", "svcnet.cli", "dns", "--store", f"etcd://{endpoint}",
             "--listen", f"127.0.0.1:{ports['svcnet']}", "--workers", str(args.workers),
             "--upstream", "127.0.0.1:9"], cwd="/"))
        wait_udp(ports["svcnet"], names[-1])
        print(f"svcnet dns answering after {time.monotonic() - t0:.1f}s", file=sys.stderr)
        ports["dnsmasq"] = free_udp_tcp_port()
        dnsmasq = stack.enter_context(process(
            ["dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts",
             f"--addn-hosts={hosts}", "-p", str(ports["dnsmasq"]),
             "--listen-address=127.0.0.1", "--bind-interfaces", "--cache-size=10000",
             "--user=root", "--local-ttl=5"], stderr=subprocess.DEVNULL))
        ports["unbound"] = free_udp_tcp_port()
        conf = work / "unbound.conf"
        conf.write_text(
            f"server:\n  interface: 127.0.0.1\n  port: {ports['unbound']}\n"
            f"  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  directory: \"{work}\"\n"
            f"  pidfile: \"\"\n  use-syslog: no\n  num-threads: {args.workers}\n"
            "  so-reuseport: yes\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n"
            "  local-zone: \"cluster.local.\" static\n"
            + "".join(f'  local-data: "{n}. 5 IN A {service_ip(i)}"\n'
                      for i, n in enumerate(names)))
        unbound = stack.enter_context(process(["unbound", "-d", "-c", str(conf)],
                                              stderr=subprocess.DEVNULL))
        wait_udp(ports["dnsmasq"], names[-1])
        wait_udp(ports["unbound"], names[-1])
        time.sleep(1)
        mem = pss_mb(svcnet.pid)
        pids = {"svcnet": svcnet.pid, "dnsmasq": dnsmasq.pid, "unbound": unbound.pid}
        runs: dict[str, list[PerfResult]] = {name: [] for name in ports}
        for _ in range(args.rounds):  # interleaved: the machine is shared and noisy
            for name, port in ports.items():
                before = cpu_seconds(pids[name])
                r = dnsperf(port, queries, args.seconds, args.clients, args.outstanding)
                r.cpu_us = (cpu_seconds(pids[name]) - before) / max(1.0, r.qps * args.seconds) \
                    * 1e6
                runs[name].append(r)
        mem_after = pss_mb(svcnet.pid)
        per_process = memory_by_process(svcnet.pid)
        mem = (max(mem[0], mem_after[0]), max(mem[1], mem_after[1]))
        verified_port = free_udp_tcp_port()
        with process([sys.executable, "-m", "svcnet.cli", "dns", "--store",
                      f"etcd://{endpoint}", "--listen", f"127.0.0.1:{verified_port}",
                      "--workers", str(args.workers), "--pods", "verified", "--upstream",
                      "127.0.0.1:9"], cwd="/") as verified:
            wait_udp(verified_port, names[-1])
            time.sleep(1)
            mem_verified = pss_mb(verified.pid)
    print(f"mean [min-max] of {args.rounds} interleaved {args.seconds:.0f}-second dnsperf runs, "
          f"{args.clients} clients, {args.outstanding} outstanding, {args.workers} svcnet "
          f"workers, {args.workers} unbound threads, dnsmasq single-threaded")
    print(f"{'server':8} {'QPS':>22} {'CPU us/query':>18} {'avg ms':>7} {'p99 ms':>7} {'lost':>6}")
    for name, rs in runs.items():
        q = [r.qps for r in rs]
        c = [r.cpu_us for r in rs]
        print(f"{name:8} {mean(q):8.0f} [{min(q):5.0f}-{max(q):5.0f}] {mean(c):6.1f} "
              f"[{min(c):4.1f}-{max(c):4.1f}] {mean([r.avg_ms for r in rs]):7.2f} "
              f"{mean([r.p99_ms for r in rs]):7.2f} {sum(r.lost for r in rs):6d}")
    per_round = [s.qps / d.qps for s, d in zip(runs["svcnet"], runs["dnsmasq"], strict=True)]
    print("svcnet/dnsmasq QPS per round: " + " ".join(f"{r:.2f}" for r in per_round))
    limit = (args.pods + args.services) / 1000 + 54
    print(f"svcnet memory at {args.services} services + {args.pods} pods (as endpoints): "
          f"PSS summed {mem[0]:.1f} MB (RSS summed {mem[1]:.1f} MB); with --pods verified "
          f"(watching the pods too) PSS {mem_verified[0]:.1f} MB; CoreDNS formula {limit:.0f} MB")
    print("svcnet processes (PSS / RSS MB): " + ", ".join(
        f"{'main' if i == 0 else 'worker'} {pss:.1f} / {rss:.1f}"
        for i, (_, pss, rss) in enumerate(per_process)))
    s, d = runs["svcnet"], runs["dnsmasq"]
    result = {
        "svcnet_qps": round(mean([r.qps for r in s])),
        "dnsmasq_qps": round(mean([r.qps for r in d])),
        "unbound_qps": round(mean([r.qps for r in runs["unbound"]])),
        "ratio": round(mean([r.qps for r in s]) / mean([r.qps for r in d]), 3),
        "ratio_min": round(min(per_round), 3), "ratio_max": round(max(per_round), 3),
        "svcnet_cpu_us": round(mean([r.cpu_us for r in s]), 2),
        "dnsmasq_cpu_us": round(mean([r.cpu_us for r in d]), 2),
        "svcnet_p99_ms": round(mean([r.p99_ms for r in s]), 3),
        "svcnet_avg_ms": round(mean([r.avg_ms for r in s]), 3),
        "lost": sum(r.lost for r in s),
        "rss_mb": round(mem[0], 1), "rss_sum_mb": round(mem[1], 1),
        "rss_verified_mb": round(mem_verified[0], 1),
        "rss_limit_mb": round(limit, 1)}
    if args.mixes:
        result.update(run_mixes(args))
    print(json.dumps(result))
    return 0


def run_mixes(args: argparse.Namespace) -> dict[str, Any]:
    """bench/dns_mixes.py on a real control plane, with this run's sizes and settings."""
    import dns_mixes

    return dns_mixes.run(services=args.services, per=max(1, args.pods // args.services),
                         headless=50 if args.small else 200, seconds=args.seconds,
                         rounds=min(args.rounds, 2), workers=args.workers,
                         clients=args.clients, outstanding=args.outstanding)


if __name__ == "__main__":
    sys.exit(main())
