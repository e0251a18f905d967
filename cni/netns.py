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


class NetnsError(OSError):
    """The namespace path does not exist or cannot be entered."""


def _load_setns() -> Callable[[int, int], int]:
    try:
        import _ctypes

        class _Int(_ctypes._SimpleCData):  # type: ignore[name-defined,misc,type-arg]
            _type_ = "i"

        class _Func(_ctypes.CFuncPtr):  # type: ignore[name-defined,misc]
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = _Int

        libc = _ctypes.dlopen(None, 2)  # type: ignore[attr-defined,arg-type]
        func = _Func(_ctypes.dlsym(libc, "setns"))  # type: ignore[attr-defined]
        func.argtypes = (_Int, _Int)
        get_errno = _ctypes.get_errno  # type: ignore[attr-defined]

        def call(fd: int, nstype: int) -> int:
            return 0 if func(fd, nstype) == 0 else -int(get_errno())

        return call
    except (ImportError, AttributeError, OSError, TypeError):  # pragma: no cover
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).setns

        def call_ctypes(fd: int, nstype: int) -> int:
            return 0 if fn(fd, nstype) == 0 else -ctypes.get_errno()

        return call_ctypes


_setns: Callable[[int, int], int] | None = None


def setns(fd: int) -> None:
    global _setns
    if _setns is None:
        _setns = _load_setns()
    rc = _setns(fd, CLONE_NEWNET)
    if rc:
        raise NetnsError(-rc, f"setns: {posix.strerror(-rc)}")


def open_netns(path: str) -> int:
    """An fd for the namespace at ``path``; NetnsError when it is gone or not a netns."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError as err:
        raise NetnsError(err.errno, f"cannot open netns {path}: {err.strerror}") from None
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
