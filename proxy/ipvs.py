"""IPVS backend: the desired state rendered into the kernel's IP Virtual Server table.

Like kube-proxy's IPVS mode:

- every service address (ClusterIPs, externalIPs, LoadBalancer IPs) sits on a dummy link
  ``svcnet-ipvs0`` so the node accepts it locally, where IPVS (NAT forwarding) picks a real
  server; NodePorts are virtual servers on the node's own addresses;
- one virtual server per frontend (address, protocol, port) with a scheduler (``rr`` unless
  configured), one real server per endpoint the frontend may use (Local policy: node-local
  ones), ClientIP affinity as IPVS persistence with the service's timeout;
- a removed TCP/SCTP real server first gets weight 0 (no new connections, established ones
  keep working) and is deleted once it has no active connection or after ``grace_period``;
- what IPVS cannot express is a few static iptables rules matching ipsets:
  ``SVCNET-CLUSTER-IP`` / ``SVCNET-EXTERNAL`` mark traffic for masquerade,
  ``SVCNET-LOOP-BACK`` (endpoint, port, endpoint) masquerades hairpin traffic,
  ``SVCNET-NO-ENDPOINTS`` rejects at once and ``SVCNET-NO-LOCAL`` drops (Local policy
  without a local endpoint). Per-service changes only touch set members, never rules.

A partial sync diffs the previous and current rendering of each changed service port and
touches only those virtual servers, real servers, addresses and set members. A full sync
compares the whole rendering with what the kernel reports and repairs the difference.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from svcnet.proxy import metrics
from svcnet.proxy.commands import Commands
from svcnet.proxy.config import BackendConfig
from svcnet.proxy.ipvs_kernel import (
    DestState,
    IpvsTable,
    RealServer,
    ServiceOptions,
    VirtualServer,
)
from svcnet.proxy.objects import (
    IpsetMember,
    IpsetSet,
    IpsetSwap,
    IptChain,
    IptRule,
    IpvsDest,
    IpvsService,
    Transaction,
)
from svcnet.proxy.rules import Shared, diff
from svcnet.proxy.serialize import apply_ipvs, ipset_lines, restore_lines
from svcnet.proxy.state import Changes, Family, FrontendKind, PortKey, ServicePortState

from svcnet.iptables_save import is_declaration, rule_target, save_lines, spec_of

log = logging.getLogger(__name__)

LINK = "svcnet-ipvs0"
CHAIN_SERVICES = "SVCNET-IPVS-SERVICES"
CHAIN_MARK = "SVCNET-IPVS-MARK-MASQ"
CHAIN_POSTROUTING = "SVCNET-IPVS-POSTROUTING"
CHAIN_NOT_LOCAL = "SVCNET-IPVS-NOT-LOCAL"  # marks unless local (several detect-local matches)
CHAIN_FILTER = "SVCNET-IPVS-FILTER"
SET_CLUSTER_IP = "SVCNET-CLUSTER-IP"
SET_EXTERNAL = "SVCNET-EXTERNAL"
SET_LOOP_BACK = "SVCNET-LOOP-BACK"
SET_NO_ENDPOINTS = "SVCNET-NO-ENDPOINTS"
SET_NO_LOCAL = "SVCNET-NO-LOCAL"
SET_TYPES = {
    SET_CLUSTER_IP: "hash:ip,port", SET_EXTERNAL: "hash:ip,port",
    SET_LOOP_BACK: "hash:ip,port,ip", SET_NO_ENDPOINTS: "hash:ip,port",
    SET_NO_LOCAL: "hash:ip,port",
}
JUMPS = (
    ("nat", "PREROUTING", CHAIN_SERVICES), ("nat", "OUTPUT", CHAIN_SERVICES),
    ("nat", "POSTROUTING", CHAIN_POSTROUTING),
    ("filter", "INPUT", CHAIN_FILTER), ("filter", "FORWARD", CHAIN_FILTER),
    ("filter", "OUTPUT", CHAIN_FILTER),
)
SYSCTLS = {
    4: ("net.ipv4.ip_forward=1", "net.ipv4.vs.conntrack=1",
        "net.ipv4.vs.expire_nodest_conn=1", "net.ipv4.vs.expire_quiescent_template=1"),
    6: ("net.ipv6.conf.all.forwarding=1",),
}
WEIGHT = 1
# ipset's own defaults, kept as the floor: small clusters get the sets kube-proxy makes.
MIN_HASHSIZE = 1024
MIN_MAXELEM = 65536


def set_name(base: str, family: Family) -> str:
    return base if family == 4 else f"{base}-6"


def set_size(members: int) -> tuple[int, int]:
    """(hashsize, maxelem) for a set that must hold ``members``.

    ``maxelem`` is a hard limit ("Hash is full" past it: the loop-back set holds one member
    per endpoint, 100k at 10k services x 10); twice the need, so partial syncs can grow the
    set until the next resize. ``hashsize`` starts at the need, sparing the kernel rehashes
    while a full sync loads the set. Both powers of two, as ipset rounds them.
    """
    def pow2(n: int) -> int:
        return 1 << max(0, n - 1).bit_length()

    return max(MIN_HASHSIZE, pow2(members)), max(MIN_MAXELEM, pow2(2 * members))


@dataclass(slots=True)
class Rendered:
    """What one service port needs: virtual servers, addresses on the link, set members."""

    servers: dict[VirtualServer, tuple[ServiceOptions, frozenset[RealServer]]] = field(
        default_factory=dict)
    addresses: frozenset[str] = frozenset()
    members: frozenset[IpsetMember] = frozenset()


class IpvsBackend:
    """Renders ``Changes`` into IPVS, the dummy link's addresses and a few ipsets."""

    name = "ipvs"

    def __init__(self, table: IpvsTable, commands: Commands, config: BackendConfig, *,
                 scheduler: str = "rr", grace_period: float = 15.0) -> None:
        self.table = table
        self.commands = commands
        self.config = config
        self.scheduler = scheduler
        self.grace_period = grace_period
        # Held by service ports (the diff engine's counts): what the kernel has of ours.
        self._servers: Shared[VirtualServer] = Shared()
        self._addresses: Shared[str] = Shared()
        self._members: Shared[IpsetMember] = Shared()
        self._set_lengths: Counter[str] = Counter()  # members per set, as in the kernel
        self._set_capacity: dict[str, int] = {}  # maxelem of each set as we created it
        self._graceful: dict[tuple[VirtualServer, RealServer], float] = {}
        self._synced_once = False
        self._node_ips: set[str] = set()
        self._totals: dict[str, int] = {}

    def set_node_addresses(self, addresses: Mapping[Family, tuple[str, ...]]) -> None:
        """NodePort addresses (the daemon calls this): stale virtual servers there are ours."""
        self._node_ips = {a for addrs in addresses.values() for a in addrs}

    # --- ProxyBackend ----------------------------------------------------------------------

    def sync(self, changes: Changes, *, full: bool) -> None:
        if full or not self._synced_once:
            self._full_sync(changes.state)
        else:
            self._partial_sync(changes)
        self._synced_once = True
        self.finish_graceful()
        self._totals = {"ipvs_virtual_servers": len(self._servers)}

    def sync_full(self, ports: Iterable[ServicePortState]) -> None:
        """Virtual servers are written one netlink call at a time, nothing to stream."""
        self.sync(Changes({}, {p.key: p for p in ports}), full=True)

    def rules_total(self) -> Mapping[str, int]:
        return self._totals

    def kernel_items(self) -> None:
        """Not covered by the drift check (``supported: false``)."""
        return None

    def record_failure(self, *, full: bool) -> None:
        metrics.NFTABLES_SYNC_FAILURES.inc()  # as before the protocol; no IPVS metric yet

    def healthy(self) -> bool:
        """The link and our nat chain still exist; also finishes graceful removals."""
        self.finish_graceful()
        link = self.commands.run(["ip", "-o", "link", "show", "dev", LINK], check=False)
        chain = self.commands.run(["iptables", "-t", "nat", "-S", CHAIN_SERVICES], check=False)
        return LINK in link and CHAIN_SERVICES in chain

    def cleanup(self) -> None:
        """Remove every virtual server on our addresses, the link, the rules and the sets."""
        ours = self._link_state()[1] | set(self._addresses) | self._node_ips
        for vs in self.table.services():
            if vs.ip in ours or vs in self._servers:
                self.table.delete_service(vs)
        self.commands.run(["ip", "link", "del", LINK], check=False)
        for family in self.config.families:
            tool = _iptables(family)
            saved = self.commands.run([f"{tool}-save"], check=False)
            removal = self.removal_transaction(saved)
            if removal:
                self.commands.run([f"{tool}-restore", "--noflush"],
                                  input="".join(restore_lines(removal.ops)))
        existing = set(self.commands.run(["ipset", "list", "-n"], check=False).split())
        doomed = [set_name(base, f) for f in (4, 6) for base in SET_TYPES]
        sets = Transaction()
        sets.delete_all(IpsetSet(name) for name in doomed if name in existing)
        if sets:
            self.commands.run(["ipset", "restore"], input="".join(ipset_lines(sets.ops)))
        self._servers.reset()
        self._addresses.reset()
        self._members.reset()
        self._set_lengths.clear()
        self._set_capacity.clear()
        self._graceful.clear()
        self._synced_once = False

    # --- rendering ------------------------------------------------------------------------

    def render(self, sp: ServicePortState) -> Rendered:
        proto = sp.protocol
        fam = sp.family
        servers: dict[VirtualServer, tuple[ServiceOptions, frozenset[RealServer]]] = {}
        addresses: set[str] = set()
        members: set[IpsetMember] = set()
        options = ServiceOptions(self.scheduler, sp.affinity_timeout)
        for fe in sp.frontends:
            if fe.kind is not FrontendKind.NODE_PORT:
                addresses.add(fe.ip)
            member = f"{fe.ip},{proto.lower()}:{fe.port}"
            endpoints = sp.endpoints_for(fe)
            if not endpoints:
                base = SET_NO_LOCAL if sp.has_endpoints else SET_NO_ENDPOINTS
                members.add(IpsetMember(set_name(base, fam), member))
                continue
            vs = VirtualServer(fe.ip, proto, fe.port)
            servers[vs] = (options, frozenset(RealServer(b.ip, b.port) for b in endpoints))
            if not fe.kind.external:
                members.add(IpsetMember(set_name(SET_CLUSTER_IP, fam), member))
            elif not sp.external_local:
                members.add(IpsetMember(set_name(SET_EXTERNAL, fam), member))
        for b in sp.all_endpoints:
            members.add(IpsetMember(set_name(SET_LOOP_BACK, fam),
                                    f"{b.ip},{proto.lower()}:{b.port},{b.ip}"))
        return Rendered(servers, frozenset(addresses), frozenset(members))

    # --- syncs ----------------------------------------------------------------------------

    def _full_sync(self, state: Mapping[PortKey, ServicePortState]) -> None:
        rendered = {k: self.render(sp) for k, sp in state.items()
                    if sp.family in self.config.families}
        self._servers.reset(vs for r in rendered.values() for vs in r.servers)
        self._addresses.reset(a for r in rendered.values() for a in r.addresses)
        self._members.reset(m for r in rendered.values() for m in r.members)
        self._set_lengths = Counter(m.set for m in self._members)
        # Sets first (the rules match them), then rules, link and addresses, then IPVS.
        self.commands.run(["sysctl", "-q", "-w", *(s for f in self.config.families
                                                   for s in SYSCTLS[f])], check=False)
        self._replace_sets()
        for family in self.config.families:
            tool = _iptables(family)
            have = self.commands.run([f"{tool}-save"], check=False)
            self.commands.run([f"{tool}-restore", "--noflush"],
                              input=self._rules(family, have))
        have_link, have_addresses = self._link_state()
        wanted_addresses = set(self._addresses)
        self._apply_addresses(add=wanted_addresses - have_addresses,
                              remove=have_addresses - wanted_addresses, create=not have_link)
        wanted: dict[VirtualServer, tuple[ServiceOptions, frozenset[RealServer]]] = {}
        for r in rendered.values():
            wanted.update(r.servers)
        current = self.table.services()
        owned = have_addresses | wanted_addresses | self._node_ips
        tx = Transaction()
        for vs in current.keys() - wanted.keys():
            if vs.ip in owned:
                tx.delete(IpvsService(vs))
                self._forget_graceful(vs)
        for vs, (options, reals) in wanted.items():
            if vs not in current:
                tx.add(IpvsService(vs, options))
                tx.add_all([IpvsDest(vs, rs, WEIGHT) for rs in sorted(reals)])
                continue
            if current[vs] != options:
                tx.update(IpvsService(vs, options))
            self._reconcile_dests(tx, vs, reals, self.table.dests(vs))
        apply_ipvs(self.table, tx.ops)

    def _partial_sync(self, changes: Changes) -> None:
        add_addr: set[str] = set()
        del_addr: set[str] = set()
        add_mem: set[IpsetMember] = set()
        del_mem: set[IpsetMember] = set()
        tx = Transaction()
        for key, change in sorted(changes.changed.items()):
            if key.family not in self.config.families:
                continue
            # What the kernel holds for this port is what its previous state renders to
            # (a failed sync makes the next one full): no rendered copy is kept.
            old = self.render(change.previous) if change.previous else Rendered()
            new = self.render(change.current) if change.current else Rendered()
            self._servers.change(old.servers, new.servers)
            servers = diff(old.servers, new.servers)
            for vs in servers.removed.keys() - new.servers.keys():
                tx.delete(IpvsService(vs))
                self._forget_graceful(vs)
            for vs, (options, reals) in servers.added.items():
                before = old.servers.get(vs)
                if before is None:
                    tx.add(IpvsService(vs, options))
                    tx.add_all([IpvsDest(vs, rs, WEIGHT) for rs in sorted(reals)])
                    continue
                if before[0] != options:
                    tx.update(IpvsService(vs, options))
                if before[1] != reals:
                    self._reconcile_dests(tx, vs, reals, {
                        **{rs: None for rs in before[1]},
                        **{rs: None for (v, rs) in self._graceful if v == vs}})
            gone, taken = self._addresses.change(old.addresses, new.addresses)
            del_addr |= gone
            add_addr |= taken
            lost, got = self._members.change(old.members, new.members)
            del_mem |= lost
            add_mem |= got
        apply_ipvs(self.table, tx.ops)
        self._apply_addresses(add=add_addr - del_addr, remove=del_addr - add_addr)
        self._apply_members(add=add_mem - del_mem, remove=del_mem - add_mem)

    def _reconcile_dests(self, tx: Transaction, vs: VirtualServer, reals: frozenset[RealServer],
                         current: Mapping[RealServer, DestState | None]) -> None:
        """Record what brings ``vs``'s real servers from ``current`` to ``reals``: TCP ones
        that go are drained (weight 0) first, see ``finish_graceful``."""
        for rs in sorted(reals):
            if rs not in current:
                tx.add(IpvsDest(vs, rs, WEIGHT))
            elif (vs, rs) in self._graceful or _weight(current[rs]) not in (None, WEIGHT):
                tx.update(IpvsDest(vs, rs, WEIGHT))
                self._graceful.pop((vs, rs), None)
        for rs in sorted(current.keys() - reals):
            if (vs, rs) in self._graceful:
                continue
            if vs.protocol == "UDP":
                tx.delete(IpvsDest(vs, rs))
            else:
                tx.update(IpvsDest(vs, rs, 0))
                self._graceful[(vs, rs)] = time.monotonic() + self.grace_period

    def finish_graceful(self) -> None:
        """Delete weight-0 real servers that have no active connection or ran out of time."""
        if not self._graceful:
            return
        now = time.monotonic()
        tx = Transaction()
        for vs in {vs for vs, _ in self._graceful}:
            try:
                dests = self.table.dests(vs)
            except OSError:
                self._forget_graceful(vs)
                continue
            for (v, rs), deadline in list(self._graceful.items()):
                if v != vs:
                    continue
                state = dests.get(rs)
                if state is None:
                    del self._graceful[(v, rs)]
                elif state.active_connections == 0 or now >= deadline:
                    tx.delete(IpvsDest(vs, rs))
        apply_ipvs(self.table, tx.ops)
        for _, dest in tx.operations():  # forgotten once gone: a failure retries them
            if isinstance(dest, IpvsDest):
                del self._graceful[(dest.server, dest.real)]

    def _forget_graceful(self, vs: VirtualServer) -> None:
        for key in [k for k in self._graceful if k[0] == vs]:
            del self._graceful[key]

    # --- link, sets, rules ------------------------------------------------------------------

    def _rules(self, family: Family, saved: str) -> str:
        """Our chains as ``iptables-restore --noflush`` input (see ``rules_transaction``)."""
        return "".join(restore_lines(self.rules_transaction(family, saved).ops))

    def rules_transaction(self, family: Family, saved: str) -> Transaction:
        """Our chains declared (created or emptied) with their rules, plus the jumps into
        them missing from ``saved``, put first in their built-in chains."""
        mark = f"{self.config.masq_mark:#x}"
        cluster, external = set_name(SET_CLUSTER_IP, family), set_name(SET_EXTERNAL, family)
        detect = self.config.detect_local

        def nat(chain: str, spec: str) -> IptRule:
            return IptRule("nat", chain, spec)

        tx = Transaction()
        for chain in (CHAIN_SERVICES, CHAIN_MARK, CHAIN_NOT_LOCAL, CHAIN_POSTROUTING):
            tx.flush(IptChain("nat", chain))
        rules = [nat(CHAIN_MARK, f"-j MARK --or-mark {mark}")]
        match_cluster = f"-m set --match-set {cluster} dst,dst"
        if self.config.masquerade_all:
            rules.append(nat(CHAIN_SERVICES, f"{match_cluster} -j {CHAIN_MARK}"))
        elif detect.active(family):
            rules.append(nat(CHAIN_SERVICES, detect.iptables_masquerade(
                match_cluster, family, CHAIN_MARK, CHAIN_NOT_LOCAL)))
            rules += [nat(CHAIN_NOT_LOCAL, spec)
                      for spec in detect.iptables_not_local_specs(family, CHAIN_MARK)]
        rules += [
            nat(CHAIN_SERVICES, f"-m set --match-set {external} dst,dst -j {CHAIN_MARK}"),
            nat(CHAIN_POSTROUTING, f"-m set --match-set {set_name(SET_LOOP_BACK, family)} "
                "dst,dst,src -j MASQUERADE"),
            nat(CHAIN_POSTROUTING, f"-m mark ! --mark {mark}/{mark} -j RETURN"),
            nat(CHAIN_POSTROUTING, f"-j MARK --xor-mark {mark}"),
            nat(CHAIN_POSTROUTING, "-j MASQUERADE --random-fully"),
        ]
        tx.add_all(rules)
        self._insert_missing_jumps(tx, "nat", saved)
        tx.flush(IptChain("filter", CHAIN_FILTER))
        tx.add_all([
            IptRule("filter", CHAIN_FILTER, "-m conntrack --ctstate NEW -m set --match-set "
                    f"{set_name(SET_NO_ENDPOINTS, family)} dst,dst -j REJECT"),
            IptRule("filter", CHAIN_FILTER, "-m conntrack --ctstate NEW -m set --match-set "
                    f"{set_name(SET_NO_LOCAL, family)} dst,dst -j DROP"),
        ])
        self._insert_missing_jumps(tx, "filter", saved)
        return tx

    @staticmethod
    def _removal_script(saved: str) -> str:
        """An ``iptables-restore --noflush`` script deleting our jumps and chains."""
        return "".join(restore_lines(IpvsBackend.removal_transaction(saved).ops))

    @staticmethod
    def removal_transaction(saved: str) -> Transaction:
        """Per table: other chains' jumps into ours deleted, ours flushed, then deleted."""
        ours = {CHAIN_SERVICES, CHAIN_MARK, CHAIN_NOT_LOCAL, CHAIN_POSTROUTING, CHAIN_FILTER}
        jumps: dict[str, list[IptRule]] = {}
        chains: dict[str, list[IptChain]] = {}
        for table, chain, line in save_lines(saved):
            if is_declaration(line):
                if chain in ours:
                    chains.setdefault(table, []).append(IptChain(table, chain))
            elif chain not in ours and rule_target(spec := spec_of(chain, line)) in ours:
                jumps.setdefault(table, []).append(IptRule(table, chain, spec))
        tx = Transaction()
        for table in dict.fromkeys([*jumps, *chains]):
            tx.delete_all(reversed(jumps.get(table, [])))
            for ours_chain in chains.get(table, []):
                tx.flush(ours_chain)
            tx.delete_all(chains.get(table, []))
        return tx

    @staticmethod
    def _insert_missing_jumps(tx: Transaction, table: str, saved: str) -> None:
        present = {line for t, _, line in save_lines(saved) if t == table}
        for t, chain, target in JUMPS:
            if t == table and f"-A {chain} -j {target}" not in present:
                tx.insert(IptRule(table, chain, f"-j {target}"))

    def _link_state(self) -> tuple[bool, set[str]]:
        """Whether our link exists, and its global addresses."""
        out = self.commands.run(["ip", "-j", "addr", "show", "dev", LINK], check=False)
        try:
            links = json.loads(out or "[]")
        except ValueError:
            links = []
        addresses = {str(a["local"]) for link in links for a in link.get("addr_info", [])
                     if a.get("scope") != "link"}
        return bool(links), addresses

    def _apply_addresses(self, *, add: Iterable[str], remove: Iterable[str],
                         create: bool = False) -> None:
        lines = [f"link add {LINK} type dummy", f"link set {LINK} up"] if create else []
        lines += [f"addr del {_prefix(a)} dev {LINK}" for a in sorted(remove)]
        lines += [f"addr replace {_prefix(a)} dev {LINK}" for a in sorted(add)]
        if lines:
            self.commands.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")

    def _apply_members(self, *, add: Iterable[IpsetMember],
                       remove: Iterable[IpsetMember]) -> None:
        removed, added = sorted(remove), sorted(add)
        for m in removed:
            self._set_lengths[m.set] -= 1
        for m in added:
            self._set_lengths[m.set] += 1
        tx = Transaction()
        tx.delete_all(removed)
        tx.add_all(added)
        if any(n > self._set_capacity.get(s, MIN_MAXELEM) for s, n in self._set_lengths.items()):
            self._replace_sets()  # a set outgrew its maxelem: a bigger one is swapped in
            return
        if tx:
            self.commands.run(["ipset", "restore", "-exist"], input="".join(ipset_lines(tx.ops)))

    def _replace_sets(self) -> None:
        """Fill temporary sets sized for their members and swap them in, so no member is
        ever missing and a set that must grow does (``create`` cannot resize a set)."""
        existing = set(self.commands.run(["ipset", "list", "-n"], check=False).split())
        by_set: dict[str, list[str]] = {}
        for m in sorted(self._members):
            by_set.setdefault(m.set, []).append(m.entry)
        self._set_lengths = Counter({s: len(ms) for s, ms in by_set.items()})
        tx = sets_transaction(self.config.families, by_set, existing, self._set_capacity)
        self.commands.run(["ipset", "restore", "-exist"], input="".join(ipset_lines(tx.ops)))


