"""The proxy's desired state: what every service port should do on this node, as frozen data.

Computed once from the watch cache and shared by every backend (iptables, nftables, IPVS),
which only render it. The rules follow kube-proxy (``pkg/proxy``: service and endpoints
change trackers, ``topology.go`` CategorizeEndpoints):

- one ``ServicePortState`` per service port per IP family, holding its frontends (ClusterIP,
  NodePort on each configured node address, externalIPs, LoadBalancer ingress IPs except
  ``ipMode: Proxy``) and the endpoints internal and external traffic may use;
- ready endpoints; serving+terminating ones only when none is ready;
- ``internalTrafficPolicy``/``externalTrafficPolicy: Local`` use node-local endpoints only;
- topology hints (forNodes, then forZones) only when every ready endpoint has one and one
  matches this node;
- headless, ExternalName and ``service.kubernetes.io/service-proxy-name`` services are skipped;
- ClusterIPs outside the service range, and externalIPs / LoadBalancer IPs outside the
  allowed external ranges, are left out (``AddressFilter``): otherwise any object in the
  store could capture traffic to infrastructure such as etcd (CVE-2020-8554).

``ChangeTracker`` keeps {previous, current} per service port; ``drain`` recomputes only the
services whose objects changed and returns what changed.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from svcnet.model import EndpointSlice, Service

Family = Literal[4, 6]
FAMILIES: tuple[Family, ...] = (4, 6)

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
ZONE_LABEL = "topology.kubernetes.io/zone"


def family_of(ip: str) -> Family:
    return 6 if ":" in ip else 4


@dataclass(frozen=True, slots=True)
class AddressFilter:
    """The ranges a kind of service address must fall in; no ranges allows every address.

    Parsed once here: the model checks every service's addresses at each full sync.
    """

    cidrs: tuple[str, ...] = ()
    _nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_nets", tuple(
            ipaddress.ip_network(c, strict=False) for c in self.cidrs))

    def allows(self, ip: str) -> bool:
        if not self._nets:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in n for n in self._nets)


ALLOW_ALL = AddressFilter()


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """What the model needs to know about this node."""

    name: str = ""
    zone: str = ""
    # Node addresses NodePorts answer on, per family (already filtered by --nodeport-addresses).
    nodeport_addresses: tuple[str, ...] = ()
    # --service-cluster-ip-range: ClusterIPs outside it are not programmed.
    cluster_ips: AddressFilter = ALLOW_ALL
    # --proxy-external-ip-cidrs: externalIPs and LoadBalancer ingress IPs outside it are not.
    external_ips: AddressFilter = ALLOW_ALL

    def addresses(self, family: Family) -> tuple[str, ...]:
        return tuple(a for a in self.nodeport_addresses if family_of(a) == family)


@dataclass(frozen=True, slots=True, order=True)
class PortKey:
    """One service port in one IP family: the unit of change and of rule rendering."""

    namespace: str
    name: str
    port_name: str
    protocol: str
    family: Family

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        port = f":{self.port_name}" if self.port_name else ""
        return f"{self.namespace}/{self.name}{port}/{self.protocol.lower()}/v{self.family}"


class FrontendKind(enum.Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"

    @property
    def external(self) -> bool:
        return self is not FrontendKind.CLUSTER_IP


@dataclass(frozen=True, slots=True, order=True)
class Frontend:
    """An address and port a client connects to."""

    ip: str
    port: int
    kind: FrontendKind = field(compare=False)


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    """One endpoint as the proxy uses it."""

    ip: str
    port: int
    local: bool = field(default=False, compare=False)
    ready: bool = field(default=True, compare=False)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServicePortState:
    key: PortKey
    port: int
    frontends: tuple[Frontend, ...]
    cluster_endpoints: tuple[Backend, ...] = ()
    local_endpoints: tuple[Backend, ...] = ()
    # Any endpoint usable by anyone: distinguishes "no local endpoints" (DROP) from
    # "no endpoints at all" (REJECT).
    has_endpoints: bool = False
    internal_local: bool = False
    external_local: bool = False
    affinity_timeout: int = 0
    source_ranges: tuple[str, ...] = ()
    health_check_node_port: int = 0

    @property
    def protocol(self) -> str:
        return self.key.protocol

    @property
    def family(self) -> Family:
        return self.key.family

    @property
    def internal_endpoints(self) -> tuple[Backend, ...]:
        """Endpoints for traffic to ClusterIPs."""
        return self.local_endpoints if self.internal_local else self.cluster_endpoints

    @property
    def external_endpoints(self) -> tuple[Backend, ...]:
        """Endpoints for traffic to NodePorts, externalIPs and LoadBalancer IPs."""
        return self.local_endpoints if self.external_local else self.cluster_endpoints

    def endpoints_for(self, frontend: Frontend) -> tuple[Backend, ...]:
        return self.external_endpoints if frontend.kind.external else self.internal_endpoints

    @property
    def all_endpoints(self) -> tuple[Backend, ...]:
        return tuple(sorted(set(self.cluster_endpoints) | set(self.local_endpoints)))

    @property
    def local_ready_count(self) -> int:
        """What a healthCheckNodePort reports (kube-proxy counts local ready endpoints)."""
        return sum(1 for b in self.local_endpoints if b.ready)


# --- computing the state --------------------------------------------------------------------


def service_skipped(svc: Service) -> bool:
    return (
        svc.spec.type == "ExternalName"
        or svc.is_headless
        or not svc.cluster_ips
        or SERVICE_PROXY_NAME_LABEL in svc.metadata.labels
    )


def _externally_accessible(svc: Service) -> bool:
    return svc.spec.type in ("NodePort", "LoadBalancer") or bool(svc.spec.external_ips)


Ignored = list[tuple[FrontendKind, str]]


def _allowed(ips: Iterable[str], allow: AddressFilter, kind: FrontendKind,
             ignored: Ignored | None) -> list[str]:
    out = []
    for ip in ips:
        if allow.allows(ip):
            out.append(ip)
        elif ignored is not None:
            ignored.append((kind, ip))
    return out


def service_ports(
    svc: Service, slices: Iterable[EndpointSlice], node: NodeConfig,
    ignored: Ignored | None = None,
) -> list[ServicePortState]:
    """Every ``ServicePortState`` of one service on this node (empty if the proxy skips it).

    Addresses the node's filters refuse are left out and appended to ``ignored``; the rest
    of the service (its NodePorts, its other addresses) still works.
    """
    if service_skipped(svc):
        return []
    spec = svc.spec
    slices = list(slices)
    external_local = spec.external_traffic_policy == "Local" and _externally_accessible(svc)
    internal_local = spec.internal_traffic_policy == "Local"
    lb_ips = _allowed(
        (i.ip for i in svc.status.load_balancer.ingress if i.ip and i.ip_mode != "Proxy")
        if spec.type == "LoadBalancer" else (),
        node.external_ips, FrontendKind.LOAD_BALANCER, ignored)
    all_external_ips = _allowed(spec.external_ips, node.external_ips, FrontendKind.EXTERNAL_IP,
                                ignored)
    out: list[ServicePortState] = []
    all_cluster_ips = svc.cluster_ips
    for family in FAMILIES:
        if not any(family_of(ip) == family for ip in all_cluster_ips):
            continue
        cluster_ips = _allowed((ip for ip in all_cluster_ips if family_of(ip) == family),
                               node.cluster_ips, FrontendKind.CLUSTER_IP, ignored)
        external_ips = [ip for ip in all_external_ips if family_of(ip) == family]
        fam_lb_ips = [ip for ip in lb_ips if family_of(ip) == family]
        ranges = tuple(
            r for r in spec.load_balancer_source_ranges if family_of(r.split("/")[0]) == family
        )
        for sp in spec.ports:
            key = PortKey(svc.metadata.namespace, svc.metadata.name, sp.name, sp.protocol, family)
            frontends = [Frontend(ip, sp.port, FrontendKind.CLUSTER_IP) for ip in cluster_ips]
            if sp.node_port and spec.type in ("NodePort", "LoadBalancer"):
                frontends += [
                    Frontend(a, sp.node_port, FrontendKind.NODE_PORT)
                    for a in node.addresses(family)
                ]
            frontends += [Frontend(ip, sp.port, FrontendKind.EXTERNAL_IP) for ip in external_ips]
            frontends += [Frontend(ip, sp.port, FrontendKind.LOAD_BALANCER) for ip in fam_lb_ips]
            if not frontends:  # every address filtered out: nothing to program
                continue
            uses_cluster = not internal_local or (
                not external_local and any(f.kind.external for f in frontends))
            uses_local = internal_local or external_local
            plain = _plain_endpoints(slices, family, sp.name, sp.protocol, node)
            if plain is not None:
                cluster = plain if uses_cluster else ()
                local = tuple(b for b in plain if b.local) if uses_local else ()
                has_any = bool(plain)
            else:
                cluster, local, has_any = categorize(
                    _endpoints_for_port(slices, family, sp.name, sp.protocol, node), node,
                    uses_cluster=uses_cluster, uses_local=uses_local)
            state = ServicePortState(
                key=key,
                port=sp.port,
                frontends=tuple(dict.fromkeys(frontends)) if len(frontends) > 1 else tuple(
                    frontends),
                cluster_endpoints=cluster,
                local_endpoints=local,
                has_endpoints=has_any,
                internal_local=internal_local,
                external_local=external_local,
                affinity_timeout=svc.affinity_timeout,
                source_ranges=ranges if fam_lb_ips else (),
                health_check_node_port=(
                    spec.health_check_node_port
                    if external_local and spec.type == "LoadBalancer"
                    else 0
                ),
            )
            out.append(state)
    return out


class _Candidate(NamedTuple):
    backend: Backend
    ready: bool
    serving: bool
    terminating: bool
    zone_hints: frozenset[str]
    node_hints: frozenset[str]


_NO_HINTS: frozenset[str] = frozenset()
_set = object.__setattr__


def _new_backend(ip: str, port: int, local: bool, ready: bool) -> Backend:
    """``Backend(...)`` without the frozen dataclass __init__: the model builds 100k of these
    at a 10k-service full sync, and this is its hottest line."""
    b: Backend = object.__new__(Backend)
    _set(b, "ip", ip)
    _set(b, "port", port)
    _set(b, "local", local)
    _set(b, "ready", ready)
    return b


def _plain_endpoints(
    slices: list[EndpointSlice], family: Family, port_name: str, protocol: str,
    node: NodeConfig,
) -> tuple[Backend, ...] | None:
    """The common case, cheaply: one slice of the family serving the port, every endpoint
    ready (not terminating), no topology hints, no duplicate addresses -- then
    ``categorize`` would pick all of them. None when anything is less plain.

    This loop runs 100,000 times in a 10k-service full sync.
    """
    want = "IPv4" if family == 4 else "IPv6"
    found: EndpointSlice | None = None
    for sl in slices:
        if sl.address_type == want:
            if found is not None:
                return None
            found = sl
    if found is None:
        return ()
    port = 0
    for p in found.ports:
        if p.name == port_name and p.protocol == protocol:
            port = p.port
            break
    if not port:
        return ()
    node_name = node.name
    new, set_ = object.__new__, _set
    out: list[Backend] = []
    ips: list[str] = []
    for ep in found.endpoints:
        cond = ep.conditions
        addresses = ep.addresses
        if (ep.hints is not None or cond.ready is False or cond.serving is False
                or cond.terminating or len(addresses) == 0):
            return None
        b: Backend = new(Backend)
        ip = addresses[0]
        ips.append(ip)
        set_(b, "ip", ip)
        set_(b, "port", port)
        set_(b, "local", bool(node_name) and ep.node_name == node_name)
        set_(b, "ready", True)
        out.append(b)
    if len(out) > 1:
        if len(set(ips)) != len(ips):
            return None
        out.sort(key=_backend_ip)
    return tuple(out)


def _backend_ip(b: Backend) -> str:
    return b.ip


def _endpoints_for_port(
    slices: list[EndpointSlice], family: Family, port_name: str, protocol: str,
    node: NodeConfig,
) -> list[_Candidate]:
    """Endpoints of the slices' port named like the service port, merged by ip:port."""
    want = "IPv4" if family == 4 else "IPv6"
    merged: dict[tuple[str, int], _Candidate] = {}
    node_name = node.name
    if len(slices) > 1:
        slices = sorted(slices, key=lambda s: s.metadata.name)
    for sl in slices:
        if sl.address_type != want:
            continue
        port = next(
            (p.port for p in sl.ports if p.name == port_name and p.protocol == protocol), 0
        )
        if not port:
            continue
        for ep in sl.endpoints:
            if not ep.addresses:
                continue
            # Nil conditions mean true, as in Kubernetes (see the model's properties).
            cond = ep.conditions
            ready = cond.ready is not False
            serving = cond.serving is not False if cond.serving is not None else ready
            hints = ep.hints
            ip = ep.addresses[0]
            backend = _new_backend(ip, port, bool(node_name) and ep.node_name == node_name,
                                   ready)
            cand = tuple.__new__(_Candidate, (
                backend, ready, serving, cond.terminating is True,
                frozenset(z.name for z in hints.for_zones) if hints else _NO_HINTS,
                frozenset(n.name for n in hints.for_nodes) if hints else _NO_HINTS,
            ))
            key = (ip, port)
            old = merged.get(key)
            if old is None or (ready and not old.ready):
                merged[key] = cand
    return [merged[k] for k in sorted(merged)]


