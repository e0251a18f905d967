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
from svcnet.proxy.rules import diff, diff_lines
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
WHOLE_TABLE_CACHE = "-S\n"
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
    """One service port's share of the rules."""

    nat_chains: dict[str, list[str]] = field(default_factory=dict)
    nat_services: list[str] = field(default_factory=list)
    nat_nodeports: list[str] = field(default_factory=list)
    filter_services: list[str] = field(default_factory=list)
    filter_external: list[str] = field(default_factory=list)
    filter_firewall: list[str] = field(default_factory=list)

    @property
    def filter_lines(self) -> list[str]:
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
            lines = self._full_lines(family, of(family, source, i == 0), current, totals)
            self._restore(v, _chunked(lines))
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
            self._restore(v, [_flush_ours(dump, whole_table=not self.legacy)])
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
        """Full-sync restore input, line by line as each port is rendered.

        ``current`` is what the kernel holds now: chains that do not exist yet are created
        with ``-N`` rather than declared (iptables-nft's ``--noflush`` declares are slow),
        each port's chains are declared right before its rules, stale service chains are
        deleted and missing jumps from the built-in chains added, all in the same
        transaction. The nat table goes first; the filter lines (few: frontends without
        endpoints, firewalls) are kept for the second table.
        """
        mark = f"{self.config.masq_mark:#x}"

        def declare(table: str, chain: str) -> str:
            return (f":{chain} - [0:0]" if chain in current.chains.get(table, ())
                    else f"-N {chain}")

        def jumps(table: str) -> list[str]:
            lines = [f"-A {chain} {_quoted(spec)}" for t, chain, spec in JUMPS if t == table]
            return [ln + "\n" for ln in lines if ln not in current.rules.get(table, set())]

        yield "*nat\n"
        yield "".join(declare("nat", c) + "\n" for c in NAT_TOP)
        yield "".join(jumps("nat"))
        if not self.legacy:  # after the jumps: a listing first would fake missing built-ins
            yield WHOLE_TABLE_CACHE
        yield (f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN\n"
               f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}\n"
               "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic "
               "requiring SNAT\" -j MASQUERADE --random-fully\n"
               f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}\n"
               f"-A KUBE-MARK-DROP -j MARK --or-mark {DROP_MARK:#x}\n")
        yield "".join(ln + "\n" for ln in self.config.detect_local.iptables_not_local_chain(
            family, "KUBE-MARK-MASQ", NOT_LOCAL))
        ours: set[str] = set()
        filter_lines: list[str] = []
        render = self.render
        for sp in ports:
            r = render(sp)
            out = [declare("nat", c) for c in r.nat_chains]
            ours.update(r.nat_chains)
            for rules in r.nat_chains.values():
                out += rules
            out += r.nat_services
            out += r.nat_nodeports
            yield "\n".join(out) + "\n"
            filter_lines += r.filter_lines
            nat, filt = r.rule_count
            totals["nat"] += nat
            totals["filter"] += filt
        yield "".join(f"-A KUBE-SERVICES -d {_host(addr)} -j KUBE-NODEPORTS\n"
                      for addr in self._node_addresses.get(family, ()))
        stale = sorted(c for c in current.chains.get("nat", ())
                       if c.startswith(SERVICE_CHAIN_PREFIXES) and c not in ours)
        del ours
        yield "".join([f":{c} - [0:0]\n" for c in stale] + [f"-X {c}\n" for c in stale])
        yield "COMMIT\n*filter\n"
        yield "".join(declare("filter", c) + "\n" for c in FILTER_TOP)
        yield "".join(jumps("filter"))
        yield (f"-A KUBE-FIREWALL -m mark --mark {DROP_MARK:#x}/{DROP_MARK:#x} -j DROP\n"
               "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"
               f"-A KUBE-FORWARD -m mark --mark {mark}/{mark} -j ACCEPT\n"
               "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n")
        yield "".join(ln + "\n" for ln in filter_lines)
        yield "COMMIT\n"

    def partial_input(self, changes: Changes, family: Family, totals: dict[str, int]) -> str:
        """Touches only what changed: the chains of changed service ports are rewritten
        (the previous rendering comes from ``change.previous``; any failed sync makes the
        next one full), and top-level chains are edited rule by rule (``-D`` the old line,
        ``-A`` the new one; their rules match disjoint frontends, so order does not matter)
        instead of being flushed and rewritten -- kube-proxy rewrites them, which at 10k
        services costs more than everything else in a small change."""
        changed: dict[str, list[str]] = {}
        deleted: set[str] = set()
        top: dict[str, tuple[list[str], list[str]]] = {"filter": ([], []), "nat": ([], [])}
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
                gone += ["-D" + ln[2:] for ln in lost]
                added += got
            (old_nat, old_filter), (new_nat, new_filter) = old.rule_count, new.rule_count
            totals["nat"] += new_nat - old_nat
            totals["filter"] += new_filter - old_filter
        gone, added = top["filter"]
        out = ["*filter", *gone, *added, "COMMIT", "*nat"]
        named = len(deleted) + sum(len(rules) for rules in changed.values())
        if not self.legacy and named > PARTIAL_LISTING_ABOVE:
            out.append(WHOLE_TABLE_CACHE.strip())  # a burst of changes: see WHOLE_TABLE_CACHE
        out += [f":{c} - [0:0]" for c in sorted(changed.keys() | deleted)]
        gone, added = top["nat"]
        out += gone + added
        for c in sorted(changed):
            out += changed[c]
        out += [f"-X {c}" for c in sorted(deleted)]
        out.append("COMMIT")
        return "\n".join(out) + "\n"

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
            rules: list[str] = []
            if masq_cluster_ips:
                for fe in sp.frontends:
                    if fe.kind.external:
                        continue
                    d = f"-d {_host(fe.ip)} {m} --dport {fe.port}"
                    if self.config.masquerade_all:
                        rules.append(f"-A {chain} {comment} cluster IP\" {d} -j KUBE-MARK-MASQ")
                    elif detect.active(family):
                        rules.append(detect.iptables_masquerade(
                            f"-A {chain} {comment} cluster IP\" {d}", family,
                            "KUBE-MARK-MASQ", NOT_LOCAL))
            seps = [self._endpoint_chain(r, sp, b, m) for b in endpoints]
            if sp.affinity_timeout:
                for sep in seps:
                    rules.append(f"-A {chain} {comment} -> {sep}\" -m recent --name {sep} "
                                 f"--rcheck --seconds {sp.affinity_timeout} --reap -j {sep}")
            n = len(seps)
            for i, sep in enumerate(seps):
                if i < n - 1:
                    rules.append(f"-A {chain} {comment}\" -m statistic --mode random "
                                 f"--probability {1.0 / (n - i):.10f} -j {sep}")
                else:
                    rules.append(f"-A {chain} {comment}\" -j {sep}")
            r.nat_chains[chain] = rules

        internal_chain = svl_chain if sp.internal_local else svc_chain
        if sp.cluster_endpoints:
            balance(svc_chain, sp.cluster_endpoints, not sp.internal_local)
        if sp.local_endpoints:
            balance(svl_chain, sp.local_endpoints, sp.internal_local)
        external = sp.external_endpoints
        if external and any(fe.kind.external for fe in sp.frontends):
            ext: list[str] = []
            if not sp.external_local:
                ext.append(f"-A {ext_chain} {comment} external\" -j KUBE-MARK-MASQ")
                ext.append(f"-A {ext_chain} -j {svc_chain}")
            else:
                if sp.cluster_endpoints:
                    if detect.active(family):
                        ext += [f"-A {ext_chain} {comment} pod traffic\" {match} -j {svc_chain}"
                                for match in detect.iptables_local(family)]
                    ext.append(f"-A {ext_chain} -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ")
                    ext.append(f"-A {ext_chain} -m addrtype --src-type LOCAL -j {svc_chain}")
                ext.append(f"-A {ext_chain} -j {svl_chain}")
            r.nat_chains[ext_chain] = ext
        for fe in sp.frontends:
            d = f"-d {_host(fe.ip)} {m} --dport {fe.port}"
            endpoints = sp.endpoints_for(fe)
            if not endpoints:
                target = "DROP" if sp.has_endpoints else "REJECT"
                line = f"{comment} has no endpoints\" {d} -j {target}"
                if fe.kind.external:
                    r.filter_external.append(f"-A KUBE-EXTERNAL-SERVICES {line}")
                else:
                    r.filter_services.append(f"-A KUBE-SERVICES {line}")
                continue
            if not fe.kind.external:
                r.nat_services.append(f"-A KUBE-SERVICES {comment} cluster IP\" {d} "
                                      f"-j {internal_chain}")
                continue
            if fe.kind.value == "NodePort":
                r.nat_nodeports.append(f"-A KUBE-NODEPORTS {comment}\" {d} -j {ext_chain}")
            elif fe.kind.value == "LoadBalancer" and sp.source_ranges:
                r.nat_services.append(f"-A KUBE-SERVICES {comment} loadbalancer IP\" {d} "
                                      f"-j {fw_chain}")
                r.nat_chains[fw_chain] = [
                    f"-A {fw_chain} {comment} source range\" -s {cidr} -j {ext_chain}"
                    for cidr in sp.source_ranges
                ]
                r.filter_firewall.append(
                    f"-A KUBE-PROXY-FIREWALL {comment} not allowed by {fw_chain}\" {d} -j DROP")
            else:
                r.nat_services.append(f"-A KUBE-SERVICES {comment} {fe.kind.value}\" {d} "
                                      f"-j {ext_chain}")
        return r

    def _endpoint_chain(self, r: Rendered, sp: ServicePortState, b: Backend, m: str) -> str:
        sep = _chain("KUBE-SEP", str(sp.key), str(b))
        if sep not in r.nat_chains:
            dest = f"[{b.ip}]:{b.port}" if sp.family == 6 else f"{b.ip}:{b.port}"
            rules = [f"-A {sep} -s {_host(b.ip)} -j KUBE-MARK-MASQ"]
            affinity = f" -m recent --name {sep} --set" if sp.affinity_timeout else ""
            rules.append(f"-A {sep} {m}{affinity} -j DNAT --to-destination {dest}")
            r.nat_chains[sep] = rules
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
    rules: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, save: str) -> _Current:
        cur = cls()
        for table, chain, line in save_lines(save):
            if line[0] == ":":
                cur.chains.setdefault(table, set()).add(chain)
            elif not chain.startswith("KUBE-"):
                cur.rules.setdefault(table, set()).add(line)
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


def _flush_ours(save: str, *, whole_table: bool) -> str:
    """Restore input that flushes and deletes every KUBE-* chain found in a save dump
    (``whole_table``: with the listing iptables-nft needs to name 110k chains at once)."""
    chains: dict[str, list[str]] = {}
    for table, chain, line in save_lines(save):
        if line[0] == ":" and chain.startswith("KUBE-"):
            chains.setdefault(table, []).append(chain)
    out: list[str] = []
    for table, names in chains.items():
        out.append(f"*{table}")
        if whole_table:
            out.append(WHOLE_TABLE_CACHE.strip())
        out += [f":{c} - [0:0]" for c in names]
        out += [f"-X {c}" for c in names]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


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
