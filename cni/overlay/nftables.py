"""The nftables backend of the overlay's firewall (``firewall.Firewall``): one table of our own.

Everything lives in table ``inet svcnet-overlay`` (one table serves IPv4 and IPv6), so
nothing of anybody else is ever read or changed. The rules are rendered in exactly the form
``nft list table`` prints them; a sync lists the table, and if it differs replaces it in one
atomic ``nft -f`` transaction (add, delete, define: never a moment without rules). The table
is a handful of rules, so rewriting it whole is cheaper than working out a minimal edit.

One difference from iptables is inherent to nftables: an ``accept`` in our forward chain
ends the packet's walk through *our* table only; a drop in another table's forward hook (an
iptables-nft ``FORWARD`` policy DROP, firewalld) still drops it. Hosts with such a policy
must allow the pod network there, or use the iptables backend.
"""

from __future__ import annotations

from collections.abc import Sequence

from svcnet.cni.overlay.desired import KUBE_PROXY_MASQ_MARK, TrafficRules
from svcnet.cni.overlay.netlink import run

TABLE = "svcnet-overlay"
FAMILY = "inet"


def render(rules: Sequence[TrafficRules]) -> list[str]:
    """The table as ``nft list table`` prints it (without indentation and blank lines);
    empty when there is nothing to do."""
    masq = [r for r in rules if r.masquerade]
    notrack = [r for r in rules if r.notrack_ip]
    if not masq and not notrack:
        return []

    def ip(r: TrafficRules) -> str:
        return "ip" if r.family == 4 else "ip6"

    lines = [f"table {FAMILY} {TABLE} {{"]
    if masq:
        mark = f"0x{KUBE_PROXY_MASQ_MARK:08x}"
        lines += ["chain postrouting {",
                  "type nat hook postrouting priority srcnat; policy accept;",
                  f"meta mark & {mark} == {mark} return"]
        for r in masq:
            p, net = ip(r), r.network
            lines += [f"{p} saddr {net} {p} daddr {net} return",
                      f"{p} saddr != {net} {p} daddr {r.subnet} return",
                      f"{p} saddr {net} {p} daddr != {r.multicast} masquerade fully-random",
                      f"{p} saddr != {net} {p} daddr {net} masquerade fully-random"]
        lines += ["}", "chain forward {",
                  "type filter hook forward priority filter; policy accept;"]
        for r in masq:
            lines += [f"{ip(r)} saddr {r.network} accept", f"{ip(r)} daddr {r.network} accept"]
        lines.append("}")
    if notrack:
        for chain, hook, direction in (("prerouting", "prerouting", "daddr"),
                                       ("output", "output", "saddr")):
            lines += [f"chain {chain} {{",
                      f"type filter hook {hook} priority raw; policy accept;"]
            lines += [f"{ip(r)} {direction} {r.notrack_ip} udp dport {r.notrack_port} notrack"
                      for r in notrack]
            lines.append("}")
    lines.append("}")
    return lines


def script(want: list[str]) -> str:
    """One transaction replacing our table (or deleting it when nothing is wanted)."""
    head = f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
    return head + "".join(f"{ln}\n" for ln in want)


def differences(want: list[str], have: list[str] | None) -> list[str]:
    where = f"nftables {FAMILY} {TABLE}"
    if have is None:
        return [f"{where}: table missing"] if want else []
    if not want:
        return [f"{where}: not wanted"]
    if want == have:
        return []
    out = [f"{where}: missing: {ln}" for ln in want if ln not in have]
    out += [f"{where}: unexpected: {ln}" for ln in have if ln not in want]
    return out or [f"{where}: rules out of order"]


class NftablesFirewall:
    name = "nftables"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _nft(self, *args: str) -> list[str]:
        return [*(["ip", "netns", "exec", self.netns] if self.netns else []), "nft", *args]

    async def observe(self) -> list[str] | None:
        """Our table's listing, normalised like ``render``; None if there is no table."""
        code, out, err = await run(self._nft("list", "table", FAMILY, TABLE))
        if code != 0:
            text = err.decode().strip()
            if "No such file or directory" in text:
                return None
            raise OSError(f"nft list table: {text}")
        return [ln.strip() for ln in out.decode().splitlines() if ln.strip()]

    async def diff(self, rules: Sequence[TrafficRules]) -> list[str]:
        return differences(render(rules), await self.observe())

    async def sync(self, rules: Sequence[TrafficRules]) -> tuple[int, list[str]]:
        want = render(rules)
        if not differences(want, await self.observe()):
            return 0, []
        code, _, err = await run(self._nft("-f", "-"), input=script(want).encode())
        if code != 0:
            return 1, [f"nft -f: {err.decode().strip()}"]
        return 1, []
