"""A stateful fake of ``nft`` (knftables' Fake): ``nft -f`` transactions applied to in-memory
tables (``nft_model.NftTable``), ``nft -j list table`` printing them as the real tool does.

It reads the statements our nftables backend writes -- not nft's whole grammar; anything
else raises -- and turns each rule's text into the JSON expressions ``nft -j`` prints for
it, with the kernel's normalisations that matter to a reader: a one-element anonymous set
becomes its element, adjacent or overlapping prefixes of an anonymous set merge into one
interval (``10.1.0.0/16, 10.2.0.0/16`` -> range ``10.1.0.0-10.2.255.255``), ``ct state``
and ``ct status`` match with ``in``, ``reject`` gets its ICMP type. ``test_proxy_fake.py``
checks the fake's dump equals the kernel's for the every-feature table.

It applies typed transactions (``objects.Transaction``) as well as text: the objects go
straight into the table, so a test can check that the serializer's text does the same.

A transaction is all or nothing and fails where the kernel fails: a rule or element
jumping to a chain that does not exist (yet, in the order of the script), a rule or chain
in a table that does not exist, ``delete`` of an absent element, chain, set or table,
``add`` of an element already there with another value, deleting a chain that still
holds rules or is referenced, or a set a rule uses; and nft 1.0.6's refusal of a rule using
a ``typeof`` map made by an earlier transaction (why the backend makes every ``lb-N`` chain
at a full sync).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from svcnet.proxy.commands import CommandFailed
from svcnet.proxy.nft_model import Expr, NftChain, NftSet, NftTable, to_dump
from svcnet.proxy.objects import Chain, Element, Map, Rule, Set, Table, Transaction
from svcnet.proxy.sealed_input import Seal

_TOKEN = re.compile(r'"[^"]*"|[{},;]|[^\s{},;]+')
_PRIO = {"srcnat": 100, "dstnat": -100, "filter": 0, "raw": -300, "mangle": -150}
_TYPEOF = {"daddr": "addr", "saddr": "addr", "l4proto": "inet_proto", "dport": "inet_service",
           "sport": "inet_service", "numgen": "integer", "mark": "mark"}
_VERDICTS = ("accept", "drop", "return", "continue")


class NftError(Exception):
    pass


@dataclass(slots=True)
class FakeNft:
    """``nft -f``, ``nft list tables``, ``nft -j list table|ruleset`` over in-memory tables."""

    tables: dict[tuple[str, str], NftTable] = field(default_factory=dict)
    transactions: int = 0  # committed

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        args = list(argv[1:])
        try:
            if args[:1] == ["-f"]:
                self.apply(input or "")
                return ""
            as_json = args[:1] == ["-j"]
            if as_json:
                args = args[1:]
            if args[:2] == ["list", "tables"]:
                return "".join(f"table {f} {n}\n" for f, n in self.tables
                               if len(args) < 3 or f == args[2])
            if args[:2] == ["list", "table"] and as_json:
                key = (args[2], args[3])
                if key not in self.tables:
                    raise NftError(f"No such file or directory: table {args[2]} {args[3]}")
                return json.dumps(to_dump([self.tables[key]]))
            if args == ["list", "ruleset"] and as_json:
                return json.dumps(to_dump(self.tables.values()))
        except NftError as err:
            if check:
                raise CommandFailed(argv, 1, f"Error: {err}") from None
            return ""
        raise CommandFailed(argv, 127, "nft: not faked")

    def stream(self, argv: Sequence[str], chunks: Iterable[str], *,
               seal: Seal | None = None, quiet: bool = False) -> str:
        out = self.run(argv, input="".join(chunks))
        return "" if quiet else out

    def apply(self, script: str) -> None:
        """One transaction: every line applies, or none does."""
        tx = _Transaction({k: copy.deepcopy(t) for k, t in self.tables.items()})
        for n, line in enumerate(script.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                tx.command(_TOKEN.findall(line))
            except (NftError, IndexError, ValueError, KeyError) as err:
                raise NftError(f"line {n}: {line[:200]}: {err!r}") from None
        self.tables = tx.tables
        self.transactions += 1

    def apply_transactions(self, txs: Iterable[Transaction]) -> None:
        """Typed transactions applied as one ``nft -f`` run, without their text: what
        the serializer's text must do too (``test_proxy_model.py``)."""
        tx = _Transaction({k: copy.deepcopy(t) for k, t in self.tables.items()})
        for part in txs:
            assert part.table is not None
            family, name = part.table.family, part.table.name
            for verb, obj in part.operations():
                try:
                    tx.typed(family, name, verb, obj)
                except (NftError, IndexError, ValueError, KeyError) as err:
                    raise NftError(f"{verb} {obj!r}: {err!r}") from None
        self.tables = tx.tables
        self.transactions += 1


