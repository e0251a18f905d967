"""A UDP worker process: answers prepared names from the shared table, hands off the rest.

Run as ``python -m svcnet.dns.worker`` by ``server.DNSServer`` with three inherited sockets:
its SO_REUSEPORT UDP socket, a SEQPACKET socket of table notices (``T`` + the shared table's
file descriptor, ``G`` "it changed") and a SEQPACKET channel to the main process for
everything else (``Q`` query out, ``R`` reply in, ``M`` statistics out).

The worker holds no copy of the table (``table.py`` is one memfd mapped by every worker),
only a bounded cache of finished replies keyed by the query minus its ID: a repeated query
shape (same name, case, flags and EDNS buffer size, which is what stub resolvers send) costs
one dict lookup and one concatenation between recvfrom and sendto. A miss probes the shared
table (``make_answer``), and a name the table lacks is answered here too when its answer
follows from the table (pod names, ``negative_answer``: NXDOMAIN below a missing Service or
outside ``svc``/``pod``); every table notice empties the cache. This module imports nothing
heavy so a worker starts in tens of milliseconds.
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
from collections.abc import Callable
from typing import Any

from svcnet.dns.names import undashed
from svcnet.dns.policy import plain_query, reply_tail
from svcnet.dns.table import RECORD, TableView, find

# Duration buckets shared with metrics.py (CoreDNS: 0.25 ms doubling, 16 buckets).
BUCKETS = tuple(0.00025 * 2**i for i in range(16))
FLUSH_SECONDS = 1.0
SAMPLE = 16  # time one query in SAMPLE (a power of two); its histogram weight is SAMPLE
CACHE_ENTRIES = 16384  # finished replies per worker (~200 bytes each), both generations
TABLE, GEN = 0, 1  # the update thread's box: the mapped table, the count of changes seen


class ReplyCache:
    """Finished replies in two generations, so a full cache evicts instead of emptying.

    ``young`` takes new replies and is what the hot loop looks up (a plain dict, nothing
    done on a hit); when it holds half of ``entries`` it becomes ``old`` and the previous
    old generation is dropped. A miss in ``young`` takes the reply from ``old`` and moves
    it back (``take``): a reply used since the last rotation survives the next one, an
    unused one is gone after two, and memory stays bounded by ``entries`` replies. An
    approximation of LRU without any bookkeeping on the hit path.
    """

    __slots__ = ("half", "old", "young")

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.young: dict[bytes, bytes] = {}
        self.old: dict[bytes, bytes] = {}
        self.half = max(1, entries // 2)

    def put(self, key: bytes, tail: bytes) -> None:
        young = self.young
        if len(young) >= self.half:
            old = self.old
            old.clear()
            old.update(young)
            young.clear()
        young[key] = tail

    def take(self, key: bytes) -> bytes | None:
        """The reply from the old generation, moved back to the young one; or None."""
        tail = self.old.pop(key, None)
        if tail is not None:
            self.put(key, tail)
        return tail

    def clear(self) -> None:
        self.young.clear()
        self.old.clear()

    def __len__(self) -> int:
        return len(self.young) + len(self.old)


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


def read_updates(updates: socket.socket, box: list[Any], cache: ReplyCache) -> None:
    """Follow the main process's table: ``T`` + a file descriptor is a new table to map,
    ``G`` says the current one changed. Either way cached replies are dropped."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(updates, 16, 4)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)  # the main process is gone
        if fds:
            view = TableView(fds[-1])
            for fd in fds:
                os.close(fd)  # the mapping keeps the table alive
            box[TABLE] = (view.mm, view.slots, view.mask)
        # Order matters: the table, then the generation, then the cache. ``make_answer``
        # reads the generation before the table and checks it again after caching a reply,
        # so a reply built from a table older than this notice is either cleared here or
        # dropped there; the main process's replies carry the generation they were
        # computed at and are kept only if it is still the latest (``relay_replies``).
        box[GEN] = int.from_bytes(msg[1:9], "big") if len(msg) >= 9 else box[GEN] + 1
        cache.clear()


