"""Subnet leases: which node owns which pod subnet, and how to reach its VTEP.

``SubnetManager`` is the seam between the overlay and where leases live, as in Flannel's
``pkg/subnet``:

- ``EtcdSubnetManager`` allocates from the network config with TTL'd etcd leases, in
  Flannel's layout (``<prefix>/config``, ``<prefix>/subnets/<ip>-<len>`` holding
  ``{"PublicIP", "BackendType", "BackendData": {"VNI", "VtepMAC"}}``);
- ``KubeSubnetManager`` takes the subnet from ``node.spec.podCIDRs`` and publishes the VTEP
  data as Node annotations (Flannel's ``flannel.alpha.coreos.com/*`` keys) through any Store;
- ``MemorySubnetManager`` shares one in-process registry, for unit tests and single-process
  labs.

Every implementation reports the lease set as whole snapshots: the reconciler never has to
replay a history of adds and deletes, and a snapshot after a relist is just another snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from svcnet.cni.overlay.config import (
    ConfigError,
    FamilyConfig,
    IPNetwork,
    NetworkConfig,
    parse_network_config,
)

if TYPE_CHECKING:
    from svcnet.store.base import Store
    from svcnet.store.etcd import EtcdClient

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "flannel.alpha.coreos.com/"


class LeaseError(Exception):
    """Base of lease failures."""


class OutOfSubnets(LeaseError):
    """Every subnet of the pool is leased by another node."""


class LeaseLost(LeaseError):
    """Our lease expired or was deleted behind our back; acquire again."""


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """What a node publishes about itself so peers can reach its pods."""

    public_ip: str = ""
    public_ip6: str = ""
    backend_type: str = "vxlan"
    vni: int = 1
    vtep_mac: str = ""
    vtep_mac6: str = ""
    node_name: str = ""


@dataclass(frozen=True, slots=True)
class Lease:
    subnet: ipaddress.IPv4Network | None
    subnet6: ipaddress.IPv6Network | None
    attrs: LeaseAttrs
    lease_id: int = 0
    """The etcd lease the key is attached to; 0 for stores without TTLs."""

    @property
    def key(self) -> str:
        primary = self.subnet or self.subnet6
        assert primary is not None
        return f"{primary.network_address}-{primary.prefixlen}"

    @property
    def subnets(self) -> tuple[IPNetwork, ...]:
        return tuple(s for s in (self.subnet, self.subnet6) if s is not None)

    def to_json(self) -> bytes:
        a = self.attrs
        doc: dict[str, Any] = {"PublicIP": a.public_ip or None, "BackendType": a.backend_type}
        if a.backend_type == "vxlan":
            doc["BackendData"] = {"VNI": a.vni, "VtepMAC": a.vtep_mac}
        if self.subnet6 is not None:
            doc["PublicIPv6"] = a.public_ip6 or None
            doc["IPv6Subnet"] = str(self.subnet6)
            if a.backend_type == "vxlan":
                doc["BackendV6Data"] = {"VNI": a.vni, "VtepMAC": a.vtep_mac6}
        if a.node_name:
            doc["NodeName"] = a.node_name
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_etcd(cls, key: str, value: bytes, lease_id: int = 0) -> Lease:
        """Decode ``<ip>-<len>`` and Flannel's lease JSON; raises ``ValueError`` if malformed."""
        ip, _, plen = key.rpartition("-")
        primary = ipaddress.ip_network(f"{ip}/{plen}")
        doc = json.loads(value)
        if not isinstance(doc, dict):
            raise ValueError("lease value is not an object")
        data = doc.get("BackendData") or {}
        data6 = doc.get("BackendV6Data") or {}
        subnet6: ipaddress.IPv6Network | None = None
        if isinstance(primary, ipaddress.IPv6Network):
            subnet6, subnet = primary, None
        else:
            subnet = primary
            if doc.get("IPv6Subnet"):
                subnet6 = ipaddress.IPv6Network(doc["IPv6Subnet"])
        attrs = LeaseAttrs(
            public_ip=doc.get("PublicIP") or "", public_ip6=doc.get("PublicIPv6") or "",
            backend_type=str(doc.get("BackendType") or "vxlan"),
            vni=int(data.get("VNI") or data6.get("VNI") or 1),
            vtep_mac=str(data.get("VtepMAC") or ""), vtep_mac6=str(data6.get("VtepMAC") or ""),
            node_name=str(doc.get("NodeName") or ""),
        )
        return cls(subnet=subnet, subnet6=subnet6, attrs=attrs, lease_id=lease_id)


