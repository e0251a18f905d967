"""The iptables backend's full sync on the nft variant at 10k services (real kernel).

iptables-nft 1.8's ``--noflush`` restore collects every chain a command names into a sorted
linked list, quadratic in the chains of one transaction; a 10k x 10 full sync (110k chains)
did not finish in 25 minutes before the sync started listing the whole table (``-S``) to
make the tool fetch all chains at once. The test bound (``TOOL_LIMIT_S``) is a liveness
limit, not a speed target: with the listing the tool takes ~15 s here, without it hours.
"""

from __future__ import annotations

from collections.abc import Callable

from conftest import ns_sh, require_binary, require_root
from svcnet.proxy.commands import SubprocessCommands
from svcnet.proxy.config import BackendConfig
from svcnet.proxy.iptables import (
    PARTIAL_LISTING_ABOVE,
    WHOLE_TABLE_CACHE,
    IptablesBackend,
    _Current,
)
from svcnet.proxy.state import (
    Backend,
    Change,
    Changes,
    Frontend,
    FrontendKind,
    PortKey,
    ServicePortState,
)

SERVICES = 10_000
ENDPOINTS = 10
TOOL_LIMIT_S = 400.0


def ports(n: int, generation: int = 0) -> list[ServicePortState]:
    out: list[ServicePortState] = []
    for i in range(n):
        eps = tuple(Backend(f"10.{128 + generation + j // 4}.{i // 256 % 256}.{i % 256}",
                            8080 + j % 4) for j in range(ENDPOINTS))
        out.append(ServicePortState(
            key=PortKey("default", f"s{i}", "http", "TCP", 4), port=80,
            frontends=(Frontend(f"10.96.{i // 256 % 256}.{i % 256}", 80,
                                FrontendKind.CLUSTER_IP),),
            cluster_endpoints=eps, has_endpoints=True))
    return out


def test_whole_table_listing_follows_the_builtin_jumps() -> None:
    """In a table that does not exist yet, a listing before an append to a built-in chain
    makes that append fail (ENOENT); after the jumps and before the service chains it
    must be."""
    backend = IptablesBackend(SubprocessCommands(), BackendConfig(), legacy=False)
    lines = "".join(backend._full_lines(4, ports(3), _Current(), {"nat": 0, "filter": 0}))
    lines_list = lines.split("COMMIT")[0].splitlines()  # the nat table's part
    listing = lines_list.index(WHOLE_TABLE_CACHE.strip())
    builtin = [i for i, ln in enumerate(lines_list)
               if ln.startswith(("-A PREROUTING", "-A OUTPUT", "-A POSTROUTING"))]
    service = [i for i, ln in enumerate(lines_list) if "KUBE-SVC-" in ln]
    assert builtin and service
    assert max(builtin) < listing < min(service)
    legacy = IptablesBackend(SubprocessCommands(), BackendConfig(), legacy=True)
    text = "".join(legacy._full_lines(4, ports(3), _Current(), {"nat": 0, "filter": 0}))
    assert WHOLE_TABLE_CACHE.strip() not in text.splitlines()


def moved(before: list[ServicePortState], after: list[ServicePortState]) -> Changes:
    return Changes({a.key: Change(b, a) for b, a in zip(before, after, strict=True)},
                   {a.key: a for a in after})


def test_a_burst_of_changes_lists_the_table_a_few_do_not() -> None:
    nft = IptablesBackend(SubprocessCommands(), BackendConfig(), legacy=False)
    legacy = IptablesBackend(SubprocessCommands(), BackendConfig(), legacy=True)
    # Moving every endpoint of one port writes 31 rules and deletes 10 chains.
    few, many = PARTIAL_LISTING_ABOVE // 100, PARTIAL_LISTING_ABOVE // 10
    listing = WHOLE_TABLE_CACHE.strip()
    for backend, n, expected in ((nft, few, False), (nft, many, True), (legacy, many, False)):
        text = backend.partial_input(moved(ports(n), ports(n, generation=8)), 4,
                                     {"nat": 0, "filter": 0})
        assert (listing in text.splitlines()) is expected, (backend.legacy, n)


def nft_backend(netns: Callable[[str], str]) -> tuple[str, IptablesBackend]:
    """The nft variant's backend driving a fresh namespace."""
    require_root()
    require_binary("iptables-nft-restore", "iptables-nft-save")
    ns = netns("iptscale")
    return ns, IptablesBackend(SubprocessCommands(netns=ns, timeout=TOOL_LIMIT_S),
                               BackendConfig(), legacy=False)


def test_nft_variant_burst_partial_sync(netns: Callable[[str], str]) -> None:
    """Every endpoint of 2000 services moves in one partial sync (listing the table)."""
    ns, backend = nft_backend(netns)
    n = 2000
    before, after = ports(n), ports(n, generation=8)
    backend.sync(moved(before, before), full=True)
    backend.sync(moved(before, after), full=False)
    save = ns_sh(ns, "iptables-nft-save", "-t", "nat", timeout=TOOL_LIMIT_S).stdout
    assert save.count("-j DNAT --to-destination") == n * ENDPOINTS
    assert save.count("-j DNAT --to-destination 10.136.") == n * 4  # endpoints 0-3 of each
    assert "--to-destination 10.128." not in save
    assert len([ln for ln in save.splitlines() if ln.startswith(":KUBE-SEP-")]) == (
        n * ENDPOINTS)


def test_nft_variant_full_sync_of_10k_services(netns: Callable[[str], str]) -> None:
    ns, backend = nft_backend(netns)
    first = ports(SERVICES)
    backend.sync_full(first)  # cold: the nat table does not exist yet
    save = ns_sh(ns, "iptables-nft-save", "-t", "nat", timeout=TOOL_LIMIT_S).stdout
    chains = [ln for ln in save.splitlines() if ln.startswith(":KUBE-SEP-")]
    assert len(chains) == SERVICES * ENDPOINTS
    assert "-A PREROUTING -m comment --comment \"kubernetes service portals\"" in save
    assert save.count("-j DNAT --to-destination") == SERVICES * ENDPOINTS
    # Again with the table present and every endpoint moved: stale chains go, new ones come.
    second = ports(SERVICES, generation=8)
    backend.sync_full(second)
    save = ns_sh(ns, "iptables-nft-save", "-t", "nat", timeout=TOOL_LIMIT_S).stdout
    assert len([ln for ln in save.splitlines() if ln.startswith(":KUBE-SEP-")]) == (
        SERVICES * ENDPOINTS)
    assert "--to-destination 10.136.0.5:8080" in save
    assert "--to-destination 10.128.0.5:8080" not in save
    # `svcnet proxy cleanup` names every chain at once too.
    backend.cleanup()
    save = ns_sh(ns, "iptables-nft-save", timeout=TOOL_LIMIT_S).stdout
    assert "KUBE-" not in save, [ln for ln in save.splitlines() if "KUBE-" in ln][:5]
