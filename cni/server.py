"""The node daemon's CNI socket: the plugin's work done by a resident process.

A CNI invocation is a new process; a Python one pays ~11 ms of interpreter start and ~4 ms
of imports before its first netlink message. The ``svcnet-cni`` that ``svcnet cni install``
writes by default is a small Perl client (builtins only, ~2 ms) that hands the request to
this server and prints the answer, and runs the in-process plugin when no server accepts it.

Protocol (one request per connection, integers big-endian u32):

1. client -> server: ``len, head`` where head is ``K=V`` entries separated by NUL: the
   client's ``CNI_*`` variables, ``SVCNET_CNI_ARGV0`` (the name it was invoked as),
   ``SVCNET_NETNS=<dev>:<inode>`` of its network namespace and ``SVCNET_CNI_NETNS_ID``, the
   ``<dev>:<inode>`` that ``CNI_NETNS`` has for the client ('' if it cannot stat it).
2. server -> client: ``1`` (accepted) -- only for a root peer (SO_PEERCRED) in the server's
   own network namespace, and for ADD and CHECK only when ``CNI_NETNS`` is the same
   namespace for the server as for the client (a daemon in another mount namespace may not
   see the runtime's ``/run/netns``, or see another namespace under that name). Otherwise
   ``0, len, reason`` (declined: nothing was done) and the server closes; the client runs
   in-process, in its own namespaces. Until this byte the server has not read stdin, so
   falling back can never apply a request twice.
3. client -> server: ``len, stdin``; the server acts only on a complete request.
4. server -> client: status byte (``0``/``1``), ``len``, the plugin's stdout.

After step 2 the request is the server's: if the answer does not arrive complete, the
client reports ADD as "try again" (code 11: it may be partly applied, and ADD on an existing
attachment fails anyway) and re-runs the idempotent verbs in-process.

The server is ``svcnet cni serve``, which ``svcnet node`` runs as a child process. Each
request runs on its own thread: namespace switches (``setns``) and netlink sockets are per
thread, and the IPAM ``flock`` is per open file, so requests exclude each other exactly as
separate processes do. One server per socket path: a ``flock`` on ``<path>.lock`` held for
the server's life decides who owns the path (a stale socket of a killed server is replaced,
a live one is left alone).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import threading
import time
from typing import Any

from .cli import DEFAULT_SOCKET
from .fastjson import dumps
from .spec import LATEST, CniError

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
_LEN = struct.Struct(">I")
MAX_HEAD = 1 << 16
MAX_REQUEST = 1 << 26  # far above any network configuration; bounds memory per request
ACCEPTED = b"1"
DECLINED = b"0"
NOTE_INTERVAL_S = 60.0  # a declined kind of request is logged at most this often
_noted: dict[str, float] = {}


class Declined(PermissionError):
    """This request is not served here; ``reason`` goes to the client, which runs it
    in-process, and (rate-limited) to the log."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class SocketBusy(OSError):
    """Another live server owns the socket path."""


def netns_id() -> str:
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        data = conn.recv(min(size, 65536))
        if not data:
            raise ConnectionError("client closed the connection mid-request")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _recv_frame(conn: socket.socket, limit: int) -> bytes:
    (size,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
    if size > limit:
        raise ValueError(f"frame of {size} bytes exceeds {limit}")
    return _recv_exact(conn, size)


def parse_head(head: bytes) -> dict[str, str]:
    env = {}
    for item in head.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode()] = value.decode(errors="surrogateescape")
    return env


