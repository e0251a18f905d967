"""NetworkPolicy rendered into the nftables table ``inet svcnet-policy``.

Layout (docs/policy.md has the why)::

    chain forward  (hook forward, priority filter)     chain input (hook input)
      ct state established,related accept
      icmpv6 type { nd-... } accept (neighbour discovery)
      ip saddr vmap @egress-pods4   -> jump out-G        ip saddr vmap @egress-pods4
      ip6 saddr vmap @egress-pods6  -> jump out-G        ip6 saddr vmap @egress-pods6
      ip daddr vmap @ingress-pods4  -> goto in-G
      ip6 daddr vmap @ingress-pods6 -> goto in-G
    chain in-G     ip saddr . meta l4proto . th dport vmap @in-G-4 -> goto allow-in-P
                   (same for ip6)  [limit + log]  counter name deny-in-G  drop
    chain out-G    ct state established,related return   (for input: forward has
                   icmpv6 type { nd-... } return           accepted these already)
                   ip daddr . meta l4proto . th dport vmap @out-G-4 -> goto allow-out-P
                   ...             [limit + log]  counter name deny-out-G drop
    chain allow-in-P    counter name allow-in-P accept
    chain allow-out-P   counter name allow-out-P       (returns: ingress is checked next)

A packet costs at most two pod-address lookups and two concatenated-interval lookups
whatever the number of policies or pods. The node's own traffic never passes the forward
hook (it leaves through output), so node-to-pod traffic is not judged; prerouting DNAT runs
before forward, so Service traffic is judged on the endpoint.

Concatenated interval maps refuse overlapping elements, so each group's grants are cut into
disjoint (address range, protocol, port range) boxes here; where rules overlap the box is
credited to the first policy by name (``Grant`` order).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
import itertools
import socket
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from svcnet.policy.state import ANY, AddressRange, Family, Group, PolicyState, gc_paused

TABLE = "svcnet-policy"
T = f"inet {TABLE}"
ELEMENT_BATCH = 2000
LOG_RATE = "10/second"
LOG_PREFIX = "svcnet-policy deny"
_PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
# "every protocol" as disjoint protocol ranges, so a port-less grant never overlaps a TCP one
_PROTO_CLASSES = ((0, 5), (6, 6), (7, 16), (17, 17), (18, 131), (132, 132), (133, 255))
# IPv6 needs these to resolve any neighbour (the node's too): never judged by policy, as
# ARP is not for IPv4.
NEIGHBOUR_DISCOVERY = ("icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, "
                       "nd-neighbor-advert, nd-redirect } accept")
_POD_MAPS = ("ingress-pods4", "ingress-pods6", "egress-pods4", "egress-pods6")


@functools.lru_cache(maxsize=65536)
def policy_id(policy: str) -> str:
    """A short, stable object-name-safe id for a ``namespace/name`` policy key."""
    return hashlib.sha256(policy.encode()).hexdigest()[:12]


_SERIALS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Rendered:
    """The table as plain data: the unit of full and incremental syncs.

    ``maps``: name -> declaration; ``chains``: name -> rules (base chains carry their hook in
    ``hooks``); ``elements``: map name -> {key: verdict}; ``counters``: counter names;
    ``policies``: policy id -> ``namespace/name`` (metrics labels)."""

    maps: Mapping[str, str] = field(default_factory=dict)
    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hooks: Mapping[str, str] = field(default_factory=dict)
    elements: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    counters: frozenset[str] = frozenset()
    policies: Mapping[str, str] = field(default_factory=dict)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    serial: int = field(default_factory=lambda: next(_SERIALS), compare=False)
    base: int | None = field(default=None, compare=False)
    """The ``serial`` of the table this one was patched from (``render`` with a cache);
    ``touched`` then lists, per element map, the keys whose verdict may differ from it
    (None: any), and the maps it does not list have the same elements."""
    touched: Mapping[str, frozenset[str] | None] = field(default_factory=dict, compare=False)


@dataclass
class ElementCache:
    """What one render leaves for the next (the daemon keeps one): ``elements`` maps
    (group name, family) to (the group rendered, its elements), reused while the group is
    the same (identical grants objects make that check cheap; no hashing of large tuples);
    ``state`` and ``rendered`` are the last render's input and output, which the next one
    patches where the state differs (``uses``: allow chain or policy id -> how many groups
    of it need it)."""

    elements: dict[tuple[str, int], tuple[Group, dict[str, str]]] = field(default_factory=dict)
    state: PolicyState | None = None
    rendered: Rendered | None = None
    options: tuple[bool, int | None] = (False, None)
    uses: dict[str, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.elements.clear()
        self.state = self.rendered = None
        self.uses.clear()


def render(state: PolicyState, *, log: bool = False, cache: ElementCache | None = None,
           log_group: int | None = None) -> Rendered:
    """The table for ``state``. ``cache`` (kept by the daemon between syncs) holds the
    last render: only the groups and pod addresses that differ from its state are rendered
    again (an unchanged group is not cut into boxes again); on return it holds this one."""
    if (cache is not None and cache.state is not None and cache.rendered is not None
            and cache.options == (log, log_group)):
        with gc_paused():
            return _patch(state, cache, log, log_group)
    out: list[Rendered] = []
    with gc_paused():  # its temporaries die by reference counting (see gc_paused)
        for _ in _render(iter(state.groups.values()), [state], log, cache, log_group, out,
                         stream=False):
            pass
    return out[0]


def stream_full(state: PolicyState, out: list[Rendered], *, log: bool = False,
                cache: ElementCache | None = None, log_group: int | None = None
                ) -> Iterator[str]:
    """``full_script(render(...))`` as chunks for ``nft``; ``out`` gets the ``Rendered``."""
    return _render(iter(state.groups.values()), [state], log, cache, log_group, out,
                   stream=True)


def stream_full_computing(groups: Iterator[Group], states: list[PolicyState],
                          out: list[Rendered], *, log: bool = False,
                          cache: ElementCache | None = None, log_group: int | None = None
                          ) -> Iterator[str]:
    """A full sync written while the state is being computed: ``groups`` is
    ``compute_stream``'s iterator, which leaves the state in ``states`` once exhausted. The
    table's frame goes first, then each group (its counters, maps, chains, elements) as
    soon as it is complete, last the pod maps."""
    return _render(groups, states, log, cache, log_group, out, stream=True)


def _render(groups: Iterator[Group], states: list[PolicyState], log: bool,
            cache: ElementCache | None, log_group: int | None, out: list[Rendered], *,
            stream: bool) -> Iterator[str]:
    maps: dict[str, str] = {
        "ingress-pods4": "{ type ipv4_addr : verdict ; }",
        "ingress-pods6": "{ type ipv6_addr : verdict ; }",
        "egress-pods4": "{ type ipv4_addr : verdict ; }",
        "egress-pods6": "{ type ipv6_addr : verdict ; }",
    }
    egress_check = ("ip saddr vmap @egress-pods4", "ip6 saddr vmap @egress-pods6")
    first = ("ct state established,related accept", NEIGHBOUR_DISCOVERY)
    chains: dict[str, tuple[str, ...]] = {
        "forward": (*first, *egress_check,
                    "ip daddr vmap @ingress-pods4", "ip6 daddr vmap @ingress-pods6"),
        # Only pods' traffic is judged here, so the lookups come first: the node-bound
        # traffic no pod sent (VXLAN from other nodes, say) costs two rules; a pod's
        # established traffic and neighbour discovery return from its out-G chain.
        "input": egress_check,
    }
    hooks = {"forward": "type filter hook forward priority filter ; policy accept ;",
             "input": "type filter hook input priority filter ; policy accept ;"}
    if stream:
        yield from _skeleton(Rendered(maps=maps, chains=chains, hooks=hooks))
    counters: set[str] = set()
    policies: dict[str, str] = {}
    group_policies: dict[str, tuple[str, ...]] = {}
    elements: dict[str, dict[str, str]] = {name: {} for name in _POD_MAPS}
    old_cache = dict(cache.elements) if cache is not None else {}
    new_cache: dict[tuple[str, int], tuple[Group, dict[str, str]]] = {}
    swept: Swept = {}
    texts = _Texts()
    for group in groups:
        d = "in" if group.direction == "ingress" else "out"
        name = group.name
        group_policies[name] = group.policies
        new_maps: dict[str, str] = {}
        new_chains: dict[str, tuple[str, ...]] = {}
        new_counters = [f"deny-{name}"]
        for policy in group.policies:
            pid = policy_id(policy)
            policies[pid] = policy
            allow = f"allow-{d}-{pid}"
            if allow not in chains:
                verdict = " accept" if d == "in" else ""
                new_chains[allow] = (f'counter name "{allow}"{verdict}',)
                new_counters.append(allow)
        new_maps[f"{name}-4"] = _GROUP_MAP4
        new_maps[f"{name}-6"] = _GROUP_MAP6
        new_chains[name] = _group_chain(group, log, log_group)
        maps.update(new_maps)
        chains.update(new_chains)
        counters.update(new_counters)
        lines: list[str] = []
        if stream:
            lines += [f"add counter {T} {c}\n" for c in new_counters]
            lines += [f"add map {T} {m} {decl}\n" for m, decl in new_maps.items()]
            lines += [f"add chain {T} {c}\n" for c in new_chains]
            lines += [f"add rule {T} {c} {rule}\n" for c, rs in new_chains.items() for rule in rs]
        for family in (4, 6):
            hit = old_cache.get((name, family))
            found = hit[1] if hit is not None and (hit[0] is group or hit[0] == group) else None
            if found is None:
                found = _element_map(group, family, swept, texts)  # type: ignore[arg-type]
            elements[f"{name}-{family}"] = found
            new_cache[name, family] = (group, found)
            if stream:
                lines += element_lines("add", f"{name}-{family}", found)
        if stream:
            yield "".join(lines)
    state = states[0]
    for direction, pods in (("ingress", state.ingress), ("egress", state.egress)):
        jump = "goto" if direction == "ingress" else "jump"
        for ip, name in pods.items():
            elements[f"{direction}-pods{6 if ':' in ip else 4}"][ip] = f"{jump} {name}"
    if stream:
        for name in _POD_MAPS:
            yield "".join(element_lines("add", name, elements[name]))
    rendered = Rendered(maps=maps, chains=chains, hooks=hooks, elements=elements,
                        counters=frozenset(counters), policies=policies,
                        groups=group_policies)
    if cache is not None:
        cache.elements = new_cache
        cache.state, cache.rendered, cache.options = state, rendered, (log, log_group)
        cache.uses = _uses(state.groups.values())
    out.append(rendered)


_GROUP_MAP4 = "{ type ipv4_addr . inet_proto . inet_service : verdict ; flags interval ; }"
_GROUP_MAP6 = "{ type ipv6_addr . inet_proto . inet_service : verdict ; flags interval ; }"


def _group_chain(group: Group, log: bool, log_group: int | None) -> tuple[str, ...]:
    name = group.name
    peer = "saddr" if group.direction == "ingress" else "daddr"
    # In forward these come first already; the input chain jumps here directly.
    rules: list[str] = [] if group.direction == "ingress" else [
        "ct state established,related return",
        NEIGHBOUR_DISCOVERY.replace(" accept", " return")]
    rules.append(f"ip {peer} . meta l4proto . th dport vmap @{name}-4")
    rules.append(f"ip6 {peer} . meta l4proto . th dport vmap @{name}-6")
    if log:
        # The group names the isolating policies; the daemon reading the NFLOG group
        # names the pods from the packet's addresses.
        prefix = f"{LOG_PREFIX} {group.direction} {name}"
        target = f" group {log_group}" if log_group is not None else ""
        rules.append(f'limit rate {LOG_RATE} log prefix "{prefix}: "{target}')
    rules.append(f'counter name "deny-{name}" drop')
    return tuple(rules)


def _allow_chains(group: Group) -> Iterator[tuple[str, str]]:
    """(allow chain, policy id) of each of a group's policies."""
    d = "in" if group.direction == "ingress" else "out"
    for policy in group.policies:
        pid = policy_id(policy)
        yield f"allow-{d}-{pid}", pid


