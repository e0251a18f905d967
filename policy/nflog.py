"""The one adapter for nfnetlink_log (NFLOG): denied packets the table logs to a group.

The kernel's syslog logger is off in every network namespace but the initial one, and its
lines can only carry the rule's fixed prefix; an NFLOG group works in any namespace and
hands us the packet, so the daemon can name the pods from their addresses. The socket is
made in the policy namespace by a short-lived helper thread (``setns`` changes only the
calling thread) and stays bound there.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE = 1, 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
CLONE_NEWNET = 0x40000000
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
PROTOCOLS = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP", 58: "ICMPv6"}


@dataclass(frozen=True, slots=True)
class Logged:
    prefix: str
    src: str
    dst: str
    protocol: str
    port: int


def _attr(kind: int, data: bytes) -> bytes:
    length = _NLA.size + len(data)
    return _NLA.pack(length, kind) + data + b"\0" * (-length % 4)


def _config(group: int, payload: bytes, seq: int) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + payload
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


class NflogSocket:
    """Bound to one NFLOG group; ``records`` yields what arrives until ``close``."""

    def __init__(self, group: int, netns: str | None = None) -> None:
        self.group = group
        self.sock = _in_netns(netns, lambda: socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
        self.sock.bind((0, 0))
        self.sock.settimeout(1.0)
        self._request(_attr(NFULA_CFG_CMD, struct.pack("=B", NFULNL_CFG_CMD_BIND)), 1)
        self._request(_attr(NFULA_CFG_MODE, struct.pack("!IBx", 256, NFULNL_COPY_PACKET)), 2)

    def _request(self, payload: bytes, seq: int) -> None:
        self.sock.send(_config(self.group, payload, seq))
        data = self.sock.recv(65536)
        _, kind, _, _, _ = _NLMSG.unpack_from(data)
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, _NLMSG.size)
            if code:
                raise OSError(-code, f"nflog group {self.group}: {os.strerror(-code)}")

    def close(self) -> None:
        self.sock.close()

    def records(self, stop: threading.Event) -> Iterator[Logged]:
        while not stop.is_set():
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    return
                raise
            yield from parse(data)


def parse(data: bytes) -> Iterator[Logged]:
    """The packet records in one netlink read."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            record = _packet(data[offset + _NLMSG.size + _NFGEN.size:offset + length])
            if record is not None:
                yield record
        offset += (length + 3) & ~3


def _packet(attrs: bytes) -> Logged | None:
    prefix, payload = "", b""
    i = 0
    while i + _NLA.size <= len(attrs):
        length, kind = _NLA.unpack_from(attrs, i)
        if length < _NLA.size:
            break
        value = attrs[i + _NLA.size:i + length]
        kind &= 0x3FFF
        if kind == NFULA_PREFIX:
            prefix = value.rstrip(b"\0").decode(errors="replace")
        elif kind == NFULA_PAYLOAD:
            payload = value
        i += (length + 3) & ~3
    if len(payload) < 20:
        return None
    version = payload[0] >> 4
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    if version == 4:
        header = (payload[0] & 0xF) * 4
        proto = payload[9]
        src, dst = ipaddress.IPv4Address(payload[12:16]), ipaddress.IPv4Address(payload[16:20])
    elif version == 6 and len(payload) >= 40:
        header, proto = 40, payload[6]
        src, dst = ipaddress.IPv6Address(payload[8:24]), ipaddress.IPv6Address(payload[24:40])
    else:
        return None
    port = 0
    if proto in (6, 17, 132) and len(payload) >= header + 4:
        port = struct.unpack_from("!H", payload, header + 2)[0]
    return Logged(prefix, str(src), str(dst), PROTOCOLS.get(proto, str(proto)), port)


def _in_netns(netns: str | None, make: object) -> socket.socket:
    assert callable(make)
    if netns is None:
        sock: socket.socket = make()
        return sock
    result: list[socket.socket | BaseException] = []

    def enter_and_make() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as err:  # handed to the caller's thread
            result.append(err)

    helper = threading.Thread(target=enter_and_make, name=f"netns-{netns}")
    helper.start()
    helper.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
