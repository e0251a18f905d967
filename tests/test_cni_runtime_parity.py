"""What real container runtimes rely on and the conformance suite did not cover (issue 14):
a pinned bridge MAC, requested MACs, one IPv4 gateway per bridge, layer-2-only networks,
config validation like the reference, and CNI_NETNS that is not a network namespace.

Each test runs against svcnet-cni in-process, svcnet-cni served by the node daemon's socket
and (where it behaves the same) the reference bridge + host-local, through env + stdin in
throwaway namespaces (``make_net`` of the conformance suite).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require_binary
from test_cni_conformance import IMPLS, Net, make_net, pod_ip
from test_cni_helpers import (
    PluginError,
    Runtime,
    addresses,
    ip_json,
    links,
    ns_run,
    ping,
    svcnet_bin,
)

__all__ = ["make_net", "svcnet_bin"]

pytestmark = pytest.mark.kernel

OURS = ["svcnet", "svcnet-daemon"]


def _ports(net: Net) -> list[str]:
    return [n for n, link in links(net.host).items() if link.get("master") == "cnitest0"]


# -- 1. the bridge's MAC is pinned ----------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_gateway_mac_survives_pods_leaving(make_net: Callable[[str], Net],
                                          netns: Callable[[str], str], impl: str) -> None:
    """An unpinned bridge takes the lowest MAC of its ports, so removing the pod whose host
    veth lent it its MAC changes the gateway's MAC under the running pods, which keep
    sending to the old one (their ARP entry stays REACHABLE) and lose the gateway."""
    net = make_net(impl)
    conf = net.conf("1.0.0")
    pods = [netns("p") for _ in range(4)]
    results = [net.add(conf, f"ctr-{i}", pod) for i, pod in enumerate(pods)]
    host = links(net.host)
    bridge_mac = host["cnitest0"]["address"]
    assert results[-1]["interfaces"][0]["mac"] == bridge_mac
    veth_macs = [host[r["interfaces"][1]["name"]]["address"] for r in results]
    # the pod the kernel's choice would follow: the one lending its MAC, else the lowest
    victim = veth_macs.index(bridge_mac) if bridge_mac in veth_macs else veth_macs.index(
        min(veth_macs))
    keeper = 1 if victim == 0 else 0
    assert ping(pods[keeper], "10.77.0.1")  # the keeper's ARP entry is fresh and REACHABLE
    net.delete(conf, f"ctr-{victim}", pods[victim], prev=results[victim])
    assert links(net.host)["cnitest0"]["address"] == bridge_mac
    out = ns_run(pods[keeper], "ping", "-c", "4", "-i", "0.2", "-W", "1", "10.77.0.1",
                 check=False)
    assert out.returncode == 0, f"the running pod lost its gateway: {out.stdout}"
    neigh = ip_json(pods[keeper], "neigh", "show", "10.77.0.1")
    assert neigh and neigh[0]["lladdr"] == bridge_mac
    for i, pod in enumerate(pods):
        if i != victim:
            net.delete(conf, f"ctr-{i}", pod, prev=results[i])


@pytest.mark.parametrize("impl", IMPLS)
def test_unpinned_bridge_is_pinned(make_net: Callable[[str], Net], netns: Callable[[str], str],
                                   impl: str) -> None:
    """A bridge made by someone else (here `ip link add`) is pinned to its current MAC."""
    net = make_net(impl)
    ns_run(net.host, "ip", "link", "add", "cnitest0", "type", "bridge")
    sysfs = "/sys/class/net/cnitest0/addr_assign_type"
    assert ns_run(net.host, "cat", sysfs).stdout.strip() != "3"
    pod = netns("p")
    conf = net.conf("1.0.0")
    res = net.add(conf, "ctr", pod)
    assert ns_run(net.host, "cat", sysfs).stdout.strip() == "3"  # NET_ADDR_SET
    net.delete(conf, "ctr", pod, prev=res)


@pytest.mark.parametrize("impl", OURS)
def test_new_bridge_is_pinned_at_creation(make_net: Callable[[str], Net],
                                          netns: Callable[[str], str], impl: str) -> None:
    """Pinned from the start, even without a gateway address (the reference pins only when
    it sets one) and before its first port: its MAC is its own, no port's."""
    net = make_net(impl)
    pod_a, pod_b = netns("p"), netns("p")
    conf = net.conf("1.0.0", isGateway=False, isDefaultGateway=False)
    res_a = net.add(conf, "ctr-a", pod_a)
    res_b = net.add(conf, "ctr-b", pod_b)
    assert ns_run(net.host, "cat", "/sys/class/net/cnitest0/addr_assign_type"
                  ).stdout.strip() == "3"
    host = links(net.host)
    assert host["cnitest0"]["address"] not in {host[r["interfaces"][1]["name"]]["address"]
                                               for r in (res_a, res_b)}
    net.delete(conf, "ctr-a", pod_a, prev=res_a)
    net.delete(conf, "ctr-b", pod_b, prev=res_b)