def _uses(groups: Iterable[Group]) -> dict[str, int]:
    uses: dict[str, int] = defaultdict(int)
    for group in groups:
        for allow, pid in _allow_chains(group):
            uses[allow] += 1
            uses[pid] += 1
    return dict(uses)


def _patch(state: PolicyState, cache: ElementCache, log: bool, log_group: int | None
           ) -> Rendered:
    """``render`` by patching the last render where ``state`` differs from its state:
    the groups that are not the very same objects, and the pod addresses whose group
    changed (a few dictionary operations per address in C)."""
    before, prev = cache.state, cache.rendered
    assert before is not None and prev is not None
    maps, chains, elements = dict(prev.maps), dict(prev.chains), dict(prev.elements)
    counters, policies, groups = set(prev.counters), dict(prev.policies), dict(prev.groups)
    touched: dict[str, frozenset[str] | None] = {}
    uses = cache.uses
    gone = [g for name, g in before.groups.items() if state.groups.get(name) is not g]
    kept: dict[tuple[str, int], tuple[Group, dict[str, str]]] = {}
    for group in gone:
        name = group.name
        for family in (4, 6):
            del maps[f"{name}-{family}"]
            del elements[f"{name}-{family}"]
            hit = cache.elements.pop((name, family), None)
            if hit is not None:
                kept[name, family] = hit
            touched[f"{name}-{family}"] = None
        del chains[name]
        del groups[name]
        counters.discard(f"deny-{name}")
        for allow, pid in _allow_chains(group):
            uses[allow] -= 1
            if not uses[allow]:
                del uses[allow], chains[allow]
                counters.discard(allow)
            uses[pid] -= 1
            if not uses[pid]:
                del uses[pid], policies[pid]
    swept: Swept = {}
    texts = _Texts()
    for name, group in state.groups.items():
        if before.groups.get(name) is group:
            continue
        d = "in" if group.direction == "ingress" else "out"
        maps[f"{name}-4"], maps[f"{name}-6"] = _GROUP_MAP4, _GROUP_MAP6
        chains[name] = _group_chain(group, log, log_group)
        groups[name] = group.policies
        counters.add(f"deny-{name}")
        for (allow, pid), policy in zip(_allow_chains(group), group.policies, strict=True):
            uses[allow] = uses.get(allow, 0) + 1
            if uses[allow] == 1:
                chains[allow] = (f'counter name "{allow}"{" accept" if d == "in" else ""}',)
                counters.add(allow)
            uses[pid] = uses.get(pid, 0) + 1
            policies[pid] = policy
        for family in (4, 6):
            hit = kept.get((name, family))
            if hit is not None and hit[0] == group:  # rebuilt, but the same grants
                found = hit[1]
            else:
                found = _element_map(group, family, swept, texts)  # type: ignore[arg-type]
            elements[f"{name}-{family}"] = found
            cache.elements[name, family] = (group, found)
            touched[f"{name}-{family}"] = None
    for direction, now, was in (("ingress", state.ingress, before.ingress),
                                ("egress", state.egress, before.egress)):
        jump = "goto" if direction == "ingress" else "jump"
        get = was.get
        moved = [(ip, g) for ip, g in now.items() if get(ip) != g]
        left = was.keys() - now.keys() if len(was) + len(moved) > len(now) else ()
        for family in (4, 6):
            name = f"{direction}-pods{family}"
            here = [(ip, g) for ip, g in moved if (":" in ip) == (family == 6)]
            out = [ip for ip in left if (":" in ip) == (family == 6)]
            if not here and not out:
                continue
            table = elements[name] = dict(elements[name])
            for ip in out:
                del table[ip]
            table.update((ip, f"{jump} {g}") for ip, g in here)
            touched[name] = frozenset(out).union(ip for ip, _ in here)
    rendered = Rendered(maps=maps, chains=chains, hooks=prev.hooks, elements=elements,
                        counters=frozenset(counters), policies=policies, groups=groups,
                        base=prev.serial, touched=touched)
    cache.state, cache.rendered = state, rendered
    return rendered


