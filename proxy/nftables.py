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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from svcnet.proxy import metrics
from svcnet.proxy.commands import Commands
from svcnet.proxy.config import BackendConfig, short_hash
from svcnet.proxy.nft_model import nft_items
from svcnet.proxy.rules import Shared, diff
from svcnet.proxy.sealed_input import NFT_SEAL
from svcnet.proxy.state import (
    Backend,
    Changes,
    Family,
    FrontendKind,
    PortKey,
    ServicePortState,
)

log = logging.getLogger(__name__)

TABLE = "svcnet"
LOCAL_OFFSET = 1 << 20
LB_CHAINS_MIN = 32
ELEMENT_BATCH = 2000
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


@dataclass(slots=True)
class Rendered:
    """Everything one service port puts in the table."""

    elements: dict[str, dict[str, str]] = field(default_factory=dict)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)
    hairpin: frozenset[str] = frozenset()
    lb_chains: frozenset[str] = frozenset()

    def element(self, name: str, key: str, value: str = "") -> None:
        self.elements.setdefault(name, {})[key] = value


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
        self._synced_once = False

    # --- public ---------------------------------------------------------------------------

    def sync(self, changes: Changes, *, full: bool) -> None:
        if full or not self._synced_once or self._needs_full(changes):
            self.sync_full(changes.state.values())
        else:
            script = self._partial_script(changes)
            if script:
                self._apply([script])
        self._synced_once = True

    def sync_full(self, ports: Iterable[ServicePortState]) -> None:
        """Rebuild the table from every service port, in one transaction.

        ``ports`` may be computed lazily (the proxier passes the model as it is being
        computed): each port is rendered and written to ``nft`` as it comes, and ``nft``
        reads its input as a file (``/proc/self/fd/0``; ``-f -`` would buffer all of stdin
        before parsing), so the model, rendering and nft's parsing overlap.
        """
        self._apply(self._full_chunks(ports))
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
            fam = nft_family(family)  # type: ignore[arg-type]
            self.nft.run(["nft", "-f", "-"],
                         input=f"add table {fam} {TABLE}\ndelete table {fam} {TABLE}\n")
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

    # --- full and partial scripts -------------------------------------------------------------

    def _full_script(self, state: Mapping[PortKey, ServicePortState]) -> str:
        return "".join(self._full_chunks(state.values()))

    def _full_chunks(self, ports: Iterable[ServicePortState]) -> Iterator[str]:
        """The full-sync script, produced while ``nft`` already parses the start of it.

        Order: the fixed skeleton; per port its affinity sets and chains and, batched per
        set, the elements that reference no chain; then the shared ``lb-N`` chains (their
        number is known only once every port was seen); then the verdict-map elements that
        jump to them; last the hairpin pairs (deduplicated over all ports).
        """
        families = self._families
        head: list[str] = []
        for family in families:
            fam = nft_family(family)
            head += [f"add table {fam} {TABLE}", f"delete table {fam} {TABLE}"]
            head += self._skeleton(family)
            self._lb_chains[family] = set()
            self._hairpin[family].reset()
        yield "\n".join(head) + "\n"
        most = dict.fromkeys(families, LB_CHAINS_MIN)
        # Element texts ("key" or "key : value") per (family, set), emitted in batches.
        pending: dict[tuple[Family, str], list[str]] = {}
        deferred: dict[tuple[Family, str], list[str]] = {}
        seen: set[str] = set()
        out: list[str] = []
        render = self.render

        def items(where: dict[tuple[Family, str], list[str]], family: Family, name: str
                  ) -> list[str]:
            got = where.get((family, name))
            if got is None:
                got = where[family, name] = []
            return got

        for sp in ports:
            family = sp.family
            if family not in most:
                continue
            proto = sp.key.protocol.lower()
            keys = [f"{fe.ip} . {proto} . {fe.port}" for fe in sp.frontends]
            if not seen.isdisjoint(keys):
                # Two services claiming one address and port (an API server prevents it):
                # the first keeps it, as one nft transaction cannot hold both.
                log.warning("%s: frontend already used by another service; skipped", sp.key)
                continue
            seen.update(keys)
            n = max(len(sp.cluster_endpoints), len(sp.local_endpoints))
            if n > most[family]:
                most[family] = n
            eps = sp.cluster_endpoints
            if (eps and not sp.affinity_timeout and not sp.internal_local
                    and all(fe.kind is FrontendKind.CLUSTER_IP for fe in sp.frontends)):
                # The common case, written directly: what render() gives for it (a test
                # checks they agree), without the intermediate dicts.
                ips = {b.ip for b in eps}
                ips.update(b.ip for b in sp.local_endpoints)
                self._hairpin[family].hold(ips)
                backends = items(pending, family, "backends")
                verdict = f" : goto lb-{len(eps)}"
                for key in keys:
                    backends += [f"{key} . {i} : {b.ip} . {b.port}" for i, b in enumerate(eps)]
                    items(deferred, family, "service-ips").append(key + verdict)
                    items(pending, family, "cluster-ips").append(key)
            else:
                fam = nft_family(family)
                r = render(sp)
                self._hairpin[family].hold(r.hairpin)
                for name, decl in r.sets.items():
                    out.append(f"add set {fam} {TABLE} {name} {decl}\n")
                for name in r.chains:
                    out.append(f"add chain {fam} {TABLE} {name}\n")
                for name, rules in r.chains.items():
                    out += [f"add rule {fam} {TABLE} {name} {rule}\n" for rule in rules]
                for name, elems in r.elements.items():
                    items(deferred if name in VERDICT_MAPS else pending, family, name).extend(
                        f"{k} : {v}" if v else k for k, v in elems.items())
            for (family, name), texts in pending.items():
                if len(texts) >= ELEMENT_BATCH:
                    out += _add_elements(family, name, texts)
                    texts.clear()
            if len(out) >= 16:
                yield "".join(out)
                out = []
        for (family, name), texts in pending.items():
            out += _add_elements(family, name, texts)
        del pending
        for family in families:
            self._lb_max[family] = most[family] * 2
            out += [ln + "\n" for ln in self._ensure_lb_chains(family, {
                f"{kind}-{n}" for kind in ("lb", "lbl") for n in range(1, most[family] * 2 + 1)})]
        for (family, name), texts in deferred.items():
            out += _add_elements(family, name, texts)
        del deferred
        for family in families:
            hairpin = [f"{ip} . {ip}" for ip in self._hairpin[family].counts]
            out += _add_elements(family, "hairpin", hairpin)
        yield "".join(out)

    def _needs_full(self, changes: Changes) -> bool:
        """A port with more endpoints than the lb chains made at the last full sync."""
        for key, change in changes.changed.items():
            cur = change.current
            if cur is not None and key.family in self._families and max(
                len(cur.cluster_endpoints), len(cur.local_endpoints)
            ) > self._lb_max[key.family]:
                return True
        return False

    def _partial_script(self, changes: Changes) -> str:
        head: list[str] = []
        body: list[str] = []
        tail: list[str] = []
        adds: dict[tuple[Family, str], dict[str, str]] = {}
        dels: dict[tuple[Family, str], dict[str, str]] = {}
        for key, change in changes.changed.items():
            if key.family not in self._families:
                continue
            family, fam = key.family, nft_family(key.family)
            # What the kernel has for this port is what its previous state rendered to
            # (any sync that failed made this one full): no rendered copy is kept.
            old = self.render(change.previous) if change.previous else Rendered()
            new = self.render(change.current) if change.current else Rendered()
            head += self._ensure_lb_chains(family, set(new.lb_chains))
            sets = diff(old.sets, new.sets)
            head += [f"add set {fam} {TABLE} {name} {decl}" for name, decl in sets.added.items()
                     if name not in old.sets]
            chains = diff(old.chains, new.chains)
            for name, rules in chains.added.items():
                head.append(f"add chain {fam} {TABLE} {name}")
                if name in old.chains:
                    body.append(f"flush chain {fam} {TABLE} {name}")
                body += [f"add rule {fam} {TABLE} {name} {rule}" for rule in rules]
            for name in chains.removed.keys() - new.chains.keys():
                body.append(f"flush chain {fam} {TABLE} {name}")
                tail.append(f"delete chain {fam} {TABLE} {name}")
            tail += [f"delete set {fam} {TABLE} {name}" for name in sets.removed
                     if name not in new.sets]
            for name in old.elements.keys() | new.elements.keys():
                delta = diff(old.elements.get(name, {}), new.elements.get(name, {}))
                if delta.removed:
                    dels.setdefault((family, name), {}).update(delta.removed)
                if delta.added:
                    adds.setdefault((family, name), {}).update(delta.added)
            gone, taken = self._hairpin[family].change(old.hairpin, new.hairpin)
            for ip in gone:
                dels.setdefault((family, "hairpin"), {})[_hairpin_key(ip)] = ""
            for ip in taken:
                adds.setdefault((family, "hairpin"), {})[_hairpin_key(ip)] = ""
        elements: list[str] = []
        for (family, name), elems in dels.items():
            elements += _element_lines("delete", nft_family(family), name, elems)
        for (family, name), elems in adds.items():
            elements += _element_lines("add", nft_family(family), name, elems)
        # Chains referenced by elements must exist before the elements, and elements must go
        # before the chains they referenced are deleted.
        lines = head + body + elements + tail
        return "\n".join(lines) + "\n" if lines else ""

    @property
    def _families(self) -> tuple[Family, ...]:
        return self.config.families

    def _ensure_lb_chains(self, family: Family, wanted: set[str]) -> list[str]:
        fam, ip = nft_family(family), nft_family(family)
        lines: list[str] = []
        for name in sorted(wanted - self._lb_chains[family]):
            local, count = name.startswith("lbl-"), int(name.split("-")[1])
            offset = f" offset {LOCAL_OFFSET}" if local else ""
            lines += [
                f"add chain {fam} {TABLE} {name}",
                f"add rule {fam} {TABLE} {name} dnat {ip} to {ip} daddr . meta l4proto . "
                f"th dport . numgen random mod {count}{offset} map @backends",
            ]
            self._lb_chains[family].add(name)
        return lines

    # --- the fixed part of the table ------------------------------------------------------------

    def _skeleton(self, family: Family) -> list[str]:
        fam = nft_family(family)
        addr = "ipv4_addr" if family == 4 else "ipv6_addr"
        ip = fam
        t = f"{fam} {TABLE}"
        frontend = f"{addr} . inet_proto . inet_service"
        key = f"{ip} daddr . meta l4proto . th dport"
        mark = self.config.masq_mark
        detect = self.config.detect_local
        lines = [
            f"add table {t} {{ comment \"svcnet service proxy\" ; }}",
            f"add map {t} service-ips {{ type {frontend} : verdict ; }}",
            f"add map {t} local-shortcut {{ type {frontend} : verdict ; }}",
            f"add map {t} no-endpoints {{ type {frontend} : verdict ; }}",
            f"add map {t} backends {{ typeof {ip} daddr . meta l4proto . th dport . "
            f"numgen random mod 1 : {ip} daddr . th dport ; }}",
            f"add set {t} cluster-ips {{ type {frontend} ; }}",
            f"add set {t} external-masq {{ type {frontend} ; }}",
            f"add set {t} local-policy {{ type {frontend} ; }}",
            f"add set {t} firewall-ips {{ type {frontend} ; }}",
            f"add set {t} firewall-allow {{ type {frontend} . {addr} ; flags interval ; }}",
            f"add set {t} hairpin {{ type {addr} . {addr} ; }}",
            f"add chain {t} reject-chain",
            f"add rule {t} reject-chain reject",
            f"add chain {t} mark-for-masquerade",
            f"add rule {t} mark-for-masquerade meta mark set meta mark | {mark:#x}",
            f"add chain {t} masquerading",
            f"add rule {t} masquerading ct status dnat {ip} saddr . {ip} daddr @hairpin "
            "masquerade fully-random",
            f"add rule {t} masquerading meta mark & {mark:#x} == 0 return",
            f"add rule {t} masquerading meta mark set meta mark ^ {mark:#x}",
            f"add rule {t} masquerading masquerade fully-random",
            f"add chain {t} services",
        ]
        svc = f"add rule {t} services"
        if self.config.masquerade_all:
            lines.append(f"{svc} {key} @cluster-ips jump mark-for-masquerade")
        elif detect.active(family):
            lines.append(f"{svc} {key} @cluster-ips {detect.nft_not_local(family)} "
                         "jump mark-for-masquerade")
        lines.append(f"{svc} {key} @external-masq jump mark-for-masquerade")
        if detect.active(family):
            lines.append(f"{svc} {detect.nft_local(family)} {key} vmap @local-shortcut")
        lines += [
            f"{svc} fib saddr type local {key} @local-policy jump mark-for-masquerade",
            f"{svc} fib saddr type local {key} vmap @local-shortcut",
            f"{svc} {key} vmap @service-ips",
            f"add chain {t} filter-checks",
            f"add rule {t} filter-checks {key} @firewall-ips {key} . {ip} saddr != "
            "@firewall-allow drop",
            f"add rule {t} filter-checks {key} vmap @no-endpoints",
        ]
        for hook, prio in (("prerouting", "-110"), ("output", "-110")):
            lines += [
                f"add chain {t} filter-{hook} {{ type filter hook {hook} priority {prio} ; }}",
                f"add rule {t} filter-{hook} ct state new jump filter-checks",
            ]
        for hook, prio in (("prerouting", "-100"), ("output", "-100")):
            lines += [
                f"add chain {t} nat-{hook} {{ type nat hook {hook} priority {prio} ; }}",
                f"add rule {t} nat-{hook} jump services",
            ]
        lines += [
            f"add chain {t} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}",
            f"add rule {t} nat-postrouting jump masquerading",
        ]
        return lines

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
        backends = r.elements.setdefault("backends", {})
        for i, b in enumerate(endpoints, offset):
            backends[f"{key} . {i}"] = f"{b.ip} . {b.port}"
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
        if base in r.chains:
            return base
        proto = sp.protocol.lower()
        rules: list[str] = []
        targets: list[str] = []
        for b in endpoints:
            ep = f"{base}-{short_hash(str(b), length=8)}"
            r.sets[ep] = (f"{{ type {addr} ; flags dynamic,timeout ; "
                          f"timeout {sp.affinity_timeout}s ; }}")
            dest = f"[{b.ip}]:{b.port}" if sp.family == 6 else f"{b.ip}:{b.port}"
            r.chains[ep] = (
                f"update @{ep} {{ {ip} saddr }} meta l4proto {proto} dnat {ip} to {dest}",
            )
            rules.append(f"{ip} saddr @{ep} goto {ep}")
            targets.append(ep)
        vmap = ", ".join(f"{i} : goto {t}" for i, t in enumerate(targets))
        rules.append(f"numgen random mod {len(targets)} vmap {{ {vmap} }}")
        r.chains[base] = tuple(rules)
        return base


def _add_elements(family: Family, name: str, texts: list[str]) -> list[str]:
    """``add element`` lines for element texts, ``ELEMENT_BATCH`` per line."""
    fam = nft_family(family)
    return [f"add element {fam} {TABLE} {name} {{ {', '.join(texts[i : i + ELEMENT_BATCH])} }}\n"
            for i in range(0, len(texts), ELEMENT_BATCH)]


def _hairpin_key(ip: str) -> str:
    return f"{ip} . {ip}"


def _element_lines(op: str, fam: str, name: str, elems: Mapping[str, str],
                   batch: int = ELEMENT_BATCH, *, newline: bool = False) -> list[str]:
    if op == "add" and any(elems.values()):
        items = [f"{k} : {v}" if v else k for k, v in elems.items()]
    else:
        items = list(elems)
    end = "\n" if newline else ""
    return [
        f"{op} element {fam} {TABLE} {name} {{ {', '.join(chunk)} }}{end}"
        for chunk in _chunks(items, batch)
    ]


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
