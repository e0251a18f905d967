"""The one adapter through which the proxy runs kernel tools (nft, iptables-restore, ...).

Real runs go through ``subprocess``, optionally inside a named network namespace via
``ip netns exec`` (tests and the bench drive a throwaway node namespace this way; the daemon
itself normally already runs inside its node's namespace). ``FakeCommands`` records calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from svcnet.proxy.sealed_input import Seal, sealed_pieces, write_pieces

PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size


class CommandFailed(Exception):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()[:2000]}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class Commands(Protocol):
    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        """Run a tool, return its stdout; raise ``CommandFailed`` on a non-zero exit."""
        ...

    def stream(self, argv: Sequence[str], chunks: Iterable[str], *,
               seal: Seal | None = None, quiet: bool = False) -> str:
        """``run`` with stdin fed while ``chunks`` are produced (see SubprocessCommands);
        a runner that cannot stream may join them (unsealed: the seal only guards a
        writer dying mid-stream)."""
        ...


@dataclass(frozen=True, slots=True)
class SubprocessCommands:
    netns: str | None = None
    timeout: float = 1200.0

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        full = ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)
        proc = subprocess.run(
            full, input=input, capture_output=True, text=True, timeout=self.timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr)
        return proc.stdout

    def stream(self, argv: Sequence[str], chunks: Iterable[str], *,
               seal: Seal | None = None, quiet: bool = False) -> str:
        """Like ``run``, but feeds stdin while ``chunks`` are still being produced, so the
        tool parses the start of a large input while we generate the rest. With ``seal``,
        a tool that sees end-of-input early (we died) finds it unparseable and applies
        nothing (``sealed_input``). ``quiet`` discards the tool's output (returns "")."""
        full = ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)
        with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(full, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL if quiet else out, stderr=err,
                                    text=True)
            assert proc.stdin is not None
            with contextlib.suppress(OSError):  # fewer hand-overs between us and the tool
                fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            # The timeout covers the whole run: a slow tool blocks our writes, not only
            # the final wait.
            fired = threading.Event()

            def kill() -> None:
                fired.set()
                proc.kill()

            timer = threading.Timer(self.timeout, kill)
            timer.start()
            try:
                try:
                    if seal is None:
                        for chunk in chunks:
                            proc.stdin.write(chunk)
                    else:
                        write_pieces(proc.stdin.fileno(), sealed_pieces(chunks, seal))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # the tool died early; its exit status and stderr say why
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
                code = proc.wait()
            finally:
                timer.cancel()
            if fired.is_set() and code < 0:
                raise subprocess.TimeoutExpired(argv, self.timeout)
            err.seek(0)
            out.seek(0)
            if code != 0:
                raise CommandFailed(argv, code, err.read())
            return out.read()


@dataclass(slots=True)
class FakeCommands:
    """Records every call; ``responder`` decides output and failures for unit tests."""

    responder: Callable[[Sequence[str], str | None], str] | None = None
    calls: list[tuple[list[str], str | None]] = field(default_factory=list)

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
        self.calls.append((list(argv), input))
        return self.responder(argv, input) if self.responder else ""

    def stream(self, argv: Sequence[str], chunks: Iterable[str], *,
               seal: Seal | None = None, quiet: bool = False) -> str:
        out = self.run(argv, input="".join(chunks))
        return "" if quiet else out
