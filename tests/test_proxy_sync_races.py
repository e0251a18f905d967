"""Partial syncs whose ``previous`` could differ from what the kernel holds (fake nft, which
answers as the kernel does: ``File exists`` for a map key re-added with another value,
``No such file or directory`` for an absent element)."""

from __future__ import annotations

import json

from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.config import BackendConfig
from svcnet.proxy.fake_nft import FakeNft
from svcnet.proxy.nftables import NftablesBackend
from svcnet.proxy.state import ChangeTracker, NodeConfig

from svcnet.model import EndpointSlice, Service

KEY = json.dumps({"concat": ["10.96.0.10", "tcp", 80]}, sort_keys=True)


class Cluster:
    """Services and slices as an informer cache holds them, a tracker and the backend."""

    def __init__(self) -> None:
        self.fake = FakeNft()
        self.backend = NftablesBackend(self.fake, BackendConfig(families=(4,)))
        self.tracker = ChangeTracker(NodeConfig("n1"))
        self.services: dict[str, Service] = {}
        self.slices: dict[str, list[EndpointSlice]] = {}

    def put(self, name: str, *pods: str) -> None:
        key = f"default/{name}"
        svc = to_service(service(name, "10.96.0.10", port(80)))
        self.services[key] = svc
        self.slices[key] = [to_slice(endpoint_slice(name, *(endpoint(p) for p in pods)))]
        self.tracker.service_changed(None, svc)

    def remove(self, name: str) -> None:
        svc = self.services.pop(f"default/{name}")
        self.slices.pop(f"default/{name}")
        self.tracker.service_changed(svc, None)

    def sync(self, *, full: bool) -> None:
        changes = self.tracker.drain(self.services.get, lambda k: self.slices.get(k, []),
                                     lambda: list(self.services))
        self.backend.sync(changes, full=full)

    def verdict(self, map_name: str) -> object:
        elems = self.fake.tables["ip", "svcnet"].sets[map_name].elems
        return elems[KEY][1] if KEY in elems else None


def test_second_service_on_a_taken_frontend_changes_nothing_the_first_owns() -> None:
    """Two Services with one ClusterIP and port (an API server refuses it; a store may hold
    it): the full sync writes the first one only, so a partial sync of the other must not
    diff against a rendering the kernel never got."""
    c = Cluster()
    c.put("a", "10.1.0.1", "10.1.0.2")
    c.sync(full=True)
    owned = c.verdict("service-ips")
    assert owned == {"goto": {"target": "lb-2"}}
    c.put("b", "10.1.0.3")  # before the fix: File exists (service-ips key of "a")
    c.sync(full=False)
    assert c.verdict("service-ips") == owned
    c.put("b", "10.1.0.3", "10.1.0.4", "10.1.0.5")
    c.sync(full=False)
    assert c.verdict("service-ips") == owned
    c.put("b")  # no endpoints: before the fix, deleted the key of "a"
    c.sync(full=False)
    assert c.verdict("service-ips") == owned
    c.remove("b")
    c.sync(full=False)
    assert c.verdict("service-ips") == owned
    c.put("a", "10.1.0.1")
    c.sync(full=False)
    assert c.verdict("service-ips") == {"goto": {"target": "lb-1"}}


def test_frontend_handed_over_when_its_owner_goes() -> None:
    c = Cluster()
    c.put("a", "10.1.0.1", "10.1.0.2")
    c.put("b", "10.1.0.3")
    c.sync(full=True)
    first = c.verdict("service-ips")
    c.remove("a" if first == {"goto": {"target": "lb-2"}} else "b")
    c.sync(full=False)  # before the fix: the survivor's element was never written
    assert c.verdict("service-ips") is not None
    assert c.verdict("service-ips") != first
