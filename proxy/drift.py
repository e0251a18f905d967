"""Drift check: is the kernel still holding the rules the proxy last applied?

After every successful sync the proxier records a normalised snapshot of the proxy's own
kernel objects (the nftables table, or our chains in ``iptables-save``); ``GET /status``
compares a fresh dump with it, so hand edits, flushes or another program touching our rules
show up as ``missing``/``extra`` items. Counters, handles and the members of sets that
traffic fills (affinity) are dropped so traffic alone is never drift. IPVS is not covered
(``supported: false``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from svcnet.proxy.iptables import CANARY, FILTER_TOP, NAT_TOP, SERVICE_CHAIN_PREFIXES

_VOLATILE = frozenset({"handle", "packets", "bytes", "counter"})
# sets the datapath fills; none we program holds configured elements
_DYNAMIC = frozenset({"dynamic", "timeout"})


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def nft_items(dump: dict[str, Any]) -> set[str]:
    """One line per chain, set/map, element and rule of an ``nft -j list table`` dump."""
    items: set[str] = set()
    for obj in dump.get("nftables", []):
        if "chain" in obj:
            c = obj["chain"]
            items.add(f"{c['family']} chain {c['name']}")
        elif "rule" in obj:
            r = obj["rule"]
            expr = json.dumps(_strip(r.get("expr", [])), sort_keys=True)
            items.add(f"{r['family']} rule {r['chain']} {expr}")
        elif "set" in obj or "map" in obj:
            kind = "set" if "set" in obj else "map"
            s = obj[kind]
            items.add(f"{s['family']} {kind} {s['name']}")
            if _DYNAMIC & set(s.get("flags") or ()):
                continue  # ClientIP affinity entries that traffic adds (``update @set``)
            for elem in s.get("elem", []):
                items.add(f"{s['family']} element {s['name']} "
                          f"{json.dumps(_strip(elem), sort_keys=True)}")
    return items


def _ours(chain: str) -> bool:
    return (chain == CANARY or chain in NAT_TOP or chain in FILTER_TOP
            or chain.startswith(SERVICE_CHAIN_PREFIXES))


def iptables_items(save: str, family: int) -> set[str]:
    """Our chains and rules (and jumps into them) from ``iptables-save`` output."""
    items: set[str] = set()
    table = ""
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if _ours(chain):
                items.add(f"ip{family} {table} chain {chain}")
        elif line.startswith("-A "):
            words = line.split()
            jump = words[words.index("-j") + 1] if "-j" in words[:-1] else ""
            if _ours(words[1]) or _ours(jump):
                items.add(f"ip{family} {table} {line}")
    return items


def snapshot(backend: Any) -> frozenset[str] | None:
    """The backend's kernel objects, normalised; None when the backend is not covered."""
    name = getattr(backend, "name", "")
    families = backend.config.families if hasattr(backend, "config") else ()
    items: set[str] = set()
    if name == "nftables":
        for f in families:
            items |= nft_items(backend.dump(f))
    elif name == "iptables":
        for f in families:
            items |= iptables_items(backend.dump(f), f)
    else:
        return None
    return frozenset(items)


def status(backend: Any, applied: frozenset[str] | None,
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
