"""A lean rtnetlink adapter: one raw ``AF_NETLINK`` socket, ``struct``, and only the messages
the plugin sends.

pyroute2 costs ~480 ms to import; the plugin's whole budget is ~36 ms. The messages needed
(links, addresses, routes, bridge VLANs) are a few fixed C structs followed by TLV
attributes, so they are built here directly. Errors are values callers can test:
:class:`LinkNotFound` (DEL treats it as "already gone") and :class:`AlreadyExists`.

A netlink socket stays bound to the network namespace it was created in, so talking to a
pod's namespace means creating a :class:`Rtnl` while inside it (see ``netns.py``); no call
here ever switches namespaces.
"""

from __future__ import annotations

import _socket
import struct

from .addr import Prefix, format_ip, packed, parse_ip

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Protocol

    class RtnlApi(Protocol):
        """What the plugin needs from rtnetlink; :class:`Rtnl` is the real implementation,
        ``tests/test_cni_fake.py`` has an in-memory one checked against this Protocol."""

        def __enter__(self) -> RtnlApi: ...
        def __exit__(self, *exc: object) -> None: ...
        def close(self) -> None: ...
        def link(self, name: str = "", index: int = 0) -> Link: ...
        def links(self) -> list[Link]: ...
        def add_bridge(self, name: str, mtu: int = 0, vlan_filtering: bool = False,
                       mac: str = "") -> None: ...
        def add_veth(self, name: str, mac: str, peer_name: str, peer_mac: str,
                     peer_netns_fd: int, mtu: int, master: int) -> None: ...
        def set_link(self, index: int, *, up: bool | None = None,
                     promisc: bool | None = None, mtu: int = 0,
                     alias: str | None = None, mac: str = "") -> None: ...
        def set_hairpin(self, index: int, on: bool) -> None: ...
        def bridge_vlan(self, index: int, vid: int, *, add: bool, pvid: bool = False,
                        untagged: bool = False, self_: bool = False) -> None: ...
        def delete_link(self, name: str = "", index: int = 0) -> None: ...
        def addresses(self, index: int = 0, version: int = 0) -> list[tuple[int, Prefix]]: ...
        def add_address(self, index: int, prefix: Prefix, *, nodad: bool = False) -> None: ...
        def delete_address(self, index: int, prefix: Prefix) -> None: ...
        def add_route(self, dst: Prefix, *, gateway: str = "", oif: int = 0,
                      priority: int = 0, table: int = 0, scope: int | None = None,
                      mtu: int = 0, advmss: int = 0) -> None: ...
        def routes(self, version: int) -> Iterable[Route]: ...

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_AF_SPEC, IFLA_NET_NS_FD = 18, 20, 26, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
VETH_INFO_PEER = 1
IFLA_BR_VLAN_FILTERING = 7
IFLA_BRPORT_MODE = 4
IFLA_BRIDGE_FLAGS, IFLA_BRIDGE_VLAN_INFO = 0, 2
BRIDGE_FLAGS_SELF = 2
BRIDGE_VLAN_INFO_PVID, BRIDGE_VLAN_INFO_UNTAGGED = 2, 4

IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST, IFA_FLAGS = 1, 2, 4, 8
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_METRICS, RTA_TABLE = 1, 4, 5, 6, 8, 15
RTAX_MTU, RTAX_ADVMSS = 2, 8
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
RTN_UNICAST = 1

