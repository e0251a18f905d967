"""One serializer per tool: a ``Transaction`` of typed objects (``objects.py``) as that tool's
input (for IPVS: netlink calls on its adapter). Nothing else in the proxy writes ``nft``,
``iptables-restore`` or ``ipset`` syntax; the streaming writers (``Commands.stream``) feed
what these produce, and the fakes read it back (``test_proxy_model.py`` checks that a
transaction applied as objects and as text give the same tables).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import groupby
from typing import cast

from svcnet.proxy.ipvs_kernel import IpvsTable
from svcnet.proxy.objects import (
    Chain,
    Element,
    IpsetMember,
    IpsetSet,
    IpsetSwap,
    IptChain,
    IptRule,
    IptTable,
    IpvsDest,
    IpvsService,
    Map,
    Op,
    Rule,
    Set,
    Table,
    Transaction,
)

# Elements per ``add element`` command: nft parses one long command faster than many short
# ones, and a bounded one keeps its memory bounded.
ELEMENT_BATCH = 2000


# --- nft -f -------------------------------------------------------------------------------

def nft_script(txs: Iterable[Transaction]) -> str:
    return "".join(line for tx in txs for line in nft_lines(tx))


def nft_lines(tx: Transaction, ops: Iterable[Op] | None = None) -> Iterator[str]:
    """``nft -f`` lines (newline-terminated) of ``tx``'s operations, or of ``ops`` recorded
    on ``tx``. Consecutive operations on elements of one set become commands of up to
    ``ELEMENT_BATCH`` elements."""
    table = tx.table
    assert table is not None, "an nft transaction is bound to a table"
    t = f"{table.family} {table.name}"
    run: list[str] = []  # element texts of one verb and set, not written yet
    run_verb = run_set = ""
    for verb, objs in tx.ops if ops is None else ops:
        for name, group in groupby(objs, _element_set):
            if name != run_set or verb != run_verb:
                for i in range(0, len(run), ELEMENT_BATCH):
                    yield (f"{run_verb} element {t} {run_set} "
                           f"{{ {', '.join(run[i:i + ELEMENT_BATCH])} }}\n")
                run, run_verb, run_set = [], verb, name
            if not name:
                for obj in group:
                    yield _nft_command(t, verb, obj) + "\n"
                continue
            elements = cast(Iterator[Element], group)
            if verb == "add":
                run += [f"{e.key} : {e.value}" if e.value else e.key for e in elements]
            else:
                run += [e.key for e in elements]
            if len(run) >= ELEMENT_BATCH:
                full = len(run) - len(run) % ELEMENT_BATCH
                for i in range(0, full, ELEMENT_BATCH):
                    yield (f"{verb} element {t} {name} "
                           f"{{ {', '.join(run[i:i + ELEMENT_BATCH])} }}\n")
                run = run[full:]
    for i in range(0, len(run), ELEMENT_BATCH):
        yield f"{run_verb} element {t} {run_set} {{ {', '.join(run[i:i + ELEMENT_BATCH])} }}\n"


def _element_set(obj: object) -> str:
    """Runs of elements of one set are written together; "" for other objects."""
    return obj.set if type(obj) is Element else ""  # type: ignore[attr-defined]


def _nft_command(t: str, verb: str, obj: object) -> str:
    if isinstance(obj, Rule):
        if verb != "add":
            raise ValueError(f"{verb} rule: rules are replaced by flushing their chain")
        return f"add rule {t} {obj.chain} {obj.body}"
    if isinstance(obj, Chain):
        if verb == "add" and obj.hook:
            return (f"add chain {t} {obj.name} {{ type {obj.type} hook {obj.hook} "
                    f"priority {obj.priority} ; }}")
        return f"{verb} chain {t} {obj.name}"
    if isinstance(obj, Set):
        if verb != "add":
            return f"{verb} set {t} {obj.name}"
        spec = f"typeof {obj.typeof}" if obj.typeof else f"type {obj.type}"
        if obj.flags:
            spec += f" ; flags {obj.flags}"
        if obj.timeout:
            spec += f" ; timeout {obj.timeout}s"
        return f"add set {t} {obj.name} {{ {spec} ; }}"
    if isinstance(obj, Map):
        if verb != "add":
            return f"{verb} map {t} {obj.name}"
        spec = f"typeof {obj.typeof}" if obj.typeof else f"type {obj.type}"
        return f"add map {t} {obj.name} {{ {spec} ; }}"
    if isinstance(obj, Table):
        t = f"{obj.family} {obj.name}"
        if verb == "add" and obj.comment:
            return f'add table {t} {{ comment "{obj.comment}" ; }}'
        return f"{verb} table {t}"
    raise TypeError(f"not an nftables object: {obj!r}")


# --- iptables-restore --noflush -------------------------------------------------------------

# A command that names no chain and changes nothing: iptables-nft then reads the whole table
# once (see ``iptables.WHOLE_TABLE_CACHE``).
LIST_TABLE = "-S"


# A rule's command by verb, around its chain: "-I CHAIN 1" puts it first.
_RULE_COMMAND = {"add": ("-A", ""), "delete": ("-D", ""), "insert": ("-I", " 1")}


def restore_lines(ops: Iterable[Op]) -> Iterator[str]:
    """``iptables-restore --noflush`` input of ``ops``, which may still be being recorded,
    as one piece of text (whole lines) per operation: a ``*table`` header whenever the
    table changes, ``COMMIT`` after each. ``add`` of a chain creates it (``-N``: it must
    not exist), ``flush`` declares it (creates or empties it), ``delete`` removes it
    (``-X``: it must be empty and unreferenced); ``flush`` of a table (``IptTable``) makes
    iptables-nft read the whole table at once (see ``iptables.WHOLE_TABLE_CACHE``);
    ``insert`` of a rule puts it first in its chain (``-I CHAIN 1``)."""
    table = ""
    for verb, objs in ops:
        out: list[str] = []
        for obj in objs:
            if isinstance(obj, IptRule):
                if verb not in _RULE_COMMAND:
                    raise ValueError(f"{verb} of a rule")
                command, position = _RULE_COMMAND[verb]
                name = obj.table
                line = f"{command} {obj.chain}{position} {obj.spec}\n"
            elif isinstance(obj, IptChain):
                if verb not in ("add", "flush", "delete"):
                    raise ValueError(f"{verb} of a chain")
                name = obj.table
                line = (f"-N {obj.name}\n" if verb == "add" else f":{obj.name} - [0:0]\n"
                        if verb == "flush" else f"-X {obj.name}\n")
            elif isinstance(obj, IptTable):
                if verb != "flush":
                    raise ValueError(f"{verb} of a table")
                name, line = obj.name, LIST_TABLE + "\n"
            else:
                raise TypeError(f"not an iptables object: {obj!r}")
            if name != table:
                if table:
                    out.append("COMMIT\n")
                table = name
                out.append(f"*{name}\n")
            out.append(line)
        if out:
            yield "".join(out)
    if table:
        yield "COMMIT\n"


# --- ipset restore --------------------------------------------------------------------------

def ipset_lines(ops: Iterable[Op]) -> Iterator[str]:
    """``ipset restore -exist`` lines: sets created (``add``, with type, family and size),
    flushed and destroyed (``delete``), members added and removed, two sets' contents
    swapped (``update`` of an ``IpsetSwap``)."""
    for verb, objs in ops:
        for obj in objs:
            if isinstance(obj, IpsetMember):
                if verb not in ("add", "delete"):
                    raise ValueError(f"{verb} of an ipset member")
                yield f"{'add' if verb == 'add' else 'del'} {obj.set} {obj.entry} -exist\n"
            elif isinstance(obj, IpsetSet):
                if verb == "add":
                    yield (f"create {obj.name} {obj.type} family {obj.family} "
                           f"hashsize {obj.hashsize} maxelem {obj.maxelem}\n")
                elif verb in ("delete", "flush"):
                    yield f"{'destroy' if verb == 'delete' else 'flush'} {obj.name}\n"
                else:
                    raise ValueError(f"{verb} of an ipset")
            elif isinstance(obj, IpsetSwap):
                if verb != "update":
                    raise ValueError(f"{verb} of an ipset swap")
                yield f"swap {obj.set} {obj.other}\n"
            else:
                raise TypeError(f"not an ipset object: {obj!r}")


# --- IPVS (netlink) -------------------------------------------------------------------------

def apply_ipvs(table: IpvsTable, ops: Iterable[Op]) -> None:
    """Virtual and real server operations as calls on the IPVS adapter (netlink), in order.
    IPVS has no transactions: a failure leaves the ones before it applied, and the next
    sync is full."""
    for verb, objs in ops:
        for obj in objs:
            if isinstance(obj, IpvsDest):
                if verb == "add":
                    table.add_dest(obj.server, obj.real, obj.weight)
                elif verb == "update":
                    table.set_weight(obj.server, obj.real, obj.weight)
                elif verb == "delete":
                    table.delete_dest(obj.server, obj.real)
                else:
                    raise ValueError(f"{verb} of a real server")
            elif isinstance(obj, IpvsService):
                if verb == "add":
                    table.add_service(obj.server, obj.options)
                elif verb == "update":
                    table.update_service(obj.server, obj.options)
                elif verb == "delete":
                    table.delete_service(obj.server)
                else:
                    raise ValueError(f"{verb} of a virtual server")
            else:
                raise TypeError(f"not an IPVS object: {obj!r}")
