"""Taking a node over from Flannel without cutting its pods off.

Flannel's datapath is what ours renders (same ``flannel.<VNI>`` device, VTEP address,
neighbour, FDB entry and onlink route per peer), except the device's MAC: Flannel's is its
own, ours is derived from the node name. Replacing the device would strand every peer's
neighbour entry for us on the old MAC until each peer re-reads our annotation. So an existing
device with our VNI and port is adopted: its MAC becomes the one we publish and program, the
kernel objects then already match and the first reconcile changes nothing of the datapath.
A device with another VNI or port is re-created (peers converge once they see our lease).

Flannel's lease (``/run/flannel/subnet.env``) is our previous subnet when we have none of
our own, so an etcd subnet manager asks for the same subnet again (the kube manager uses the
Node's podCIDR, the same one). The file itself is left: pods created by a kubelet still
holding Flannel's conflist read it.

Flannel's masquerade and forward chains (``FLANNEL-POSTRTG``, ``FLANNEL-FWD``; nftables
tables ``flannel-ipv4``/``flannel-ipv6``) match ours but nobody updates them any more: they
are removed after our first reconcile has put our own chains in.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from svcnet.cni.overlay.desired import VxlanLink, device_name
from svcnet.cni.overlay.netlink import Netlink, run

from svcnet.leftovers import removal_script

log = logging.getLogger(__name__)

FLANNEL_SUBNET_FILE = "/run/flannel/subnet.env"
CHAINS = frozenset({"FLANNEL-POSTRTG", "FLANNEL-FWD"})
NFT_TABLES = (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6"))
SAVE_TOOLS = tuple(f"{base}-{kind}" for base in ("iptables", "ip6tables")
                   for kind in ("nft", "legacy"))


async def adoptable_macs(netlink: Netlink, vni: int, port: int,
                         families: tuple[int, ...]) -> dict[int, str]:
    """Per family, the MAC of an existing VXLAN device we can adopt (same VNI and port)."""
    names = {family: device_name(family, vni) for family in families}
    observed = await netlink.observe(frozenset(names.values()))
    found: dict[int, str] = {}
    for family, name in names.items():
        for link in observed.objects.links:
            if (isinstance(link, VxlanLink) and link.name == name and link.vni == vni
                    and link.port == port and link.mac):
                found[family] = link.mac
    return found


def flannel_subnet_file(path: str) -> Path | None:
    return Path(path) if path and Path(path).is_file() else None


async def remove_flannel_rules(netns: str | None) -> tuple[list[str], list[str]]:
    """Flannel's iptables chains (and jumps to them) of every variant and its nftables
    tables; what was removed and the errors, as text."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    removed: list[str] = []
    errors: list[str] = []
    for tool in SAVE_TOOLS:
        try:
            code, out, _ = await run([*prefix, f"{tool}-save"])
        except OSError:
            continue
        if code != 0:
            continue
        script, gone = removal_script(out.decode(), lambda _t, chain: chain in CHAINS)
        if not script:
            continue
        code, _, err = await run([*prefix, f"{tool}-restore", "-w", "5", "--noflush"],
                                 input=script.encode())
        if code != 0:
            errors.append(f"{tool}-restore: {err.decode().strip()[:500]}")
            continue
        removed += [f"{tool} {line}" for line in gone]
    try:
        code, out, _ = await run([*prefix, "nft", "list", "tables"])
    except OSError:
        return removed, errors
    tables = set(out.decode().split("\n")) if code == 0 else set()
    for family, name in NFT_TABLES:
        if f"table {family} {name}" not in tables:
            continue
        code, _, err = await run([*prefix, "nft", "delete", "table", family, name])
        if code != 0:
            errors.append(f"nft: {err.decode().strip()[:500]}")
        else:
            removed.append(f"nft table {family} {name}")
    return removed, errors


async def after_first_sync(ready: asyncio.Event, netns: str | None) -> None:
    """Once our datapath and chains are in, drop Flannel's rules."""
    await ready.wait()
    try:
        removed, errors = await remove_flannel_rules(netns)
    except Exception:  # a surprise here must not go unseen in a task nobody awaits
        log.exception("removing Flannel's leftovers failed")
        return
    if removed:
        log.info("removed Flannel's leftover rules: %s", "; ".join(removed))
    for err in errors:
        log.warning("could not remove Flannel's rules: %s", err)
