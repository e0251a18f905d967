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

import contextlib
import gc
import hashlib
import ipaddress
import socket
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

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


@dataclass
class Memo:
    """What one ``compute`` leaves for the next (the daemon keeps one): selector matches,
    peer ranges and grants, each dropped when a namespace it read from changed (a pod of it
    added, removed or replaced), when its policy changed, or, for all of them, when any
    namespace's labels did. Objects are compared by identity, as informer caches keep an
    unchanged object."""

    pods_by_ns: dict[str, list[Pod]] = field(default_factory=dict)
    ns_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)
    ranges: dict[tuple[str, ...], tuple[AddressRange, ...]] = field(default_factory=dict)
    selected: dict[tuple[tuple[str, ...], bytes], tuple[list[Pod], LabelSelector | None]] = \
        field(default_factory=dict)
    peer_ranges: dict[tuple[str, bytes], tuple[tuple[AddressRange, ...], Any]] = \
        field(default_factory=dict)
    ingress: dict[str, dict[tuple[tuple[str, str, int | None], ...], list[Grant]]] = \
        field(default_factory=dict)
    egress: dict[str, list[Grant]] = field(default_factory=dict)
    deps: dict[str, frozenset[Any]] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    names: dict[tuple[str, tuple[str, ...], tuple[Any, ...]], str] = field(default_factory=dict)
    pod_groups: dict[int, tuple[Pod, tuple[str, ...], str, str]] = field(default_factory=dict)
    pod_ips: dict[int, tuple[Pod, tuple[str, ...]]] = field(default_factory=dict)
    """id(pod) -> (pod, its addresses; () when policy ignores it): read once per object."""
    local_of: dict[str, tuple[list[Pod], str | None, list[tuple[tuple[str, str], Pod]]]] = \
        field(default_factory=dict)
    """policy key -> (its pod selection, node, the (key, pod) pairs of it on the node)."""
    """id(pod) -> (pod, its selecting policies, its ingress and egress group names or ''):
    a pod object selected by the same policies is in the same groups (names are hashes of
    what decides them), so a sync after one change re-derives only the changed pods."""


_ALL_NAMESPACES = "*"
INDEX_MIN_PODS = 16
"""Namespaces with at least this many pods get a label index for matchLabels selectors."""


def compute(policies: Iterable[NetworkPolicy], pods: Iterable[Pod],
            namespaces: Iterable[Namespace], *, node_name: str | None,
            memo: Memo | None = None) -> PolicyState:
    """The desired state for the pods on ``node_name`` (every pod when None); ``memo``
    carries caches from the previous call (see ``Memo``)."""
    out: list[PolicyState] = []
    with gc_paused():
        for _ in compute_stream(policies, pods, namespaces, node_name=node_name, memo=memo,
                                out=out):
            pass
    return out[0]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection during a computation: its temporaries (tens of thousands of
    containers, freed by reference counting at its end) would otherwise be promoted to the
    oldest generation and trigger a full collection of the informers' large heap every
    other sync (~0.2 s at 10k pods). The collector resumes where it was afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def compute_stream(policies: Iterable[NetworkPolicy], pods: Iterable[Pod],
                   namespaces: Iterable[Namespace], *, node_name: str | None,
                   out: list[PolicyState], memo: Memo | None = None) -> Iterator[Group]:
    """``compute``, yielding each group as soon as it is complete (a full sync writes it
    to ``nft`` while the rest is computed); the state is appended to ``out`` at the end."""
    return _Computation(policies, pods, namespaces, memo or Memo()).run(node_name, out)


def policy_view(pod: Pod) -> tuple[object, ...]:
    """What NetworkPolicy reads of a pod: two versions equal here enforce the same."""
    return (pod.metadata.labels, pod.ips, pod.spec.node_name, _usable(pod),
            tuple(sorted(named_ports(pod).items())))