def categorize(
    endpoints: list[_Candidate], node: NodeConfig, *, uses_cluster: bool, uses_local: bool,
) -> tuple[tuple[Backend, ...], tuple[Backend, ...], bool]:
    """kube-proxy's CategorizeEndpoints: (cluster endpoints, local endpoints, any usable)."""
    has_any = False
    cluster: list[Backend] = []
    if uses_cluster:
        if any(c[4] or c[5] for c in endpoints if c[4] is not _NO_HINTS):
            topology = _topology_filter(endpoints, node)
            cluster = [c.backend for c in endpoints if c.ready and topology(c)]
        else:
            cluster = [c.backend for c in endpoints if c.ready]
        if not cluster:
            cluster = [c.backend for c in endpoints if c.serving and c.terminating]
        has_any = bool(cluster)
    local: list[Backend] = []
    if uses_local:
        usable = [c for c in endpoints if c.ready or (c.serving and c.terminating)]
        has_any = has_any or bool(usable)
        local = [c.backend for c in usable if c.ready and c.backend.local]
        if not local:
            local = [c.backend for c in usable if c.backend.local and c.serving and c.terminating]
    return tuple(cluster), tuple(local), has_any


def _topology_filter(
    endpoints: list[_Candidate], node: NodeConfig
) -> Callable[[_Candidate], bool]:
    """Hints apply only if every ready endpoint carries one and some endpoint matches us."""
    ready = [c for c in endpoints if c.ready]
    if not ready:
        return lambda c: True
    if node.name and all(c.node_hints for c in ready) and any(
        node.name in c.node_hints for c in ready
    ):
        return lambda c: node.name in c.node_hints
    if node.zone and all(c.zone_hints for c in ready) and any(
        node.zone in c.zone_hints for c in ready
    ):
        return lambda c: node.zone in c.zone_hints
    return lambda c: True