@dataclass(slots=True)
class _Transaction:
    tables: dict[tuple[str, str], NftTable]
    new_sets: set[tuple[str, str, str]] = field(default_factory=set)

    def command(self, words: list[str]) -> None:
        op, kind = words[0], words[1]
        if kind == "table":
            key = (words[2], words[3])
            if op == "add":
                self.tables.setdefault(key, NftTable(*key))
            elif op == "delete":
                if self.tables.pop(key, None) is None:
                    raise NftError("No such file or directory (table)")
            else:
                raise NftError(f"{op} table")
            return
        table = self.tables.get((words[2], words[3]))
        if table is None:
            raise NftError("No such file or directory (table)")
        name, rest = words[4], words[5:]
        if kind == "chain":
            self._chain(table, op, name, _base_chain(rest))
        elif kind == "rule":
            chain = table.chains.get(name)
            if chain is None or op != "add":
                raise NftError(f"No such file or directory (chain {name})")
            chain.rules.append(_Rule(table, self, rest).parse())
        elif kind in ("set", "map"):
            self._set(table, op, kind, name, _set_decl(table.family, rest) if op == "add" else {})
        elif kind == "element":
            self._elements(table, op, name, rest)
        else:
            raise NftError(f"unknown object {kind}")

    def typed(self, family: str, table_name: str, verb: str, obj: object) -> None:
        """One operation on a typed object (``objects.py``) of table ``family table_name``;
        only a rule's body is read as text (it is text in the model too)."""
        if isinstance(obj, Table):
            self.command([verb, "table", obj.family, obj.name])
            return
        table = self.tables.get((family, table_name))
        if table is None:
            raise NftError("No such file or directory (table)")
        if isinstance(obj, Chain):
            base = {"type": obj.type, "hook": obj.hook, "prio": _priority(obj.priority),
                    "policy": "accept"} if obj.hook else {}
            self._chain(table, verb, obj.name, base)
        elif isinstance(obj, Rule):
            chain = table.chains.get(obj.chain)
            if chain is None or verb != "add":
                raise NftError(f"No such file or directory (chain {obj.chain})")
            chain.rules.append(_Rule(table, self, _TOKEN.findall(obj.body)).parse())
        elif isinstance(obj, (Set, Map)):
            kind = "set" if isinstance(obj, Set) else "map"
            decl: dict[str, Any] = {}
            if verb == "add":
                what = "typeof" if obj.typeof else "type"
                decl = _decl_type(family, what, (obj.typeof or obj.type).split())
                if isinstance(obj, Set):
                    decl.update(_decl_flags(obj.flags.split(",")) if obj.flags else {})
                    if obj.timeout:
                        decl["timeout"] = obj.timeout
            self._set(table, verb, kind, obj.name, decl)
        elif isinstance(obj, Element):
            s = table.sets.get(obj.set)
            if s is None:
                raise NftError(f"No such file or directory (set {obj.set})")
            self._element(table, s, verb, _TOKEN.findall(obj.key),
                          _TOKEN.findall(obj.value) if obj.value else [])
        else:
            raise NftError(f"not an nftables object: {obj!r}")

    def _chain(self, table: NftTable, op: str, name: str, base: dict[str, Any]) -> None:
        chain = table.chains.get(name)
        if op == "add":
            if chain is None:
                table.chains[name] = NftChain(name, base)
        elif chain is None:
            raise NftError(f"No such file or directory (chain {name})")
        elif op == "flush":
            chain.rules = []
        elif op == "delete":
            if chain.rules:
                raise NftError(f"Device or resource busy (chain {name} holds rules)")
            if name in _references(table):
                raise NftError(f"Device or resource busy (chain {name} is referenced)")
            del table.chains[name]
        else:
            raise NftError(f"{op} chain")

    def _set(self, table: NftTable, op: str, kind: str, name: str, decl: dict[str, Any]
             ) -> None:
        if op == "add":
            if name not in table.sets:
                table.sets[name] = NftSet(name, kind, decl)
                self.new_sets.add((table.family, table.name, name))
        elif op == "delete":
            if name not in table.sets:
                raise NftError(f"No such file or directory (set {name})")
            if any(f'"@{name}"' in json.dumps(r) for c in table.chains.values()
                   for r in c.rules):
                raise NftError(f"Device or resource busy (set {name} is used)")
            del table.sets[name]
        else:
            raise NftError(f"{op} set")

    def _elements(self, table: NftTable, op: str, name: str, rest: list[str]) -> None:
        s = table.sets.get(name)
        if s is None:
            raise NftError(f"No such file or directory (set {name})")
        if rest[0] != "{" or rest[-1] != "}":
            raise NftError("element list expected")
        for words in _split(rest[1:-1], ","):
            if words:
                self._element(table, s, op, *_cut(words, ":"))

    def _element(self, table: NftTable, s: NftSet, op: str, key_words: list[str],
                 value_words: list[str]) -> None:
        key = _concat_value(key_words)
        if s.kind == "map" and op == "add":
            value = (_verdict(table, value_words) if s.decl.get("map") == "verdict"
                     else _concat_value(value_words))
            elem: Any = [key, value]
        else:
            elem = key
        k = json.dumps(key, sort_keys=True)  # as nft_model.elem_key
        if op == "add":
            old = s.elems.get(k)
            if old is not None and old != elem:
                raise NftError(f"File exists (element {k} in {s.name})")
            s.elems[k] = elem
        elif op == "delete":
            if s.elems.pop(k, None) is None:
                raise NftError(f"No such file or directory (element {k} in {s.name})")
        else:
            raise NftError(f"{op} element")


