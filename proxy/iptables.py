"""iptables backend: the desired state rendered in kube-proxy's chain layout.

One ``iptables-restore --noflush`` transaction per sync and family. The shape is
kube-proxy's, so existing runbooks apply:

- nat ``KUBE-SERVICES`` matches each frontend and jumps to ``KUBE-SVC-*`` (cluster
  endpoints), ``KUBE-SVL-*`` (node-local endpoints), ``KUBE-EXT-*`` (external traffic:
  masquerade or Local policy short circuit) or ``KUBE-FW-*`` (loadBalancerSourceRanges);
  ``KUBE-SEP-*`` per endpoint DNATs (and marks hairpin traffic for masquerade);
- balancing by ``-m statistic --mode random --probability 1/(n-i)``; ClientIP affinity
  by ``-m recent`` lists named after the endpoint chain;
- filter ``KUBE-SERVICES`` / ``KUBE-EXTERNAL-SERVICES`` REJECT frontends without endpoints
  (DROP when only node-local ones are missing); ``KUBE-PROXY-FIREWALL`` drops traffic to
  source-ranged load balancers that ``KUBE-FW-*`` did not let through;
- NodePorts only on the configured node addresses (``-d addr -j KUBE-NODEPORTS``), never
  via ``route_localnet``.

Partial syncs rewrite the top-level chains plus only the per-service chains of changed
service ports and delete the chains of removed ones; full syncs rewrite every chain.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from svcnet.proxy import metrics
from svcnet.proxy.commands import CommandFailed, Commands
from svcnet.proxy.config import BackendConfig, short_hash
from svcnet.proxy.objects import IptChain, IptRule, IptTable, Op, Transaction
from svcnet.proxy.rules import diff, diff_lines
from svcnet.proxy.serialize import LIST_TABLE, restore_lines
from svcnet.proxy.state import Backend, Changes, Family, ServicePortState

from svcnet.iptables_save import is_declaration, rule_target, save_lines, spec_of

log = logging.getLogger(__name__)

CANARY = "KUBE-PROXY-CANARY"
# Marks for masquerade unless the source is local, when that takes several matches
# (detect-local with more than one CIDR per family; see LocalDetector).
NOT_LOCAL = "KUBE-MASQ-NOT-LOCAL"
NAT_TOP = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ",
           "KUBE-MARK-DROP", NOT_LOCAL, CANARY)
FILTER_TOP = ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-FIREWALL", "KUBE-FORWARD",
              "KUBE-FIREWALL", CANARY)
# (table, builtin chain, rule spec) that hook our chains in; kube-proxy's set.
JUMPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("nat", "PREROUTING", ("-m", "comment", "--comment", "kubernetes service portals",
                           "-j", "KUBE-SERVICES")),
    ("nat", "OUTPUT", ("-m", "comment", "--comment", "kubernetes service portals",
                       "-j", "KUBE-SERVICES")),
    ("nat", "POSTROUTING", ("-m", "comment", "--comment", "kubernetes postrouting rules",
                            "-j", "KUBE-POSTROUTING")),
    ("filter", "INPUT", ("-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-PROXY-FIREWALL")),
    ("filter", "INPUT", ("-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-SERVICES")),
    ("filter", "INPUT", ("-m", "conntrack", "--ctstate", "NEW", "-j",
                         "KUBE-EXTERNAL-SERVICES")),
    ("filter", "INPUT", ("-j", "KUBE-FIREWALL")),
    ("filter", "FORWARD", ("-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-PROXY-FIREWALL")),
    ("filter", "FORWARD", ("-j", "KUBE-FORWARD")),
    ("filter", "FORWARD", ("-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-SERVICES")),
    ("filter", "FORWARD", ("-m", "conntrack", "--ctstate", "NEW", "-j",
                           "KUBE-EXTERNAL-SERVICES")),
    ("filter", "OUTPUT", ("-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-PROXY-FIREWALL")),
    ("filter", "OUTPUT", ("-m", "conntrack", "--ctstate", "NEW", "-j", "KUBE-SERVICES")),
    ("filter", "OUTPUT", ("-j", "KUBE-FIREWALL")),
)
DROP_MARK = 0x8000


@dataclass(frozen=True, slots=True)
class Variant:
    """Which iptables flavour to drive: the host's choice, nft or legacy."""

    save: str
    restore: str
    iptables: str


