"""The contract between the sync loop and a rule backend (nftables, iptables, IPVS).

Everything the proxier, the daemon, the drift check and ``proxy check`` call on a backend is
here, typed; nothing is found by ``getattr``/``hasattr`` or chosen by comparing ``name``.
Backends render the shared desired state (``state.py``) and never import one another
(``tests/test_proxy_backend.py`` checks both).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from svcnet.proxy.state import Changes, Family, ServicePortState


class ProxyBackend(Protocol):
    name: str  # for logs and reports only

    def sync(self, changes: Changes, *, full: bool) -> None:
        """Apply one drain's changes (``full``: rebuild everything from ``changes.state``)."""
        ...

    def sync_full(self, ports: Iterable[ServicePortState]) -> None:
        """A full sync from every service port; ``ports`` may still be being computed, so a
        backend that can stream its transaction consumes them as they come."""
        ...

    def healthy(self) -> bool:
        """Our rules are still in the kernel (the periodic check; False: full sync)."""
        ...

    def cleanup(self) -> None:
        ...

    def set_node_addresses(self, addresses: Mapping[Family, tuple[str, ...]]) -> None:
        """The node's NodePort addresses per family, refreshed by the daemon."""
        ...

    def rules_total(self) -> Mapping[str, int]:
        """Rules (or virtual servers) per table after the last sync, for metrics."""
        ...

    def kernel_items(self) -> frozenset[str] | None:
        """Our kernel objects now, normalised one per line (drift check, ``proxy check``);
        None when the backend is not covered."""
        ...

    def record_failure(self, *, full: bool) -> None:
        """Count a failed sync in the backend's own failure metric."""
        ...