def _references(table: NftTable) -> set[str]:
    text = json.dumps([[c.rules for c in table.chains.values()],
                       [s.elems for s in table.sets.values() if s.kind == "map"]])
    return set(re.findall(r'"target": "([^"]+)"', text))


def _base_chain(rest: list[str]) -> dict[str, Any]:
    if not rest:
        return {}
    words = [w for w in rest if w not in ("{", "}", ";")]
    opts = dict(zip(words[0::2], words[1::2], strict=False))
    return {"type": opts["type"], "hook": opts["hook"], "prio": _priority(opts["priority"]),
            "policy": "accept"}


def _priority(text: str) -> int:
    return _PRIO[text] if text in _PRIO else int(text)


def _decl_type(family: str, what: str, value: list[str]) -> dict[str, Any]:
    """A set's or map's ``type`` / ``typeof`` as nft -j prints it."""
    decl: dict[str, Any] = {}
    key, data = _cut(value, ":")
    if what == "typeof":
        types = [_typeof(family, w) for w in _split(key, ".")]
        maps = [_typeof(family, w) for w in _split(data, ".")] if data else []
    else:
        types = [w for w in key if w != "."]
        maps = [w for w in data if w != "."]
    decl["type"] = types[0] if len(types) == 1 else types
    if maps:
        decl["map"] = " . ".join(maps)
    return decl


def _decl_flags(flags: list[str]) -> dict[str, Any]:
    decl: dict[str, Any] = {"size": 65535} if "dynamic" in flags else {}
    decl["flags"] = [f for f in flags if f != "dynamic"]
    return decl


def _set_decl(family: str, rest: list[str]) -> dict[str, Any]:
    decl: dict[str, Any] = {}
    for words in _split([w for w in rest if w not in ("{", "}")], ";"):
        if not words:
            continue
        what, value = words[0], words[1:]
        if what in ("type", "typeof"):
            decl.update(_decl_type(family, what, value))
        elif what == "flags":  # the tokenizer split "dynamic,timeout" at the comma
            decl.update(_decl_flags("".join(value).split(",")))
        elif what == "timeout":
            decl["timeout"] = _seconds(value[0])
        else:
            raise NftError(f"set option {what}")
    return decl