# -- 2. requested MACs ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_requested_mac(make_net: Callable[[str], Net], netns: Callable[[str], str],
                       impl: str) -> None:
    """``CNI_ARGS`` ``MAC=`` (podman --mac-address), ``args.cni.mac`` and the ``mac``
    capability (``runtimeConfig.mac``, which wins), as the reference; a reload (DEL, then
    ADD with ``IP=...;MAC=...``) keeps address and MAC."""
    net = make_net(impl)
    pods = [netns("p") for _ in range(3)]
    conf = net.conf("1.0.0")

    def pod_mac(res: dict[str, Any], pod: str) -> str:
        mac = str(res["interfaces"][2]["mac"])
        assert links(pod)["eth0"]["address"] == mac
        return mac

    res_a = net.add(conf, "ctr-a", pods[0], args="IgnoreUnknown=1;MAC=02:aa:bb:cc:dd:01")
    assert pod_mac(res_a, pods[0]) == "02:aa:bb:cc:dd:01"
    with_cap = dict(conf, runtimeConfig={"mac": "02:AA:BB:CC:DD:02"})
    res_b = net.add(with_cap, "ctr-b", pods[1], args="IgnoreUnknown=1;MAC=02:aa:bb:cc:dd:09")
    assert pod_mac(res_b, pods[1]) == "02:aa:bb:cc:dd:02"
    with_args = dict(conf, args={"cni": {"mac": "02:aa:bb:cc:dd:03"}})
    res_c = net.add(with_args, "ctr-c", pods[2])
    assert pod_mac(res_c, pods[2]) == "02:aa:bb:cc:dd:03"
    assert ping(pods[0], pod_ip(res_b))
    ip_a = pod_ip(res_a)
    net.delete(conf, "ctr-a", pods[0], prev=res_a)  # `podman network reload`
    res_a = net.add(conf, "ctr-a", pods[0],
                    args=f"IgnoreUnknown=1;IP={ip_a};MAC=02:aa:bb:cc:dd:01")
    assert (pod_ip(res_a), pod_mac(res_a, pods[0])) == (ip_a, "02:aa:bb:cc:dd:01")
    assert ping(pods[1], ip_a)
    for i, res in enumerate((res_a, res_b, res_c)):
        net.delete(conf, f"ctr-{'abc'[i]}", pods[i], prev=res)
    assert net.reservations() == []


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("where", "mac", "code"), [
    ("CNI_ARGS", "zz:aa:bb:cc:dd:01", 4), ("CNI_ARGS", "01:00:5e:00:00:01", 4),
    ("runtimeConfig", "02:aa:bb:cc:dd", 7)])
def test_invalid_requested_mac(make_net: Callable[[str], Net], netns: Callable[[str], str],
                               impl: str, where: str, mac: str, code: int) -> None:
    net = make_net(impl)
    pod = netns("p")
    conf = net.conf("1.0.0")
    args = ""
    if where == "CNI_ARGS":
        args = f"IgnoreUnknown=1;MAC={mac}"
    else:
        conf["runtimeConfig"] = {"mac": mac}
    with pytest.raises(PluginError) as info:
        net.add(conf, "ctr", pod, args=args)
    if impl != "reference":  # the reference answers 999 for every invalid MAC
        assert info.value.code == code
        assert mac in info.value.doc["msg"]
    assert net.reservations() == [] and "eth0" not in links(pod)
    net.runtime.exec_plugin(net.plugin_type, "DEL", conf, "ctr", pod, args=args)  # still fine


