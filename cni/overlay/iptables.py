"""The one adapter for the overlay's masquerade and FORWARD rules, with a fake.

Our rules live in chains we own (``SVCNET-OVL-*``) reached by one jump from the built-in
chain; a sync rewrites only a chain whose rules differ, in one ``iptables-restore --noflush``
transaction per address family, so other users' rules are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from svcnet.cni.overlay.desired import ChainRules
from svcnet.cni.overlay.netlink import run

log = logging.getLogger(__name__)

ChainKey = tuple[int, str, str]


@dataclass(frozen=True, slots=True)
class ChainState:
    rules: tuple[str, ...]
    jumped: bool


class Firewall(Protocol):
    async def observe(self, chains: Sequence[ChainRules]) -> dict[ChainKey, ChainState]:
        """Current rules of each chain (absent chains are missing from the result)."""
        ...

    async def apply(self, chains: Sequence[ChainRules], add_jumps: Sequence[ChainRules]
                    ) -> list[str]:
        """Replace the contents of ``chains``; insert the jump for ``add_jumps`` first in
        their parent chain."""
        ...


class IptablesFirewall:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _cmd(self, family: int, tool: str) -> list[str]:
        name = tool if family == 4 else tool.replace("iptables", "ip6tables")
        return [*(["ip", "netns", "exec", self.netns] if self.netns else []), name]

    async def observe(self, chains: Sequence[ChainRules]) -> dict[ChainKey, ChainState]:
        found: dict[ChainKey, ChainState] = {}
        dumps: dict[tuple[int, str], list[str]] = {}
        for c in chains:
            if (c.family, c.table) not in dumps:
                code, out, err = await run([*self._cmd(c.family, "iptables-save"), "-t", c.table])
                if code != 0:
                    raise OSError(f"iptables-save: {err.decode().strip()}")
                dumps[(c.family, c.table)] = out.decode().splitlines()
            lines = dumps[(c.family, c.table)]
            if f":{c.chain} - [0:0]" not in lines and not any(
                    ln.startswith(f":{c.chain} ") for ln in lines):
                continue
            rules = tuple(ln for ln in lines if ln.startswith(f"-A {c.chain} "))
            found[(c.family, c.table, c.chain)] = ChainState(rules, c.jump in lines)
        return found

    async def apply(self, chains: Sequence[ChainRules], add_jumps: Sequence[ChainRules]
                    ) -> list[str]:
        errors: list[str] = []
        for family in sorted({c.family for c in (*chains, *add_jumps)}):
            text = restore_text([c for c in chains if c.family == family],
                                [c for c in add_jumps if c.family == family])
            code, _, err = await run([*self._cmd(family, "iptables-restore"), "--noflush"],
                                     input=text.encode())
            if code != 0:
                errors.append(f"iptables-restore (IPv{family}): {err.decode().strip()}")
        return errors


def restore_text(chains: Sequence[ChainRules], add_jumps: Sequence[ChainRules]) -> str:
    """One ``iptables-restore --noflush`` transaction: declaring a chain flushes it."""
    out: list[str] = []
    for table in sorted({c.table for c in (*chains, *add_jumps)}):
        out.append(f"*{table}")
        for c in (*chains, *add_jumps):
            if c.table == table and f":{c.chain} - [0:0]" not in out:
                out.append(f":{c.chain} - [0:0]")
        for c in chains:
            if c.table == table:
                out.extend(c.rules)
        for c in add_jumps:
            if c.table == table:
                out.append("-I" + c.jump[2:].replace(f" {c.parent} ", f" {c.parent} 1 ", 1))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


@dataclass
class FakeFirewall:
    chains: dict[ChainKey, ChainState] = field(default_factory=dict)
    transactions: int = 0

    async def observe(self, chains: Sequence[ChainRules]) -> dict[ChainKey, ChainState]:
        return {k: v for k, v in self.chains.items()
                if any(k == (c.family, c.table, c.chain) for c in chains)}

    async def apply(self, chains: Sequence[ChainRules], add_jumps: Sequence[ChainRules]
                    ) -> list[str]:
        self.transactions += 1
        for c in chains:
            key = (c.family, c.table, c.chain)
            old = self.chains.get(key)
            self.chains[key] = ChainState(c.rules, old.jumped if old else False)
        for c in add_jumps:
            key = (c.family, c.table, c.chain)
            old = self.chains.get(key)
            self.chains[key] = ChainState(old.rules if old else (), True)
        return []
