"""Removing another tool's iptables chains without touching anyone else's rules.

Shared by the proxy (kube-proxy's chains) and the overlay (Flannel's): both take over a node
from a predecessor that was stopped without cleaning up. Pure text in, text out: an
``iptables-save`` dump (read by ``svcnet.iptables_save``, as the proxy reads it) becomes one
``iptables-restore --noflush`` script that deletes every rule jumping into a doomed chain
(wherever it sits, by its exact saved text), then flushes and deletes the doomed chains, one
table per transaction. Rules of other chains stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from svcnet.iptables_save import is_declaration, rule_target, save_lines

BUILTIN = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


@dataclass(frozen=True, slots=True)
class SavedTable:
    name: str
    chains: tuple[str, ...]
    rules: tuple[str, ...]
    """``-A CHAIN ...`` lines as iptables-save prints them."""


def parse_save(save: str) -> list[SavedTable]:
    chains: dict[str, list[str]] = {}
    rules: dict[str, list[str]] = {}
    for table, chain, line in save_lines(save):
        if is_declaration(line):
            chains.setdefault(table, []).append(chain)
        else:
            rules.setdefault(table, []).append(line)
    return [SavedTable(t, tuple(c), tuple(rules.get(t, ()))) for t, c in chains.items()]


def rule_chain(rule: str) -> str:
    return rule.split(None, 2)[1]


def reachable(table: SavedTable, roots: Collection[str]) -> set[str]:
    """Chains reached from the rules ``roots`` (exact saved lines), following jumps."""
    by_chain: dict[str, list[str]] = {}
    for rule in table.rules:
        by_chain.setdefault(rule_chain(rule), []).append(rule)
    seen: set[str] = set()
    todo = [rule_target(r) for r in table.rules if r in roots]
    while todo:
        chain = todo.pop()
        if chain in seen or chain not in table.chains:
            continue
        seen.add(chain)
        todo += [rule_target(r) for r in by_chain.get(chain, ())]
    return seen


def removal_script(save: str, doomed: Callable[[str, str], bool],
                   keep: Callable[[SavedTable], set[str]] | None = None,
                   doomed_rule: Callable[[str, str], bool] | None = None,
                   *, list_first: bool = False) -> tuple[str, list[str]]:
    """Restore input removing the chains ``doomed(table, chain)`` selects (minus those
    ``keep(table)`` names), every jump into them and the rules ``doomed_rule(table, rule)``
    selects; and what it removes, as text. ``list_first``: for iptables-nft, which otherwise
    looks up each named chain in a sorted list -- quadratic at kube-proxy's 100k chains --
    a leading ``-S`` makes it read the table once (see ``svcnet.proxy.iptables``)."""
    out: list[str] = []
    removed: list[str] = []
    for table in parse_save(save):
        kept = keep(table) if keep else set()
        gone = [c for c in table.chains if c not in BUILTIN and doomed(table.name, c)
                and c not in kept]
        doomed_set = set(gone)
        jumps = [r for r in table.rules if rule_chain(r) not in doomed_set and (
            rule_target(r) in doomed_set or (doomed_rule and doomed_rule(table.name, r)))]
        if not gone and not jumps:
            continue
        out.append(f"*{table.name}")
        if list_first:
            out.append("-S")
        out += ["-D" + r[2:] for r in jumps]
        out += [f":{c} - [0:0]" for c in gone]
        out += [f"-X {c}" for c in gone]
        out.append("COMMIT")
        removed += [f"{table.name} {r}" for r in jumps]
        removed += [f"{table.name} chain {c}" for c in gone]
    return ("\n".join(out) + "\n" if out else ""), removed
