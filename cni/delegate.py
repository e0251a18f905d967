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

    from .bridge import Env


def find_plugin(name: str, cni_path: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise CniError(ERR_INVALID_CONFIG, f"plugin type {name!r} is not a plain name")
    for directory in cni_path.split(":"):
        candidate = os.path.join(directory, name)
        if directory and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(ERR_INVALID_CONFIG, f"failed to find plugin {name!r} in CNI_PATH",
                   f"searched {cni_path or '(empty CNI_PATH)'}")


def delegate(name: str, command: str, stdin: bytes, env: Env) -> dict[str, Any]:
    """Run the delegate with this invocation's CNI_* values (explicitly, so it also works
    from ``svcnet cni serve``, whose own environment has none); its error JSON is re-raised
    as a CniError with the same code."""
    child_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                 "CNI_COMMAND": command, "CNI_CONTAINERID": env.container_id,
                 "CNI_NETNS": env.netns, "CNI_IFNAME": env.ifname, "CNI_PATH": env.path,
                 "CNI_ARGS": ";".join(f"{k}={v}" for k, v in env.args.items())}
    try:
        rc, out, err = run([find_plugin(name, env.path)], stdin, child_env)
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
