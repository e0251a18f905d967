"""Partial syncs whose ``previous`` could differ from what the kernel holds (fake nft, which
answers as the kernel does: ``File exists`` for a map key re-added with another value,
``No such file or directory`` for an absent element)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest
from conftest import require_binary
from svcnet.proxy.builders import endpoint, endpoint_slice, port, service, to_service, to_slice
from svcnet.proxy.commands import CommandFailed, Commands, SubprocessCommands
from svcnet.proxy.config import BackendConfig
from svcnet.proxy.fake_nft import FakeNft
from svcnet.proxy.nft_model import nft_items, to_dump
from svcnet.proxy.nftables import NftablesBackend
from svcnet.proxy.proxier import Proxier, SyncSettings
from svcnet.proxy.state import ChangeTracker, NodeConfig, ServicePortState

from svcnet.model import EndpointSlice, Service

KEY = json.dumps({"concat": ["10.96.0.10", "tcp", 80]}, sort_keys=True)


class Cluster:
    """Services and slices as an informer cache holds them, a tracker and the backend."""

    def __init__(self, nft: Commands) -> None:
        self.backend = NftablesBackend(nft, BackendConfig(families=(4,)))
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
        """What ``map_name`` maps 10.96.0.10 . tcp . 80 to, as ``nft -j`` prints it."""
        items: list[dict[str, Any]] = self.backend.dump()["nftables"]  # type: ignore[assignment]
        for item in items:
            body = item.get("map", {})
            if body.get("name") == map_name:
                for key, value in body.get("elem", []):
                    if json.dumps(key, sort_keys=True) == KEY:
                        return value
        return None


@pytest.fixture(params=["fake", "kernel"])
def nft(request: pytest.FixtureRequest) -> Commands:
    """The stateful fake, and the real ``nft`` in a throwaway namespace."""
    if request.param == "fake":
        return FakeNft()
    require_binary("nft")
    netns: Callable[[str], str] = request.getfixturevalue("netns")
    return SubprocessCommands(netns("races"))


def test_second_service_on_a_taken_frontend_changes_nothing_the_first_owns(
        nft: Commands) -> None:
    """Two Services with one ClusterIP and port (an API server refuses it; a store may hold
    it): the full sync writes the first one only, so a partial sync of the other must not
    diff against a rendering the kernel never got."""
    c = Cluster(nft)
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


def test_frontend_handed_over_when_its_owner_goes(nft: Commands) -> None:
    c = Cluster(nft)
    c.put("a", "10.1.0.1", "10.1.0.2")
    c.put("b", "10.1.0.3")
    c.sync(full=True)
    first = c.verdict("service-ips")
    c.remove("a" if first == {"goto": {"target": "lb-2"}} else "b")
    c.sync(full=False)  # before the fix: the survivor's element was never written
    assert c.verdict("service-ips") is not None
    assert c.verdict("service-ips") != first


class FlakyNft(FakeNft):
    """Fails the next ``nft -f`` once: before applying it, or after (the tool's answer
    lost, the kernel changed)."""

    fail_before = False
    fail_after = False

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        if argv[1:2] != ["-f"]:
            return super().run(argv, input=input, check=check)
        if self.fail_before:
            self.fail_before = False
            raise CommandFailed(argv, 1, "injected before applying")
        out = super().run(argv, input=input, check=check)
        if self.fail_after:
            self.fail_after = False
            raise CommandFailed(argv, 1, "injected after applying")
        return out


def kernel_items(fake: FakeNft) -> list[str]:
    return sorted(nft_items(to_dump(fake.tables.values())))


async def interleave(seed: int, steps: int = 40) -> None:
    """Random informer events (also while a full sync streams the model into nft), forced
    full syncs and failed ones, driven through ``Proxier.sync_once`` in a fixed order;
    after every sync that succeeded the table is what a full sync of the tracker's state
    writes (what every later partial sync assumes)."""
    rng = random.Random(seed)
    fake = FlakyNft()
    backend = NftablesBackend(fake, BackendConfig(families=(4,)))
    proxier = Proxier(backend, NodeConfig("n1"),
                      settings=SyncSettings(min_sync_period=0, full_sync_period=1e9))
    services: dict[str, Service] = {}
    slices: dict[str, list[EndpointSlice]] = {}
    proxier._services = services.get
    proxier._slices = lambda key: list(slices.get(key, []))
    proxier._service_keys = lambda: list(services)

    def event() -> None:
        i = rng.randrange(4)
        key = f"default/s{i}"
        roll = rng.random()
        if roll < 0.2 and key in services:
            proxier.on_service(services.pop(key), None)
            slices.pop(key, None)
        elif key not in services or roll < 0.35:
            ports = [port(80, name="a"), port(443, name="b")] if rng.random() < 0.3 else [
                port(80)]
            svc = to_service(service(f"s{i}", f"10.96.0.{i}", *ports))
            proxier.on_service(services.get(key), svc)
            services[key] = svc
        else:
            eps = [endpoint(f"10.1.{i}.{j}") for j in range(rng.randrange(5))]
            new = to_slice(endpoint_slice(f"s{i}", *eps)) if eps else None
            old = (slices.get(key) or [None])[0]
            slices[key] = [new] if new else []
            if old or new:
                proxier.on_slice(old, new)

    full_sync = backend.sync_full

    def streamed(ports: Iterable[ServicePortState]) -> None:
        def with_events() -> Iterator[ServicePortState]:
            for sp in ports:
                if rng.random() < 0.3:
                    event()  # the informer's thread is the test's: the order is fixed
                yield sp
        full_sync(with_events())

    backend.sync_full = streamed  # type: ignore[method-assign]
    for step in range(steps):
        for _ in range(rng.randrange(3)):
            event()
        if rng.random() < 0.15:
            proxier.request_full_sync()
        fake.fail_before = rng.random() < 0.1
        fake.fail_after = not fake.fail_before and rng.random() < 0.1
        if await proxier.sync_once():
            ref = FakeNft()
            NftablesBackend(ref, BackendConfig(families=(4,))).sync_full(
                sorted(proxier.tracker.state.values(), key=lambda sp: sp.key))
            assert kernel_items(fake) == kernel_items(ref), f"seed {seed} step {step}"


@pytest.mark.parametrize("seed", range(8))
def test_kernel_holds_the_trackers_state_after_every_sync(
        seed: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="svcnet.proxy.proxier")
    asyncio.run(interleave(seed))
