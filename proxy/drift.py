"""Drift check: is the kernel still holding the rules the proxy last applied?

After every successful sync the proxier records a normalised snapshot of the proxy's own
kernel objects (the nftables table, or our chains in ``iptables-save``; each backend parses its
tool's dump, ``kernel_items``); ``GET /status``
compares a fresh dump with it, so hand edits, flushes or another program touching our rules
show up as ``missing``/``extra`` items. Counters, handles and the members of sets that
traffic fills (affinity) are dropped so traffic alone is never drift. IPVS is not covered
(``supported: false``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from svcnet.proxy.backend import ProxyBackend
from svcnet.proxy.iptables import iptables_items
from svcnet.proxy.nft_model import nft_items

__all__ = ["iptables_items", "nft_items", "snapshot", "status"]

def snapshot(backend: ProxyBackend) -> frozenset[str] | None:
    """The backend's kernel objects, normalised; None when the backend is not covered."""
    return backend.kernel_items()


def status(backend: ProxyBackend, applied: frozenset[str] | None,
           settled: Callable[[], frozenset[str] | None] | None = None) -> dict[str, Any]:
    """The ``/status`` body: ``in_sync`` plus what is missing from / extra in the kernel.

    ``settled``, called after the dump, returns the applied snapshot once any sync that ran
    meanwhile is recorded: each sync is one transaction, so a kernel dumped during it holds
    the rules before or after, and only what both lack or both hold is drift.
    """
    try:
        actual = snapshot(backend)
    except Exception as err:  # a failed dump is reported, never raised into the server
        return {"supported": True, "in_sync": False, "error": str(err), "missing": [],
                "extra": []}
    if actual is None:
        return {"supported": False, "in_sync": None, "missing": [], "extra": []}
    snapshots = [s for s in (applied, settled() if settled else None) if s is not None]
    if not snapshots:
        return {"supported": True, "in_sync": False, "error": "no sync applied yet",
                "missing": [], "extra": []}
    missing = sorted(frozenset.intersection(*snapshots) - actual)
    extra = sorted(actual - frozenset.union(*snapshots))
    return {"supported": True, "in_sync": not missing and not extra,
            "missing": missing, "extra": extra}
