"""``svcnet cni install``: put a fast-starting ``svcnet-cni`` executable and a conflist in place.

The console-script wrapper pip generates runs the full ``site`` machinery (and, for an
editable install, its import finder): ~20 ms before our first line. The launcher written
here starts the same interpreter with ``-I -S`` and registers the two package directories
by hand, which brings interpreter start-up to ~11 ms (measured, see docs/cni.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

LAUNCHER = """#!{python} -IS
# svcnet-cni launcher written by `svcnet cni install`: isolated mode, no site import
import sys


def _package(name, path):
    module = type(sys)(name)
    module.__path__ = [path]
    module.__package__ = name
    sys.modules[name] = module


_package("svcnet", {svcnet_dir!r})
_package("svcnet.cni", {cni_dir!r})
from svcnet.cni.main import main  # noqa: E402

_status = main()
sys.stdout.flush()
sys.stderr.flush()
sys.modules["posix"]._exit(_status)  # skip interpreter teardown: nothing left to clean up
"""

FAST_PATH_CLIENT = """#!/bin/sh
# svcnet-cni written by `svcnet cni install --fast-path`: hand the request to the resident
# `svcnet cni serve` (reply: one status byte, then the plugin's output); without the socket
# run the in-process plugin. SVCNET_CNI_ARGV0 keeps the invoked name (svcnet-ipam role).
export SVCNET_CNI_ARGV0="$0"
if [ -S {socket} ]; then
  if out=$({socat} -t 120 - UNIX-CONNECT:{socket} 2>/dev/null) && [ -n "$out" ]; then
    status=${{out%"${{out#?}}"}}
    body=${{out#?}}
    [ -n "$body" ] && printf '%s\\n' "$body"
    exit "$status"
  fi
fi
exec {launcher} "$@"
"""
DEFAULT_SOCKET = "/run/svcnet/cni.sock"
CONFLIST_NAME = "10-svcnet.conflist"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cni = subparsers.add_parser("cni", help="the CNI plugin svcnet-cni")
    cni_sub = cni.add_subparsers(dest="cni_command", required=True, metavar="ACTION")
    install = cni_sub.add_parser("install", help="install the plugin executable and a conflist")
    install.add_argument("--bin-dir", default="/opt/cni/bin")
    install.add_argument("--conf-dir", default="/etc/cni/net.d",
                         help="where the conflist goes; '' to skip writing one")
    install.add_argument("--name", default="svcnet", help="network name")
    install.add_argument("--bridge", default="cni0")
    install.add_argument("--subnet-file", default="/run/flannel/subnet.env",
                         help="Flannel-style subnet.env written by `svcnet node --overlay`")
    install.add_argument("--subnet", action="append", default=[],
                         help="static pod subnet instead of --subnet-file (repeat: dual stack)")
    install.add_argument("--ip-masq", action="store_true",
                         help="masquerade in the plugin (with --subnet-file the overlay's "
                              "FLANNEL_IPMASQ decides by default)")
    install.add_argument("--chain", action="append", default=[],
                         help="append a chained plugin of this type (e.g. portmap)")
    install.add_argument("--python", default="auto",
                         help="interpreter for the launcher; 'auto' times this one and the "
                              "system python3 of the same minor version and takes the faster")
    install.add_argument("--fast-path", action="store_true",
                         help="install a shell client that uses `svcnet cni serve` when its "
                              "socket exists (falls back to the in-process plugin)")
    install.add_argument("--socket", default=DEFAULT_SOCKET)
    install.set_defaults(func=cmd_install)
    serve = cni_sub.add_parser("serve", help="do the plugin's work in a resident process "
                                             "(the --fast-path client's server)")
    serve.add_argument("--socket", default=DEFAULT_SOCKET)
    serve.set_defaults(func=cmd_serve)


def launcher_text(python: str | None = None) -> str:
    import svcnet.cni

    import svcnet

    return LAUNCHER.format(python=python or sys.executable,
                           svcnet_dir=next(iter(svcnet.__path__)),
                           cni_dir=next(iter(svcnet.cni.__path__)))


def _startup_ms(python: str, runs: int = 20) -> float:
    """CPU time (user + system, so other load on the node does not skew it) of an empty
    ``-IS`` start of ``python``, averaged over ``runs``."""
    import subprocess

    before = os.times()
    for _ in range(runs):
        subprocess.run([python, "-IS", "-c", "pass"], check=True)
    after = os.times()
    used = (after.children_user - before.children_user) + (
        after.children_system - before.children_system)
    return used * 1000 / runs


def choose_python() -> str:
    """The faster-starting of our interpreter and the system's python3.X of the same X: the
    plugin path imports only builtin modules and ours, so any CPython of that version works
    (a statically linked distribution build starts ~3 ms faster than a shared-library one)."""
    import subprocess

    candidates = [sys.executable]
    system = f"/usr/bin/python3.{sys.version_info.minor}"
    if os.access(system, os.X_OK) and os.path.realpath(system) != os.path.realpath(
            sys.executable):
        probe = subprocess.run([system, "-IS", "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True, check=False)
        if probe.stdout.strip() == str(tuple(sys.version_info[:2])):
            candidates.append(system)
    if len(candidates) == 1:
        return sys.executable
    return min(candidates, key=_startup_ms)


def conflist(args: argparse.Namespace) -> dict[str, object]:
    ipam: dict[str, object] = {"type": "svcnet-cni"}
    if args.subnet:
        ipam["ranges"] = [[{"subnet": s}] for s in args.subnet]
    else:
        ipam["subnetFile"] = args.subnet_file
    plugin: dict[str, object] = {"type": "svcnet-cni", "bridge": args.bridge,
                                 "isGateway": True, "isDefaultGateway": True,
                                 "hairpinMode": True, "ipam": ipam}
    if args.ip_masq or args.subnet:
        plugin["ipMasq"] = True
    plugins: list[dict[str, object]] = [plugin]
    for kind in args.chain:
        extra: dict[str, object] = {"type": kind}
        if kind == "portmap":
            extra["capabilities"] = {"portMappings": True}
        elif kind == "bandwidth":
            extra["capabilities"] = {"bandwidth": True}
        plugins.append(extra)
    return {"cniVersion": "1.1.0", "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
            "name": args.name, "plugins": plugins}


def _write(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def cmd_install(args: argparse.Namespace) -> int:
    from svcnet.cli import UsageError

    for ch in args.name:
        if not (ch.isalnum() or ch in "_.-"):
            raise UsageError(f"--name {args.name!r}: only letters, digits, '_', '.', '-'")
    os.makedirs(args.bin_dir, exist_ok=True)
    target = os.path.join(args.bin_dir, "svcnet-cni")
    python = choose_python() if args.python == "auto" else args.python
    if args.fast_path:
        import shutil

        socat = shutil.which("socat")
        if socat is None:
            raise UsageError("--fast-path needs socat")
        launcher = os.path.join(args.bin_dir, "svcnet-cni-inprocess")
        _write(launcher, launcher_text(python), 0o755)
        _write(target, fast_path_client(launcher, args.socket, socat), 0o755)
    else:
        _write(target, launcher_text(python), 0o755)
    ipam_link = os.path.join(args.bin_dir, "svcnet-ipam")
    if not os.path.lexists(ipam_link):
        os.symlink("svcnet-cni", ipam_link)
    print(f"installed {target} (interpreter {python})")
    if args.conf_dir:
        os.makedirs(args.conf_dir, exist_ok=True)
        path = os.path.join(args.conf_dir, CONFLIST_NAME)
        _write(path, json.dumps(conflist(args), indent=2) + "\n", 0o644)
        print(f"wrote {path}")
    return 0


def fast_path_client(launcher: str, socket_path: str, socat: str) -> str:
    import shlex

    return FAST_PATH_CLIENT.format(socket=shlex.quote(socket_path), socat=shlex.quote(socat),
                                   launcher=shlex.quote(launcher))


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from .server import serve

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)  # unwinds serve(), which removes the socket

    signal.signal(signal.SIGTERM, stop)
    serve(args.socket)
    return 0