# iptables-nft (1.8.x) --noflush collects the name of every chain a command names into a
# sorted linked list (one strcmp scan per insert) before it fetches them from the kernel:
# quadratic in the chains of one transaction -- a 10k-service full sync (110k chains) did
# not finish in 25 minutes. A command naming no chain makes it fetch the whole table once
# instead; ``-S`` is the only such command that changes nothing (it lists the table, which
# the sync discards). It must follow any rule added to a built-in chain: in a table that
# does not exist yet, the listing puts placeholder built-in chains in the tool's cache, and
# a later append to one fails with ENOENT because nothing created it. Measured at 10k
# services x 10 endpoints, bare tool: 16.7 s cold, 18.6 s with the table present. A small
# partial sync names a few chains and does without it.
WHOLE_TABLE_CACHE = LIST_TABLE + "\n"  # written by ``flush`` of an ``IptTable``
# A partial sync lists too once it writes more rules plus deletes more chains than this (a
# burst: hundreds of services changed within one minSyncPeriod): the sorted list of the
# chains they name then costs more than reading the table, ~0.5 s at 10k names and growing
# with their square.
PARTIAL_LISTING_ABOVE = 10_000


def variant(family: Family, legacy: bool) -> Variant:
    base = "iptables" if family == 4 else "ip6tables"
    suffix = "-legacy" if legacy else "-nft"
    return Variant(f"{base}{suffix}-save", f"{base}{suffix}-restore", f"{base}{suffix}")


def detect_legacy(run: Commands) -> bool:
    """kube-proxy's rule: use legacy iptables only if it holds more rules than nft does."""

    def count(cmd: str) -> int:
        try:
            out = run.run([cmd], check=False)
        except (OSError, CommandFailed):
            return -1
        return sum(1 for _, _, line in save_lines(out) if not is_declaration(line))

    return count("iptables-legacy-save") > max(count("iptables-nft-save"), 0)


@dataclass(slots=True)
class Rendered:
    """One service port's share of the rules, typed: its own nat chains with their rules,
    and its rules in the shared top-level chains."""

    nat_chains: dict[IptChain, list[IptRule]] = field(default_factory=dict)
    nat_services: list[IptRule] = field(default_factory=list)
    nat_nodeports: list[IptRule] = field(default_factory=list)
    filter_services: list[IptRule] = field(default_factory=list)
    filter_external: list[IptRule] = field(default_factory=list)
    filter_firewall: list[IptRule] = field(default_factory=list)

    @property
    def filter_lines(self) -> list[IptRule]:
        return self.filter_services + self.filter_external + self.filter_firewall

    @property
    def rule_count(self) -> tuple[int, int]:
        nat = sum(len(r) for r in self.nat_chains.values()) + len(self.nat_services) + len(
            self.nat_nodeports)
        return nat, len(self.filter_services) + len(self.filter_external) + len(
            self.filter_firewall)


