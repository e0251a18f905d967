"""The ``svcnet`` command. Components plug their subcommands in through ``COMMAND_MODULES``.

Each listed module exposes ``register(subparsers)`` and must stay cheap to import: heavy
imports (pyroute2, grpc, dnslib) belong inside the command functions.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

COMMAND_MODULES = (
    "svcnet.objects_cli",
    "svcnet.node",
    "svcnet.cni.cli",
    "svcnet.cni.overlay.cli",
    "svcnet.proxy.cli",
    "svcnet.policy.cli",
    "svcnet.dns.cli",
    "svcnet.lab.cli",
    "svcnet.manifests",
)

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _version() -> str:
    from svcnet import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svcnet", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--version", action="version", version=f"svcnet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else
        logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except UsageError as err:
        print(f"svcnet: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the importable module's main: under ``python -m svcnet.cli`` this file is also
    # ``__main__``, whose UsageError is not the one the commands raise (svcnet.cli's).
    from svcnet.cli import main as _main

    sys.exit(_main())
