"""IPVS backend logic against FakeIpvs: rendering, incremental syncs, graceful removal."""

from __future__ import annotations

import re
from typing import Any

import pytest
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.commands import FakeCommands
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.ipvs import (
    SET_CLUSTER_IP,
    SET_EXTERNAL,
    SET_NO_ENDPOINTS,
    SET_NO_LOCAL,
    SET_TYPES,
    IpvsBackend,
    set_name,
)
from svcnet.proxy.ipvs_kernel import FakeIpvs, RealServer, ServiceOptions, VirtualServer
from svcnet.proxy.state import Changes, ChangeTracker, NodeConfig
from svcnet.proxy.tracer import IptablesTracer, Packet

from svcnet.model import EndpointSlice, Service

NODE = NodeConfig("n1", "", ("192.168.9.1",))


class World:
    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.slices: dict[str, list[EndpointSlice]] = {}
        self.tracker = ChangeTracker(NODE)
        self.ipvs = FakeIpvs()
        self.commands = FakeCommands()
        self.backend = IpvsBackend(self.ipvs, self.commands, BackendConfig(), grace_period=60)

    def put(self, svc: dict[str, Any], *eps: dict[str, Any]) -> None:
        s = to_service(svc)
        key = f"{s.metadata.namespace}/{s.metadata.name}"
        old = self.services.get(key)
        self.services[key] = s
        self.tracker.service_changed(old, s)
        sl = to_slice(endpoint_slice(s.metadata.name, *eps))
        self.slices[key] = [sl]
        self.tracker.slice_changed(None, sl)

    def delete(self, name: str) -> None:
        old = self.services.pop(f"default/{name}")
        self.slices.pop(f"default/{name}")
        self.tracker.service_changed(old, None)

    def sync(self, full: bool = False) -> Changes:
        changes = self.tracker.drain(self.services.get, lambda k: self.slices.get(k, []),
                                     lambda: list(self.services))
        self.ipvs.writes.clear()
        self.commands.calls.clear()
        self.backend.sync(changes, full=full)
        return changes

    def ipset_input(self) -> str:
        return "".join(inp or "" for argv, inp in self.commands.calls if argv[0] == "ipset")


def vs(ip: str, port: int, proto: str = "TCP") -> VirtualServer:
    return VirtualServer(ip, proto, port)


def test_clusterip_nodeport_and_sets() -> None:
    w = World()
    w.put(service("web", "10.96.0.10", port(80, node_port=30080), type="NodePort"),
          endpoint("10.1.0.2", node="n1"), endpoint("10.1.0.3", node="n2"))
    w.put(service("empty", "10.96.0.11", port(80)))
    w.sync(full=True)
    reals = {RealServer("10.1.0.2", 8080), RealServer("10.1.0.3", 8080)}
    assert set(w.ipvs.table) == {vs("10.96.0.10", 80), vs("192.168.9.1", 30080)}
    assert set(w.ipvs.real[vs("10.96.0.10", 80)]) == reals
    assert set(w.ipvs.real[vs("192.168.9.1", 30080)]) == reals
    assert w.ipvs.table[vs("10.96.0.10", 80)] == ServiceOptions("rr", 0)
    text = w.ipset_input()
    assert f"add {SET_CLUSTER_IP}-T 10.96.0.10,tcp:80" in text
    assert f"add {SET_EXTERNAL}-T 192.168.9.1,tcp:30080" in text
    assert f"add {SET_NO_ENDPOINTS}-T 10.96.0.11,tcp:80" in text
    batch = "".join(inp or "" for argv, inp in w.commands.calls if argv[:2] == ["ip", "-batch"])
    assert "link add svcnet-ipvs0 type dummy" in batch
    assert "10.96.0.10/32" in batch and "10.96.0.11/32" in batch
    assert "192.168.9.1" not in batch  # NodePort addresses are the node's own


