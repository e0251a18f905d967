"""The one reader of ``iptables-save`` output (and of the proxy fake's, which prints the same),
shared by the proxy and by ``svcnet.leftovers`` (removing kube-proxy's and Flannel's chains).

A dump is read as a stream of (table, chain, line) for every chain declaration
(``:CHAIN POLICY [counters]``) and rule (``-A CHAIN spec``) -- without a list of its lines:
at 10k services it has 430k of them, and a full sync reads one per family. The backend's
current-state read, the drift items, the tracer, the IPVS backend's removal and jump checks
and ``proxy cleanup`` all read through ``save_lines``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

SaveLine = tuple[str, str, str]  # (table, chain, line as dumped)

# One match per line that matters: a table, a chain declaration or a rule. The scan runs in
# the regex engine (a Python loop slicing each line cost twice as much at 430k lines).
_LINE = re.compile(r"^(?:\*(\S+)|(:(\S+)[^\n]*)|(-A (\S+)[^\n]*))$", re.M)


def save_lines(save: str) -> Iterator[SaveLine]:
    """(table, chain, line) for every chain declaration (line ``:CHAIN POLICY [n:m]``) and
    rule (``-A CHAIN spec``) of ``save``, in order."""
    table = ""
    for m in _LINE.finditer(save):
        name, decl, decl_chain, rule, rule_chain = m.groups()
        if name is not None:
            table = name
        elif decl is not None:
            yield table, decl_chain, decl.rstrip()
        else:
            yield table, rule_chain, rule.rstrip()


def is_declaration(line: str) -> bool:
    return line[0] == ":"


def spec_of(chain: str, line: str) -> str:
    """A rule's text after ``-A CHAIN `` (empty for a declaration)."""
    return "" if line[0] == ":" else line[len(chain) + 4:]


def tables_of(save: str) -> dict[str, dict[str, list[str]]]:
    """table -> chain -> rule specs, declared chains included (empty when without rules)."""
    out: dict[str, dict[str, list[str]]] = {}
    for table, chain, line in save_lines(save):
        rules = out.setdefault(table, {}).setdefault(chain, [])
        if line[0] != ":":
            rules.append(spec_of(chain, line))
    return out


def rule_target(spec: str) -> str:
    """The ``-j``/``-g`` target of a rule spec (the last one named), or ""."""
    words = spec.split()
    for i in range(len(words) - 2, -1, -1):
        if words[i] in ("-j", "-g"):
            return words[i + 1]
    return ""