def reply_stats(hits: dict[Any, int]) -> dict[int, int]:
    """Per-reply counts (keyed by the reply after its ID, or already by its
    ``qtype << 4 | rcode``) as per-(qtype << 4 | rcode) counts."""
    out: dict[int, int] = {}
    for tail, count in hits.items():
        stat = tail if isinstance(tail, int) else (tail_qtype(tail) << 4) | (tail[1] & 0xF)
        out[stat] = out.get(stat, 0) + count
    return out


def tail_qtype(tail: bytes) -> int:
    """The question type of a reply without its ID (the question starts at offset 10)."""
    end = tail.find(0, 10)
    return (tail[end + 1] << 8) | tail[end + 2] if 0 < end < len(tail) - 2 else 0


def relay_replies(channel: socket.socket, udp: socket.socket, stats: dict[Any, Any],
                  hits: dict[Any, int], box: list[Any] | None = None,
                  cache: ReplyCache | None = None) -> None:
    """Send the main process's replies to clients; ship statistics every second.

    ``C`` replies depend only on the zone (negative answers, pod names, endpoint names,
    in-zone CNAMEs): they are cached like table answers if the zone has not changed since
    they were computed, so a repeated query of any kind stays in the worker."""
    channel.settimeout(FLUSH_SECONDS)
    last = time.monotonic()
    while True:
        try:
            msg = channel.recv(70000)
            if not msg:
                os._exit(0)
            kind = msg[:1]
            if kind == b"R" or kind == b"C":
                start = 9 if kind == b"C" else 1
                addr, n, ctl = decode_addr(msg[start:])
                body = start + n
                key = b""
                if kind == b"C":
                    size = int.from_bytes(msg[body:body + 2], "big")
                    key = msg[body + 2:body + size]
                    body += size
                reply = msg[body:]
                with contextlib.suppress(OSError):
                    if ctl:
                        udp.sendmsg([reply], control(ctl), 0, addr)
                    else:
                        udp.sendto(reply, addr)
                if key and box is not None and cache is not None and \
                        int.from_bytes(msg[1:9], "big") == box[GEN] and _plain_key(key):
                    cache.put(key, reply[2:])
                    if int.from_bytes(msg[1:9], "big") != box[GEN]:
                        cache.clear()  # a notice came in meanwhile
        except TimeoutError:
            pass
        except OSError:
            os._exit(0)  # the main process is gone
        now = time.monotonic()
        if now - last >= FLUSH_SECONDS:
            last = now
            # Counts added between a copy and its reset are lost: a window of a few bytecodes
            # once a second, cheaper than any lock on the hot path.
            counted = hits.copy()
            hits.clear()
            snapshot: dict[Any, Any] = {}
            for k, v in list(stats.items()):
                if isinstance(v, list):
                    snapshot[k] = list(v)
                    stats[k] = [0] * len(v)
                else:
                    snapshot[k] = v
                    stats[k] = 0
            for stat, count in reply_stats(counted).items():
                snapshot[stat] = snapshot.get(stat, 0) + count
            if any(v for v in snapshot.values() if not isinstance(v, list)):
                with contextlib.suppress(OSError):
                    channel.send(b"M" + pickle.dumps(snapshot))


def _plain_key(key: bytes) -> bool:
    """A query (after its ID) whose bytes every client repeats: no EDNS options."""
    qend = key.find(0, 10) + 5  # the question ends 4 bytes after its name's root label
    return qend >= 15 and (len(key) == qend or len(key) == qend + 11)


A_IN = b"\x00\x01\x00\x01"
AAAA_IN = b"\x00\x1c\x00\x01"
CNAME_IN = b"\x00\x05\x00\x01"
SOA_IN = b"\x00\x06\x00\x01"
ZONE_TRANSFERS = (b"\x00\xfb", b"\x00\xfc")  # IXFR, AXFR: REFUSED by the main process
# Bytes of the labels a worker parses itself: anything else (a dot inside a label, escapes,
# upper case after ``lower``) is written ``\DDD`` by the main process, so it decides.
NAME_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-_"
COUNTS_NODATA = (b"\x00\x01\x00\x00\x00\x01\x00\x00", b"\x00\x01\x00\x00\x00\x01\x00\x01")
Answer = tuple[int, bytes, bytes, bytes]  # (flags2, counts, counts with OPT, body)


