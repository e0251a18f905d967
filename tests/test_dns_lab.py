"""The lab's DNS pods resolve through the node's resolver, not through kube-dns (issue 13,
defect 1: every pod's resolv.conf, the DNS pods' too, named the kube-dns ClusterIP, so the
DNS server forwarded names outside the cluster to itself)."""

from __future__ import annotations

from pathlib import Path

from svcnet.lab.kubelet import pod_resolv_conf
from svcnet.lab.manifests import system_objects
from svcnet.lab.state import DNS_SERVICE_IP, LabConfig


def test_dns_pods_use_the_node_resolver(tmp_path: Path) -> None:
    cfg = LabConfig(name="u", nodes=2, lab_dir=str(tmp_path))
    pods = [o for o in system_objects(cfg) if o["kind"] == "Pod"]
    assert pods
    # The lab node has no resolver of its own: no upstream, never the host's (outside the lab).
    node_conf = ""
    for pod in pods:
        assert pod["spec"]["dnsPolicy"] == "Default"
        text = pod_resolv_conf(pod, cfg.zone, "svcnet-no-such-node-ns")
        assert DNS_SERVICE_IP not in text
        assert text == node_conf
    client = {"metadata": {"name": "c", "namespace": "shop"}, "spec": {}}
    text = pod_resolv_conf(client, cfg.zone, "svcnet-no-such-node-ns")
    assert f"nameserver {DNS_SERVICE_IP}" in text
    assert f"search shop.svc.{cfg.zone} svc.{cfg.zone} {cfg.zone}" in text
