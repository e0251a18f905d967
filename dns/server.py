"""Transport: UDP and TCP on one port, worker processes sharing it with SO_REUSEPORT.

The main process owns the zone, the slow path (``Handler``) and TCP. Each worker process
(``worker.py``) has its own SO_REUSEPORT UDP socket and maps the zone's shared table
(``table.py``), so UDP answers for cluster names use every core with no lock and no IPC;
anything else is handed to the main process over a SEQPACKET channel and the reply goes back
through the worker's socket. With ``workers=0`` the main process serves UDP itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from svcnet.dns import metrics
from svcnet.dns.handler import Handler
from svcnet.dns.policy import plain_query, reply_tail
from svcnet.dns.table import SharedTable
from svcnet.dns.wire import encode_name
from svcnet.dns.worker import (
    CMSG_ROOM,
    WILDCARDS,
    control,
    decode_addr,
    enable_pktinfo,
    reply_source,
)
from svcnet.dns.zone import ClusterZone

log = logging.getLogger(__name__)

TCP_IDLE_SECONDS = 10.0  # CoreDNS's defaults: idle 10 s between queries, read/write 5 s
TCP_READ_SECONDS = 5.0
TCP_WRITE_SECONDS = 5.0
TCP_MAX_CONNECTIONS = 1000
TCP_WRITE_BUFFER = 1 << 16


def fast_answer(table: SharedTable, data: bytes, tcp: bool) -> bytes | None:
    """The prepared answer for a plain query, or None (the slow path decides); the same
    policy as a worker's (``policy.py``)."""
    plain = plain_query(data)
    if plain is None:
        return None
    qend, limit, opt = plain
    entry = table.get(data[12:qend].lower())
    if entry is None:
        return None
    return data[:2] + reply_tail(data, qend, entry.flags1, entry.flags2, entry.counts,
                                 entry.counts_edns, entry.body, entry.core_len, opt,
                                 65535 if tcp else limit)


def _udp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    enable_pktinfo(sock)  # wildcard only: replies must leave from the queried address
    return sock


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen[bytes]
    channel: socket.socket
    updates: socket.socket
    table_build: int = 0  # which build of the shared table it has been given (0: none)
    behind: bool = False  # a notice did not fit in its socket buffer; resent every second


