"""``svcnet lab demo``: the whole stack in one command, explained as it runs.

Three nodes, a three-replica ``web`` Deployment behind a NodePort Service, and a ``client``
pod on a node that is not the DNS server's. The client resolves ``web`` through the search
path, calls it through the ClusterIP and through a NodePort of another node, and the demo
prints which backend (and node) answered each call and the per-backend counts.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable

from svcnet.lab.cluster import down, lab_command, up
from svcnet.lab.netns import RealKernel
from svcnet.lab.state import LabConfig

Progress = Callable[[str], None]

DEMO_MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: svcnet/echo
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  nodeName: %(client_node)s
  containers: [{name: client, image: svcnet/echo}]
"""


def pod_exec(cfg: LabConfig, pod: str, *argv: str, timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
    """Run a command inside a pod (default namespace), with the pod's resolv.conf."""
    return subprocess.run(["ip", "netns", "exec", cfg.pod_ns("default", pod), *argv],
                          capture_output=True, text=True, timeout=timeout, check=False)


def echo_call(cfg: LabConfig, pod: str, target: str, count: int, *, timeout: float = 2.0,
              interval: float = 0.0) -> list[str]:
    """Answers of ``count`` HTTP calls from ``pod``: backend names or ``ERROR ...`` lines."""
    proc = pod_exec(cfg, pod, cfg.python, "-m", "svcnet.lab.echo", "call", target,
                    "--count", str(count), "--timeout", str(timeout),
                    "--interval", str(interval), timeout=count * (timeout + interval) + 30)
    return proc.stdout.splitlines()


def resolve(cfg: LabConfig, pod: str, name: str) -> str:
    proc = pod_exec(cfg, pod, cfg.python, "-m", "svcnet.lab.echo", "resolve", name)
    return proc.stdout.strip()


def _pods(cfg: LabConfig) -> dict[str, str]:
    """Pod name -> node, from the kubelets' sandbox records."""
    out = {}
    for rec in (cfg.dir / "nodes").glob("*/pods/*.json"):
        data = json.loads(rec.read_text())
        out[data["key"].partition("/")[2]] = rec.parent.parent.name
    return out


def _node_port(cfg: LabConfig) -> int:
    proc = lab_command(cfg, "status", "--lab-dir", str(cfg.dir))
    for line in proc.stdout.splitlines():
        if line.startswith("default/web "):
            ports = line.split()[3]
            return int(ports.split(":")[1].split("/")[0])
    raise RuntimeError("service default/web has no NodePort")


def _until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def run_demo(cfg: LabConfig, *, keep: bool, calls: int, progress: Progress) -> int:
    kernel = RealKernel()
    cfg = up(cfg, kernel, progress)
    ok = True
    try:
        ok = _show(cfg, calls, progress)
    finally:
        if keep:
            progress(f"\nlab {cfg.name} kept; look around with:\n"
                     f"  svcnet lab status --name {cfg.name}\n"
                     f"  svcnet lab exec --name {cfg.name} client -- "
                     f"{cfg.python} -m svcnet.lab.echo call http://web/ --count 5\n"
                     f"  svcnet lab down --name {cfg.name}")
        else:
            progress("\ntearing the lab down")
            down(cfg.dir, kernel, progress)
    return 0 if ok else 1


def _show(cfg: LabConfig, calls: int, progress: Progress) -> bool:
    client_node = cfg.node_names[-1]
    manifest = cfg.dir / "demo.yaml"
    manifest.write_text(DEMO_MANIFEST % {"client_node": client_node})
    print(f"\n$ svcnet lab apply -f {manifest}")
    print(lab_command(cfg, "apply", "-f", str(manifest), "--lab-dir", str(cfg.dir)).stdout,
          end="")
    lab_command(cfg, "wait-ready", "--pods", "--lab-dir", str(cfg.dir), "--timeout", "60",
                timeout=90)
    pods = _pods(cfg)
    print("\npods: " + ", ".join(f"{p} on {n}" for p, n in sorted(pods.items())
                                 if not p.startswith("svcnet-dns")))
    ok = True
    target = "http://web/"
    if cfg.dns:
        _until(lambda: resolve(cfg, "client", "web")[:1].isdigit(), 15)
        answer = resolve(cfg, "client", "web")
        print(f"\nDNS from client (on {client_node}): web -> {answer} "
              f"(web.default.svc.{cfg.zone} via the search path; kube-dns has "
              f"{cfg.dns_replicas} replicas from {cfg.node_names[0]})")
        ok &= not answer.startswith("ERROR") and bool(answer)
    else:
        print("\nDNS: off (svcnet dns not installed); calling the ClusterIP directly")
        target = "http://10.96.0.100/"
    if not cfg.proxy:
        print("proxy: off (svcnet proxy not installed): ClusterIP and NodePort calls skipped; "
              "calling a pod IP instead")
        return ok
    _until(lambda: not echo_call(cfg, "client", target, 1, timeout=1)[0].startswith("ERROR"),
           20)
    answers = echo_call(cfg, "client", target, calls)
    node_port = _node_port(cfg)
    np_node = cfg.node_names[0]
    np_target = f"http://{cfg.node_ip(np_node)}:{node_port}/"
    np_answers = echo_call(cfg, "client", np_target, calls)
    for title, got in ((f"ClusterIP: client -> {target}", answers),
                       (f"NodePort: client -> {np_node} {np_target}", np_answers)):
        print(f"\n{title}")
        for i, who in enumerate(got, 1):
            where = f" (on {pods[who]})" if who in pods else ""
            print(f"  call {i:2d}: {who}{where}")
        counts = Counter(got)
        print("  per backend: " + ", ".join(f"{who}={n}" for who, n in sorted(counts.items())))
        failed = sum(n for who, n in counts.items() if who.startswith("ERROR"))
        backends = {who for who in counts if not who.startswith("ERROR")}
        ok &= failed == 0 and len(got) == calls
        print(f"  {len(backends)} backends answered, {failed} failed")
    return ok