def _same(a: list[Pod], b: list[Pod]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _usable(pod: Pod) -> bool:
    return (not pod.spec.host_network and bool(pod.ips)
            and pod.status.phase not in ("Succeeded", "Failed"))


def _range_of(ip: str) -> AddressRange:
    """One address (already validated by the Pod record) as a range; without ipaddress,
    which costs several times more per pod."""
    if ":" in ip:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
        return AddressRange(6, value, value)
    value = int.from_bytes(socket.inet_aton(ip), "big")
    return AddressRange(4, value, value)


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
                 namespaces: Iterable[Namespace], memo: Memo) -> None:
        self.policies = sorted(policies, key=object_key)
        self.pods_by_ns: dict[str, list[Pod]] = defaultdict(list)
        old_ranges, old_ips = memo.ranges, memo.pod_ips
        self.ranges = {}
        self.ips: dict[int, tuple[str, ...]] = {}
        pod_ips: dict[int, tuple[Pod, tuple[str, ...]]] = {}
        for pod in pods:
            seen = old_ips.get(id(pod))
            if seen is not None and seen[0] is pod:
                ips = seen[1]
                pod_ips[id(pod)] = seen  # no new container: fewer for the collector
            else:
                ips = pod.ips if _usable(pod) else ()
                pod_ips[id(pod)] = (pod, ips)
            if ips:
                self.pods_by_ns[pod.metadata.namespace].append(pod)
                self.ips[id(pod)] = ips
                found = old_ranges.get(ips)
                self.ranges[ips] = found or tuple(_range_of(ip) for ip in ips)
        self.ns_labels = {ns.metadata.name: ns.labels for ns in namespaces}
        memo.ranges, memo.pod_ips = self.ranges, pod_ips
        self._forget(memo)
        # Policies repeat selectors (same labels in many namespaces): each distinct
        # (namespaces, selector) is matched once.
        self._selected = memo.selected
        self._ns_cache: dict[bytes, list[str]] = {}
        self._peer_ranges = memo.peer_ranges
        self._ingress = memo.ingress
        self._egress = memo.egress
        self._deps = memo.deps
        self._memo = memo
        self._names = memo.names
        self._label_index: dict[str, dict[tuple[str, str], list[Pod]]] = {}

    def _ranges_of(self, pod: Pod) -> tuple[AddressRange, ...]:
        """A pod's addresses; a cached selection may hold an earlier version of the pod
        that differed only where policy does not look (``policy_view``)."""
        ips = self.ips.get(id(pod)) or pod.ips
        found = self.ranges.get(ips)
        return found if found is not None else tuple(_range_of(ip) for ip in ips)

    def _forget(self, memo: Memo) -> None:
        """Drop what the changes since the last computation made stale."""
        policies = {object_key(p): p for p in self.policies}
        changed = {k for k in policies.keys() | memo.policies.keys()
                   if policies.get(k) is not memo.policies.get(k)}
        if changed:  # a pod's groups depend on its selecting policies' contents too
            memo.pod_groups.clear()
        if self.ns_labels != memo.ns_labels:
            memo.selected.clear()
            memo.peer_ranges.clear()
            memo.ingress.clear()
            memo.egress.clear()
            memo.deps.clear()
        changed_pods: dict[str, list[Pod]] = {}
        for ns in self.pods_by_ns.keys() | memo.pods_by_ns.keys():
            now, before = self.pods_by_ns.get(ns, []), memo.pods_by_ns.get(ns, [])
            if _same(now, before):
                continue
            # A new version that policy sees the same way (a status update) changes nothing.
            now_by, before_by = ({p.metadata.name: p for p in pods} for pods in (now, before))
            moved = [(before_by.get(name), now_by.get(name))
                     for name in now_by.keys() | before_by.keys()
                     if now_by.get(name) is not before_by.get(name)]
            changed_pods[ns] = [p for old, new in moved for p in (old, new) if p is not None
                                if old is None or new is None
                                or policy_view(old) != policy_view(new)]
        # A selection is stale only if a changed pod (either version) is in its namespaces
        # and matches its selector; what was computed from it goes with it.
        stale_selections: set[Any] = {_ALL_NAMESPACES} if changed_pods else set()
        for sel_key, (_, sel) in memo.selected.items():
            for ns in sel_key[0]:
                if any(sel is None or sel.matches(p.metadata.labels)
                       for p in changed_pods.get(ns, ())):
                    stale_selections.add(sel_key)
                    break
        for sel_key in stale_selections - {_ALL_NAMESPACES}:
            del memo.selected[sel_key]
        for peer_key in [k for k, (_, dep) in memo.peer_ranges.items()
                         if dep in stale_selections]:
            del memo.peer_ranges[peer_key]
        stale = changed | {k for k, deps in memo.deps.items()
                           if not stale_selections.isdisjoint(deps)}
        for policy_key in stale:
            memo.deps.pop(policy_key, None)
            memo.ingress.pop(policy_key, None)
            memo.egress.pop(policy_key, None)
        memo.pods_by_ns = dict(self.pods_by_ns)
        memo.ns_labels = self.ns_labels
        memo.policies = policies

    # --- selection ----------------------------------------------------------------------

    def _namespaces(self, selector: LabelSelector) -> list[str]:
        key = msgspec.json.encode(selector)
        found = self._ns_cache.get(key)
        if found is None:
            found = [name for name, labels in self.ns_labels.items() if selector.matches(labels)]
            self._ns_cache[key] = found
        return found

    def peer_spaces(self, policy_ns: str, peer: NetworkPolicyPeer) -> tuple[str, ...]:
        if peer.ip_block is not None:
            return ()
        if peer.namespace_selector is not None:
            return tuple(self._namespaces(peer.namespace_selector))
        return (policy_ns,)

    def peer_pods(self, policy_ns: str, peer: NetworkPolicyPeer) -> list[Pod]:
        return self.selected(self.peer_spaces(policy_ns, peer), peer.pod_selector)

    def selected(self, spaces: tuple[str, ...], sel: LabelSelector | None) -> list[Pod]:
        key = (spaces, msgspec.json.encode(sel))
        cached = self._selected.get(key)
        if cached is None:
            found: list[Pod] = []
            for ns in spaces:
                if sel is None:
                    found.extend(self.pods_by_ns.get(ns, ()))
                    continue
                pods = self._candidates(ns, sel)
                found.extend(p for p in pods if sel.matches(p.metadata.labels))
            cached = self._selected[key] = (found, sel)
        return cached[0]

    def _candidates(self, ns: str, sel: LabelSelector) -> list[Pod]:
        """The pods of ``ns`` that may match: those carrying the rarest of the selector's
        matchLabels (a per-namespace label index), else all of them."""
        pods = self.pods_by_ns.get(ns, [])
        labels = sel.labels
        if not labels or len(pods) < INDEX_MIN_PODS:
            return pods
        index = self._label_index.get(ns)
        if index is None:
            index = self._label_index[ns] = defaultdict(list)
            for p in pods:
                for item in p.metadata.labels.items():
                    index[item].append(p)
        return min((index.get(item, []) for item in labels.items()), key=len)

    def peer_ranges(self, policy_ns: str, peer: NetworkPolicyPeer) -> tuple[AddressRange, ...]:
        """Sorted and without duplicates (a rule with one peer uses the tuple as it is)."""
        shared = peer.namespace_selector is not None or peer.ip_block is not None
        key = ("" if shared else policy_ns, msgspec.json.encode(peer))
        cached = self._peer_ranges.get(key)
        if cached is None:
            if peer.ip_block is not None:
                found = ip_block_ranges(peer.ip_block.cidr, peer.ip_block.except_)
                dep = None
            else:
                found = tuple(sorted({r for p in self.peer_pods(policy_ns, peer)
                                      for r in self._ranges_of(p)}))
                dep = self._selection_key(policy_ns, peer)
            cached = self._peer_ranges[key] = (found, dep)
        return cached[0]

    def _selection_key(self, policy_ns: str, peer: NetworkPolicyPeer) -> Any:
        return (self.peer_spaces(policy_ns, peer), msgspec.json.encode(peer.pod_selector))

    def depends_on(self, policy: NetworkPolicy) -> frozenset[str]:
        """The pod selections a policy's grants were computed from."""
        ns = policy.metadata.namespace
        out: set[Any] = set()
        for rule in policy.spec.ingress:
            out.update(self._selection_key(ns, peer) for peer in rule.from_
                       if peer.ip_block is None)
        for egress in policy.spec.egress:
            out.update(self._selection_key(ns, peer) for peer in egress.to
                       if peer.ip_block is None)
            if not egress.to and _uses_named(egress.ports):
                out.add(_ALL_NAMESPACES)  # named ports of every pod
        return frozenset(out)

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
            peers = self._rule_peers(ns, rule.from_)
            if peers:
                out.append(Grant(key, i, peers, ports))
        return out

    def _ingress_of(self, policy: NetworkPolicy, named: Mapping[tuple[str, str], int]
                    ) -> list[Grant]:
        """``ingress_grants`` once per policy and resolution of the names it uses."""
        used = tuple(sorted({(str(pp.port), pp.proto) for r in policy.spec.ingress
                             for pp in r.ports if isinstance(pp.port, str)}))
        pk = object_key(policy)
        resolution = tuple((n, p, named.get((n, p))) for n, p in used)
        per_policy = self._ingress.setdefault(pk, {})
        found = per_policy.get(resolution)
        if found is None:
            found = per_policy[resolution] = self.ingress_grants(policy, named)
            self._deps[pk] = self.depends_on(policy)
        return found

    def _group(self, name: str, direction: Direction, keys: tuple[str, ...],
               grants: list[Grant]) -> Group:
        """The previous computation's group object when nothing in it changed, so the
        renderer recognises it by identity."""
        old = self._memo.groups.get(name)
        if (old is not None and old.policies == keys and len(old.grants) == len(grants)
                and all(a is b for a, b in zip(old.grants, grants, strict=True))):
            return old
        return Group(name, direction, keys, tuple(grants))

    def _egress_of(self, policy: NetworkPolicy) -> list[Grant]:
        pk = object_key(policy)
        found = self._egress.get(pk)
        if found is None:
            found = self._egress[pk] = self.egress_grants(policy)
            self._deps[pk] = self.depends_on(policy)
        return found

    def _rule_peers(self, ns: str, peers: tuple[NetworkPolicyPeer, ...]
                    ) -> tuple[AddressRange, ...]:
        if not peers:
            return EVERYWHERE
        if len(peers) == 1:
            return self.peer_ranges(ns, peers[0])
        return tuple(sorted({r for peer in peers for r in self.peer_ranges(ns, peer)}))

    def egress_grants(self, policy: NetworkPolicy) -> list[Grant]:
        key = object_key(policy)
        ns = policy.metadata.namespace
        out: list[Grant] = []
        for i, rule in enumerate(policy.spec.egress):
            if not _uses_named(rule.ports):
                ports = tuple(r for p in rule.ports if (r := _port_range(p, None))) or ALL_PORTS
                peers = self._rule_peers(ns, rule.to)
                if peers:
                    out.append(Grant(key, i, peers, ports))
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
                    by_ports[tuple(sorted(set(ports)))].update(self._ranges_of(pod))
            for port_set, addresses in sorted(by_ports.items()):
                if addresses:
                    out.append(Grant(key, i, tuple(sorted(addresses)), port_set))
        return out

    # --- the state ----------------------------------------------------------------------

    @staticmethod
    def _shape(shapes: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...],
                                                  tuple[tuple[str, str], ...]]],
               by_key: dict[str, NetworkPolicy], keys: tuple[str, ...],
               ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, str], ...]]:
        """Per distinct set of selecting policies: (ingress keys, egress keys, named ports
        the ingress rules use), so the per-pod work is a few lookups."""
        shape = shapes.get(keys)
        if shape is None:
            pols = [by_key[key] for key in keys]
            in_keys = tuple(object_key(p) for p in pols if p.isolates_ingress)
            out_keys = tuple(object_key(p) for p in pols if p.isolates_egress)
            used = tuple(sorted({(str(pp.port), pp.proto) for p in pols
                                 if p.isolates_ingress for r in p.spec.ingress
                                 for pp in r.ports if isinstance(pp.port, str)}))
            shape = shapes[keys] = (in_keys, out_keys, used)
        return shape

    def run(self, node_name: str | None, out: list[PolicyState]) -> Iterator[Group]:
        selecting: dict[tuple[str, str], list[str]] = defaultdict(list)
        local: dict[tuple[str, str], Pod] = {}
        by_key = {object_key(p): p for p in self.policies}
        old_local = self._memo.local_of
        local_of: dict[str, tuple[list[Pod], str | None,
                                  list[tuple[tuple[str, str], Pod]]]] = {}
        for key, policy in by_key.items():
            ns = policy.metadata.namespace
            chosen = self.selected((ns,), policy.spec.pod_selector)
            seen = old_local.get(key)
            if seen is not None and seen[0] is chosen and seen[1] == node_name:
                pairs = seen[2]
            else:
                pairs = [((ns, pod.metadata.name), pod) for pod in chosen
                         if node_name is None or pod.spec.node_name == node_name]
            local_of[key] = (chosen, node_name, pairs)
            for k, pod in pairs:
                selecting[k].append(key)
                local[k] = pod
        self._memo.local_of = local_of
        groups: dict[str, Group] = {}
        ingress: dict[str, str] = {}
        egress: dict[str, str] = {}
        # Per distinct set of selecting policies: (ingress keys, egress keys, named ports
        # the ingress rules use), so the per-pod work is a few lookups.
        shapes: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...],
                                            tuple[tuple[str, str], ...]]] = {}
        names = self._names
        old_pod_groups = self._memo.pod_groups
        pod_groups: dict[int, tuple[Pod, tuple[str, ...], str, str]] = {}
        for k, key_list in selecting.items():
            pod = local[k]
            keys = tuple(key_list)
            hit = old_pod_groups.get(id(pod))
            named: dict[tuple[str, str], int] | None = None
            if hit is not None and hit[0] is pod and hit[1] == keys:
                in_name, out_name = hit[2], hit[3]
                pod_groups[id(pod)] = hit
            else:
                in_keys, out_keys, used = self._shape(shapes, by_key, keys)
                in_name = out_name = ""
                if in_keys:
                    named = named_ports(pod) if used else {}
                    resolution = tuple((n, proto, named.get((n, proto))) for n, proto in used)
                    in_name = names.get(("in", in_keys, resolution), "")
                    if not in_name:
                        in_name = names[("in", in_keys, resolution)] = "in-" + _short_hash(
                            repr((in_keys, resolution)))
                if out_keys:
                    out_name = names.get(("out", out_keys, ()), "")
                    if not out_name:
                        out_name = names[("out", out_keys, ())] = "out-" + _short_hash(
                            repr(out_keys))
                pod_groups[id(pod)] = (pod, keys, in_name, out_name)
            ips = self.ips.get(id(pod)) or pod.ips
            if in_name:
                if in_name not in groups:
                    in_keys, _, used = self._shape(shapes, by_key, keys)
                    if named is None:
                        named = named_ports(pod) if used else {}
                    grants = [g for key in in_keys
                              for g in self._ingress_of(by_key[key], named)]
                    groups[in_name] = self._group(in_name, "ingress", in_keys, grants)
                    yield groups[in_name]
                for ip in ips:
                    ingress[ip] = in_name
            if out_name:
                if out_name not in groups:
                    _, out_keys, _ = self._shape(shapes, by_key, keys)
                    grants = [g for key in out_keys for g in self._egress_of(by_key[key])]
                    groups[out_name] = self._group(out_name, "egress", out_keys, grants)
                    yield groups[out_name]
                for ip in ips:
                    egress[ip] = out_name
        self._memo.pod_groups = pod_groups
        self._memo.groups = groups
        if len(names) > 4 * len(groups) + 1000:  # names of groups long gone
            names.clear()
        all_ips = self.ips
        pods = {ip: f"{ns}/{p.metadata.name}" for ns, ps in self.pods_by_ns.items() for p in ps
                for ip in all_ips[id(p)]}
        out.append(PolicyState(groups=groups, ingress=ingress, egress=egress, pods=pods,
                               policies=tuple(object_key(p) for p in self.policies)))
