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
    st = actions.add_parser(
        "status", help="kernel vs the rules the running proxy applied (exit 1 on drift)")
    st.add_argument("--url", default="http://127.0.0.1:10249",
                    help="the proxy's metrics server (--proxy-metrics-bind-address)")
    st.add_argument("--proxy-netns", dest="status_netns", default=None,
                    help="query the URL from inside this named network namespace")
    st.add_argument("--json", action="store_true", help="print the raw JSON answer")
    st.set_defaults(func=_status)
    from svcnet.proxy.desired_check import register as register_check

    register_check(actions)  # svcnet proxy check: kernel vs desired from the store


def _run(args: argparse.Namespace) -> int:
    from svcnet.node import run_node

    args.proxy = True
    args.overlay = args.dns = False
    import asyncio

    asyncio.run(run_node(args, ["proxy"]))
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    import sys

    errors = cleanup_rules(args.netns)
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    return 1 if errors else 0


def cleanup_rules(netns: str | None) -> list[str]:
    """Remove every rule the proxy owns, in all modes, and kube-proxy's (``kube-proxy
    --cleanup``); the errors, if any, as text. The iptables chains are removed by name as
    ``migrate`` knows them, which leaves the kubelet's and other tools' ``KUBE-*`` chains
    and deletes jumps however they are spelled (kube-proxy comments its own)."""
    from svcnet.proxy.commands import SubprocessCommands
    from svcnet.proxy.config import BackendConfig
    from svcnet.proxy.migrate import remove_kube_proxy_leftovers
    from svcnet.proxy.nftables import NftablesBackend

    commands = SubprocessCommands(netns)
    config = BackendConfig(families=(4, 6))
    errors: list[str] = []
    try:
        NftablesBackend(commands, config).cleanup()
    except Exception as err:  # every mode is tried whatever one of them raises
        errors.append(f"nftables: {err}")
    try:
        errors += [f"iptables: {e}" for e in remove_kube_proxy_leftovers(commands).errors]
    except Exception as err:
        errors.append(f"iptables: {err}")
    from svcnet.proxy.ipvs import cleanup_all

    try:
        cleanup_all(commands, netns)
    except Exception as err:
        errors.append(f"ipvs: {err}")
    return errors


def _status(args: argparse.Namespace) -> int:
    import json
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    url = args.url.rstrip("/") + "/status"
    if args.status_netns:
        code = "import sys, urllib.request, urllib.error\n" \
               "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=10)\n" \
               "except urllib.error.HTTPError as e:\n r = e\n" \
               "sys.stdout.write(r.read().decode())\n"
        proc = subprocess.run(["ip", "netns", "exec", args.status_netns, sys.executable, "-c",
                               code, url], capture_output=True, text=True, timeout=20)
        if proc.returncode != 0:
            print(f"cannot reach {url} in {args.status_netns}: {proc.stderr.strip()}",
                  file=sys.stderr)
            return 1
        text = proc.stdout
    else:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as err:
            text = err.read().decode()
        except OSError as err:
            print(f"cannot reach {url}: {err}", file=sys.stderr)
            return 1
    body = json.loads(text)
    if args.json:
        print(json.dumps(body, indent=2))
    elif body.get("in_sync") is None:
        print("proxy status: drift check not supported for this mode")
    else:
        print("proxy status: " + ("in sync" if body["in_sync"] else "DRIFT"))
        if body.get("error"):
            print(f"  error: {body['error']}")
        for item in body.get("missing", []):
            print(f"  missing: {item}")
        for item in body.get("extra", []):
            print(f"  extra: {item}")
    return 1 if body.get("in_sync") is False else 0
