"""Taking a node over from kube-proxy: remove what it left once our own rules are in.

Stopping kube-proxy (deleting its DaemonSet) leaves its rules in the kernel. They keep
DNAT-ing Service addresses to the endpoints of the moment they were written: our nftables
table hooks the same nat hooks at the same priority, so for every new connection the first
of the two to run decides, and stale rules send traffic to pods that are gone. kube-proxy
itself removes the other modes' rules when it starts in one; we do the same for all of its
modes -- but only after our first sync has programmed every Service, so at every moment one
complete rule set answers.

What is kube-proxy's is named here from its sources (1.28 iptables and ipvs modes, the
nftables mode of 1.29+), never "every KUBE-* chain": other tools (kube-router, the kubelet)
use that prefix too. Left alone on purpose:
- ``KUBE-KUBELET-CANARY`` (mangle, nat, filter) and ``KUBE-IPTABLES-HINT`` (mangle): the
  running kubelet's; it watches its canary and would re-create its rules.
- filter ``KUBE-FIREWALL`` and its jumps, where the kubelet's canary exists: the localnet
  guard (drops packets to 127/8 from outside) that the kubelet also writes up to 1.28; a
  security rule, not Service plumbing. Without a kubelet's canary it is kube-proxy's (or
  ours) and goes.
- IPVS virtual services and the ``kube-ipvs0`` dummy device: kube-ipvs0 is deleted when
  present (its addresses made the VIPs local); the services then catch nothing (our nat
  rules DNAT before IPVS sees a packet) and ``ipvsadm --clear`` removes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from svcnet.proxy.commands import CommandFailed, Commands

from svcnet.iptables_save import rule_target
from svcnet.leftovers import BUILTIN, SavedTable, reachable, removal_script, rule_chain

log = logging.getLogger(__name__)

CHAINS = frozenset({
    # iptables mode
    "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ", "KUBE-MARK-DROP", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    # ipvs mode
    "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER", "KUBE-LOAD-BALANCER-LOCAL",
})
OURS = frozenset({"KUBE-MASQ-NOT-LOCAL"})
"""Our iptables mode's one chain kube-proxy does not have: ``svcnet proxy cleanup`` removes
it with the rest."""
CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-", "KUBE-XLB-")
SHARED = "KUBE-FIREWALL"
"""nat: the ipvs mode's load-balancer firewall. filter: the localnet guard, which the kubelet
writes too (up to 1.28): left wherever the kubelet's canary says a kubelet runs."""
KUBELET_CANARY = "KUBE-KUBELET-CANARY"
IPSETS = frozenset({
    "KUBE-LOOP-BACK", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL",
    "KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER-LOCAL", "KUBE-LOAD-BALANCER-FW",
    "KUBE-LOAD-BALANCER-SOURCE-IP", "KUBE-LOAD-BALANCER-SOURCE-CIDR", "KUBE-NODE-PORT-TCP",
    "KUBE-NODE-PORT-LOCAL-TCP", "KUBE-NODE-PORT-UDP", "KUBE-NODE-PORT-LOCAL-UDP",
    "KUBE-NODE-PORT-SCTP-HASH", "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "KUBE-HEALTH-CHECK-NODE-PORT", "KUBE-IPVS-IPS",
})
NFT_TABLE = "kube-proxy"
IPVS_LINK = "kube-ipvs0"


def is_kube_proxy_chain(table: str, chain: str) -> bool:
    return (chain in CHAINS or chain in OURS or chain.startswith(CHAIN_PREFIXES)
            or chain == SHARED)


def is_kube_proxy_ipset(name: str) -> bool:
    """IPv6 sets are the IPv4 names with ``KUBE-6-`` for ``KUBE-``."""
    return name in IPSETS or (name.startswith("KUBE-6-") and f"KUBE-{name[7:]}" in IPSETS)


@dataclass(frozen=True, slots=True)
class Variant:
    save: str
    restore: str
    legacy: bool


VARIANTS = tuple(Variant(f"{base}-{kind}-save", f"{base}-{kind}-restore", kind == "legacy")
                 for base in ("iptables", "ip6tables") for kind in ("nft", "legacy"))


@dataclass
class Report:
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def iptables_script(save: str, own_jumps: Collection[str] = (),
                    own_chains: Mapping[str, Collection[str]] | None = None,
                    *, legacy: bool = False) -> tuple[str, list[str]]:
    """Restore input removing kube-proxy's chains from one dump, except those our own
    iptables mode reaches from ``own_jumps`` (its exact built-in chain rules): that mode
    shares kube-proxy's chain names and has just rewritten them. Jumps from built-in chains
    into kube-proxy's chains that are not ours go too (kube-proxy comments its filter
    jumps, we do not: left, they would run our chains twice). ``own_chains``: per table,
    chains that mode declares whether or not anything jumps to them (its canary)."""

    def keep(table: SavedTable) -> set[str]:
        roots = [r for r in table.rules if rule_chain(r) in BUILTIN and r in own_jumps]
        declared = set((own_chains or {}).get(table.name, ()))
        if table.name == "filter" and KUBELET_CANARY in table.chains:
            declared.add(SHARED)
        return (reachable(table, roots) if roots else set()) | declared

    def foreign_jump(table: str, rule: str) -> bool:
        """kube-proxy's spelling of a jump our iptables mode writes its own way."""
        target = rule_target(rule)
        return (bool(own_jumps) and rule_chain(rule) in BUILTIN and rule not in own_jumps
                and target != SHARED and is_kube_proxy_chain(table, target))

    return removal_script(save, is_kube_proxy_chain, keep, foreign_jump,
                          list_first=not legacy)


