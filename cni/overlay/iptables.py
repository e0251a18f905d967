"""The iptables backend of the overlay's firewall (``firewall.Firewall``).

Our rules live in chains we own (``SVCNET-OVL-*``) reached by one jump from the built-in
chain; a sync reads each family once (``iptables-save``), then rewrites only a chain whose
rules differ, inserts missing jumps and deletes chains no longer wanted, in one
``iptables-restore --noflush`` transaction per family, so other users' rules are never
touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from svcnet.cni.overlay.desired import KUBE_PROXY_MASQ_MARK, TrafficRules
from svcnet.cni.overlay.netlink import run

log = logging.getLogger(__name__)

MASQ_CHAIN = "SVCNET-OVL-POSTRTG"
FWD_CHAIN = "SVCNET-OVL-FWD"
NOTRACK_IN_CHAIN = "SVCNET-OVL-RAW-PRE"
NOTRACK_OUT_CHAIN = "SVCNET-OVL-RAW-OUT"
CHAIN_PREFIX = "SVCNET-OVL-"
RULE_COMMENT = '-m comment --comment "svcnet overlay"'
FAMILIES = (4, 6)


@dataclass(frozen=True, slots=True)
class ChainRules:
    """One chain we own, its rules in ``iptables-save`` form, and the jump to it."""

    family: int
    table: str
    chain: str
    parent: str
    rules: tuple[str, ...]

    @property
    def jump(self) -> str:
        return f"-A {self.parent} {RULE_COMMENT} -j {self.chain}"

    def __str__(self) -> str:
        return f"IPv{self.family} {self.table} {self.chain}"


@dataclass(frozen=True, slots=True)
class SavedChain:
    """One of our chains as ``iptables-save`` shows it, with the lines that jump to it."""

    family: int
    table: str
    chain: str
    rules: tuple[str, ...]
    jumps: tuple[str, ...]

    def __str__(self) -> str:
        return f"IPv{self.family} {self.table} {self.chain}"


def render_chains(rules: Sequence[TrafficRules]) -> tuple[ChainRules, ...]:
    """The rules as our chains, in exactly the text ``iptables-save`` prints back."""
    chains: list[ChainRules] = []
    c = RULE_COMMENT
    mark = f"{KUBE_PROXY_MASQ_MARK:#x}/{KUBE_PROXY_MASQ_MARK:#x}"
    for r in rules:
        net = r.network
        if r.masquerade:
            chains.append(ChainRules(r.family, "nat", MASQ_CHAIN, "POSTROUTING", (
                f"-A {MASQ_CHAIN} -m mark --mark {mark} {c} -j RETURN",
                f"-A {MASQ_CHAIN} -s {net} -d {net} {c} -j RETURN",
                f"-A {MASQ_CHAIN} ! -s {net} -d {r.subnet} {c} -j RETURN",
                f"-A {MASQ_CHAIN} -s {net} ! -d {r.multicast} {c} -j MASQUERADE --random-fully",
                f"-A {MASQ_CHAIN} ! -s {net} -d {net} {c} -j MASQUERADE --random-fully",
            )))
            chains.append(ChainRules(r.family, "filter", FWD_CHAIN, "FORWARD", (
                f"-A {FWD_CHAIN} -s {net} {c} -j ACCEPT",
                f"-A {FWD_CHAIN} -d {net} {c} -j ACCEPT",
            )))
        if r.notrack_ip:
            host = f"{r.notrack_ip}/{32 if r.family == 4 else 128}"
            udp = f"-p udp -m udp --dport {r.notrack_port} {c} -j NOTRACK"
            chains.append(ChainRules(r.family, "raw", NOTRACK_IN_CHAIN, "PREROUTING",
                                     (f"-A {NOTRACK_IN_CHAIN} -d {host} {udp}",)))
            chains.append(ChainRules(r.family, "raw", NOTRACK_OUT_CHAIN, "OUTPUT",
                                     (f"-A {NOTRACK_OUT_CHAIN} -s {host} {udp}",)))
    return tuple(chains)


def parse_saved(family: int, text: str) -> dict[tuple[str, str], SavedChain]:
    """Our chains in one family's ``iptables-save`` output, keyed by (table, chain)."""
    found: dict[tuple[str, str], SavedChain] = {}
    table = ""
    lines = text.splitlines()
    for ln in lines:
        if ln.startswith("*"):
            table = ln[1:].strip()
        elif ln.startswith(f":{CHAIN_PREFIX}"):
            name = ln[1:].split()[0]
            found[(table, name)] = SavedChain(family, table, name, (), ())
    table = ""
    for ln in lines:
        if ln.startswith("*"):
            table = ln[1:].strip()
        elif ln.startswith("-A "):
            owner = ln.split()[1]
            if (table, owner) in found:
                old = found[(table, owner)]
                found[(table, owner)] = SavedChain(family, table, owner, (*old.rules, ln),
                                                   old.jumps)
            target = ln.rsplit(" -j ", 1)[-1].split()[0] if " -j " in ln else ""
            if target.startswith(CHAIN_PREFIX) and (table, target) in found \
                    and not owner.startswith(CHAIN_PREFIX):
                old = found[(table, target)]
                found[(table, target)] = SavedChain(family, table, target, old.rules,
                                                    (*old.jumps, ln))
    return found


