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
from dataclasses import dataclass, field, fields
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


SelectionKey = tuple[tuple[str, ...], bytes]
"""(namespaces, the encoded pod selector): one pod selection, shared by every peer and
policy selecting the same pods."""
PeerKey = tuple[str, bytes]
Assignment = tuple[tuple[str, ...], str, str]
"""A local isolated pod's (addresses, ingress group name or '', egress group name or '')."""
_ALL_NAMESPACES: Any = "*"
"""The dependency of an egress rule with named ports and no ``to``: every pod's ports."""
INDEX_MIN_PODS = 16
"""Namespaces with at least this many pods get a label index for matchLabels selectors."""
SWEEP_MIN = 1000
"""The memo's unused selections and peers are swept once there are more than this many
(or twice as many as the last sweep kept)."""


@dataclass
class Memo:
    """The computation kept between syncs (the daemon keeps one): the objects last
    computed from, indexes over them, what was derived from them and the state itself.
    A computation takes only what changed since (pods, namespaces, policies by key) and
    maps each change to what it can affect:

    - a pod (labels, addresses, named ports, node, phase): the selections of its namespace
      that match either version, the policies whose grants read those selections, and the
      assignment (selecting policies -> groups) of its namespace's local pods;
    - a policy: its grants and the assignment of its namespace's pods;
    - a namespace's labels: the namespace-selector peers whose namespaces changed.

    Everything else -- selections, grants, groups, the address maps -- is reused, and a
    group whose grants are the very same objects stays the very same ``Group`` (the
    renderer recognises it by identity). Objects are compared by identity: informer caches
    keep an unchanged object."""

    node_name: str | None = None
    started: bool = False
    # the objects, and indexes over them
    pods: dict[str, Pod] = field(default_factory=dict)
    ips: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """pod key -> its addresses, for the pods policy sees (``_usable``) only."""
    pods_by_ns: dict[str, dict[str, Pod]] = field(default_factory=dict)
    """namespace -> pod key -> pod, for the pods policy sees."""
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    ns_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)
    ids: dict[int, str] = field(default_factory=dict)
    """id -> key of every object held in ``pods``, ``namespaces`` and ``policies``."""
    policies_by_ns: dict[str, set[str]] = field(default_factory=dict)
    # derived, each with the inverse index that finds it when what it read changes
    by_id: dict[int, tuple[Pod, tuple[AddressRange, ...]]] = field(default_factory=dict)
    """id(pod) -> (pod, its addresses as ranges), for the pods of ``pods_by_ns``."""
    selected: dict[SelectionKey, tuple[list[Pod], LabelSelector | None]] = \
        field(default_factory=dict)
    selections_of_ns: dict[str, set[SelectionKey]] = field(default_factory=dict)
    peer_ranges: dict[PeerKey, tuple[tuple[AddressRange, ...], Any]] = \
        field(default_factory=dict)
    peers_of: dict[Any, set[PeerKey]] = field(default_factory=dict)
    """selection key -> the cached peers computed from it."""
    ns_peers: dict[PeerKey, NetworkPolicyPeer] = field(default_factory=dict)
    """cached peers with a namespace selector: their namespaces move with labels."""
    ingress: dict[str, dict[tuple[tuple[str, str, int | None], ...], list[Grant]]] = \
        field(default_factory=dict)
    egress: dict[str, list[Grant]] = field(default_factory=dict)
    deps: dict[str, frozenset[Any]] = field(default_factory=dict)
    dependents: dict[Any, set[str]] = field(default_factory=dict)
    """selection key -> the policies whose grants were computed from it."""
    names: dict[tuple[str, tuple[str, ...], tuple[Any, ...]], str] = field(default_factory=dict)
    # the state
    assigned: dict[str, dict[str, Assignment]] = field(default_factory=dict)
    """namespace -> local isolated pod key -> its assignment."""
    members: dict[str, int] = field(default_factory=dict)
    """group name -> how many pods are in it (a group goes with its last pod)."""
    specs: dict[str, tuple[Direction, tuple[str, ...], dict[tuple[str, str], int]]] = \
        field(default_factory=dict)
    """group name -> (direction, policies, the named ports its pods resolve)."""
    groups_of: dict[str, set[str]] = field(default_factory=dict)
    """policy key -> the groups it isolates."""
    groups: dict[str, Group] = field(default_factory=dict)
    ingress_map: dict[str, str] = field(default_factory=dict)
    egress_map: dict[str, str] = field(default_factory=dict)
    pod_names: dict[str, str] = field(default_factory=dict)

    sweep_at: int = 0
    """``_Computation._sweep`` runs once the cached selections and peers outgrow this (0:
    not set yet)."""

    def reset(self, node_name: str | None) -> None:
        """Forget everything (another node, or a failed sync)."""
        fresh = Memo(node_name=node_name)
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


