"""The typed rule model shared by the backends: kernel objects and the transaction of
operations on them (after knftables).

A backend's ``render`` turns one service port's state into these objects; the diff engine
(``rules.py``) says which of them changed between two renderings; the backend records
``add``/``delete``/``flush`` operations on them in a ``Transaction``; and one serializer per
tool (``nft_script``, ``restore_lines``) turns the operations into that tool's input. Only a
serializer knows a tool's syntax; a rule's body stays text (as in knftables), since nothing
but the tool reads it.

The objects are frozen ``msgspec.Struct``s without garbage-collector tracking: a 10k-service
full sync makes ~120k of them, and these are created 3x faster than a ``NamedTuple`` and
never make the collector scan (measured: the rendering of a full sync took 2.6x the time of
the string-building code it replaced with ``NamedTuple``s, 1.3x with these). They hold only
strings and numbers, so they cannot be part of a reference cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple, TypeAlias

from msgspec import Struct
from svcnet.proxy.ipvs_kernel import RealServer, ServiceOptions, VirtualServer

# "update": change an existing object's attributes in place (an IPVS service's scheduler,
# a real server's weight; the contents of two ipsets exchanged), which IPVS and ipset do and
# the rule tools do not. "insert": an iptables rule put first in its chain (a jump into our
# chains from a built-in one must run before what others appended).
Verb = Literal["add", "delete", "flush", "update", "insert"]

# --- nftables (one table per transaction) ----------------------------------------------------


class Table(Struct, frozen=True, gc=False):
    family: str  # "ip" / "ip6"
    name: str
    comment: str = ""


class Chain(Struct, frozen=True, gc=False):
    """A chain; a base chain has ``type``, ``hook`` and ``priority``."""

    name: str
    type: str = ""
    hook: str = ""
    priority: str = ""


class Rule(Struct, frozen=True, gc=False):
    chain: str
    body: str  # nft rule text, e.g. "ip saddr @x goto y"


class Set(Struct, frozen=True, gc=False):
    """A named set (``type`` by data type, or ``typeof`` by expression)."""

    name: str
    type: str = ""
    typeof: str = ""
    flags: str = ""  # "interval", "dynamic,timeout"
    timeout: int = 0  # seconds; 0: none


class Map(Struct, frozen=True, gc=False):
    """A named map: ``type``/``typeof`` is ``key : value``."""

    name: str
    type: str = ""
    typeof: str = ""


class Element(Struct, frozen=True, gc=False):
    """A member of a set (``value`` empty) or map; identity is (``set``, ``key``)."""

    set: str
    key: str  # "10.96.0.1 . tcp . 80"
    value: str = ""  # "goto lb-2", "10.1.0.1 . 8080"


NftObject: TypeAlias = Table | Chain | Rule | Set | Map | Element

# --- iptables -------------------------------------------------------------------------------


class IptTable(Struct, frozen=True, gc=False):
    name: str  # "nat", "filter"


class IptChain(Struct, frozen=True, gc=False, order=True):
    table: str
    name: str


class IptRule(Struct, frozen=True, gc=False):
    table: str
    chain: str
    spec: str  # the rule after "-A CHAIN", as iptables-save prints it


IptObject: TypeAlias = IptTable | IptChain | IptRule

# --- ipset ----------------------------------------------------------------------------------


class IpsetMember(Struct, frozen=True, gc=False, order=True):
    set: str
    entry: str  # "10.96.0.1,tcp:80"


class IpsetSet(Struct, frozen=True, gc=False):
    """A set as created (``add``); ``delete`` (destroy) and ``flush`` need only its name.
    ``create`` cannot resize an existing set, so a set that must grow is replaced by a
    bigger one, filled under a temporary name and swapped in (``IpsetSwap``)."""

    name: str
    type: str = ""  # "hash:ip,port"
    family: str = ""  # "inet" / "inet6"
    hashsize: int = 0
    maxelem: int = 0


class IpsetSwap(Struct, frozen=True, gc=False):
    """``update``: exchange the contents (members and sizes) of two existing sets, at once
    for the packets matching them."""

    set: str
    other: str


# --- IPVS (the kernel's own records, from its adapter) -----------------------------------


class IpvsService(Struct, frozen=True):
    """A virtual server with its scheduler and persistence."""

    server: VirtualServer
    options: ServiceOptions = ServiceOptions()


class IpvsDest(Struct, frozen=True):
    """A real server of a virtual server (``weight`` 0: draining, see graceful termination)."""

    server: VirtualServer
    real: RealServer
    weight: int = 1


# --- the transaction ------------------------------------------------------------------------


class Op(NamedTuple):
    """One verb applied to a run of objects, in order (a run, not one object: a full sync
    records ~100k elements, and one operation each would cost more than rendering them)."""

    verb: Verb
    objs: tuple[object, ...]


class Transaction:
    """Operations in the order the tool must apply them, all or nothing.

    For nftables it is bound to one ``Table``; iptables objects name their table. A
    streaming writer may ``drain`` what was recorded so far and serialize it while the
    backend still records the rest: the tool still sees one transaction.
    """

    __slots__ = ("ops", "table")

    def __init__(self, table: Table | None = None, ops: Iterable[Op] = ()) -> None:
        self.table = table
        self.ops: list[Op] = list(ops)

    def add(self, obj: object) -> None:
        self.ops.append(Op("add", (obj,)))

    def delete(self, obj: object) -> None:
        self.ops.append(Op("delete", (obj,)))

    def flush(self, obj: object) -> None:
        self.ops.append(Op("flush", (obj,)))

    def update(self, obj: object) -> None:
        self.ops.append(Op("update", (obj,)))

    def insert(self, obj: object) -> None:
        self.ops.append(Op("insert", (obj,)))

    def add_all(self, objs: Iterable[object]) -> None:
        self._record("add", objs)

    def delete_all(self, objs: Iterable[object]) -> None:
        self._record("delete", objs)

    def _record(self, verb: Verb, objs: Iterable[object]) -> None:
        run = tuple(objs)
        if run:
            self.ops.append(Op(verb, run))

    def extend(self, other: Transaction) -> None:
        self.ops += other.ops

    def drain(self) -> list[Op]:
        ops, self.ops = self.ops, []
        return ops

    def operations(self) -> Iterator[tuple[Verb, object]]:
        """(verb, object) pairs, one per object, in order."""
        for verb, objs in self.ops:
            for obj in objs:
                yield verb, obj

    def __len__(self) -> int:
        return sum(len(op.objs) for op in self.ops)

    def __bool__(self) -> bool:
        return bool(self.ops)
