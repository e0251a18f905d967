"""``svcnet dns``: the cluster DNS server on its own (``svcnet node --dns`` embeds it)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from svcnet.store.open import add_store_arguments


def register(sub: Any) -> None:
    from svcnet.dns.daemon import add_dns_arguments

    p: argparse.ArgumentParser = sub.add_parser("dns", help="run the cluster DNS server")
    add_store_arguments(p)
    add_dns_arguments(p)
    p.add_argument("--config", default=None,
                   help="YAML or JSON file of the same settings (flag names, '-' or '_')")
    p.set_defaults(func=_run)


def load_config(path: str, parser_defaults: dict[str, Any], args: argparse.Namespace) -> None:
    """Settings from a file apply where the command line left the default."""
    from svcnet.cli import UsageError

    try:
        with open(path) as f:
            text = f.read()
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except (OSError, ValueError) as err:
        raise UsageError(f"--config {path}: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping")
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in parser_defaults:
            raise UsageError(f"--config {path}: unknown setting {key!r}")
        if name in ("upstream", "stub_domain") and isinstance(value, str):
            value = [value]
        if getattr(args, name) == parser_defaults[name]:
            setattr(args, name, value)


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from svcnet.dns.daemon import DNSComponent, options_from_args

    from svcnet.store.open import store_from_args
    from svcnet.watch import InformerFactory

    if args.config:
        parser = argparse.ArgumentParser()
        from svcnet.dns.daemon import add_dns_arguments

        add_dns_arguments(parser)
        defaults = vars(parser.parse_args([]))
        load_config(args.config, defaults, args)
    options = options_from_args(args)

    async def main() -> None:
        store = store_from_args(args)
        factory = InformerFactory(store)
        component = DNSComponent(options)
        task = asyncio.create_task(component.run(factory, store))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            await factory.stop()
            await store.close()

    asyncio.run(main())
    return 0
