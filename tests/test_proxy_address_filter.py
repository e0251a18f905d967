"""Services may not capture traffic to infrastructure (the CVE-2020-8554 class).

``--service-cluster-ip-range`` and ``--proxy-external-ip-cidrs`` keep a Service's ClusterIP,
externalIPs and LoadBalancer IPs to their ranges. Unit tests of the filter in the model,
then real traffic: an "infrastructure" server (etcd's ports) next to the node, a Service
claiming its address, and a connection that must still reach the real server.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.daemon import ProxyOptions, add_node_arguments
from svcnet.proxy.state import (
    AddressFilter,
    ChangeTracker,
    FrontendKind,
    NodeConfig,
    service_ports,
)
from test_proxy_flows import EXT_IP, NODE_IP, P1, P2, Lab, build_lab, make_backend

from svcnet.cli import UsageError

SERVICE_RANGE = "10.96.0.0/16"
EXTERNAL_RANGE = "203.0.113.0/24"


def options(*flags: str) -> ProxyOptions:
    p = argparse.ArgumentParser()
    add_node_arguments(p)
    return ProxyOptions.from_args(p.parse_args(["--proxy-node-name", "n1", *flags]))


SAFE = ("--service-cluster-ip-range", SERVICE_RANGE, "--proxy-external-ip-cidrs", EXTERNAL_RANGE)


def frontends(node: NodeConfig, obj: dict[str, Any]) -> tuple[set[tuple[str, str, int]],
                                                             list[tuple[FrontendKind, str]]]:
    ignored: list[tuple[FrontendKind, str]] = []
    ports = service_ports(to_service(obj), [], node, ignored)
    return {(f.kind.value, f.ip, f.port) for p in ports for f in p.frontends}, ignored


# --- the filter -------------------------------------------------------------------------------


def test_address_filter() -> None:
    assert AddressFilter().allows("192.0.2.1") and AddressFilter().allows("fd00::1")
    f = AddressFilter(("10.96.0.0/16", "fd00:96::/108"))
    assert f.allows("10.96.255.1") and f.allows("fd00:96::5")
    assert not f.allows("10.97.0.1") and not f.allows("fd00:97::1")
    assert not f.allows("not-an-ip") and not f.allows("")
    assert AddressFilter(("10.96.0.0/16",)) == AddressFilter(("10.96.0.0/16",))


def test_flags_build_the_node_filters() -> None:
    node = options(*SAFE).node_config((NODE_IP,))
    assert node.cluster_ips == AddressFilter((SERVICE_RANGE,))
    assert node.external_ips == AddressFilter((EXTERNAL_RANGE,))
    # the kube-proxy spelling is accepted too; defaults allow everything, as kube-proxy
    assert options("--proxy-service-cluster-ip-range", SERVICE_RANGE).service_cidrs == (
        SERVICE_RANGE,)
    assert options().node_config(()).external_ips == AddressFilter()
    with pytest.raises(UsageError, match="not a CIDR"):
        options("--proxy-external-ip-cidrs", "203.0.113.0/24,etcd")


def test_refused_addresses_are_left_out_and_reported() -> None:
    node = options(*SAFE).node_config((NODE_IP,))
    obj = service("web", "10.96.0.10", port(2379, node_port=30079), type="LoadBalancer",
                  externalIPs=["192.168.1.2", "203.0.113.20"],
                  lb_ips=["10.250.0.1", "203.0.113.10"])
    got, ignored = frontends(node, obj)
    assert got == {("ClusterIP", "10.96.0.10", 2379), ("NodePort", NODE_IP, 30079),
                   ("ExternalIP", "203.0.113.20", 2379), ("LoadBalancer", "203.0.113.10", 2379)}
    assert sorted(ignored, key=str) == sorted([(FrontendKind.EXTERNAL_IP, "192.168.1.2"),
                                               (FrontendKind.LOAD_BALANCER, "10.250.0.1")],
                                              key=str)
    # without the flags, everything is programmed (kube-proxy's default)
    assert len(frontends(NodeConfig("n1", nodeport_addresses=(NODE_IP,)), obj)[0]) == 6


def test_cluster_ip_outside_the_range_is_not_programmed() -> None:
    node = options(*SAFE).node_config((NODE_IP,))
    got, ignored = frontends(node, service("rogue", "10.250.0.1", port(2379)))
    assert got == set() and ignored == [(FrontendKind.CLUSTER_IP, "10.250.0.1")]
    # its NodePort still works: only the address is refused, not the service
    got, _ = frontends(node, service("np", "10.250.0.1", port(80, node_port=30080),
                                     type="NodePort"))
    assert got == {("NodePort", NODE_IP, 30080)}
    # dual-stack: the family whose ClusterIP is in range keeps it
    dual = options("--service-cluster-ip-range", f"{SERVICE_RANGE},fd00:96::/108").node_config(())
    got, ignored = frontends(dual, service("d", ["10.96.0.7", "fd00:1::7"], port(80)))
    assert got == {("ClusterIP", "10.96.0.7", 80)}
    assert ignored == [(FrontendKind.CLUSTER_IP, "fd00:1::7")]


def test_tracker_reports_each_refused_address_once() -> None:
    reports: list[tuple[str, list[tuple[FrontendKind, str]]]] = []
    tracker = ChangeTracker(options(*SAFE).node_config(()),
                            on_ignored=lambda s, a: reports.append((s, a)))
    objs: dict[str, Any] = {}
    slices: list[Any] = []

    def put(obj: dict[str, Any]) -> Any:
        svc = to_service(obj)
        objs["default/web"] = svc
        tracker.service_changed(None, svc)
        return tracker.drain(objs.get, lambda k: slices, lambda: list(objs))

    changes = put(service("web", "10.96.0.10", port(80), externalIPs=["192.168.1.2"]))
    assert {f.ip for p in changes.state.values() for f in p.frontends} == {"10.96.0.10"}
    assert reports == [("default/web", [(FrontendKind.EXTERNAL_IP, "192.168.1.2")])]
    # endpoint churn recomputes the service: no new report
    slices[:] = [to_slice(endpoint_slice("web", endpoint(P1)))]
    tracker.slice_changed(None, slices[0])
    tracker.drain(objs.get, lambda k: slices)
    assert len(reports) == 1
    # a second bad address is reported alone; a fixed service then a relapse, again
    put(service("web", "10.96.0.10", port(80), externalIPs=["192.168.1.2", "10.250.0.9"]))
    assert reports[-1] == ("default/web", [(FrontendKind.EXTERNAL_IP, "10.250.0.9")])
    put(service("web", "10.96.0.10", port(80)))
    put(service("web", "10.96.0.10", port(80), externalIPs=["192.168.1.2"]))
    assert reports[-1] == ("default/web", [(FrontendKind.EXTERNAL_IP, "192.168.1.2")])
    assert len(reports) == 3
    del objs["default/web"]
    tracker.service_changed(to_service(service("web", "10.96.0.10")), None)
    tracker.drain(objs.get, lambda k: [])
    assert tracker._ignored == {}


def test_proxier_logs_and_counts_refused_addresses(caplog: pytest.LogCaptureFixture) -> None:
    from svcnet.proxy import metrics
    from svcnet.proxy.proxier import Proxier

    def count() -> float:
        return metrics.IGNORED_ADDRESSES.labels("ExternalIP")._value.get()  # type: ignore[no-any-return]

    class Null:
        name = "null"

    before = count()
    proxier = Proxier(Null(), options(*SAFE).node_config(()))  # type: ignore[arg-type]
    svc = to_service(service("web", "10.96.0.10", port(80), externalIPs=["192.168.1.2"]))
    proxier.on_service(None, svc)
    with caplog.at_level("WARNING"):
        proxier.tracker.drain(lambda k: svc, lambda k: [], lambda: ["default/web"])
    assert count() == before + 1
    assert "default/web" in caplog.text and "ExternalIP 192.168.1.2" in caplog.text


# --- real traffic -----------------------------------------------------------------------------

INFRA = r'''
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, peer = s.accept()
        try:
            if c.recv(100):
                c.sendall(f"infra {peer[0]}\n".encode())
        finally:
            c.close()
for p in (2379, 2380):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''

# Services that claim the infrastructure server's address (EXT_IP, "etcd") on its ports.
CAPTURING = [
    (service("capture", "10.96.0.40", port(2379, target=8080), externalIPs=[EXT_IP]),
     endpoint_slice("capture", endpoint(P1), endpoint(P2))),
    (service("rogue", EXT_IP, port(2380, target=8080)),
     endpoint_slice("rogue", endpoint(P1), endpoint(P2))),
]


@pytest.fixture
def infra_lab(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Lab]:
    for lab in build_lab(netns, tmp_path):
        (tmp_path / "infra.py").write_text(INFRA)
        proc = subprocess.Popen(["ip", "netns", "exec", lab.ns["ext"], sys.executable,
                                 str(tmp_path / "infra.py")], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield lab
        finally:
            proc.kill()
            proc.wait(5)


def program(backend: Any, node: NodeConfig) -> None:
    """The first service by a full sync, the second by a partial one."""
    tracker = ChangeTracker(node)
    services: dict[str, Any] = {}
    slices: dict[str, list[Any]] = {}
    for i, (svc, sl) in enumerate(CAPTURING):
        s = to_service(svc)
        key = f"default/{s.metadata.name}"
        services[key], slices[key] = s, [to_slice(sl)]
        tracker.service_changed(None, s)
        backend.sync(tracker.drain(services.get, lambda k: slices.get(k, []),
                                   lambda: list(services)), full=i == 0)


def reached(lab: Lab, source: str, host: str, port: int) -> set[str]:
    result = lab.client(source, host, port, count=6, want=3)
    assert not result["errors"], result
    return {a.split()[0] for a in result["answers"]}


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["nftables", "iptables"])
def test_service_cannot_capture_infrastructure(kind: str, infra_lab: Lab) -> None:
    lab = infra_lab
    backend = make_backend(kind, lab.node)
    program(backend, options(*SAFE).node_config((NODE_IP,)))
    for source in ("node", "cpod"):
        assert reached(lab, source, EXT_IP, 2379) == {"infra"}, source   # externalIP refused
        assert reached(lab, source, EXT_IP, 2380) == {"infra"}, source   # ClusterIP refused
        # the rest of the service still works
        assert reached(lab, source, "10.96.0.40", 2379) <= {"pod1", "pod2"}, source
    dump = str(backend.dump(4))
    assert EXT_IP not in dump, dump
    assert "10.96.0.40" in dump


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["nftables", "iptables"])
def test_without_the_flags_a_service_does_capture(kind: str, infra_lab: Lab) -> None:
    """The default (kube-proxy's): the traffic is captured. Shows the test above can fail."""
    lab = infra_lab
    backend = make_backend(kind, lab.node)
    program(backend, options().node_config((NODE_IP,)))
    assert reached(lab, "cpod", EXT_IP, 2379) <= {"pod1", "pod2"}
    assert reached(lab, "cpod", EXT_IP, 2380) <= {"pod1", "pod2"}


def test_the_lab_runs_its_proxies_with_safe_ranges(tmp_path: Path) -> None:
    """Lab nodes refuse external addresses on the underlay (nodes, etcd) and ClusterIPs off
    the service network, as parsed by ``svcnet node`` itself."""
    from svcnet.lab.state import SERVICE_NETWORK, UNDERLAY, LabConfig
    from svcnet.lab.verify import daemon_args

    cfg = LabConfig(name="x", nodes=2, lab_dir=str(tmp_path), etcd_members=3)
    node = ProxyOptions.from_args(daemon_args(cfg, "n1")).node_config(())
    underlay = [*map(cfg.node_ip, cfg.node_names), *map(cfg.etcd_ip, (1, 2, 3)),
                str(UNDERLAY.broadcast_address - 1)]
    assert not any(node.external_ips.allows(ip) for ip in underlay), underlay
    assert not any(node.cluster_ips.allows(ip) for ip in underlay)
    assert node.external_ips.allows("203.0.113.10")
    assert node.cluster_ips.allows(str(SERVICE_NETWORK.network_address + 10))