# -- 3. one IPv4 gateway address per bridge --------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_one_ipv4_gateway_per_bridge(make_net: Callable[[str], Net],
                                     netns: Callable[[str], str], impl: str) -> None:
    """A network whose subnet changed finds the old gateway on the bridge: an error, or with
    forceAddress a replacement, never a second IPv4 address. IPv6 subnets may share it."""
    net = make_net(impl)
    pod_a = netns("p")
    res_a = net.add(net.conf("1.0.0"), "ctr-a", pod_a)
    net.delete(net.conf("1.0.0"), "ctr-a", pod_a, prev=res_a)
    moved = net.conf("1.0.0", ranges=[[{"subnet": "10.78.0.0/24"}]])
    with pytest.raises(PluginError) as info:
        net.add(moved, "ctr-b", netns("p"))
    assert "10.78.0.1" in info.value.doc["msg"]
    if impl != "reference":
        assert info.value.code == 7
    assert addresses(net.host, "cnitest0") == {"10.77.0.1/24"}
    assert net.reservations() == []
    pod_b = netns("p")  # the reference leaves the veth of its failed ADD in the last one
    forced = net.conf("1.0.0", forceAddress=True, ranges=[[{"subnet": "10.79.0.0/24"}]])
    res_b = net.add(forced, "ctr-b", pod_b)
    assert addresses(net.host, "cnitest0") == {"10.79.0.1/24"}
    assert ping(pod_b, "10.79.0.1")
    net.delete(forced, "ctr-b", pod_b, prev=res_b)
    for n, subnet in enumerate(("fd77::/64", "fd78::/64")):
        pod = netns("p")
        v6 = net.conf("1.0.0", forceAddress=True, ranges=[[{"subnet": subnet}]])
        net.delete(v6, f"ctr-6{n}", pod, prev=net.add(v6, f"ctr-6{n}", pod))
    assert {"fd77::1/64", "fd78::1/64", "10.79.0.1/24"} <= addresses(net.host, "cnitest0")


# -- 4. layer 2 only ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ipam", ["missing", "empty"])
def test_layer2_only_network(make_net: Callable[[str], Net], netns: Callable[[str], str],
                             impl: str, ipam: str) -> None:
    """No ``ipam`` (or ``{}``): interfaces on the bridge without addresses; the result has
    the interfaces and no IPs; frames flow between the pods."""
    net = make_net(impl)
    conf = net.conf("1.0.0")
    if ipam == "missing":
        del conf["ipam"]
    else:
        conf["ipam"] = {}
    pod_a, pod_b = netns("p"), netns("p")
    res_a = net.add(conf, "ctr-a", pod_a)
    res_b = net.add(conf, "ctr-b", pod_b)
    assert [i["name"] for i in res_a["interfaces"]][::2] == ["cnitest0", "eth0"]
    assert not res_a.get("ips") and not res_a.get("routes")
    assert addresses(pod_a, "eth0") == set() and "UP" in links(pod_a)["eth0"]["flags"]
    assert addresses(net.host, "cnitest0") == set()
    ns_run(pod_a, "ip", "addr", "add", "192.168.77.1/24", "dev", "eth0")
    ns_run(pod_b, "ip", "addr", "add", "192.168.77.2/24", "dev", "eth0")
    assert ping(pod_a, "192.168.77.2")
    if impl != "reference":  # its CHECK 1.1.1 calls an IPAM plugin even without one
        net.check(conf, res_a, "ctr-a", pod_a)
    for cid, pod, res in (("ctr-a", pod_a, res_a), ("ctr-b", pod_b, res_b)):
        net.delete(conf, cid, pod, prev=res)
        net.delete(conf, cid, pod, prev=res)
        assert "eth0" not in links(pod)
    assert _ports(net) == [] and not net.data_dir.exists()


@pytest.mark.parametrize("impl", OURS)
def test_layer2_only_gc_and_status(make_net: Callable[[str], Net],
                                   netns: Callable[[str], str], impl: str) -> None:
    net = make_net(impl)
    conf = net.conf("1.1.0")
    del conf["ipam"]
    pod = netns("p")
    net.add(conf, "ctr", pod)
    assert net.runtime.exec_plugin(net.plugin_type, "STATUS", conf) is None
    net.runtime.exec_plugin(net.plugin_type, "GC", dict(conf, **{
        "cni.dev/valid-attachments": []}))
    assert _ports(net) == []


# -- 7. config validation like the reference -------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_subnet_with_host_bits_is_rejected(make_net: Callable[[str], Net],
                                           netns: Callable[[str], str], impl: str) -> None:
    net = make_net(impl)
    pod = netns("p")
    conf = net.conf("1.0.0", ranges=[[{"subnet": "10.77.0.7/24"}]])
    with pytest.raises(PluginError) as info:
        net.add(conf, "ctr", pod)
    assert ("Network has host bits set. For a subnet mask of length 24 the network address "
            "is 10.77.0.0") in info.value.doc["msg"]
    if impl != "reference":  # the reference: 999
        assert info.value.code == 7
    assert net.reservations() == []


