"""A UDP worker process: answers prepared names from its copy of the table, hands off the rest.

Run as ``python -m svcnet.dns.worker`` by ``server.DNSServer`` with three inherited sockets:
its SO_REUSEPORT UDP socket, a stream of table updates (length-prefixed pickles of
``[(key, Prepared | None), ...]``) and a SEQPACKET channel to the main process for
everything else (``Q`` query out, ``R`` reply in, ``M`` statistics out).

The hot loop is deliberately flat: recvfrom, a few byte compares, one dict lookup, a join and
sendto. No object is built per query. This module imports nothing heavy so a worker starts
in tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import socket
import struct
import sys
import threading
import time
from typing import Any

# Duration buckets shared with metrics.py (CoreDNS: 0.25 ms doubling, 16 buckets).
BUCKETS = tuple(0.00025 * 2**i for i in range(16))
FLUSH_SECONDS = 1.0
OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"  # wire.OPT_RECORD: 1232 bytes, version 0
SAMPLE = 16  # time one query in SAMPLE (a power of two); its histogram weight is SAMPLE


IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python lacks the name on some builds
WILDCARDS = ("0.0.0.0", "::", "")
CMSG_ROOM = socket.CMSG_SPACE(20)  # one in_pktinfo (12 bytes) or in6_pktinfo (20 bytes)


def encode_addr(addr: tuple[Any, ...], ctl: bytes = b"") -> bytes:
    """The client's address (and the reply's source, ``ctl``) as handed to the main process."""
    host: bytes = str(addr[0]).encode()
    return bytes((len(host),)) + host + struct.pack("!H", addr[1]) + bytes((len(ctl),)) + ctl


def decode_addr(data: bytes) -> tuple[tuple[str, int], int, bytes]:
    n = data[0]
    host = data[1:1 + n].decode()
    (port,) = struct.unpack_from("!H", data, 1 + n)
    c = data[3 + n]
    return (host, port), 4 + n + c, bytes(data[4 + n:4 + n + c])


def enable_pktinfo(sock: socket.socket) -> bool:
    """Ask for each datagram's destination address if ``sock`` is bound to a wildcard.

    A wildcard socket must answer from the address the query was sent to, not from the one
    routing would pick (the client drops such a reply). True if enabled.
    """
    if sock.getsockname()[0] not in WILDCARDS:
        return False
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        with contextlib.suppress(OSError):  # IPv4-mapped clients of a dual-stack socket
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    return True


def reply_source(ancdata: list[tuple[int, int, bytes]]) -> bytes:
    """The pktinfo to send a reply with, from a query's ancillary data (b"": none)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # in_pktinfo {ifindex, spec_dst, addr}: source = the query's destination.
            return b"\x00\x00\x00\x00" + data[8:12] + b"\x00\x00\x00\x00"
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            # in6_pktinfo {addr, ifindex}: keep the interface only for link-local addresses.
            link_local = data[0] == 0xFE and data[1] & 0xC0 == 0x80
            return bytes(data[:16]) + (bytes(data[16:20]) if link_local else b"\x00" * 4)
    return b""


def control(ctl: bytes) -> list[tuple[int, int, bytes]]:
    """``reply_source``'s bytes as sendmsg ancillary data."""
    if len(ctl) == 12:
        return [(socket.IPPROTO_IP, IP_PKTINFO, ctl)]
    if len(ctl) == 20:
        return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, ctl)]
    return []


def read_updates(stream: socket.socket, table: dict[bytes, Any]) -> None:
    """Apply table update batches until the main process closes the stream."""
    rfile = stream.makefile("rb")
    while True:
        head = rfile.read(4)
        if len(head) < 4:
            os._exit(0)
        (size,) = struct.unpack("!I", head)
        batch = pickle.loads(rfile.read(size))
        for key, value in batch:
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value  # count fields arrive shared (interned, pickle memo)
        if len(batch) > 1000:  # a big batch (the first sync) leaves freed buffers behind
            del batch
            _malloc_trim()


def _malloc_trim() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def relay_replies(channel: socket.socket, udp: socket.socket, stats: dict[Any, Any]) -> None:
    """Send the main process's replies to clients; ship statistics every second."""
    channel.settimeout(FLUSH_SECONDS)
    last = time.monotonic()
    while True:
        try:
            msg = channel.recv(70000)
            if not msg:
                os._exit(0)
            if msg[:1] == b"R":
                addr, n, ctl = decode_addr(msg[1:])
                with contextlib.suppress(OSError):
                    if ctl:
                        udp.sendmsg([msg[1 + n:]], control(ctl), 0, addr)
                    else:
                        udp.sendto(msg[1 + n:], addr)
        except TimeoutError:
            pass
        except OSError:
            os._exit(0)  # the main process is gone
        now = time.monotonic()
        if now - last >= FLUSH_SECONDS:
            last = now
            snapshot = {k: (list(v) if isinstance(v, list) else v) for k, v in stats.items()}
            for k, v in snapshot.items():
                if isinstance(v, list):
                    stats[k] = [0] * len(v)
                else:
                    stats[k] = 0
            # Counts incremented between the snapshot and the reset are lost; cheap, and
            # bounded by one second's worth of a race window of a few bytecodes.
            if any(v for v in snapshot.values() if not isinstance(v, list)):
                with contextlib.suppress(OSError):
                    channel.send(b"M" + pickle.dumps(snapshot))


