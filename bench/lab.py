"""How long ``svcnet lab up`` / ``down`` take, what the control plane and a node daemon cost,
and how fast a scale-up reaches every node, for both control planes.

``up`` is timed until every node registered and the DNS pods are Ready (what ``svcnet lab up``
waits for). Control-plane RSS: etcd + the lab's EndpointSlice controller (``etcd``), or etcd +
kube-apiserver + kube-controller-manager + kube-scheduler (``kubernetes``), a few seconds after
``up``. ``scale_converge_s``: a 3-replica Deployment with a headless Service is scaled to 6; the
time from the scale command until every node's ruleset holds every new pod IP and the headless
name answers all six addresses from a client pod.
Usage (root): .venv/bin/python bench/lab.py [--sizes 3,20] [--control-planes etcd,kubernetes]
The last line is JSON: per control plane and size, up_s, down_s, control_plane_rss_mb,
node_rss_mb, scale_converge_s (3 nodes only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from svcnet.lab.cluster import down, lab_command, up
from svcnet.lab.demo import pod_exec
from svcnet.lab.netns import RealKernel
from svcnet.lab.procs import Procs
from svcnet.lab.state import LabConfig

CONTROL_PLANE_PROCS = {
    "etcd": ("etcd-e1", "controller"),
    "kubernetes": ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"),
}
SCALE_MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: svcnet/echo, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-hl}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec: {nodeName: n1, containers: [{name: c, image: svcnet/echo}]}
"""


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def web_pod_ips(cfg: LabConfig) -> set[str]:
    proc = subprocess.run(
        ["nsenter", f"--net=/var/run/netns/{cfg.control_ns}", *cfg.svcnet_argv, "get", "pods",
         "-n", "default", "-o", "json", *cfg.store_args()],
        capture_output=True, text=True, timeout=30, check=False)
    ips = set()
    for line in proc.stdout.splitlines():
        pod = json.loads(line)
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in pod.get("status", {}).get("conditions", ()))
        if pod["metadata"]["name"].startswith("web-") and ready and pod["status"].get("podIP"):
            ips.add(pod["status"]["podIP"])
    return ips


def in_every_ruleset(cfg: LabConfig, ips: set[str]) -> bool:
    for node in cfg.node_names:
        rules = subprocess.run(["ip", "netns", "exec", cfg.node_ns(node), "nft", "list",
                                "ruleset"], capture_output=True, text=True, timeout=30,
                               check=False).stdout
        if not all(f"{ip}:8080" in rules or f"{ip} " in rules for ip in ips):
            return False
    return True


def scale_converge(cfg: LabConfig, replicas: int = 6, timeout: float = 120.0) -> float | None:
    manifest = cfg.dir / "bench-scale.yaml"
    manifest.write_text(SCALE_MANIFEST)
    lab_command(cfg, "apply", "-f", str(manifest), "--lab-dir", cfg.lab_dir)
    lab_command(cfg, "wait-ready", "--pods", "--timeout", "90", "--lab-dir", cfg.lab_dir,
                timeout=120)
    before = web_pod_ips(cfg)
    start = time.monotonic()
    lab_command(cfg, "scale", "deploy", "web", "--replicas", str(replicas), "--lab-dir",
                cfg.lab_dir)
    deadline = start + timeout
    ips: set[str] = set()
    while time.monotonic() < deadline:
        if len(ips) < replicas:
            ips = web_pod_ips(cfg)
        if len(ips) == replicas and ips > before and in_every_ruleset(cfg, ips):
            answer = pod_exec(cfg, "client", cfg.python, "-m", "svcnet.lab.echo", "resolve",
                              "web-hl").stdout.split()
            if set(answer) == ips:
                return time.monotonic() - start
        time.sleep(0.05)
    return None


def measure(control_plane: str, nodes: int, root: Path, settle: float, scale: bool
            ) -> dict[str, Any]:
    name = f"b{os.getpid() % 1000}{control_plane[0]}{nodes}"[:8]
    cfg = LabConfig(name=name, nodes=nodes, lab_dir=str(root / name), python=sys.executable,
                    cni="auto", overlay="auto", control_plane=control_plane)
    kernel = RealKernel()
    start = time.monotonic()
    cfg = up(cfg, kernel, lambda msg: print(f"  {msg}", file=sys.stderr))
    up_s = time.monotonic() - start
    converge: float | None = None
    try:
        time.sleep(settle)
        procs = Procs(cfg.dir)
        running = {r.name: r.pid for r in procs.all() if procs.running(r)}
        cp_rss = sum(rss_mb(running[n]) for n in CONTROL_PLANE_PROCS[control_plane]
                     if n in running)
        node_rss = [rss_mb(pid) for n, pid in running.items() if n.startswith("node-")]
        if scale:
            converge = scale_converge(cfg)
    finally:
        start = time.monotonic()
        down(cfg.dir, kernel, lambda msg: None)
        down_s = time.monotonic() - start
    return {"up_s": round(up_s, 2), "down_s": round(down_s, 2),
            "control_plane_rss_mb": round(cp_rss, 1),
            "node_rss_mb": round(sum(node_rss) / max(1, len(node_rss)), 1),
            "scale_converge_s": None if converge is None else round(converge, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,20")
    parser.add_argument("--control-planes", default="etcd,kubernetes")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds after up before reading RSS")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/lab.py needs root (network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    planes = args.control_planes.split(",")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="svcnet-lab-bench-") as tmp:
        for plane in planes:
            for n in sizes:
                print(f"{plane} lab with {n} nodes ...", file=sys.stderr)
                results[f"{plane}_{n}"] = measure(plane, n, Path(tmp), args.settle,
                                                  scale=n == min(sizes))
    print(f"{'control plane':>13}  {'nodes':>5}  {'up s':>6}  {'down s':>6}  "
          f"{'control plane RSS MB':>20}  {'node RSS MB':>11}  {'scale_converge_s':>16}")
    for key, r in results.items():
        plane, _, n = key.rpartition("_")
        conv = "-" if r["scale_converge_s"] is None else f"{r['scale_converge_s']:.2f}"
        print(f"{plane:>13}  {n:>5}  {r['up_s']:6.2f}  {r['down_s']:6.2f}  "
              f"{r['control_plane_rss_mb']:20.1f}  {r['node_rss_mb']:11.1f}  {conv:>16}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
