"""Packet tracers over the rules the kernel holds: ``iptables-save`` text and ``nft -j`` JSON.

Tests state proxy behaviour as packet-flow tables {source, protocol, destination, port ->
endpoints or DROP/REJECT, masqueraded?}; the tracers answer those questions from the dumped
rules, following every branch of random balancing (``statistic``/``numgen``), so "reaches
every endpoint" is exact rather than sampled. They understand the constructs our backends
generate (and raise ``Unsupported`` on anything else) -- not general firewalls.

Packet path: from outside, PREROUTING (nft filter at -110, then nat), then INPUT if the
destination is a node address else FORWARD, then nat POSTROUTING. From the node itself:
OUTPUT (nat, filter), then POSTROUTING. A tracked first packet: ``ct state new``; ClientIP
affinity memory is empty (a fresh client).
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from svcnet.proxy.ipvs_kernel import IpvsTable
from svcnet.proxy.nft_model import NftChain, NftSet, NftTable, parse_nft_json

from svcnet.iptables_save import tables_of


class Unsupported(Exception):
    """A rule construct the tracer does not model."""


@dataclass(frozen=True, slots=True)
class Packet:
    src: str
    dst: str
    port: int
    protocol: str = "TCP"
    from_node: bool = False  # originated by a process on the node (OUTPUT path)
    iif: str = ""  # input interface for packets from outside


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: str  # ACCEPT, DROP or REJECT
    destination: str = ""  # "ip:port" after DNAT; empty if not translated
    masquerade: bool = False


@dataclass(frozen=True, slots=True)
class Trace:
    outcomes: frozenset[Outcome]

    @property
    def endpoints(self) -> set[str]:
        return {o.destination for o in self.outcomes if o.verdict == "ACCEPT" and o.destination}

    @property
    def verdicts(self) -> set[str]:
        return {o.verdict for o in self.outcomes}

    @property
    def masquerade(self) -> set[bool]:
        return {o.masquerade for o in self.outcomes if o.verdict == "ACCEPT"}

    def summary(self) -> tuple[Any, ...]:
        """(sorted endpoints, masquerade) or (verdict,) -- the shape packet tables use."""
        if self.verdicts == {"ACCEPT"} and self.endpoints and all(
            o.destination for o in self.outcomes
        ):
            masq = self.masquerade
            return (sorted(self.endpoints), masq.pop() if len(masq) == 1 else "mixed")
        if len(self.verdicts) == 1 and not self.endpoints:
            return (next(iter(self.verdicts)),)
        return ("mixed", sorted((o.verdict, o.destination, o.masquerade) for o in self.outcomes))


@dataclass(frozen=True, slots=True)
class _State:
    src: str
    dst: str
    port: int
    protocol: str
    iif: str
    mark: int = 0
    dnat: str = ""
    masquerade: bool = False


def _in_net(ip: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


# --- iptables -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _IptRule:
    matches: list[tuple[bool, str, list[str]]]  # (negated, kind, args)
    target: str
    target_args: list[str]
    goto: bool


@dataclass(slots=True)
class IptablesTracer:
    save: str
    local_addresses: Sequence[str] = ()
    # ipset members as ``ipset save`` spells them ("10.96.0.1,tcp:80"), for ``-m set``
    # matches (the IPVS backend's rules); a set not given here is Unsupported.
    ipsets: Mapping[str, frozenset[str]] = field(default_factory=dict)
    tables: dict[str, dict[str, list[_IptRule]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table, chains in tables_of(self.save).items():
            self.tables[table] = {chain: [_parse_ipt(shlex.split(spec)) for spec in specs]
                                  for chain, specs in chains.items()}

    def trace(self, pkt: Packet) -> Trace:
        st = _State(pkt.src, pkt.dst, pkt.port, pkt.protocol.lower(), pkt.iif)
        outcomes: set[Outcome] = set()
        if pkt.from_node:
            stages = [("nat", "OUTPUT"), ("filter", "OUTPUT"), ("nat", "POSTROUTING")]
        else:
            stages = [("nat", "PREROUTING"), ("filter", ""), ("nat", "POSTROUTING")]
        for final in self._stages(st, stages, pkt.from_node):
            outcomes.add(final)
        return Trace(frozenset(outcomes))

    def _stages(self, st: _State, stages: list[tuple[str, str]], local: bool
                ) -> Iterator[Outcome]:
        if not stages:
            yield Outcome("ACCEPT", st.dnat, st.masquerade)
            return
        (table, chain), rest = stages[0], stages[1:]
        if not chain:
            chain = "INPUT" if st.dst in self.local_addresses else "FORWARD"
        for state, verdict in self._chain(table, chain, st, local, builtin=True):
            if verdict in ("DROP", "REJECT"):
                yield Outcome(verdict, state.dnat, state.masquerade)
            else:
                yield from self._stages(state, rest, local)

    def states(self, st: _State, stages: list[tuple[str, str]], local: bool
               ) -> Iterator[tuple[_State, str]]:
        """Like ``_stages``, yielding each branch's final state: ACCEPT, DROP or REJECT."""
        if not stages:
            yield st, "ACCEPT"
            return
        (table, chain), rest = stages[0], stages[1:]
        if not chain:
            chain = "INPUT" if st.dst in self.local_addresses else "FORWARD"
        for state, verdict in self._chain(table, chain, st, local, builtin=True):
            if verdict in ("DROP", "REJECT"):
                yield state, verdict
            else:
                yield from self.states(state, rest, local)

    def _chain(self, table: str, chain: str, st: _State, local: bool, builtin: bool = False,
               depth: int = 0) -> Iterator[tuple[_State, str]]:
        """Yields (state, verdict) per branch; verdict RETURN means fell through."""
        if depth > 50:
            raise Unsupported("chain recursion too deep")
        rules = self.tables.get(table, {}).get(chain, [])
        yield from self._rules(table, rules, 0, st, local, depth)

    def _rules(self, table: str, rules: list[_IptRule], i: int, st: _State, local: bool,
               depth: int) -> Iterator[tuple[_State, str]]:
        while i < len(rules):
            rule = rules[i]
            branches = self._match(rule, st, local)
            if not branches:
                i += 1
                continue
            if branches == {"maybe"}:
                # Random match: both the matched and the unmatched path happen.
                yield from self._rules(table, rules, i + 1, st, local, depth)
            for state, verdict in self._target(table, rule, st, local, depth):
                if verdict == "CONTINUE":
                    yield from self._rules(table, rules, i + 1, state, local, depth)
                else:
                    yield state, verdict
            return
        yield st, "RETURN"

    def _target(self, table: str, rule: _IptRule, st: _State, local: bool, depth: int
                ) -> Iterator[tuple[_State, str]]:
        t, args = rule.target, rule.target_args
        if t in ("ACCEPT", "DROP", "REJECT"):
            yield st, t
        elif t == "RETURN":
            yield st, "RETURN"
        elif t == "MARK" and "--or-mark" in args:
            yield replace(st, mark=st.mark | int(_opt(args, "--or-mark"), 0)), "CONTINUE"
        elif t == "MARK" and "--xor-mark" in args:
            yield replace(st, mark=st.mark ^ int(_opt(args, "--xor-mark"), 0)), "CONTINUE"
        elif t == "MARK":
            value, _, mask = _opt(args, "--set-xmark").partition("/")
            v, m = int(value, 0), int(mask or "0xffffffff", 0)
            yield replace(st, mark=(st.mark & ~m) ^ v), "CONTINUE"
        elif t == "DNAT":
            dest = _opt(args, "--to-destination")
            host, _, port = dest.rpartition(":")
            yield replace(st, dst=host.strip("[]"), port=int(port), dnat=dest), "ACCEPT"
        elif t == "MASQUERADE":
            yield replace(st, masquerade=True), "ACCEPT"
        elif t in self.tables.get(table, {}):
            for state, verdict in self._chain(table, t, st, local, depth=depth + 1):
                if verdict == "RETURN":
                    if rule.goto:
                        yield state, "RETURN"
                    else:
                        yield state, "CONTINUE"
                else:
                    yield state, verdict
        else:
            raise Unsupported(f"target {t}")

    def _match(self, rule: _IptRule, st: _State, local: bool) -> set[str]:
        maybe = False
        for neg, kind, args in rule.matches:
            if kind == "statistic":
                maybe = True
                continue
            ok = self._one(kind, args, st, local)
            if ok == neg:
                return set()
        return {"maybe"} if maybe else {"yes"}

    def _one(self, kind: str, args: list[str], st: _State, local: bool) -> bool:
        if kind == "-s":
            return _in_net(st.src, args[0])
        if kind == "-d":
            return _in_net(st.dst, args[0])
        if kind == "-p":
            return st.protocol == args[0]
        if kind == "-i":
            return _iface(st.iif, args[0]) and not local
        if kind == "--dport":
            return st.port == int(args[0])
        if kind == "--src-type":
            return args[0] == "LOCAL" and (local or st.src in self.local_addresses)
        if kind == "--dst-type":
            return args[0] == "LOCAL" and st.dst in self.local_addresses
        if kind == "--mark":
            value, _, mask = args[0].partition("/")
            return st.mark & int(mask or "0xffffffff", 0) == int(value, 0)
        if kind == "--ctstate":
            return "NEW" in args[0].split(",")
        if kind == "--rcheck":
            return False  # a fresh client has no affinity yet
        if kind == "--match-set":
            return self._in_ipset(args[0], args[1], st)
        if kind in ("comment", "--set", "module"):
            return True
        raise Unsupported(f"match {kind} {args}")


    def _in_ipset(self, name: str, flags: str, st: _State) -> bool:
        """``dst,dst`` (ip,port) and ``dst,dst,src`` (ip,port,ip) as the IPVS sets use."""
        if name not in self.ipsets:
            raise Unsupported(f"ipset {name}")
        fields = {"dst": st.dst, "src": st.src}
        parts: list[str] = []
        for i, which in enumerate(flags.split(",")):
            if i == 1:
                if which != "dst":
                    raise Unsupported(f"ipset port {which}")
                parts.append(f"{st.protocol}:{st.port}")
            else:
                parts.append(fields[which])
        return ",".join(parts) in self.ipsets[name]


