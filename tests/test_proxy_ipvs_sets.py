"""IPVS mode's ipsets are sized for what they hold, on the real ipset of this host.

The loop-back set holds one member per endpoint: 100,000 at 10k services x 10, past ipset's
default ``maxelem`` of 65536 ("Hash is full, cannot add more elements"). The host kernel has
no IP_VS, but ipset, iptables and the dummy link work in a namespace: the backend runs for
real against them with the IPVS table faked (tests/test_proxy_ipvs.py covers IPVS in the VM).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import pytest
from conftest import ns_sh, require_binary
from svcnet.proxy.commands import SubprocessCommands
from svcnet.proxy.config import BackendConfig, LocalDetector
from svcnet.proxy.ipvs import LINK, SET_CLUSTER_IP, SET_LOOP_BACK, IpvsBackend, set_size
from svcnet.proxy.ipvs_kernel import FakeIpvs
from svcnet.proxy.state import (
    Backend,
    Change,
    Changes,
    Frontend,
    FrontendKind,
    PortKey,
    ServicePortState,
)

ENDPOINTS = 10
CLUSTER_BASE = ipaddress.IPv4Address("10.96.0.0")
POD_BASE = ipaddress.IPv4Address("10.128.0.0")


def port_state(i: int) -> ServicePortState:
    """Service i: one TCP port, ClusterIP 10.96.x.y, 10 endpoints of its own."""
    key = PortKey("default", f"s{i}", "", "TCP", 4)
    backends = tuple(Backend(str(POD_BASE + i * ENDPOINTS + j), 8080)
                     for j in range(ENDPOINTS))
    return ServicePortState(key, 80, (Frontend(str(CLUSTER_BASE + i), 80,
                                                FrontendKind.CLUSTER_IP),),
                            cluster_endpoints=backends, has_endpoints=True)


def changes(services: range, before: dict[PortKey, ServicePortState]) -> Changes:
    new = {sp.key: sp for sp in map(port_state, services)}
    return Changes({k: Change(None, sp) for k, sp in new.items()}, {**before, **new})


def entries(ns: str, name: str) -> tuple[int, int]:
    """(members, maxelem) of a set in the kernel."""
    out = ns_sh(ns, "ipset", "list", "-t", name).stdout
    count = re.search(r"Number of entries: (\d+)", out)
    maxelem = re.search(r"maxelem (\d+)", out)
    assert count and maxelem, out
    return int(count.group(1)), int(maxelem.group(1))


def backend_in(ns: str) -> IpvsBackend:
    # The backend makes its link a dummy one; where the kernel has no dummy driver (this
    # host), a bridge of the same name stands in: the backend only puts addresses on it.
    if ns_sh(ns, "ip", "link", "add", LINK, "type", "dummy", check=False).returncode != 0:
        ns_sh(ns, "ip", "link", "add", LINK, "type", "bridge")
    ns_sh(ns, "ip", "link", "set", LINK, "up")
    config = BackendConfig(families=(4,),
                           detect_local=LocalDetector("ClusterCIDR", ("10.128.0.0/9",)))
    return IpvsBackend(FakeIpvs(), SubprocessCommands(ns, timeout=300), config)


def test_set_size() -> None:
    assert set_size(0) == (1024, 65536)           # ipset's defaults, as kube-proxy's sets
    assert set_size(30_000) == (32768, 65536)
    assert set_size(32_769) == (65536, 131072)
    assert set_size(100_000) == (131072, 262144)  # the loop-back set at 10k x 10


@pytest.mark.kernel
def test_ten_thousand_services_load_into_real_ipsets(netns: Callable[[str], str]) -> None:
    require_binary("ipset", "iptables-restore")
    ns = netns("node")
    backend = backend_in(ns)
    full = changes(range(10_000), {})
    backend.sync(full, full=True)
    assert entries(ns, SET_LOOP_BACK)[0] == 10_000 * ENDPOINTS
    assert entries(ns, SET_CLUSTER_IP)[0] == 10_000
    # the iptables rules that match the sets are in place, and the set is the one in use
    assert f"--match-set {SET_LOOP_BACK} dst,dst,src" in ns_sh(
        ns, "iptables-save", "-t", "nat").stdout


@pytest.mark.kernel
def test_a_partial_sync_grows_a_full_set(netns: Callable[[str], str]) -> None:
    """1000 services, then 6000 more in one partial sync: 70k loop-back members outgrow the
    65536 the set was made with; a bigger set is swapped in."""
    require_binary("ipset", "iptables-restore")
    ns = netns("node")
    backend = backend_in(ns)
    first = changes(range(1000), {})
    backend.sync(first, full=True)
    assert entries(ns, SET_LOOP_BACK) == (10_000, 65536)
    backend.sync(changes(range(1000, 7000), dict(first.state)), full=False)
    count, maxelem = entries(ns, SET_LOOP_BACK)
    assert count == 70_000 and maxelem >= 131072
    # small partial syncs after it add members in place
    grown = changes(range(7000, 7001), {})
    backend.sync(grown, full=False)
    assert entries(ns, SET_LOOP_BACK)[0] == 70_010