Swept = dict[Any, list[tuple[int, int, tuple[tuple[int, int, int], ...]]]]
"""One render's sweeps by signature: groups of different policies with rules of the same
shape (one policy per namespace, say) share peer tuples and port ranges, so their boxes
and sweeps are the same up to policy names."""


class _Texts:
    """One render's element key parts, each formatted once: the address texts by (first,
    last) per family, and per protocol class the tails (`` . proto . ports``) and ranks of
    each port-segments tuple. Those tuples are keyed by identity: the render's sweeps
    (``Swept``) share one tuple between the addresses allowed on the same ports, and the
    entry keeps it alive, so an id is never reused while it is cached."""

    __slots__ = ("addresses", "tails")

    def __init__(self) -> None:
        self.addresses: dict[int, dict[tuple[int, int], str]] = {4: {}, 6: {}}
        self.tails: dict[tuple[int, int], dict[int, tuple[object, tuple[str, ...],
                                                         tuple[int, ...]]]] = {}


def group_elements(group: Group, family: Family, swept: Swept | None = None,
                   texts: _Texts | None = None) -> Iterator[tuple[str, str]]:
    """(element key, policy id) of a group's map for one family: disjoint boxes of
    peer address range . protocol range . port range."""
    ranked, classes = _boxes(group, family, {} if swept is None else swept)
    ids = [policy_id(p) for p in ranked]
    keys, ranks = _element_keys(family, classes, _Texts() if texts is None else texts)
    for key, r_ in zip(keys, ranks, strict=True):
        yield key, ids[r_]