# --- change tracking --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    previous: ServicePortState | None
    current: ServicePortState | None


@dataclass(frozen=True, slots=True)
class Changes:
    """What one drain found: changed ports, and the complete current state after them."""

    changed: Mapping[PortKey, Change]
    state: Mapping[PortKey, ServicePortState]

    def __bool__(self) -> bool:
        return bool(self.changed)


ServiceLookup = Callable[[str], Service | None]
SliceLookup = Callable[[str], list[EndpointSlice]]
# Told once per service and address when the filters start refusing it (log + metric).
IgnoredHandler = Callable[[str, list[tuple[FrontendKind, str]]], None]


class ChangeTracker:
    """Marks services dirty from informer events; ``drain`` turns them into port changes.

    Not thread-safe: call it from the event loop only.
    """

    def __init__(self, node: NodeConfig, on_ignored: IgnoredHandler | None = None) -> None:
        self._node = node
        self._on_ignored = on_ignored
        self._ignored: dict[str, frozenset[tuple[FrontendKind, str]]] = {}
        self._dirty: set[str] = set()
        self._all_dirty = True
        self._state: dict[PortKey, ServicePortState] = {}
        self._ports_of: dict[str, set[PortKey]] = {}

    @property
    def node(self) -> NodeConfig:
        return self._node

    @property
    def pending(self) -> bool:
        return self._all_dirty or bool(self._dirty)

    def set_node(self, node: NodeConfig) -> None:
        if node != self._node:
            self._node = node
            self._all_dirty = True

    def service_changed(self, old: Service | None, new: Service | None) -> None:
        obj = new or old
        if obj is not None:
            self._dirty.add(f"{obj.metadata.namespace}/{obj.metadata.name}")

    def slice_changed(self, old: EndpointSlice | None, new: EndpointSlice | None) -> None:
        for obj in (old, new):
            if obj is not None and obj.service_name:
                self._dirty.add(f"{obj.metadata.namespace}/{obj.service_name}")

    def drain(
        self, services: ServiceLookup, slices: SliceLookup,
        all_services: Callable[[], Iterable[str]] | None = None,
    ) -> Changes:
        """Recompute dirty services (all of them after ``set_node``) and diff the result."""
        return self.start_drain(services, slices, all_services).finish()

    def start_drain(
        self, services: ServiceLookup, slices: SliceLookup,
        all_services: Callable[[], Iterable[str]] | None = None,
    ) -> Drain:
        """Take the dirty services now; recompute them as the returned ``Drain`` is consumed.

        Call this on the event loop; the ``Drain`` may then run in a worker thread (handlers
        only add to a fresh dirty set meanwhile), so a full sync can stream rules into the
        kernel tool while the rest of the model is still being computed. Finish it before
        the next ``start_drain``.
        """
        if self._all_dirty and all_services is not None:
            keys = set(all_services()) | set(self._ports_of) | self._dirty
            self._all_dirty = False
        else:
            keys = self._dirty
        self._dirty = set()
        return Drain(self, keys, services, slices)

    def forget(self) -> None:
        """Drop the computed state: the next drain recomputes every service, as after a
        restart (the scale bench uses it to time repeated cold full syncs)."""
        self._state.clear()
        self._ports_of.clear()
        self._all_dirty = True

    def _recompute(
        self, skey: str, services: ServiceLookup, slices: SliceLookup,
        changed: dict[PortKey, Change],
    ) -> list[ServicePortState]:
        """One service's ports now; records what changed. Returns its current ports."""
        svc = services(skey)
        ignored: Ignored = []
        current = service_ports(svc, slices(skey), self._node, ignored) if svc else []
        if ignored or skey in self._ignored:
            self._note_ignored(skey, frozenset(ignored))
        if len(current) > 1:  # one state per key (a repeated port: the last one, as a dict)
            current = list({p.key: p for p in current}.values())
        new_keys = {p.key for p in current}
        old_keys = self._ports_of.get(skey)
        if old_keys:
            for pkey in old_keys - new_keys:
                changed[pkey] = Change(self._state.pop(pkey), None)
        state = self._state
        for port in current:
            key = port.key
            before = state.get(key)
            if before != port:
                changed[key] = Change(before, port)
                state[key] = port
        if new_keys:
            self._ports_of[skey] = new_keys
        else:
            self._ports_of.pop(skey, None)
        return current

    def _note_ignored(self, skey: str, now: frozenset[tuple[FrontendKind, str]]) -> None:
        """Report addresses newly refused for a service, not every recompute of it."""
        before = self._ignored.pop(skey, frozenset())
        if now:
            self._ignored[skey] = now
        fresh = sorted(now - before, key=lambda x: (x[0].value, x[1]))
        if fresh and self._on_ignored is not None:
            self._on_ignored(skey, fresh)

    @property
    def state(self) -> Mapping[PortKey, ServicePortState]:
        return dict(self._state)


