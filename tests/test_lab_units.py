"""Unit tests of the lab's logic: EndpointSlice planning, manifests, the network plan, CNI runs.

No root needed: the kernel is a FakeKernel, the store a MemoryStore, CNI plugins are scripts.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from svcnet.lab import cluster
from svcnet.lab.cnirun import Attachment, CNIRunner, subnet_from_file
from svcnet.lab.echo import dns_query, dns_try
from svcnet.lab.endpointslices import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    TRIGGER_TIME,
    EndpointSliceController,
    desired_endpoints,
    plan_slices,
)
from svcnet.lab.kubelet import pod_command, resolv_conf
from svcnet.lab.manifests import Applier, Cluster, allocate_service, pick_node, system_objects
from svcnet.lab.netns import FakeKernel
from svcnet.lab.state import LabConfig, Ledger, check_name

from svcnet.model import ENDPOINT_SLICE, POD, SERVICE
from svcnet.store.memory import MemoryStore


def svc(name: str = "web", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "uid": "u1"},
            "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.100",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}], **spec}}


def pod(name: str, ip: str, *, ready: bool = True, node: str = "n1", terminating: bool = False,
        labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "uid": f"uid-{name}",
                            "labels": labels if labels is not None else {"app": "web"}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta,
            "spec": {"nodeName": node, "containers": [
                {"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}], **spec},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": str(ready)}]}}


NODES = {"n1": {"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "za"}}}}


def only_group(groups: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    assert len(groups) == 1
    return next(iter(groups.values()))


# --- EndpointSlices ------------------------------------------------------------------------


def test_endpoint_conditions_follow_the_kubernetes_controller() -> None:
    pods = [pod("a", "10.0.0.1"), pod("b", "10.0.0.2", ready=False),
            pod("c", "10.0.0.3", terminating=True), pod("d", "10.0.0.4", labels={"app": "x"}),
            pod("e", "", ready=True)]
    eps = only_group(desired_endpoints(svc(), pods, NODES))
    assert set(eps) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert eps["10.0.0.1"]["conditions"] == {"ready": True, "serving": True,
                                             "terminating": False}
    assert eps["10.0.0.2"]["conditions"] == {"ready": False, "serving": False,
                                             "terminating": False}
    assert eps["10.0.0.3"]["conditions"] == {"ready": False, "serving": True,
                                             "terminating": True}
    assert eps["10.0.0.1"]["nodeName"] == "n1" and eps["10.0.0.1"]["zone"] == "za"
    assert eps["10.0.0.1"]["targetRef"]["name"] == "a"
    published = only_group(desired_endpoints(svc(publishNotReadyAddresses=True), pods, NODES))
    assert published["10.0.0.2"]["conditions"]["ready"] is True


def test_named_target_port_resolves_per_pod_and_hostname_needs_subdomain() -> None:
    pods = [pod("a", "10.0.0.1", hostname="h1", subdomain="web"),
            pod("b", "10.0.0.2", hostname="h2", subdomain="other")]
    groups = desired_endpoints(svc(), pods, NODES)
    assert list(groups) == [(("http", "TCP", 8080),)]
    eps = only_group(groups)
    assert eps["10.0.0.1"]["hostname"] == "h1"
    assert "hostname" not in eps["10.0.0.2"]


def test_slices_hold_at_most_100_endpoints_and_keep_their_members() -> None:
    service = svc()
    pods = [pod(f"p{i}", f"10.0.{i // 250}.{i % 250 + 1}") for i in range(150)]
    plan = plan_slices(service, [], desired_endpoints(service, pods, NODES),
                       trigger_time="t0", rng=random.Random(1))
    assert sorted(len(s["endpoints"]) for s in plan.put) == [50, 100]
    assert not plan.delete
    first = plan.put[0]
    assert first["metadata"]["labels"][SERVICE_NAME_LABEL] == "web"
    assert first["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY
    assert first["metadata"]["annotations"][TRIGGER_TIME] == "t0"
    assert first["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    # Unchanged input: nothing to write.
    again = plan_slices(service, plan.put, desired_endpoints(service, pods, NODES),
                        trigger_time="t1")
    assert again.put == [] and again.delete == []
    # One pod gone: only the slice that held it is rewritten.
    gone = pods[0]["status"]["podIP"]
    holder = next(s for s in plan.put if any(e["addresses"] == [gone] for e in s["endpoints"]))
    after = plan_slices(service, plan.put, desired_endpoints(service, pods[1:], NODES),
                        trigger_time="t2")
    assert [s["metadata"]["name"] for s in after.put] == [holder["metadata"]["name"]]
    assert after.put[0]["metadata"]["annotations"][TRIGGER_TIME] == "t2"


def test_no_endpoints_leaves_one_empty_placeholder_slice() -> None:
    service = svc()
    plan = plan_slices(service, [], desired_endpoints(service, [pod("a", "10.0.0.1")], NODES),
                       trigger_time="t0")
    empty = plan_slices(service, plan.put, {}, trigger_time="t1")
    assert len(empty.put) == 1 and empty.put[0]["endpoints"] == [] and not empty.delete
    assert plan_slices(service, [], {}, trigger_time="t").put[0]["endpoints"] == []


async def test_controller_writes_slices_to_a_store() -> None:
    store = MemoryStore()
    await store.put(SERVICE, svc())
    await store.put(POD, pod("a", "10.0.0.1"))
    controller = EndpointSliceController(store)
    task = asyncio.create_task(controller.run())
    try:
        async def slices() -> list[dict[str, Any]]:
            return [json.loads(r.data) for r in (await store.list(ENDPOINT_SLICE)).items]

        for _ in range(100):
            got = await slices()
            if got and got[0]["endpoints"]:
                break
            await asyncio.sleep(0.02)
        assert [e["addresses"] for e in got[0]["endpoints"]] == [["10.0.0.1"]]
        await store.put(POD, pod("a", "10.0.0.1", ready=False))
        for _ in range(100):
            got = await slices()
            if got[0]["endpoints"][0]["conditions"]["ready"] is False:
                break
            await asyncio.sleep(0.02)
        assert got[0]["endpoints"][0]["conditions"]["ready"] is False
        await store.delete(SERVICE, "default", "web")
        for _ in range(100):
            if not await slices():
                break
            await asyncio.sleep(0.02)
        assert await slices() == []
    finally:
        task.cancel()


# --- manifests -----------------------------------------------------------------------------


def test_service_allocation_keeps_existing_and_avoids_used() -> None:
    c = Cluster()
    a = allocate_service({"metadata": {"name": "a"}, "spec": {
        "type": "NodePort", "ports": [{"port": 80}]}}, c)
    assert a["spec"]["clusterIP"] == "10.96.0.100" and a["spec"]["ports"][0]["nodePort"] == 30000
    c.services["default/a"] = a
    b = allocate_service({"metadata": {"name": "b"}, "spec": {
        "type": "NodePort", "ports": [{"port": 80}]}}, c)
    assert b["spec"]["clusterIP"] == "10.96.0.101" and b["spec"]["ports"][0]["nodePort"] == 30001
    again = allocate_service({"metadata": {"name": "a"}, "spec": {
        "type": "NodePort", "ports": [{"port": 80}]}}, c)
    assert again["spec"]["clusterIP"] == "10.96.0.100"
    assert again["spec"]["ports"][0]["nodePort"] == 30000
    assert again["metadata"]["uid"] == a["metadata"]["uid"]
    dns = allocate_service({"metadata": {"name": "kube-dns", "namespace": "kube-system"},
                            "spec": {"ports": [{"port": 53}]}}, c)
    assert dns["spec"]["clusterIP"] == "10.96.0.10"
    headless = allocate_service({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}}, c)
    assert headless["spec"]["clusterIP"] == "None"
    ext = allocate_service({"metadata": {"name": "e"}, "spec": {
        "type": "ExternalName", "externalName": "example.org"}}, c)
    assert "clusterIP" not in ext["spec"]


def test_scheduler_spreads_replicas() -> None:
    nodes = ["n1", "n2", "n3"]
    placed: list[dict[str, Any]] = []
    for _ in range(6):
        node = pick_node(nodes, placed, placed)
        placed.append({"spec": {"nodeName": node}})
    assert [p["spec"]["nodeName"] for p in placed] == ["n1", "n2", "n3"] * 2


async def test_deployment_scale_creates_and_gracefully_deletes(tmp_path: Path) -> None:
    cfg = LabConfig(name="u", nodes=3, lab_dir=str(tmp_path))
    store = MemoryStore()
    applier = Applier(cfg, store)
    await applier.apply([{"kind": "Deployment", "metadata": {"name": "web"}, "spec": {
        "replicas": 3, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}}}}])
    pods = [json.loads(r.data) for r in (await store.list(POD)).items]
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["n1", "n2", "n3"]
    assert all(p["metadata"]["labels"]["app"] == "web" for p in pods)
    await applier.scale("default", "web", 1)
    pods = [json.loads(r.data) for r in (await store.list(POD)).items]
    assert sum(1 for p in pods if p["metadata"].get("deletionTimestamp")) == 2
    with pytest.raises(ValueError, match="selector does not match"):
        await applier.apply([{"kind": "Deployment", "metadata": {"name": "bad"}, "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "y"}}}}}])


# --- network plan, ledger, kubelet bits --------------------------------------------------


def test_build_touches_only_lab_namespaces(tmp_path: Path) -> None:
    cfg = LabConfig(name="x", nodes=20, lab_dir=str(tmp_path), etcd_members=3,
                    overlay="static")
    kernel = FakeKernel()
    cluster._build_network(cfg, kernel, Ledger(tmp_path), sysctls=False)
    assert kernel.namespaces == set(Ledger(tmp_path).entries("netns"))
    assert all(ns.startswith("x-") for ns in kernel.namespaces)
    assert {ns for ns, _ in kernel.commands} <= kernel.namespaces
    names = [c.split()[2] for _, c in kernel.commands if c.startswith("link add")]
    assert all(len(n) <= 15 for n in names)
    assert len(set(cfg.node_ip(n) for n in cfg.node_names)) == 20
    routes = [c for ns, c in kernel.commands if ns == "x-n1" and c.startswith("route")]
    assert len(routes) == 19


def test_names_and_resolv_conf() -> None:
    check_name("lab1")
    for bad in ("", "1lab", "toolongname", "a-b", "A"):
        with pytest.raises(ValueError):
            check_name(bad)
    assert resolv_conf("team", "cluster.local") == (
        "nameserver 10.96.0.10\nsearch team.svc.cluster.local svc.cluster.local "
        "cluster.local\noptions ndots:5\n")
    cfg = LabConfig(name="x", nodes=1, lab_dir="/tmp/x", python="/py")
    argv = pod_command(cfg, {"metadata": {"name": "p"}, "spec": {"containers": [
        {"ports": [{"containerPort": 80}, {"containerPort": 53, "protocol": "UDP"}]}]}})
    assert argv == ["/py", "-m", "svcnet.lab.echo", "serve", "--name", "p", "--tcp", "80",
                    "--udp", "53"]


def _plugin(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


async def test_cni_runner_chains_prev_result_and_dels_in_reverse(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    log = tmp_path / "calls"
    for name in ("first", "second"):
        _plugin(bin_dir / name, f'cat > "{tmp_path}/{name}.$CNI_COMMAND.json"\n'
                f'echo "{name} $CNI_COMMAND $CNI_IFNAME" >> "{log}"\n'
                '[ "$CNI_COMMAND" = ADD ] && echo \'{"cniVersion":"1.0.0",'
                '"ips":[{"address":"10.1.2.3/24"}]}\'\nexit 0\n')
    (conf_dir / "10-x.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "first"},
                                                          {"type": "second"}]}))
    runner = CNIRunner(conf_dir, [str(bin_dir)], tmp_path / "cache")
    att = Attachment("c1", "/var/run/netns/x", "eth0", "K8S_POD_NAME=p")
    result = await runner.add(att)
    assert result["ips"][0]["address"] == "10.1.2.3/24"
    second_add = json.loads((tmp_path / "second.ADD.json").read_text())
    assert second_add["prevResult"]["ips"][0]["address"] == "10.1.2.3/24"
    assert second_add["name"] == "net" and second_add["cniVersion"] == "1.0.0"
    await runner.delete(att)
    first_del = json.loads((tmp_path / "first.DEL.json").read_text())
    assert first_del["prevResult"]["ips"][0]["address"] == "10.1.2.3/24"
    assert log.read_text().split("\n")[:4] == ["first ADD eth0", "second ADD eth0",
                                               "second DEL eth0", "first DEL eth0"]
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n")
    assert subnet_from_file(env) == "10.244.7.0/24"


def test_dns_probe_tries_classify_answers_errors_and_silence() -> None:
    """The glibc-like probe's outcomes: an answer, SERVFAIL, ICMP port unreachable on the
    connected socket, a late answer to an earlier query id ignored, and a timeout."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    replies = iter([("ok", 1), ("stale", 1), ("servfail", 0)])

    def answer() -> None:
        for kind, ancount in replies:
            data, peer = server.recvfrom(512)
            qid = data[:2] if kind != "stale" else bytes([data[0] ^ 1, data[1]])
            flags = b"\x81\x82" if kind == "servfail" else b"\x81\x80"
            server.sendto(qid + flags + data[4:6] + bytes([0, ancount]) + data[8:], peer)
            if kind == "stale":
                server.sendto(data[:2] + b"\x81\x80" + data[4:6] + b"\0\1" + data[8:], peer)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    query = dns_query("web.default.svc.cluster.local", 0x1234)
    assert query[:2] == b"\x12\x34" and b"\x03web\x07default\x03svc" in query
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(server.getsockname())
        assert dns_try(sock, dns_query("a.b", 1), 2.0) == "ok"
        assert dns_try(sock, dns_query("a.b", 2), 2.0) == "ok"  # after the stale one
        assert dns_try(sock, dns_query("a.b", 3), 2.0) == "servfail"
        assert dns_try(sock, dns_query("a.b", 4), 0.05) == "timeout"
    thread.join(5)
    server.close()
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        assert dns_try(sock, dns_query("a.b", 5), 2.0) == "refused"


def test_kube_dns_runs_replicas_on_successive_nodes() -> None:
    def pods(nodes: int, replicas: int, dns: bool = True) -> list[tuple[str, str]]:
        cfg = LabConfig(name="x", nodes=nodes, lab_dir="/tmp/x", dns=dns,
                        dns_replicas=replicas)
        return [(o["metadata"]["name"], o["spec"]["nodeName"])
                for o in system_objects(cfg) if o["kind"] == "Pod"]

    assert pods(3, 2) == [("svcnet-dns", "n1"), ("svcnet-dns-2", "n2")]
    assert pods(1, 2) == [("svcnet-dns", "n1"), ("svcnet-dns-2", "n1")]
    assert pods(3, 1) == [("svcnet-dns", "n1")]
    assert pods(3, 2, dns=False) == []