def _typeof(family: str, words: list[str]) -> str:
    t = _TYPEOF[words[0] if words[0] == "numgen" else words[1]]
    return ("ipv4_addr" if family == "ip" else "ipv6_addr") if t == "addr" else t


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _split(words: list[str], sep: str) -> list[list[str]]:
    """Split at ``sep`` outside braces."""
    out: list[list[str]] = [[]]
    depth = 0
    for w in words:
        if w == "{":
            depth += 1
        elif w == "}":
            depth -= 1
        if w == sep and depth == 0:
            out.append([])
        else:
            out[-1].append(w)
    return out


def _cut(words: list[str], sep: str) -> tuple[list[str], list[str]]:
    if sep in words:
        i = words.index(sep)
        return words[:i], words[i + 1:]
    return words, []


def _literal(word: str) -> Any:
    if word.startswith('"'):
        return word.strip('"')
    if word.startswith("0x"):
        return int(word, 16)
    if word.isdigit():
        return int(word)
    if "/" in word:
        net = ipaddress.ip_network(word, strict=False)
        if net.prefixlen == net.max_prefixlen:
            return str(net.network_address)
        return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
    return word


def _concat_value(words: list[str]) -> Any:
    groups = _split(words, ".")
    if any(len(g) != 1 for g in groups):
        raise NftError(f"value {' '.join(words)}")
    parts = [_literal(g[0]) for g in groups]
    return parts[0] if len(parts) == 1 else {"concat": parts}


def _verdict(table: NftTable, words: list[str]) -> Expr:
    if words[0] in ("goto", "jump"):
        if words[1] not in table.chains:
            raise NftError(f"No such file or directory (chain {words[1]})")
        return {words[0]: {"target": words[1]}}
    if words[0] in _VERDICTS:
        return {words[0]: None}
    raise NftError(f"verdict {words}")


def _anonymous_set(values: list[Any]) -> Any:
    """An anonymous set as the kernel gives it back: one element stands alone, prefixes
    that touch or overlap merge into one interval."""
    if len(values) == 1:
        return values[0]
    nets = [v for v in values if isinstance(v, dict) and "prefix" in v]
    if not nets:
        return {"set": values}
    spans = sorted(
        (int(n.network_address), int(n.broadcast_address), n.max_prefixlen == 32)
        for n in (ipaddress.ip_network(f"{v['prefix']['addr']}/{v['prefix']['len']}")
                  for v in nets))
    merged: list[tuple[int, int, bool]] = []
    for lo, hi, v4 in spans:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi), v4)
        else:
            merged.append((lo, hi, v4))
    out: list[Any] = [v for v in values if v not in nets]
    for lo, hi, v4 in merged:
        first: ipaddress.IPv4Address | ipaddress.IPv6Address
        last: ipaddress.IPv4Address | ipaddress.IPv6Address
        if v4:
            first, last = ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi)
        else:
            first, last = ipaddress.IPv6Address(lo), ipaddress.IPv6Address(hi)
        cidrs = [str(c) for c in ipaddress.summarize_address_range(first, last)]  # type: ignore[misc]
        if len(cidrs) == 1:
            addr, _, length = cidrs[0].partition("/")
            out.append({"prefix": {"addr": addr, "len": int(length)}})
        else:
            out.append({"range": [str(first), str(last)]})
    return {"set": out}