@dataclass(frozen=True, slots=True)
class ChainPlan:
    rewrite: tuple[ChainRules, ...] = ()
    add_jumps: tuple[ChainRules, ...] = ()
    stale: tuple[SavedChain, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rewrite or self.add_jumps or self.stale)

    def lines(self) -> list[str]:
        return ([f"{c}: rules differ" for c in self.rewrite]
                + [f"{c}: jump from {c.parent} missing" for c in self.add_jumps]
                + [f"{c}: not wanted" for c in self.stale])


def plan_chains(desired: Sequence[ChainRules], saved: dict[tuple[str, str], SavedChain]
                ) -> ChainPlan:
    """Chains whose rules differ, chains whose jump is missing, and our chains not wanted."""
    rewrite, jumps = [], []
    for c in desired:
        got = saved.get((c.table, c.chain))
        if got is None or got.rules != c.rules:
            rewrite.append(c)
        if got is None or c.jump not in got.jumps:
            jumps.append(c)
    wanted = {(c.table, c.chain) for c in desired}
    stale = [s for key, s in sorted(saved.items()) if key not in wanted]
    return ChainPlan(tuple(rewrite), tuple(jumps), tuple(stale))


def restore_text(plan: ChainPlan) -> str:
    """One ``iptables-restore --noflush`` transaction: declaring a chain flushes it."""
    out: list[str] = []
    tables = {c.table for c in (*plan.rewrite, *plan.add_jumps)} | {s.table for s in plan.stale}
    for table in sorted(tables):
        out.append(f"*{table}")
        # Only rewritten chains are declared (declaring flushes); a chain that merely lost
        # its jump keeps its rules, and a missing chain is always also rewritten.
        for c in plan.rewrite:
            if c.table == table:
                out.append(f":{c.chain} - [0:0]")
        for c in plan.rewrite:
            if c.table == table:
                out.extend(c.rules)
        for c in plan.add_jumps:
            if c.table == table:
                out.append("-I" + c.jump[2:].replace(f" {c.parent} ", f" {c.parent} 1 ", 1))
        for s in plan.stale:
            if s.table == table:
                out.extend("-D" + jump[2:] for jump in s.jumps)
                out += [f"-F {s.chain}", f"-X {s.chain}"]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


class IptablesFirewall:
    name = "iptables"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _cmd(self, family: int, tool: str) -> list[str]:
        name = tool if family == 4 else tool.replace("iptables", "ip6tables")
        return [*(["ip", "netns", "exec", self.netns] if self.netns else []), name]

    async def _saved(self, family: int, needed: bool) -> dict[tuple[str, str], SavedChain]:
        """Our chains in one family; a family we want nothing in may be unreadable (no
        IPv6 support, no ip6tables) and then counts as empty."""
        code, out, err = await run(self._cmd(family, "iptables-save"))
        if code != 0:
            if needed:
                raise OSError(f"iptables-save (IPv{family}): {err.decode().strip()}")
            return {}
        return parse_saved(family, out.decode())

    async def _plans(self, rules: Sequence[TrafficRules]) -> dict[int, ChainPlan]:
        chains = render_chains(rules)
        mine = {family: [c for c in chains if c.family == family] for family in FAMILIES}

        async def saved(family: int) -> dict[tuple[str, str], SavedChain]:
            try:
                return await self._saved(family, bool(mine[family]))
            except FileNotFoundError:
                if mine[family]:
                    raise
                return {}

        dumps = await asyncio.gather(*(saved(family) for family in FAMILIES))
        return {family: plan_chains(mine[family], dump)
                for family, dump in zip(FAMILIES, dumps, strict=True)}

    async def diff(self, rules: Sequence[TrafficRules]) -> list[str]:
        return [ln for plan in (await self._plans(rules)).values() for ln in plan.lines()]

    async def sync(self, rules: Sequence[TrafficRules]) -> tuple[int, list[str]]:
        errors: list[str] = []
        changed = 0
        for family, plan in (await self._plans(rules)).items():
            if not plan:
                continue
            changed += len(plan.rewrite) + len(plan.add_jumps) + len(plan.stale)
            code, _, err = await run([*self._cmd(family, "iptables-restore"), "--noflush"],
                                     input=restore_text(plan).encode())
            if code != 0:
                errors.append(f"iptables-restore (IPv{family}): {err.decode().strip()}")
        return changed, errors