Snapshot = tuple[Lease, ...]


class SubnetManager(Protocol):
    async def network_config(self) -> NetworkConfig:
        """The cluster network; raises ``ConfigError`` when there is none."""
        ...

    async def acquire(self, config: NetworkConfig, attrs: LeaseAttrs,
                      previous: tuple[IPNetwork, ...] = ()) -> Lease:
        """Lease a subnet per family, preferring ``previous`` (our subnets before a restart)."""
        ...

    async def renew(self, lease: Lease) -> Lease:
        """Keep the lease alive; raises ``LeaseLost`` if it is gone."""
        ...

    def watch(self) -> AsyncIterator[Snapshot]:
        """The complete lease set now and after every change (our own lease included)."""
        ...

    async def release(self, lease: Lease) -> None: ...

    async def close(self) -> None: ...

    @property
    def renew_interval(self) -> float:
        """Seconds between ``renew`` calls; 0 means leases need no renewal."""
        ...


def choose_subnet(family: FamilyConfig, taken: set[IPNetwork], previous: Iterable[IPNetwork],
                  rng: random.Random | None = None) -> IPNetwork:
    """Our previous subnet if it is still free, otherwise a random free one.

    Random rather than lowest-free, like Flannel, so that nodes starting together rarely race
    for the same key.
    """
    for prev in previous:
        if family.contains(prev) and prev not in taken:
            return prev
    free = family.count - sum(1 for t in taken if family.contains(t))
    if free <= 0:
        raise OutOfSubnets(
            f"out of subnets: all {family.count} /{family.subnet_len} subnets of "
            f"{family.network} between {family.subnet_min.network_address} and "
            f"{family.subnet_max.network_address} are leased")
    rng = rng or random.Random()
    start = rng.randrange(family.count)
    for step in range(family.count):
        candidate = family.subnet_at((start + step) % family.count)
        if candidate not in taken:
            return candidate
    raise OutOfSubnets(f"out of subnets in {family.network}")


def _split_previous(previous: Iterable[IPNetwork]
                    ) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]:
    v4 = [p for p in previous if isinstance(p, ipaddress.IPv4Network)]
    v6 = [p for p in previous if isinstance(p, ipaddress.IPv6Network)]
    return v4, v6


def _pick(config: NetworkConfig, leases: Iterable[Lease], previous: tuple[IPNetwork, ...],
          rng: random.Random | None = None
          ) -> tuple[ipaddress.IPv4Network | None, ipaddress.IPv6Network | None]:
    taken4: set[IPNetwork] = set()
    taken6: set[IPNetwork] = set()
    for lease in leases:
        if lease.subnet:
            taken4.add(lease.subnet)
        if lease.subnet6:
            taken6.add(lease.subnet6)
    prev4, prev6 = _split_previous(previous)
    s4 = choose_subnet(config.ipv4, taken4, prev4, rng) if config.ipv4 else None
    s6 = choose_subnet(config.ipv6, taken6, prev6, rng) if config.ipv6 else None
    return (s4 if isinstance(s4, ipaddress.IPv4Network) else None,
            s6 if isinstance(s6, ipaddress.IPv6Network) else None)


def _same_owner(lease: Lease, attrs: LeaseAttrs) -> bool:
    if attrs.node_name and lease.attrs.node_name:
        return lease.attrs.node_name == attrs.node_name
    return bool(attrs.public_ip) and lease.attrs.public_ip == attrs.public_ip


# --- memory ------------------------------------------------------------------------------


