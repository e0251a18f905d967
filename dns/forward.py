"""Forwarding names outside the cluster zone to upstream resolvers, like CoreDNS's forward.

Every query leaves from a fresh UDP socket (a random source port) with a fresh random ID
and random letter case (DNS 0x20); only a reply with that ID, the QR bit and the same
question is accepted, others are dropped and counted, and a truncated reply is retried over
TCP with the same checks. An upstream that
fails ``max_fails`` times in a row is marked down and probed (``. IN NS``) every
``health_interval`` until it answers; queries go to healthy upstreams in random order, to
all of them when none is healthy. Beyond ``max_concurrent`` queries in flight the caller
gets REFUSED (counted). Upstreams that are this server itself are refused at start
(``drop_self``); at run time every query we receive is checked against the queries we
have out (same ID and letter case) and against our loop probes (a random name per
upstream, at start and every 30 s), so a loop is seen the first time one of our queries
comes back to us, at any time; that upstream is then not used until a probe through it is
answered without coming back (``Forwarder.seen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass

from svcnet.dns import metrics
from svcnet.dns.wire import HINFO, NS, RCODE_NAMES, WireError

log = logging.getLogger(__name__)

LOOP_PROBE_SECONDS = 30.0


class ForwardError(Exception):
    """No upstream produced an answer."""


class ConcurrencyLimit(ForwardError):
    """Too many queries in flight; answer REFUSED."""


def parse_hostport(text: str, default_port: int = 53) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, default_port


def resolv_conf_upstreams(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append((parts[1].split("%")[0], 53))
    except OSError:
        pass
    return out


def mix_case(name: bytes) -> bytes:
    """Flip the case of random letters of a wire name (DNS 0x20): a spoofed reply must guess
    the pattern too, and our own query coming back is recognisable by it. Label length
    bytes are at most 63, below every letter, so only letters change."""
    bits = random.getrandbits(len(name))
    out = bytearray(name)
    for i, b in enumerate(out):
        if 97 <= (b | 0x20) <= 122 and (bits >> i) & 1:
            out[i] = b ^ 0x20
    return bytes(out)


def question_end(data: bytes) -> int:
    """Offset after the single question (uncompressed name + type + class); WireError if
    there is none."""
    if len(data) < 12 or data[4:6] != b"\x00\x01":
        raise WireError("not one question")
    pos = 12
    while True:
        if pos >= len(data):
            raise WireError("question runs past the end")
        length = data[pos]
        if length == 0:
            break
        if length > 63:
            raise WireError("compressed or invalid question name")
        pos += 1 + length
    if pos + 5 > len(data):
        raise WireError("question runs past the end")
    return pos + 5


def valid_reply(reply: bytes, sent: bytes, qend: int) -> bool:
    """The reply answers exactly what we sent: same ID, QR set, opcode QUERY, one question
    with the same name (any case), type and class."""
    return (len(reply) >= qend and reply[:2] == sent[:2] and reply[2] & 0xF8 == 0x80
            and reply[4:6] == b"\x00\x01"
            and reply[12:qend - 4].lower() == sent[12:qend - 4].lower()
            and reply[qend - 4:qend] == sent[qend - 4:qend])


def _bare_truncated(reply: bytes, sent: bytes) -> bool:
    """A TC reply without the question (some servers send one): good only for retrying over
    TCP, where the reply is checked in full; it is never served."""
    return len(reply) >= 12 and reply[:2] == sent[:2] and reply[2] & 0xFA == 0x82 and \
        reply[4:6] == b"\x00\x00"


@dataclass(eq=False)
class Upstream:
    host: str
    port: int
    fails: int = 0
    healthy: bool = True
    looped: bool = False

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    async def exchange(self, query: bytes, timeout: float,
                       marks: dict[bytes, Upstream] | None = None) -> bytes:
        """Send ``query`` with a fresh random ID and letter case from a fresh socket (a
        random source port per query); wait for a reply that matches it, ignoring others;
        retry over TCP on truncation. The reply carries the caller's ID and question bytes.

        ``marks`` (ID + question as sent -> upstream) lets the server recognise this very
        query if the upstream sends it back to us."""
        qend = question_end(query)
        sent = struct.pack("!H", random.getrandbits(16)) + query[2:12] + \
            mix_case(query[12:qend - 4]) + query[qend - 4:]
        mark = sent[:2] + sent[12:qend]
        if marks is not None:
            marks[mark] = self
        try:
            async with asyncio.timeout(timeout):
                reply = await self._udp(sent, qend)
                if reply[2] & 0x02:
                    reply = await self._tcp(sent, qend)
        finally:
            if marks is not None:
                marks.pop(mark, None)
        return query[:2] + reply[2:12] + query[12:qend] + reply[qend:]

    async def _udp(self, sent: bytes, qend: int) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((self.host, self.port))  # replies from elsewhere never reach us
            await loop.sock_sendall(sock, sent)
            for _ in range(64):
                reply = await loop.sock_recv(sock, 65535)
                if valid_reply(reply, sent, qend) or _bare_truncated(reply, sent):
                    return reply
                metrics.FORWARD_BAD_REPLIES.labels(self.name).inc()
        raise ForwardError(f"{self.name}: too many replies that do not match")

    async def _tcp(self, sent: bytes, qend: int) -> bytes:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(struct.pack("!H", len(sent)) + sent)
            await writer.drain()
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            reply = await reader.readexactly(size)
        finally:
            writer.transport.abort()
        if not valid_reply(reply, sent, qend):
            metrics.FORWARD_BAD_REPLIES.labels(self.name).inc()
            raise ForwardError(f"{self.name}: TCP reply does not match the query")
        return reply

    def close(self) -> None:
        pass


def drop_self(upstreams: list[tuple[str, int]], listen: tuple[str, int]
              ) -> list[tuple[str, int]]:
    """Refuse upstreams that are our own listening address (a forwarding loop)."""
    host, port = listen
    ours = {host} if host not in ("0.0.0.0", "::", "") else {"0.0.0.0", "::"}
    out = []
    for up_host, up_port in upstreams:
        local = up_host in ours or ("0.0.0.0" in ours and up_host.startswith("127.")) or (
            "::" in ours and up_host == "::1")
        if up_port == port and local:
            log.error("upstream %s:%d is this server; not forwarding to it", up_host, up_port)
            continue
        out.append((up_host, up_port))
    return out


class Forwarder:
    def __init__(self, upstreams: list[tuple[str, int]], *, timeout: float = 2.0,
                 max_fails: int = 2, health_interval: float = 0.5,
                 max_concurrent: int = 1000, loop_interval: float = LOOP_PROBE_SECONDS) -> None:
        self.upstreams = [Upstream(h, p) for h, p in upstreams]
        self.timeout = timeout
        self.max_fails = max_fails
        self.health_interval = health_interval
        self.max_concurrent = max_concurrent
        self.loop_interval = loop_interval
        self.in_flight = 0
        self.marks: dict[bytes, Upstream] = {}  # ID + question of queries we have out
        self._health_task: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._probes: dict[str, Upstream] = {}  # our recent loop probe names (bounded)
        self._returned: set[str] = set()  # those that came back to us
        self.loop_probe_name = f"{random.getrandbits(32):x}.svcnet-loop-check."

    async def forward(self, query: bytes) -> bytes:
        if self.in_flight >= self.max_concurrent:
            metrics.FORWARD_MAX_CONCURRENT.inc()
            raise ConcurrencyLimit("too many concurrent queries")
        candidates = [u for u in self.upstreams if not u.looped]
        if not candidates:
            raise ForwardError("every upstream leads back to us")
        healthy = [u for u in candidates if u.healthy]
        order = healthy or candidates
        random.shuffle(order)
        self.in_flight += 1
        try:
            last: Exception | None = None
            for up in order:
                if up.looped:
                    continue
                started = time.perf_counter()
                metrics.FORWARD_REQUESTS.labels(up.name).inc()
                try:
                    reply = await up.exchange(query, self.timeout, self.marks)
                except (OSError, TimeoutError, ForwardError, WireError,
                        asyncio.IncompleteReadError, struct.error) as err:
                    last = err
                    self._failed(up)
                    continue
                if up.looped:  # what came back is our own answer to our own query
                    last = ForwardError(f"{up.name} leads back to us")
                    continue
                rcode = RCODE_NAMES.get(reply[3] & 0xF, str(reply[3] & 0xF))
                metrics.FORWARD_RESPONSES.labels(up.name, rcode).inc()
                metrics.FORWARD_DURATION.labels(up.name, rcode).observe(
                    time.perf_counter() - started)
                up.fails = 0
                return reply
            raise ForwardError(f"all upstreams failed: {last}")
        finally:
            self.in_flight -= 1

    def _failed(self, up: Upstream) -> None:
        up.fails += 1
        if up.healthy and up.fails >= self.max_fails:
            up.healthy = False
            log.warning("upstream %s marked down after %d failures", up.name, up.fails)
            self._start_health_checks()

    def _start_health_checks(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def _health_loop(self) -> None:
        probe = struct.pack("!HHHHHH", 0, 0, 1, 0, 0, 0) + b"\x00" + struct.pack("!HH", NS, 1)
        while any(not u.healthy for u in self.upstreams):
            await asyncio.sleep(self.health_interval)
            for up in [u for u in self.upstreams if not u.healthy]:
                try:
                    await up.exchange(probe, self.timeout)
                except (OSError, TimeoutError, ForwardError, WireError,
                        asyncio.IncompleteReadError):
                    metrics.FORWARD_HC_FAILURES.labels(up.name).inc()
                    continue
                up.healthy, up.fails = True, 0
                log.info("upstream %s is healthy again", up.name)
            if all(not u.healthy for u in self.upstreams):
                metrics.FORWARD_HC_BROKEN.inc()

    # --- forwarding loops (CoreDNS's loop plugin, made continuous) -------------------------

    def seen(self, data: bytes, qname: str) -> bool:
        """Called for every query we receive. True if it is one of ours coming back: a
        forwarded query still waiting for its reply (same ID and letter case, ``marks``) or
        a loop probe; the upstream it went to is then not used any more."""
        up: Upstream | None = None
        if self.marks:
            with contextlib.suppress(WireError):
                up = self.marks.get(data[:2] + data[12:question_end(data)])
        if up is None and qname.endswith(self.loop_probe_name):
            up = self._probes.get(qname)  # even after its exchange gave up: a slow loop
            if up is None:
                return True  # a probe of ours too old to remember, still going round
            if len(self._returned) < 1024:
                self._returned.add(qname)
        if up is None:
            return False
        metrics.FORWARD_LOOPS.labels(up.name).inc()
        if not up.looped:
            up.looped = True
            log.error("forwarding loop: our query to upstream %s came back to us; not "
                      "forwarding to it (probed again every %.0f s)", up.name,
                      self.loop_interval)
        return True

    def probe_query(self, up: Upstream) -> tuple[str, bytes]:
        """A HINFO query for a fresh random name; seeing it arrive here means a loop."""
        name = f"{random.getrandbits(32):x}.{random.getrandbits(32):x}.{self.loop_probe_name}"
        while len(self._probes) >= 256:
            self._probes.pop(next(iter(self._probes)))
        self._probes[name] = up
        wire = b"".join(bytes((len(p),)) + p.encode() for p in name.rstrip(".").split("."))
        return name, struct.pack("!HHHHHH", random.getrandbits(16), 0x0100, 1, 0, 0, 0) + \
            wire + b"\x00" + struct.pack("!HH", HINFO, 1)

    async def probe_loops(self) -> None:
        """Send one loop probe through every upstream. A looped upstream whose probe is
        answered without coming back is used again (the path was fixed)."""
        for up in self.upstreams:
            name, query = self.probe_query(up)
            try:
                await up.exchange(query, self.timeout)
            except (OSError, TimeoutError, ForwardError, WireError,
                    asyncio.IncompleteReadError):
                continue  # no answer: no news (if it comes back later, ``seen`` marks it)
            came_back = name in self._returned
            self._returned.discard(name)
            if up.looped and not came_back:
                up.looped = False
                log.warning("upstream %s no longer leads back to us; forwarding to it again",
                            up.name)

    async def check_loops(self) -> None:
        """Probe at start and every ``loop_interval`` for as long as we run."""
        while True:
            await self.probe_loops()
            await asyncio.sleep(self.loop_interval)

    def start_loop_checks(self) -> None:
        if self._loop_task is None and self.upstreams:
            self._loop_task = asyncio.get_running_loop().create_task(self.check_loops())

    def close(self) -> None:
        for task in (self._health_task, self._loop_task):
            if task is not None:
                task.cancel()
