"""The bridge plugin's ADD/DEL logic against an in-memory kernel (no root needed): the exact
rollback of every step, and DEL's tolerance of anything already gone. The same behaviours
are tested on the real kernel in test_cni_conformance.py; this fake makes each failure point
reachable on purpose."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from svcnet.cni import bridge
from svcnet.cni.addr import Prefix
from svcnet.cni.bridge import Env, NetConf
from svcnet.cni.rtnl import AlreadyExists, Link, LinkNotFound, NetlinkError, Route
from svcnet.cni.spec import CniError

if TYPE_CHECKING:
    from svcnet.cni.rtnl import RtnlApi


class FakeKernel:
    """Two namespaces' links, addresses and routes; ``fail_on`` makes one operation fail."""

    def __init__(self) -> None:
        self.links: dict[str, dict[str, Link]] = {"host": {}, "pod": {}}
        self.addrs: dict[str, set[tuple[int, Prefix]]] = {"host": set(), "pod": set()}
        self.routes: dict[str, list[Route]] = {"host": [], "pod": []}
        self.next_index = 2
        self.fail_on = ""
        self.sysctls: dict[str, str] = {}
        self.macs_set: list[tuple[str, str]] = []

    def new_link(self, ns: str, name: str, kind: str, mac: str, master: int = 0) -> Link:
        if name in self.links[ns]:
            raise AlreadyExists(17, f"{name} exists")
        link = Link(self.next_index, name, kind, mac, 1500, master, 0, "")
        self.next_index += 1
        self.links[ns][name] = link
        return link


class FakeRtnl:
    """In-memory implementation of the RtnlApi Protocol for one namespace."""

    def __init__(self, kernel: FakeKernel, ns: str) -> None:
        self.k = kernel
        self.ns = ns

    def _check(self, op: str) -> None:
        if self.k.fail_on == op:
            raise NetlinkError(1, f"injected failure in {op}")

    def __enter__(self) -> FakeRtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass

    def _find(self, name: str = "", index: int = 0) -> Link:
        for link in self.k.links[self.ns].values():
            if (name and link.name == name) or (index and link.index == index):
                return link
        raise LinkNotFound(19, f"link {name or index} not found")

    def link(self, name: str = "", index: int = 0) -> Link:
        return self._find(name, index)

    def links(self) -> list[Link]:
        return list(self.k.links[self.ns].values())

    def add_bridge(self, name: str, mtu: int = 0, vlan_filtering: bool = False,
                   mac: str = "") -> None:
        self._check("add_bridge")
        self.k.new_link(self.ns, name, "bridge", mac or "02:00:00:00:00:01").flags |= 1

    def add_veth(self, name: str, mac: str, peer_name: str, peer_mac: str,
                 peer_netns_fd: int, mtu: int, master: int) -> None:
        self._check("add_veth")
        if peer_name in self.k.links["pod"]:
            raise AlreadyExists(17, f"{peer_name} exists in the pod")
        self.k.new_link(self.ns, name, "veth", mac, master).flags |= 1
        self.k.new_link("pod", peer_name, "veth", peer_mac)

    def set_link(self, index: int, *, up: bool | None = None, promisc: bool | None = None,
                 mtu: int = 0, alias: str | None = None, mac: str = "") -> None:
        self._check("set_link")
        link = self._find(index=index)
        if mac:
            link.mac = mac
            self.k.macs_set.append((link.name, mac))
        if up is not None:
            link.flags = link.flags | 1 if up else link.flags & ~1
        if alias is not None:
            link.alias = alias

    def set_hairpin(self, index: int, on: bool) -> None:
        self._check("set_hairpin")

    def bridge_vlan(self, index: int, vid: int, *, add: bool, pvid: bool = False,
                    untagged: bool = False, self_: bool = False) -> None:
        self._check("bridge_vlan")

    def delete_link(self, name: str = "", index: int = 0) -> None:
        link = self._find(name, index)
        del self.k.links[self.ns][link.name]
        if link.kind == "veth" and self.ns == "host":  # the peer goes with it
            self.k.links["pod"].clear()
            self.k.addrs["pod"].clear()
            self.k.routes["pod"].clear()

    def addresses(self, index: int = 0, version: int = 0) -> list[tuple[int, Prefix]]:
        return [(i, p) for i, p in self.k.addrs[self.ns] if not index or i == index]

    def add_address(self, index: int, prefix: Prefix, *, nodad: bool = False) -> None:
        self._check("add_address")
        self.k.addrs[self.ns].add((index, prefix))

    def delete_address(self, index: int, prefix: Prefix) -> None:
        self.k.addrs[self.ns].discard((index, prefix))

    def add_route(self, dst: Prefix, *, gateway: str = "", oif: int = 0, priority: int = 0,
                  table: int = 0, scope: int | None = None, mtu: int = 0,
                  advmss: int = 0) -> None:
        self._check("add_route")
        self.k.routes[self.ns].append(Route(dst.masked(), gateway, oif, priority,
                                            table or 254, 0))

    def routes(self, version: int) -> Iterator[Route]:
        return iter([r for r in self.k.routes[self.ns] if r.dst.version == version])


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    k = FakeKernel()
    host: RtnlApi = FakeRtnl(k, "host")  # type-checked against the Protocol
    monkeypatch.setattr(bridge, "open_host", lambda: host)
    monkeypatch.setattr(bridge, "open_pod", lambda fd, arp_notify="": FakeRtnl(k, "pod"))
    monkeypatch.setattr(bridge, "_open_netns", lambda path: os.open("/dev/null", os.O_RDONLY))
    monkeypatch.setattr(bridge, "read_sysctl", lambda key: k.sysctls.get(key, "0"))
    monkeypatch.setattr(bridge, "write_sysctl", lambda key, v: k.sysctls.__setitem__(key, v))
    return k