def _element_map(group: Group, family: Family, swept: Swept, texts: _Texts
                 ) -> dict[str, str]:
    """``group_elements`` as the map's {key: verdict} (the render's hot loop)."""
    ranked, classes = _boxes(group, family, swept)
    d = "in" if group.direction == "ingress" else "out"
    verdicts = [f"goto allow-{d}-{policy_id(p)}" for p in ranked]
    keys, ranks = _element_keys(family, classes, texts)
    return dict(zip(keys, map(verdicts.__getitem__, ranks), strict=True))


def _element_keys(family: Family, classes: list[tuple[tuple[int, int], Any]], texts: _Texts
                  ) -> tuple[list[str], list[int]]:
    """The keys of a group's boxes and the rank each is credited to. An address allowed
    on one port segment (most are) costs two dictionary look-ups and one concatenation."""
    keys: list[str] = []
    ranks: list[int] = []
    add_key, add_rank = keys.append, ranks.append
    addresses = texts.addresses[family]
    addr_get = addresses.get
    for cls, ranges in classes:
        tails = texts.tails.get(cls)
        if tails is None:
            tails = texts.tails[cls] = {}
        tails_get = tails.get
        for a_lo, a_hi, ports in ranges:
            addr = addr_get((a_lo, a_hi))
            if addr is None:
                addr = addresses[a_lo, a_hi] = _address_text(family, a_lo, a_hi)
            found = tails_get(id(ports))
            if found is None:
                found = tails[id(ports)] = _tails(cls, ports)
            _, ends, owners = found
            if len(ends) == 1:
                add_key(addr + ends[0])
                add_rank(owners[0])
            else:
                keys += [addr + end for end in ends]
                ranks += owners
    return keys, ranks