class MemoryLeaseRegistry:
    """Leases shared by every ``MemorySubnetManager`` of one process."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        self.config = config
        self.leases: dict[str, Lease] = {}
        self.version = 0
        self._changed = asyncio.Condition()

    async def set(self, lease: Lease | None, *, remove: str = "") -> None:
        async with self._changed:
            if remove:
                self.leases.pop(remove, None)
            if lease is not None:
                self.leases[lease.key] = lease
            self.version += 1
            self._changed.notify_all()

    async def wait_change(self, seen: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen)
            return self.version


class MemorySubnetManager:
    def __init__(self, registry: MemoryLeaseRegistry) -> None:
        self.registry = registry

    @property
    def renew_interval(self) -> float:
        return 0.0

    async def network_config(self) -> NetworkConfig:
        if self.registry.config is None:
            raise ConfigError("no network config in the memory registry")
        return self.registry.config

    async def acquire(self, config: NetworkConfig, attrs: LeaseAttrs,
                      previous: tuple[IPNetwork, ...] = ()) -> Lease:
        mine = [le for le in self.registry.leases.values() if _same_owner(le, attrs)]
        others = [le for le in self.registry.leases.values() if le not in mine]
        previous = (*previous, *(s for le in mine for s in le.subnets))
        s4, s6 = _pick(config, others, previous)
        lease = Lease(subnet=s4, subnet6=s6, attrs=attrs)
        for old in mine:
            if old.key != lease.key:
                await self.registry.set(None, remove=old.key)
        await self.registry.set(lease)
        return lease

    async def renew(self, lease: Lease) -> Lease:
        if self.registry.leases.get(lease.key) != lease:
            raise LeaseLost(f"lease {lease.key} is gone")
        return lease

    async def watch(self) -> AsyncIterator[Snapshot]:
        seen = self.registry.version
        yield tuple(self.registry.leases.values())
        while True:
            seen = await self.registry.wait_change(seen)
            yield tuple(self.registry.leases.values())

    async def release(self, lease: Lease) -> None:
        await self.registry.set(None, remove=lease.key)

    async def close(self) -> None:
        pass


# --- etcd --------------------------------------------------------------------------------


class EtcdSubnetManager:
    """Flannel's etcd registry over ``svcnet.store.etcd.EtcdClient``'s key-value API."""

    def __init__(self, client: EtcdClient, *, prefix: str = "/coreos.com/network",
                 ttl: int = 86400, config: NetworkConfig | None = None) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/").encode()
        self.ttl = ttl
        self._config = config

    @property
    def subnets_prefix(self) -> bytes:
        return self.prefix + b"/subnets/"

    @property
    def renew_interval(self) -> float:
        return float(max(1, min(self.ttl // 3, 3600)))

    async def network_config(self) -> NetworkConfig:
        if self._config is not None:
            return self._config
        found = await self.client.get(self.prefix + b"/config")
        if found is None:
            raise ConfigError(f"no network config at {(self.prefix + b'/config').decode()} "
                              "in etcd (or pass --overlay-config FILE)")
        return parse_network_config(found[0])

    async def _list(self) -> tuple[dict[str, tuple[Lease, int]], int]:
        items, revision = await self.client.get_prefix(self.subnets_prefix)
        leases: dict[str, tuple[Lease, int]] = {}
        for key, value, mod_revision in items:
            name = key[len(self.subnets_prefix):].decode()
            try:
                leases[name] = (Lease.from_etcd(name, value), mod_revision)
            except (ValueError, TypeError, KeyError) as err:
                log.warning("ignoring malformed lease %s: %s", key.decode(errors="replace"), err)
        return leases, revision

    async def acquire(self, config: NetworkConfig, attrs: LeaseAttrs,
                      previous: tuple[IPNetwork, ...] = ()) -> Lease:
        for attempt in range(10):
            leases, _ = await self._list()
            mine = {k: v for k, v in leases.items() if _same_owner(v[0], attrs)}
            others = [v[0] for k, v in leases.items() if k not in mine]
            wanted = (*previous, *(s for le, _ in mine.values() for s in le.subnets))
            s4, s6 = _pick(config, others, wanted)
            lease_id = await self.client.grant_lease(self.ttl)
            lease = Lease(subnet=s4, subnet6=s6, attrs=attrs, lease_id=lease_id)
            key = self.subnets_prefix + lease.key.encode()
            if lease.key in mine:
                ok = await self.client.replace(key, lease.to_json(),
                                               expect_mod_revision=mine[lease.key][1],
                                               lease=lease_id)
            else:
                ok = await self.client.create(key, lease.to_json(), lease=lease_id)
            if ok:
                for stale in mine:
                    if stale != lease.key:
                        await self.client.delete(self.subnets_prefix + stale.encode())
                log.info("leased %s (attempt %d)", lease.key, attempt + 1)
                return lease
            await self.client.revoke_lease(lease_id)
        raise LeaseError("could not lease a subnet: lost the race 10 times in a row")

    async def renew(self, lease: Lease) -> Lease:
        remaining = await self.client.keepalive(lease.lease_id)
        if remaining <= 0:
            raise LeaseLost(f"etcd lease for {lease.key} expired")
        found = await self.client.get(self.subnets_prefix + lease.key.encode())
        if found is None:
            raise LeaseLost(f"lease key for {lease.key} was deleted")
        return lease

    async def watch(self) -> AsyncIterator[Snapshot]:
        from svcnet.store.base import Expired, StoreError

        while True:
            try:
                leases, revision = await self._list()
                current = {k: v[0] for k, v in leases.items()}
                yield tuple(current.values())
                async for event in self.client.watch_prefix(self.subnets_prefix,
                                                             start_revision=revision + 1):
                    name = bytes(event.key)[len(self.subnets_prefix):].decode()
                    if _is_delete(event):
                        if current.pop(name, None) is None:
                            continue
                    else:
                        try:
                            current[name] = Lease.from_etcd(name, bytes(event.value))
                        except (ValueError, TypeError, KeyError) as err:
                            log.warning("ignoring malformed lease %s: %s", name, err)
                            continue
                    yield tuple(current.values())
            except Expired:
                log.info("lease watch compacted; relisting")
            except (StoreError, OSError, TimeoutError) as err:
                log.warning("lease watch failed: %s; retrying", err)
                await asyncio.sleep(1.0)

    async def release(self, lease: Lease) -> None:
        await self.client.delete(self.subnets_prefix + lease.key.encode())
        if lease.lease_id:
            await self.client.revoke_lease(lease.lease_id)

    async def close(self) -> None:
        await self.client.close()


def _is_delete(event: Any) -> bool:
    kind = getattr(event, "type", None)
    name = getattr(kind, "name", kind)
    return str(name).upper() in ("DELETE", "DELETED")


# --- kubernetes --------------------------------------------------------------------------


def lease_from_node(node: Any) -> Lease | None:
    """A peer's lease from its Node: podCIDRs plus the annotations it published."""
    ann: Mapping[str, str] = node.metadata.annotations
    if ANNOTATION_PREFIX + "backend-type" not in ann:
        return None
    s4: ipaddress.IPv4Network | None = None
    s6: ipaddress.IPv6Network | None = None
    for cidr in node.pod_cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if isinstance(net, ipaddress.IPv4Network):
            s4 = s4 or net
        else:
            s6 = s6 or net
    if s4 is None and s6 is None:
        return None
    try:
        data = json.loads(ann.get(ANNOTATION_PREFIX + "backend-data") or "{}") or {}
        data6 = json.loads(ann.get(ANNOTATION_PREFIX + "backend-v6-data") or "{}") or {}
    except ValueError:
        return None
    attrs = LeaseAttrs(
        public_ip=ann.get(ANNOTATION_PREFIX + "public-ip", ""),
        public_ip6=ann.get(ANNOTATION_PREFIX + "public-ipv6", ""),
        backend_type=ann[ANNOTATION_PREFIX + "backend-type"],
        vni=int(data.get("VNI") or data6.get("VNI") or 1),
        vtep_mac=str(data.get("VtepMAC") or ""), vtep_mac6=str(data6.get("VtepMAC") or ""),
        node_name=node.metadata.name,
    )
    return Lease(subnet=s4, subnet6=s6, attrs=attrs)