def soa_authority(mm: Any, slots: Any, mask: int, zone: bytes, name: bytes,
                  starts: list[int]) -> bytes | None:
    """The zone's SOA as an authority record for a reply to ``name`` (lower-case wire,
    ending in the zone; ``starts``: where its labels before the zone start, or [] if none
    of them is ``ns``/``dns``/``hostmaster``), compressed as the main process does, from the
    apex SOA answer it keeps current (its serial is the last change)."""
    off = find(mm, slots, mask, zone + SOA_IN)
    rel = len(name) - len(zone)
    if not off or 12 + rel >= 0x4000:
        return None
    at = off + 1 + len(zone) + 4
    blen = RECORD.unpack_from(mm, at)[6]
    soa: bytes = mm[at + RECORD.size:at + RECORD.size + blen]  # one SOA, owner a pointer
    if soa[:1] < b"\xc0" or len(soa) < 32:
        return None
    ptr = bytes((0xC0 | (12 + rel) >> 8, (12 + rel) & 0xFF))
    mname = b"\x02ns\x03dns" + ptr
    rname = b"\x0ahostmaster" + ptr
    if starts:  # the question's own suffixes come first (``wire.Compressor``)
        last = name[starts[-1]:rel]
        if len(starts) > 1 and name[starts[-2]:rel] == b"\x02ns\x03dns":
            mname = (0xC00C + starts[-2]).to_bytes(2, "big")
        elif last == b"\x03dns":
            mname = b"\x02ns" + (0xC00C + starts[-1]).to_bytes(2, "big")
        elif last == b"\x0ahostmaster":
            rname = (0xC00C + starts[-1]).to_bytes(2, "big")
    rdata = mname + rname + soa[-20:]
    return ptr + SOA_IN + soa[6:10] + len(rdata).to_bytes(2, "big") + rdata


def pod_answer(mm: Any, slots: Any, mask: int, key: bytes, zone: bytes) -> Answer | None:
    """``a-b-c-d.<ns>.pod.<zone>`` A/AAAA with ``pods insecure``, computed from the name as
    the main process would, or None (the main process decides). The namespace must exist,
    which the main process says by preparing ``<ns>.pod.<zone>``."""
    tail = b"\x03pod" + zone
    qtype = key[-4:]
    name = key[:-4]
    if qtype not in (A_IN, AAAA_IN) or not name.endswith(tail) or len(name) > 255:
        return None
    first = name[0]
    if not 0 < first < 64:
        return None
    ns_at = 1 + first
    ns_len = name[ns_at] if ns_at < len(name) else 0
    if not 0 < ns_len < 64 or ns_at + 1 + ns_len + len(tail) != len(name):
        return None
    if not find(mm, slots, mask, name[ns_at:] + A_IN):
        return None
    ip = undashed(name[1:ns_at].decode("ascii", "replace"))
    if ip is None:
        return None
    packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    if (len(packed) == 4) == (qtype == A_IN):
        soa = soa_authority(mm, slots, mask, zone, zone, [])  # for the TTL (SOA minimum)
        if soa is None:
            return None
        body = b"\xc0\x0c" + qtype + soa[-4:] + len(packed).to_bytes(2, "big") + packed
        return 0, b"\x00\x01\x00\x01\x00\x00\x00\x00", b"\x00\x01\x00\x01\x00\x00\x00\x01", body
    soa = soa_authority(mm, slots, mask, zone, name, [])  # "pod" precedes the zone
    return None if soa is None else (0, *COUNTS_NODATA, soa)