def _tails(cls: tuple[int, int], ports: tuple[tuple[int, int, int], ...]
           ) -> tuple[object, tuple[str, ...], tuple[int, ...]]:
    proto = str(cls[0]) if cls[0] == cls[1] else f"{cls[0]}-{cls[1]}"
    ends = tuple(f" . {proto} . {lo}" if lo == hi else f" . {proto} . {lo}-{hi}"
                 for lo, hi, _ in ports)
    return ports, ends, tuple(r_ for _, _, r_ in ports)


def _boxes(group: Group, family: Family, swept: Swept
           ) -> tuple[list[str], list[tuple[tuple[int, int], Any]]]:
    """The group's policies ranked by name, and per protocol class its disjoint boxes
    (address first, last, port segments credited to a rank)."""
    ranked = sorted({g.policy for g in group.grants})
    rank = {p: i for i, p in enumerate(ranked)}
    # Only port-less grants (the common "allow from these pods"): one protocol range.
    any_only = all(p.protocol == ANY for g in group.grants for p in g.ports)
    any_classes = ((0, 255),) if any_only else _PROTO_CLASSES
    # (protocol class, port first, port last, rank, peers): peer tuples are shared between
    # policies (state's cache), so their identity stands for their content in one render.
    parts: set[tuple[tuple[int, int], int, int, int, int]] = set()
    peers_of: dict[int, tuple[AddressRange, ...]] = {}
    for grant in group.grants:
        r_ = rank[grant.policy]
        peers_of[id(grant.peers)] = grant.peers
        for port in grant.ports:
            if port.protocol == ANY:
                parts.update((c, 0, 65535, r_, id(grant.peers)) for c in any_classes)
            else:
                n = _PROTO_NUMBERS[port.protocol]
                parts.add(((n, n), port.first, port.last, r_, id(grant.peers)))
    by_class: dict[tuple[int, int], list[tuple[int, int, int, int]]] = defaultdict(list)
    for cls, lo, hi, r_, peers_id in parts:
        by_class[cls].append((lo, hi, r_, peers_id))
    classes: list[tuple[tuple[int, int], Any]] = []
    for cls in sorted(by_class):
        # Not the class: the boxes of every protocol class with the same parts (the
        # "any protocol" grants' classes, say) are the same.
        signature = (family, tuple(sorted(by_class[cls])))
        ranges = swept.get(signature)
        if ranges is None:
            ranges = swept[signature] = _sweep_class(by_class[cls], peers_of, family, swept)
        classes.append((cls, ranges))
    return ranked, classes


