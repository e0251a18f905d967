"""Running a helper binary (``nft``, a delegated IPAM plugin) without ``subprocess``.

``subprocess`` imports ``selectors``, ``signal``, ``threading`` and friends (~5 ms); a plugin
runs at most two children, so ``posix_spawn`` plus two pipes and ``poll`` is enough.
"""

from __future__ import annotations

import posix
import select


class SpawnError(OSError):
    """The binary could not be started at all."""


def run(argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None,
        timeout_s: float = 30.0) -> tuple[int, bytes, bytes]:
    """Run ``argv`` to completion; returns (exit status, stdout, stderr)."""
    in_r, in_w = posix.pipe()
    out_r, out_w = posix.pipe()
    err_r, err_w = posix.pipe()
    actions = [(posix.POSIX_SPAWN_DUP2, in_r, 0), (posix.POSIX_SPAWN_DUP2, out_w, 1),
               (posix.POSIX_SPAWN_DUP2, err_w, 2)]
    try:
        pid = posix.posix_spawnp(argv[0], argv, posix.environ if env is None else env,
                              file_actions=actions)
    except OSError as err:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
            posix.close(fd)
        raise SpawnError(err.errno, f"cannot run {argv[0]}: {err.strerror}") from None
    for fd in (in_r, out_w, err_w):
        posix.close(fd)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    poller = select.poll()
    for fd in chunks:
        poller.register(fd, select.POLLIN)
    pending = stdin
    if pending:
        poller.register(in_w, select.POLLOUT)
    else:
        posix.close(in_w)
    open_fds = set(chunks)
    deadline_ms = int(timeout_s * 1000)
    try:
        while open_fds or pending:
            events = poller.poll(deadline_ms)
            if not events:
                posix.kill(pid, 9)
                raise SpawnError(110, f"{argv[0]} did not finish in {timeout_s:.0f} s")
            for fd, _event in events:
                if fd == in_w:
                    try:
                        sent = posix.write(in_w, pending[:65536])
                    except BrokenPipeError:
                        sent = len(pending)
                    pending = pending[sent:]
                    if not pending:
                        poller.unregister(in_w)
                        posix.close(in_w)
                    continue
                data = posix.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    poller.unregister(fd)
                    open_fds.discard(fd)
    finally:
        for fd in (out_r, err_r):
            posix.close(fd)
        if pending:
            posix.close(in_w)
        _, status = posix.waitpid(pid, 0)
    return posix.waitstatus_to_exitcode(status), b"".join(chunks[out_r]), b"".join(chunks[err_r])
