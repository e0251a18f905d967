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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from svcnet.proxy.commands import CommandFailed, Commands
from svcnet.proxy.config import BackendConfig, short_hash
from svcnet.proxy.state import Backend, Changes, Family, PortKey, ServicePortState

log = logging.getLogger(__name__)

CANARY = "KUBE-PROXY-CANARY"
NAT_TOP = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ",
           "KUBE-MARK-DROP", CANARY)
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
        return sum(1 for line in out.splitlines() if line.startswith("-A "))

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
        self._rendered: dict[PortKey, Rendered] = {}
        self._synced_once = False
        self._node_addresses = dict(node_addresses or {})
        self._pending: dict[PortKey, Rendered] = {}
        self.rules_total: dict[str, int] = {"nat": 0, "filter": 0}

    # --- public ---------------------------------------------------------------------------

    def set_node_addresses(self, addresses: Mapping[Family, tuple[str, ...]]) -> None:
        if dict(addresses) != self._node_addresses:
            self._node_addresses = dict(addresses)
            self._synced_once = False  # the KUBE-NODEPORTS jumps change: next sync is full

    def sync(self, changes: Changes, *, full: bool) -> None:
        full = full or not self._synced_once
        for family in self.config.families:
            v = variant(family, self.legacy)
            current = _Current.parse(self.run.run([v.save])) if full else None
            text = self.restore_input(changes, family, full=full, current=current)
            self.run.run([v.restore, "-w", "5", "--noflush"], input=text)
            self._commit()
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
            self.run.run([v.restore, "-w", "5", "--noflush"], input=_flush_ours(dump))
        self._rendered.clear()
        self._synced_once = False

    def dump(self, family: Family = 4) -> str:
        return self.run.run([variant(family, self.legacy).save])

    # --- restore input ---------------------------------------------------------------------

    def restore_input(self, changes: Changes, family: Family, *, full: bool,
                      current: _Current | None = None) -> str:
        """The iptables-restore text for one family.

        ``current`` (full syncs) is what the kernel holds now: chains that do not exist yet
        are created with ``-N`` rather than declared (iptables-nft's ``--noflush`` declares
        are slow), stale service chains are deleted, and missing jumps from the built-in
        chains are added in the same transaction.
        """
        current = current or _Current()
        rendered = dict(self._rendered)
        changed_chains: set[str] = set()
        deleted_chains: set[str] = set()
        if full:
            rendered = {k: self.render(sp) for k, sp in changes.state.items()}
            stale = {c for k, r in self._rendered.items() if k.family == family
                     for c in r.nat_chains} | {
                         c for c in current.chains.get("nat", set())
                         if c.startswith(SERVICE_CHAIN_PREFIXES)}
            changed_chains = {c for k, r in rendered.items() if k.family == family
                              for c in r.nat_chains}
            deleted_chains = stale - changed_chains
        else:
            top_edits: dict[str, tuple[list[str], list[str]]] = {"filter": ([], []),
                                                                  "nat": ([], [])}
            for key, change in changes.changed.items():
                if key.family != family:
                    continue
                old = rendered.pop(key, None) or Rendered()
                new = self.render(change.current) if change.current else Rendered()
                if change.current is not None:
                    rendered[key] = new
                changed_chains |= {c for c, rules in new.nat_chains.items()
                                   if old.nat_chains.get(c) != rules}
                deleted_chains |= old.nat_chains.keys() - new.nat_chains.keys()
                for table, before, after in (
                    ("filter", old.filter_lines, new.filter_lines),
                    ("nat", old.nat_services + old.nat_nodeports,
                     new.nat_services + new.nat_nodeports),
                ):
                    gone, added = top_edits[table]
                    gone += ["-D" + ln[2:] for ln in before if ln not in after]
                    added += [ln for ln in after if ln not in before]
            self._pending = rendered
            return self._partial_input(rendered, changed_chains, deleted_chains, top_edits)
        self._pending = rendered
        ours = [r for k, r in sorted(rendered.items()) if k.family == family]
        mark = f"{self.config.masq_mark:#x}"
        def declare(table: str, chains: Iterable[str]) -> list[str]:
            if not full:
                return [f":{c} - [0:0]" for c in chains]
            have = current.chains.get(table, set())
            return [f":{c} - [0:0]" if c in have else f"-N {c}" for c in chains]

        def jumps(table: str) -> list[str]:
            if not full:
                return []
            lines = [f"-A {chain} {_quoted(spec)}" for t, chain, spec in JUMPS if t == table]
            return [ln for ln in lines if ln not in current.rules.get(table, set())]

        out = ["*filter"]
        out += declare("filter", FILTER_TOP)
        out += jumps("filter")
        out += [f"-A KUBE-FIREWALL -m mark --mark {DROP_MARK:#x}/{DROP_MARK:#x} -j DROP"]
        out += ["-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
                f"-A KUBE-FORWARD -m mark --mark {mark}/{mark} -j ACCEPT",
                "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
        for r in ours:
            out += r.filter_services + r.filter_external + r.filter_firewall
        out.append("COMMIT")
        out.append("*nat")
        out += declare("nat", NAT_TOP)
        chains_by_name = {c: rules for r in ours for c, rules in r.nat_chains.items()}
        out += declare("nat", sorted(changed_chains | deleted_chains))
        out += jumps("nat")
        out += [
            f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring "
            "SNAT\" -j MASQUERADE --random-fully",
            f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}",
            f"-A KUBE-MARK-DROP -j MARK --or-mark {DROP_MARK:#x}",
        ]
        for r in ours:
            out += r.nat_services
        for addr in self._node_addresses.get(family, ()):
            out.append(f"-A KUBE-SERVICES -d {_host(addr)} -j KUBE-NODEPORTS")
        for r in ours:
            out += r.nat_nodeports
        for c in sorted(changed_chains):
            out += chains_by_name.get(c, [])
        out += [f"-X {c}" for c in sorted(deleted_chains)]
        out.append("COMMIT")
        return "\n".join(out) + "\n"

    def _partial_input(
        self, rendered: Mapping[PortKey, Rendered], changed_chains: set[str],
        deleted_chains: set[str], top_edits: Mapping[str, tuple[list[str], list[str]]],
    ) -> str:
        """Touches only what changed: top-level chains are edited rule by rule (``-D`` the
        old line, ``-A`` the new one; their rules match disjoint frontends, so order does
        not matter) instead of being flushed and rewritten -- kube-proxy rewrites them,
        which at 10k services costs more than everything else in a small change."""
        chains_by_name = {c: rules for r in rendered.values() for c, rules in r.nat_chains.items()}
        gone, added = top_edits["filter"]
        out = ["*filter", *gone, *added, "COMMIT", "*nat"]
        out += [f":{c} - [0:0]" for c in sorted(changed_chains | deleted_chains)]
        gone, added = top_edits["nat"]
        out += gone + added
        for c in sorted(changed_chains):
            out += chains_by_name.get(c, [])
        out += [f"-X {c}" for c in sorted(deleted_chains)]
        out.append("COMMIT")
        return "\n".join(out) + "\n"

    def _commit(self) -> None:
        self._rendered = self._pending
        nat = filt = 0
        for r in self._rendered.values():
            n, f = r.rule_count
            nat, filt = nat + n, filt + f
        self.rules_total = {"nat": nat, "filter": filt}

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
                        rules.append(f"-A {chain} {comment} cluster IP\" {d} "
                                     f"{self._not_local(family)} -j KUBE-MARK-MASQ")
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
                        ext.append(f"-A {ext_chain} {comment} pod traffic\" "
                                   f"{self._local(family)} -j {svc_chain}")
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

    def _local(self, family: Family) -> str:
        d = self.config.detect_local
        if d.mode in ("ClusterCIDR", "NodeCIDR"):
            return f"-s {d.cidrs_for(family)[0]}"
        return f"-i {d.interface}{'+' if d.mode == 'InterfaceNamePrefix' else ''}"

    def _not_local(self, family: Family) -> str:
        return "! " + self._local(family)


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
        table = ""
        for line in save.splitlines():
            if line.startswith("*"):
                table = line[1:]
                cur.chains.setdefault(table, set())
                cur.rules.setdefault(table, set())
            elif line.startswith(":"):
                cur.chains[table].add(line[1:].split()[0])
            elif line.startswith("-A ") and not line.startswith(("-A KUBE-", )):
                cur.rules[table].add(line)
        return cur


def _quoted(spec: tuple[str, ...]) -> str:
    return " ".join(f'"{a}"' if " " in a else a for a in spec)


def _flush_ours(save: str) -> str:
    """Restore input that flushes and deletes every KUBE-* chain found in a save dump."""
    out: list[str] = []
    for block in save.split("COMMIT"):
        lines = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
        table = next((ln for ln in lines if ln.startswith("*")), None)
        if table is None:
            continue
        chains = [ln[1:].split()[0] for ln in lines
                  if ln.startswith(":") and ln[1:].startswith("KUBE-")]
        if not chains:
            continue
        out.append(table)
        out += [f":{c} - [0:0]" for c in chains]
        out += [f"-X {c}" for c in chains]
        out.append("COMMIT")
    return "\n".join(out) + "\n"
