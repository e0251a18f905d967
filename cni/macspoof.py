"""``macspoofchk``: frames entering the bridge from a pod port must carry the pod's MAC.

Like masquerade, one nftables table (``bridge svcnet-cni``) with per-network sets: the ports
checked, and the allowed ``port . MAC`` pairs; an attachment is one element in each, so
ADD/DEL are one small ``nft -f`` each and DEL needs only the (derived) host port name.
"""

from __future__ import annotations

from .fastjson import loads
from .masq import apply, network_tag
from .spawn import run

__all__ = ["add_script", "apply", "delete_script", "stale_script"]

TABLE = "svcnet-cni"


def _header(tag: str) -> list[str]:
    return [f"add table bridge {TABLE}",
            f"add set bridge {TABLE} ports-{tag} {{ type ifname; }}",
            f"add set bridge {TABLE} allowed-{tag} {{ type ifname . ether_addr; }}"]


def add_script(network: str, port: str, mac: str) -> str:
    tag = network_tag(network)
    lines = [
        *_header(tag),
        f"add chain bridge {TABLE} macspoof-{tag} "
        "{ type filter hook prerouting priority -300; }",
        f"flush chain bridge {TABLE} macspoof-{tag}",
        f"add rule bridge {TABLE} macspoof-{tag} iifname @ports-{tag} "
        f"iifname . ether saddr != @allowed-{tag} drop",
        f'add element bridge {TABLE} allowed-{tag} {{ "{port}" . {mac} }}',
        f'add element bridge {TABLE} ports-{tag} {{ "{port}" }}',
    ]
    return "\n".join(lines) + "\n"


def delete_script(network: str, port: str, mac: str | None) -> str:
    """Idempotent removal (add-then-delete); without the MAC only the port check goes, which
    already stops the rule from matching that port."""
    tag = network_tag(network)
    lines = [*_header(tag), f'add element bridge {TABLE} ports-{tag} {{ "{port}" }}',
                            f'delete element bridge {TABLE} ports-{tag} {{ "{port}" }}']
    if mac:
        lines += [f'add element bridge {TABLE} allowed-{tag} {{ "{port}" . {mac} }}',
                  f'delete element bridge {TABLE} allowed-{tag} {{ "{port}" . {mac} }}']
    return "\n".join(lines) + "\n"


def _elements(tag: str, set_name: str) -> list[object]:
    rc, out, _err = run(["nft", "-j", "list", "set", "bridge", TABLE, f"{set_name}-{tag}"])
    if rc:
        return []
    found: list[object] = []
    for item in loads(out).get("nftables", []):
        for elem in (item.get("set") or {}).get("elem", []) or []:
            if isinstance(elem, dict) and "elem" in elem:  # an element with a comment
                elem = elem["elem"].get("val")
            found.append(elem)
    return found


def stale_script(network: str, keep_ports: set[str]) -> str:
    """GC: remove every port and port/MAC pair whose port is not in ``keep_ports``."""
    tag = network_tag(network)
    lines = []
    for port in _elements(tag, "ports"):
        if isinstance(port, str) and port not in keep_ports:
            lines.append(f'delete element bridge {TABLE} ports-{tag} {{ "{port}" }}')
    for pair in _elements(tag, "allowed"):
        concat = pair.get("concat") if isinstance(pair, dict) else None
        if isinstance(concat, list) and len(concat) == 2 and concat[0] not in keep_ports:
            lines.append(f'delete element bridge {TABLE} allowed-{tag} '
                         f'{{ "{concat[0]}" . {concat[1]} }}')
    return "\n".join(lines) + "\n" if lines else ""