def test_local_policy_without_local_endpoint_drops() -> None:
    w = World()
    w.put(service("loc", "10.96.0.12", port(80, node_port=30081), type="NodePort",
                  externalTrafficPolicy="Local"), endpoint("10.1.0.3", node="n2"))
    w.sync(full=True)
    assert set(w.ipvs.table) == {vs("10.96.0.12", 80)}
    assert f"add {SET_NO_LOCAL}-T 192.168.9.1,tcp:30081" in w.ipset_input()


def test_affinity_is_persistence_with_the_timeout() -> None:
    w = World()
    w.put(service("aff", "10.96.0.13", port(80), sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}),
          endpoint("10.1.0.2"))
    w.sync(full=True)
    assert w.ipvs.table[vs("10.96.0.13", 80)] == ServiceOptions("rr", 600)


def test_partial_sync_touches_only_the_changed_service() -> None:
    w = World()
    for i in range(20):
        w.put(service(f"s{i}", f"10.96.1.{i}", port(80)), endpoint(f"10.1.1.{i}"))
    w.sync(full=True)
    w.put(service("s7", "10.96.1.7", port(80)), endpoint("10.1.1.7"), endpoint("10.1.2.7"))
    w.sync()
    assert w.ipvs.writes == [("add-dest", vs("10.96.1.7", 80), RealServer("10.1.2.7", 8080))]
    assert w.ipset_input() == "add SVCNET-LOOP-BACK 10.1.2.7,tcp:8080,10.1.2.7 -exist\n"
    w.delete("s3")
    w.sync()
    assert w.ipvs.writes == [("delete-service", vs("10.96.1.3", 80), None)]


def test_removed_tcp_endpoint_gets_weight_zero_then_goes() -> None:
    w = World()
    svc = service("web", "10.96.0.20", port(80))
    w.put(svc, endpoint("10.1.0.2"), endpoint("10.1.0.3"))
    w.sync(full=True)
    v, gone = vs("10.96.0.20", 80), RealServer("10.1.0.3", 8080)
    w.ipvs.set_active(v, gone, 2)
    w.put(svc, endpoint("10.1.0.2"), endpoint("10.1.0.3", ready=False, serving=True,
                                              terminating=True))
    w.sync()
    assert w.ipvs.real[v][gone].weight == 0  # still draining its 2 connections
    w.ipvs.set_active(v, gone, 0)
    w.backend.finish_graceful()
    assert gone not in w.ipvs.real[v]
    # Coming back before removal restores the weight instead of adding a duplicate.
    w.put(svc, endpoint("10.1.0.2"))
    w.sync()
    w.ipvs.set_active(v, RealServer("10.1.0.2", 8080), 1)
    w.put(svc, endpoint("10.1.0.2"), endpoint("10.1.0.3"))
    w.sync()
    assert w.ipvs.real[v][gone].weight == 1


def test_udp_endpoint_removed_at_once() -> None:
    w = World()
    svc = service("dns", "10.96.0.30", port(53, protocol="UDP"))
    ports = [("", 53, "UDP")]
    s = to_service(svc)
    w.services["default/dns"] = s
    w.slices["default/dns"] = [to_slice(endpoint_slice("dns", endpoint("10.1.0.2"),
                                                       endpoint("10.1.0.3"), ports=ports))]
    w.tracker.service_changed(None, s)
    w.sync(full=True)
    w.slices["default/dns"] = [to_slice(endpoint_slice("dns", endpoint("10.1.0.2"),
                                                       ports=ports))]
    w.tracker.service_changed(s, s)
    w.sync()
    assert w.ipvs.writes == [("delete-dest", vs("10.96.0.30", 53, "UDP"),
                              RealServer("10.1.0.3", 53))]


def test_full_sync_repairs_the_kernel_table() -> None:
    w = World()
    w.put(service("web", "10.96.0.40", port(80)), endpoint("10.1.0.2"))
    w.sync(full=True)
    v = vs("10.96.0.40", 80)
    w.ipvs.delete_dest(v, RealServer("10.1.0.2", 8080))
    w.ipvs.add_service(vs("10.96.0.41", 80), ServiceOptions())  # stale, on our address?
    w.sync(full=True)
    assert set(w.ipvs.real[v]) == {RealServer("10.1.0.2", 8080)}
    assert vs("10.96.0.41", 80) in w.ipvs.table  # not ours: left alone


