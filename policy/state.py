"""NetworkPolicy desired state: which pod addresses are isolated, and what each may talk to.

Pure and computed once per sync from the watched objects; the nftables renderer, the tracer
and ``svcnet policy status`` all read this, never the policies themselves.

The state is factored so that its size does not grow with (targets x peers): pods isolated
by the same policies (and resolving the same named ports) share one ``Group``; a group holds
the ``Grant``s of its policies' rules (peer address ranges x port ranges), and each isolated
pod address points at its group. Semantics follow networking.k8s.io/v1:

- a pod is isolated for ingress (egress) when a policy of its namespace selects it and has
  that policy type (``Ingress`` always when policyTypes is unset, ``Egress`` when the
  policy has egress rules); what one of those policies' rules allows is allowed (union);
- a peer with only ``podSelector`` selects pods of the policy's namespace, with only
  ``namespaceSelector`` every pod of the selected namespaces, with both the selected pods
  of the selected namespaces; ``ipBlock`` is the CIDR minus its ``except`` ranges;
- an empty ``from``/``to`` allows every address, empty ``ports`` every port and protocol;
- a named port is resolved on the pod the traffic is addressed to: the isolated pod for
  ingress, each peer pod for egress (so an egress named port never matches an ipBlock);
- hostNetwork pods are neither isolated nor selected as peers (their address is the
  node's), nor are pods without addresses or that have finished.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import msgspec

from svcnet.model import (
    LabelSelector,
    Namespace,
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyPort,
    Pod,
    object_key,
)

Direction = Literal["ingress", "egress"]
Family = Literal[4, 6]
PROTOCOLS = ("TCP", "UDP", "SCTP")
ANY = "any"
"""Protocol of a grant without ports: every protocol (ICMP too), every port."""


class AddressRange(NamedTuple):
    """An inclusive range of addresses of one family, as integers (a tuple: sorting and
    hashing millions of them stays in C)."""

    family: Family
    first: int
    last: int

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return ip.version == self.family and self.first <= int(ip) <= self.last

    def __str__(self) -> str:
        cls = ipaddress.IPv4Address if self.family == 4 else ipaddress.IPv6Address
        lo, hi = cls(self.first), cls(self.last)
        if lo == hi:
            return str(lo)
        nets = list(ipaddress.summarize_address_range(lo, hi))  # type: ignore[arg-type]
        return str(nets[0]) if len(nets) == 1 else f"{lo}-{hi}"


class PortRange(NamedTuple):
    """``protocol`` TCP/UDP/SCTP with an inclusive destination port range, or ``any``."""

    protocol: str
    first: int = 0
    last: int = 65535

    def matches(self, protocol: str, port: int) -> bool:
        return self.protocol == ANY or (self.protocol == protocol
                                        and self.first <= port <= self.last)

    def __str__(self) -> str:
        if self.protocol == ANY:
            return "any"
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{ports}/{self.protocol}"


ALL_PORTS = (PortRange(ANY),)
EVERYWHERE = (AddressRange(4, 0, (1 << 32) - 1), AddressRange(6, 0, (1 << 128) - 1))


@dataclass(frozen=True, slots=True, order=True)
class Grant:
    """What one rule of one policy allows: traffic between these peer addresses and the
    group's pods, on these ports (destination ports)."""

    policy: str
    rule: int
    peers: tuple[AddressRange, ...]
    ports: tuple[PortRange, ...]

    def allows(self, peer: ipaddress.IPv4Address | ipaddress.IPv6Address, protocol: str,
               port: int) -> bool:
        return (any(peer in r for r in self.peers)
                and any(p.matches(protocol, port) for p in self.ports))


@dataclass(frozen=True, slots=True)
class Group:
    """Pods of one direction isolated by the same policies (and, for ingress, resolving the
    same named ports): one chain and one verdict map per family in the kernel."""

    name: str
    direction: Direction
    policies: tuple[str, ...]
    grants: tuple[Grant, ...]


