"""``svcnet proxy``: run the service proxy alone, or ``svcnet proxy cleanup`` its rules."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    from svcnet.proxy.daemon import add_node_arguments

    from svcnet.store.open import add_store_arguments

    p: argparse.ArgumentParser = sub.add_parser(
        "proxy", help="run the service proxy (kube-proxy replacement)")
    add_store_arguments(p)
    add_node_arguments(p)
    p.set_defaults(func=_run)
    actions = p.add_subparsers(dest="proxy_action", metavar="ACTION")
    c = actions.add_parser("cleanup", help="remove every rule the proxy owns (all modes)")
    c.add_argument("--netns", default=None, help="clean this named network namespace")
    c.set_defaults(func=_cleanup)


def _run(args: argparse.Namespace) -> int:
    from svcnet.node import run_node

    args.proxy = True
    args.overlay = args.dns = False
    import asyncio

    asyncio.run(run_node(args, ["proxy"]))
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    from svcnet.proxy.commands import SubprocessCommands
    from svcnet.proxy.config import BackendConfig
    from svcnet.proxy.iptables import IptablesBackend
    from svcnet.proxy.nftables import NftablesBackend

    commands = SubprocessCommands(args.netns)
    config = BackendConfig(families=(4, 6))
    NftablesBackend(commands, config).cleanup()
    for legacy in (False, True):
        try:
            IptablesBackend(commands, config, legacy=legacy).cleanup()
        except OSError:
            continue
    from svcnet.proxy.ipvs import cleanup_all

    cleanup_all(commands, args.netns)
    return 0