def path_id(path: str) -> str:
    """``<dev>:<inode>`` of what ``path`` names here ('' if nothing): a namespace file's
    identity, the same in every mount namespace."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def accept_request(conn: socket.socket, own_netns: str) -> dict[str, str]:
    """Steps 1-2: the client's environment, once it may be served here."""
    _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    if uid != 0:
        raise Declined("uid", f"client uid {uid} is not root")
    env = parse_head(_recv_frame(conn, MAX_HEAD))
    if env.get("SVCNET_NETNS") != own_netns:
        raise Declined("netns", f"the client's network namespace {env.get('SVCNET_NETNS')} "
                       f"is not the node daemon's {own_netns}")
    netns = env.get("CNI_NETNS", "")
    client_view = env.get("SVCNET_CNI_NETNS_ID")  # absent from clients installed earlier
    seen = path_id(netns) if env.get("CNI_COMMAND") in ("ADD", "CHECK") and netns else None
    if seen is not None and client_view is not None and seen != client_view:
        raise Declined("mount", f"CNI_NETNS {netns} is "
                       + (f"another namespace ({seen}, the client's is {client_view or 'none'})"
                          if seen else "not there")
                       + " for the node daemon: it runs in another mount namespace than the "
                       "runtime (give it the host's /run)")
    return env


def note_declined(err: Declined) -> None:
    """Log a declined request, at most once per NOTE_INTERVAL_S for each kind."""
    now = time.monotonic()
    if now - _noted.get(err.kind, -NOTE_INTERVAL_S) >= NOTE_INTERVAL_S:
        _noted[err.kind] = now
        log.warning("CNI request left to the in-process plugin: %s (logged at most every "
                    "%.0f s)", err.reason, NOTE_INTERVAL_S)


def answer(env: dict[str, str], stdin: bytes) -> bytes:
    """Step 4's payload: what the in-process plugin would print, and its exit status."""
    from .main import _error_version, run, unexpected_error

    try:
        out = run(env.get("CNI_COMMAND", ""), stdin, env,
                  env.get("SVCNET_CNI_ARGV0", "svcnet-cni"))
        status, body = b"0", (dumps(out).encode() if out is not None else b"")
    except CniError as err:
        status, body = b"1", dumps(err.to_json(_error_version(stdin))).encode()
    except Exception as err:  # still speak the protocol
        doc = unexpected_error(err).to_json(_error_version(stdin) if stdin else LATEST)
        status, body = b"1", dumps(doc).encode()
    return status + _LEN.pack(len(body)) + body


def handle(conn: socket.socket, own_netns: str) -> None:
    with conn:
        try:
            env = accept_request(conn, own_netns)
            conn.sendall(ACCEPTED)
            stdin = _recv_frame(conn, MAX_REQUEST)
        except Declined as err:  # before the accept byte: the client runs it in-process
            note_declined(err)
            reason = err.reason.encode()[:4096]
            with contextlib.suppress(OSError):
                conn.sendall(DECLINED + _LEN.pack(len(reason)) + reason)
            return
        except (OSError, ValueError) as err:  # the client went away: do nothing
            log.debug("CNI request not served: %s", err)
            return
        reply = answer(env, stdin)
        with contextlib.suppress(OSError):
            conn.sendall(reply)


def _claim(path: str) -> int:
    """Lock ``<path>.lock`` for the server's life, or raise :class:`SocketBusy`."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SocketBusy(f"{path} is served by another process") from None
    return fd


def serve(path: str, ready: threading.Event | None = None,
          stop: threading.Event | None = None) -> None:
    """Accept requests on the UNIX socket ``path`` (mode 0600) until ``stop`` is set."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    lock_fd = _claim(path)
    own_netns = netns_id()
    from . import bridge, main  # noqa: F401  (imported once here, not on the first request)

    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a killed server's socket: the lock says nobody serves it
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            server.bind(path)
        finally:
            os.umask(old_umask)
        server.listen(128)
        server.settimeout(0.5)
        log.info("serving svcnet-cni requests on %s (network namespace %s); svcnet-cni "
                 "runs in-process while nothing serves it, and says so on its stderr",
                 path, own_netns)
        if ready is not None:
            ready.set()
        try:
            while stop is None or not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conn.settimeout(120)
                threading.Thread(target=handle, args=(conn, own_netns), daemon=True).start()
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(lock_fd)


