"""The one diff engine (``proxy/rules.py``): its parts, and the property that matters --
for every backend, any sequence of partial syncs leaves the (fake) kernel exactly as one
full sync of the final state would."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.fake_iptables import FakeIptables, FakeNodeTools
from svcnet.proxy.fake_nft import FakeNft
from svcnet.proxy.iptables import IptablesBackend, iptables_items
from svcnet.proxy.ipvs import IpvsBackend
from svcnet.proxy.ipvs_kernel import FakeIpvs
from svcnet.proxy.nft_model import nft_items
from svcnet.proxy.nftables import NftablesBackend
from svcnet.proxy.rules import Shared, diff, diff_lines
from svcnet.proxy.state import ChangeTracker, NodeConfig

NODE_IP = "192.168.1.1"
DETECT = LocalDetector("ClusterCIDR", ("10.1.0.0/16",))


def test_diff_puts_a_changed_key_in_both() -> None:
    delta = diff({"a": 1, "b": 2, "c": 3}, {"b": 2, "c": 4, "d": 5})
    assert delta.removed == {"a": 1, "c": 3}
    assert delta.added == {"c": 4, "d": 5}
    assert not diff({"a": 1}, {"a": 1})


def test_diff_lines_keeps_order() -> None:
    assert diff_lines(["x", "y", "z"], ["z", "w", "x"]) == (["y"], ["w"])


def test_shared_objects_are_written_by_the_first_holder_and_removed_by_the_last() -> None:
    shared: Shared[str] = Shared()
    assert shared.change([], ["10.1.0.1"]) == (set(), {"10.1.0.1"})
    assert shared.change([], ["10.1.0.1", "10.1.0.2"]) == (set(), {"10.1.0.2"})
    assert shared.change(["10.1.0.1"], []) == (set(), set())  # one holder left
    assert shared.change(["10.1.0.1", "10.1.0.2"], ["10.1.0.2"]) == ({"10.1.0.1"}, set())
    shared.reset(["a", "a", "b"])
    assert sorted(shared) == ["a", "b"] and len(shared) == 2 and "a" in shared


# --- partial syncs == one full sync, on every backend -------------------------------------

PODS = [f"10.1.0.{i}" for i in range(11, 16)]


@st.composite
def cluster(draw: st.DrawFn) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Up to five services of random shape, endpoints on this node or another."""
    out = {}
    for i in range(5):
        if not draw(st.booleans()):
            continue
        name = f"s{i}"
        spec: dict[str, Any] = {}
        kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
        if kind != "ClusterIP" and draw(st.booleans()):
            spec["externalTrafficPolicy"] = "Local"
        if draw(st.integers(0, 3)) == 0:
            spec["sessionAffinity"] = "ClientIP"
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 30}}
        if kind == "LoadBalancer":
            spec["lb_ips"] = [f"203.0.113.{i + 1}"]
        node_port = 30080 + i if kind != "ClusterIP" else 0
        svc = service(name, f"10.96.0.{i + 1}", port(80, node_port=node_port), type=kind,
                      **spec)
        pods = draw(st.lists(st.sampled_from(PODS), unique=True, max_size=4))
        eps = [endpoint(ip, node=draw(st.sampled_from(["n1", "n2"]))) for ip in pods]
        out[f"default/{name}"] = (svc, endpoint_slice(name, *eps))
    return out


def sync_through(backend: Any, states: list[dict[str, Any]]) -> None:
    """The first state as a full sync, every later one as a partial sync."""
    tracker = ChangeTracker(NodeConfig("n1", nodeport_addresses=(NODE_IP,)))
    services: dict[str, Any] = {}
    slices: dict[str, list[Any]] = {}
    for i, state in enumerate(states):
        for key in services.keys() - state.keys():
            tracker.service_changed(services.pop(key), None)
            slices.pop(key)
        for key, (svc, sl) in state.items():
            old, new = services.get(key), to_service(svc)
            services[key] = new
            slices[key] = [to_slice(sl)]
            tracker.service_changed(old, new)
        backend.sync(tracker.drain(services.get, lambda k: slices.get(k, []),
                                   lambda: list(services)), full=i == 0)


def kernel_of(kind: str, states: list[dict[str, Any]]) -> Any:
    config = BackendConfig(families=(4,), detect_local=DETECT)
    if kind == "nftables":
        nft = FakeNft()
        sync_through(NftablesBackend(nft, config), states)
        return nft_items(json.loads(nft.run(["nft", "-j", "list", "ruleset"])))
    if kind == "iptables":
        ipt = FakeIptables()
        sync_through(IptablesBackend(ipt, config, legacy=False,
                                     node_addresses={4: (NODE_IP,)}), states)
        return iptables_items(ipt.save(4), 4)
    table, tools = FakeIpvs(), FakeNodeTools()
    backend = IpvsBackend(table, tools, config, grace_period=0)
    sync_through(backend, states)
    return ({vs: (options, table.dests(vs)) for vs, options in table.services().items()},
            tools.ipset.members(), sorted(backend._addresses), backend.rules_total())


@pytest.mark.parametrize("kind", ["nftables", "iptables", "ipvs"])
@settings(max_examples=30, deadline=None)
@given(states=st.lists(cluster(), min_size=2, max_size=4))
def test_partial_syncs_leave_what_a_full_sync_makes(kind: str,
                                                    states: list[dict[str, Any]]) -> None:
    assert kernel_of(kind, states) == kernel_of(kind, states[-1:])
