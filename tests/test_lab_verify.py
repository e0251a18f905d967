"""The check behind ``svcnet lab verify`` / ``svcnet proxy check``: kernel rules against the
desired state recomputed from the store (proxy/desired_check.py).

Pure parts first (comparison, what is configuration), then the real thing: rules programmed
into a throwaway namespace through a history of full and partial syncs must match a fresh
full render from the store; a store change not yet applied, and a hand edit of the kernel,
must both show. The lab-wide command runs in tests/test_lab_e2e.py after every fault.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ns_sh, require_binary
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service
from svcnet.proxy.commands import SubprocessCommands
from svcnet.proxy.daemon import ProxyOptions, add_node_arguments, build_backend
from svcnet.proxy.desired_check import check, compare, desired_changes
from svcnet.proxy.drift import nft_items
from svcnet.proxy.state import ChangeTracker, NodeConfig

from svcnet.model import ENDPOINT_SLICE, SERVICE
from svcnet.store.memory import MemoryStore

NODE_IP = "10.9.0.1"


def test_compare_reports_missing_and_extra_but_not_one_sided_lb_chains() -> None:
    desired = frozenset({"ip chain lb-1", "ip rule lb-1 [1]", "ip element service-ips a",
                         "ip element backends x"})
    actual = frozenset({"ip chain lb-1", "ip rule lb-1 [1]", "ip chain lb-70",
                        "ip rule lb-70 [70]", "ip chain lbl-3", "ip element service-ips a",
                        "ip element backends y"})
    report = compare(desired, actual)
    assert report["missing"] == ["ip element backends x"]
    assert report["extra"] == ["ip element backends y"]
    assert report["spare_lb_chains"] == 2 and report["in_sync"] is False
    assert compare(desired, desired)["in_sync"] is True
    # A chain both sides have must hold the same rule.
    changed = (actual - {"ip rule lb-1 [1]"}) | {"ip rule lb-1 [2]"}
    assert "ip rule lb-1 [2]" in compare(desired, changed)["extra"]


def test_members_of_timeout_sets_are_traffic_not_configuration() -> None:
    dump: dict[str, Any] = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"set": {"family": "ip", "name": "aff-X", "table": "svcnet", "flags": ["timeout"],
                 "elem": [{"elem": {"val": "10.0.0.1", "expires": 100}}]}},
        {"set": {"family": "ip", "name": "cluster-ips", "table": "svcnet",
                 "elem": ["10.96.0.1"]}},
    ]}
    assert nft_items(dump) == {"ip set aff-X", "ip set cluster-ips",
                               'ip element cluster-ips "10.96.0.1"'}


async def _store_with_web(ready: int, extra_service: bool = False) -> MemoryStore:
    store = MemoryStore()
    await store.put(SERVICE, service("web", "10.96.0.50", port(80, "http", target=8080),
                                     port(53, "dns", "UDP", target=5353, node_port=30053),
                                     type="NodePort"))
    await store.put(SERVICE, service("sticky", "10.96.0.51", port(80, target=8080),
                                     sessionAffinity="ClientIP"))
    eps = [endpoint(f"10.244.1.{i}", node="n1" if i % 2 else "n2") for i in range(1, ready + 1)]
    await store.put(ENDPOINT_SLICE, endpoint_slice(
        "web", *eps, ports=[("http", 8080, "TCP"), ("dns", 5353, "UDP")]))
    await store.put(ENDPOINT_SLICE, endpoint_slice("sticky", *eps[:2], name="sticky-1"))
    await store.put(ENDPOINT_SLICE, endpoint_slice(
        "web", endpoint("10.244.9.9"), name="other-ns", namespace="other"))
    if extra_service:
        await store.put(SERVICE, service("late", "10.96.0.52", port(80, target=8080)))
    return store


def test_desired_changes_come_from_one_list_of_the_store() -> None:
    async def run() -> Any:
        return await desired_changes(await _store_with_web(3), NodeConfig("n1", "", (NODE_IP,)))

    changes = asyncio.run(run())
    by_name = {str(k): v for k, v in changes.state.items()}
    assert sorted(by_name) == ["default/sticky/tcp/v4", "default/web:dns/udp/v4",
                               "default/web:http/tcp/v4"]
    web = by_name["default/web:dns/udp/v4"]
    assert [b.ip for b in web.cluster_endpoints] == ["10.244.1.1", "10.244.1.2", "10.244.1.3"]
    assert {fe.ip for fe in web.frontends} == {"10.96.0.50", NODE_IP}
    assert all(c.previous is None for c in changes.changed.values())


def _options(ns: str, mode: str) -> ProxyOptions:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return ProxyOptions.from_args(parser.parse_args([
        "--proxy-mode", mode, "--proxy-netns", ns, "--proxy-node-name", "n1",
        "--proxy-ip-families", "4", "--proxy-cluster-cidr", "10.244.0.0/16",
        "--proxy-nodeport-addresses", "10.9.0.0/24", "--proxy-iptables-variant", "nft"]))


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_check_matches_a_synced_node_and_sees_what_it_missed(
        netns: Callable[[str], str], mode: str) -> None:
    require_binary("nft", "iptables-nft-restore", "unshare")
    ns = netns("dchk")
    ns_sh(ns, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    ns_sh(ns, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "up0")
    ns_sh(ns, "ip", "link", "set", "up0", "up")
    opts = _options(ns, mode)
    commands = SubprocessCommands(ns)
    node = NodeConfig("n1", "", (NODE_IP,))
    backend = build_backend(opts, commands)
    if hasattr(backend, "set_node_addresses"):
        backend.set_node_addresses({4: (NODE_IP,), 6: ()})

    tracker = ChangeTracker(node)
    seen: dict[str, Any] = {}

    async def apply(store: MemoryStore, full: bool) -> None:
        """What the daemon does with watch events: feed the differences to one tracker,
        drain, sync (partial syncs depend on the tracker's previous state)."""
        now = {f"{kind.name}/{raw.key}": kind.decode(raw.data)
               for kind in (SERVICE, ENDPOINT_SLICE) for raw in (await store.list(kind)).items}
        for key in seen.keys() | now.keys():
            old, new = seen.get(key), now.get(key)
            if old != new:
                if key.startswith("Service/"):
                    tracker.service_changed(old, new)
                else:
                    tracker.slice_changed(old, new)
        seen.clear()
        seen.update(now)
        services = {k.removeprefix("Service/"): v for k, v in now.items()
                    if k.startswith("Service/")}
        slices: dict[str, list[Any]] = {}
        for k, v in now.items():
            if k.startswith("EndpointSlice/"):
                slices.setdefault(f"{v.metadata.namespace}/{v.service_name}", []).append(v)
        backend.sync(tracker.drain(services.get, lambda key: slices.get(key, []),
                                   lambda: list(services)), full=full)

    async def run() -> list[dict[str, Any]]:
        # History the kernel went through: a full sync with 40 endpoints, then a partial
        # one down to 3 (the nftables backend keeps its spare lb chains).
        await apply(await _store_with_web(40), full=True)
        store = await _store_with_web(3)
        await apply(store, full=False)
        synced = await check(opts, store)
        # The store moves on without the node: a Service the kernel does not have.
        lagging = await check(opts, await _store_with_web(3, extra_service=True))
        return [synced, lagging]

    synced, lagging = asyncio.run(run())
    assert synced["in_sync"] is True, synced
    assert synced["service_ports"] == 3 and synced["mode"] == mode
    if mode == "nftables":
        assert synced["spare_lb_chains"] > 0
    assert lagging["in_sync"] is False and not lagging["extra"]
    assert any("10.96.0.52" in item for item in lagging["missing"]), lagging["missing"]

    # A hand edit of the kernel shows as well.
    if mode == "nftables":
        ns_sh(ns, "nft", "delete", "element", "ip", "svcnet", "cluster-ips",
              "{ 10.96.0.50 . tcp . 80 }")
    else:
        ns_sh(ns, "iptables-nft", "-t", "nat", "-F", "KUBE-SERVICES")
    edited = asyncio.run(_check_once(opts, 3))
    assert edited["in_sync"] is False and edited["missing"] and not edited["extra"], edited


async def _check_once(opts: ProxyOptions, ready: int) -> dict[str, Any]:
    return await check(opts, await _store_with_web(ready))
