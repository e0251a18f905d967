"""The few ``os`` conveniences the plugin needs, on the ``posix`` builtin module.

``import os`` costs ~2 ms with ``-S`` (it builds ``os.environ`` and pulls in
``_collections_abc``, ``posixpath`` and ``stat``); ``posix`` is already loaded at start-up.
"""

from __future__ import annotations

import posix

S_IFMT, S_IFDIR = 0o170000, 0o040000


def join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def basename(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


def isdir(path: str) -> bool:
    try:
        return posix.stat(path).st_mode & S_IFMT == S_IFDIR
    except OSError:
        return False


def makedirs(path: str, mode: int = 0o755) -> None:
    """``mkdir -p``."""
    if isdir(path):
        return
    parent = path.rstrip("/").rpartition("/")[0]
    if parent and not isdir(parent):
        makedirs(parent, mode)
    try:
        posix.mkdir(path, mode)
    except FileExistsError:
        if not isdir(path):
            raise


def environ() -> dict[str, str]:
    """The process environment with str keys and values."""
    return {k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape")
            for k, v in posix.environ.items()}
