"""Stale UDP conntrack cleanup survives entries that vanish between its dump and its delete.

Real kernel: three UDP clients (three source ports) are NATed to one endpoint, the endpoint
goes away, and while the cleanup runs one of their entries disappears on its own (here:
``conntrack -D`` right after the dump, as a timeout or another cleaner would). The other two
must still be deleted, so those clients fail over at once.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ns_sh, require_binary
from svcnet.proxy.builders import endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.conntrack import NetlinkConntrack, stale_flows
from svcnet.proxy.state import ChangeTracker, NodeConfig
from test_proxy_flows import (
    BY_IP,
    NODE_NAME,
    P1,
    P2,
    UDP_PINNED,
    Lab,
    build_lab,
    here,
    make_backend,
)

pytestmark = [pytest.mark.kernel]

PORTS = (40001, 40002, 40003)


@pytest.fixture
def lab(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Lab]:
    yield from build_lab(netns, tmp_path)


def test_cleanup_goes_on_when_an_entry_vanished_since_the_dump(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    require_binary("conntrack")
    from pyroute2.conntrack import Conntrack

    (lab.dir / "udp.py").write_text(UDP_PINNED)
    backend = make_backend("nftables", lab.node)
    svc = to_service(service("dns", "10.96.0.53", port(53, "", "UDP")))
    tracker = ChangeTracker(NodeConfig(NODE_NAME))
    first = [to_slice(endpoint_slice("dns", here(P1), ports=[("", 8080, "UDP")]))]
    tracker.service_changed(None, svc)
    backend.sync(tracker.drain(lambda k: svc, lambda k: first, lambda: ["default/dns"]),
                 full=True)

    def ask(sport: int) -> list[str]:
        return ns_sh(lab.ns["cpod"], sys.executable, str(lab.dir / "udp.py"), "10.96.0.53",
                     "53", str(sport), "2").stdout.split()

    assert all(ask(p) == ["pod1", "pod1"] for p in PORTS)
    moved = [to_slice(endpoint_slice("dns", here(P2), ports=[("", 8080, "UDP")]))]
    tracker.slice_changed(None, moved[0])
    changes = tracker.drain(lambda k: svc, lambda k: moved)
    backend.sync(changes, full=False)
    assert ask(PORTS[0]) == ["pod1", "pod1"]  # old NAT entries still steer these flows

    real_dump = Conntrack.dump_entries

    def dump_then_vanish(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        entries = list(real_dump(self, *args, **kwargs))
        subprocess.run(["ip", "netns", "exec", lab.node, "conntrack", "-D", "-p", "udp",
                        "--orig-port-src", str(PORTS[0])], capture_output=True, check=True)
        return iter(entries)

    monkeypatch.setattr(Conntrack, "dump_entries", dump_then_vanish)
    deleted = NetlinkConntrack(lab.node).delete(stale_flows(changes))
    assert deleted == len(PORTS) - 1
    assert all(ask(p) == [BY_IP[P2]] * 2 for p in PORTS)
