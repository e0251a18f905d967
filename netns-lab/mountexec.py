"""``python -m svcnet.lab.mountexec SPEC [-- ARGV...]``: exec a container's command in a
private mount namespace with its volumes bound in place, as a runtime sets up a container.

The lab has no image to unpack, so a "container" is the host's filesystem seen through a
mount namespace of its own (``unshare(CLONE_NEWNS)``, everything slave to the host):
- ``/run`` is a fresh tmpfs (a container's own ``/run``), with the host's ``/run/netns``
  bound back (the runtime's pod namespaces, which the CNI server enters);
- a top-level directory in which a mount point has to be created (``/etc/svcnet``,
  ``/opt/cni/bin``) gets an overlay whose upper layer is in the container's scratch
  directory, so nothing is ever created on the host; ``/etc`` always gets one, and the
  container's ``resolv.conf`` and ``hostname`` are written into it;
- each volume is bind-mounted (from a descriptor opened before ``/run`` was covered, since
  the lab's own directory may be under it), read-only when asked.

Stdlib only and no lab imports: it runs once per container start and per CNI plugin call.
The spec is the JSON of ``svcnet.lab.podrun.ContainerSpec``.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {source} on {target}")


def _existing(path: str) -> str:
    """The deepest ancestor of ``path`` that exists."""
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _top(path: str) -> str:
    """The top-level directory ``path`` really lives in (``/var/run/x`` -> ``/run``)."""
    real = os.path.realpath(_existing(path))
    return "/" + real.strip("/").split("/", 1)[0]


def overlay_tops(targets: list[str]) -> list[str]:
    """Top-level directories that need an overlay: ``/etc`` (resolv.conf), and any where a
    mount point does not exist yet (except ``/run``, a tmpfs of our own)."""
    tops = {"/etc"}
    for target in targets:
        if not os.path.lexists(target) and _top(target) not in ("/run", "/"):
            tops.add(_top(target))
    return sorted(tops)


def setup(spec: dict[str, Any]) -> None:
    """Build the container's mount namespace in this process."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_SLAVE)
    binds: list[dict[str, Any]] = spec.get("binds", [])
    files: dict[str, str] = spec.get("files", {})
    scratch: str = spec["scratch"]
    # Descriptors first: the sources may be under /run, which is covered below.
    fds = [os.open(b["source"], os.O_PATH) for b in binds]
    netns_fd = os.open("/run/netns", os.O_PATH) if os.path.isdir("/run/netns") else None
    for top in overlay_tops([b["target"] for b in binds] + list(files)):
        upper, work = (os.path.join(scratch, "overlay", top.strip("/"), d)
                       for d in ("upper", "work"))
        os.makedirs(upper, exist_ok=True)
        os.makedirs(work, exist_ok=True)
        mount("overlay", top, "overlay", 0, f"lowerdir={top},upperdir={upper},workdir={work}")
    mount("tmpfs", "/run", "tmpfs", 0, "mode=755")
    if netns_fd is not None:
        os.mkdir("/run/netns")
        mount(f"/proc/self/fd/{netns_fd}", "/run/netns", None, MS_BIND | MS_REC)
        mount(None, "/run/netns", None, MS_REC | MS_SLAVE)
        os.close(netns_fd)
    for bind, fd in zip(binds, fds, strict=True):
        target = bind["target"]
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                open(target, "a").close()  # a mount point
        mount(f"/proc/self/fd/{fd}", target, None,
              MS_BIND | (MS_REC if bind.get("recursive", True) else 0))
        if bind.get("read_only"):
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        os.close(fd)
    for path, text in files.items():
        if os.path.lexists(path):
            os.unlink(path)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m svcnet.lab.mountexec SPEC [-- ARGV...]", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    command = argv[2:] if argv[1:2] == ["--"] else spec["argv"]
    env = spec.get("env")
    try:
        setup(spec)
        os.chdir(spec.get("workdir") or "/")
        if env is None:
            os.execvp(command[0], command)
        os.execvpe(command[0], command, env)
    except OSError as err:
        print(f"mountexec: {command[0]}: {err}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