def _sweep_class(parts: list[tuple[int, int, int, int]],
                 peers_of: dict[int, tuple[AddressRange, ...]], family: Family,
                 swept: Swept) -> list[tuple[int, int, tuple[tuple[int, int, int], ...]]]:
    """The disjoint boxes of one protocol class. Several policies often allow the same
    peers on the same ports: the port segments credit the first policy."""
    sources: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for lo, hi, r_, peers_id in parts:
        sources[lo, hi, r_].append(peers_id)
    ranges: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for span, ids in sources.items():
        if len(ids) == 1:
            here = _merged(peers_of[ids[0]], family, swept)
        else:
            here = _merge(sorted(r for i in ids for r in _merged(peers_of[i], family, swept)))
        if here:
            ranges[span] = here
    return _disjoint(ranges)


def _merged(peers: tuple[AddressRange, ...], family: Family, swept: Swept
            ) -> list[tuple[int, int]]:
    """A peers tuple's ranges of one family, merged (``_merge``), once per render: the
    same tuple is a peer of many groups. The tuple is sorted in C (the state's come sorted:
    a linear pass) and cut at the family boundary, so no per-range work is in Python but
    the merge."""
    key = ("merged", id(peers), family)
    found = swept.get(key)
    if found is None:
        ordered = sorted(peers)
        cut = bisect.bisect_left(ordered, (6,))
        found = swept[key] = _merge_peers(  # type: ignore[assignment]
            ordered[:cut] if family == 4 else ordered[cut:])
    return found  # type: ignore[return-value]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with the overlapping and adjacent ones joined."""
    if not ranges:
        return []
    out: list[tuple[int, int]] = []
    lo, hi = ranges[0]
    for a_lo, a_hi in ranges:
        if a_lo > hi + 1:
            out.append((lo, hi))
            lo, hi = a_lo, a_hi
        elif a_hi > hi:
            hi = a_hi
    out.append((lo, hi))
    return out


