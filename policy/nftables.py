"""NetworkPolicy rendered into the nftables table ``inet svcnet-policy``.

Layout (docs/policy.md has the why)::

    chain forward  (hook forward, priority filter)     chain input (hook input)
      ct state established,related accept               ct state established,related accept
      icmpv6 type { nd-... } accept (neighbour discovery) (same)
      ip saddr vmap @egress-pods4   -> jump out-G        ip saddr vmap @egress-pods4
      ip6 saddr vmap @egress-pods6  -> jump out-G        ip6 saddr vmap @egress-pods6
      ip daddr vmap @ingress-pods4  -> goto in-G
      ip6 daddr vmap @ingress-pods6 -> goto in-G
    chain in-G     ip saddr . meta l4proto . th dport vmap @in-G-4 -> goto allow-in-P
                   (same for ip6)  [limit + log]  counter name deny-in-G  drop
    chain out-G    ip daddr . meta l4proto . th dport vmap @out-G-4 -> goto allow-out-P
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

import hashlib
import ipaddress
import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from svcnet.policy.state import ANY, AddressRange, Family, Group, PolicyState

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


def policy_id(policy: str) -> str:
    """A short, stable object-name-safe id for a ``namespace/name`` policy key."""
    return hashlib.sha256(policy.encode()).hexdigest()[:12]


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


ElementCache = dict[tuple[str, int], tuple[Group, dict[str, str]]]
"""(group name, family) -> (the group rendered, its elements): reused while the group is
the same (identical grants objects make that check cheap; no hashing of large tuples)."""


def render(state: PolicyState, *, log: bool = False, cache: ElementCache | None = None,
           log_group: int | None = None) -> Rendered:
    """The table for ``state``. ``cache`` (kept by the daemon between syncs) maps
    (group, family) to its elements: an unchanged group is not cut into boxes again; on
    return it holds exactly the groups of this state."""
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
        "input": (*first, *egress_check),
    }
    hooks = {"forward": "type filter hook forward priority filter ; policy accept ;",
             "input": "type filter hook input priority filter ; policy accept ;"}
    elements: dict[str, dict[str, str]] = {name: {} for name in _POD_MAPS}
    counters: set[str] = set()
    policies: dict[str, str] = {}
    groups: dict[str, tuple[str, ...]] = {}
    old_cache: ElementCache = dict(cache) if cache is not None else {}
    swept: Swept = {}
    new_cache: ElementCache = {}
    for group in state.groups.values():
        d = "in" if group.direction == "ingress" else "out"
        peer = "saddr" if d == "in" else "daddr"
        name = group.name
        groups[name] = group.policies
        rules: list[str] = []
        for family in (4, 6):
            ip = "ip" if family == 4 else "ip6"
            addr = "ipv4_addr" if family == 4 else "ipv6_addr"
            maps[f"{name}-{family}"] = (f"{{ type {addr} . inet_proto . inet_service : "
                                        "verdict ; flags interval ; }")
            rules.append(f"{ip} {peer} . meta l4proto . th dport vmap @{name}-{family}")
            hit = old_cache.get((name, family))
            found = hit[1] if hit is not None and (hit[0] is group or hit[0] == group) else None
            if found is None:
                found = {key: f"goto allow-{d}-{pid}"
                         for key, pid in group_elements(group, family, swept)}  # type: ignore[arg-type]
            elements[f"{name}-{family}"] = found
            new_cache[name, family] = (group, found)
        if log:
            # The group names the isolating policies; the daemon reading the NFLOG group
            # names the pods from the packet's addresses.
            prefix = f"{LOG_PREFIX} {group.direction} {name}"
            target = f" group {log_group}" if log_group is not None else ""
            rules.append(f'limit rate {LOG_RATE} log prefix "{prefix}: "{target}')
        rules.append(f'counter name "deny-{name}" drop')
        counters.add(f"deny-{name}")
        chains[name] = tuple(rules)
        for policy in group.policies:
            pid = policy_id(policy)
            policies[pid] = policy
            allow = f"allow-{d}-{pid}"
            if allow not in chains:
                verdict = " accept" if d == "in" else ""
                chains[allow] = (f'counter name "{allow}"{verdict}',)
                counters.add(allow)
    for direction, pods in (("ingress", state.ingress), ("egress", state.egress)):
        jump = "goto" if direction == "ingress" else "jump"
        for ip, name in pods.items():
            elements[f"{direction}-pods{6 if ':' in ip else 4}"][ip] = f"{jump} {name}"
    if cache is not None:
        cache.clear()
        cache.update(new_cache)
    return Rendered(maps=maps, chains=chains, hooks=hooks, elements=elements,
                    counters=frozenset(counters), policies=policies, groups=groups)


def group_elements(group: Group, family: Family, swept: Swept | None = None
                   ) -> Iterator[tuple[str, str]]:
    """(element key, policy id) of a group's map for one family: disjoint boxes of
    peer address range . protocol range . port range."""
    # per protocol class: [(addr first, addr last, port first, port last, rank)]
    # Several policies often allow the same peers on the same ports: one box each, credited
    # to the first policy.
    boxes: dict[tuple[int, int], dict[tuple[int, int, int, int], int]] = defaultdict(dict)
    ranked = sorted({g.policy for g in group.grants})
    rank = {p: i for i, p in enumerate(ranked)}
    # Only port-less grants (the common "allow from these pods"): one protocol range.
    any_only = all(p.protocol == ANY for g in group.grants for p in g.ports)
    any_classes = ((0, 255),) if any_only else _PROTO_CLASSES
    for grant in group.grants:
        peers = [r for r in grant.peers if r.family == family]
        if not peers:
            continue
        r_ = rank[grant.policy]
        for port in grant.ports:
            if port.protocol == ANY:
                classes = [(c, 0, 65535) for c in any_classes]
            else:
                n = _PROTO_NUMBERS[port.protocol]
                classes = [((n, n), port.first, port.last)]
            for cls, lo, hi in classes:
                found = boxes[cls]
                for a in peers:
                    key = (a.first, a.last, lo, hi)
                    if found.setdefault(key, r_) > r_:
                        found[key] = r_
    ids = [policy_id(p) for p in ranked]
    for cls in sorted(boxes):
        proto = str(cls[0]) if cls[0] == cls[1] else f"{cls[0]}-{cls[1]}"
        for a_lo, a_hi, ports in _disjoint_cached(boxes[cls], {} if swept is None else swept):
            addr = str(AddressRange(family, a_lo, a_hi))
            for p_lo, p_hi, r_ in ports:
                ports_text = str(p_lo) if p_lo == p_hi else f"{p_lo}-{p_hi}"
                yield f"{addr} . {proto} . {ports_text}", ids[r_]


Swept = dict[frozenset[tuple[tuple[int, int, int, int], int]],
             list[tuple[int, int, tuple[tuple[int, int, int], ...]]]]


def _disjoint_cached(boxes: dict[tuple[int, int, int, int], int], swept: Swept
                     ) -> list[tuple[int, int, tuple[tuple[int, int, int], ...]]]:
    """``_disjoint``, remembered for one render: groups of different policies with rules of
    the same shape (one per namespace, say) have the same boxes up to policy names."""
    key = frozenset(boxes.items())
    found = swept.get(key)
    if found is None:
        found = swept[key] = list(_disjoint(boxes.items()))
    return found


def _disjoint(boxes: Iterable[tuple[tuple[int, int, int, int], int]]
              ) -> Iterator[tuple[int, int, tuple[tuple[int, int, int], ...]]]:
    """Sweep the address axis: yield (first, last, port segments) for maximal address
    ranges over which the covering boxes do not change, each port segment credited to the
    lowest-ranked box covering it.

    Only the (port range, rank) spans matter, so the sweep counts those: consecutive pod
    addresses allowed on the same ports (the common case) never change the span set and
    cost one dictionary update each."""
    events: dict[int, list[tuple[tuple[int, int, int], int]]] = defaultdict(list)
    for (a_lo, a_hi, p_lo, p_hi), rank in boxes:
        span = (p_lo, p_hi, rank)
        events[a_lo].append((span, 1))
        events[a_hi + 1].append((span, -1))
    active: dict[tuple[int, int, int], int] = {}
    computed_for: frozenset[tuple[int, int, int]] = frozenset()
    segments: tuple[tuple[int, int, int], ...] = ()
    start = 0
    for point in sorted(events):
        changed = False
        for span, delta in events[point]:
            count = active.get(span, 0) + delta
            if count:
                changed = changed or span not in active
                active[span] = count
            else:
                del active[span]
                changed = True
        if not changed or active.keys() == computed_for:
            continue
        computed_for = frozenset(active)
        now = _port_segments(computed_for) if active else ()
        if now == segments:
            continue
        if segments:
            yield start, point - 1, segments
        segments, start = now, point


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
    yield f"add table {T}\ndelete table {T}\nadd table {T}\n"
    lines: list[str] = [f"add counter {T} {name}" for name in sorted(r.counters)]
    lines += [f"add map {T} {name} {decl}" for name, decl in r.maps.items()]
    lines += [_add_chain(r, name) for name in r.chains]
    yield "\n".join(lines) + "\n"
    for name, rules in r.chains.items():
        yield "".join(f"add rule {T} {name} {rule}\n" for rule in rules)
    for name, elems in r.elements.items():
        yield from element_lines("add", name, elems)


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
    for name, after in new.elements.items():
        had = old.elements.get(name, {})
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
