"""DNS wire format: rendering neutral records into prepared answers, and reading queries.

The server answers cluster names from *prepared* answers: everything after the question
section is rendered once, when the watch cache changes, so answering is a dictionary lookup
plus copying the client's ID, flags and question in front (see ``server.fast_answer``). Owner
names are compression pointers to the question (offset 12), which also keeps the client's
letter case in the answer as resolvers expect.

We render by hand rather than through dnslib: the record types are few and fixed, and
``docs/dns.md`` measures this renderer against dnslib's ``pack()``.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

from svcnet.dns import policy
from svcnet.dns.policy import reply_tail

# Record types and classes we render or recognise.
A, NS, CNAME, SOA, PTR, HINFO, TXT, AAAA, SRV, OPT, IXFR, AXFR, ANY = (
    1, 2, 5, 6, 12, 13, 16, 28, 33, 41, 251, 252, 255,
)
CLASS_IN = 1
TYPE_NAMES = {A: "A", NS: "NS", CNAME: "CNAME", SOA: "SOA", PTR: "PTR", HINFO: "HINFO",
              TXT: "TXT", AAAA: "AAAA", SRV: "SRV", OPT: "OPT", IXFR: "IXFR", AXFR: "AXFR",
              ANY: "ANY", 15: "MX", 99: "SPF", 64: "SVCB", 65: "HTTPS", 43: "DS", 48: "DNSKEY"}

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED", 16: "BADVERS"}

OUR_UDP_SIZE = 1232
"""Advertised in our OPT record: the DNS-flag-day value, which avoids IP fragmentation."""

FLAGS_AUTHORITATIVE = 0x84  # QR | AA, first flags byte
FLAGS_RESPONSE = 0x80  # QR

_U16 = struct.Struct("!H")
_RR_HEAD = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_COUNTS = struct.Struct("!HHHH")
POINTER_TO_QUESTION = b"\xc0\x0c"


class WireError(ValueError):
    """A packet we cannot parse; the server answers FORMERR or drops it."""


def encode_name(name: str) -> bytes:
    """``a.b.`` -> wire labels, lower-cased. Raises WireError for labels over 63 bytes."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if not label:
            continue
        raw = label.lower().encode("ascii", "strict")
        if len(raw) > 63:
            raise WireError(f"label {label!r} longer than 63 bytes")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise WireError(f"name {name!r} longer than 255 bytes")
    return bytes(out)


@dataclass(frozen=True, slots=True)
class RR:
    """One neutral resource record: ``rdata`` is the value as text, as in a zone file."""

    name: str
    rtype: int
    ttl: int
    rdata: str

    def to_text(self) -> str:
        return f"{self.name} {self.ttl} IN {TYPE_NAMES.get(self.rtype, self.rtype)} {self.rdata}"


def encode_rdata(rtype: int, rdata: str) -> bytes:
    if rtype == A:
        return ipaddress.IPv4Address(rdata).packed
    if rtype == AAAA:
        return ipaddress.IPv6Address(rdata).packed
    if rtype in (CNAME, PTR, NS):
        return encode_name(rdata)
    if rtype == SRV:
        prio, weight, port, target = rdata.split()
        return struct.pack("!HHH", int(prio), int(weight), int(port)) + encode_name(target)
    if rtype == TXT:
        text = rdata.strip('"').encode()
        return bytes([len(text)]) + text
    if rtype == SOA:
        mname, rname, *nums = rdata.split()
        return encode_name(mname) + encode_name(rname) + struct.pack("!IIIII", *map(int, nums))
    raise WireError(f"cannot render type {rtype}")


def encode_rr(rr: RR, owner: bytes | None = None) -> bytes:
    """Render one record; ``owner`` replaces the owner name (e.g. a pointer to the question)."""
    rdata = encode_rdata(rr.rtype, rr.rdata)
    return (owner if owner is not None else encode_name(rr.name)) + _RR_HEAD.pack(
        rr.rtype, CLASS_IN, rr.ttl, len(rdata)) + rdata