@dataclass(frozen=True, slots=True)
class PolicyState:
    """``ingress``/``egress``: isolated pod address -> group name; ``pods``: address ->
    ``namespace/name`` of every pod (local or not) for tracing and logs."""

    groups: Mapping[str, Group] = field(default_factory=dict)
    ingress: Mapping[str, str] = field(default_factory=dict)
    egress: Mapping[str, str] = field(default_factory=dict)
    pods: Mapping[str, str] = field(default_factory=dict)
    policies: tuple[str, ...] = ()


def compute(policies: Iterable[NetworkPolicy], pods: Iterable[Pod],
            namespaces: Iterable[Namespace], *, node_name: str | None) -> PolicyState:
    """The desired state for the pods on ``node_name`` (every pod when None)."""
    return _Computation(policies, pods, namespaces).run(node_name)


def _usable(pod: Pod) -> bool:
    return (not pod.spec.host_network and bool(pod.ips)
            and pod.status.phase not in ("Succeeded", "Failed"))


def _range_of(ip: str) -> AddressRange:
    addr = ipaddress.ip_address(ip)
    return AddressRange(addr.version, int(addr), int(addr))  # type: ignore[arg-type]


def ip_block_ranges(cidr: str, excepts: Iterable[str]) -> tuple[AddressRange, ...]:
    """``cidr`` minus ``excepts`` as disjoint, sorted ranges."""
    net = ipaddress.ip_network(cidr, strict=False)
    family: Family = net.version  # type: ignore[assignment]
    ranges = [(int(net.network_address), int(net.broadcast_address))]
    for text in excepts:
        hole = ipaddress.ip_network(text, strict=False)
        lo, hi = int(hole.network_address), int(hole.broadcast_address)
        out: list[tuple[int, int]] = []
        for a, b in ranges:
            if hi < a or lo > b:
                out.append((a, b))
                continue
            if a < lo:
                out.append((a, lo - 1))
            if hi < b:
                out.append((hi + 1, b))
        ranges = out
    return tuple(AddressRange(family, a, b) for a, b in sorted(ranges))


def named_ports(pod: Pod) -> dict[tuple[str, str], int]:
    """(name, protocol) -> container port, as a named NetworkPolicy port resolves."""
    out: dict[tuple[str, str], int] = {}
    for c in pod.spec.containers:
        for p in c.ports:
            if p.name:
                out.setdefault((p.name, p.protocol), p.container_port)
    return out


def _port_range(p: NetworkPolicyPort, resolved: int | None) -> PortRange | None:
    if isinstance(p.port, str):
        return None if resolved is None else PortRange(p.proto, resolved, resolved)
    if p.port is None:
        return PortRange(p.proto)
    return PortRange(p.proto, p.port, p.end_port or p.port)


