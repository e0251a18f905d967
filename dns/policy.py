"""The one answer policy for prepared answers, shared by every path that serves them.

A worker process (``worker.make_answer``), the main process's fast path for TCP and
``--workers 0`` (``server.fast_answer``) and the slow path (``wire.answer_from_prepared``)
all decide with ``plain_query`` whether a query may be answered from the table as it is,
and build the reply with ``reply_tail``: the client's header bits and question, the
prepared counts and body, the OPT record (with the client's DO bit, RFC 3225), and the
truncation rule (over the limit: keep the additional records that fit and drop the rest,
without TC, RFC 2181 9; if even answer + authority do not fit, header + question (+ OPT)
with TC). Imports nothing: workers load it.
"""

from __future__ import annotations

OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"  # OPT: 1232 bytes, version 0, DO clear
OPT_DO = b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00"  # the same with DO set
COUNTS_NONE = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # question only (truncated)
COUNTS_OPT_ONLY = b"\x00\x01\x00\x00\x00\x00\x00\x01"
PLAIN_HEAD = b"\x00\x01\x00\x00\x00\x00"  # QDCOUNT 1, ANCOUNT 0, NSCOUNT 0


def plain_query(data: bytes) -> tuple[int, int, bytes] | None:
    """``(question end, UDP size limit, OPT to append)`` for a query the table can answer
    as it is: QR clear, opcode QUERY, one question with an uncompressed name, nothing in
    answer/authority, no additional record or one OPT of version 0 (any options; DO is
    echoed). None: the slow path decides (FORMERR, NOTIMP, BADVERS, ...)."""
    size = len(data)
    if size < 17 or data[2] & 0xF8 or data[4:10] != PLAIN_HEAD:
        return None
    qend = data.find(0, 12) + 5
    if qend < 17 or qend > size:
        return None
    ar = data[10:12]
    if ar == b"\x00\x00":
        return qend, 512, b""
    if ar == b"\x00\x01" and size >= qend + 11 and data[qend:qend + 3] == b"\x00\x00\x29" \
            and not data[qend + 6]:
        limit = (data[qend + 3] << 8) | data[qend + 4]
        return qend, limit if limit > 512 else 512, OPT_DO if data[qend + 7] & 0x80 else OPT
    return None


def _record_end(body: bytes, pos: int) -> int:
    """Offset after the resource record at ``pos`` (owner name, 10 bytes, rdata)."""
    while True:
        length = body[pos]
        if length >= 0xC0:
            pos += 2
            break
        pos += 1 + length
        if not length:
            break
    return pos + 10 + int.from_bytes(body[pos + 8:pos + 10], "big")


def reply_tail(data: bytes, qend: int, flags1: int, flags2: int, counts: bytes,
               counts_edns: bytes, body: bytes, core_len: int, opt: bytes,
               limit: int) -> bytes:
    """The reply after its 2-byte ID. ``flags1``/``flags2`` are the prepared flag bytes (the
    client's RD and CD bits are added), ``opt`` is b"" for a client without EDNS."""
    flags1 |= data[2] & 0x01
    if opt:
        counts = counts_edns
    if qend + len(body) + len(opt) > limit:
        if qend + core_len + len(opt) <= limit:
            # Keep the additional records that fit, drop the rest: no TC (RFC 2181 9).
            room = limit - qend - len(opt)
            end, kept = core_len, 0
            while end < len(body):
                nxt = _record_end(body, end)
                if nxt > room:
                    break
                end, kept = nxt, kept + 1
            body = body[:end]
            counts = counts[:6] + (kept + (1 if opt else 0)).to_bytes(2, "big")
        else:
            flags1 |= 0x02
            counts = COUNTS_OPT_ONLY if opt else COUNTS_NONE
            body = b""
    return b"".join((bytes((flags1, flags2 | (data[3] & 0x10))), counts, data[12:qend],
                     body, opt))