@pytest.mark.parametrize("impl", OURS)
@pytest.mark.parametrize(("ranges", "wanted"), [
    ([[{"subnet": "10.77.0.300/24"}]], "range subnet '10.77.0.300/24'"),
    ([[{"subnet": "10.77.0.0/24", "rangeStart": "10.77.x"}]], "range rangeStart '10.77.x'"),
    ([[{"subnet": "10.77.0.0/24", "gateway": "nope"}]], "range gateway 'nope'")])
def test_bad_range_message_is_clean(make_net: Callable[[str], Net], netns: Callable[[str], str],
                                    impl: str, ranges: list[Any], wanted: str) -> None:
    net = make_net(impl)
    with pytest.raises(PluginError) as info:
        net.add(net.conf("1.0.0", ranges=ranges), "ctr", netns("p"))
    assert info.value.code == 7
    assert wanted in info.value.doc["msg"] and "{" not in info.value.doc["msg"]


@pytest.mark.parametrize("impl", IMPLS)
def test_long_network_name_and_container_id(make_net: Callable[[str], Net],
                                            netns: Callable[[str], str], impl: str) -> None:
    """A 240-character network name and a 10,000-character container ID work (the host
    veth's alias, limited to 254 bytes by the kernel, is cut), masquerade included."""
    net = make_net(impl)
    net.name = "n" * 240
    pod = netns("p")
    conf = net.conf("1.0.0", ipMasq=impl != "reference")  # its comment is limited too
    cid = "c" * 10_000
    res = net.add(conf, cid, pod)
    alias = links(net.host)[res["interfaces"][1]["name"]].get("ifalias", "")
    if impl != "reference":
        assert alias.startswith(f"svcnet-cni/{net.name}/cc") and len(alias) == 254
    net.check(conf, res, cid, pod)
    assert ping(pod, "10.77.0.1")
    net.delete(conf, cid, pod, prev=res)
    assert net.reservations() == [] and _ports(net) == []


@pytest.mark.parametrize("impl", OURS)
def test_network_name_longer_than_a_file_name(make_net: Callable[[str], Net],
                                              netns: Callable[[str], str], impl: str) -> None:
    net = make_net(impl)
    net.name = "n" * 256  # it names the IPAM directory
    with pytest.raises(PluginError) as info:
        net.add(net.conf("1.0.0"), "ctr", netns("p"))
    assert info.value.code == 7 and "longer than 255" in info.value.doc["msg"]


def test_permission_denied_is_a_spec_code(make_net: Callable[[str], Net],
                                          netns: Callable[[str], str], tmp_path: Path) -> None:
    """Without CAP_NET_ADMIN the kernel refuses: code 5 (I/O failure) saying why, not 999;
    the address taken first is released."""
    require_binary("setpriv")
    net = make_net("svcnet")
    plugin = net.runtime.find("svcnet-cni")
    wrapper = tmp_path / "unprivileged" / "svcnet-cni"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec setpriv --bounding-set -net_admin --inh-caps "
                       f"-net_admin {plugin}\n")
    wrapper.chmod(0o755)
    runtime = Runtime(net.host, str(wrapper.parent))
    with pytest.raises(PluginError) as info:
        runtime.exec_plugin("svcnet-cni", "ADD", net.conf("1.0.0"), "ctr", netns("p"))
    assert info.value.code == 5, info.value.doc
    assert "permission denied" in info.value.doc["msg"]
    assert net.reservations() == []


# -- 8. CNI_NETNS must be a network namespace -------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["file", "directory", "dev-null", "fifo", "mount-ns"])
def test_netns_that_is_not_a_network_namespace(make_net: Callable[[str], Net],
                                               tmp_path: Path, impl: str, kind: str) -> None:
    """Rejected with code 4 before anything is allocated; a FIFO must not hang the plugin."""
    net = make_net(impl)
    path = tmp_path / f"not-a-netns-{kind}"
    if kind == "file":
        path.write_text("")
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "mount-ns":
        path = Path(f"/proc/{os.getpid()}/ns/mnt")
    else:
        path = Path("/dev/null")
    conf = net.conf("1.0.0")
    try:
        with pytest.raises(PluginError) as info:
            net.runtime.exec_plugin(net.plugin_type, "ADD", conf, "ctr", str(path), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ADD with CNI_NETNS a {kind} hangs")
    if impl != "reference":  # the reference: 999 (for a mount namespace, after the bridge)
        assert info.value.code == 4, info.value.doc
        assert f"CNI_NETNS {path} is not a network namespace" in info.value.doc["msg"]
    assert net.reservations() == [] and _ports(net) == []