def _uses_named(ports: tuple[NetworkPolicyPort, ...]) -> bool:
    return any(isinstance(p.port, str) for p in ports)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class _Computation:
    def __init__(self, policies: Iterable[NetworkPolicy], pods: Iterable[Pod],
                 namespaces: Iterable[Namespace]) -> None:
        self.policies = sorted(policies, key=object_key)
        self.pods_by_ns: dict[str, list[Pod]] = defaultdict(list)
        for pod in pods:
            if _usable(pod):
                self.pods_by_ns[pod.metadata.namespace].append(pod)
        self.ns_labels = {ns.metadata.name: ns.labels for ns in namespaces}
        self.ranges: dict[int, tuple[AddressRange, ...]] = {
            id(p): tuple(_range_of(ip) for ip in p.ips)
            for ps in self.pods_by_ns.values() for p in ps}
        # Policies repeat selectors (same labels in many namespaces): each distinct
        # (namespaces, selector) is matched once.
        self._selected: dict[tuple[tuple[str, ...], bytes], list[Pod]] = {}
        self._ns_cache: dict[bytes, list[str]] = {}
        self._peer_ranges: dict[tuple[str, bytes], tuple[AddressRange, ...]] = {}
        self._ingress: dict[tuple[str, tuple[tuple[str, str, int | None], ...]],
                            list[Grant]] = {}

    # --- selection ----------------------------------------------------------------------

    def _namespaces(self, selector: LabelSelector) -> list[str]:
        key = msgspec.json.encode(selector)
        found = self._ns_cache.get(key)
        if found is None:
            found = [name for name, labels in self.ns_labels.items() if selector.matches(labels)]
            self._ns_cache[key] = found
        return found

    def peer_pods(self, policy_ns: str, peer: NetworkPolicyPeer) -> list[Pod]:
        if peer.namespace_selector is not None:
            spaces = self._namespaces(peer.namespace_selector)
        else:
            spaces = [policy_ns]
        return self.selected(tuple(spaces), peer.pod_selector)

    def selected(self, spaces: tuple[str, ...], sel: LabelSelector | None) -> list[Pod]:
        key = (spaces, msgspec.json.encode(sel))
        found = self._selected.get(key)
        if found is None:
            found = []
            for ns in spaces:
                pods = self.pods_by_ns.get(ns, ())
                found.extend(pods if sel is None else (
                    p for p in pods if sel.matches(p.metadata.labels)))
            self._selected[key] = found
        return found

    def peer_ranges(self, policy_ns: str, peer: NetworkPolicyPeer) -> tuple[AddressRange, ...]:
        key = (policy_ns, msgspec.json.encode(peer))
        found = self._peer_ranges.get(key)
        if found is None:
            if peer.ip_block is not None:
                found = ip_block_ranges(peer.ip_block.cidr, peer.ip_block.except_)
            else:
                ranges = self.ranges
                found = tuple(r for p in self.peer_pods(policy_ns, peer) for r in ranges[id(p)])
            self._peer_ranges[key] = found
        return found

    # --- grants -------------------------------------------------------------------------

    def ingress_grants(self, policy: NetworkPolicy, named: Mapping[tuple[str, str], int]
                       ) -> list[Grant]:
        key = object_key(policy)
        ns = policy.metadata.namespace
        out: list[Grant] = []
        for i, rule in enumerate(policy.spec.ingress):
            if rule.ports:
                ports = tuple(r for p in rule.ports
                              if (r := _port_range(p, named.get((str(p.port), p.proto))))
                              is not None)
                if not ports:
                    continue
            else:
                ports = ALL_PORTS
            if rule.from_:
                peers = tuple(r for peer in rule.from_ for r in self.peer_ranges(ns, peer))
            else:
                peers = EVERYWHERE
            if peers:
                out.append(Grant(key, i, tuple(sorted(set(peers))), ports))
        return out

    def _ingress_of(self, policy: NetworkPolicy, named: Mapping[tuple[str, str], int]
                    ) -> list[Grant]:
        """``ingress_grants`` once per policy and resolution of the names it uses."""
        used = tuple(sorted({(str(pp.port), pp.proto) for r in policy.spec.ingress
                             for pp in r.ports if isinstance(pp.port, str)}))
        key = (object_key(policy), tuple((n, p, named.get((n, p))) for n, p in used))
        found = self._ingress.get(key)
        if found is None:
            found = self._ingress[key] = self.ingress_grants(policy, named)
        return found

    def egress_grants(self, policy: NetworkPolicy) -> list[Grant]:
        key = object_key(policy)
        ns = policy.metadata.namespace
        out: list[Grant] = []
        for i, rule in enumerate(policy.spec.egress):
            if not _uses_named(rule.ports):
                ports = tuple(r for p in rule.ports if (r := _port_range(p, None))) or ALL_PORTS
                if rule.to:
                    peers = tuple(r for peer in rule.to for r in self.peer_ranges(ns, peer))
                else:
                    peers = EVERYWHERE
                if peers:
                    out.append(Grant(key, i, tuple(sorted(set(peers))), ports))
                continue
            # Named ports resolve on each destination pod: one grant per port set.
            numeric = tuple(r for p in rule.ports if not isinstance(p.port, str)
                            if (r := _port_range(p, None)))
            by_ports: dict[tuple[PortRange, ...], set[AddressRange]] = defaultdict(set)
            if rule.to:
                blocks = [r for peer in rule.to if peer.ip_block is not None
                          for r in self.peer_ranges(ns, peer)]
                pods = [p for peer in rule.to if peer.ip_block is None
                        for p in self.peer_pods(ns, peer)]
            else:
                blocks = list(EVERYWHERE)
                pods = [p for ps in self.pods_by_ns.values() for p in ps]
            if numeric:
                by_ports[numeric].update(blocks)
            for pod in pods:
                named = named_ports(pod)
                ports = numeric + tuple(
                    r for p in rule.ports if isinstance(p.port, str)
                    if (r := _port_range(p, named.get((p.port, p.proto)))) is not None)
                if ports:
                    by_ports[tuple(sorted(set(ports)))].update(self.ranges[id(pod)])
            for port_set, addresses in sorted(by_ports.items()):
                if addresses:
                    out.append(Grant(key, i, tuple(sorted(addresses)), port_set))
        return out

    # --- the state ----------------------------------------------------------------------

    def run(self, node_name: str | None) -> PolicyState:
        selecting: dict[tuple[str, str], list[NetworkPolicy]] = defaultdict(list)
        local: dict[tuple[str, str], Pod] = {}
        for policy in self.policies:
            ns = policy.metadata.namespace
            sel = policy.spec.pod_selector
            for pod in self.pods_by_ns.get(ns, ()):
                if node_name is not None and pod.spec.node_name != node_name:
                    continue
                if sel.matches(pod.metadata.labels):
                    k = (ns, pod.metadata.name)
                    selecting[k].append(policy)
                    local[k] = pod
        groups: dict[str, Group] = {}
        ingress: dict[str, str] = {}
        egress: dict[str, str] = {}
        egress_cache: dict[str, list[Grant]] = {}
        for k, pols in selecting.items():
            pod = local[k]
            in_pols = [p for p in pols if p.isolates_ingress]
            out_pols = [p for p in pols if p.isolates_egress]
            if in_pols:
                named = named_ports(pod)
                used = sorted({(str(pp.port), pp.proto) for p in in_pols
                               for r in p.spec.ingress for pp in r.ports
                               if isinstance(pp.port, str)})
                resolution = tuple((n, proto, named.get((n, proto))) for n, proto in used)
                keys = tuple(object_key(p) for p in in_pols)
                name = "in-" + _short_hash(repr((keys, resolution)))
                if name not in groups:
                    grants = [g for p in in_pols for g in self._ingress_of(p, named)]
                    groups[name] = Group(name, "ingress", keys, tuple(grants))
                for ip in pod.ips:
                    ingress[ip] = name
            if out_pols:
                keys = tuple(object_key(p) for p in out_pols)
                name = "out-" + _short_hash(repr(keys))
                if name not in groups:
                    grants = []
                    for p in out_pols:
                        pk = object_key(p)
                        if pk not in egress_cache:
                            egress_cache[pk] = self.egress_grants(p)
                        grants += egress_cache[pk]
                    groups[name] = Group(name, "egress", keys, tuple(grants))
                for ip in pod.ips:
                    egress[ip] = name
        pods = {ip: f"{ns}/{p.metadata.name}" for ns, ps in self.pods_by_ns.items() for p in ps
                for ip in p.ips}
        return PolicyState(groups=groups, ingress=ingress, egress=egress, pods=pods,
                           policies=tuple(object_key(p) for p in self.policies))