def _conf(tmp_path: Path, **extra: Any) -> NetConf:
    return NetConf({"cniVersion": "1.1.0", "name": "fake", "type": "svcnet-cni",
                    "bridge": "br0", "isGateway": True, "isDefaultGateway": True,
                    "ipam": {"type": "host-local", "dataDir": str(tmp_path),
                             "ranges": [[{"subnet": "10.9.0.0/24"}]],
                             "routes": [{"dst": "10.10.0.0/16"}]}, **extra})


ENV = Env("ctr", "eth0", "/var/run/netns/fake", {}, "")


def _reservations(tmp_path: Path) -> list[str]:
    d = tmp_path / "fake"
    return sorted(p.name for p in d.iterdir()
                  if not p.name.startswith("last_") and p.name != "lock") if d.is_dir() else []


def test_add_builds_the_expected_state(kernel: FakeKernel, tmp_path: Path) -> None:
    result = bridge.cmd_add(_conf(tmp_path, hairpinMode=True), ENV, b"")
    host_veth = bridge.host_veth_name("ctr", "eth0")
    assert set(kernel.links["host"]) == {"br0", host_veth}
    assert kernel.links["host"][host_veth].master == kernel.links["host"]["br0"].index
    assert kernel.links["host"][host_veth].alias == "svcnet-cni/fake/ctr/eth0"
    assert (kernel.links["host"]["br0"].index, Prefix.parse("10.9.0.1/24")) in \
        kernel.addrs["host"]
    assert kernel.sysctls == {"net/ipv4/ip_forward": "1"}
    pod = kernel.links["pod"]["eth0"]
    assert pod.up and (pod.index, Prefix.parse("10.9.0.2/24")) in kernel.addrs["pod"]
    assert sorted((str(r.dst), r.gateway) for r in kernel.routes["pod"]) == [
        ("0.0.0.0/0", "10.9.0.1"), ("10.10.0.0/16", "10.9.0.1")]
    assert result["ips"] == [{"address": "10.9.0.2/24", "gateway": "10.9.0.1",
                              "interface": 2}]
    assert _reservations(tmp_path) == ["10.9.0.2"]


@pytest.mark.parametrize("step", ["add_veth", "set_link", "set_hairpin", "add_address",
                                  "add_route"])
def test_every_failing_step_rolls_back(kernel: FakeKernel, tmp_path: Path, step: str
                                       ) -> None:
    kernel.fail_on = step
    with pytest.raises(NetlinkError):
        bridge.cmd_add(_conf(tmp_path, hairpinMode=True), ENV, b"")
    assert set(kernel.links["host"]) == {"br0"}  # only the shared bridge stays
    assert kernel.links["pod"] == {}
    assert _reservations(tmp_path) == []
    kernel.fail_on = ""
    bridge.cmd_add(_conf(tmp_path), ENV, b"")  # and the same ADD then works
    assert len(_reservations(tmp_path)) == 1


def test_existing_ifname_fails_without_touching_it(kernel: FakeKernel, tmp_path: Path
                                                   ) -> None:
    kernel.new_link("pod", "eth0", "veth", "02:00:00:00:00:99")
    with pytest.raises(CniError) as info:
        bridge.cmd_add(_conf(tmp_path), ENV, b"")
    assert "already exists" in info.value.msg
    assert "eth0" in kernel.links["pod"] and _reservations(tmp_path) == []


def test_del_tolerates_everything_already_gone(kernel: FakeKernel, tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    bridge.cmd_del(conf, ENV, b"")  # nothing was ever added
    bridge.cmd_add(conf, ENV, b"")
    kernel.links["host"].pop(bridge.host_veth_name("ctr", "eth0"))  # link vanished
    bridge.cmd_del(conf, ENV, b"")
    bridge.cmd_del(conf, ENV, b"")
    assert _reservations(tmp_path) == []


def test_existing_bridge_is_pinned_only_when_it_follows_a_port(kernel: FakeKernel,
                                                              tmp_path: Path) -> None:
    """Without a /sys of the bridge's namespace, the kernel's rule decides: a bridge with
    ports whose MAC no port has is pinned already (pinning again would flush its neighbour
    entries); one with a port's MAC, or without ports, is pinned to its current MAC."""
    bridge_link = kernel.new_link("host", "br0", "bridge", "02:00:00:00:00:10")
    bridge_link.flags |= 1
    kernel.new_link("host", "vethother", "veth", "02:00:00:00:00:05", bridge_link.index)
    bridge.cmd_add(_conf(tmp_path), ENV, b"")
    assert kernel.macs_set == []
    bridge_link.mac = "02:00:00:00:00:05"  # following its port
    bridge.cmd_add(_conf(tmp_path), Env("ctr2", "eth1", "/var/run/netns/fake", {}, ""), b"")
    assert kernel.macs_set == [("br0", "02:00:00:00:00:05")]


def test_new_bridge_gets_its_own_mac(kernel: FakeKernel, tmp_path: Path) -> None:
    result = bridge.cmd_add(_conf(tmp_path), ENV, b"")
    own = kernel.links["host"]["br0"].mac
    assert own != "02:00:00:00:00:01" and result["interfaces"][0]["mac"] == own
    assert kernel.macs_set == []
