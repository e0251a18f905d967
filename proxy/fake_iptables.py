"""A stateful fake of the iptables tools (knftables' Fake, for iptables): ``*-restore``
transactions applied to in-memory tables, ``*-save`` dumping them, ``iptables -S/-D``; and
of ``ipset restore``/``list -n`` (``FakeIpset``), which the IPVS backend's rules match.
``FakeNodeTools`` routes a backend's commands to both (and ignores ``ip``/``sysctl``).

It answers as the real tools do where our backends depend on it: a transaction applies
only at ``COMMIT`` and not at all if any command in it fails (``-A`` to a missing chain or
target, ``-D`` of an absent rule, ``-N`` of an existing chain, ``-X`` of a chain still
holding or receiving rules), ``--noflush`` keeps what is not declared, a ``:CHAIN``
declaration flushes or creates a user chain. Rules are kept as written -- the kernel's
``iptables-save`` normalises them (``--or-mark`` becomes ``--set-xmark``, ``/32`` suffixes
go), which the tracer reads either way. With it the packet-flow tables run through the
tracer on every commit without root (``tests/test_proxy_fake.py``). It applies typed
transactions (``objects.Transaction``) as well as restore text.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
from svcnet.proxy.commands import CommandFailed
from svcnet.proxy.objects import IpsetMember, IpsetSet, IpsetSwap, IptChain, IptRule, IptTable, Op
from svcnet.proxy.sealed_input import Seal

BUILTIN = {"nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
           "filter": ("INPUT", "FORWARD", "OUTPUT"),
           "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")}
TARGETS = frozenset({"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "DNAT", "SNAT",
                     "MASQUERADE", "LOG", "CONNMARK"})

Table = dict[str, list[str]]  # chain -> rule specs (the text after "-A CHAIN ")


class _Failed(Exception):
    pass


@dataclass(slots=True)
class FakeIptables:
    """Both families, either variant (``iptables-nft-*``/``-legacy-*``: the same tables)."""

    tables: dict[tuple[int, str], Table] = field(default_factory=dict)
    restores: int = 0  # transactions committed

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        tool = argv[0]
        family = 6 if tool.startswith("ip6") else 4
        try:
            if tool.endswith("-save"):
                return self.save(family)
            if tool.endswith("-restore"):
                self._restore(family, input or "", noflush="--noflush" in argv)
                return ""
            if tool.startswith(("iptables", "ip6tables")):
                return self._command(family, [a for a in argv[1:]])
        except _Failed as err:
            if check:
                raise CommandFailed(argv, 1, str(err)) from None
            return ""
        raise CommandFailed(argv, 127, f"{tool}: not faked")

    def stream(self, argv: Sequence[str], chunks: Iterable[str], *,
               seal: Seal | None = None, quiet: bool = False) -> str:
        out = self.run(argv, input="".join(chunks))
        return "" if quiet else out

    def save(self, family: int) -> str:
        out: list[str] = []
        for (fam, name), table in sorted(self.tables.items()):
            if fam != family:
                continue
            out.append(f"*{name}")
            builtin = BUILTIN.get(name, ())
            out += [f":{c} ACCEPT [0:0]" for c in builtin]
            out += [f":{c} - [0:0]" for c in sorted(table) if c not in builtin]
            for chain in [*builtin, *sorted(c for c in table if c not in builtin)]:
                out += [f"-A {chain} {rule}" for rule in table.get(chain, [])]
            out.append("COMMIT")
        return "\n".join(out) + "\n" if out else ""

    # --- one transaction -------------------------------------------------------------------

    def _table(self, family: int, name: str) -> Table:
        return self.tables.get((family, name)) or {c: [] for c in BUILTIN.get(name, ())}

    def _restore(self, family: int, text: str, *, noflush: bool) -> None:
        work: dict[str, Table] = {}
        current: Table | None = None
        name = ""
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                if line.startswith("*"):
                    name = line[1:]
                    base = self._table(family, name)
                    current = ({c: list(r) for c, r in base.items()} if noflush
                               else {c: [] for c in BUILTIN.get(name, ())})
                elif current is None:
                    raise _Failed("no table")
                elif line == "COMMIT":
                    work[name] = current
                    current = None
                elif line.startswith(":"):
                    chain = line[1:].split()[0]
                    if chain not in BUILTIN.get(name, ()):
                        current[chain] = []
                else:
                    _apply(current, name, shlex.split(line))
            except _Failed as err:
                raise _Failed(f"line {n} failed: {err}") from None
        for tname, table in work.items():  # only what was committed
            self.tables[family, tname] = table
        self.restores += 1

    def apply_transaction(self, family: int, ops: Iterable[Op]) -> None:
        """A typed transaction (``objects.py``) applied as ``iptables-restore --noflush``
        applies its text, all or nothing, without the text: what the serializer's text
        must do too (``test_proxy_model.py``). A rule's spec is read as text, as in the
        model."""
        work: dict[str, Table] = {}
        try:
            for verb, objs in ops:
                for obj in objs:
                    if isinstance(obj, IptTable):
                        continue  # the listing: changes nothing
                    if not isinstance(obj, (IptChain, IptRule)):
                        raise _Failed(f"not an iptables object: {obj!r}")
                    table = work.get(obj.table)
                    if table is None:
                        base = self._table(family, obj.table)
                        table = work[obj.table] = {c: list(r) for c, r in base.items()}
                    if isinstance(obj, IptRule):
                        command = {"add": ["-A", obj.chain], "delete": ["-D", obj.chain],
                                   "insert": ["-I", obj.chain, "1"]}.get(verb)
                        if command is None:
                            raise _Failed(f"{verb} of a rule")
                        _apply(table, obj.table, [*command, *shlex.split(obj.spec)])
                    elif verb == "flush":
                        if obj.name not in BUILTIN.get(obj.table, ()):
                            table[obj.name] = []
                    else:
                        _apply(table, obj.table, ["-N" if verb == "add" else "-X", obj.name])
        except _Failed as err:
            raise CommandFailed(["iptables-restore"], 1, str(err)) from None
        for name, table in work.items():
            self.tables[family, name] = table
        self.restores += 1

    def _command(self, family: int, args: list[str]) -> str:
        table_name = "filter"
        if "-w" in args:
            i = args.index("-w")
            del args[i:i + 2]
        if "-t" in args:
            i = args.index("-t")
            table_name = args[i + 1]
            del args[i:i + 2]
        table = self._table(family, table_name)
        if args[0] == "-S":
            chains = args[1:] or sorted(table)
            if any(c not in table for c in chains):
                raise _Failed(f"chain {chains} does not exist")
            return "".join(
                (f"-N {c}\n" if c not in BUILTIN.get(table_name, ()) else f"-P {c} ACCEPT\n")
                + "".join(f"-A {c} {r}\n" for r in table[c]) for c in chains)
        work = {c: list(r) for c, r in table.items()}
        _apply(work, table_name, args)
        self.tables[family, table_name] = work
        return ""


def _spec(tokens: Sequence[str]) -> str:
    return " ".join(f'"{t}"' if " " in t or not t else t for t in tokens)


def _apply(table: Table, name: str, tokens: list[str]) -> None:
    op = tokens[0]
    if op == "-S":
        return  # a listing: changes nothing (see iptables.WHOLE_TABLE_CACHE)
    chain = tokens[1] if len(tokens) > 1 else ""
    builtin = BUILTIN.get(name, ())
    if op == "-N":
        if chain in table:
            raise _Failed(f"chain {chain} already exists")
        table[chain] = []
    elif op == "-X":
        if chain not in table or chain in builtin:
            raise _Failed(f"no chain {chain}")
        if table[chain]:
            raise _Failed(f"chain {chain} is not empty")
        if any(_target(r) == chain for rules in table.values() for r in rules):
            raise _Failed(f"chain {chain} is referenced")
        del table[chain]
    elif op == "-F":
        if chain not in table:
            raise _Failed(f"no chain {chain}")
        table[chain] = []
    elif op in ("-A", "-I", "-D"):
        if chain not in table:
            raise _Failed(f"no chain {chain}")
        rest = tokens[2:]
        position = 0
        if op == "-I" and rest and rest[0].isdigit():
            position, rest = int(rest[0]) - 1, rest[1:]
        rule = _spec(rest)
        if op == "-D":
            if rule not in table[chain]:
                raise _Failed(f"-D {chain} {rule}: no such rule")
            table[chain].remove(rule)
            return
        target = _target(rule)
        if target and target not in TARGETS and target not in table:
            raise _Failed(f"target {target} does not exist")
        if op == "-A":
            table[chain].append(rule)
        else:
            table[chain].insert(position, rule)
    else:
        raise _Failed(f"unknown command {op}")


def _target(rule: str) -> str:
    words = shlex.split(rule)
    for flag in ("-j", "-g"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return ""


@dataclass(slots=True)
class FakeIpset:
    """``ipset restore`` (create, add, del, swap, destroy, flush) and ``ipset list -n``, as
    text or as a typed transaction (``apply_transaction``), all or nothing. A set keeps the
    header it was created with (swapped with its members, as the kernel swaps sets)."""

    sets: dict[str, set[str]] = field(default_factory=dict)
    headers: dict[str, IpsetSet] = field(default_factory=dict)

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        if list(argv[1:3]) == ["list", "-n"]:
            return "".join(f"{name}\n" for name in sorted(self.sets))
        if argv[1] != "restore":
            raise CommandFailed(argv, 127, "ipset: not faked")
        exist = "-exist" in argv
        ops: list[Op] = []
        for line in (input or "").splitlines():
            words = [w for w in line.split() if w != "-exist"]
            if not words:
                continue
            try:
                ops.append(_ipset_op(words))
            except (IndexError, ValueError):
                raise CommandFailed(argv, 1, f"{line}: syntax error") from None
        try:
            self._apply(ops, exist=exist)
        except _Failed as err:
            raise CommandFailed(argv, 1, str(err)) from None
        return ""

    def apply_transaction(self, ops: Iterable[Op]) -> None:
        """What ``ipset restore -exist`` does with ``ipset_lines(ops)``."""
        try:
            self._apply(ops, exist=True)
        except _Failed as err:
            raise CommandFailed(["ipset", "restore"], 1, str(err)) from None

    def _apply(self, ops: Iterable[Op], *, exist: bool) -> None:
        work = {name: set(members) for name, members in self.sets.items()}
        headers = dict(self.headers)
        for verb, objs in ops:
            for obj in objs:
                if isinstance(obj, IpsetSet):
                    name = obj.name
                    if verb == "add":
                        if name in work and not exist:
                            raise _Failed(f"create {name}: set exists")
                        work.setdefault(name, set())
                        headers.setdefault(name, obj)
                        continue
                    if name not in work:
                        raise _Failed(f"{verb} {name}: set does not exist")
                    if verb == "flush":
                        work[name].clear()
                    elif verb == "delete":
                        del work[name]
                        headers.pop(name, None)
                    else:
                        raise _Failed(f"{verb} of a set")
                elif isinstance(obj, IpsetSwap):
                    a, b = obj.set, obj.other
                    if a not in work or b not in work:
                        raise _Failed(f"swap {a} {b}: set does not exist")
                    work[a], work[b] = work[b], work[a]
                    ha, hb = headers.get(a), headers.get(b)
                    if ha is not None and hb is not None:
                        headers[a], headers[b] = (msgspec.structs.replace(hb, name=a),
                                                  msgspec.structs.replace(ha, name=b))
                elif isinstance(obj, IpsetMember):
                    if obj.set not in work:
                        raise _Failed(f"{verb} {obj.set}: set does not exist")
                    if verb == "add":
                        header = headers.get(obj.set)
                        members = work[obj.set]
                        if (header is not None and header.maxelem
                                and obj.entry not in members
                                and len(members) >= header.maxelem):
                            raise _Failed(f"add {obj.set}: Hash is full, cannot add more "
                                          "elements")
                        members.add(obj.entry)
                    else:
                        work[obj.set].discard(obj.entry)
                else:
                    raise _Failed(f"not an ipset object: {obj!r}")
        self.sets = work
        self.headers = headers

    def members(self) -> dict[str, frozenset[str]]:
        return {name: frozenset(m) for name, m in self.sets.items()}


def _ipset_op(words: list[str]) -> Op:
    """One ``ipset restore`` line as the typed operation it serializes."""
    command, name = words[0], words[1]
    if command == "create":
        spec = dict(zip(words[3::2], words[4::2], strict=False))
        return Op("add", (IpsetSet(name, words[2], spec.get("family", "inet"),
                                   int(spec.get("hashsize", 1024)),
                                   int(spec.get("maxelem", 65536))),))
    if command in ("add", "del"):
        return Op("add" if command == "add" else "delete", (IpsetMember(name, words[2]),))
    if command in ("destroy", "flush"):
        return Op("delete" if command == "destroy" else "flush", (IpsetSet(name),))
    if command == "swap":
        return Op("update", (IpsetSwap(name, words[2]),))
    raise ValueError(command)


@dataclass(slots=True)
class FakeNodeTools:
    """The node's tools for a backend under test: iptables and ipset faked statefully;
    ``ip``, ``sysctl`` and ``modprobe`` answer nothing."""

    iptables: FakeIptables = field(default_factory=FakeIptables)
    ipset: FakeIpset = field(default_factory=FakeIpset)

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        if argv[0] == "ipset":
            return self.ipset.run(argv, input=input, check=check)
        if argv[0] in ("ip", "sysctl", "modprobe"):
            return ""
        return self.iptables.run(argv, input=input, check=check)

    def stream(self, argv: Sequence[str], chunks: Iterable[str], *,
               seal: Seal | None = None, quiet: bool = False) -> str:
        out = self.run(argv, input="".join(chunks))
        return "" if quiet else out
