"""Executing a delegated plugin (an ``ipam.type`` we do not embed) the way libcni does:
same stdin, CNI_COMMAND replaced, the binary looked up in CNI_PATH."""

from __future__ import annotations

import os

from .fastjson import loads
from .spawn import SpawnError, run
from .spec import ERR_INTERNAL, ERR_INVALID_CONFIG, CniError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def find_plugin(name: str, cni_path: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise CniError(ERR_INVALID_CONFIG, f"plugin type {name!r} is not a plain name")
    for directory in cni_path.split(":"):
        candidate = os.path.join(directory, name)
        if directory and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(ERR_INVALID_CONFIG, f"failed to find plugin {name!r} in CNI_PATH",
                   f"searched {cni_path or '(empty CNI_PATH)'}")


def delegate(name: str, command: str, stdin: bytes, cni_path: str) -> dict[str, Any]:
    """Run the delegate; its error JSON is re-raised as a CniError with the same code."""
    env = dict(os.environ, CNI_COMMAND=command)
    try:
        rc, out, err = run([find_plugin(name, cni_path)], stdin, env)
    except SpawnError as exc:
        raise CniError(ERR_INTERNAL, f"cannot run {name}: {exc.strerror}") from None
    doc: Any = {}
    if out.strip():
        try:
            doc = loads(out)
        except ValueError:
            doc = {}
    if rc:
        if isinstance(doc, dict) and "code" in doc:
            raise CniError(int(doc["code"]), f"{name}: {doc.get('msg', '')}",
                           str(doc.get("details", "")))
        raise CniError(ERR_INTERNAL, f"{name} {command} failed with status {rc}",
                       err.decode(errors="replace").strip())
    return doc if isinstance(doc, dict) else {}