def _iface(iif: str, pattern: str) -> bool:
    return iif.startswith(pattern[:-1]) if pattern.endswith("+") else iif == pattern


def _opt(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


_VALUE_OPTS = {"-s", "-d", "-p", "-i", "-o", "--dport", "--src-type", "--dst-type", "--mark",
               "--ctstate", "--comment", "--mode", "--probability", "--name", "--seconds",
               "--mask"}


def _parse_ipt(tokens: list[str]) -> _IptRule:
    matches: list[tuple[bool, str, list[str]]] = []
    neg = False
    i = 0
    target, target_args, goto = "", [], False
    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            neg = True
            i += 1
            continue
        if tok in ("-j", "-g"):
            target, target_args, goto = tokens[i + 1], tokens[i + 2:], tok == "-g"
            break
        if tok == "-m":
            if tokens[i + 1] == "statistic":
                matches.append((False, "statistic", []))
            i += 2
            continue
        if tok == "--match-set":
            matches.append((neg, tok, [tokens[i + 1], tokens[i + 2]]))
            i += 3
        elif tok in _VALUE_OPTS:
            if tok not in ("--comment", "--mode", "--probability", "--name", "--seconds",
                           "--mask", "-o"):
                matches.append((neg, tok, [tokens[i + 1]]))
            i += 2
        elif tok in ("--rcheck", "--set", "--reap", "--rsource"):
            if tok == "--rcheck":
                matches.append((neg, tok, []))
            i += 1
        else:
            raise Unsupported(f"iptables option {tok}")
        neg = False
    return _IptRule(matches, target, target_args, goto)


@dataclass(slots=True)
class IpvsTracer:
    """IPVS mode: our iptables rules mark and filter (PREROUTING/OUTPUT, then INPUT, as the
    virtual addresses are local), the virtual server DNATs to each real server of non-zero
    weight, then POSTROUTING decides masquerading on the translated packet (hairpin)."""

    iptables: IptablesTracer
    # (ip, protocol in lower case, port) -> its real servers "ip:port" (weight > 0)
    virtual: Mapping[tuple[str, str, int], Sequence[str]]

    @classmethod
    def over(cls, iptables: IptablesTracer, table: IpvsTable) -> IpvsTracer:
        """The virtual servers read through ``IpvsTable``: netlink (the VM) or ``FakeIpvs``
        alike -- the one reader of IPVS state."""
        return cls(iptables, {
            (vs.ip, vs.protocol.lower(), vs.port): [
                str(rs) for rs, state in sorted(table.dests(vs).items()) if state.weight > 0]
            for vs in table.services()})

    def trace(self, pkt: Packet) -> Trace:
        st = _State(pkt.src, pkt.dst, pkt.port, pkt.protocol.lower(), pkt.iif)
        first = ([("nat", "OUTPUT"), ("filter", "OUTPUT")] if pkt.from_node
                 else [("nat", "PREROUTING"), ("filter", "")])
        outcomes: set[Outcome] = set()
        for state, verdict in self.iptables.states(st, first, pkt.from_node):
            if verdict != "ACCEPT":
                outcomes.add(Outcome(verdict, state.dnat, state.masquerade))
                continue
            reals = self.virtual.get((state.dst, state.protocol, state.port))
            if reals is None:
                translated = [state]
            elif not reals:
                outcomes.add(Outcome("DROP"))  # a virtual server without real servers
                continue
            else:
                translated = []
                for real in reals:
                    host, _, port = real.rpartition(":")
                    translated.append(replace(state, dst=host.strip("[]"), port=int(port),
                                              dnat=real))
            for moved in translated:
                for final, v in self.iptables.states(moved, [("nat", "POSTROUTING")],
                                                      pkt.from_node):
                    outcomes.add(Outcome(v, final.dnat, final.masquerade))
        return Trace(frozenset(outcomes))


# --- nftables -------------------------------------------------------------------------------------


_HOOK_ORDER = {"prerouting": 0, "input": 1, "forward": 1, "output": 0, "postrouting": 2}


@dataclass(slots=True)
class NftTracer:
    """Traces over an ``nft -j list table ...`` (or ``list ruleset``) dump, read by the one
    nft parser (``nft_model``), or over tables the fake holds (``tables=``)."""

    dump: dict[str, Any] = field(default_factory=dict)
    local_addresses: Sequence[str] = ()
    tables: Sequence[NftTable] = ()
    sets: dict[str, NftSet] = field(default_factory=dict)
    chains: dict[str, NftChain] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in [*parse_nft_json(self.dump), *self.tables]:
            self.sets.update(table.sets)
            self.chains.update(table.chains)

    def _hooked(self, hook: str) -> list[str]:
        chains = [c for c in self.chains.values() if c.base.get("hook") == hook]
        return [c.name for c in sorted(chains, key=lambda c: c.base.get("prio", 0))]

    def trace(self, pkt: Packet) -> Trace:
        st = _State(pkt.src, pkt.dst, pkt.port, pkt.protocol.lower(), pkt.iif)
        first = "output" if pkt.from_node else "prerouting"
        return Trace(frozenset(self._hooks(st, [first, "", "postrouting"], pkt.from_node)))

    def _hooks(self, st: _State, hooks: list[str], local: bool) -> Iterator[Outcome]:
        if not hooks:
            yield Outcome("ACCEPT", st.dnat, st.masquerade)
            return
        hook, rest = hooks[0], hooks[1:]
        if not hook:
            hook = "" if local else ("input" if st.dst in self.local_addresses else "forward")
        names = self._hooked(hook) if hook else []
        yield from self._base_chains(st, names, rest, local)

    def _base_chains(self, st: _State, names: list[str], rest: list[str], local: bool
                     ) -> Iterator[Outcome]:
        if not names:
            yield from self._hooks(st, rest, local)
            return
        name, others = names[0], names[1:]
        base = self.chains[name].base
        if base.get("type") == "nat" and st.dnat and base.get("hook") in ("prerouting", "output"):
            yield from self._base_chains(st, others, rest, local)
            return
        for state, verdict in self._chain(name, st, local, 0):
            if verdict in ("drop", "reject"):
                yield Outcome(verdict.upper(), state.dnat, state.masquerade)
            else:
                yield from self._base_chains(state, others, rest, local)

    def _chain(self, name: str, st: _State, local: bool, depth: int
               ) -> Iterator[tuple[_State, str]]:
        if depth > 50:
            raise Unsupported("chain recursion too deep")
        chain = self.chains.get(name)
        yield from self._rules(chain.rules if chain else [], 0, st, local, depth)

    def _rules(self, rules: list[list[dict[str, Any]]], i: int, st: _State, local: bool,
               depth: int) -> Iterator[tuple[_State, str]]:
        if i >= len(rules):
            yield st, "return"
            return
        for state, verdict in self._exprs(rules[i], 0, st, local, depth):
            if verdict == "continue":
                yield from self._rules(rules, i + 1, state, local, depth)
            else:
                yield state, verdict

    def _exprs(self, exprs: list[dict[str, Any]], j: int, st: _State, local: bool, depth: int
               ) -> Iterator[tuple[_State, str]]:
        """Evaluates one rule from expression ``j``; "continue" = go on to the next rule."""
        if j >= len(exprs):
            yield st, "continue"
            return
        expr = exprs[j]
        (kind, body), = expr.items()
        nxt = (exprs, j + 1, local, depth)
        if kind == "match":
            if self._matches(body, st, local):
                yield from self._exprs(nxt[0], nxt[1], st, local, depth)
            else:
                yield st, "continue"
        elif kind == "mangle":
            value = body["value"]
            (op, (_, operand)), = value.items()
            new = st.mark | operand if op == "|" else st.mark ^ operand
            yield from self._exprs(exprs, j + 1, replace(st, mark=new), local, depth)
        elif kind in ("jump", "goto"):
            yield from self._call(body["target"], kind, exprs, j, st, local, depth)
        elif kind == "vmap":
            for key_state, key in self._values(body["key"], st, local):
                verdict = self._lookup_map(body["data"], key)
                if verdict is None:
                    yield key_state, "continue"
                    continue
                (vk, vb), = verdict.items()
                if vk in ("jump", "goto"):
                    yield from self._call(vb["target"], vk, exprs, j, key_state, local, depth)
                else:
                    yield key_state, vk
        elif kind == "dnat":
            yield from self._dnat(body, st, local)
        elif kind == "masquerade":
            yield replace(st, masquerade=True), "accept"
        elif kind in ("accept", "drop", "reject", "return"):
            yield st, kind
        elif kind in ("set", "counter", "log"):
            yield from self._exprs(exprs, j + 1, st, local, depth)
        else:
            raise Unsupported(f"nft expression {kind}")

    def _call(self, target: str, how: str, exprs: list[dict[str, Any]], j: int, st: _State,
              local: bool, depth: int) -> Iterator[tuple[_State, str]]:
        for state, verdict in self._chain(target, st, local, depth + 1):
            if verdict == "return":
                yield state, "return" if how == "goto" else "continue"
            else:
                yield state, verdict

    def _dnat(self, body: dict[str, Any], st: _State, local: bool
              ) -> Iterator[tuple[_State, str]]:
        addr = body["addr"]
        if isinstance(addr, dict) and "map" in addr:
            for key_state, key in self._values(addr["map"]["key"], st, local):
                value = self._lookup_map(addr["map"]["data"], key)
                if value is None:
                    yield key_state, "drop"  # no element: the kernel drops the packet
                    continue
                ip, port = value["concat"]
                yield self._translated(key_state, str(ip), int(port)), "accept"
        else:
            yield self._translated(st, str(addr), int(body["port"])), "accept"

    @staticmethod
    def _translated(st: _State, ip: str, port: int) -> _State:
        dest = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        return replace(st, dst=ip, port=port, dnat=dest)

    def _values(self, expr: Any, st: _State, local: bool
                ) -> Iterator[tuple[_State, tuple[Any, ...]]]:
        """All values an expression can take (numgen branches), as key tuples."""
        parts = expr["concat"] if isinstance(expr, dict) and "concat" in expr else [expr]
        choices: list[list[Any]] = [[]]
        for part in parts:
            if isinstance(part, dict) and "numgen" in part:
                ng = part["numgen"]
                options = [ng.get("offset", 0) + n for n in range(ng["mod"])]
            else:
                options = [self._value(part, st, local)]
            choices = [[*c, o] for c in choices for o in options]
        for c in choices:
            yield st, tuple(c)

    def _value(self, expr: Any, st: _State, local: bool) -> Any:
        if not isinstance(expr, dict):
            return expr
        (kind, body), = expr.items()
        if kind == "payload":
            field_ = body["field"]
            return {"saddr": st.src, "daddr": st.dst, "dport": st.port}[field_]
        if kind == "meta":
            key = body["key"]
            if key == "l4proto":
                return st.protocol
            if key == "mark":
                return st.mark
            if key == "iifname":
                return "" if local else st.iif
        if kind == "&":
            left, right = body
            return self._value(left, st, local) & right
        if kind == "fib":
            ip = st.src if "saddr" in body["flags"] else st.dst
            return "local" if (ip in self.local_addresses or (local and "saddr" in body["flags"])
                               ) else "unicast"
        if kind == "ct":
            return {"state": "new", "status": "dnat" if st.dnat else ""}[body["key"]]
        raise Unsupported(f"nft value {kind}")

    def _matches(self, body: dict[str, Any], st: _State, local: bool) -> bool:
        op, left, right = body["op"], body["left"], body["right"]
        [(_, value)] = list(self._values(left, st, local))
        if isinstance(right, str) and right.startswith("@"):
            hit = self._in_set(right[1:], value)
        else:
            hit = self._equal(value, right)
        return not hit if op == "!=" else hit

    def _equal(self, value: tuple[Any, ...], right: Any) -> bool:
        v = value[0] if len(value) == 1 else value
        if isinstance(right, dict) and "set" in right:
            return any(self._equal(value, r) for r in right["set"])
        if isinstance(right, dict) and "prefix" in right:
            p = right["prefix"]
            return _in_net(str(v), f"{p['addr']}/{p['len']}")
        if isinstance(right, dict) and "range" in right:
            lo, hi = right["range"]
            return bool(lo <= v <= hi)
        if isinstance(right, list):
            return v in right
        if isinstance(v, str) and isinstance(right, str) and "*" in right:
            return v.startswith(right.rstrip("*"))
        return bool(v == right)

    def _in_set(self, name: str, key: tuple[Any, ...]) -> bool:
        s = self.sets.get(name)
        if s is None:
            raise Unsupported(f"unknown set {name}")
        for elem in s.elems.values():
            if isinstance(elem, dict) and "elem" in elem:
                elem = elem["elem"]["val"]
            if self._elem_matches(elem, key):
                return True
        return False

    def _elem_matches(self, elem: Any, key: tuple[Any, ...]) -> bool:
        parts = elem["concat"] if isinstance(elem, dict) and "concat" in elem else [elem]
        if len(parts) != len(key):
            return False
        return all(self._equal((k,), p) for k, p in zip(key, parts, strict=True))

    def _lookup_map(self, data: Any, key: tuple[Any, ...]) -> Any:
        elems = (list(self.sets[data[1:]].elems.values()) if isinstance(data, str)
                 else data["set"])
        for k, v in elems:
            if self._elem_matches(k, key):
                return v
        return None
