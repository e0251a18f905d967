"""Taking over Flannel's pod addresses when ``svcnet cni install`` replaces its conflist.

Flannel's conflist names its network ``cbr0`` and delegates IPAM to host-local, which keeps
one file per address in ``/var/lib/cni/networks/cbr0``. Ours is ``svcnet``: a separate
directory, in which every address of a pod still running from Flannel's days looks free, so
the next pod would get the same address as a running one (both plugins start at the range's
first address). Before our conflist goes in, each of Flannel's reservations is copied into our
directory (same layout: container ID and interface name), under both directories' locks; the
originals stay, so a return to Flannel finds them. A DEL of such a pod, which the runtime now
sends through our conflist, releases our copy.

Flannel's ``10-flannel.conflist`` sorts before ``10-svcnet.conflist`` and runtimes use the
first: once ours is written it is renamed out of the way (``.disabled-by-svcnet``, which no
runtime loads; renaming it back undoes the switch). The reservations are adopted again after
the rename, for a pod Flannel's conflist added between the two steps.
"""

from __future__ import annotations

import ipaddress
import os

from svcnet.cni.ipam import LAST_RESERVED, LOCK_FILE, Store

DISABLED_SUFFIX = ".disabled-by-svcnet"


def adopt_host_local(data_dir: str, source: str, target: str) -> list[str]:
    """Copy the address reservations of network ``source`` into ``target`` (both under
    ``data_dir``); the addresses copied. A missing source directory copies nothing."""
    source_dir = os.path.join(data_dir, source)
    if source == target or not os.path.isdir(source_dir):
        return []
    copied: list[str] = []
    with Store(source_dir) as theirs, Store(os.path.join(data_dir, target)) as ours:
        held = ours.allocations()
        for ip, (container_id, ifname) in sorted(theirs.allocations().items()):
            if ip.startswith(LAST_RESERVED) or ip == LOCK_FILE or ip in held:
                continue
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                continue  # not a reservation (host-local keeps nothing else here)
            if ours.reserve(ip, container_id, ifname):
                copied.append(ip)
    return copied


def disable_conflists(conf_dir: str, names: list[str]) -> list[str]:
    """Rename the conflists ``names`` in ``conf_dir`` that exist; the names renamed."""
    renamed = []
    for name in names:
        path = os.path.join(conf_dir, os.path.basename(name))
        if os.path.isfile(path):
            os.replace(path, path + DISABLED_SUFFIX)
            renamed.append(os.path.basename(name))
    return renamed
