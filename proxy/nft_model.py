"""The nftables ruleset as data: the one reader of ``nft -j`` output.

``NftTable`` holds what ``nft -j list table`` shows of one table -- chains (with their hook),
rules as nft's JSON expressions, sets and maps with their elements -- parsed once
(``parse_nft_json``). The tracer, the drift check (``items``) and ``proxy check`` read it; the
stateful fake (``fake_nft.py``) keeps its tables in the same form and prints them as ``nft
-j`` would, so everything that reads the kernel's dump reads the fake's alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

Expr = dict[str, Any]  # one statement of a rule, as ``nft -j`` prints it

# Counters and handles change without anyone touching the rules.
_VOLATILE = frozenset({"handle", "packets", "bytes", "counter"})
# Sets the datapath fills (ClientIP affinity, ``update @set``): their members are traffic.
_DYNAMIC = frozenset({"dynamic", "timeout"})


@dataclass(slots=True)
class NftChain:
    name: str
    base: dict[str, Any] = field(default_factory=dict)  # type, hook, prio, policy
    rules: list[list[Expr]] = field(default_factory=list)


@dataclass(slots=True)
class NftSet:
    name: str
    kind: str  # "set" or "map"
    decl: dict[str, Any] = field(default_factory=dict)  # type, map, flags, timeout, size
    # canonical key text -> the element as nft -j prints it (key, or [key, value] in a map)
    elems: dict[str, Any] = field(default_factory=dict)

    @property
    def dynamic(self) -> bool:
        return bool(_DYNAMIC & set(self.decl.get("flags") or ()))


@dataclass(slots=True)
class NftTable:
    family: str
    name: str
    chains: dict[str, NftChain] = field(default_factory=dict)
    sets: dict[str, NftSet] = field(default_factory=dict)

    def to_json(self) -> list[dict[str, Any]]:
        """The objects ``nft -j list table`` prints (handles left out), in its order."""
        out: list[dict[str, Any]] = [{"table": {"family": self.family, "name": self.name}}]
        for s in self.sets.values():
            body = {"family": self.family, "name": s.name, "table": self.name, **s.decl}
            if s.elems:
                body["elem"] = list(s.elems.values())
            out.append({s.kind: body})
        for c in self.chains.values():
            out.append({"chain": {"family": self.family, "table": self.name, "name": c.name,
                                  **c.base}})
        for c in self.chains.values():
            out += [{"rule": {"family": self.family, "table": self.name, "chain": c.name,
                              "expr": expr}} for expr in c.rules]
        return out

    def items(self) -> Iterator[str]:
        """One line per chain, rule, set/map and configured element, without handles or
        counters: what the drift check and ``proxy check`` compare."""
        fam = self.family
        for c in self.chains.values():
            yield f"{fam} chain {c.name}"
            for expr in c.rules:
                yield f"{fam} rule {c.name} {json.dumps(_strip(expr), sort_keys=True)}"
        for s in self.sets.values():
            yield f"{fam} {s.kind} {s.name}"
            if not s.dynamic:
                for elem in s.elems.values():
                    yield f"{fam} element {s.name} {json.dumps(_strip(elem), sort_keys=True)}"


def elem_key(elem: Any, kind: str) -> str:
    """The identity of an element: its key (a map element is ``[key, value]``)."""
    key = elem[0] if kind == "map" else elem
    if isinstance(key, dict) and "elem" in key:  # an element with a timeout/comment
        key = key["elem"]["val"]
    return json.dumps(key, sort_keys=True)


def parse_nft_json(dump: dict[str, Any]) -> list[NftTable]:
    """Tables of an ``nft -j list table|ruleset`` dump."""
    tables: dict[tuple[str, str], NftTable] = {}

    def table(body: dict[str, Any]) -> NftTable:
        key = (body.get("family", "ip"), body.get("table", ""))
        got = tables.get(key)
        if got is None:
            got = tables[key] = NftTable(*key)
        return got

    for item in dump.get("nftables", []):
        (kind, body), = item.items()
        if kind == "table":
            table({"family": body.get("family", "ip"), "table": body["name"]})
        elif kind in ("set", "map"):
            decl = {k: v for k, v in body.items()
                    if k not in ("family", "name", "table", "handle", "elem")}
            s = table(body).sets[body["name"]] = NftSet(body["name"], kind, decl)
            for elem in body.get("elem", []):
                s.elems[elem_key(elem, kind)] = elem
        elif kind == "chain":
            base = {k: v for k, v in body.items()
                    if k not in ("family", "name", "table", "handle")}
            t = table(body)
            chain = t.chains.get(body["name"])
            if chain is None:
                t.chains[body["name"]] = NftChain(body["name"], base)
            else:
                chain.base = base
        elif kind == "rule":
            t = table(body)
            chain = t.chains.get(body["chain"])
            if chain is None:
                chain = t.chains[body["chain"]] = NftChain(body["chain"])
            chain.rules.append(body["expr"])
    return list(tables.values())


def to_dump(tables: Iterable[NftTable]) -> dict[str, Any]:
    return {"nftables": [o for t in tables for o in t.to_json()]}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def nft_items(dump: dict[str, Any]) -> set[str]:
    """One line per chain, set/map, element and rule of an ``nft -j list table`` dump."""
    return {i for t in parse_nft_json(dump) for i in t.items()}
