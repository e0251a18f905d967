"""SCTP reachability without an SCTP stack: INIT / INIT-ACK over raw IP protocol-132 sockets.

The lab's host kernel has no SCTP sockets (no ``sctp`` module), but raw IP sockets of
protocol 132 work, and conntrack and nftables see such packets exactly as they see a real
SCTP stack's: ``meta l4proto sctp``, ``th dport``, conntrack's SCTP state machine (which
checks the CRC32c checksum and the verification tags). A probe is the first half of the
association set-up -- the client sends an INIT, the server answers with an INIT-ACK carrying
the client's tag -- which is all a NetworkPolicy decides on (the first packet of a flow; the
INIT-ACK is a reply of an allowed flow). The client then sends an ABORT so conntrack
forgets the association at once.

Standard library only: the echo server and the matrix prober both use it.
"""

from __future__ import annotations

import os
import socket
import struct

IPPROTO_SCTP = 132
INIT, INIT_ACK, ABORT = 1, 2, 6
STATE_COOKIE = 7


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli), the SCTP checksum (RFC 9260 appendix A)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def packet(sport: int, dport: int, vtag: int, chunks: bytes) -> bytes:
    """Common header + chunks, with the checksum (stored little-endian, as the RFC's
    reference code and Linux do)."""
    head = struct.pack("!HHII", sport, dport, vtag, 0)
    checksum = crc32c(head + chunks)
    return head[:8] + struct.pack("<I", checksum) + chunks


def _chunk(kind: int, flags: int, value: bytes) -> bytes:
    body = struct.pack("!BBH", kind, flags, 4 + len(value)) + value
    return body + b"\0" * (-len(body) % 4)


def init(sport: int, dport: int, tag: int) -> bytes:
    """INIT: verification tag 0, our initiate tag, 1 stream each way."""
    value = struct.pack("!IIHHI", tag, 65535, 1, 1, tag)
    return packet(sport, dport, 0, _chunk(INIT, 0, value))


def init_ack(sport: int, dport: int, peer_tag: int, tag: int) -> bytes:
    """INIT-ACK to a peer whose initiate tag is ``peer_tag``, with a (dummy) state cookie."""
    cookie = struct.pack("!HH", STATE_COOKIE, 4 + 8) + os.urandom(8)
    value = struct.pack("!IIHHI", tag, 65535, 1, 1, tag) + cookie
    return packet(sport, dport, peer_tag, _chunk(INIT_ACK, 0, value))


def abort(sport: int, dport: int, peer_tag: int) -> bytes:
    return packet(sport, dport, peer_tag, _chunk(ABORT, 0, b""))


def parse(data: bytes) -> tuple[str, int, int, int, int, int] | None:
    """An IPv4 packet as a raw socket hands it over -> (source address, source port,
    destination port, verification tag, first chunk type, initiate tag or 0); None if it
    is not a well-formed SCTP packet with a valid checksum."""
    if len(data) < 20:
        return None
    ihl = (data[0] & 0x0F) * 4
    sctp = data[ihl:]
    if len(sctp) < 16:
        return None
    sport, dport, vtag = struct.unpack("!HHI", sctp[:8])
    (checksum,) = struct.unpack("<I", sctp[8:12])
    if crc32c(sctp[:8] + b"\0\0\0\0" + sctp[12:]) != checksum:
        return None
    kind = sctp[12]
    tag = struct.unpack("!I", sctp[16:20])[0] if kind in (INIT, INIT_ACK) and len(sctp) >= 20 \
        else 0
    return socket.inet_ntoa(data[12:16]), sport, dport, vtag, kind, tag


def raw_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP)


def serve(ports: list[int]) -> None:
    """Answer every INIT to one of ``ports`` with an INIT-ACK; forever."""
    wanted = set(ports)
    sock = raw_socket()
    while True:
        data, _peer = sock.recvfrom(65535)
        got = parse(data)
        if got is None:
            continue
        src, sport, dport, _vtag, kind, peer_tag = got
        if kind == INIT and dport in wanted and peer_tag:
            tag = int.from_bytes(os.urandom(4), "big") or 1
            sock.sendto(init_ack(dport, sport, peer_tag, tag), (src, 0))
