"""The lab's one adapter to the kernel: network namespaces, links via ``ip``, processes.

Everything the lab does to the kernel goes through ``Kernel`` so the planning code can be
unit-tested against ``FakeKernel``. Links are only ever created *inside* lab namespaces
(``ip -n NS ...``), never in the root namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000


class KernelError(RuntimeError):
    """A kernel-touching command failed; the message carries its stderr."""


class Kernel(Protocol):
    def add_netns(self, name: str) -> None: ...

    def delete_netns(self, name: str) -> None:
        """Delete a namespace; a missing one is not an error."""
        ...

    def netns_exists(self, name: str) -> bool: ...

    def ip_batch(self, ns: str, commands: Sequence[str]) -> None:
        """Run ``ip`` commands inside ``ns`` in one ``ip -batch`` process."""
        ...

    def pids_in(self, ns: str) -> list[int]: ...

    def spawn(self, ns: str, argv: Sequence[str], log: Path, *, mount_ns: bool = True,
              env: dict[str, str] | None = None) -> int:
        """Start a detached process in ``ns`` and return its pid.

        ``mount_ns=True`` uses ``ip netns exec`` (private mounts: /etc/netns/NS/* files are
        bind-mounted over /etc, e.g. resolv.conf); ``False`` uses ``nsenter --net`` so the
        process shares the root mount namespace and the namespaces it creates are visible
        to everybody (the kubelet stand-in needs that).
        """
        ...


def _run(argv: Sequence[str], *, input: str | None = None, timeout: float = 30) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise KernelError(f"{' '.join(argv[:6])}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


class RealKernel:
    """``Kernel`` on the running system, through iproute2 and nsenter."""

    def add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def delete_netns(self, name: str) -> None:
        if self.netns_exists(name):
            with contextlib.suppress(KernelError):
                _run(["ip", "netns", "delete", name])

    def netns_exists(self, name: str) -> bool:
        return (NETNS_DIR / name).exists()

    def ip_batch(self, ns: str, commands: Sequence[str]) -> None:
        if commands:
            _run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")

    def pids_in(self, ns: str) -> list[int]:
        if not self.netns_exists(ns):
            return []
        try:
            out = _run(["ip", "netns", "pids", ns])
        except KernelError:
            return []
        return [int(p) for p in out.split() if p.isdigit()]

    def spawn(self, ns: str, argv: Sequence[str], log: Path, *, mount_ns: bool = True,
              env: dict[str, str] | None = None) -> int:
        prefix = (["ip", "netns", "exec", ns] if mount_ns
                  else ["nsenter", f"--net={NETNS_DIR / ns}"])
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*prefix, *argv], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        return proc.pid


@dataclass
class FakeKernel:
    """Records what would be done; namespaces and processes are just names and numbers."""

    namespaces: set[str] = field(default_factory=set)
    commands: list[tuple[str, str]] = field(default_factory=list)
    processes: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    next_pid: int = 1000

    def add_netns(self, name: str) -> None:
        if name in self.namespaces:
            raise KernelError(f"netns {name} exists")
        self.namespaces.add(name)

    def delete_netns(self, name: str) -> None:
        self.namespaces.discard(name)
        for pid in [p for p, (ns, _) in self.processes.items() if ns == name]:
            del self.processes[pid]

    def netns_exists(self, name: str) -> bool:
        return name in self.namespaces

    def ip_batch(self, ns: str, commands: Sequence[str]) -> None:
        if ns not in self.namespaces:
            raise KernelError(f"netns {ns} does not exist")
        self.commands += [(ns, c) for c in commands]

    def pids_in(self, ns: str) -> list[int]:
        return [p for p, (n, _) in self.processes.items() if n == ns]

    def spawn(self, ns: str, argv: Sequence[str], log: Path, *, mount_ns: bool = True,
              env: dict[str, str] | None = None) -> int:
        if ns not in self.namespaces:
            raise KernelError(f"netns {ns} does not exist")
        self.next_pid += 1
        self.processes[self.next_pid] = (ns, tuple(argv))
        return self.next_pid


def kill_pids(pids: Sequence[int], *, grace: float = 0.0) -> None:
    """SIGTERM (if ``grace``) then SIGKILL each pid; already-gone pids are fine."""
    if grace > 0:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def enter_netns(name: str) -> None:
    """Move the calling thread (call it before any other thread exists) into ``name``.

    Threads started afterwards inherit the namespace, so a CLI can talk to the lab's etcd,
    which is reachable only on the lab's underlay.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise KernelError(f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns_thread(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a short-lived thread that has entered ``name``; return its result.

    Sockets created there stay in that namespace; the caller's thread never moves.
    """
    box: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            enter_netns(name)
            box.append(fn())
        except BaseException as err:  # re-raised on the caller's thread
            errors.append(err)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


def tcp_open(ns: str, host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connect from inside ``ns`` to host:port succeeds."""

    def attempt() -> bool:
        try:
            with socket.create_connection((host, port), timeout):
                return True
        except OSError:
            return False

    return in_netns_thread(ns, attempt)
