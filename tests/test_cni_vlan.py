"""The bridge ``vlan`` option, in a kernel with bridge VLAN filtering (this host's has none).

Runs inside the VM (``tests/test_vm_suites.py``), against svcnet-cni and the reference bridge
plugin alike: pods in one VLAN reach each other, a pod in another VLAN on the same bridge
and subnet does not, and each pod's bridge port carries its VLAN as PVID, untagged.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from test_cni_conformance import Net, make_net, pod_ip  # noqa: F401  (make_net: fixture)
from test_cni_helpers import ns_run, ping, svcnet_bin  # noqa: F401  (svcnet_bin: fixture)

pytestmark = [pytest.mark.vm, pytest.mark.kernel]


def _pvids(host: str) -> dict[str, set[int]]:
    ports = json.loads(ns_run(host, "bridge", "-j", "vlan", "show").stdout or "[]")
    return {p["ifname"]: {v["vlan"] for v in p.get("vlans", [])
                          if "PVID" in v.get("flags", []) and "Egress Untagged" in v.get(
                              "flags", [])}
            for p in ports}


@pytest.mark.parametrize("impl", ["svcnet", "reference"])
def test_vlan_isolates_pods_on_one_bridge(make_net: Callable[[str], Net],  # noqa: F811
                                          netns: Callable[[str], str], impl: str) -> None:
    net = make_net(impl)
    a, b, c = netns("va"), netns("vb"), netns("vc")
    in_100, in_200 = net.conf("1.0.0", vlan=100), net.conf("1.0.0", vlan=200)
    res_a = net.add(in_100, "ctr-a", a)
    res_b = net.add(in_100, "ctr-b", b)
    res_c = net.add(in_200, "ctr-c", c)
    pvids = _pvids(net.host)
    for res, vid in ((res_a, 100), (res_b, 100), (res_c, 200)):
        assert pvids.get(res["interfaces"][1]["name"]) == {vid}, pvids
    assert any(ping(a, pod_ip(res_b)) for _ in range(3))
    assert not ping(a, pod_ip(res_c)), "a pod in VLAN 200 must not be reachable from VLAN 100"
    for conf, cid, pod, res in ((in_100, "ctr-a", a, res_a), (in_100, "ctr-b", b, res_b),
                                (in_200, "ctr-c", c, res_c)):
        net.delete(conf, cid, pod, prev=res)
    assert net.reservations() == []
    left = _pvids(net.host)
    assert not any(res["interfaces"][1]["name"] in left for res in (res_a, res_b, res_c))