def serve(udp: socket.socket, channel: socket.socket, table: dict[bytes, Any],
          stats: dict[Any, Any], slow_only: bool, pktinfo: bool = False) -> None:
    """The hot loop.

    ``stats`` maps each answer's ``stat`` (qtype << 4 | rcode) to a count, and ("d", qtype)
    to a duration histogram of every ``SAMPLE``-th query: timing each one would cost ~1 us of
    the ~13 us a query costs in CPU here.

    ``pktinfo`` (wildcard-bound socket): receive with recvmsg and reply with sendmsg from the
    query's destination address; ``addr`` is then ``(peer, ctl)``. A specific-address socket
    keeps plain recvfrom/sendto.
    """
    recv: Any = udp.recvfrom
    send: Any = udp.sendto
    encode: Any = encode_addr
    if pktinfo:
        recvmsg = udp.recvmsg
        sendmsg = udp.sendmsg

        def recv(size: int) -> tuple[bytes, tuple[Any, bytes]]:
            data, anc, _flags, peer = recvmsg(size, CMSG_ROOM)
            return data, (peer, reply_source(anc))

        def send(reply: bytes, addr: tuple[Any, bytes]) -> int:
            return sendmsg([reply], control(addr[1]), 0, addr[0])

        def encode(addr: tuple[Any, bytes]) -> bytes:
            return encode_addr(addr[0], addr[1])
    get = table.get
    count = stats.get
    handoff = channel.send
    clock = time.perf_counter
    buckets = BUCKETS
    nb = len(buckets)
    mask = SAMPLE - 1
    n = 0
    t0 = 0.0
    while True:
        try:
            data, addr = recv(4096)
        except OSError:
            continue
        n += 1
        if not n & mask:
            t0 = clock()
        try:
            if slow_only or data[2] & 0xF8 or data[4:10] != b"\x00\x01\x00\x00\x00\x00":
                raise LookupError
            qend = data.index(0, 12) + 5
            entry = get(data[12:qend].lower())
            if entry is None:
                raise LookupError
            ar = data[10:12]
            body = entry[3]
            if ar == b"\x00\x00":
                counts = entry[2]
                opt = b""
                limit = 512
            elif ar == b"\x00\x01" and data[qend:qend + 3] == b"\x00\x00\x29" and \
                    not data[qend + 6] and not data[qend + 7] & 0x80:
                counts = entry[4]
                opt = OPT
                limit = (data[qend + 3] << 8) | data[qend + 4]
                if limit < 512:
                    limit = 512
            else:
                raise LookupError
            flags1 = entry[0] | (data[2] & 1)
            if qend + len(body) + len(opt) > limit:
                if qend + entry[5] + len(opt) <= limit:
                    raise LookupError  # fits without the additional section: main decides
                flags1 |= 2
                counts = b"\x00\x01\x00\x00\x00\x00\x00\x01" if opt else \
                    b"\x00\x01\x00\x00\x00\x00\x00\x00"
                body = b""
            send(b"".join((data[:2], bytes((flags1, entry[1] | (data[3] & 0x10))), counts,
                           data[12:qend], body, opt)), addr)
        except OSError:
            continue
        except Exception:
            try:
                handoff(b"Q" + encode(addr) + data)
            except OSError:
                stats["dropped"] = count("dropped", 0) + 1
            continue
        stat = entry[6]
        stats[stat] = count(stat, 0) + 1
        if not n & mask:
            elapsed = clock() - t0
            i = 0
            while i < nb and elapsed > buckets[i]:
                i += 1
            key = ("d", stat >> 4)
            hist = count(key)
            if hist is None:
                hist = stats[key] = [0] * (nb + 2)
            hist[i] += SAMPLE
            hist[nb + 1] += int(elapsed * 1e9) * SAMPLE


def main(argv: list[str]) -> int:
    udp_fd, updates_fd, channel_fd, slow_only = (int(a) for a in argv[:4])
    udp = socket.socket(fileno=udp_fd)
    updates = socket.socket(fileno=updates_fd)
    channel = socket.socket(fileno=channel_fd)
    channel.setblocking(False)
    relay = socket.socket(fileno=os.dup(channel_fd))
    table: dict[bytes, Any] = {}
    stats: dict[Any, Any] = {}
    # Nothing here makes reference cycles; without the collector a 100k-entry table is never
    # rescanned and the hot loop never pauses for it.
    gc.disable()
    threading.Thread(target=read_updates, args=(updates, table), daemon=True).start()
    threading.Thread(target=relay_replies, args=(relay, udp, stats), daemon=True).start()
    serve(udp, channel, table, stats, bool(slow_only), udp.getsockname()[0] in WILDCARDS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