Changes = Mapping[str, Any]
"""key -> the object now, or None when it is gone."""
_EMPTY: Changes = {}


def compute(policies: Iterable[NetworkPolicy], pods: Iterable[Pod],
            namespaces: Iterable[Namespace], *, node_name: str | None,
            memo: Memo | None = None) -> PolicyState:
    """The desired state for the pods on ``node_name`` (every pod when None); ``memo``
    carries the previous call's computation (see ``Memo``): only what differs from the
    objects it was computed from is computed again."""
    out: list[PolicyState] = []
    with gc_paused():
        for _ in compute_stream(policies, pods, namespaces, node_name=node_name, memo=memo,
                                out=out):
            pass
    return out[0]


def compute_changes(memo: Memo, *, node_name: str | None, policies: Changes = _EMPTY,
                    pods: Changes = _EMPTY, namespaces: Changes = _EMPTY) -> PolicyState:
    """The state after these changes (key -> object now, or None when deleted; pods and
    policies by ``namespace/name``, namespaces by name) to what ``memo`` was computed from:
    what ``compute`` gives for the objects after the changes, at the cost of the
    changes' reach instead of the cluster's size."""
    out: list[PolicyState] = []
    with gc_paused():
        if memo.started and memo.node_name == node_name:
            for _ in _Computation(memo).run(policies, pods, namespaces, out):
                pass
        else:
            raise ValueError("compute_changes needs a memo computed for this node")
    return out[0]


def compute_stream(policies: Iterable[NetworkPolicy], pods: Iterable[Pod],
                   namespaces: Iterable[Namespace], *, node_name: str | None,
                   out: list[PolicyState], memo: Memo | None = None) -> Iterator[Group]:
    """``compute``, yielding every group of the state, each as soon as it is complete (a
    full sync writes it to ``nft`` while the rest is computed); the state is appended to
    ``out`` at the end."""
    memo = memo if memo is not None else Memo(node_name=node_name)
    if not memo.started or memo.node_name != node_name:
        memo.reset(node_name)
    return _Computation(memo).run(
        _differences(memo.policies, memo.ids, policies),
        _differences(memo.pods, memo.ids, pods),
        _differences(memo.namespaces, memo.ids, namespaces),
        out, every_group=True)


def _differences(before: Mapping[str, Any], ids: dict[int, str], now: Iterable[Any]
                 ) -> dict[str, Any]:
    """key -> object for the objects of ``now`` that are not the very ones of ``before``,
    key -> None for those gone. By identity first (``ids``: id -> key of the objects
    ``before`` holds), so an unchanged object costs a look-up, not its key."""
    changed: dict[str, Any] = {}
    kept = 0
    for obj in now:
        key = ids.get(id(obj))
        if key is not None and before.get(key) is obj:
            kept += 1
        else:
            changed[object_key(obj)] = obj
    if kept + sum(1 for key in changed if key in before) < len(before):
        present = {object_key(obj) for obj in now}
        changed.update((key, None) for key in before.keys() - present)
    return changed


