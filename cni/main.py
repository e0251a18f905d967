"""``svcnet-cni``: the CNI entry point (env + stdin in, result or error JSON out).

Two roles, chosen by how the binary is invoked: normally the bridge plugin; when the name it
was executed as (``argv[0]``) equals the config's ``ipam.type`` and differs from its ``type``
— i.e. another plugin delegated IPAM to it — or when executed as ``svcnet-ipam``, it acts as
a host-local-style IPAM plugin.

Start-up is the latency budget: this module and everything it imports use only builtin C
modules and small local modules (no ``json``, ``re``, ``typing``, ``subprocess``,
``ipaddress``, ``ctypes`` or third-party packages); ``tests/test_cni_install.py`` enforces it.
"""

from __future__ import annotations

import sys

from . import posixfs
from .fastjson import dumps, loads
from .spec import (
    ERR_DECODE,
    ERR_INTERNAL,
    ERR_INVALID_ENV,
    ERR_IO,
    LATEST,
    SUPPORTED_VERSIONS,
    CniError,
    check_version,
    require_at_least,
    result_to_wire,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .bridge import Env

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
IPAM_NAME = "svcnet-ipam"


def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K2=V2`` (CONVENTIONS.md); a pair without ``=`` is an environment error."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def read_env(command: str, environ: dict[str, str] | Any) -> Env:
    from .bridge import Env, link_name

    needs_attachment = command in ("ADD", "DEL", "CHECK")
    cid = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    netns = environ.get("CNI_NETNS", "")
    if needs_attachment:
        missing = [k for k, v in (("CNI_CONTAINERID", cid), ("CNI_IFNAME", ifname)) if not v]
        if command != "DEL" and not netns:
            missing.append("CNI_NETNS")
        if missing:
            raise CniError(ERR_INVALID_ENV, f"required environment variables missing: "
                           f"{', '.join(missing)}")
        if not cid[0].isalnum() or not all(c.isascii() and (c.isalnum() or c in "_.-")
                                           for c in cid):
            raise CniError(ERR_INVALID_ENV, f"CNI_CONTAINERID {cid!r} has invalid characters",
                           "allowed: letters, digits, '_', '.', '-', starting alphanumeric")
        try:
            link_name("CNI_IFNAME", ifname)
        except CniError as err:
            raise CniError(ERR_INVALID_ENV, err.msg, err.details) from None
    return Env(cid, ifname, netns, parse_cni_args(environ.get("CNI_ARGS", "")),
               environ.get("CNI_PATH", ""))


def decode_config(stdin: bytes) -> dict[str, Any]:
    try:
        conf = loads(stdin)
    except (ValueError, UnicodeDecodeError) as err:
        raise CniError(ERR_DECODE, "cannot decode the network configuration on stdin",
                       str(err)) from None
    if not isinstance(conf, dict):
        raise CniError(ERR_DECODE, "the network configuration must be a JSON object")
    return conf


def invoked_as_ipam(conf: dict[str, Any], argv0: str) -> bool:
    name = posixfs.basename(argv0)
    if name == IPAM_NAME:
        return True
    ipam_conf = conf.get("ipam")
    ipam_type = ipam_conf.get("type") if isinstance(ipam_conf, dict) else None
    return bool(name) and ipam_type == name and conf.get("type") != name


def run(command: str, stdin: bytes, environ: dict[str, str] | Any, argv0: str
        ) -> dict[str, Any] | None:
    """One invocation; returns the JSON document to print (None for no output)."""
    if command not in COMMANDS:
        raise CniError(ERR_INVALID_ENV, f"CNI_COMMAND {command or '(unset)'!r} is not one of "
                       f"{', '.join(COMMANDS)}")
    if command == "VERSION":
        asked = LATEST
        if stdin.strip():
            doc = decode_config(stdin)
            if doc.get("cniVersion") in SUPPORTED_VERSIONS:
                asked = doc["cniVersion"]
        return {"cniVersion": asked, "supportedVersions": list(SUPPORTED_VERSIONS)}
    conf = decode_config(stdin)
    version = check_version(conf.get("cniVersion"))
    if command == "CHECK":
        require_at_least(version, "0.4.0", "CHECK")
    elif command in ("GC", "STATUS"):
        require_at_least(version, "1.1.0", command)
    env = read_env(command, environ)
    if invoked_as_ipam(conf, argv0):
        from .ipam_plugin import run_ipam

        res = run_ipam(command, conf, env)
    else:
        from . import bridge

        netconf = bridge.NetConf(conf)
        handler = {"ADD": bridge.cmd_add, "DEL": bridge.cmd_del, "CHECK": bridge.cmd_check,
                   "GC": bridge.cmd_gc, "STATUS": bridge.cmd_status}[command]
        res = handler(netconf, env, stdin)
    if res is None:
        return None
    return result_to_wire(res, version)


EPERM, EACCES, EROFS = 1, 13, 30


def unexpected_error(err: Exception) -> CniError:
    """An exception that is not a CniError, as the error the runtime gets: the kernel or the
    filesystem refusing for lack of privilege is an I/O failure (code 5) saying so; anything
    else is a bug or an unexpected kernel answer (999)."""
    if isinstance(err, OSError) and err.errno in (EPERM, EACCES, EROFS):
        return CniError(ERR_IO, f"permission denied: {err}",
                        "svcnet-cni must run as root (CAP_NET_ADMIN, CAP_SYS_ADMIN for "
                        "setns) with a writable IPAM dataDir")
    return CniError(ERR_INTERNAL, f"internal error: {type(err).__name__}: {err}",
                    "please report this with the network configuration")


def _error_version(stdin: bytes) -> str:
    try:
        version = loads(stdin).get("cniVersion")
    except Exception:
        return LATEST
    return version if version in SUPPORTED_VERSIONS else LATEST


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    stdin = b""
    environ = posixfs.environ()
    command = environ.get("CNI_COMMAND", "")
    try:
        if command != "VERSION" or not sys.stdin.isatty():
            stdin = sys.stdin.buffer.read()
        argv0 = environ.get("SVCNET_CNI_ARGV0") or (argv[0] if argv else "")
        out = run(command, stdin, environ, argv0)
    except CniError as err:
        sys.stdout.write(dumps(err.to_json(_error_version(stdin))) + "\n")
        return 1
    except Exception as err:  # still speak the protocol
        sys.stdout.write(dumps(unexpected_error(err).to_json(_error_version(stdin))) + "\n")
        return 1
    if out is not None:
        sys.stdout.write(dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
