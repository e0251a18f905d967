"""How long ``svcnet lab up`` / ``down`` take for 3 and 20 nodes, and what a node daemon costs.

``up`` is timed until every node registered and the DNS pod is Ready (what ``svcnet lab up``
waits for); the RSS is that of the ``svcnet node`` processes (overlay + proxy), a few seconds
after ``up``, averaged over nodes. Usage (root): .venv/bin/python bench/lab.py [--sizes 3,20]
The last line is JSON: up_3_s, down_3_s, up_20_s, down_20_s, node_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from svcnet.lab.cluster import down, up
from svcnet.lab.netns import RealKernel
from svcnet.lab.procs import Procs
from svcnet.lab.state import LabConfig


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(nodes: int, root: Path, settle: float) -> dict[str, float]:
    name = f"b{os.getpid() % 100000}n{nodes}"[:8]
    cfg = LabConfig(name=name, nodes=nodes, lab_dir=str(root / name), python=sys.executable,
                    cni="auto", overlay="auto")
    kernel = RealKernel()
    start = time.monotonic()
    cfg = up(cfg, kernel, lambda msg: print(f"  {msg}", file=sys.stderr))
    up_s = time.monotonic() - start
    try:
        time.sleep(settle)
        procs = Procs(cfg.dir)
        node_rss = [rss_mb(r.pid) for r in procs.all()
                    if r.name.startswith("node-") and procs.running(r)]
        kubelet_rss = [rss_mb(r.pid) for r in procs.all()
                       if r.name.startswith("kubelet-") and procs.running(r)]
    finally:
        start = time.monotonic()
        down(cfg.dir, kernel, lambda msg: None)
        down_s = time.monotonic() - start
    return {"up_s": up_s, "down_s": down_s,
            "node_rss_mb": sum(node_rss) / max(1, len(node_rss)),
            "kubelet_rss_mb": sum(kubelet_rss) / max(1, len(kubelet_rss)),
            "cni": cfg.cni == "svcnet", "overlay": cfg.overlay == "vxlan",
            "proxy": cfg.proxy, "dns": cfg.dns}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,20")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds after up before reading RSS")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/lab.py needs root (network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="svcnet-lab-bench-") as tmp:
        for n in sizes:
            print(f"lab with {n} nodes ...", file=sys.stderr)
            results[n] = measure(n, Path(tmp), args.settle)
    print(f"{'nodes':>5}  {'up s':>6}  {'down s':>6}  {'svcnet node RSS MB':>18}  "
          f"{'kubelet RSS MB':>14}")
    for n, r in results.items():
        print(f"{n:>5}  {r['up_s']:6.2f}  {r['down_s']:6.2f}  {r['node_rss_mb']:18.1f}  "
              f"{r['kubelet_rss_mb']:14.1f}")
    first = next(iter(results.values()))
    print("components: " + ", ".join(k for k in ("cni", "overlay", "proxy", "dns") if first[k]))
    out: dict[str, float | None] = {}
    for n in (3, 20):
        r = results.get(n)
        out[f"up_{n}_s"] = round(r["up_s"], 2) if r else None
        out[f"down_{n}_s"] = round(r["down_s"], 2) if r else None
    rss = [r["node_rss_mb"] for r in results.values()]
    out["node_rss_mb"] = round(max(rss), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