@contextlib.contextmanager
def gc_paused(*, long_lived: bool = False) -> Iterator[None]:
    """No cyclic collection during a computation: its temporaries (tens of thousands of
    containers, freed by reference counting at its end) would otherwise be promoted to the
    oldest generation and trigger a full collection of the informers' large heap every
    other sync (~0.2 s at 10k pods). The collector resumes where it was afterwards.

    ``long_lived`` (a full sync): what survives is the new state, kept until the next
    full sync, so it goes to the oldest generation at once (``gc.freeze`` then
    ``gc.unfreeze``: two list splices) instead of being scanned by the young collection
    that the paused allocations would start as soon as the collector resumes (15-50 ms at
    10k pods) and again by the middle one. Nothing is exempt from collection: the next
    full collection scans it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if long_lived:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def policy_view(pod: Pod) -> tuple[object, ...]:
    """What NetworkPolicy reads of a pod: two versions equal here enforce the same."""
    return (pod.metadata.labels, pod.ips, pod.spec.node_name, _usable(pod),
            tuple(sorted(named_ports(pod).items())))


_FINISHED = ("Succeeded", "Failed")


def _usable(pod: Pod) -> bool:
    """Policy neither isolates nor selects hostNetwork pods, pods without addresses or
    finished ones (``_apply_pods`` inlines this)."""
    return not pod.spec.host_network and bool(pod.ips) and pod.status.phase not in _FINISHED


def _held(ids: dict[int, str], key: str, before: Any, now: Any) -> None:
    if before is not None:
        ids.pop(id(before), None)
    if now is not None:
        ids[id(now)] = key


def _handed_on(pod: Pod) -> tuple[object, ...]:
    """What a selection hands on of a pod it holds (``policy_view`` less the labels that
    decide whether it holds it)."""
    return (pod.ips, pod.spec.node_name, tuple(sorted(named_ports(pod).items())))


def _pod_key(pod: Pod) -> str:
    return f"{pod.metadata.namespace}/{pod.metadata.name}"

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
    """One computation: applies changes to a ``Memo`` and leaves the new state."""

    def __init__(self, memo: Memo) -> None:
        self.memo = memo
        self._ns_cache: dict[bytes, tuple[str, ...]] = {}
        self._label_index: dict[str, dict[tuple[str, str], list[Pod]]] = {}
        self._shapes: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...],
                                                  tuple[tuple[str, str], ...]]] = {}
        self._group_names: dict[tuple[tuple[str, ...], Any], tuple[str, str]] = {}

    def run(self, policies: Changes, pods: Changes, namespaces: Changes,
            out: list[PolicyState], *, every_group: bool = False) -> Iterator[Group]:
        memo = self.memo
        memo.started = True
        touched: set[str] = set()
        """namespaces whose pods' assignment is computed again"""
        stale_policies = self._apply_policies(policies, touched)
        stale = self._apply_namespaces(namespaces)
        stale |= self._apply_pods(pods, touched)
        self._drop(stale, stale_policies)
        built: set[str] = set()
        for ns_groups in self._assign_all(touched):
            # A cold computation yields each namespace's groups right after assigning
            # it: a full sync's nft parses them while the next namespaces are assigned.
            for name in ns_groups:
                if name not in memo.groups and name not in built:
                    built.add(name)
                    yield self._build(name)
        rebuild = {name for pk in stale_policies for name in memo.groups_of.get(pk, ())}
        for name in sorted(rebuild - built):
            yield self._build(name)
        rebuild |= built
        if every_group:
            yield from (g for name, g in memo.groups.items() if name not in rebuild)
        if len(memo.names) > 4 * len(memo.groups) + 1000:  # names of groups long gone
            memo.names.clear()
        size = len(memo.selected) + len(memo.peer_ranges)
        if memo.sweep_at == 0:  # the first computation: everything in use
            memo.sweep_at = max(SWEEP_MIN, 2 * size)
        elif size > memo.sweep_at:
            self._sweep()
        out.append(PolicyState(groups=dict(memo.groups), ingress=dict(memo.ingress_map),
                               egress=dict(memo.egress_map), pods=dict(memo.pod_names),
                               policies=tuple(sorted(memo.policies))))

    def _sweep(self) -> None:
        """Forget the peers no policy has any more and the selections nothing reads (a
        deleted policy's, those of namespaces a selector no longer matches), so the memo
        stays the size of what the objects need. A selection something was computed from
        stays: its staleness is how that is found out."""
        memo = self.memo
        live: set[PeerKey] = set()
        used: set[Any] = set()
        for policy in memo.policies.values():
            ns = policy.metadata.namespace
            used.add(((ns,), msgspec.json.encode(policy.spec.pod_selector)))
            rules = [r.from_ for r in policy.spec.ingress] + [r.to for r in policy.spec.egress]
            for peers in rules:
                for peer in peers:
                    shared = peer.namespace_selector is not None or peer.ip_block is not None
                    live.add(("" if shared else ns, msgspec.json.encode(peer)))
        for peer_key in [k for k in memo.peer_ranges if k not in live]:
            del memo.peer_ranges[peer_key]
            memo.ns_peers.pop(peer_key, None)
        for dep, peer_keys in list(memo.peers_of.items()):
            peer_keys &= memo.peer_ranges.keys()
            if peer_keys:
                memo.peers_of[dep] = peer_keys
                used.add(dep)
            else:
                del memo.peers_of[dep]
        for dep, users in list(memo.dependents.items()):
            if users:
                used.add(dep)
            else:
                del memo.dependents[dep]
        for sel_key in [k for k in memo.selected if k not in used]:
            del memo.selected[sel_key]
            for ns in sel_key[0]:
                memo.selections_of_ns[ns].discard(sel_key)
        for ns in [n for n, keys in memo.selections_of_ns.items() if not keys]:
            del memo.selections_of_ns[ns]
        memo.sweep_at = max(SWEEP_MIN, 2 * (len(memo.selected) + len(memo.peer_ranges)))

    # --- changes ------------------------------------------------------------------------

    def _apply_policies(self, policies: Changes, touched: set[str]) -> set[str]:
        """Take the changed policies; the keys of those whose grants must be computed
        again (their namespaces' assignment too)."""
        memo = self.memo
        stale: set[str] = set()
        for key, policy in policies.items():
            before = memo.policies.get(key)
            if before is policy:
                continue
            ns = key.partition("/")[0]
            _held(memo.ids, key, before, policy)
            if policy is None:
                del memo.policies[key]
                memo.policies_by_ns[ns].discard(key)
            else:
                memo.policies[key] = policy
                memo.policies_by_ns.setdefault(ns, set()).add(key)
                if before is not None and before == policy:
                    continue
            stale.add(key)
            touched.add(ns)
        return stale

    def _apply_namespaces(self, namespaces: Changes) -> set[Any]:
        """Take the changed namespaces; the selections of namespace-selector peers whose
        namespaces are no longer the same (what was computed from them goes)."""
        memo = self.memo
        moved = False
        for name, space in namespaces.items():
            before = memo.namespaces.get(name)
            if before is space:
                continue
            _held(memo.ids, name, before, space)
            if space is None:
                del memo.namespaces[name]
                labels = None
            else:
                memo.namespaces[name] = space
                labels = space.labels
            if memo.ns_labels.get(name) != labels:
                moved = True
                if labels is None:
                    del memo.ns_labels[name]
                else:
                    memo.ns_labels[name] = labels
        stale: set[Any] = set()
        if moved:
            for peer_key, peer in list(memo.ns_peers.items()):
                cached = memo.peer_ranges.get(peer_key)
                if cached is None or peer.namespace_selector is None:
                    del memo.ns_peers[peer_key]
                elif self._namespaces(peer.namespace_selector) != cached[1][0]:
                    stale.add(cached[1])
        return stale

    def _apply_pods(self, pods: Changes, touched: set[str]) -> set[Any]:
        """Take the changed pods; the selections a changed pod entered or left, or is in
        with other addresses, named ports or node."""
        memo = self.memo
        changed: dict[str, list[tuple[Pod | None, Pod | None]]] = defaultdict(list)
        added: list[tuple[str, tuple[str, ...]]] = []
        for key, pod in pods.items():
            before = memo.pods.get(key)
            if before is pod:
                continue
            ns = key.partition("/")[0]
            _held(memo.ids, key, before, pod)
            if pod is None:
                del memo.pods[key]
            else:
                memo.pods[key] = pod
            if before is not None and pod is not None and \
                    policy_view(before) == policy_view(pod):
                if key in memo.ips:  # the newer version, for the next selections
                    memo.pods_by_ns[ns][key] = pod
                    found = memo.by_id.pop(id(before), None)
                    if found is not None:
                        memo.by_id[id(pod)] = (pod, found[1])
                continue
            old_ips = memo.ips.pop(key, ())
            seen = None
            if old_ips:
                seen = memo.pods_by_ns[ns].pop(key)
                memo.by_id.pop(id(seen), None)
                for ip in old_ips:
                    if memo.pod_names.get(ip) == key:
                        del memo.pod_names[ip]
            now = None
            ips = pod.ips if pod is not None else ()
            if ips and not pod.spec.host_network and pod.status.phase not in _FINISHED:
                now = pod
                memo.ips[key] = ips
                memo.pods_by_ns.setdefault(ns, {})[key] = pod
                memo.by_id[id(pod)] = (pod, tuple(_range_of(ip) for ip in ips))
                added.append((key, ips))
            if seen is not None or now is not None:
                changed[ns].append((seen, now))
        for key, ips in added:  # after every removal: an address may move between pods
            for ip in ips:
                memo.pod_names[ip] = key
        stale: set[Any] = set()
        for ns, pairs in changed.items():
            touched.add(ns)
            # (before, after, whether what a selection hands on -- addresses, named
            # ports, node -- differs): a selection is stale when the pod entered or left
            # it, or is in it with something else to hand on.
            moves = [(a, b, a is None or b is None or _handed_on(a) != _handed_on(b))
                     for a, b in pairs]
            if any(other for _, _, other in moves):
                stale.add(_ALL_NAMESPACES)
            for sel_key in memo.selections_of_ns.get(ns, ()):
                cached = memo.selected.get(sel_key)
                if cached is None:
                    continue
                sel = cached[1]
                for a, b, other in moves:
                    was = a is not None and (sel is None or sel.matches(a.metadata.labels))
                    now_in = b is not None and (sel is None or sel.matches(b.metadata.labels))
                    if was != now_in or (was and other):
                        stale.add(sel_key)
                        break
        return stale

    def _drop(self, stale: set[Any], stale_policies: set[str]) -> None:
        """Forget the stale selections, the peers computed from them, and the grants of
        the policies that read them (adding those to ``stale_policies``)."""
        memo = self.memo
        for sel_key in stale:
            cached = memo.selected.pop(sel_key, None)
            if cached is not None:
                for ns in sel_key[0]:
                    memo.selections_of_ns[ns].discard(sel_key)
            for peer_key in memo.peers_of.pop(sel_key, ()):
                memo.peer_ranges.pop(peer_key, None)
                memo.ns_peers.pop(peer_key, None)
            stale_policies |= memo.dependents.pop(sel_key, set())
        for pk in stale_policies:
            memo.ingress.pop(pk, None)
            memo.egress.pop(pk, None)
            for dep in memo.deps.pop(pk, ()):
                users = memo.dependents.get(dep)
                if users is not None:
                    users.discard(pk)

    def _assign_all(self, touched: set[str]) -> Iterator[set[str]]:
        """Assign the touched namespaces' local pods to groups again and patch the address
        maps, yielding after each namespace the names of the groups its pods are in now;
        at the end, groups without pods go."""
        memo = self.memo
        now = {ns: self._assign(ns) for ns in touched if ns in memo.assigned}
        changed: set[str] = set()
        maps = (memo.ingress_map, memo.egress_map)
        for ns, new in now.items():  # every removal first: an address may move
            for key, entry in memo.assigned[ns].items():
                if new.get(key) != entry:
                    ips = entry[0]
                    for name, table in zip(entry[1:], maps, strict=True):
                        if name:
                            for ip in ips:
                                if table.get(ip) == name:
                                    del table[ip]
                            memo.members[name] -= 1
                            changed.add(name)
        for ns in touched:
            new = now[ns] if ns in now else self._assign(ns)
            before = memo.assigned.get(ns, {})
            names: set[str] = set()
            members = memo.members
            for key, entry in new.items():
                if before.get(key) == entry:
                    names.update(entry[1:])
                    continue
                ips, in_name, out_name = entry
                if in_name:
                    for ip in ips:
                        memo.ingress_map[ip] = in_name
                    members[in_name] = members.get(in_name, 0) + 1
                    names.add(in_name)
                if out_name:
                    for ip in ips:
                        memo.egress_map[ip] = out_name
                    members[out_name] = members.get(out_name, 0) + 1
                    names.add(out_name)
            if new:
                memo.assigned[ns] = new
            else:
                memo.assigned.pop(ns, None)
            names.discard("")
            yield names
        for name in changed:
            if memo.members[name] == 0:
                del memo.members[name]
                memo.groups.pop(name, None)
                _, keys, _ = memo.specs.pop(name)
                for pk in keys:
                    found = memo.groups_of.get(pk)
                    if found is not None:
                        found.discard(name)
                        if not found:
                            del memo.groups_of[pk]

    def _assign(self, ns: str) -> dict[str, Assignment]:
        """The local pods of ``ns`` that policies isolate, each with its groups: pods
        isolated by the same policies (and resolving the same named ports) share one."""
        memo = self.memo
        node = memo.node_name
        selecting: dict[str, list[str]] = {}  # pod name -> its selecting policies
        first: dict[str, Pod] = {}
        for pk in sorted(memo.policies_by_ns.get(ns, ())):
            for pod in self.selected((ns,), memo.policies[pk].spec.pod_selector):
                if node is None or pod.spec.node_name == node:
                    name = pod.metadata.name
                    found = selecting.get(name)
                    if found is None:
                        selecting[name] = [pk]
                        first[name] = pod
                    else:
                        found.append(pk)
        out: dict[str, Assignment] = {}
        group_names = self._group_names
        for name, pks in selecting.items():
            pod = first[name]
            keys = tuple(pks)
            shape = self._shape(keys)
            resolution: tuple[tuple[str, str, int | None], ...] = ()
            if shape[0] and shape[2]:
                named = named_ports(pod)
                resolution = tuple((n, proto, named.get((n, proto))) for n, proto in shape[2])
            found_names = group_names.get((keys, resolution))
            if found_names is None:
                found_names = group_names[keys, resolution] = self._name(shape, resolution)
            if found_names[0] or found_names[1]:
                key = f"{ns}/{name}"
                out[key] = (memo.ips.get(key) or pod.ips, *found_names)
        return out

    def _name(self, shape: tuple[tuple[str, ...], tuple[str, ...], Any],
              resolution: tuple[tuple[str, str, int | None], ...]) -> tuple[str, str]:
        """The (ingress, egress) group names of pods with this shape and resolution."""
        names, specs = self.memo.names, self.memo.specs
        in_keys, out_keys, _ = shape
        in_name = out_name = ""
        if in_keys:
            in_name = names.get(("in", in_keys, resolution), "")
            if not in_name:
                in_name = names[("in", in_keys, resolution)] = "in-" + _short_hash(
                    repr((in_keys, resolution)))
            if in_name not in specs:
                specs[in_name] = ("ingress", in_keys, {
                    (n, proto): port for n, proto, port in resolution if port is not None})
        if out_keys:
            out_name = names.get(("out", out_keys, ()), "")
            if not out_name:
                out_name = names[("out", out_keys, ())] = "out-" + _short_hash(repr(out_keys))
            if out_name not in specs:
                specs[out_name] = ("egress", out_keys, {})
        return in_name, out_name

    def _shape(self, keys: tuple[str, ...]
               ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, str], ...]]:
        """Per distinct set of selecting policies: (ingress keys, egress keys, named ports
        the ingress rules use), so the per-pod work is a few lookups."""
        shape = self._shapes.get(keys)
        if shape is None:
            pols = [self.memo.policies[key] for key in keys]
            in_keys = tuple(object_key(p) for p in pols if p.isolates_ingress)
            out_keys = tuple(object_key(p) for p in pols if p.isolates_egress)
            used = tuple(sorted({(str(pp.port), pp.proto) for p in pols
                                 if p.isolates_ingress for r in p.spec.ingress
                                 for pp in r.ports if isinstance(pp.port, str)}))
            shape = self._shapes[keys] = (in_keys, out_keys, used)
        return shape

    def _build(self, name: str) -> Group:
        memo = self.memo
        direction, keys, named = memo.specs[name]
        if direction == "ingress":
            grants = [g for pk in keys for g in self._ingress_of(memo.policies[pk], named)]
        else:
            grants = [g for pk in keys for g in self._egress_of(memo.policies[pk])]
        group = self._group(name, direction, keys, grants)
        memo.groups[name] = group
        for pk in keys:
            memo.groups_of.setdefault(pk, set()).add(name)
        return group

    def _group(self, name: str, direction: Direction, keys: tuple[str, ...],
               grants: list[Grant]) -> Group:
        """The previous computation's group object when nothing in it changed, so the
        renderer recognises it by identity."""
        old = self.memo.groups.get(name)
        if (old is not None and old.policies == keys and len(old.grants) == len(grants)
                and all(a is b for a, b in zip(old.grants, grants, strict=True))):
            return old
        return Group(name, direction, keys, tuple(grants))

    # --- selection ----------------------------------------------------------------------

    def _namespaces(self, selector: LabelSelector) -> tuple[str, ...]:
        key = msgspec.json.encode(selector)
        found = self._ns_cache.get(key)
        if found is None:
            found = self._ns_cache[key] = tuple(sorted(
                name for name, labels in self.memo.ns_labels.items() if selector.matches(labels)))
        return found

    def peer_spaces(self, policy_ns: str, peer: NetworkPolicyPeer) -> tuple[str, ...]:
        if peer.ip_block is not None:
            return ()
        if peer.namespace_selector is not None:
            return self._namespaces(peer.namespace_selector)
        return (policy_ns,)

    def peer_pods(self, policy_ns: str, peer: NetworkPolicyPeer) -> list[Pod]:
        return self.selected(self.peer_spaces(policy_ns, peer), peer.pod_selector)

    def selected(self, spaces: tuple[str, ...], sel: LabelSelector | None) -> list[Pod]:
        memo = self.memo
        key = (spaces, msgspec.json.encode(sel))
        cached = memo.selected.get(key)
        if cached is None:
            found: list[Pod] = []
            for ns in spaces:
                memo.selections_of_ns.setdefault(ns, set()).add(key)
                if sel is None:
                    found.extend(memo.pods_by_ns.get(ns, {}).values())
                    continue
                found.extend(p for p in self._candidates(ns, sel)
                             if sel.matches(p.metadata.labels))
            cached = memo.selected[key] = (found, sel)
        return cached[0]

    def _candidates(self, ns: str, sel: LabelSelector) -> Iterable[Pod]:
        """The pods of ``ns`` that may match: those carrying the rarest of the selector's
        matchLabels (a per-namespace label index), else all of them."""
        pods = self.memo.pods_by_ns.get(ns, {})
        labels = sel.labels
        if not labels or len(pods) < INDEX_MIN_PODS:
            return pods.values()
        index = self._label_index.get(ns)
        if index is None:
            index = self._label_index[ns] = defaultdict(list)
            for p in pods.values():
                for item in p.metadata.labels.items():
                    index[item].append(p)
        return min((index.get(item, []) for item in labels.items()), key=len)

    def _sorted_ranges(self, pods: list[Pod]) -> tuple[AddressRange, ...]:
        """The pods' addresses, sorted and without duplicates (``_ranges_of`` inlined:
        the hot loop of a cold computation)."""
        by_id = self.memo.by_id
        out: set[AddressRange] = set()
        for pod in pods:
            found = by_id.get(id(pod))
            out.update(found[1] if found is not None and found[0] is pod
                       else self._ranges_of(pod))
        return tuple(sorted(out))

    def _ranges_of(self, pod: Pod) -> tuple[AddressRange, ...]:
        """A pod's addresses; a cached selection may hold an earlier version of the pod
        that differed only in what it does not hand on (``_handed_on``)."""
        found = self.memo.by_id.get(id(pod))
        if found is not None and found[0] is pod:
            return found[1]
        return tuple(_range_of(ip) for ip in pod.ips)

    def peer_ranges(self, policy_ns: str, peer: NetworkPolicyPeer) -> tuple[AddressRange, ...]:
        """Sorted and without duplicates (a rule with one peer uses the tuple as it is)."""
        memo = self.memo
        shared = peer.namespace_selector is not None or peer.ip_block is not None
        key = ("" if shared else policy_ns, msgspec.json.encode(peer))
        cached = memo.peer_ranges.get(key)
        if cached is None:
            if peer.ip_block is not None:
                cached = (ip_block_ranges(peer.ip_block.cidr, peer.ip_block.except_), None)
            else:
                dep = self._selection_key(policy_ns, peer)
                cached = (self._sorted_ranges(self.peer_pods(policy_ns, peer)), dep)
                memo.peers_of.setdefault(dep, set()).add(key)
                if peer.namespace_selector is not None:
                    memo.ns_peers[key] = peer
            memo.peer_ranges[key] = cached
        return cached[0]

    def _selection_key(self, policy_ns: str, peer: NetworkPolicyPeer) -> Any:
        return (self.peer_spaces(policy_ns, peer), msgspec.json.encode(peer.pod_selector))

    def _depends_on(self, policy: NetworkPolicy) -> None:
        """Record the pod selections a policy's grants were computed from."""
        memo = self.memo
        pk = object_key(policy)
        if pk in memo.deps:
            return
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
        memo.deps[pk] = frozenset(out)
        for dep in out:
            memo.dependents.setdefault(dep, set()).add(pk)

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
        per_policy = self.memo.ingress.setdefault(pk, {})
        found = per_policy.get(resolution)
        if found is None:
            found = per_policy[resolution] = self.ingress_grants(policy, named)
            self._depends_on(policy)
        return found

    def _egress_of(self, policy: NetworkPolicy) -> list[Grant]:
        pk = object_key(policy)
        found = self.memo.egress.get(pk)
        if found is None:
            found = self.memo.egress[pk] = self.egress_grants(policy)
            self._depends_on(policy)
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
                pods = [p for ps in self.memo.pods_by_ns.values() for p in ps.values()]
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
