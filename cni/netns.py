"""Entering a network namespace just long enough to open sockets and write sysctls there.

Python 3.11 has no ``posix.setns``; ``ctypes`` would cost ~5 ms of start-up, so the libc
``setns`` symbol is called through the ``_ctypes`` core directly (falling back to ``ctypes``
when that private API differs). The process is single-threaded, so switching its namespace
and back is safe; callers keep the window short and never run foreign code inside it.
"""

from __future__ import annotations

import posix

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

CLONE_NEWNET = 0x40000000


NSFS_MAGIC = 0x6E736673  # statfs f_type of namespace files (linux/magic.h)
NS_GET_NSTYPE = 0xB703  # ioctl: which kind of namespace an nsfs file is (linux/nsfs.h)
_S_IFMT, _S_IFREG, _S_IFDIR, _S_IFIFO = 0o170000, 0o100000, 0o040000, 0o010000


class NetnsError(OSError):
    """The namespace path does not exist or cannot be entered."""


class NotANetns(NetnsError):
    """The path exists but is not a network namespace (a plain file, directory, FIFO...)."""


def _load_libc() -> tuple[Callable[[int, int], int], Callable[[int], int]]:
    """``setns(fd, nstype)`` and ``fstatfs(fd) -> f_type``, each returning ``-errno`` on
    failure."""
    try:
        import _ctypes

        class _Int(_ctypes._SimpleCData):  # type: ignore[name-defined,misc,type-arg]
            _type_ = "i"

        class _Long(_ctypes._SimpleCData):  # type: ignore[name-defined,misc,type-arg]
            _type_ = "l"

        class _StatfsBuf(_ctypes.Array):  # type: ignore[name-defined,misc,type-arg]
            _type_ = _Long
            _length_ = 32  # struct statfs is 120 bytes on 64-bit Linux; f_type comes first

        class _Func(_ctypes.CFuncPtr):  # type: ignore[name-defined,misc]
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = _Int

        libc = _ctypes.dlopen(None, 2)  # type: ignore[attr-defined,arg-type]
        setns_fn = _Func(_ctypes.dlsym(libc, "setns"))  # type: ignore[attr-defined]
        setns_fn.argtypes = (_Int, _Int)
        fstatfs_fn = _Func(_ctypes.dlsym(libc, "fstatfs"))  # type: ignore[attr-defined]
        get_errno = _ctypes.get_errno  # type: ignore[attr-defined]

        def call(fd: int, nstype: int) -> int:
            return 0 if setns_fn(fd, nstype) == 0 else -int(get_errno())

        def fstatfs_type(fd: int) -> int:
            buf = _StatfsBuf()
            if fstatfs_fn(fd, buf) != 0:
                return -int(get_errno())
            return int(buf[0]) & 0xFFFFFFFF

        return call, fstatfs_type
    except (ImportError, AttributeError, OSError, TypeError):  # pragma: no cover
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)

        def call_ctypes(fd: int, nstype: int) -> int:
            return 0 if lib.setns(fd, nstype) == 0 else -ctypes.get_errno()

        def fstatfs_ctypes(fd: int) -> int:
            buf = (ctypes.c_long * 32)()
            if lib.fstatfs(fd, buf) != 0:
                return -ctypes.get_errno()
            return int(buf[0]) & 0xFFFFFFFF

        return call_ctypes, fstatfs_ctypes


_libc: tuple[Callable[[int, int], int], Callable[[int], int]] | None = None


def _libc_calls() -> tuple[Callable[[int, int], int], Callable[[int], int]]:
    global _libc
    if _libc is None:
        _libc = _load_libc()
    return _libc


def setns(fd: int) -> None:
    rc = _libc_calls()[0](fd, CLONE_NEWNET)
    if rc:
        raise NetnsError(-rc, f"setns: {posix.strerror(-rc)}")


def open_netns(path: str) -> int:
    """An fd for the network namespace at ``path``.

    NetnsError when nothing is there; NotANetns when something else is: checked by
    ``stat`` before opening (so a FIFO or a device is never opened, which could block or
    have side effects), then ``fstatfs`` (nsfs) and ``NS_GET_NSTYPE`` on the open file. A
    caller checks this before it allocates anything."""
    try:
        st = posix.stat(path)
    except OSError as err:
        raise NetnsError(err.errno, f"cannot open netns {path}: {err.strerror}") from None
    kind = st.st_mode & _S_IFMT
    if kind != _S_IFREG:
        what = {_S_IFDIR: "a directory", _S_IFIFO: "a FIFO"}.get(kind, "a device or socket")
        raise NotANetns(22, f"{path} is {what}, not a network namespace")
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NONBLOCK
                        | posix.O_NOCTTY)
    except OSError as err:
        raise NetnsError(err.errno, f"cannot open netns {path}: {err.strerror}") from None
    try:
        fs_type = _libc_calls()[1](fd)
        if fs_type < 0:
            raise NetnsError(-fs_type, f"cannot inspect {path}: {posix.strerror(-fs_type)}")
        if fs_type != NSFS_MAGIC:
            raise NotANetns(22, f"{path} is a file (filesystem type {fs_type:#x}), not a "
                            "namespace: expected a bind mount of /proc/<pid>/ns/net (nsfs)")
        import fcntl

        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as err:
            raise NetnsError(err.errno, f"cannot inspect namespace {path}: {err.strerror}"
                             ) from None
        if nstype != CLONE_NEWNET:
            raise NotANetns(22, f"{path} is a namespace of another kind ({nstype:#x}), not a "
                            "network namespace")
    except BaseException:
        posix.close(fd)
        raise
    return fd


class InNetns:
    """``with InNetns(fd):`` runs the block in that namespace and always switches back."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._home = -1

    def __enter__(self) -> None:
        self._home = posix.open("/proc/thread-self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC)
        try:
            setns(self._fd)
        except BaseException:
            posix.close(self._home)
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            setns(self._home)
        finally:
            posix.close(self._home)


def write_sysctl(path: str, value: str) -> None:
    """Write ``/proc/sys/<path>`` (``path`` with ``/``); the current netns decides which
    namespace's value changes, so call inside :class:`InNetns` for the pod's side."""
    fd = posix.open("/proc/sys/" + path, posix.O_WRONLY | posix.O_CLOEXEC)
    try:
        posix.write(fd, value.encode())
    finally:
        posix.close(fd)


def read_sysctl(path: str) -> str:
    with open("/proc/sys/" + path, encoding="utf-8") as f:
        return f.read().strip()
