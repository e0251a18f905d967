"""Opening a store from the ``--store`` URL every command accepts."""

from __future__ import annotations

import argparse

from svcnet.store.base import Invalid, Store
from svcnet.store.redact import redact_url

STORE_HELP = "kubernetes | etcd://HOST:PORT[,HOST:PORT...][/PREFIX] | memory"


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default="memory", help=STORE_HELP)
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig for --store kubernetes")
    parser.add_argument("--context", default=None, help="kubeconfig context")


def open_store(url: str, *, kubeconfig: str | None = None, context: str | None = None) -> Store:
    """Build the store a URL names; the heavy client modules are imported only when used."""
    if url == "memory":
        from svcnet.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("etcd://"):
        from svcnet.store.etcd import EtcdStore

        rest = url.removeprefix("etcd://")
        hosts, _, prefix = rest.partition("/")
        endpoints = [h for h in hosts.split(",") if h]
        if not endpoints:
            raise Invalid(f"--store {redact_url(url)!r}: no etcd endpoint given")
        return EtcdStore(endpoints, prefix="/" + prefix if prefix else "/registry")
    if url in ("kubernetes", "k8s"):
        from svcnet.store.kubernetes import KubernetesStore

        return KubernetesStore.from_config(kubeconfig=kubeconfig, context=context)
    raise Invalid(f"--store {redact_url(url)!r} is not one of: {STORE_HELP}")


def store_from_args(args: argparse.Namespace) -> Store:
    return open_store(args.store, kubeconfig=args.kubeconfig, context=args.context)
