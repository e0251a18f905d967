"""Per-peer neighbour, FDB and route changes straight over rtnetlink, without a process.

A lease change touches three kernel objects per peer; spawning ``ip``/``bridge`` for them
costs ~5-10 ms per process on a loaded machine, which dominated convergence when every node
of a 50-node cluster reacts at once. The messages are small fixed structs, sent on the CNI
plugin's lean socket (``svcnet.cni.rtnl``). For another namespace the socket is opened by a
short-lived helper thread that enters it (``setns`` is per thread), so the event loop's
thread never switches namespace; the socket stays bound to that namespace afterwards.
"""

from __future__ import annotations

import ipaddress
import struct
import threading
from collections.abc import Sequence

from svcnet.cni.overlay.desired import ROUTE_PROTO, FdbEntry, Neighbour, Route
from svcnet.cni.rtnl import (
    AF_BRIDGE,
    AF_INET,
    AF_INET6,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    RTM_DELROUTE,
    RTM_NEWROUTE,
    NetlinkError,
    Rtnl,
    attr,
    attr_u32,
    mac_bytes,
)

RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NLM_F_APPEND = 0x800
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN = 254
RTN_UNICAST, RTN_BLACKHOLE = 1, 6
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTNH_F_ONLINK = 4
_NDMSG = struct.Struct("=BxxxiHBB")
_RTMSG = struct.Struct("=BBBBBBBBI")

PeerObject = Neighbour | FdbEntry | Route


def open_rtnl(netns: str | None) -> Rtnl:
    """A rtnetlink socket in ``netns`` (the current namespace when None)."""
    if netns is None:
        return Rtnl()
    from svcnet.cni.netns import open_netns, setns

    result: list[Rtnl | BaseException] = []

    def enter_and_open() -> None:
        try:
            fd = open_netns(f"/run/netns/{netns}")
            try:
                setns(fd)
            finally:
                import os

                os.close(fd)
            result.append(Rtnl())
        except BaseException as err:  # handed to the caller's thread
            result.append(err)

    helper = threading.Thread(target=enter_and_open, name=f"netns-{netns}")
    helper.start()
    helper.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _ip(text: str) -> tuple[int, bytes]:
    addr = ipaddress.ip_address(text)
    return (AF_INET if addr.version == 4 else AF_INET6), addr.packed


class RtnlWriter:
    """Applies neighbour/FDB/route ops in order; link indexes are looked up once per name."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._rtnl: Rtnl | None = None
        self._index: dict[str, int] = {}

    def close(self) -> None:
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None

    def forget_links(self) -> None:
        """Links were created or deleted: their indexes may have changed."""
        self._index.clear()

    def _sock(self) -> Rtnl:
        if self._rtnl is None:
            self._rtnl = open_rtnl(self.netns)
        return self._rtnl

    def _ifindex(self, name: str) -> int:
        if name not in self._index:
            self._index[name] = self._sock().link(name).index
        return self._index[name]

    def apply(self, ops: Sequence[tuple[str, PeerObject]]) -> list[str]:
        errors: list[str] = []
        for verb, obj in ops:
            try:
                self._one(verb, obj)
            except NetlinkError as err:
                if verb == "del" and err.errno in (2, 3, 19):  # ENOENT, ESRCH, ENODEV
                    continue
                self._index.pop(getattr(obj, "dev", ""), None)
                errors.append(f"{verb} {obj}: {err}")
        return errors

    def _one(self, verb: str, obj: PeerObject) -> None:
        sock = self._sock()
        if isinstance(obj, Route):
            self._route(sock, verb, obj)
            return
        index = self._ifindex(obj.dev)
        if isinstance(obj, Neighbour):
            family, dst = _ip(obj.ip)
            body = _NDMSG.pack(family, index, NUD_PERMANENT, 0, 0) + attr(NDA_DST, dst)
            if verb == "add":
                body += attr(NDA_LLADDR, mac_bytes(obj.mac))
                sock.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body,
                             f"neigh {obj.ip}")
            else:
                sock.request(RTM_DELNEIGH, 0, body, f"neigh {obj.ip}")
            return
        if isinstance(obj, FdbEntry):
            _, dst = _ip(obj.dst)
            body = (_NDMSG.pack(AF_BRIDGE, index, NUD_PERMANENT, NTF_SELF, 0)
                    + attr(NDA_LLADDR, mac_bytes(obj.mac)) + attr(NDA_DST, dst))
            if verb == "add":
                sock.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND, body,
                             f"fdb {obj.mac}")
            else:
                sock.request(RTM_DELNEIGH, 0, body, f"fdb {obj.mac}")

    def _route(self, sock: Rtnl, verb: str, obj: Route) -> None:
        net = ipaddress.ip_network(obj.dst)
        family = AF_INET if net.version == 4 else AF_INET6
        if obj.blackhole:  # no device, no gateway: the kernel drops what matches
            body = (_RTMSG.pack(family, net.prefixlen, 0, 0, RT_TABLE_MAIN, ROUTE_PROTO,
                                RT_SCOPE_UNIVERSE, RTN_BLACKHOLE, 0)
                    + attr(RTA_DST, net.network_address.packed))
        else:
            body = _RTMSG.pack(family, net.prefixlen, 0, 0, RT_TABLE_MAIN, ROUTE_PROTO,
                               RT_SCOPE_UNIVERSE if obj.via else RT_SCOPE_LINK, RTN_UNICAST,
                               RTNH_F_ONLINK if obj.onlink else 0)
            body += (attr(RTA_DST, net.network_address.packed)
                     + attr_u32(RTA_OIF, self._ifindex(obj.dev)))
        if obj.via:
            body += attr(RTA_GATEWAY, _ip(obj.via)[1])
        if verb == "add":
            sock.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body, f"route {obj.dst}")
        else:
            sock.request(RTM_DELROUTE, 0, body, f"route {obj.dst}")