class DNSServer:
    def __init__(self, zone: ClusterZone, handler: Handler, *, host: str = "127.0.0.1",
                 port: int = 53, workers: int = 2, slow_only: bool = False,
                 tcp_idle: float = TCP_IDLE_SECONDS, tcp_write: float = TCP_WRITE_SECONDS,
                 tcp_max: int = TCP_MAX_CONNECTIONS) -> None:
        self.zone = zone
        self.handler = handler
        self.host = host
        self.port = port
        self.workers = workers
        self.slow_only = slow_only
        self._workers: list[_Worker] = []
        self._tcp: asyncio.base_events.Server | None = None
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._udp_reader: _PktinfoUDP | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.tcp_idle = tcp_idle
        self.tcp_read = min(tcp_idle, TCP_READ_SECONDS)
        self.tcp_write = tcp_write
        self.tcp_max = tcp_max
        self.handoffs = 0  # queries workers passed to the main process
        self._tcp_clients: dict[asyncio.WriteTransport, None] = {}  # least recently active first

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for attempt in range(20):  # port 0: the kernel's UDP port may be taken for TCP
            udp = _udp_socket(self.host, self.port)
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
                break
            except OSError:
                udp.close()
                tcp.close()
                if self.port or attempt == 19:
                    raise
        self.port = port
        self._tcp = await asyncio.start_server(self._tcp_client, sock=tcp, backlog=1024)
        loop = asyncio.get_running_loop()
        if self.workers <= 0 and self.host in WILDCARDS:
            self._udp_reader = _PktinfoUDP(self, udp)
        elif self.workers <= 0:
            self._udp_transport, _ = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(self), sock=udp)
        else:
            for i in range(self.workers):
                sock = udp if i == 0 else _udp_socket(self.host, self.port)
                self._spawn(sock)
        self.zone.subscribe(self._publish)
        if self.workers > 0:
            self._spawn_task(self._supervise())

    async def _supervise(self) -> None:
        """Replace a worker that died (it should not; a crash must not cost capacity)."""
        while True:
            await asyncio.sleep(1.0)
            for worker in [w for w in self._workers if w.proc.poll() is not None]:
                log.error("dns worker %d exited with %s; restarting", worker.proc.pid,
                          worker.proc.returncode)
                self._retire(worker)
                self._spawn(_udp_socket(self.host, self.port))
            for worker in self._workers:
                if worker.behind:
                    self._notify(worker)

    def _retire(self, worker: _Worker) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(worker.channel.fileno())
        worker.channel.close()
        worker.updates.close()
        self._workers.remove(worker)

    def _spawn(self, udp: socket.socket) -> None:
        ours_u, theirs_u = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours_c, theirs_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours_c, theirs_c):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        fds = (udp.fileno(), theirs_u.fileno(), theirs_c.fileno())
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "svcnet.dns.worker", *map(str, fds),
             "1" if self.slow_only else "0", encode_name(self.zone.zone).hex(),
             self.zone.pods], pass_fds=fds, cwd="/")
        theirs_u.close()
        theirs_c.close()
        udp.close()
        ours_c.setblocking(False)
        ours_u.setblocking(False)
        worker = _Worker(proc, ours_c, ours_u)
        self._workers.append(worker)
        if self.zone.synced:
            self._notify(worker)
        asyncio.get_running_loop().add_reader(ours_c.fileno(), self._on_channel, worker)

    def _notify(self, worker: _Worker) -> None:
        """Tell a worker the table changed (``G``), with the table itself (``T`` + its file
        descriptor) if it has not got this build yet. Notices are idempotent, so one that
        does not fit now is replaced by the next one or the supervisor's retry."""
        table = self.zone.table
        gen = self.zone.generation.to_bytes(8, "big")
        try:
            if worker.table_build != table.builds:
                socket.send_fds(worker.updates, [b"T" + gen], [table.fd])
                worker.table_build = table.builds
            else:
                worker.updates.send(b"G" + gen)
            worker.behind = False
        except (BlockingIOError, InterruptedError):
            worker.behind = True
        except OSError:
            pass  # gone: the supervisor replaces it

    def _publish(self) -> None:
        for worker in self._workers:
            self._notify(worker)

    def _on_channel(self, worker: _Worker) -> None:
        for _ in range(256):
            try:
                msg = worker.channel.recv(70000)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                asyncio.get_running_loop().remove_reader(worker.channel.fileno())
                return
            if not msg:
                asyncio.get_running_loop().remove_reader(worker.channel.fileno())
                return
            kind = msg[:1]
            if kind == b"Q":
                self.handoffs += 1
                addr, n, _ = decode_addr(msg[1:])
                self._spawn_task(self._slow(worker, msg[1:1 + n], msg[1 + n:], addr))
            elif kind == b"M" and self.handler.stats is not None:
                self.handler.stats.fold(pickle.loads(msg[1:]))

    async def _slow(self, worker: _Worker, raw_addr: bytes, data: bytes,
                    addr: tuple[str, int]) -> None:
        gen = self.zone.generation
        response, cacheable = await self.handler.handle_cacheable(
            data, "udp", f"{addr[0]}:{addr[1]}")
        if response is None:
            return
        with contextlib.suppress(OSError):
            if cacheable and gen == self.zone.generation and len(data) < 600:
                # The worker may keep it until the next change: the generation it was
                # computed at, and the query after its ID (the worker's cache key).
                worker.channel.send(b"C" + gen.to_bytes(8, "big") + raw_addr +
                                    len(data).to_bytes(2, "big") + data[2:] + response)
            else:
                worker.channel.send(b"R" + raw_addr + response)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """One TCP client. Every wait is bounded (idle between queries, reading a query,
        writing a reply) and the connection count is capped (at the cap the least recently
        active connection is closed, so a new client still gets answers), so clients that
        connect and stay, or send and never read, cost bounded memory for a bounded time."""
        transport = writer.transport
        clients = self._tcp_clients
        while len(clients) >= self.tcp_max:
            metrics.TCP_REJECTED.inc()
            oldest = next(iter(clients))
            del clients[oldest]
            _reset(oldest)
        clients[transport] = None
        transport.set_write_buffer_limits(high=TCP_WRITE_BUFFER)
        peer = writer.get_extra_info("peername") or ("", 0)
        clean = False
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle)
                except asyncio.IncompleteReadError as err:
                    clean = not err.partial  # the client closed between queries
                    return
                (size,) = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(size), self.tcp_read)
                if transport in clients:  # most recently active last
                    del clients[transport]
                    clients[transport] = None
                response = None if self.handler.log_queries else fast_answer(
                    self.zone.table, data, True) if self.zone.synced else None
                if response is None:
                    response = await self.handler.handle(data, "tcp", f"{peer[0]}:{peer[1]}")
                elif self.handler.stats is not None:
                    self.handler.stats.count("tcp", _qtype(data), response[3] & 0xF,
                                             "kubernetes", 0.0)
                if response is None:
                    clean = True
                    return
                writer.write(struct.pack("!H", len(response)) + response)
                await asyncio.wait_for(writer.drain(), self.tcp_write)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            metrics.TCP_TIMEOUTS.inc()
        finally:
            clients.pop(transport, None)
            if clean and not transport.get_write_buffer_size():
                writer.close()
            else:
                _reset(transport)  # never wait to flush to a client that does not read

    @property
    def tcp_connections(self) -> int:
        return len(self._tcp_clients)

    def alive_workers(self) -> int:
        return sum(1 for w in self._workers if w.proc.poll() is None)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._tcp is not None:
            self._tcp.close()
        if self._udp_transport is not None:
            self._udp_transport.close()
        if self._udp_reader is not None:
            self._udp_reader.close()
        for worker in self._workers:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(worker.channel.fileno())
            worker.proc.kill()
        for worker in self._workers:
            await asyncio.to_thread(worker.proc.wait)
            worker.channel.close()
            worker.updates.close()
        self._workers.clear()
        for task in list(self._tasks):
            task.cancel()


