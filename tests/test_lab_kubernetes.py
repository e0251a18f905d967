"""``--store kubernetes``: the whole lab (kubelets, controller, node daemons, DNS) through a
Kubernetes API server instead of etcd. The server is tests/kubeapi.py's fake, run by the lab
inside its control namespace, since the lab sends no traffic outside its namespaces."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import lab_in_sync, running_lab
from svcnet.lab.cluster import lab_command
from svcnet.lab.demo import echo_call, resolve

pytestmark = [pytest.mark.kernel]

RUNNER = """\
import asyncio, sys
sys.path.insert(0, {tests!r})
from kubeapi import FakeKubeAPI

class LabAPI(FakeKubeAPI):
    async def start(self):
        self._server = await asyncio.start_server(self._serve, "0.0.0.0", 6443)
        self.port = 6443

async def main():
    api = LabAPI(None, tls=False, tokens={{"lab-token": "lab"}})
    await api.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: lab, cluster: {server: "http://10.250.0.2:6443"}}]
users: [{name: lab, user: {token: lab-token}}]
contexts: [{name: lab, context: {cluster: lab, user: lab}}]
current-context: lab
"""

MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: svcnet/echo, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec: {nodeName: n2, containers: [{name: c, image: svcnet/echo}]}
"""


def test_lab_runs_against_a_kubernetes_api_server(tmp_path: Path) -> None:
    (tmp_path / "apiserver.py").write_text(RUNNER.format(tests=str(Path(__file__).parent)))
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    with running_lab(tmp_path, "k", nodes=2, control_plane="etcd",
                     needs=("overlay", "proxy", "dns"), store="kubernetes",
                     kubeconfig=str(tmp_path / "kubeconfig"),
                     apiserver_argv=(sys.executable, str(tmp_path / "apiserver.py"))) as cfg:
        (tmp_path / "m.yaml").write_text(MANIFEST)
        lab_command(cfg, "apply", "-f", str(tmp_path / "m.yaml"), "--lab-dir", cfg.lab_dir)
        lab_command(cfg, "wait-ready", "--pods", "--timeout", "60", "--lab-dir", cfg.lab_dir,
                    timeout=90)
        status = lab_command(cfg, "status", "--lab-dir", cfg.lab_dir).stdout
        # With the kube subnet manager the overlay uses the podCIDR the kubelet registered.
        assert "10.244.1.1/24" in status and "10.244.2.1/24" in status, status
        seen: set[str] = set()
        for _ in range(20):
            seen |= {a for a in echo_call(cfg, "client", "http://web/", 10, timeout=1)
                     if a.startswith("web-")}
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen
        assert resolve(cfg, "client", "web.default").startswith("10.96.")
        # Overlay (leases from the Nodes' podCIDRs and annotations) and proxy rules match
        # the desired state recomputed from the API server.
        reports = lab_in_sync(cfg, 20)
        assert all(r["overlay"]["peers"] == 1 for r in reports), reports