def opt_record(udp_size: int = OUR_UDP_SIZE, do: bool = False, ext_rcode: int = 0) -> bytes:
    return b"\x00" + _RR_HEAD.pack(OPT, udp_size, (ext_rcode << 24) | (0x8000 if do else 0), 0)


class Prepared(NamedTuple):
    """An answer minus the header's ID/flags, the question and the OPT record.

    ``flags1``/``flags2`` are the fixed parts of the two flag bytes (QR/AA, rcode); the
    client's RD and CD bits are or-ed in per query. ``counts_edns`` counts one more additional
    record, the OPT appended for EDNS clients. A tuple of shared small objects (count fields
    are interned), because every worker process holds one per (name, type): at 10k Services
    that is ~50k entries per process.
    """

    flags1: int
    flags2: int
    counts: bytes
    body: bytes
    counts_edns: bytes
    core_len: int  # bytes of answer + authority: what remains when additional is dropped
    stat: int  # qtype << 4 | rcode, what a worker counts this answer as

    @property
    def rcode(self) -> int:
        return self.flags2 & 0xF


_interned: dict[bytes, bytes] = {}


def _intern(value: bytes) -> bytes:
    return _interned.setdefault(value, value)


class Compressor:
    """Writes names with RFC 1035 4.1.4 compression against everything written before in
    the same message (starting with the question at offset 12): owner names and the names
    in CNAME/PTR/NS/SOA data become pointers where a suffix was seen; SRV targets are
    written in full (RFC 2782) but later names may point into them."""

    def __init__(self, qname: str | None) -> None:
        self.offsets: dict[str, int] = {}
        self.pos = 12
        if qname is not None:
            self.name(qname)  # the question: the client's bytes will sit exactly there
            self.pos += 4

    def name(self, name: str, compress: bool = True) -> bytes:
        labels = [label for label in name.lower().split(".") if label]
        out = bytearray()
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            at = self.offsets.get(suffix) if compress else None
            if at is not None:
                out += bytes((0xC0 | at >> 8, at & 0xFF))
                self.pos += 2
                return bytes(out)
            if 0 <= self.pos < 0x4000:
                self.offsets.setdefault(suffix, self.pos)
            raw = labels[i].encode("ascii")
            if len(raw) > 63:
                raise WireError(f"label {labels[i]!r} longer than 63 bytes")
            out.append(len(raw))
            out += raw
            self.pos += 1 + len(raw)
        out.append(0)
        self.pos += 1
        return bytes(out)

    def record(self, rr: RR) -> bytes:
        owner = self.name(rr.name)
        self.pos += 10
        if rr.rtype in (CNAME, PTR, NS):
            rdata = self.name(rr.rdata)
        elif rr.rtype == SOA:
            mname, rname, *nums = rr.rdata.split()
            rdata = self.name(mname) + self.name(rname) + struct.pack("!IIIII", *map(int, nums))
            self.pos += 20
        elif rr.rtype == SRV:
            prio, weight, port, target = rr.rdata.split()
            self.pos += 6
            rdata = struct.pack("!HHH", int(prio), int(weight), int(port)) + \
                self.name(target, compress=False)
        else:
            rdata = encode_rdata(rr.rtype, rr.rdata)
            self.pos += len(rdata)
        return owner + _RR_HEAD.pack(rr.rtype, CLASS_IN, rr.ttl, len(rdata)) + rdata