def _reset(transport: asyncio.WriteTransport) -> None:
    """Close with RST: a plain close keeps unsent replies queued in the kernel (FIN_WAIT1)
    for as long as the client keeps its window shut."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _qtype(data: bytes) -> int:
    try:
        end = data.index(0, 12)
        return (data[end + 1] << 8) | data[end + 2]
    except (ValueError, IndexError):
        return 0


class _UDPProtocol(asyncio.DatagramProtocol):
    """``workers=0``: the main process answers UDP itself."""

    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        s = self.server
        response = None if (s.slow_only or s.handler.log_queries or not s.zone.synced) else \
            fast_answer(s.zone.table, data, False)
        if response is not None:
            assert self.transport is not None
            self.transport.sendto(response, addr)
            if s.handler.stats is not None:
                s.handler.stats.count("udp", _qtype(data), response[3] & 0xF, "kubernetes", 0.0)
            return
        s._spawn_task(self._slow(data, addr))

    async def _slow(self, data: bytes, addr: tuple[str, int]) -> None:
        response = await self.server.handler.handle(data, "udp", f"{addr[0]}:{addr[1]}")
        if response is not None and self.transport is not None:
            self.transport.sendto(response, addr)


class _PktinfoUDP:
    """``workers=0`` on a wildcard address: asyncio's datagram transport has no recvmsg, so
    read the socket directly and answer each query from the address it was sent to."""

    def __init__(self, server: DNSServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def _send(self, response: bytes, peer: Any, ctl: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendmsg([response], control(ctl), 0, peer)

    def _readable(self) -> None:
        s = self.server
        for _ in range(256):
            try:
                data, anc, _flags, peer = self.sock.recvmsg(4096, CMSG_ROOM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            ctl = reply_source(anc)
            response = None if (s.slow_only or s.handler.log_queries or not s.zone.synced) \
                else fast_answer(s.zone.table, data, False)
            if response is not None:
                self._send(response, peer, ctl)
                if s.handler.stats is not None:
                    s.handler.stats.count("udp", _qtype(data), response[3] & 0xF, "kubernetes",
                                          0.0)
                continue
            s._spawn_task(self._slow(data, peer, ctl))

    async def _slow(self, data: bytes, peer: Any, ctl: bytes) -> None:
        response = await self.server.handler.handle(data, "udp", f"{peer[0]}:{peer[1]}")
        if response is not None and self.sock.fileno() >= 0:
            self._send(response, peer, ctl)


__all__ = ["DNSServer", "fast_answer"]