def node_annotations(attrs: LeaseAttrs, *, ipv6: bool) -> dict[str, str]:
    ann = {
        ANNOTATION_PREFIX + "backend-type": attrs.backend_type,
        ANNOTATION_PREFIX + "kube-subnet-manager": "true",
        ANNOTATION_PREFIX + "public-ip": attrs.public_ip,
        ANNOTATION_PREFIX + "backend-data": json.dumps({"VNI": attrs.vni,
                                                        "VtepMAC": attrs.vtep_mac}),
    }
    if ipv6:
        ann[ANNOTATION_PREFIX + "public-ipv6"] = attrs.public_ip6
        ann[ANNOTATION_PREFIX + "backend-v6-data"] = json.dumps(
            {"VNI": attrs.vni, "VtepMAC": attrs.vtep_mac6})
    return ann


class KubeSubnetManager:
    """Subnets come from the node controller (``podCIDRs``); we only publish VTEP data.

    Works over any ``Store`` holding Nodes, so the same code runs against a real API server
    and against the etcd store in tests.
    """

    def __init__(self, store: Store, informer: Any, node_name: str,
                 config: NetworkConfig | None = None, *, wait_timeout: float = 60.0) -> None:
        self.store = store
        self.informer = informer
        self.node_name = node_name
        self._config = config
        self.wait_timeout = wait_timeout
        self._changed = asyncio.Event()
        self._version = 0

        async def on_change(old: Any, new: Any) -> None:
            self._version += 1
            self._changed.set()

        from svcnet.watch import Callbacks

        informer.add_handler(Callbacks(on_change))
        informer.start()

    @property
    def renew_interval(self) -> float:
        return 0.0

    async def network_config(self) -> NetworkConfig:
        if self._config is None:
            raise ConfigError("the kubernetes subnet manager needs --overlay-config FILE "
                              "(Flannel's net-conf.json)")
        return self._config

    async def acquire(self, config: NetworkConfig, attrs: LeaseAttrs,
                      previous: tuple[IPNetwork, ...] = ()) -> Lease:
        from svcnet.model import NODE

        await self.informer.wait_synced(self.wait_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        while True:
            node = self.informer.cache.get(self.node_name)
            if node is not None and node.pod_cidrs:
                break
            if loop.time() > deadline:
                raise LeaseError(f"node {self.node_name} has no spec.podCIDR(s) after "
                                 f"{self.wait_timeout:.0f}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 1.0)
        attrs = replace(attrs, node_name=self.node_name)
        s4 = next((ipaddress.IPv4Network(c, strict=False) for c in node.pod_cidrs
                   if ":" not in c), None)
        s6 = next((ipaddress.IPv6Network(c, strict=False) for c in node.pod_cidrs
                   if ":" in c), None)
        lease = Lease(subnet=s4 if config.ipv4 else None, subnet6=s6 if config.ipv6 else None,
                      attrs=attrs)
        for family, fam, got in ((4, config.ipv4, s4), (6, config.ipv6, s6)):
            if fam is not None and got is None:
                raise LeaseError(f"node {self.node_name} has no IPv{family} podCIDR but the "
                                 f"network config has {fam.network}")
        if callable(getattr(self.store, "call", None)) and await self._patch_annotations(
                node_annotations(attrs, ipv6=lease.subnet6 is not None)):
            return lease
        for _ in range(10):
            listing = await self.store.list(NODE)
            raw = next((r for r in listing.items if r.name == self.node_name), None)
            if raw is None:
                raise LeaseError(f"node {self.node_name} disappeared")
            doc = json.loads(raw.data)
            meta = doc.setdefault("metadata", {})
            ann = meta.setdefault("annotations", {}) or {}
            wanted = node_annotations(attrs, ipv6=lease.subnet6 is not None)
            if all(ann.get(k) == v for k, v in wanted.items()):
                return lease
            ann.update(wanted)
            meta["annotations"] = ann
            try:
                await self.store.put(NODE, doc)
                return lease
            except Exception as err:
                from svcnet.store.base import Conflict

                if not isinstance(err, Conflict):
                    raise
        raise LeaseError(f"could not annotate node {self.node_name}: conflicts")

    async def _patch_annotations(self, wanted: dict[str, str]) -> bool:
        """A merge patch of the Node's ``status`` subresource, as Flannel publishes its
        annotations: the node agent's role needs ``patch`` on ``nodes/status`` only, not
        ``create``/``update`` on Nodes (which could rewrite any node's spec). False when
        RBAC forbids it: an identity granted only ``update`` on nodes then replaces the
        Node as before."""
        from urllib.parse import quote

        status, body = await self.store.call(  # type: ignore[attr-defined]
            "PATCH", f"/api/v1/nodes/{quote(self.node_name, safe='')}/status",
            {"metadata": {"annotations": wanted}},
            content_type="application/merge-patch+json")
        if status == 403:
            log.info("patch of nodes/%s/status forbidden; updating the Node instead",
                     self.node_name)
            return False
        if status != 200:
            message = body.get("message") if isinstance(body, dict) else None
            raise LeaseError(f"could not annotate node {self.node_name}: HTTP {status}"
                             + (f": {message}" if message else ""))
        return True

    async def renew(self, lease: Lease) -> Lease:
        return lease

    async def watch(self) -> AsyncIterator[Snapshot]:
        await self.informer.wait_synced()
        while True:
            self._changed.clear()
            leases = [lease_from_node(n) for n in self.informer.cache.values()]
            yield tuple(le for le in leases if le is not None)
            await self._changed.wait()

    async def release(self, lease: Lease) -> None:
        pass

    async def close(self) -> None:
        pass
