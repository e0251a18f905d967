"""Why a connection is allowed or denied: over the desired state, and over the ruleset.

``trace`` answers from ``PolicyState`` (the same data the renderer reads) and names every
policy rule that allows, or the policies that isolate and allow nothing. ``RulesetTracer``
evaluates the rendered ``nft`` script's maps the way the kernel walks them (pod map, then
the group's concatenated interval map); tests check that both agree.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from svcnet.policy.state import Direction, PolicyState

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1, "ICMPV6": 58}


@dataclass(frozen=True, slots=True)
class Step:
    """One direction's check: ``pod`` is the isolated pod (None: not isolated)."""

    direction: Direction
    pod: str | None
    isolated_by: tuple[str, ...]
    allowed_by: tuple[str, ...]

    @property
    def allowed(self) -> bool:
        return not self.isolated_by or bool(self.allowed_by)

    def explain(self) -> str:
        if not self.isolated_by:
            return f"{self.direction}: {self.pod or 'peer'} not isolated for {self.direction}"
        who = ", ".join(self.isolated_by)
        if self.allowed_by:
            return (f"{self.direction}: {self.pod} isolated by {who}; allowed by "
                    f"{', '.join(self.allowed_by)}")
        return f"{self.direction}: {self.pod} isolated by {who}; no rule allows: DENIED"


@dataclass(frozen=True, slots=True)
class Trace:
    allowed: bool
    steps: tuple[Step, ...]
    note: str = ""

    def explain(self) -> str:
        lines = [s.explain() for s in self.steps]
        if self.note:
            lines.append(self.note)
        lines.append("verdict: " + ("ALLOW" if self.allowed else "DENY"))
        return "\n".join(lines)


def trace(state: PolicyState, src: str, dst: str, protocol: str, port: int, *,
          node_addresses: Iterable[str] = ()) -> Trace:
    """The verdict for a new connection ``src -> dst:port/protocol`` (after DNAT)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    protocol = protocol.upper()
    if s == d:
        return Trace(True, (), "a pod reaching itself never leaves its namespace")
    if src in set(node_addresses):
        return Trace(True, (), "traffic from the node to its pods is always allowed")
    steps = (_step(state, "egress", src, d, protocol, port),
             _step(state, "ingress", dst, s, protocol, port))
    return Trace(all(st.allowed for st in steps), steps)


def _step(state: PolicyState, direction: Direction, pod_ip: str, peer: Address,
          protocol: str, port: int) -> Step:
    pods = state.ingress if direction == "ingress" else state.egress
    pod = state.pods.get(pod_ip, pod_ip)
    name = pods.get(pod_ip)
    if name is None:
        return Step(direction, pod, (), ())
    group = state.groups[name]
    allowed = tuple(f"{g.policy} ({direction} rule {g.rule})" for g in group.grants
                    if g.allows(peer, protocol, port))
    return Step(direction, pod, group.policies, allowed)


# --- the ruleset ------------------------------------------------------------------------

_ELEMENTS = re.compile(r"^add element inet \S+ (\S+) \{ (.*) \}$")


@dataclass(frozen=True, slots=True)
class _Box:
    family: int
    addr: tuple[int, int]
    proto: tuple[int, int]
    port: tuple[int, int]
    verdict: str


def _span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


class RulesetTracer:
    """Walks the maps of a rendered script as the kernel would for one packet."""

    def __init__(self, script: str) -> None:
        from svcnet.policy.nftables import parse_address

        self.pod_maps: dict[str, dict[Address, str]] = {}
        self.boxes: dict[str, list[_Box]] = {}
        for line in script.splitlines():
            m = _ELEMENTS.match(line)
            if not m:
                continue
            name, body = m.groups()
            for item in body.split(", "):
                key, _, verdict = item.partition(" : ")
                if name.endswith(("-pods4", "-pods6")):
                    self.pod_maps.setdefault(name, {})[ipaddress.ip_address(key)] = verdict
                    continue
                addr, proto, port = key.split(" . ")
                family, lo, hi = parse_address(addr)
                self.boxes.setdefault(name, []).append(
                    _Box(family, (lo, hi), _span(proto), _span(port), verdict))

    def verdict(self, src: str, dst: str, protocol: str, port: int) -> tuple[bool, list[str]]:
        """(accepted, the allow chains passed) for a new connection in the forward hook."""
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        proto = PROTOCOL_NUMBERS[protocol.upper()]
        passed: list[str] = []
        fam = 4 if s.version == 4 else 6
        for direction, pod, peer in (("egress", s, d), ("ingress", d, s)):
            target = self.pod_maps.get(f"{direction}-pods{fam}", {}).get(pod)
            if target is None:
                continue
            group = target.split()[1]
            hit = self._lookup(f"{group}-{fam}", peer, proto, port)
            if hit is None:
                return False, passed
            passed.append(hit.split()[1])
        return True, passed

    def _lookup(self, name: str, peer: Address, proto: int, port: int) -> str | None:
        found = [b.verdict for b in self.boxes.get(name, ())
                 if b.addr[0] <= int(peer) <= b.addr[1] and b.proto[0] <= proto <= b.proto[1]
                 and b.port[0] <= port <= b.port[1]]
        if len(found) > 1:
            raise AssertionError(f"{name}: overlapping elements match {peer} {proto} {port}")
        return found[0] if found else None


def pod_address(state: PolicyState, ref: str) -> str:
    """``namespace/pod`` (or an address) -> an address of that pod."""
    if "/" not in ref:
        return str(ipaddress.ip_address(ref))
    for ip, name in state.pods.items():
        if name == ref:
            return ip
    raise KeyError(f"no pod {ref} with an address")
