"""The lab's pod workload and its client: tiny, standard-library only, fast to start.

Server: every TCP port answers HTTP with the pod's name (``/clientip`` answers the peer's
address, which shows masquerading); every UDP port answers each datagram with the pod's name.
Client (``call``): N HTTP requests or UDP datagrams, one line per answer (``name`` or
``ERROR reason``), bounded in count and time, for the demo and the end-to-end tests.
``dnsprobe``: DNS lookups the way glibc's stub resolver sends them, one line per try, so a
test can see exactly when and how queries failed while a DNS server restarts.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def serve(name: str, tcp_ports: list[int], udp_ports: list[int], lameduck: float = 0.0,
          sctp_ports: list[int] | None = None) -> None:
    """Serve until killed; with ``lameduck``, SIGTERM means "keep serving that long, then
    exit" (as an application drains), so requests routed here before every proxy dropped
    this endpoint still succeed."""
    if lameduck > 0:
        def drain(_sig: int, _frame: object) -> None:
            threading.Timer(lameduck, os._exit, (0,)).start()

        signal.signal(signal.SIGTERM, drain)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            body = (self.client_address[0] if self.path == "/clientip" else name) + "\n"
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Pod-Name", name)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    threads = []
    for port in tcp_ports:
        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        server.daemon_threads = True
        threads.append(threading.Thread(target=server.serve_forever, daemon=True))
    for port in udp_ports:
        threads.append(threading.Thread(target=_udp_echo, args=(name, port), daemon=True))
    if sctp_ports:
        from svcnet.lab import sctpraw  # raw INIT/INIT-ACK: the host has no SCTP sockets

        threads.append(threading.Thread(target=sctpraw.serve, args=(sctp_ports,), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _udp_echo(name: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    answer = name.encode()
    while True:
        _data, peer = sock.recvfrom(2048)
        sock.sendto(answer, peer)


def http_get(url: str, timeout: float) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    with socket.create_connection((host, port), timeout) as conn:
        conn.settimeout(timeout)
        conn.sendall(f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200 " not in status + " ":
        raise OSError(f"HTTP status {status!r}")
    return body.decode().strip()


def udp_call(target: str, timeout: float) -> str:
    host, _, port = target.rpartition(":")
    addr = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_DGRAM)[0][4]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"hello", addr)
        return sock.recv(2048).decode()


def call(target: str, count: int, timeout: float, interval: float, udp: bool) -> int:
    """Print one line per request; exit status 1 if any failed."""
    failed = 0
    for _ in range(count):
        try:
            answer = udp_call(target, timeout) if udp else http_get(target, timeout)
            print(answer, flush=True)
        except OSError as err:
            failed += 1
            print(f"ERROR {type(err).__name__}: {err}", flush=True)
        if interval:
            time.sleep(interval)
    return 1 if failed else 0


def wait(target: str, timeout: float) -> int:
    """Poll every 20 ms (name lookup + HTTP call); print the seconds it took to succeed."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        try:
            answer = http_get(target, 0.5)
            print(f"{time.monotonic() - start:.3f} {answer}", flush=True)
            return 0
        except OSError as err:
            last = f"{type(err).__name__}: {err}"
        time.sleep(0.02)
    print(f"ERROR after {timeout}s: {last}", flush=True)
    return 1


def dns_query(name: str, qid: int) -> bytes:
    """A recursive A query for ``name``."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split(".") if p)
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(
        "!HH", 1, 1)


def dns_try(sock: socket.socket, query: bytes, timeout: float) -> str:
    """One try on a connected UDP socket: ``ok``, ``refused`` (ICMP port unreachable),
    ``timeout``, or the response code's name (``servfail``, ``nxdomain``, ...)."""
    qid = query[:2]
    sock.send(query)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        if len(data) < 12 or data[:2] != qid:
            continue  # a late answer to an earlier try, as glibc drops it
        rcode = data[3] & 0xF
        if rcode == 0:
            return "ok" if struct.unpack("!H", data[6:8])[0] else "empty"
        return {2: "servfail", 3: "nxdomain", 5: "refused-rcode"}.get(rcode, f"rcode{rcode}")


def dnsprobe(server: str, name: str, count: int, interval: float, timeout: float,
             attempts: int, duration: float) -> int:
    """Lookups modelled on glibc's ``send_dg`` with ``options timeout:T attempts:A``.

    Each lookup opens a connected UDP socket (a new source port, hence a new conntrack
    entry and a fresh load-balancing choice). A try fails on ICMP port unreachable
    (ECONNREFUSED) or SERVFAIL/REFUSED -- glibc then closes the socket, so the retry comes
    from a new port -- or after ``timeout`` without an answer, when glibc retries on the
    same socket (same conntrack entry, same backend). Prints
    ``<monotonic send time> <lookup> <try> <outcome> <seconds>`` per try.
    """
    failed = 0
    end = time.monotonic() + duration
    for lookup in range(count):
        if time.monotonic() >= end:
            break
        sock: socket.socket | None = None
        ok = False
        try:
            for attempt in range(attempts):
                if sock is None:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.connect((server, 53))
                sent = time.monotonic()
                outcome = dns_try(sock, dns_query(name, random.randrange(65536)), timeout)
                print(f"{sent:.4f} {lookup} {attempt} {outcome} "
                      f"{time.monotonic() - sent:.4f}", flush=True)
                if outcome == "ok":
                    ok = True
                    break
                if outcome != "timeout":
                    sock.close()
                    sock = None
        finally:
            if sock is not None:
                sock.close()
        failed += not ok
        if interval:
            time.sleep(interval)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svcnet.lab.echo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", default=os.environ.get("POD_NAME", socket.gethostname()))
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--udp", type=int, action="append", default=[])
    s.add_argument("--sctp", type=int, action="append", default=[],
                   help="answer SCTP INITs on this port (raw sockets, see sctpraw)")
    s.add_argument("--lameduck", type=float, default=0.0,
                   help="seconds to keep serving after SIGTERM")
    c = sub.add_parser("call")
    c.add_argument("target", help="http://HOST[:PORT]/PATH, or HOST:PORT with --udp")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--timeout", type=float, default=2.0)
    c.add_argument("--interval", type=float, default=0.0)
    c.add_argument("--udp", action="store_true")
    w = sub.add_parser("wait", help="seconds until the first successful HTTP call")
    w.add_argument("target")
    w.add_argument("--timeout", type=float, default=10.0)
    d = sub.add_parser("dnsprobe", help="glibc-like DNS lookups, one line per try")
    d.add_argument("server")
    d.add_argument("name")
    d.add_argument("--count", type=int, default=100)
    d.add_argument("--interval", type=float, default=0.01)
    d.add_argument("--timeout", type=float, default=1.0, help="per try (resolv.conf timeout:)")
    d.add_argument("--attempts", type=int, default=2, help="tries (resolv.conf attempts:)")
    d.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    r = sub.add_parser("resolve", help="resolve a name with the system resolver")
    r.add_argument("name")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.name, args.tcp or ([] if args.udp or args.sctp else [8080]), args.udp,
              args.lameduck, args.sctp)
        return 0
    if args.cmd == "call":
        return call(args.target, args.count, args.timeout, args.interval, args.udp)
    if args.cmd == "wait":
        return wait(args.target, args.timeout)
    if args.cmd == "dnsprobe":
        return dnsprobe(args.server, args.name, args.count, args.interval, args.timeout,
                        args.attempts, args.duration)
    try:
        infos = socket.getaddrinfo(args.name, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as err:
        print(f"ERROR {err}")
        return 1
    print(" ".join(sorted({str(i[4][0]) for i in infos})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