def negative_answer(mm: Any, slots: Any, mask: int, key: bytes, zone: bytes,
                    pods: str) -> Answer | None:
    """NXDOMAIN (with the SOA) for a name in the zone the table lacks, when the table alone
    proves nothing is there, as ``ClusterZone.answer`` decides; None: the main process
    decides. Decided here:

    - ``<labels>.<zone>`` not under ``svc``/``pod`` (search-path misses such as
      ``web.ns.svc.<zone>.<zone>``) with no A/AAAA prepared for the name;
    - ``<labels>.<service>.<ns>.svc.<zone>`` (two or more labels under ``svc``) when the
      Service ``<service>.<ns>`` has no name prepared (every name of a Service is at or
      below it, and ``<service>.<ns>`` is prepared for A/AAAA or CNAME while it exists);
    - ``<a>.<b>.<c...>.pod.<zone>``, and ``<x>.<ns>.pod.<zone>`` when ``x`` is not an
      address or pod names are disabled.

    ``<ns>.svc.<zone>`` (NODATA while the namespace exists), the apex, ``svc``/``pod``
    themselves and anything at or below an existing Service go to the main process, whose
    reply the worker then caches."""
    if key[-2:] != b"\x00\x01" or key[-4:-2] in ZONE_TRANSFERS:
        return None
    name = key[:-4]
    rel = len(name) - len(zone)
    if rel <= 0 or len(zone) < 2 or not name.endswith(zone):
        return None
    starts = []
    pos = 0
    while pos < rel:
        n = name[pos]
        if not 0 < n < 64 or name[pos + 1:pos + 1 + n].translate(None, NAME_BYTES):
            return None
        starts.append(pos)
        pos += 1 + n
    if pos != rel:
        return None  # the zone's bytes do not start at a label
    last = name[starts[-1]:rel]
    count = len(starts) - 1  # labels before svc/pod
    if last == b"\x03svc":
        if count < 2:
            return None
        owner = name[starts[-3]:]
        if find(mm, slots, mask, owner + A_IN) or find(mm, slots, mask, owner + AAAA_IN) or \
                find(mm, slots, mask, owner + CNAME_IN):
            return None
    elif last == b"\x03pod":
        if count < 2:
            return None
        if count == 2 and pods != "disabled" and \
                undashed(name[1:starts[1]].decode("ascii")) is not None:
            return None
    elif (count == 0 and last == b"\x0bdns-version") or \
            find(mm, slots, mask, name + A_IN) or find(mm, slots, mask, name + AAAA_IN):
        return None
    soa = soa_authority(mm, slots, mask, zone, name, starts)
    return None if soa is None else (3, *COUNTS_NODATA, soa)


def make_answer(box: list[Any], cache: ReplyCache, slow_only: bool,
                zone: bytes = b"", pods: str = "disabled"
                ) -> Callable[[bytes], bytes | None]:
    """The cache-miss path: the reply (after the ID) from the old cache generation, the
    shared table, a pod name or a negative answer, or None when the main process must
    decide (not a plain query, see ``policy.plain_query``; a name only the main process
    can answer; no table yet). The reply follows ``policy.reply_tail``, the rule every
    path shares. ``zone`` (wire) empty: no pod names and no negative answers here."""
    unpack = RECORD.unpack_from
    rsize = RECORD.size
    take = cache.take
    insecure_pods = pods == "insecure"
    if zone.endswith(b"\x04arpa\x00"):
        zone = b""  # a reverse zone: PTRs of endpoints are the main process's

    def answer(data: bytes) -> bytes | None:
        gen = box[GEN]  # before the table: a switch after this point is seen at the check
        table = box[TABLE]
        if table is None or slow_only:
            return None
        old = take(data[2:])
        if old is not None:
            return old
        plain = plain_query(data)
        if plain is None:
            return None
        qend, limit, opt = plain
        mm, slots, mask = table
        key = data[12:qend].lower()
        off = find(mm, slots, mask, key)
        if off:
            at = off + 1 + len(key)
            flags1, flags2, counts, counts_edns, core_len, _, blen = unpack(mm, at)
            at += rsize
            tail = reply_tail(data, qend, flags1, flags2, counts, counts_edns,
                              mm[at:at + blen], core_len, opt, limit)
        elif zone:
            computed = pod_answer(mm, slots, mask, key, zone) if insecure_pods else None
            if computed is None:
                computed = negative_answer(mm, slots, mask, key, zone, pods)
                if computed is None:
                    return None
            flags2, counts, counts_edns, body = computed
            tail = reply_tail(data, qend, 0x84, flags2, counts, counts_edns, body, len(body),
                              opt, limit)
        else:
            return None
        size = len(data)
        if size == qend or size == qend + 11:  # no EDNS options (cookies differ per client)
            cache.put(data[2:], tail)
            if box[GEN] != gen:  # the table changed meanwhile: this reply may be stale
                cache.clear()
        return tail

    return answer