def sets_transaction(families: Iterable[Family], members: Mapping[str, list[str]],
                     existing: set[str], capacity: dict[str, int]) -> Transaction:
    """Every set of ours replaced by one holding ``members`` (per set name), each sized by
    ``set_size``: created if missing, filled under a temporary name, swapped in; records
    each set's maxelem in ``capacity``."""
    tx = Transaction()
    for family in families:
        inet = "inet" if family == 4 else "inet6"
        for base, kind in SET_TYPES.items():
            name = set_name(base, family)
            tmp = f"{name}-T"[:31]
            want = members.get(name, [])
            hashsize, maxelem = set_size(len(want))
            if name not in existing:
                tx.add(IpsetSet(name, kind, inet, hashsize, maxelem))
            if tmp in existing:  # left by a run that died mid-way, perhaps another size
                tx.delete(IpsetSet(tmp))
            tx.add(IpsetSet(tmp, kind, inet, hashsize, maxelem))
            tx.add_all(IpsetMember(tmp, m) for m in want)
            tx.update(IpsetSwap(tmp, name))
            tx.delete(IpsetSet(tmp))
            capacity[name] = maxelem
    return tx


def _iptables(family: Family) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _prefix(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _weight(state: DestState | None) -> int | None:
    return state.weight if state is not None else None


class IpvsOptions(Protocol):
    """What ``build_backend`` reads of the daemon's ``ProxyOptions``."""

    @property
    def ipvs_scheduler(self) -> str: ...

    @property
    def netns(self) -> str | None: ...


def build_backend(opts: IpvsOptions, commands: Commands, config: BackendConfig) -> IpvsBackend:
    """Called by svcnet.proxy.daemon for ``--proxy-mode ipvs``."""
    from svcnet.proxy.ipvs_kernel import NetlinkIpvs

    commands.run(["modprobe", "-a", "ip_vs", "ip_vs_rr", "dummy"], check=False)
    return IpvsBackend(NetlinkIpvs(opts.netns), commands, config,
                       scheduler=opts.ipvs_scheduler or "rr")


def cleanup_all(commands: Commands, netns: str | None = None) -> None:
    """``svcnet proxy cleanup``: remove our IPVS state; a kernel without IP_VS has none."""
    from svcnet.proxy.ipvs_kernel import NetlinkIpvs

    table = NetlinkIpvs(netns)
    try:
        table.probe()
    except Exception:  # no IPVS generic netlink family: nothing of ours can exist
        log.debug("no IPVS in this kernel; nothing to clean up")
        return
    try:
        IpvsBackend(table, commands, BackendConfig(families=(4, 6))).cleanup()
    finally:
        table.close()
