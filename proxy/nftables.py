"""nftables backend: the desired state rendered into table ``svcnet`` with few chains.

``nft``'s cost grows faster than linearly with the number of chains in a table (see
docs/proxy.md), so instead of kube-proxy's per-service and per-endpoint chains every frontend
is an element:

- ``service-ips``: ``addr . proto . port : verdict`` -- ``goto lb-N`` (N endpoints),
  ``goto lbl-N`` (the node-local list), ``goto aff-...`` (ClientIP affinity) or ``drop``;
- ``backends``: ``addr . proto . port . index : endpoint addr . port``; chain ``lb-N`` is
  ``dnat to <daddr . proto . dport . numgen random mod N> map @backends`` (one chain per
  distinct endpoint count, shared by every service);
- ``no-endpoints``: frontends with no endpoint at all, rejected before NAT;
- sets ``cluster-ips`` / ``external-masq`` / ``local-policy`` choose masquerading, ``hairpin``
  (endpoint . endpoint) masquerades a pod reaching itself, ``firewall-ips`` /
  ``firewall-allow`` implement loadBalancerSourceRanges;
- ClientIP affinity services (rare) get kube-proxy-style chains with a timeout set per
  endpoint.

A partial sync is one ``nft -f`` transaction of element adds/deletes and the few chains that
changed; a full sync flushes and rewrites the table in one transaction.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from svcnet.proxy import metrics
from svcnet.proxy.commands import Commands
from svcnet.proxy.config import BackendConfig, short_hash
from svcnet.proxy.nft_model import nft_items
from svcnet.proxy.objects import Chain, Element, Map, Rule, Set, Table, Transaction
from svcnet.proxy.rules import Shared, diff
from svcnet.proxy.sealed_input import NFT_SEAL
from svcnet.proxy.serialize import ELEMENT_BATCH, nft_lines, nft_script
from svcnet.proxy.state import (
    Backend,
    Changes,
    Family,
    PortKey,
    ServicePortState,
)

log = logging.getLogger(__name__)

TABLE = "svcnet"
LOCAL_OFFSET = 1 << 20
LB_CHAINS_MIN = 32
# A full sync hands nft what it recorded each time this many operations are pending.
STREAM_OPS = 4 * ELEMENT_BATCH
# nft reads this as a file, parsing while we still write; "-f -" reads all stdin first.
STREAMED_INPUT = "/proc/self/fd/0"
# Maps whose values jump to chains: their elements go after the chains in a full sync.
VERDICT_MAPS = frozenset({"service-ips", "local-shortcut", "no-endpoints"})
STATIC_MAPS = (
    "service-ips", "backends", "no-endpoints", "local-shortcut", "cluster-ips",
    "external-masq", "local-policy", "hairpin", "firewall-ips", "firewall-allow",
)


def nft_family(family: Family) -> str:
    return "ip" if family == 4 else "ip6"


def table_of(family: Family) -> Table:
    return Table(nft_family(family), TABLE)


@dataclass(slots=True)
class Rendered:
    """Everything one service port puts in the table, as typed objects: elements per set
    or map, ClientIP-affinity chains with their rules and timeout sets; plus the hairpin
    endpoint IPs (shared between ports) and the shared ``lb-N`` chains it jumps to."""

    elements: dict[str, list[Element]] = field(default_factory=dict)
    chains: dict[Chain, tuple[Rule, ...]] = field(default_factory=dict)
    sets: list[Set] = field(default_factory=list)
    hairpin: frozenset[str] = frozenset()
    lb_chains: frozenset[str] = frozenset()

    def element(self, name: str, key: str, value: str = "") -> None:
        got = self.elements.get(name)
        if got is None:
            got = self.elements[name] = []
        got.append(Element(name, key, value))

    def keyed_elements(self) -> dict[tuple[str, str], Element]:
        """Elements by identity (set, key), for the diff engine."""
        return {(e.set, e.key): e for elems in self.elements.values() for e in elems}


class NftablesBackend:
    """Renders ``Changes`` into one nft transaction per sync, per family."""

    name = "nftables"

    def __init__(self, nft: Commands, config: BackendConfig) -> None:
        self.nft = nft
        self.config = config
        self._lb_chains: dict[Family, set[str]] = {f: set() for f in config.families}
        self._lb_max: dict[Family, int] = {f: 0 for f in config.families}
        # endpoint IPs whose hairpin pair is in the table, with how many ports hold each
        self._hairpin: dict[Family, Shared[str]] = {f: Shared() for f in config.families}
        # How many service ports claim each frontend (``addr . proto . port``): a full sync
        # writes only the first claimant, so a partial one touching a frontend claimed
        # twice cannot diff renderings (one of them never reached the kernel).
        self._claims: dict[Family, Counter[str]] = {f: Counter() for f in config.families}
        self._synced_once = False

    # --- public ---------------------------------------------------------------------------

    def sync(self, changes: Changes, *, full: bool) -> None:
        if full or not self._synced_once or self._needs_full(changes):
            self.sync_full(changes.state.values())
        else:
            txs = self.partial_transactions(changes)
            if txs:
                self._apply([nft_script(txs)])
        self._synced_once = True

    def sync_full(self, ports: Iterable[ServicePortState]) -> None:
        """Rebuild the table from every service port, in one transaction.

        ``ports`` may be computed lazily (the proxier passes the model as it is being
        computed): each port is rendered and written to ``nft`` as it comes, and ``nft``
        reads its input as a file (``/proc/self/fd/0``; ``-f -`` would buffer all of stdin
        before parsing), so the model, rendering and nft's parsing overlap.
        """
        self._apply(_chunks(self.full_transaction(ports)))
        self._synced_once = True

    def _apply(self, chunks: Iterable[str]) -> None:
        """One nft transaction, sealed: if we die while writing it, nft applies nothing
        rather than the part it got (a table missing every service not yet written)."""
        self.nft.stream(["nft", "-f", STREAMED_INPUT], chunks, seal=NFT_SEAL)

    def healthy(self) -> bool:
        """The table still exists (somebody may have flushed the ruleset)."""
        fam = nft_family(self.config.families[0])
        out = self.nft.run(["nft", "list", "tables", fam], check=False)
        return f"table {fam} {TABLE}" in out

    def cleanup(self) -> None:
        for family in (4, 6):
            table = table_of(family)  # type: ignore[arg-type]
            tx = Transaction(table)
            tx.add(table)
            tx.delete(table)
            self.nft.run(["nft", "-f", "-"], input=nft_script([tx]))
        self._synced_once = False

    def set_node_addresses(self, addresses: Mapping[Family, tuple[str, ...]]) -> None:
        """NodePort addresses come with each port's frontends (``NodeConfig``)."""

    def rules_total(self) -> Mapping[str, int]:
        return {}

    def kernel_items(self) -> frozenset[str]:
        return frozenset(i for f in self.config.families for i in nft_items(self.dump(f)))

    def record_failure(self, *, full: bool) -> None:
        metrics.NFTABLES_SYNC_FAILURES.inc()

    def dump(self, family: Family = 4) -> dict[str, object]:
        """The table as ``nft -j`` JSON, for the tracer and for tests."""
        out = self.nft.run(["nft", "-j", "list", "table", nft_family(family), TABLE])
        result: dict[str, object] = json.loads(out)
        return result

    # --- full and partial transactions ----------------------------------------------------------

    def _full_script(self, state: Mapping[PortKey, ServicePortState]) -> str:
        return "".join(_chunks(self.full_transaction(state.values())))

    def full_transaction(self, ports: Iterable[ServicePortState]) -> Iterator[Transaction]:
        """The full sync: per family, the table rebuilt in one transaction, handed out in
        parts while ``nft`` already parses the first ones (one ``nft -f`` applies them all).

        Order: the fixed skeleton; per port its affinity sets and chains and, batched per
        set, the elements that reference no chain; then the shared ``lb-N`` chains (their
        number is known only once every port was seen); then the verdict-map elements that
        jump to them; last the hairpin pairs (deduplicated over all ports).
        """
        families = self._families
        txs: dict[Family, Transaction] = {}
        for family in families:
            table = table_of(family)
            tx = txs[family] = Transaction(table)
            tx.add(table)
            tx.delete(table)
            self._skeleton(family, tx)
            self._lb_chains[family] = set()
            self._hairpin[family].reset()
            self._claims[family] = Counter()
        yield from _drain(txs)
        most = dict.fromkeys(families, LB_CHAINS_MIN)
        # Elements per (family, set), recorded in batches; verdict-map ones at the end.
        pending: dict[tuple[Family, str], list[Element]] = {}
        deferred: dict[tuple[Family, str], list[Element]] = {}
        seen: set[str] = set()
        render = self.render
        recorded = 0
        for sp in ports:
            family = sp.family
            part = txs.get(family)
            if part is None:
                continue
            keys = _frontends(sp)
            self._claims[family].update(keys)
            if not seen.isdisjoint(keys):
                # Two services claiming one address and port (an API server prevents it):
                # the first keeps it, as one nft transaction cannot hold both.
                log.warning("%s: frontend already used by another service; skipped", sp.key)
                continue
            seen.update(keys)
            n = max(len(sp.cluster_endpoints), len(sp.local_endpoints))
            if n > most[family]:
                most[family] = n
            r = render(sp)
            self._hairpin[family].hold(r.hairpin)
            if r.chains:
                part.add_all(r.sets)
                part.add_all(r.chains)
                for rules in r.chains.values():
                    part.add_all(rules)
                recorded += ELEMENT_BATCH  # rare: hand them over soon
            for name, elems in r.elements.items():
                where = deferred if name in VERDICT_MAPS else pending
                got = where.get((family, name))
                if got is None:
                    where[family, name] = elems
                    continue
                got += elems
                if len(got) >= ELEMENT_BATCH and where is pending:
                    part.add_all(got)
                    recorded += len(got)
                    where[family, name] = []
            if recorded >= STREAM_OPS:
                yield from _drain(txs)
                recorded = 0
        for (family, _), elems in pending.items():
            txs[family].add_all(elems)
        del pending
        for family in families:
            self._lb_max[family] = most[family] * 2
            self._ensure_lb_chains(family, {
                f"{kind}-{n}" for kind in ("lb", "lbl") for n in range(1, most[family] * 2 + 1)},
                txs[family])
        for (family, _), elems in deferred.items():
            txs[family].add_all(elems)
        del deferred
        for family in families:
            txs[family].add_all([Element("hairpin", _hairpin_key(ip))
                                 for ip in self._hairpin[family]])
        yield from _drain(txs)

    def _needs_full(self, changes: Changes) -> bool:
        """A port with more endpoints than the lb chains made at the last full sync, or
        a change to a frontend that several ports claim (before or after it)."""
        delta: dict[tuple[Family, str], int] = {}
        for key, change in changes.changed.items():
            if key.family not in self._families:
                continue
            cur = change.current
            if cur is not None and max(
                len(cur.cluster_endpoints), len(cur.local_endpoints)
            ) > self._lb_max[key.family]:
                return True
            for sp, step in ((change.previous, -1), (cur, 1)):
                for fe in _frontends(sp) if sp is not None else ():
                    delta[key.family, fe] = delta.get((key.family, fe), 0) + step
        claims = self._claims
        for (family, fe), step in delta.items():
            before = claims[family][fe]
            if before > 1 or before + step > 1:
                return True
        return False

    def partial_transactions(self, changes: Changes) -> list[Transaction]:
        """Per family, one transaction of what changed: what the kernel has for a port is
        what its previous state rendered to (any sync that failed made this one full), so
        the diff engine compares the renderings of ``previous`` and ``current``."""
        # per family: head (new sets and chains), body (chain contents), tail (deletions)
        parts: dict[Family, tuple[Transaction, Transaction, Transaction]] = {}
        adds: dict[Family, dict[str, dict[str, Element]]] = {}
        dels: dict[Family, dict[str, dict[str, Element]]] = {}
        for key, change in changes.changed.items():
            family = key.family
            if family not in self._families:
                continue
            if family not in parts:
                table = table_of(family)
                parts[family] = (Transaction(table), Transaction(table), Transaction(table))
                adds[family], dels[family] = {}, {}
            head, body, tail = parts[family]
            old = self.render(change.previous) if change.previous else Rendered()
            new = self.render(change.current) if change.current else Rendered()
            claims = self._claims[family]
            for fe in _frontends(change.previous) if change.previous else ():
                claims[fe] -= 1
                if claims[fe] <= 0:
                    del claims[fe]
            if change.current is not None:
                claims.update(_frontends(change.current))
            self._ensure_lb_chains(family, set(new.lb_chains), head)
            old_sets = {s.name: s for s in old.sets}
            new_sets = {s.name: s for s in new.sets}
            sets = diff(old_sets, new_sets)
            head.add_all(s for name, s in sets.added.items() if name not in old_sets)
            chains = diff(old.chains, new.chains)
            for chain, rules in chains.added.items():
                head.add(chain)
                if chain in old.chains:
                    body.flush(chain)
                body.add_all(rules)
            for chain in chains.removed.keys() - new.chains.keys():
                body.flush(chain)
                tail.delete(chain)
            tail.delete_all(s for name, s in sets.removed.items() if name not in new_sets)
            elements = diff(old.keyed_elements(), new.keyed_elements())
            for e in elements.removed.values():
                dels[family].setdefault(e.set, {})[e.key] = e
            for e in elements.added.values():
                adds[family].setdefault(e.set, {})[e.key] = e
            gone, taken = self._hairpin[family].change(old.hairpin, new.hairpin)
            for ip in gone:
                dels[family].setdefault("hairpin", {})[_hairpin_key(ip)] = Element(
                    "hairpin", _hairpin_key(ip))
            for ip in taken:
                adds[family].setdefault("hairpin", {})[_hairpin_key(ip)] = Element(
                    "hairpin", _hairpin_key(ip))
        out: list[Transaction] = []
        for family, (head, body, tail) in parts.items():
            # Chains referenced by elements must exist before the elements, and elements
            # must go before the chains they referenced are deleted.
            tx = head
            tx.extend(body)
            for elems in dels[family].values():
                tx.delete_all(elems.values())
            for elems in adds[family].values():
                tx.add_all(elems.values())
            tx.extend(tail)
            if tx:
                out.append(tx)
        return out

    @property
    def _families(self) -> tuple[Family, ...]:
        return self.config.families

    def _ensure_lb_chains(self, family: Family, wanted: set[str], tx: Transaction) -> None:
        ip = nft_family(family)
        made = self._lb_chains[family]
        for name in sorted(wanted - made):
            local, count = name.startswith("lbl-"), int(name.split("-")[1])
            offset = f" offset {LOCAL_OFFSET}" if local else ""
            tx.add(Chain(name))
            tx.add(Rule(name, f"dnat {ip} to {ip} daddr . meta l4proto . th dport . "
                              f"numgen random mod {count}{offset} map @backends"))
            made.add(name)

    # --- the fixed part of the table ------------------------------------------------------------

    def _skeleton(self, family: Family, tx: Transaction) -> None:
        ip = nft_family(family)
        addr = "ipv4_addr" if family == 4 else "ipv6_addr"
        frontend = f"{addr} . inet_proto . inet_service"
        key = f"{ip} daddr . meta l4proto . th dport"
        mark = self.config.masq_mark
        detect = self.config.detect_local
        tx.add(Table(ip, TABLE, "svcnet service proxy"))
        tx.add_all([
            Map("service-ips", f"{frontend} : verdict"),
            Map("local-shortcut", f"{frontend} : verdict"),
            Map("no-endpoints", f"{frontend} : verdict"),
            Map("backends", typeof=f"{ip} daddr . meta l4proto . th dport . "
                                  f"numgen random mod 1 : {ip} daddr . th dport"),
            Set("cluster-ips", frontend),
            Set("external-masq", frontend),
            Set("local-policy", frontend),
            Set("firewall-ips", frontend),
            Set("firewall-allow", f"{frontend} . {addr}", flags="interval"),
            Set("hairpin", f"{addr} . {addr}"),
        ])

        def chain(name: str, *bodies: str, base: tuple[str, str, str] | None = None) -> None:
            tx.add(Chain(name, *base) if base else Chain(name))
            tx.add_all([Rule(name, body) for body in bodies])

        chain("reject-chain", "reject")
        chain("mark-for-masquerade", f"meta mark set meta mark | {mark:#x}")
        chain("masquerading",
              f"ct status dnat {ip} saddr . {ip} daddr @hairpin masquerade fully-random",
              f"meta mark & {mark:#x} == 0 return",
              f"meta mark set meta mark ^ {mark:#x}",
              "masquerade fully-random")
        services: list[str] = []
        if self.config.masquerade_all:
            services.append(f"{key} @cluster-ips jump mark-for-masquerade")
        elif detect.active(family):
            services.append(f"{key} @cluster-ips {detect.nft_not_local(family)} "
                            "jump mark-for-masquerade")
        services.append(f"{key} @external-masq jump mark-for-masquerade")
        if detect.active(family):
            services.append(f"{detect.nft_local(family)} {key} vmap @local-shortcut")
        services += [
            f"fib saddr type local {key} @local-policy jump mark-for-masquerade",
            f"fib saddr type local {key} vmap @local-shortcut",
            f"{key} vmap @service-ips",
        ]
        chain("services", *services)
        chain("filter-checks",
              f"{key} @firewall-ips {key} . {ip} saddr != @firewall-allow drop",
              f"{key} vmap @no-endpoints")
        for hook in ("prerouting", "output"):
            chain(f"filter-{hook}", "ct state new jump filter-checks",
                  base=("filter", hook, "-110"))
        for hook in ("prerouting", "output"):
            chain(f"nat-{hook}", "jump services", base=("nat", hook, "-100"))
        chain("nat-postrouting", "jump masquerading", base=("nat", "postrouting", "srcnat"))

    # --- one service port -----------------------------------------------------------------------

    def render(self, sp: ServicePortState) -> Rendered:
        r = Rendered()
        proto = sp.protocol.lower()
        lb_chains: set[str] = set()
        hairpin = {b.ip for b in sp.cluster_endpoints}
        hairpin.update(b.ip for b in sp.local_endpoints)
        for fe in sp.frontends:
            key = f"{fe.ip} . {proto} . {fe.port}"
            endpoints = sp.endpoints_for(fe)
            if not endpoints:
                # No endpoint at all: reject at once; only none on this node (Local
                # policy): drop, like kube-proxy.
                verdict = "drop" if sp.has_endpoints else "goto reject-chain"
                r.element("no-endpoints", key, verdict)
                continue
            local_list = sp.external_local if fe.kind.external else sp.internal_local
            r.element("service-ips", key, self._target(
                r, sp, key, endpoints, local_list, lb_chains))
            if not fe.kind.external:
                r.element("cluster-ips", key)
            elif not sp.external_local:
                r.element("external-masq", key)
            else:
                # Pods and the node itself reach Local-policy external frontends through
                # the cluster-wide endpoints (kube-proxy's short circuit).
                r.element("local-policy", key)
                if sp.cluster_endpoints:
                    r.element("local-shortcut", key, self._target(
                        r, sp, key, sp.cluster_endpoints, False, lb_chains))
            if fe.kind.value == "LoadBalancer" and sp.source_ranges:
                r.element("firewall-ips", key)
                for cidr in sp.source_ranges:
                    r.element("firewall-allow", f"{key} . {cidr}")
        r.hairpin = frozenset(hairpin)
        r.lb_chains = frozenset(lb_chains)
        return r

    def _target(
        self, r: Rendered, sp: ServicePortState, key: str,
        endpoints: tuple[Backend, ...], local_list: bool, lb_chains: set[str],
    ) -> str:
        if sp.affinity_timeout:
            return f"goto {self._affinity_chains(r, sp, endpoints, local_list)}"
        offset = LOCAL_OFFSET if local_list else 0
        backends = [Element("backends", f"{key} . {i}", f"{b.ip} . {b.port}")
                    for i, b in enumerate(endpoints, offset)]
        got = r.elements.get("backends")
        if got is None:
            r.elements["backends"] = backends
        else:
            got += backends
        chain = f"{'lbl' if local_list else 'lb'}-{len(endpoints)}"
        lb_chains.add(chain)
        return f"goto {chain}"

    def _affinity_chains(
        self, r: Rendered, sp: ServicePortState, endpoints: tuple[Backend, ...],
        local_list: bool,
    ) -> str:
        ip = nft_family(sp.family)
        addr = "ipv4_addr" if sp.family == 4 else "ipv6_addr"
        base = f"aff-{short_hash(str(sp.key), 'local' if local_list else 'cluster', length=12)}"
        if Chain(base) in r.chains:
            return base
        proto = sp.protocol.lower()
        rules: list[Rule] = []
        targets: list[str] = []
        for b in endpoints:
            ep = f"{base}-{short_hash(str(b), length=8)}"
            r.sets.append(Set(ep, addr, flags="dynamic,timeout", timeout=sp.affinity_timeout))
            dest = f"[{b.ip}]:{b.port}" if sp.family == 6 else f"{b.ip}:{b.port}"
            r.chains[Chain(ep)] = (
                Rule(ep, f"update @{ep} {{ {ip} saddr }} meta l4proto {proto} dnat {ip} to {dest}"),
            )
            rules.append(Rule(base, f"{ip} saddr @{ep} goto {ep}"))
            targets.append(ep)
        vmap = ", ".join(f"{i} : goto {t}" for i, t in enumerate(targets))
        rules.append(Rule(base, f"numgen random mod {len(targets)} vmap {{ {vmap} }}"))
        r.chains[Chain(base)] = tuple(rules)
        return base


def _frontends(sp: ServicePortState) -> frozenset[str]:
    """The frontends a port claims, as the verdict maps' keys."""
    proto = sp.key.protocol.lower()
    return frozenset(f"{fe.ip} . {proto} . {fe.port}" for fe in sp.frontends)


def _hairpin_key(ip: str) -> str:
    return f"{ip} . {ip}"


def _drain(txs: Mapping[Family, Transaction]) -> Iterator[Transaction]:
    """What each family's transaction recorded so far, handed out for writing."""
    for tx in txs.values():
        if tx:
            yield Transaction(tx.table, tx.drain())


def _chunks(txs: Iterable[Transaction]) -> Iterator[str]:
    """The streaming writer's input: one chunk of ``nft -f`` text per transaction part."""
    for tx in txs:
        yield "".join(nft_lines(tx))
