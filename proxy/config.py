"""Backend settings shared by the renderers (nftables, iptables, IPVS): detect-local, masquerade."""

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

    ``cidrs`` for ClusterCIDR/NodeCIDR (any number per family), ``interface`` for
    InterfaceNamePrefix (a prefix such as ``veth``) or BridgeInterface (a bridge name).
    An empty mode detects nothing: ClusterIP traffic is not masqueraded (kube-proxy's no-op).

    The one place that knows how each backend spells "from a local pod" and its negation,
    as kube-proxy's LocalTrafficDetector: a backend never reads the mode itself. A source is
    local if it is in *any* of the family's CIDRs, so "not local" must exclude all of them
    at once: one nft set match, and in iptables (one ``-s`` per rule) a chain that returns
    for each CIDR before marking (``iptables_masquerade``).
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

    @property
    def _by_cidr(self) -> bool:
        return self.mode in ("ClusterCIDR", "NodeCIDR")

    # --- nftables: one expression each way ------------------------------------------------

    def nft_local(self, family: Family) -> str:
        if self._by_cidr:
            return f"{_nft_ip(family)} saddr {{ {', '.join(self.cidrs_for(family))} }}"
        return f'iifname "{self._iface("*")}"'

    def nft_not_local(self, family: Family) -> str:
        if self._by_cidr:
            return f"{_nft_ip(family)} saddr != {{ {', '.join(self.cidrs_for(family))} }}"
        return f'iifname != "{self._iface("*")}"'

    # --- iptables (also IPVS's helper rules) ---------------------------------------------

    def iptables_local(self, family: Family) -> tuple[str, ...]:
        """Matches of which any one means "from a local pod": one rule per match."""
        if self._by_cidr:
            return tuple(f"-s {c}" for c in self.cidrs_for(family))
        return (f"-i {self._iface('+')}",)

    def iptables_masquerade(self, rule: str, family: Family, mark_chain: str,
                            not_local_chain: str) -> str:
        """``rule`` (an ``-A CHAIN matches`` prefix, or only the matches) marking non-local
        traffic for masquerade: inline ``! -s``/``! -i`` when one match says it, else a jump to
        ``not_local_chain`` (see ``iptables_not_local_chain``)."""
        local = self.iptables_local(family)
        if len(local) == 1:
            return f"{rule} ! {local[0]} -j {mark_chain}"
        return f"{rule} -j {not_local_chain}"

    def iptables_not_local_chain(self, family: Family, mark_chain: str,
                                 not_local_chain: str) -> list[str]:
        """The rules of ``not_local_chain``: RETURN for each local match, else mark.
        Empty when a single inline match does (the chain is then left empty)."""
        return [f"-A {not_local_chain} {spec}"
                for spec in self.iptables_not_local_specs(family, mark_chain)]

    def iptables_not_local_specs(self, family: Family, mark_chain: str) -> list[str]:
        """The same rules without their ``-A CHAIN``."""
        local = self.iptables_local(family)
        if not self.active(family) or len(local) == 1:
            return []
        return [*(f"{m} -j RETURN" for m in local), f"-j {mark_chain}"]

    def _iface(self, wildcard: str) -> str:
        return self.interface + (wildcard if self.mode == "InterfaceNamePrefix" else "")


def _nft_ip(family: Family) -> str:
    return "ip" if family == 4 else "ip6"


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
