"""``svcnet node``: one process per node running the overlay, the proxy and/or DNS.

They share one store connection and one informer per resource (``InformerFactory``), so a
node with all three opens one watch per kind, not three.

A component module exposes ``add_node_arguments(parser)`` and ``node_component(args)``
returning an object with ``name`` and ``async run(factory, store)``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
from typing import Any, Protocol

from svcnet.store.base import Store
from svcnet.store.open import add_store_arguments, store_from_args
from svcnet.watch import InformerFactory

log = logging.getLogger(__name__)

COMPONENTS = {
    "overlay": "svcnet.cni.overlay.daemon",
    "proxy": "svcnet.proxy.daemon",
    "dns": "svcnet.dns.daemon",
    "cni-server": "svcnet.cni.server",
    "policy": "svcnet.policy.daemon",
}


class Component(Protocol):
    name: str

    async def run(self, factory: InformerFactory, store: Store) -> None: ...


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("node", help="run the node daemon")
    add_store_arguments(p)
    for name in COMPONENTS:
        p.add_argument(f"--{name}", action="store_true", help=f"run the {name} component")
    for module in _component_modules():
        module.add_node_arguments(p)
    c = p.add_argument_group("cleanup (kube-proxy --cleanup)")
    c.add_argument("--cleanup", action="store_true",
                   help="remove what svcnet node and `svcnet cni install` put on this node "
                        "(proxy rules of every mode, overlay rules, flannel.* devices and "
                        "routes, CNI binaries and conflist, subnet file, socket), then exit; "
                        "in the namespace --proxy-netns names, else our own")
    c.add_argument("--cni-bin-dir", default="/opt/cni/bin", help="for --cleanup")
    c.add_argument("--cni-conf-dir", default="/etc/cni/net.d", help="for --cleanup")
    p.set_defaults(func=_run)


def _component_modules() -> list[Any]:
    modules = []
    for path in COMPONENTS.values():
        try:
            modules.append(importlib.import_module(path))
        except ModuleNotFoundError as err:
            if err.name != path:
                raise
    return modules


def _never(args: argparse.Namespace) -> bool:
    return False


def _run(args: argparse.Namespace) -> int:
    if args.cleanup:
        messages = cleanup(args)
        for line in messages:
            print(line)
        return 1 if any(line.startswith("error") for line in messages) else 0
    wanted = [name for name in COMPONENTS if getattr(args, name.replace("-", "_"))]
    if not wanted:
        from svcnet.cli import UsageError

        raise UsageError(
            "svcnet node: choose at least one of --overlay, --proxy, --dns, --cni-server, --policy")
    wanted += [name for name, path in COMPONENTS.items() if name not in wanted
               and getattr(importlib.import_module(path), "on_by_default", _never)(args)]
    asyncio.run(run_node(args, wanted))
    return 0


async def run_node(args: argparse.Namespace, wanted: list[str]) -> None:
    store = store_from_args(args)
    factory = InformerFactory(store)
    components: list[Component] = [
        importlib.import_module(COMPONENTS[name]).node_component(args) for name in wanted
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[Any]] = [
        asyncio.create_task(c.run(factory, store), name=c.name) for c in components
    ]
    factory.start()
    stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait())
    # A dead shared informer would leave every component on stale objects while reporting
    # ready: the node exits instead, so its supervisor restarts it.
    dead: asyncio.Task[Any] = asyncio.create_task(factory.wait_failed(), name="informers")
    done, _ = await asyncio.wait([*tasks, stopper, dead], return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, stopper, dead]:
        task.cancel()
    await asyncio.gather(*tasks, stopper, dead, return_exceptions=True)
    await factory.stop()
    await store.close()
    if dead in done:
        informer = dead.result()
        raise RuntimeError(f"informer {informer.kind.name} failed") from informer.error
    failed = [t for t in done if t is not stopper and not t.cancelled() and t.exception()]
    if failed:
        raise RuntimeError(f"component {failed[0].get_name()} failed") from failed[0].exception()


def cleanup(args: argparse.Namespace) -> list[str]:
    """Undo a node agent, as ``kube-proxy --cleanup`` does for its rules: what stays is the
    pods' own interfaces and the ``cni0`` bridge (removed with the last pod or by a reboot,
    as after Flannel), and any other tool's rules."""
    import contextlib
    import os

    from svcnet.cni.cli import CONFLIST_NAME, IN_PROCESS_NAME
    from svcnet.cni.overlay.cli import cleanup as overlay_cleanup
    from svcnet.proxy.cli import cleanup_rules

    netns = getattr(args, "proxy_netns", None) or None
    out = [f"error: proxy: {err}" for err in cleanup_rules(netns)]
    out.append("proxy: rules of every mode removed" if not out else "proxy: partly removed")
    out += asyncio.run(overlay_cleanup(netns, datapath=True))
    from svcnet.policy.daemon import cleanup as policy_cleanup

    policy_netns = getattr(args, "policy_netns", None) or netns
    out += [f"error: policy: {err}" for err in policy_cleanup(policy_netns)] or [
        "policy: table inet svcnet-policy removed"]
    files = [os.path.join(args.cni_conf_dir, CONFLIST_NAME),
             *(os.path.join(args.cni_bin_dir, n) for n in ("svcnet-cni", IN_PROCESS_NAME,
                                                            "svcnet-ipam")),
             args.overlay_subnet_file, args.cni_server_socket,
             f"{args.cni_server_socket}.fallback"]
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            out.append(f"removed {path}")
    return out