def serve(udp: socket.socket, channel: socket.socket, answer: Callable[[bytes], bytes | None],
          cache: dict[bytes, bytes], hits: dict[Any, int], stats: dict[Any, Any],
          pktinfo: bool = False) -> None:
    """The hot loop: recvfrom, one dict lookup of everything after the ID, one concatenation,
    sendto, one count.

    ``hits`` counts replies (keyed by the cached reply itself, a computed one by its type and
    rcode; the relay thread turns them
    into per-type/rcode counts once a second), ``stats`` keeps ("d", qtype) duration
    histograms of every ``SAMPLE``-th query (timing each would cost more than the lookup)
    and ``dropped``.

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
        # The query's pktinfo -> the reply's ancillary data: one entry per local address,
        # so the common case is a dict lookup instead of parsing and building both.
        controls: dict[Any, list[tuple[int, int, bytes]]] = {}
        known = controls.get

        def recv(size: int) -> tuple[bytes, tuple[Any, list[Any]]]:
            data, anc, _flags, peer = recvmsg(size, CMSG_ROOM)
            return data, (peer, anc)

        def send(reply: bytes, addr: tuple[Any, list[Any]]) -> int:
            anc = addr[1]
            key = anc[0] if len(anc) == 1 else None
            ctl = known(key)
            if ctl is None:
                ctl = control(reply_source(anc))
                if key is not None and len(controls) < 256:
                    controls[key] = ctl
            return sendmsg([reply], ctl, 0, addr[0])

        def encode(addr: tuple[Any, list[Any]]) -> bytes:
            return encode_addr(addr[0], reply_source(addr[1]))
    cached = cache.get
    counted = hits.get
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
        tail = cached(data[2:])
        if tail is None:
            try:
                tail = answer(data)
            except Exception:
                tail = None  # malformed in a way the checks missed: the main process decides
            if tail is None:
                try:
                    handoff(b"Q" + encode(addr) + data)
                except OSError:
                    stats["dropped"] = stats.get("dropped", 0) + 1
                continue
            try:
                send(data[:2] + tail, addr)
            except OSError:
                continue
            # Counted by (qtype << 4 | rcode), not by the reply: a mix of many distinct
            # names would keep a second's worth of replies alive in ``hits``.
            stat = (tail_qtype(tail) << 4) | (tail[1] & 0xF)
            hits[stat] = counted(stat, 0) + 1
        else:
            try:
                send(data[:2] + tail, addr)
            except OSError:
                continue
            hits[tail] = counted(tail, 0) + 1
        if not n & mask:
            elapsed = clock() - t0
            i = 0
            while i < nb and elapsed > buckets[i]:
                i += 1
            key = ("d", tail_qtype(tail))
            hist = stats.get(key)
            if hist is None:
                hist = stats[key] = [0] * (nb + 2)
            hist[i] += SAMPLE
            hist[nb + 1] += int(elapsed * 1e9) * SAMPLE


def main(argv: list[str]) -> int:
    udp_fd, updates_fd, channel_fd, slow_only = (int(a) for a in argv[:4])
    zone = bytes.fromhex(argv[4]) if len(argv) > 4 else b""
    pods = argv[5] if len(argv) > 5 else "disabled"
    udp = socket.socket(fileno=udp_fd)
    updates = socket.socket(fileno=updates_fd)
    channel = socket.socket(fileno=channel_fd)
    channel.setblocking(False)
    relay = socket.socket(fileno=os.dup(channel_fd))
    box: list[Any] = [None, 0]  # [TABLE]: (mmap, slots, mask) once synced; [GEN]: changes
    cache = ReplyCache()
    hits: dict[Any, int] = {}
    stats: dict[Any, Any] = {}
    # Nothing here makes reference cycles; without the collector the cache is never
    # rescanned and the hot loop never pauses for it.
    gc.disable()
    threading.Thread(target=read_updates, args=(updates, box, cache), daemon=True).start()
    threading.Thread(target=relay_replies, args=(relay, udp, stats, hits, box, cache),
                     daemon=True).start()
    serve(udp, channel, make_answer(box, cache, bool(slow_only), zone, pods), cache.young,
          hits, stats,
          udp.getsockname()[0] in WILDCARDS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
