"""``svcnet cni serve``: the plugin's work done by a resident process (the fast path).

A CNI invocation is a new process; a Python one pays ~11 ms of interpreter start and ~4 ms
of imports before its first netlink message. The fast-path client that ``svcnet cni install
--fast-path`` writes is a POSIX shell script that hands stdin to this server through
``socat`` and prints the answer, so a pod operation costs a shell, a socat and the kernel
work. The request protocol is the CNI one itself: the server takes the ``CNI_*`` variables
from the connected client's ``/proc/<pid>/environ`` (peer identified with SO_PEERCRED, root
only), stdin is the rest of the stream, and the reply is one status byte (``0``/``1``)
followed by the plugin's stdout. When the socket is absent the client runs the in-process
plugin instead, with identical behaviour.

Each request runs on its own thread: namespace switches (``setns``) and netlink sockets are
per thread, and the IPAM ``flock`` is per open file, so requests exclude each other exactly as
separate processes do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from typing import Any

from .fastjson import dumps
from .spec import ERR_INTERNAL, LATEST, CniError

_UCRED = struct.Struct("3i")
MAX_REQUEST = 1 << 20


def peer_environ(conn: socket.socket) -> dict[str, str]:
    pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   _UCRED.size))
    if uid != 0:
        raise PermissionError(f"client uid {uid} is not root")
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and (key.startswith(b"CNI_") or key in (b"SVCNET_CNI_ARGV0", b"PATH")):
            env[key.decode()] = value.decode(errors="surrogateescape")
    return env


def handle(conn: socket.socket) -> None:
    from .main import _error_version, run

    with conn:
        stdin = b""
        try:
            env = peer_environ(conn)
            chunks = []
            size = 0
            while size <= MAX_REQUEST:
                data = conn.recv(65536)
                if not data:
                    break
                chunks.append(data)
                size += len(data)
            stdin = b"".join(chunks)
            out = run(env.get("CNI_COMMAND", ""), stdin, env,
                      env.get("SVCNET_CNI_ARGV0", "svcnet-cni"))
            reply = b"0" + (dumps(out).encode() if out is not None else b"")
        except CniError as err:
            reply = b"1" + dumps(err.to_json(_error_version(stdin))).encode()
        except Exception as err:
            doc = CniError(ERR_INTERNAL, f"internal error: {type(err).__name__}: {err}"
                           ).to_json(_error_version(stdin) if stdin else LATEST)
            reply = b"1" + dumps(doc).encode()
        with contextlib.suppress(OSError):
            conn.sendall(reply)


def serve(path: str, ready: threading.Event | None = None,
          stop: threading.Event | None = None) -> None:
    """Accept requests on the UNIX socket ``path`` (mode 0600) until ``stop`` is set."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old_umask)
    server.listen(128)
    server.settimeout(0.5)
    if ready is not None:
        ready.set()
    try:
        while stop is None or not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(120)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class ServerComponent:
    """``svcnet node`` component running :func:`serve` on a thread until cancelled, so the
    fast-path client finds its server whenever the node daemon is up."""

    name = "cni-server"

    def __init__(self, path: str) -> None:
        self.path = path

    async def run(self, factory: object, store: object) -> None:
        import asyncio

        stop = threading.Event()
        try:
            await asyncio.to_thread(serve, self.path, None, stop)
        finally:
            stop.set()


def add_node_arguments(parser: Any) -> None:
    """``svcnet node --cni-server``: serve the CNI fast-path socket from the node daemon."""
    parser.add_argument("--cni-server-socket", default="/run/svcnet/cni.sock",
                        help="socket of the CNI fast path (see svcnet cni install --fast-path)")


def node_component(args: Any) -> ServerComponent:
    return ServerComponent(args.cni_server_socket)