def _merge_peers(ranges: list[AddressRange]) -> list[tuple[int, int]]:
    """``_merge`` of sorted ranges of one family, read from the ``AddressRange`` as they
    are (no pairs built first: the peers of a cold render are ~100k ranges)."""
    if not ranges:
        return []
    out: list[tuple[int, int]] = []
    _, lo, hi = ranges[0]
    for _, a_lo, a_hi in ranges:
        if a_lo > hi + 1:
            out.append((lo, hi))
            lo, hi = a_lo, a_hi
        elif a_hi > hi:
            hi = a_hi
    out.append((lo, hi))
    return out


def _address_text(family: Family, first: int, last: int) -> str:
    """An address, a CIDR when the range is one, else ``first-last``."""
    af, bits = (socket.AF_INET, 32) if family == 4 else (socket.AF_INET6, 128)
    text = socket.inet_ntop(af, first.to_bytes(bits // 8, "big"))
    if first == last:
        return text
    size = last - first + 1
    if size & (size - 1) == 0 and first % size == 0:
        return f"{text}/{bits - size.bit_length() + 1}"
    return f"{text}-{socket.inet_ntop(af, last.to_bytes(bits // 8, 'big'))}"


def _disjoint(ranges: Mapping[tuple[int, int, int], list[tuple[int, int]]]
              ) -> list[tuple[int, int, tuple[tuple[int, int, int], ...]]]:
    """Sweep the address axis: yield (first, last, port segments) for maximal address
    ranges over which the covering (port range, rank) spans do not change, each port
    segment credited to the lowest-ranked span covering it.

    Each span's address ranges come merged (``_merge``), so at any address a span starts
    or ends at most once: the covering spans are a bit mask toggled by XOR at each event,
    and a mask's port segments are computed once per mask. Consecutive pod addresses
    allowed on the same ports (the common case) cost one XOR and one dictionary look-up
    each."""
    spans = list(ranges)
    if len(spans) == 1:  # merged ranges never touch: each is a box as it is
        only = (spans[0],)
        return [(lo, hi, only) for lo, hi in ranges[spans[0]]]
    out: list[tuple[int, int, tuple[tuple[int, int, int], ...]]] = []
    add = out.append
    events: dict[int, int] = {}
    get = events.get
    for bit, span in enumerate(spans):
        flag = 1 << bit
        for lo, hi in ranges[span]:
            events[lo] = get(lo, 0) ^ flag
            events[hi + 1] = get(hi + 1, 0) ^ flag
    known: dict[int, tuple[tuple[int, int, int], ...]] = {0: ()}
    mask = 0
    segments: tuple[tuple[int, int, int], ...] = ()
    start = 0
    for point in sorted(events):
        mask ^= events[point]
        now = known.get(mask)
        if now is None:
            now = known[mask] = _port_segments(
                [spans[i] for i in range(mask.bit_length()) if mask >> i & 1])
        if now == segments:
            continue
        if segments:
            add((start, point - 1, segments))
        segments, start = now, point
    return out


def _port_segments(active: Iterable[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    spans = sorted(active)
    if len(spans) == 1:
        return (spans[0],)
    cuts = sorted({lo for lo, _, _ in spans} | {hi + 1 for _, hi, _ in spans})
    out: list[tuple[int, int, int]] = []
    for lo, nxt in itertools.pairwise(cuts):
        owners = [r for s_lo, s_hi, r in spans if s_lo <= lo and nxt - 1 <= s_hi]
        if not owners:
            continue
        r = min(owners)
        if out and out[-1][2] == r and out[-1][1] + 1 == lo:
            out[-1] = (out[-1][0], nxt - 1, r)
        else:
            out.append((lo, nxt - 1, r))
    return tuple(out)


# --- scripts ----------------------------------------------------------------------------


def render_full(state: PolicyState, *, log: bool = False, log_group: int | None = None
                ) -> str:
    """One ``nft -f`` transaction that replaces the table with the desired state."""
    return "".join(full_script(render(state, log=log, log_group=log_group)))


def full_script(r: Rendered) -> Iterator[str]:
    yield from _skeleton(r)
    for name, elems in r.elements.items():
        yield from element_lines("add", name, elems)


def _skeleton(r: Rendered) -> Iterator[str]:
    """Replace the table with ``r``'s counters, maps and chains (no elements)."""
    yield f"add table {T}\ndelete table {T}\nadd table {T}\n"
    lines: list[str] = [f"add counter {T} {name}" for name in sorted(r.counters)]
    lines += [f"add map {T} {name} {decl}" for name, decl in r.maps.items()]
    lines += [_add_chain(r, name) for name in r.chains]
    yield "\n".join(lines) + "\n"
    for name, rules in r.chains.items():
        yield "".join(f"add rule {T} {name} {rule}\n" for rule in rules)


def update_script(old: Rendered, new: Rendered) -> str:
    """The incremental transaction from ``old`` (what the kernel has) to ``new``: only
    changed chains are rewritten and only changed elements added or deleted."""
    head: list[str] = [f"add counter {T} {n}" for n in sorted(new.counters - old.counters)]
    head += [f"add map {T} {n} {d}" for n, d in new.maps.items() if n not in old.maps]
    head += [_add_chain(new, n) for n in new.chains if n not in old.chains]
    body: list[str] = []
    for name, rules in new.chains.items():
        before = old.chains.get(name)
        if before == rules:
            continue
        if before is not None:
            body.append(f"flush chain {T} {name}")
        body += [f"add rule {T} {name} {rule}" for rule in rules]
    deletes: list[str] = []
    adds: list[str] = []
    hinted = new.base == old.serial
    for name, after in new.elements.items():
        had = old.elements.get(name, {})
        if had is after:  # a group the render cache kept: the very same elements
            continue
        if hinted:  # patched from ``old``: only the keys it says may differ
            if name not in new.touched:
                continue
            keys = new.touched[name]
            if keys is not None:
                gone = {k: had[k] for k in keys if k in had and after.get(k) != had[k]}
                if name in old.maps:
                    deletes += element_lines("delete", name, gone)
                adds += element_lines("add", name, {k: after[k] for k in keys if k in after
                                                    and had.get(k) != after[k]})
                continue
        gone = {k: v for k, v in had.items() if after.get(k) != v}
        if name in old.maps:
            deletes += element_lines("delete", name, gone)
        adds += element_lines("add", name, {k: v for k, v in after.items() if had.get(k) != v})
    tail = [f"flush chain {T} {n}" for n in old.chains if n not in new.chains]
    tail += [f"delete map {T} {n}" for n in old.maps if n not in new.maps]
    tail += [f"delete chain {T} {n}" for n in old.chains if n not in new.chains]
    tail += [f"delete counter {T} {n}" for n in sorted(old.counters - new.counters)]
    lines = [*head, *body, *(x.rstrip("\n") for x in deletes), *(x.rstrip("\n") for x in adds),
             *tail]
    return "\n".join(lines) + "\n" if lines else ""


def element_lines(op: str, name: str, elems: Mapping[str, str]) -> list[str]:
    if op == "add" and all(elems.values()):
        items = list(map(" : ".join, elems.items()))
    else:
        items = [f"{k} : {v}" if v and op == "add" else k for k, v in elems.items()]
    return [f"{op} element {T} {name} {{ {', '.join(items[i:i + ELEMENT_BATCH])} }}\n"
            for i in range(0, len(items), ELEMENT_BATCH)]


def _add_chain(r: Rendered, name: str) -> str:
    hook = r.hooks.get(name)
    return f"add chain {T} {name}" + (f" {{ {hook} }}" if hook else "")


def delete_script() -> str:
    return f"add table {T}\ndelete table {T}\n"


def parse_address(text: str) -> tuple[int, int, int]:
    """(family, first, last) of an element's address field: address, CIDR or range."""
    if "-" in text and "/" not in text:
        lo, hi = (ipaddress.ip_address(x) for x in text.split("-", 1))
        return lo.version, int(lo), int(hi)
    net = ipaddress.ip_network(text, strict=False)
    return net.version, int(net.network_address), int(net.broadcast_address)
