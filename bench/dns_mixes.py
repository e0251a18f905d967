"""Query mixes: svcnet dns against the real CoreDNS 1.11.3 and dnsmasq, in one run.

A real control plane (svcnet.lab.controlplane: etcd, kube-apiserver, controller-manager,
scheduler on loopback) holds ``--services`` ClusterIP Services in 100 namespaces, each with an
EndpointSlice of ``--per`` endpoints (10k x 10 = 100k endpoints: the pods CoreDNS's memory
formula counts), and ``--headless`` headless Services with 5 named endpoints each. Both
``svcnet dns --store kubernetes`` and CoreDNS (kubeadm Corefile with ``cache 30``, all cores)
watch that apiserver; dnsmasq serves the same positive records from a hosts file and
``srv-host`` lines, with ``local=/cluster.local/`` so every other name in the zone is
NXDOMAIN, as in the cluster servers.

Mixes (one dnsperf query file each, same file for every server):
- ``services``: A of service names;
- ``pods``: A of ``a-b-c-d.<ns>.pod.cluster.local`` for endpoint IPs;
- ``srv``: ``_http._tcp.<headless>`` SRV (5 targets + their A glue);
- ``negative``: NXDOMAIN (unknown services, search-path misses) and NODATA (AAAA of services);
- ``mixed``: what pods' stub resolvers send (ndots:5, search ``<ns>.svc.cluster.local
  svc.cluster.local cluster.local``, A and AAAA for every try): a name written as
  ``svc.ns.svc.cluster.local`` without the final dot (4 dots < 5) is searched first, 6 NXDOMAIN
  then A + AAAA NODATA; ``svc.ns`` 2 NXDOMAIN then A + NODATA; ``svc`` from its own namespace
  A + NODATA at once; plus a few pod and SRV queries. Mostly search-path misses, then
  service names. Names outside the zone are left out (no upstream would be measured fairly).

Each server first gets one pass over each file (caches warm: the steady state, not first
sight), then every server runs every mix in ``--rounds`` interleaved rounds (the machine is
shared and noisy); figures are means. Memory is measured after the servers have listed everything:
svcnet's PSS summed over its processes (RSS summed beside it) against CoreDNS's RSS and its
formula (pods + services)/1000 + 54 MB.

Run standalone (table, last line JSON) or from bench/dns_qps.py (which merges the JSON keys
``mixes``, ``min_ratio_coredns``, ``min_ratio_dnsmasq`` and the memory figures into its own).
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import random
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dns_qps import (
    PerfResult,
    cpu_seconds,
    dnsperf,
    mean,
    memory_by_process,
    pss_mb,
    wait_udp,
)
from dns_qps import process as child

ZONE = "cluster.local"
NAMESPACES = 100
HOSTS_PER_HEADLESS = 5
MIXES = ("services", "pods", "srv", "negative", "mixed")


@dataclass(frozen=True)
class Shape:
    services: int
    per: int
    headless: int

    def ns(self, i: int) -> str:
        return f"ns-{i % NAMESPACES}"

    def svc_ip(self, i: int) -> str:
        return f"10.100.{i // 250}.{i % 250 + 1}"

    def svc_name(self, i: int) -> str:
        return f"svc-{i}.{self.ns(i)}.svc.{ZONE}"

    def ep_ip(self, i: int, k: int) -> str:
        j = i * self.per + k
        return f"10.{128 + j // 62500}.{j // 250 % 250}.{j % 250 + 1}"

    def hl_ip(self, h: int, k: int) -> str:
        j = h * HOSTS_PER_HEADLESS + k
        return f"10.120.{j // 250}.{j % 250 + 1}"

    def hl_name(self, h: int) -> str:
        return f"hl-{h}.{self.ns(h)}.svc.{ZONE}"

    def pod_name(self, i: int, k: int) -> str:
        return f"{self.ep_ip(i, k).replace('.', '-')}.{self.ns(i)}.pod.{ZONE}"


# --- objects -------------------------------------------------------------------------------------


def _slice(ns: str, name: str, service: str, endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "svcnet-bench"}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def objects(shape: Shape) -> Iterator[tuple[str, dict[str, Any]]]:
    """(collection path, object) for every Service and EndpointSlice."""
    for i in range(shape.services):
        ns = shape.ns(i)
        yield f"/api/v1/namespaces/{ns}/services", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "namespace": ns},
            "spec": {"clusterIP": shape.svc_ip(i),
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
        yield f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", _slice(
            ns, f"svc-{i}-a", f"svc-{i}",
            [{"addresses": [shape.ep_ip(i, k)], "conditions": {"ready": True},
              "targetRef": {"kind": "Pod", "namespace": ns, "name": f"svc-{i}-{k}"}}
             for k in range(shape.per)])
    for h in range(shape.headless):
        ns = shape.ns(h)
        yield f"/api/v1/namespaces/{ns}/services", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"hl-{h}", "namespace": ns},
            "spec": {"clusterIP": "None",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
        yield f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", _slice(
            ns, f"hl-{h}-a", f"hl-{h}",
            [{"addresses": [shape.hl_ip(h, k)], "conditions": {"ready": True},
              "hostname": f"host-{k}"} for k in range(HOSTS_PER_HEADLESS)])


def load(cp: Any, shape: Shape, writers: int = 16) -> None:
    """POST everything with ``writers`` keep-alive connections (kubectl would take far longer);
    409 (left from an earlier try) counts as done."""
    ctx = ssl.create_default_context(cafile=str(cp.layout.ca_crt))
    host, port = cp.layout.host, cp.layout.apiserver_port
    headers = {"Authorization": f"Bearer {cp.layout.admin_token}",
               "Content-Type": "application/json"}
    for n in range(NAMESPACES):
        cp.kubectl("create", "namespace", f"ns-{n}", check=False)
    it = iter(objects(shape))
    lock = threading.Lock()
    errors: list[str] = []

    def writer() -> None:
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
        while not errors:
            with lock:
                item = next(it, None)
            if item is None:
                return
            path, obj = item
            for attempt in range(10):
                try:
                    conn.request("POST", path, json.dumps(obj), headers)
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
                    time.sleep(0.2 * (attempt + 1))
                    continue
                if resp.status in (200, 201, 409):
                    break
                if resp.status in (429, 500, 503, 504):
                    time.sleep(0.2 * (attempt + 1))
                    continue
                errors.append(f"POST {path}: {resp.status} {body[:300]!r}")
                return
            else:
                errors.append(f"POST {path} kept failing")

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])


# --- query files ---------------------------------------------------------------------------------


def query_files(shape: Shape, work: Path, n: int = 10_000) -> dict[str, Path]:
    rnd = random.Random(13)
    svc = [rnd.randrange(shape.services) for _ in range(n)]
    lines: dict[str, list[str]] = {
        "services": [f"{shape.svc_name(i)} A" for i in svc],
        "pods": [f"{shape.pod_name(i, rnd.randrange(shape.per))} A" for i in svc],
        "srv": [f"_http._tcp.{shape.hl_name(rnd.randrange(shape.headless))} SRV"
                for _ in range(n)],
        "negative": [],
        "mixed": [],
    }
    for i in svc:
        other = f"ns-{rnd.randrange(NAMESPACES)}"
        lines["negative"] += rnd.choice((
            [f"nosuch-{i}.{shape.ns(i)}.svc.{ZONE} A"],
            [f"{shape.svc_name(i)}.{other}.svc.{ZONE} A"],
            [f"svc-{i}.{shape.ns(i)}.{other}.svc.{ZONE} AAAA"],
            [f"{shape.svc_name(i)} AAAA"]))
    for i in svc:
        home = f"ns-{rnd.randrange(NAMESPACES)}"  # the asking pod's namespace
        written = rnd.random()
        if written < 0.5:  # svc-i.ns-x.svc.cluster.local without the final dot
            tries = [f"{shape.svc_name(i)}.{s}" for s in (f"{home}.svc.{ZONE}", f"svc.{ZONE}",
                                                           ZONE)] + [shape.svc_name(i)]
        elif written < 0.9:  # svc-i.ns-x
            tries = [f"svc-{i}.{shape.ns(i)}.{home}.svc.{ZONE}", shape.svc_name(i)]
        else:  # svc-i from its own namespace
            tries = [shape.svc_name(i)]
        for name in tries:
            lines["mixed"] += [f"{name} A", f"{name} AAAA"]
        if rnd.random() < 0.05:
            lines["mixed"].append(f"{shape.pod_name(i, 0)} A")
        if rnd.random() < 0.05:
            lines["mixed"].append(f"_http._tcp.{shape.hl_name(i % shape.headless)} SRV")
    out = {}
    for mix, text in lines.items():
        out[mix] = work / f"queries-{mix}"
        out[mix].write_text("\n".join(text) + "\n")
    return out


def dnsmasq_conf(shape: Shape, work: Path, port: int) -> Path:
    """The positive records of the mixes as hosts + srv-host; ``local=`` makes the rest of the
    zone NXDOMAIN (and AAAA of an IPv4-only name NODATA), as the cluster servers answer."""
    hosts = work / "hosts"
    with hosts.open("w") as f:
        for i in range(shape.services):
            f.write(f"{shape.svc_ip(i)} {shape.svc_name(i)}\n")
            for k in range(shape.per):
                f.write(f"{shape.ep_ip(i, k)} {shape.pod_name(i, k)}\n")
        for h in range(shape.headless):
            addrs = [shape.hl_ip(h, k) for k in range(HOSTS_PER_HEADLESS)]
            for k, a in enumerate(addrs):
                f.write(f"{a} host-{k}.{shape.hl_name(h)} {shape.hl_name(h)}\n")
    conf = work / "dnsmasq.conf"
    with conf.open("w") as f:
        f.write(f"port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\n"
                f"no-hosts\naddn-hosts={hosts}\nlocal=/{ZONE}/\ncache-size=10000\n"
                "local-ttl=30\nuser=root\n")
        for h in range(shape.headless):
            for k in range(HOSTS_PER_HEADLESS):
                f.write(f"srv-host=_http._tcp.{shape.hl_name(h)},host-{k}.{shape.hl_name(h)},"
                        "8080,0,20\n")
    return conf


# --- the run -------------------------------------------------------------------------------------


def _ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def run(*, services: int, per: int, headless: int, seconds: float, rounds: int, workers: int,
        clients: int = 4, outstanding: int = 100, log: Any = sys.stderr) -> dict[str, Any]:
    """Everything above; returns the JSON keys (and prints the table to stdout)."""
    from svcnet.lab.controlplane import ControlPlane
    from svcnet.lab.coredns import Config, CoreDNS, free_udp_tcp_port

    shape = Shape(services, per, headless)
    for tool in ("dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"needs {tool}")
    with tempfile.TemporaryDirectory(prefix="svcnet-dnsmix-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        t0 = time.monotonic()
        cp = ControlPlane.on_loopback(work / "k8s")
        cp.start()
        stack.callback(cp.stop)
        print(f"control plane up in {time.monotonic() - t0:.0f}s", file=log)
        t0 = time.monotonic()
        load(cp, shape)
        print(f"loaded {services} services x {per} endpoints + {headless} headless into the "
              f"apiserver in {time.monotonic() - t0:.0f}s", file=log)
        files = query_files(shape, work)
        last = shape.hl_name(headless - 1)
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        t0 = time.monotonic()
        core = CoreDNS(Config.on_loopback(cp.admin_kubeconfig, "127.0.0.1:9", cache=30),
                       work / "coredns")
        core.start(timeout=300)
        stack.callback(core.stop)
        ports["coredns"], pids["coredns"] = core.port, core.pid
        wait_udp(core.port, last, timeout=300)
        print(f"coredns answering after {time.monotonic() - t0:.0f}s", file=log)
        t0 = time.monotonic()
        ports["svcnet"] = free_udp_tcp_port()
        svcnet = stack.enter_context(child(
            [sys.executable, "-m", "svcnet.cli", "dns", "--store", "kubernetes",
             "--kubeconfig", str(cp.admin_kubeconfig), "--listen",
             f"127.0.0.1:{ports['svcnet']}", "--workers", str(workers), "--ttl", "30",
             "--upstream", "127.0.0.1:9"], cwd="/"))
        pids["svcnet"] = svcnet.pid
        wait_udp(ports["svcnet"], last, timeout=300)
        print(f"svcnet dns answering after {time.monotonic() - t0:.0f}s", file=log)
        ports["dnsmasq"] = free_udp_tcp_port()
        dnsmasq = stack.enter_context(child(
            ["dnsmasq", "-k", "-C", str(dnsmasq_conf(shape, work, ports["dnsmasq"]))],
            stderr=subprocess.DEVNULL))
        pids["dnsmasq"] = dnsmasq.pid
        wait_udp(ports["dnsmasq"], last)
        time.sleep(1)
        mem_svcnet = pss_mb(svcnet.pid)
        mem_core = core.rss_bytes() / 2**20
        for mix in MIXES:  # one pass over each file first: steady state, not first sight
            for port in ports.values():
                subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d",
                                str(files[mix]), "-n", "1", "-c", str(clients), "-q",
                                str(outstanding), "-t", "2"], capture_output=True,
                               timeout=300, check=False)
        results: dict[str, dict[str, list[PerfResult]]] = {
            m: {s: [] for s in ports} for m in MIXES}
        for _ in range(rounds):
            for mix in MIXES:
                for server, port in ports.items():
                    before = cpu_seconds(pids[server])
                    r = dnsperf(port, files[mix], seconds, clients, outstanding)
                    r.cpu_us = (cpu_seconds(pids[server]) - before) / max(
                        1.0, r.qps * seconds) * 1e6
                    results[mix][server].append(r)
        mem_svcnet = tuple(max(a, b) for a, b in zip(mem_svcnet, pss_mb(svcnet.pid),
                                                     strict=True))
        per_process = memory_by_process(svcnet.pid)
        mem_core = max(mem_core, core.rss_bytes() / 2**20)
    rows = []
    for mix in MIXES:
        r = results[mix]
        rows.append({
            "mix": mix,
            "svcnet_qps": round(mean([x.qps for x in r["svcnet"]])),
            "coredns_qps": round(mean([x.qps for x in r["coredns"]])),
            "dnsmasq_qps": round(mean([x.qps for x in r["dnsmasq"]])),
            "svcnet_p99_ms": round(mean([x.p99_ms for x in r["svcnet"]]), 2),
            "coredns_p99_ms": round(mean([x.p99_ms for x in r["coredns"]]), 2),
            "dnsmasq_p99_ms": round(mean([x.p99_ms for x in r["dnsmasq"]]), 2),
            "svcnet_cpu_us": round(mean([x.cpu_us for x in r["svcnet"]]), 2),
            "coredns_cpu_us": round(mean([x.cpu_us for x in r["coredns"]]), 2),
            "lost": sum(x.lost for x in r["svcnet"]),
            "coredns_lost": sum(x.lost for x in r["coredns"]),
        })
    print(f"mixes: {rounds} interleaved round(s) of {seconds:.0f}-second dnsperf runs, "
          f"{clients} clients, {outstanding} outstanding; svcnet {workers} workers, CoreDNS "
          f"GOMAXPROCS={os.cpu_count()}, dnsmasq single-threaded; {services} services x {per} "
          f"endpoints + {headless} headless")
    print(f"{'mix':9} {'svcnet':>8} {'CoreDNS':>8} {'dnsmasq':>8} {'x CoreDNS':>9} "
          f"{'x dnsmasq':>9} {'p99 svcnet':>10} {'p99 CoreDNS':>11} {'CPU us/q':>13} "
          f"{'lost':>5}")
    for row in rows:
        print(f"{row['mix']:9} {row['svcnet_qps']:8d} {row['coredns_qps']:8d} "
              f"{row['dnsmasq_qps']:8d} {row['svcnet_qps'] / max(row['coredns_qps'], 1):9.2f} "
              f"{row['svcnet_qps'] / max(row['dnsmasq_qps'], 1):9.2f} "
              f"{row['svcnet_p99_ms']:10.2f} {row['coredns_p99_ms']:11.2f} "
              f"{row['svcnet_cpu_us']:6.1f}/{row['coredns_cpu_us']:<6.1f} {row['lost']:5d}")
    formula = (services * per + headless * HOSTS_PER_HEADLESS + services + headless) / 1000 + 54
    print(f"memory at {services + headless} services + "
          f"{services * per + headless * HOSTS_PER_HEADLESS} endpoints: svcnet PSS summed "
          f"{mem_svcnet[0]:.1f} MB (RSS summed {mem_svcnet[1]:.1f}; "
          + ", ".join(f"{'main' if i == 0 else 'worker'} {p:.1f}/{r:.1f}"
                      for i, (_, p, r) in enumerate(per_process))
          + f"), CoreDNS RSS {mem_core:.1f} MB, CoreDNS formula {formula:.0f} MB")
    return {
        "mixes": rows,
        "min_ratio_coredns": round(min(r["svcnet_qps"] / max(r["coredns_qps"], 1)
                                       for r in rows), 3),
        "min_ratio_dnsmasq": round(min(r["svcnet_qps"] / max(r["dnsmasq_qps"], 1)
                                       for r in rows), 3),
        "mix_svcnet_pss_mb": round(mem_svcnet[0], 1),
        "mix_svcnet_rss_sum_mb": round(mem_svcnet[1], 1),
        "mix_coredns_rss_mb": round(mem_core, 1),
        "mix_coredns_formula_mb": round(formula, 1),
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--small", action="store_true",
                    help="500 services x 10 endpoints, 50 headless, 1 round of 4 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--per", type=int, default=10, help="endpoints per service")
    ap.add_argument("--headless", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    if args.small:
        args.services, args.headless, args.seconds, args.rounds = 500, 50, 4, 1
    out = run(services=args.services, per=args.per, headless=args.headless,
              seconds=args.seconds, rounds=args.rounds, workers=args.workers)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
