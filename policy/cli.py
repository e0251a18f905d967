"""``svcnet policy trace`` and ``svcnet policy status``: both compute the desired state from
a fresh list of the store, as the node component does from its informers."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from svcnet.policy.state import PolicyState

    from svcnet.store.base import Store


def register(sub: Any) -> None:
    from svcnet.store.open import add_store_arguments

    p: argparse.ArgumentParser = sub.add_parser(
        "policy", help="NetworkPolicy: trace a connection, compare the kernel with desired")
    actions = p.add_subparsers(dest="policy_action", metavar="ACTION", required=True)
    t = actions.add_parser("trace", help="which policy allows or denies a new connection "
                                         "(exit 0 allowed, 1 denied)")
    add_store_arguments(t)
    t.add_argument("--from", dest="source", required=True, help="NAMESPACE/POD or an address")
    t.add_argument("--to", dest="target", required=True, help="NAMESPACE/POD or an address")
    t.add_argument("--port", required=True, help="PORT[/TCP|UDP|SCTP] (after DNAT)")
    t.set_defaults(func=_trace)
    s = actions.add_parser("status", help="table inet svcnet-policy in the kernel vs desired "
                                          "for a node (exit 1 on drift)")
    add_store_arguments(s)
    s.add_argument("--node-name", required=True, help="the node whose pods are enforced")
    s.add_argument("--netns", default=None, help="read the table of this named netns")
    s.add_argument("--log", action="store_true", help="the daemon runs with --policy-log")
    s.set_defaults(func=_status)


async def load_state(store: Store, node_name: str | None,
                     rejected: list[str] | None = None) -> PolicyState:
    from svcnet.policy.state import compute

    from svcnet.model import NAMESPACE, NETWORK_POLICY, POD, InvalidObject, Kind

    async def listed(kind: Kind[Any]) -> list[Any]:
        out = []
        for raw in (await store.list(kind)).items:
            try:
                out.append(kind.decode(raw.data))
            except InvalidObject as err:
                if rejected is not None:  # the daemon's informer refuses it too
                    rejected.append(f"rejected {err.kind} {err.key}: {err.problem}")
        return out

    try:
        return compute(await listed(NETWORK_POLICY), await listed(POD),
                       await listed(NAMESPACE), node_name=node_name)
    finally:
        await store.close()


def _trace(args: argparse.Namespace) -> int:
    from svcnet.policy.trace import pod_address, trace

    from svcnet.cli import UsageError
    from svcnet.store.open import store_from_args

    number, _, proto = args.port.partition("/")
    if not number.isdigit() or proto.upper() not in ("", "TCP", "UDP", "SCTP"):
        raise UsageError(f"--port: {args.port!r} is not PORT[/TCP|UDP|SCTP]")
    state = asyncio.run(load_state(store_from_args(args), None))
    try:
        src, dst = pod_address(state, args.source), pod_address(state, args.target)
    except (KeyError, ValueError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    result = trace(state, src, dst, proto or "TCP", int(number))
    print(f"{args.source} ({src}) -> {args.target} ({dst}) port {number}/"
          f"{(proto or 'TCP').upper()}")
    print(result.explain())
    return 0 if result.allowed else 1


def _status(args: argparse.Namespace) -> int:
    from svcnet.policy.nftables import render
    from svcnet.policy.status import compare, kernel_items
    from svcnet.proxy.commands import CommandFailed, SubprocessCommands

    from svcnet.store.open import store_from_args

    rejected: list[str] = []
    state = asyncio.run(load_state(store_from_args(args), args.node_name, rejected))
    try:
        kernel = kernel_items(SubprocessCommands(args.netns))
    except CommandFailed as err:
        print(f"policy status: cannot read the table: {err}")
        return 1
    missing, extra = compare(render(state, log=args.log), kernel)
    print(f"policy status: {'in sync' if not missing and not extra else 'DRIFT'} "
          f"({len(state.ingress)} ingress- and {len(state.egress)} egress-isolated addresses, "
          f"{len(state.groups)} groups)")
    for line in rejected:
        print(f"  {line} (the daemon enforces its last good version: it shows as drift)")
    for item in sorted(missing)[:50]:
        print(f"  missing: {item}")
    for item in sorted(extra)[:50]:
        print(f"  extra: {item}")
    return 1 if missing or extra else 0