def in_cidrs(ip: str, cidrs: Iterable[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


class Drain:
    """One drain in progress: ``ports()`` streams every current service port, recomputing
    the dirty services on the way; ``finish()`` completes the rest and returns ``Changes``.

    Used from one thread at a time. If ``ports()`` is abandoned (a failed sync),
    ``finish()`` still recomputes what is left, so the tracker never loses a dirty service.
    """

    def __init__(self, tracker: ChangeTracker, keys: Iterable[str], services: ServiceLookup,
                 slices: SliceLookup) -> None:
        self._tracker = tracker
        self._todo = list(keys)
        self._next = 0
        self._services = services
        self._slices = slices
        self._changed: dict[PortKey, Change] = {}
        self._result: Changes | None = None

    def ports(self) -> Iterator[ServicePortState]:
        """Every service port as of this drain, in no particular order."""
        if self._result is not None:
            yield from self._result.state.values()
            return
        t = self._tracker
        dirty = set(self._todo[self._next:])
        unchanged = [t._state[k] for skey, keys in t._ports_of.items() if skey not in dirty
                     for k in keys]
        yield from unchanged
        del unchanged
        while self._next < len(self._todo):
            skey = self._todo[self._next]
            self._next += 1
            yield from t._recompute(skey, self._services, self._slices, self._changed)

    def finish(self) -> Changes:
        if self._result is None:
            t = self._tracker
            while self._next < len(self._todo):
                skey = self._todo[self._next]
                self._next += 1
                t._recompute(skey, self._services, self._slices, self._changed)
            self._result = Changes(self._changed, dict(t._state))
        return self._result