def prepare(rcode: int, answer: list[RR], authority: list[RR], additional: list[RR],
            qname: str, *, qtype: int = 0, authoritative: bool = True) -> Prepared:
    """Render sections once, compressed against the question and each other (the body
    follows the question, whose length is the same whatever the client's letter case).
    A question name holding escaped bytes (``labels_to_text``) is not pointed into: its
    text length is not its wire length."""
    comp = Compressor(qname if "\\" not in qname else None)
    if "\\" in qname:
        comp.pos = -1 << 20  # offsets unknown: register nothing, point at nothing earlier
    parts = [comp.record(rr) for rr in (*answer, *authority, *additional)]
    body = b"".join(parts)
    core_len = sum(len(p) for p in parts[: len(answer) + len(authority)])
    an, ns, ar = len(answer), len(authority), len(additional)
    return Prepared(
        flags1=FLAGS_AUTHORITATIVE if authoritative else FLAGS_RESPONSE,
        flags2=rcode & 0xF,
        counts=_intern(_COUNTS.pack(1, an, ns, ar)),
        body=body,
        counts_edns=_intern(_COUNTS.pack(1, an, ns, ar + 1)),
        core_len=core_len,
        stat=(qtype << 4) | (rcode & 0xF),
    )




# --- reading queries -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: the header fields that matter and the single question."""

    id: int
    flags: int
    qname: str  # lower-case, dotted, with trailing dot ("." for the root)
    qname_wire: bytes  # as sent (client case)
    qtype: int
    qclass: int
    question_end: int
    edns: bool
    udp_size: int
    edns_version: int
    do: bool

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def rd(self) -> bool:
        return bool(self.flags & 0x0100)


def read_name(data: bytes, offset: int) -> tuple[list[bytes], int]:
    """Labels of the name at ``offset`` (following pointers) and the offset after it."""
    labels: list[bytes] = []
    end = -1
    jumps = 0
    total = 0
    while True:
        if offset >= len(data):
            raise WireError("name runs past the end of the packet")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise WireError("truncated compression pointer")
            if end < 0:
                end = offset + 2
            jumps += 1
            if jumps > 32:
                raise WireError("compression loop")
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length & 0xC0:
            raise WireError("unknown label type")
        offset += 1
        if length == 0:
            break
        label = data[offset:offset + length]
        if len(label) != length:
            raise WireError("label runs past the end of the packet")
        total += length + 1
        if total > 255:
            raise WireError("name longer than 255 bytes")
        labels.append(label)
        offset += length
    return labels, (end if end >= 0 else offset)


_SPECIAL = re.compile(rb"[^\x21-\x7e]|[.\\]")


def _escape(match: re.Match[bytes]) -> bytes:
    return b"\\%03d" % match.group()[0]


def labels_to_text(labels: list[bytes]) -> str:
    """Lower-case dotted text. Bytes that are not printable ASCII, and a dot or backslash
    inside a label, are written ``\\DDD`` (as zone files and CoreDNS do): a wire label
    ``a.b`` stays one label, and any byte is text we can compare and log."""
    if not labels:
        return "."
    out = []
    for label in labels:
        label = label.lower()
        if _SPECIAL.search(label) is not None:
            label = _SPECIAL.sub(_escape, label)
        out.append(label.decode("ascii"))
    return ".".join(out) + "."


def skip_rr(data: bytes, offset: int) -> tuple[int, int, int, int, int]:
    """Skip one RR: returns (type, class, ttl, ttl_offset, next_offset)."""
    _, offset = read_name(data, offset)
    if offset + 10 > len(data):
        raise WireError("record header runs past the end of the packet")
    rtype, rclass, ttl, rdlen = _RR_HEAD.unpack_from(data, offset)
    end = offset + 10 + rdlen
    if end > len(data):
        raise WireError("rdata runs past the end of the packet")
    return rtype, rclass, ttl, offset + 4, end


