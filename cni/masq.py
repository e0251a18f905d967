"""Masquerade of pod traffic leaving the pod network, as one nftables table.

Shape: ``table inet svcnet-cni`` holds, per network, a set of pod addresses per family and one
NAT base chain with one rule per family (``saddr @pods daddr != {pod subnets, multicast}
masquerade``). An attachment is one set element (commented ``<containerID>/<ifname>``), so
ADD and DEL are each a single ``nft -f`` transaction of a few lines whose cost does not
grow with the number of pods, and DEL needs only the addresses (which IPAM still knows when
the netns is gone). Measured against ``iptables-restore --noflush`` with the reference
plugin's per-attachment chain: both ~14 ms per call here; the set form keeps the ruleset
O(networks) instead of O(pods).
"""

from __future__ import annotations

from .addr import Prefix
from .fastjson import loads
from .ipam import short_hash
from .spawn import SpawnError, run
from .spec import ERR_INTERNAL, ERR_IO, CniError

TABLE = "svcnet-cni"
_MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_MATCH = {4: "ip", 6: "ip6"}
MAX_COMMENT = 128  # nft's limit on a comment


def network_tag(network: str) -> str:
    return short_hash(network, 10)


def _header(tag: str) -> list[str]:
    return [f"add table inet {TABLE}",
            f"add set inet {TABLE} pods4-{tag} {{ type ipv4_addr; }}",
            f"add set inet {TABLE} pods6-{tag} {{ type ipv6_addr; }}"]


def _outermost(subnets: list[Prefix]) -> list[Prefix]:
    unique = sorted({s.masked() for s in subnets}, key=lambda p: p.length)
    out: list[Prefix] = []
    for s in unique:
        if not any(o.contains(s.version, s.network) for o in out):
            out.append(s)
    return out


def add_script(network: str, subnets: list[Prefix], ips: list[tuple[int, str]],
               owner: str) -> str:
    """(Re)declare the network's chain and rules, and add this attachment's addresses."""
    tag = network_tag(network)
    lines = _header(tag)
    lines.append(f"add chain inet {TABLE} masq-{tag} "
                 "{ type nat hook postrouting priority srcnat; }")
    lines.append(f"flush chain inet {TABLE} masq-{tag}")
    for version in (4, 6):
        nets = [str(s) for s in _outermost([s for s in subnets if s.version == version])]
        if not nets:
            continue
        nets.append(_MULTICAST[version])
        m = _MATCH[version]
        lines.append(f"add rule inet {TABLE} masq-{tag} {m} saddr @pods{version}-{tag} "
                     f"{m} daddr != {{ {', '.join(nets)} }} masquerade")
    owner = owner[:MAX_COMMENT]  # a note for people; nft refuses longer comments
    for version, ip in ips:
        lines.append(f'add element inet {TABLE} pods{version}-{tag} {{ {ip} comment "{owner}" }}')
    return "\n".join(lines) + "\n"


def delete_script(network: str, ips: list[tuple[int, str]]) -> str:
    """Remove addresses idempotently: add-then-delete never fails on a missing element."""
    tag = network_tag(network)
    lines = _header(tag)
    for version, ip in ips:
        lines.append(f"add element inet {TABLE} pods{version}-{tag} {{ {ip} }}")
        lines.append(f"delete element inet {TABLE} pods{version}-{tag} {{ {ip} }}")
    return "\n".join(lines) + "\n"


def apply(script: str) -> None:
    try:
        rc, _out, err = run(["nft", "-f", "-"], script.encode())
    except SpawnError as exc:
        raise CniError(ERR_INTERNAL, f"masquerade: {exc.strerror}",
                       "is the nftables package installed?") from None
    if rc:
        text = err.decode(errors="replace").strip()
        code = ERR_IO if "Operation not permitted" in text else ERR_INTERNAL
        raise CniError(code, "masquerade rules: nft failed", text)


def members(network: str) -> dict[str, str]:
    """Current set members of the network: address -> owner comment ('' if none)."""
    tag = network_tag(network)
    out: dict[str, str] = {}
    for version in (4, 6):
        rc, text, _err = run(["nft", "-j", "list", "set", "inet", TABLE, f"pods{version}-{tag}"])
        if rc:
            continue
        for item in loads(text).get("nftables", []):
            for elem in (item.get("set") or {}).get("elem", []) or []:
                if isinstance(elem, dict) and "elem" in elem:
                    out[str(elem["elem"].get("val"))] = str(elem["elem"].get("comment", ""))
                else:
                    out[str(elem)] = ""
    return out
