"""Opening a store from the ``--store`` URL (and the etcd security flags) every command accepts."""

from __future__ import annotations

import argparse

from svcnet.store.base import Invalid, Store
from svcnet.store.etcd_config import SCHEMES, EtcdCredentials, EtcdTarget, parse_etcd_url
from svcnet.store.redact import redact_url

STORE_HELP = ("kubernetes | etcd[s]://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][/PREFIX]"
              "[?cafile=F&certfile=F&keyfile=F] | memory")


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default="memory", help=STORE_HELP)
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig for --store kubernetes")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    g = parser.add_argument_group("etcd TLS and authentication (--store etcd://...)")
    g.add_argument("--etcd-cafile", default="", metavar="FILE",
                   help="CA certificates (PEM) that sign the etcd members' certificates; "
                   "turns TLS on")
    g.add_argument("--etcd-certfile", default="", metavar="FILE",
                   help="client certificate (PEM) for etcd's --client-cert-auth")
    g.add_argument("--etcd-keyfile", default="", metavar="FILE",
                   help="private key (PEM) of --etcd-certfile")
    g.add_argument("--etcd-username", default="", metavar="USER",
                   help="etcd user, when etcd has authentication enabled")
    g.add_argument("--etcd-password", default="", metavar="PASSWORD",
                   help="password of --etcd-username (visible in ps: prefer the file)")
    g.add_argument("--etcd-password-file", default="", metavar="FILE",
                   help="file holding the password of --etcd-username")


def etcd_credentials_from_args(args: argparse.Namespace) -> EtcdCredentials:
    """The ``--etcd-*`` flags (``Invalid`` for an unreadable password file)."""
    password = getattr(args, "etcd_password", "")
    path = getattr(args, "etcd_password_file", "")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise Invalid(f"cannot read --etcd-password-file {path}: {why}") from None
    return EtcdCredentials(
        cafile=getattr(args, "etcd_cafile", ""), certfile=getattr(args, "etcd_certfile", ""),
        keyfile=getattr(args, "etcd_keyfile", ""), username=getattr(args, "etcd_username", ""),
        password=password)


def etcd_target_from_args(args: argparse.Namespace) -> EtcdTarget | None:
    """Endpoints, prefix and credentials of an etcd ``--store``; None for other stores."""
    url = getattr(args, "store", "memory")
    if not url.startswith(SCHEMES):
        return None
    return parse_etcd_url(url, etcd_credentials_from_args(args))


def open_store(url: str, *, kubeconfig: str | None = None, context: str | None = None,
               etcd: EtcdCredentials | None = None) -> Store:
    """Build the store a URL names; the heavy client modules are imported only when used.

    ``etcd`` (the flags) adds to or overrides the credentials in an etcd URL.
    """
    if url == "memory":
        from svcnet.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith(SCHEMES):
        from svcnet.store.etcd import EtcdStore

        target = parse_etcd_url(url, etcd or EtcdCredentials())
        return EtcdStore(list(target.endpoints), prefix=target.prefix,
                         credentials=target.credentials)
    if url in ("kubernetes", "k8s"):
        from svcnet.store.kubernetes import KubernetesStore

        return KubernetesStore.from_config(kubeconfig=kubeconfig, context=context)
    raise Invalid(f"--store {redact_url(url)!r} is not one of: {STORE_HELP}")


def store_from_args(args: argparse.Namespace) -> Store:
    """The store the command line names; a bad URL or flag is a usage error (one line)."""
    from svcnet.cli import UsageError

    try:
        return open_store(args.store, kubeconfig=args.kubeconfig, context=args.context,
                          etcd=etcd_credentials_from_args(args))
    except Invalid as err:
        if args.store in ("kubernetes", "k8s"):
            raise
        raise UsageError(str(err)) from None