def own_iptables_chains() -> dict[str, tuple[str, ...]]:
    """The chains our iptables mode declares in each table."""
    from svcnet.proxy.iptables import FILTER_TOP, NAT_TOP

    return {"nat": NAT_TOP, "filter": FILTER_TOP}


def own_iptables_jumps() -> frozenset[str]:
    """Our iptables mode's jumps from built-in chains, as iptables-save prints them."""
    from svcnet.proxy.iptables import JUMPS

    def quoted(spec: tuple[str, ...]) -> str:
        return " ".join(f'"{a}"' if " " in a else a for a in spec)

    return frozenset(f"-A {chain} {quoted(spec)}" for _, chain, spec in JUMPS)


def remove_kube_proxy_leftovers(commands: Commands, *, own_legacy: bool | None = None
                                ) -> Report:
    """Remove kube-proxy's rules of every mode. ``own_legacy``: our proxy runs in iptables
    mode on that variant (False: nft, True: legacy), whose shared chains it keeps."""
    report = Report()
    jumps = own_iptables_jumps() if own_legacy is not None else frozenset()
    chains = own_iptables_chains() if own_legacy is not None else {}
    for v in VARIANTS:
        try:
            save = commands.run([v.save])
        except (OSError, CommandFailed):
            continue  # this variant is not installed: nothing of it to remove
        ours = v.legacy == own_legacy
        script, removed = iptables_script(save, jumps if ours else (), chains if ours else {},
                                          legacy=v.legacy)
        if not script:
            continue
        try:
            commands.run([v.restore, "-w", "5", "--noflush"], input=script)
        except (OSError, CommandFailed) as err:
            report.errors.append(f"{v.restore}: {err}")
            continue
        report.removed += [f"{v.save.removesuffix('-save')} {r}" for r in removed]
    _remove_nft_tables(commands, report)
    _remove_ipsets(commands, report)
    _remove_ipvs_link(commands, report)
    return report


def _remove_nft_tables(commands: Commands, report: Report) -> None:
    try:
        listing = commands.run(["nft", "list", "tables"])
    except (OSError, CommandFailed):
        return
    for line in listing.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "table" and words[2] == NFT_TABLE:
            try:
                commands.run(["nft", "delete", "table", words[1], NFT_TABLE])
                report.removed.append(f"nft table {words[1]} {NFT_TABLE}")
            except (OSError, CommandFailed) as err:
                report.errors.append(f"nft: {err}")


def _remove_ipsets(commands: Commands, report: Report) -> None:
    """After the iptables rules: a set an iptables rule still matches cannot be destroyed."""
    try:
        names = commands.run(["ipset", "list", "-n"]).split()
    except (OSError, CommandFailed):
        return
    for name in names:
        if not is_kube_proxy_ipset(name):
            continue
        try:
            commands.run(["ipset", "destroy", name])
            report.removed.append(f"ipset {name}")
        except (OSError, CommandFailed) as err:
            report.errors.append(f"ipset: {err}")


def _remove_ipvs_link(commands: Commands, report: Report) -> None:
    try:
        links = json.loads(commands.run(["ip", "-j", "link", "show", "dev", IPVS_LINK],
                                        check=False) or "[]")
    except (OSError, ValueError):
        return
    if not links:
        return
    try:
        commands.run(["ip", "link", "del", IPVS_LINK])
        report.removed.append(f"link {IPVS_LINK}")
    except (OSError, CommandFailed) as err:
        report.errors.append(f"{IPVS_LINK}: {err}")


async def after_first_sync(synced: asyncio.Event, commands: Commands,
                           own_legacy: bool | None) -> Report:
    """Wait for the proxier's first complete sync, then remove kube-proxy's leftovers."""
    await synced.wait()
    try:
        report = await asyncio.to_thread(remove_kube_proxy_leftovers, commands,
                                         own_legacy=own_legacy)
    except Exception as surprise:  # must not go unseen in a task nobody awaits
        log.exception("removing kube-proxy's leftovers failed")
        return Report(errors=[str(surprise)])
    if report.removed:
        log.info("removed kube-proxy's leftovers: %d rules, chains, sets and tables",
                 len(report.removed))
        for line in report.removed:
            log.debug("removed %s", line)
    for err in report.errors:
        log.warning("could not remove kube-proxy's leftovers: %s", err)
    return report