class IptablesBackend:
    name = "iptables"

    def __init__(self, run: Commands, config: BackendConfig, *, legacy: bool | None = None,
                 node_addresses: Mapping[Family, tuple[str, ...]] | None = None) -> None:
        self.run = run
        self.config = config
        self.legacy = detect_legacy(run) if legacy is None else legacy
        self._synced_once = False
        self._node_addresses = dict(node_addresses or {})
        self._totals: dict[str, int] = {"nat": 0, "filter": 0}

    # --- public ---------------------------------------------------------------------------

    def set_node_addresses(self, addresses: Mapping[Family, tuple[str, ...]]) -> None:
        if dict(addresses) != self._node_addresses:
            self._node_addresses = dict(addresses)
            self._synced_once = False  # the KUBE-NODEPORTS jumps change: next sync is full

    def sync(self, changes: Changes, *, full: bool) -> None:
        if full or not self._synced_once:
            self.sync_full(changes.state.values())
            return
        totals = dict(self._totals)
        for family in self.config.families:
            self._restore(variant(family, self.legacy),
                          [self.partial_input(changes, family, totals)])
        self._totals = totals

    def sync_full(self, ports: Iterable[ServicePortState]) -> None:
        """Rewrite every chain we own: one ``iptables-restore --noflush`` per family, fed
        while ``ports`` are still being computed and rendered (the tool parses its input
        line by line as it arrives, so our work overlaps its own)."""
        totals = {"nat": 0, "filter": 0}
        rest: list[ServicePortState] = []  # other families' ports, for their turn

        def of(family: Family, source: Iterable[ServicePortState], keep: bool
               ) -> Iterator[ServicePortState]:
            for sp in source:
                if sp.family == family:
                    yield sp
                elif keep:
                    rest.append(sp)

        for i, family in enumerate(self.config.families):
            v = variant(family, self.legacy)
            current = _Current.parse(self.run.run([v.save]))
            source = ports if i == 0 else list(rest)
            ops = self._full_ops(family, of(family, source, i == 0), current, totals)
            self._restore(v, _chunked(restore_lines(ops)))
        self._totals = totals
        self._synced_once = True

    def healthy(self) -> bool:
        """The canary chain still exists (a flush of the host's tables removes it)."""
        v = variant(self.config.families[0], self.legacy)
        out = self.run.run([v.iptables, "-w", "5", "-t", "nat", "-S", CANARY], check=False)
        return f"-N {CANARY}" in out

    def cleanup(self) -> None:
        for family in (4, 6):
            v = variant(family, self.legacy)  # type: ignore[arg-type]
            for table, chain, spec in JUMPS:
                while True:
                    try:
                        self.run.run([v.iptables, "-w", "5", "-t", table, "-D", chain, *spec])
                    except (CommandFailed, OSError):
                        break
            try:
                dump = self.run.run([v.save])
            except (CommandFailed, OSError):
                continue
            self._restore(v, ["".join(restore_lines(
                _flush_ours(dump, whole_table=not self.legacy)))])
        self._synced_once = False

    def _restore(self, v: Variant, chunks: Iterable[str]) -> None:
        """One ``iptables-restore --noflush`` transaction, fed as ``chunks`` are produced;
        its output (the nft variant's listing, ``WHOLE_TABLE_CACHE``) is discarded."""
        argv = [v.restore, "-w", "5", "--noflush"]
        self.run.stream(argv, chunks, quiet=True)

    def rules_total(self) -> Mapping[str, int]:
        return self._totals

    def kernel_items(self) -> frozenset[str]:
        return frozenset(i for f in self.config.families
                         for i in iptables_items(self.dump(f), f))

    def record_failure(self, *, full: bool) -> None:
        metrics.IPTABLES_RESTORE_FAILURES.inc()
        if not full:
            metrics.IPTABLES_PARTIAL_RESTORE_FAILURES.inc()

    def dump(self, family: Family = 4) -> str:
        return self.run.run([variant(family, self.legacy).save])

    # --- restore input ---------------------------------------------------------------------

    def restore_input(self, changes: Changes, family: Family, *, full: bool,
                      current: _Current | None = None) -> str:
        """The whole iptables-restore text of one family's sync (tests and tools)."""
        totals = {"nat": 0, "filter": 0}
        if not full:
            return self.partial_input(changes, family, totals)
        ports = (sp for sp in changes.state.values() if sp.family == family)
        return "".join(self._full_lines(family, ports, current or _Current(), totals))

    def _full_lines(self, family: Family, ports: Iterable[ServicePortState], current: _Current,
                    totals: dict[str, int]) -> Iterator[str]:
        return restore_lines(self._full_ops(family, ports, current, totals))

    def _full_ops(self, family: Family, ports: Iterable[ServicePortState], current: _Current,
                  totals: dict[str, int]) -> Iterator[Op]:
        """The full sync's transaction, operation by operation as each port is rendered.

        ``current`` is what the kernel holds now: chains that do not exist yet are created
        (``add``) rather than declared (``flush``: iptables-nft's ``--noflush`` declares
        are slow), each port's chains are declared right before its rules, stale service
        chains are deleted and missing jumps from the built-in chains added, all in the
        same transaction. The nat table goes first; the filter rules (few: frontends
        without endpoints, firewalls) are kept for the second table.
        """
        mark = f"{self.config.masq_mark:#x}"

        def declare(chain: IptChain) -> Op:
            return Op("flush" if chain.name in current.chains.get(chain.table, ()) else "add",
                      (chain,))

        def jumps(table: str) -> Op:
            return Op("add", tuple(
                rule for rule in (IptRule(t, chain, _quoted(spec)) for t, chain, spec in JUMPS
                                  if t == table)
                if rule not in current.rules))

        yield from (declare(IptChain("nat", c)) for c in NAT_TOP)
        yield jumps("nat")
        if not self.legacy:  # after the jumps: a listing first would fake missing built-ins
            yield Op("flush", (IptTable("nat"),))
        yield Op("add", (
            IptRule("nat", "KUBE-POSTROUTING", f"-m mark ! --mark {mark}/{mark} -j RETURN"),
            IptRule("nat", "KUBE-POSTROUTING", f"-j MARK --xor-mark {mark}"),
            IptRule("nat", "KUBE-POSTROUTING", "-m comment --comment \"kubernetes service "
                    "traffic requiring SNAT\" -j MASQUERADE --random-fully"),
            IptRule("nat", "KUBE-MARK-MASQ", f"-j MARK --or-mark {mark}"),
            IptRule("nat", "KUBE-MARK-DROP", f"-j MARK --or-mark {DROP_MARK:#x}"),
            *(IptRule("nat", NOT_LOCAL, spec) for spec in
              self.config.detect_local.iptables_not_local_specs(family, "KUBE-MARK-MASQ")),
        ))
        ours: set[str] = set()
        filter_rules: list[IptRule] = []
        render = self.render
        for sp in ports:
            r = render(sp)
            # every chain of the port first: its rules jump between them
            yield from map(declare, r.nat_chains)
            ours.update(chain.name for chain in r.nat_chains)
            yield Op("add", (*(rule for rules in r.nat_chains.values() for rule in rules),
                             *r.nat_services, *r.nat_nodeports))
            filter_rules += r.filter_lines
            nat, filt = r.rule_count
            totals["nat"] += nat
            totals["filter"] += filt
        yield Op("add", tuple(IptRule("nat", "KUBE-SERVICES", f"-d {_host(addr)} -j KUBE-NODEPORTS")
                              for addr in self._node_addresses.get(family, ())))
        stale = tuple(IptChain("nat", c) for c in sorted(current.chains.get("nat", ()))
                      if c.startswith(SERVICE_CHAIN_PREFIXES) and c not in ours)
        del ours
        yield Op("flush", stale)
        yield Op("delete", stale)
        yield from (declare(IptChain("filter", c)) for c in FILTER_TOP)
        yield jumps("filter")
        yield Op("add", (
            IptRule("filter", "KUBE-FIREWALL",
                    f"-m mark --mark {DROP_MARK:#x}/{DROP_MARK:#x} -j DROP"),
            IptRule("filter", "KUBE-FORWARD", "-m conntrack --ctstate INVALID -j DROP"),
            IptRule("filter", "KUBE-FORWARD", f"-m mark --mark {mark}/{mark} -j ACCEPT"),
            IptRule("filter", "KUBE-FORWARD",
                    "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
            *filter_rules,
        ))

    def partial_input(self, changes: Changes, family: Family, totals: dict[str, int]) -> str:
        return "".join(restore_lines(self.partial_transaction(changes, family, totals).ops))

    def partial_transaction(self, changes: Changes, family: Family, totals: dict[str, int]
                            ) -> Transaction:
        """Touches only what changed: the chains of changed service ports are rewritten
        (the previous rendering comes from ``change.previous``; any failed sync makes the
        next one full), and top-level chains are edited rule by rule (delete the old rule,
        add the new one; their rules match disjoint frontends, so order does not matter)
        instead of being flushed and rewritten -- kube-proxy rewrites them, which at 10k
        services costs more than everything else in a small change."""
        changed: dict[IptChain, list[IptRule]] = {}
        deleted: set[IptChain] = set()
        top: dict[str, tuple[list[IptRule], list[IptRule]]] = {"filter": ([], []),
                                                                "nat": ([], [])}
        for key, change in changes.changed.items():
            if key.family != family:
                continue
            old = self.render(change.previous) if change.previous else Rendered()
            new = self.render(change.current) if change.current else Rendered()
            chains = diff(old.nat_chains, new.nat_chains)
            changed.update(chains.added)
            deleted |= chains.removed.keys() - new.nat_chains.keys()
            for table, before, after in (
                ("filter", old.filter_lines, new.filter_lines),
                ("nat", old.nat_services + old.nat_nodeports,
                 new.nat_services + new.nat_nodeports),
            ):
                gone, added = top[table]
                lost, got = diff_lines(before, after)
                gone += lost
                added += got
            (old_nat, old_filter), (new_nat, new_filter) = old.rule_count, new.rule_count
            totals["nat"] += new_nat - old_nat
            totals["filter"] += new_filter - old_filter
        tx = Transaction()
        gone, added = top["filter"]
        tx.delete_all(gone)
        tx.add_all(added)
        named = len(deleted) + sum(len(rules) for rules in changed.values())
        if not self.legacy and named > PARTIAL_LISTING_ABOVE:
            tx.flush(IptTable("nat"))  # a burst of changes: see WHOLE_TABLE_CACHE
        tx.ops.append(Op("flush", tuple(sorted(changed.keys() | deleted))))
        gone, added = top["nat"]
        tx.delete_all(gone)
        tx.add_all(added)
        for chain in sorted(changed):
            tx.add_all(changed[chain])
        tx.delete_all(sorted(deleted))
        return tx

    # --- one service port -------------------------------------------------------------------

    def render(self, sp: ServicePortState) -> Rendered:
        r = Rendered()
        name = str(sp.key)
        proto = sp.protocol.lower()
        m = f"-m {proto} -p {proto}"
        svc_chain = _chain("KUBE-SVC", name)
        svl_chain = _chain("KUBE-SVL", name)
        ext_chain = _chain("KUBE-EXT", name)
        fw_chain = _chain("KUBE-FW", name)
        comment = f'-m comment --comment "{name}'
        detect = self.config.detect_local
        family = sp.family

        def balance(chain: str, endpoints: tuple[Backend, ...], masq_cluster_ips: bool) -> None:
            specs: list[str] = []
            if masq_cluster_ips:
                for fe in sp.frontends:
                    if fe.kind.external:
                        continue
                    d = f"-d {_host(fe.ip)} {m} --dport {fe.port}"
                    if self.config.masquerade_all:
                        specs.append(f"{comment} cluster IP\" {d} -j KUBE-MARK-MASQ")
                    elif detect.active(family):
                        specs.append(detect.iptables_masquerade(
                            f"{comment} cluster IP\" {d}", family, "KUBE-MARK-MASQ", NOT_LOCAL))
            seps = [self._endpoint_chain(r, sp, b, m) for b in endpoints]
            if sp.affinity_timeout:
                for sep in seps:
                    specs.append(f"{comment} -> {sep}\" -m recent --name {sep} "
                                 f"--rcheck --seconds {sp.affinity_timeout} --reap -j {sep}")
            n = len(seps)
            for i, sep in enumerate(seps):
                if i < n - 1:
                    specs.append(f"{comment}\" -m statistic --mode random "
                                 f"--probability {1.0 / (n - i):.10f} -j {sep}")
                else:
                    specs.append(f"{comment}\" -j {sep}")
            r.nat_chains[IptChain("nat", chain)] = [IptRule("nat", chain, x) for x in specs]

        internal_chain = svl_chain if sp.internal_local else svc_chain
        if sp.cluster_endpoints:
            balance(svc_chain, sp.cluster_endpoints, not sp.internal_local)
        if sp.local_endpoints:
            balance(svl_chain, sp.local_endpoints, sp.internal_local)
        external = sp.external_endpoints
        if external and any(fe.kind.external for fe in sp.frontends):
            ext: list[str] = []
            if not sp.external_local:
                ext.append(f"{comment} external\" -j KUBE-MARK-MASQ")
                ext.append(f"-j {svc_chain}")
            else:
                if sp.cluster_endpoints:
                    if detect.active(family):
                        ext += [f"{comment} pod traffic\" {match} -j {svc_chain}"
                                for match in detect.iptables_local(family)]
                    ext.append("-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ")
                    ext.append(f"-m addrtype --src-type LOCAL -j {svc_chain}")
                ext.append(f"-j {svl_chain}")
            r.nat_chains[IptChain("nat", ext_chain)] = [IptRule("nat", ext_chain, x)
                                                        for x in ext]
        for fe in sp.frontends:
            d = f"-d {_host(fe.ip)} {m} --dport {fe.port}"
            endpoints = sp.endpoints_for(fe)
            if not endpoints:
                target = "DROP" if sp.has_endpoints else "REJECT"
                spec = f"{comment} has no endpoints\" {d} -j {target}"
                if fe.kind.external:
                    r.filter_external.append(IptRule("filter", "KUBE-EXTERNAL-SERVICES", spec))
                else:
                    r.filter_services.append(IptRule("filter", "KUBE-SERVICES", spec))
                continue
            if not fe.kind.external:
                r.nat_services.append(IptRule(
                    "nat", "KUBE-SERVICES", f"{comment} cluster IP\" {d} -j {internal_chain}"))
                continue
            if fe.kind.value == "NodePort":
                r.nat_nodeports.append(IptRule("nat", "KUBE-NODEPORTS",
                                               f"{comment}\" {d} -j {ext_chain}"))
            elif fe.kind.value == "LoadBalancer" and sp.source_ranges:
                r.nat_services.append(IptRule(
                    "nat", "KUBE-SERVICES", f"{comment} loadbalancer IP\" {d} -j {fw_chain}"))
                r.nat_chains[IptChain("nat", fw_chain)] = [
                    IptRule("nat", fw_chain, f"{comment} source range\" -s {cidr} -j {ext_chain}")
                    for cidr in sp.source_ranges
                ]
                r.filter_firewall.append(IptRule(
                    "filter", "KUBE-PROXY-FIREWALL",
                    f"{comment} not allowed by {fw_chain}\" {d} -j DROP"))
            else:
                r.nat_services.append(IptRule(
                    "nat", "KUBE-SERVICES", f"{comment} {fe.kind.value}\" {d} -j {ext_chain}"))
        return r

    def _endpoint_chain(self, r: Rendered, sp: ServicePortState, b: Backend, m: str) -> str:
        sep = _chain("KUBE-SEP", str(sp.key), str(b))
        chain = IptChain("nat", sep)
        if chain not in r.nat_chains:
            dest = f"[{b.ip}]:{b.port}" if sp.family == 6 else f"{b.ip}:{b.port}"
            affinity = f" -m recent --name {sep} --set" if sp.affinity_timeout else ""
            r.nat_chains[chain] = [
                IptRule("nat", sep, f"-s {_host(b.ip)} -j KUBE-MARK-MASQ"),
                IptRule("nat", sep, f"{m}{affinity} -j DNAT --to-destination {dest}"),
            ]
        return sep


def _chain(prefix: str, *parts: str) -> str:
    return f"{prefix}-{short_hash(*parts)}"


def _host(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")


@dataclass(slots=True)
class _Current:
    """Chains and rules per table, from one ``iptables-save``."""

    chains: dict[str, set[str]] = field(default_factory=dict)
    rules: set[IptRule] = field(default_factory=set)  # in built-in chains only

    @classmethod
    def parse(cls, save: str) -> _Current:
        cur = cls()
        for table, chain, line in save_lines(save):
            if line[0] == ":":
                cur.chains.setdefault(table, set()).add(chain)
            elif not chain.startswith("KUBE-"):
                cur.rules.add(IptRule(table, chain, spec_of(chain, line)))
        return cur


def _chunked(lines: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Lines joined into chunks of about ``size`` characters, for streaming."""
    buf: list[str] = []
    n = 0
    for line in lines:
        buf.append(line)
        n += len(line)
        if n >= size:
            yield "".join(buf)
            buf, n = [], 0
    if buf:
        yield "".join(buf)


def _quoted(spec: tuple[str, ...]) -> str:
    return " ".join(f'"{a}"' if " " in a else a for a in spec)


def _flush_ours(save: str, *, whole_table: bool) -> list[Op]:
    """A transaction flushing and deleting every KUBE-* chain found in a save dump
    (``whole_table``: with the listing iptables-nft needs to name 110k chains at once)."""
    chains: dict[str, list[IptChain]] = {}
    for table, chain, line in save_lines(save):
        if line[0] == ":" and chain.startswith("KUBE-"):
            chains.setdefault(table, []).append(IptChain(table, chain))
    tx = Transaction()
    for table, names in chains.items():
        if whole_table:
            tx.flush(IptTable(table))
        tx.ops.append(Op("flush", tuple(names)))
        tx.delete_all(names)
    return tx.ops


# --- the dump, normalised (drift check, ``proxy check``) ----------------------------------

def _ours(chain: str) -> bool:
    return (chain == CANARY or chain in NAT_TOP or chain in FILTER_TOP
            or chain.startswith(SERVICE_CHAIN_PREFIXES))


def iptables_items(save: str, family: int) -> set[str]:
    """Our chains and rules (and jumps into them) from ``iptables-save`` output."""
    items: set[str] = set()
    for table, chain, line in save_lines(save):
        if is_declaration(line):
            if _ours(chain):
                items.add(f"ip{family} {table} chain {chain}")
        elif _ours(chain) or _ours(rule_target(spec_of(chain, line))):
            items.add(f"ip{family} {table} {line}")
    return items