def exit_with_parent(parent_pid: int) -> bool:
    """Have the kernel send SIGTERM when our parent dies (PR_SET_PDEATHSIG); False if it
    already has."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    return os.getppid() == parent_pid


class ServerComponent:
    """``svcnet node`` component: ``svcnet cni serve`` as a child process, restarted if it
    exits, stopped (and the socket removed) with the node daemon.

    A child process rather than a thread: the node daemon's proxy and DNS run Python too, and
    a CNI request on a thread of the same process waits for the GIL after every system call
    while they compute (with one CPU-bound thread in the daemon, ADD measured 1.22-1.48x the
    reference on a thread, 0.75-1.17x in the child; docs/cni.md); a crash in the plugin code
    cannot take the proxy down either. The child dies with the daemon (PR_SET_PDEATHSIG).

    ``required`` is False when the node daemon serves the socket by default: then a path
    owned by another live server, or one it cannot create, is logged and retried every
    ``retry_s`` instead of stopping the node's other components (svcnet-cni runs in-process
    meanwhile)."""

    name = "cni-server"

    def __init__(self, path: str, required: bool = True, retry_s: float = 10.0) -> None:
        self.path = path
        self.required = required
        self.retry_s = retry_s

    def argv(self) -> list[str]:
        import sys

        return [sys.executable, "-c", "import sys; from svcnet.cni.cli import serve_child; "
                "sys.exit(serve_child(sys.argv[1:]))", self.path, str(os.getpid()),
                str(logging.getLogger().getEffectiveLevel())]

    async def run(self, factory: object, store: object) -> None:
        import asyncio

        warned = 0.0
        while True:
            try:  # checked here too, so a busy path costs no process start per retry
                directory = os.path.dirname(self.path)
                if directory:
                    os.makedirs(directory, mode=0o700, exist_ok=True)
                os.close(_claim(self.path))
            except OSError as err:
                problem = str(err)
            else:
                child = await asyncio.create_subprocess_exec(*self.argv())
                try:
                    status = await child.wait()
                finally:
                    if child.returncode is None:
                        child.terminate()
                        try:
                            await asyncio.wait_for(child.wait(), 5)
                        except TimeoutError:
                            child.kill()
                            await child.wait()
                problem = f"svcnet cni serve exited with status {status}"
            if self.required:
                raise RuntimeError(f"CNI socket {self.path}: {problem}")
            if time.monotonic() - warned > 600:
                log.warning("the CNI socket %s is not served (%s); svcnet-cni runs in-process "
                            "meanwhile; retrying every %.0f s", self.path, problem,
                            self.retry_s)
                warned = time.monotonic()
            await asyncio.sleep(self.retry_s)


def add_node_arguments(parser: Any) -> None:
    """``svcnet node`` serves the svcnet-cni socket unless ``--no-cni-server``."""
    parser.add_argument("--cni-server-socket", default=None,
                        help="socket svcnet-cni hands its requests to (svcnet cni install "
                             f"--socket; default {DEFAULT_SOCKET}); served by default")
    parser.add_argument("--no-cni-server", action="store_true",
                        help="do not serve the CNI socket (svcnet-cni then runs in-process)")


def on_by_default(args: Any) -> bool:
    """Serve where the pods' plugin runs: in the host's network namespace, or wherever a
    socket is named. A daemon in another namespace (a test, a lab node) serves only its own
    namespace's clients, so taking the host's socket path would just lock the host out."""
    if args.no_cni_server:
        return False
    return args.cni_server_socket is not None or _in_host_netns()


def _in_host_netns() -> bool:
    """Ours is pid 1's namespace; where pid 1's is not readable, it is at least not one
    made with ``ip netns add`` (as ``ip netns identify`` finds them)."""
    try:
        mine = os.stat("/proc/self/ns/net")
    except OSError:
        return True
    try:
        return mine.st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        pass
    with contextlib.suppress(OSError), os.scandir("/run/netns") as named:
        for entry in named:
            with contextlib.suppress(OSError):
                st = os.stat(entry.path)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    return False
    return True


def node_component(args: Any) -> ServerComponent:
    return ServerComponent(args.cni_server_socket or DEFAULT_SOCKET,
                           required=bool(args.cni_server))