AF_UNSPEC, AF_INET, AF_BRIDGE, AF_INET6 = 0, 2, 7, 10
IFF_UP, IFF_PROMISC = 0x1, 0x100
ENODEV, ENOENT, EEXIST, ESRCH = 19, 2, 17, 3

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_U32 = struct.Struct("=I")
_VLAN_INFO = struct.Struct("=HH")
_FAMILY = {4: AF_INET, 6: AF_INET6}


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` is set, the text includes the extended ack."""


class LinkNotFound(NetlinkError):
    """No such link (ENODEV): for DEL this means the work is already done."""


class AlreadyExists(NetlinkError):
    """EEXIST: a link, address or route of that name/key is already there."""


def _error(errno: int, what: str, ext: str) -> NetlinkError:
    text = f"{what}: {_socket_strerror(errno)}" + (f" ({ext})" if ext else "")
    cls = LinkNotFound if errno == ENODEV else AlreadyExists if errno == EEXIST else NetlinkError
    return cls(errno, text)


def _socket_strerror(errno: int) -> str:
    import posix

    return posix.strerror(errno)


def attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def attr_str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    end = len(data)
    while offset + 4 <= end:
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return attrs


def _cstr(value: bytes | None) -> str:
    return value.split(b"\0", 1)[0].decode() if value else ""


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class Link:
    """What the plugin needs to know about a network interface."""

    __slots__ = ("alias", "flags", "index", "kind", "mac", "master", "mtu", "name")

    def __init__(self, index: int, name: str, kind: str, mac: str, mtu: int, master: int,
                 flags: int, alias: str) -> None:
        self.index = index
        self.name = name
        self.kind = kind
        self.mac = mac
        self.mtu = mtu
        self.master = master
        self.flags = flags
        self.alias = alias

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    def __repr__(self) -> str:
        return f"Link({self.index}, {self.name!r}, kind={self.kind!r}, master={self.master})"


class Route:
    """A route as read back from the kernel (main table unless ``table`` says otherwise)."""

    __slots__ = ("dst", "gateway", "oif", "priority", "scope", "table")

    def __init__(self, dst: Prefix, gateway: str, oif: int, priority: int, table: int,
                 scope: int) -> None:
        self.dst = dst
        self.gateway = gateway
        self.oif = oif
        self.priority = priority
        self.table = table
        self.scope = scope

    def __repr__(self) -> str:
        return f"Route({self.dst} via {self.gateway or '-'} oif {self.oif})"


def _parse_link(body: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
    attrs = parse_attrs(body, _IFINFOMSG.size)
    kind = ""
    if IFLA_LINKINFO in attrs:
        kind = _cstr(parse_attrs(attrs[IFLA_LINKINFO]).get(IFLA_INFO_KIND))
    mtu = _U32.unpack(attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0
    master = _U32.unpack(attrs[IFLA_MASTER])[0] if IFLA_MASTER in attrs else 0
    mac = mac_text(attrs[IFLA_ADDRESS]) if IFLA_ADDRESS in attrs else ""
    return Link(index, _cstr(attrs.get(IFLA_IFNAME)), kind, mac, mtu, master, flags,
                _cstr(attrs.get(IFLA_IFALIAS)))


class Rtnl:
    """One NETLINK_ROUTE socket in the namespace current at construction time."""

    def __init__(self) -> None:
        self._sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------

    def request(self, msg_type: int, flags: int, body: bytes, what: str) -> list[bytes]:
        """Send one request; return the bodies of the replies (dumps) or [] for an ACK."""
        self._seq += 1
        seq = self._seq
        flags |= NLM_F_REQUEST | (0 if flags & NLM_F_DUMP == NLM_F_DUMP else NLM_F_ACK)
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0)
                        + body)
        replies: list[bytes] = []
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, rtype, rflags, rseq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(0, f"{what}: malformed netlink reply")
                body_start = offset + _NLMSGHDR.size
                msg = data[body_start:offset + length]
                offset += (length + 3) & ~3
                if rseq != seq:
                    continue
                if rtype == NLMSG_DONE:
                    return replies
                if rtype == NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", msg)[0]
                    if errno == 0:
                        return replies
                    ext = ""
                    if rflags & NLM_F_ACK_TLVS:
                        tlvs = parse_attrs(msg, 4 + _NLMSGHDR.size)
                        ext = _cstr(tlvs.get(NLMSGERR_ATTR_MSG))
                    raise _error(errno, what, ext)
                replies.append(msg)
                if not rflags & NLM_F_MULTI:
                    return replies

    # -- links ---------------------------------------------------------------------------

    def link(self, name: str = "", index: int = 0) -> Link:
        """One link by name or index; raises LinkNotFound."""
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0)
        if name:
            body += attr_str(IFLA_IFNAME, name)
        try:
            reply = self.request(RTM_GETLINK, 0, body, f"get link {name or index}")
        except NetlinkError as err:
            if err.errno in (ENODEV, ENOENT):
                raise LinkNotFound(ENODEV, f"link {name or index} not found") from None
            raise
        return _parse_link(reply[0])

    def links(self) -> list[Link]:
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0)
        return [_parse_link(m) for m in self.request(RTM_GETLINK, NLM_F_DUMP, body,
                                                       "list links")]

    def add_bridge(self, name: str, mtu: int = 0, vlan_filtering: bool = False,
                   mac: str = "") -> None:
        """Create a bridge; raises AlreadyExists when a link of that name exists. A ``mac``
        given here is pinned (the kernel marks it as set by the user), so the bridge never
        takes over the lowest port MAC."""
        data = attr(IFLA_BR_VLAN_FILTERING, b"\1") if vlan_filtering else b""
        info = attr_str(IFLA_INFO_KIND, "bridge") + (attr(IFLA_INFO_DATA, data) if data else b"")
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, IFF_UP, IFF_UP) + attr_str(IFLA_IFNAME, name)
        if mac:
            body += attr(IFLA_ADDRESS, mac_bytes(mac))
        if mtu:
            body += attr_u32(IFLA_MTU, mtu)
        body += attr(IFLA_LINKINFO, info)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"create bridge {name}")

    def add_veth(self, name: str, mac: str, peer_name: str, peer_mac: str, peer_netns_fd: int,
                 mtu: int, master: int) -> None:
        """Create a veth pair in one message: this end up and enslaved to ``master``, the peer
        named ``peer_name`` directly inside the namespace ``peer_netns_fd`` (so it never
        exists under a temporary name a crash could leak)."""
        peer = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, peer_name)
        peer += attr(IFLA_ADDRESS, mac_bytes(peer_mac)) + attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
        if mtu:
            peer += attr_u32(IFLA_MTU, mtu)
        info = attr_str(IFLA_INFO_KIND, "veth") + attr(IFLA_INFO_DATA,
                                                       attr(VETH_INFO_PEER, peer))
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, IFF_UP, IFF_UP) + attr_str(IFLA_IFNAME, name)
        body += attr(IFLA_ADDRESS, mac_bytes(mac))
        if mtu:
            body += attr_u32(IFLA_MTU, mtu)
        if master:
            body += attr_u32(IFLA_MASTER, master)
        body += attr(IFLA_LINKINFO, info)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"create veth {name}")

    def set_link(self, index: int, *, up: bool | None = None, promisc: bool | None = None,
                 mtu: int = 0, alias: str | None = None, mac: str = "") -> None:
        flags = change = 0
        if up is not None:
            change |= IFF_UP
            flags |= IFF_UP if up else 0
        if promisc is not None:
            change |= IFF_PROMISC
            flags |= IFF_PROMISC if promisc else 0
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, index, flags, change)
        if mtu:
            body += attr_u32(IFLA_MTU, mtu)
        if alias is not None:
            body += attr_str(IFLA_IFALIAS, alias)
        if mac:
            body += attr(IFLA_ADDRESS, mac_bytes(mac))
        self.request(RTM_NEWLINK, 0, body, f"set link {index}")

    def set_hairpin(self, index: int, on: bool) -> None:
        slave = attr(IFLA_BRPORT_MODE, b"\1" if on else b"\0")
        info = attr_str(IFLA_INFO_SLAVE_KIND, "bridge") + attr(IFLA_INFO_SLAVE_DATA, slave)
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0) + attr(IFLA_LINKINFO, info)
        self.request(RTM_NEWLINK, 0, body, f"set hairpin on link {index}")

    def bridge_vlan(self, index: int, vid: int, *, add: bool, pvid: bool = False,
                    untagged: bool = False, self_: bool = False) -> None:
        """Add/remove a VLAN on a bridge port (or on the bridge itself with ``self_``)."""
        flags = (BRIDGE_VLAN_INFO_PVID if pvid else 0) | (BRIDGE_VLAN_INFO_UNTAGGED
                                                          if untagged else 0)
        spec = attr(IFLA_BRIDGE_VLAN_INFO, _VLAN_INFO.pack(flags, vid))
        if self_:
            spec = attr(IFLA_BRIDGE_FLAGS, struct.pack("=H", BRIDGE_FLAGS_SELF)) + spec
        body = _IFINFOMSG.pack(AF_BRIDGE, 0, index, 0, 0) + attr(IFLA_AF_SPEC, spec)
        self.request(RTM_SETLINK if add else RTM_DELLINK, 0, body,
                     f"{'add' if add else 'delete'} vlan {vid} on link {index}")

    def delete_link(self, name: str = "", index: int = 0) -> None:
        """Delete a link; raises LinkNotFound when it is already gone."""
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0)
        if name:
            body += attr_str(IFLA_IFNAME, name)
        try:
            self.request(RTM_DELLINK, 0, body, f"delete link {name or index}")
        except NetlinkError as err:
            if err.errno in (ENODEV, ENOENT):
                raise LinkNotFound(ENODEV, f"link {name or index} not found") from None
            raise

    # -- addresses -----------------------------------------------------------------------

    def addresses(self, index: int = 0, version: int = 0) -> list[tuple[int, Prefix]]:
        """(ifindex, address/prefixlen) pairs, optionally of one link and one family."""
        family = _FAMILY.get(version, AF_UNSPEC)
        out = []
        for msg in self.request(RTM_GETADDR, NLM_F_DUMP, _IFADDRMSG.pack(family, 0, 0, 0, 0),
                                "list addresses"):
            fam, plen, _flags, _scope, ifindex = _IFADDRMSG.unpack_from(msg)
            if index and ifindex != index:
                continue
            attrs = parse_attrs(msg, _IFADDRMSG.size)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is None:
                continue
            ver = 4 if fam == AF_INET else 6
            out.append((ifindex, Prefix(ver, int.from_bytes(raw, "big"), plen)))
        return out

    def add_address(self, index: int, prefix: Prefix, *, nodad: bool = False) -> None:
        """Add an address; raises AlreadyExists when it is already configured."""
        raw = packed(prefix.version, prefix.address)
        body = _IFADDRMSG.pack(_FAMILY[prefix.version], prefix.length, 0, RT_SCOPE_UNIVERSE,
                               index)
        body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
        if prefix.version == 4 and prefix.length < 31:
            body += attr(IFA_BROADCAST, packed(4, prefix.broadcast))
        if nodad:
            body += attr_u32(IFA_FLAGS, IFA_F_NODAD)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body,
                     f"add address {prefix} to link {index}")

    def delete_address(self, index: int, prefix: Prefix) -> None:
        raw = packed(prefix.version, prefix.address)
        body = _IFADDRMSG.pack(_FAMILY[prefix.version], prefix.length, 0, 0, index)
        body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
        self.request(RTM_DELADDR, 0, body, f"delete address {prefix} from link {index}")

    # -- routes --------------------------------------------------------------------------

    def add_route(self, dst: Prefix, *, gateway: str = "", oif: int = 0, priority: int = 0,
                  table: int = 0, scope: int | None = None, mtu: int = 0,
                  advmss: int = 0) -> None:
        """Add a route; raises AlreadyExists when the same route is present."""
        if scope is None:
            scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
        table_id = table or RT_TABLE_MAIN
        body = _RTMSG.pack(_FAMILY[dst.version], dst.length, 0, 0,
                           table_id if table_id < 256 else 0, RTPROT_BOOT, scope,
                           RTN_UNICAST, 0)
        body += attr(RTA_DST, packed(dst.version, dst.network))
        if table_id >= 256:
            body += attr_u32(RTA_TABLE, table_id)
        if gateway:
            gw_version, gw = parse_ip(gateway)
            body += attr(RTA_GATEWAY, packed(gw_version, gw))
        if oif:
            body += attr_u32(RTA_OIF, oif)
        if priority:
            body += attr_u32(RTA_PRIORITY, priority)
        metrics = (attr_u32(RTAX_MTU, mtu) if mtu else b"") + (
            attr_u32(RTAX_ADVMSS, advmss) if advmss else b"")
        if metrics:
            body += attr(RTA_METRICS, metrics)
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body,
                     f"add route {dst.masked()} via {gateway or 'link'}")

    def routes(self, version: int) -> Iterator[Route]:
        body = _RTMSG.pack(_FAMILY[version], 0, 0, 0, 0, 0, 0, 0, 0)
        for msg in self.request(RTM_GETROUTE, NLM_F_DUMP, body, "list routes"):
            _fam, dst_len, _sl, _tos, table, _proto, scope, rtype, _fl = _RTMSG.unpack_from(msg)
            if rtype != RTN_UNICAST:
                continue
            attrs = parse_attrs(msg, _RTMSG.size)
            if RTA_TABLE in attrs:
                table = _U32.unpack(attrs[RTA_TABLE])[0]
            raw_dst = attrs.get(RTA_DST)
            dst = Prefix(version, int.from_bytes(raw_dst, "big") if raw_dst else 0, dst_len)
            raw_gw = attrs.get(RTA_GATEWAY)
            gateway = format_ip(version, int.from_bytes(raw_gw, "big")) if raw_gw else ""
            oif = _U32.unpack(attrs[RTA_OIF])[0] if RTA_OIF in attrs else 0
            prio = _U32.unpack(attrs[RTA_PRIORITY])[0] if RTA_PRIORITY in attrs else 0
            yield Route(dst, gateway, oif, prio, table, scope)
