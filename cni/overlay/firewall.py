"""The firewall seam: the overlay's rules (masquerade, FORWARD accept, VXLAN notrack) behind
one small protocol with an iptables and an nftables backend, a fake, and the host detection
for ``--overlay-masq-backend auto``.

Both backends take the same neutral ``TrafficRules`` and keep the same promises: only
objects we own are touched (our ``SVCNET-OVL-*`` chains, or our own nftables table), a sync
changes nothing when the kernel already matches, rules that are no longer wanted are
removed, and ``diff`` reports drift in words for ``svcnet overlay status``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from svcnet.cni.overlay.desired import TrafficRules

log = logging.getLogger(__name__)

BACKENDS = ("iptables", "nftables")
XTABLES_NAMES = frozenset({"filter", "nat", "mangle", "raw", "security"})
"""Tables iptables-nft creates (in families ip/ip6/arp/bridge): not a sign of native nft use."""


class Firewall(Protocol):
    name: str

    async def diff(self, rules: Sequence[TrafficRules]) -> list[str]:
        """How the kernel differs from ``rules``, one line per difference; empty when in sync."""
        ...

    async def sync(self, rules: Sequence[TrafficRules]) -> tuple[int, list[str]]:
        """Make our rules exactly ``rules`` (empty: remove all of ours).

        Returns (objects changed, error messages); never raises for a failed change, so
        the next sync retries it.
        """
        ...


def make_firewall(backend: str, netns: str | None) -> Firewall:
    from svcnet.cni.overlay.iptables import IptablesFirewall
    from svcnet.cni.overlay.nftables import NftablesFirewall

    if backend == "nftables":
        return NftablesFirewall(netns)
    return IptablesFirewall(netns)


async def detect_backend(netns: str | None) -> str:
    """What the host uses, for ``auto``.

    Our own rules decide first (a restart never switches backends); then rules other
    programs put in iptables (nft or legacy flavour); then native nftables tables; a host
    with neither gets iptables when it has the tools -- like Flannel, and the only backend
    whose FORWARD accept can override another program's FORWARD DROP policy.
    """
    from svcnet.cni.overlay.netlink import run

    prefix = ["ip", "netns", "exec", netns] if netns else []

    async def output(*argv: str) -> str:
        if not shutil.which(argv[0]):
            return ""
        try:
            code, out, _ = await run([*prefix, *argv], timeout=10)
        except (OSError, TimeoutError):
            return ""
        return out.decode() if code == 0 else ""

    saved = await output("iptables-save") + await output("iptables-legacy-save")
    tables = [ln.split() for ln in (await output("nft", "list", "tables")).splitlines()]
    ours_ipt = ":SVCNET-OVL-" in saved
    ours_nft = any(t[1:] == ["inet", _table()] for t in tables if len(t) == 3)
    if ours_ipt != ours_nft:
        return "iptables" if ours_ipt else "nftables"
    foreign_rules = [ln for ln in saved.splitlines()
                     if ln.startswith("-A ") and "SVCNET-OVL-" not in ln]
    if foreign_rules:
        return "iptables"
    native = [t for t in tables if len(t) == 3 and t[2] != _table()
              and not (t[1] in ("ip", "ip6", "arp", "bridge") and t[2] in XTABLES_NAMES)]
    if native:
        return "nftables"
    return "iptables" if shutil.which("iptables-restore") else "nftables"


def _table() -> str:
    from svcnet.cni.overlay.nftables import TABLE

    return TABLE


@dataclass
class FakeFirewall:
    """Holds the last synced rules; counts syncs that changed something."""

    name: str = "fake"
    rules: tuple[TrafficRules, ...] = ()
    transactions: int = 0

    async def diff(self, rules: Sequence[TrafficRules]) -> list[str]:
        return [] if tuple(rules) == self.rules else [f"rules differ: {self.rules}"]

    async def sync(self, rules: Sequence[TrafficRules]) -> tuple[int, list[str]]:
        if tuple(rules) == self.rules:
            return 0, []
        self.transactions += 1
        self.rules = tuple(rules)
        return 1, []