def parse_query(data: bytes) -> Query:
    """Parse a query's header, question and OPT record; raise WireError if malformed."""
    if len(data) < 12:
        raise WireError("shorter than a header")
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    if qd != 1:
        raise WireError(f"{qd} questions")
    labels, offset = read_name(data, 12)
    if offset + 4 > len(data):
        raise WireError("question runs past the end of the packet")
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    question_end = offset + 4
    edns, udp_size, version, do = False, 512, 0, False
    pos = question_end
    for _ in range(an + ns):
        pos = skip_rr(data, pos)[4]
    for _ in range(ar):
        rtype, rclass, ttl, _, nxt = skip_rr(data, pos)
        if rtype == OPT:
            if edns:
                raise WireError("two OPT records")
            edns, udp_size = True, max(512, rclass)
            version, do = (ttl >> 16) & 0xFF, bool(ttl & 0x8000)
        pos = nxt
    return Query(qid, flags, labels_to_text(labels), data[12:offset], qtype, qclass,
                  question_end, edns, udp_size, version, do)


def build_response(query: Query, rcode: int, prepared_body: bytes = b"",
                   counts: tuple[int, int, int] = (0, 0, 0), *, authoritative: bool = False,
                   truncated: bool = False, question: bytes | None = None) -> bytes:
    """A response to ``query`` with pre-rendered sections (``counts`` = an, ns, ar)."""
    flags = 0x8000 | (query.flags & 0x7900) | (query.flags & 0x0010) | (rcode & 0xF)
    if authoritative:
        flags |= 0x0400
    if truncated:
        flags |= 0x0200
    an, ns, ar = counts
    body = prepared_body
    if query.edns:
        body += opt_record(do=query.do, ext_rcode=rcode >> 4)
        ar += 1
    q = question if question is not None else (
        query.qname_wire + struct.pack("!HH", query.qtype, query.qclass))
    return struct.pack("!HHHHHH", query.id, flags, 1, an, ns, ar) + q + body


def header_only(data: bytes, rcode: int) -> bytes | None:
    """FORMERR-style reply echoing just the header of an unparseable query (None: drop it)."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    flags = 0x8000 | ((data[2] & 0x79) << 8) | rcode
    return data[:2] + _U16.pack(flags) + b"\x00" * 8


def answer_from_prepared(data: bytes, query: Query, prepared: Prepared, limit: int) -> bytes:
    """A prepared answer for a parsed query: ``policy.reply_tail``, as every path builds it
    (the client's DO bit is echoed in our OPT, RFC 3225)."""
    opt = (policy.OPT_DO if query.do else policy.OPT) if query.edns else b""
    return data[:2] + reply_tail(data, query.question_end, prepared.flags1, prepared.flags2,
                                 prepared.counts, prepared.counts_edns, prepared.body,
                                 prepared.core_len, opt, limit)


def with_opt(reply: bytes, query: Query) -> bytes:
    """``reply`` (from an upstream) with our OPT record if the client sent EDNS and the
    reply carries none: RFC 6891 6.1.1 says a response to an EDNS query has one (CoreDNS
    adds it too). A reply we cannot walk is left as it is."""
    if not query.edns or len(reply) < 12:
        return reply
    try:
        _, _, qd, an, ns, ar = struct.unpack_from("!HHHHHH", reply)
        pos = 12
        for _ in range(qd):
            pos = read_name(reply, pos)[1] + 4
        for i in range(an + ns + ar):
            rtype, _, _, _, pos = skip_rr(reply, pos)
            if rtype == OPT and i >= an + ns:
                return reply
    except (WireError, IndexError, struct.error):
        return reply
    if ar == 0xFFFF or pos > len(reply):
        return reply
    return reply[:10] + _U16.pack(ar + 1) + reply[12:pos] + opt_record(do=query.do) + \
        reply[pos:]


def ttl_offsets(data: bytes) -> list[int]:
    """Offsets of every TTL field outside OPT records (for the cache to age answers)."""
    _, _, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    pos = 12
    for _ in range(qd):
        pos = read_name(data, pos)[1] + 4
    out = []
    for _ in range(an + ns + ar):
        rtype, _, _, ttl_at, pos = skip_rr(data, pos)
        if rtype != OPT:
            out.append(ttl_at)
    return out