@dataclass(slots=True)
class _Rule:
    """The text of one rule, read into ``nft -j`` statements."""

    table: NftTable
    tx: _Transaction
    words: list[str]
    i: int = 0

    def parse(self) -> list[Expr]:
        out: list[Expr] = []
        while self.i < len(self.words):
            out.append(self._statement())
        return out

    def _peek(self, ahead: int = 0) -> str:
        j = self.i + ahead
        return self.words[j] if j < len(self.words) else ""

    def _take(self, *expected: str) -> str:
        word = self._peek()
        if expected and word not in expected:
            raise NftError(f"expected {expected}, got {word!r}")
        self.i += 1
        return word

    def _statement(self) -> Expr:
        w = self._peek()
        if w in ("jump", "goto"):
            self._take()
            return _verdict(self.table, [w, self._take()])
        if w in _VERDICTS:
            self._take()
            return {w: None}
        if w == "reject":
            self._take()
            icmp = "icmp" if self.table.family == "ip" else "icmpv6"
            return {"reject": {"type": icmp, "expr": "port-unreachable"}}
        if w == "masquerade":
            self._take()
            if self._peek() == "fully-random":
                self._take()
                return {"masquerade": {"flags": "fully-random"}}
            return {"masquerade": None}
        if w == "dnat":
            return self._dnat()
        if w == "update":
            self._take()
            name = self._set_ref(self._take())
            self._take("{")
            elem = self._concat()
            self._take("}")
            return {"set": {"op": "update", "elem": elem, "set": name}}
        if w == "meta" and self._peek(1) == "mark" and self._peek(2) == "set":
            self.i += 3
            left = self._primary()
            op = self._take("|", "^")
            return {"mangle": {"key": {"meta": {"key": "mark"}},
                               "value": {op: [left, _literal(self._take())]}}}
        left = self._concat()
        if self._peek() == "vmap":
            self._take()
            return {"vmap": {"key": left, "data": self._map_data(verdicts=True)}}
        if self._peek() == "&":
            self._take()
            left = {"&": [left, _literal(self._take())]}
        op = "=="
        if self._peek() in ("==", "!="):
            op = self._take()
        right = self._right()
        if op == "==" and isinstance(left, dict) and "ct" in left:
            op = "in"
        return {"match": {"op": op, "left": left, "right": right}}

    def _dnat(self) -> Expr:
        self._take("dnat")
        family = self._take("ip", "ip6")
        self._take("to")
        w = self._peek()
        if w.startswith("[") or (w[0].isdigit() and ":" in w and family == "ip"):
            host, _, port = self._take().rpartition(":")
            return {"dnat": {"addr": host.strip("[]"), "port": int(port)}}
        key = self._concat()
        self._take("map")
        return {"dnat": {"family": family, "addr": {"map": {"key": key,
                                                              "data": self._map_data()}}}}

    def _map_data(self, *, verdicts: bool = False) -> Any:
        if self._peek().startswith("@"):
            return self._set_ref(self._take())
        self._take("{")
        depth, words = 1, []
        while depth:
            w = self._take()
            depth += {"{": 1, "}": -1}.get(w, 0)
            if depth:
                words.append(w)
        pairs = []
        for elem in _split(words, ","):
            k, v = _cut(elem, ":")
            pairs.append([_concat_value(k), _verdict(self.table, v) if verdicts
                          else _concat_value(v)])
        return {"set": pairs}

    def _set_ref(self, word: str) -> str:
        name = word[1:]
        if name not in self.table.sets:
            raise NftError(f"No such file or directory (set {name})")
        s = self.table.sets[name]
        if (isinstance(s.decl.get("type"), list) and "integer" in s.decl["type"]
                and (self.table.family, self.table.name, name) not in self.tx.new_sets):
            # nft 1.0.6 re-reads a typeof map's key from the kernel and gets it wrong
            raise NftError("conflicting protocols specified: ip vs. th")
        return word

    def _concat(self) -> Any:
        parts = [self._primary()]
        while self._peek() == ".":
            self._take()
            parts.append(self._primary())
        return parts[0] if len(parts) == 1 else {"concat": parts}

    def _primary(self) -> Any:
        w = self._take()
        if w in ("ip", "ip6"):
            return {"payload": {"protocol": w, "field": self._take("saddr", "daddr")}}
        if w == "th":
            return {"payload": {"protocol": "th", "field": self._take("dport", "sport")}}
        if w == "meta":
            return {"meta": {"key": self._take("l4proto", "mark", "iifname", "oifname")}}
        if w in ("iifname", "oifname"):
            return {"meta": {"key": w}}
        if w == "ct":
            return {"ct": {"key": self._take("state", "status")}}
        if w == "fib":
            flags = [self._take("saddr", "daddr")]
            self._take("type")
            return {"fib": {"result": "type", "flags": flags}}
        if w == "numgen":
            self._take("random")
            self._take("mod")
            mod = int(self._take())
            offset = 0
            if self._peek() == "offset":
                self._take()
                offset = int(self._take())
            return {"numgen": {"mode": "random", "mod": mod, "offset": offset}}
        raise NftError(f"expression {w!r}")

    def _right(self) -> Any:
        w = self._take()
        if w.startswith("@"):
            return self._set_ref(w)
        if w == "{":
            words: list[str] = []
            while self._peek() != "}":
                words.append(self._take())
            self._take("}")
            return _anonymous_set([_concat_value(e) for e in _split(words, ",") if e])
        return _literal(w)
