"""Backend settings shared by the iptables and nftables renderers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from svcnet.proxy.state import Family

DetectLocalMode = Literal["", "ClusterCIDR", "NodeCIDR", "InterfaceNamePrefix", "BridgeInterface"]

MASQUERADE_BIT = 14


@dataclass(frozen=True, slots=True)
class LocalDetector:
    """How to tell traffic from this node's pods (kube-proxy's --detect-local-mode).

    ``cidrs`` for ClusterCIDR/NodeCIDR (per family), ``interface`` for
    InterfaceNamePrefix (a prefix such as ``veth``) or BridgeInterface (a bridge name).
    An empty mode detects nothing: ClusterIP traffic is not masqueraded (kube-proxy's no-op).
    """

    mode: DetectLocalMode = ""
    cidrs: tuple[str, ...] = ()
    interface: str = ""

    def cidrs_for(self, family: Family) -> tuple[str, ...]:
        return tuple(c for c in self.cidrs if (":" in c) == (family == 6))

    def active(self, family: Family) -> bool:
        if self.mode in ("ClusterCIDR", "NodeCIDR"):
            return bool(self.cidrs_for(family))
        return self.mode in ("InterfaceNamePrefix", "BridgeInterface") and bool(self.interface)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    families: tuple[Family, ...] = (4,)
    detect_local: LocalDetector = LocalDetector()
    masquerade_all: bool = False
    masquerade_bit: int = MASQUERADE_BIT

    @property
    def masq_mark(self) -> int:
        return 1 << self.masquerade_bit


def short_hash(*parts: str, length: int = 16) -> str:
    """kube-proxy-style stable chain name suffix: base32 of a SHA-256 prefix."""
    import base64

    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return base64.b32encode(digest).decode()[:length]