def test_scheduler_is_configurable() -> None:
    ipvs = FakeIpvs()
    backend = IpvsBackend(ipvs, FakeCommands(), BackendConfig(), scheduler="lc")
    w = World()
    w.put(service("web", "10.96.0.50", port(80)), endpoint("10.1.0.2"))
    changes = w.tracker.drain(w.services.get, lambda k: w.slices.get(k, []),
                              lambda: list(w.services))
    backend.sync(changes, full=True)
    assert ipvs.table[vs("10.96.0.50", 80)].scheduler == "lc"


def test_cleanup_script_removes_only_our_jumps_and_chains() -> None:
    saved = "\n".join([
        "*nat", ":PREROUTING ACCEPT [0:0]", ":SVCNET-IPVS-SERVICES - [0:0]",
        "-A PREROUTING -j OTHER", "-A PREROUTING -j SVCNET-IPVS-SERVICES",
        "-A SVCNET-IPVS-SERVICES -m set --match-set X dst,dst -j SVCNET-IPVS-MARK-MASQ",
        "COMMIT"])
    assert IpvsBackend._removal_script(saved) == (
        "*nat\n-D PREROUTING -j SVCNET-IPVS-SERVICES\n:SVCNET-IPVS-SERVICES - [0:0]\n"
        "-X SVCNET-IPVS-SERVICES\nCOMMIT\n")
    assert IpvsBackend._removal_script("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == ""


async def test_daemon_builds_the_ipvs_backend_on_its_event_loop() -> None:
    """``--proxy-mode ipvs`` wiring; pyroute2's sync socket must not open on a running loop."""
    import argparse

    from svcnet.proxy.daemon import ProxyOptions, add_node_arguments, build_backend
    from svcnet.proxy.ipvs_kernel import NetlinkIpvs

    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    opts = ProxyOptions.from_args(parser.parse_args(["--proxy-mode", "ipvs"]))
    commands = FakeCommands()
    backend = build_backend(opts, commands)
    assert isinstance(backend, IpvsBackend) and backend.scheduler == "rr"
    assert isinstance(backend.table, NetlinkIpvs) and backend.table._socket is None
    assert commands.calls[0][0][:2] == ["modprobe", "-a"]


TWO_CIDRS = LocalDetector("ClusterCIDR", ("10.1.0.0/16", "10.2.0.0/16"))


@pytest.mark.parametrize(("source", "masquerade"), [
    ("10.1.0.5", False),      # a pod of the first cluster CIDR
    ("10.2.0.5", False),      # ... and of the second
    ("192.168.9.7", True),    # not a pod
])
def test_detect_local_with_two_cluster_cidrs(source: str, masquerade: bool) -> None:
    """Each pod CIDR is local. Before the shared LocalDetector the IPVS rules had one
    ``! -s CIDR -j MARK`` per CIDR, so every pod matched the other one's and was
    masqueraded."""
    backend = IpvsBackend(FakeIpvs(), FakeCommands(), BackendConfig(detect_local=TWO_CIDRS))
    rules = re.sub(r"^-I (\S+) 1 ", r"-A \1 ", backend._rules(4, ""), flags=re.M)
    sets = {set_name(base, 4): frozenset[str]() for base in SET_TYPES}
    sets[set_name(SET_CLUSTER_IP, 4)] = frozenset({"10.96.0.10,tcp:80"})
    tracer = IptablesTracer(rules, local_addresses=("192.168.9.1",), ipsets=sets)
    trace = tracer.trace(Packet(source, "10.96.0.10", 80, iif="eth0"))
    assert trace.verdicts == {"ACCEPT"}
    assert trace.masquerade == {masquerade}
