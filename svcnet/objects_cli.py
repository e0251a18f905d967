"""``svcnet apply|get|delete|watch``: kubectl-like object commands against any store."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from svcnet.model import InvalidObject, Kind, kind_named
from svcnet.store.base import NotFound, RawObject, Store, StoreError
from svcnet.store.open import add_store_arguments, store_from_args


def register(sub: Any) -> None:
    p = sub.add_parser("apply", help="create or replace objects from YAML or JSON")
    add_store_arguments(p)
    p.add_argument("-f", "--filename", required=True, help="file, or - for stdin")
    p.set_defaults(func=_apply)

    p = sub.add_parser("get", help="list objects or show one")
    add_store_arguments(p)
    p.add_argument("kind")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=_get)

    p = sub.add_parser("delete", help="delete one object")
    add_store_arguments(p)
    p.add_argument("kind")
    p.add_argument("name")
    p.add_argument("-n", "--namespace", default="default")
    p.set_defaults(func=_delete)

    p = sub.add_parser("watch", help="print live events of one kind (or all, with --demo)")
    add_store_arguments(p)
    p.add_argument("kind", nargs="?", default="services")
    p.add_argument("--demo", action="store_true",
                   help="embedded memory store fed by a scripted writer; exits when done")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.set_defaults(func=_watch)


def load_documents(filename: str) -> list[dict[str, Any]]:
    """Objects from a YAML/JSON file or stdin: multi-document YAML and `kind: List` both work."""
    from svcnet.cli import UsageError

    try:
        text = sys.stdin.read() if filename == "-" else Path(filename).read_text("utf-8")
    except OSError as err:
        raise UsageError(f"cannot read {filename}: {err.strerror}") from None
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise UsageError(f"{filename}: not valid YAML or JSON: {err}".splitlines()[0]) from None
    objs: list[dict[str, Any]] = []
    for doc in docs:
        items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
        for item in items or []:
            if not isinstance(item, dict) or "kind" not in item:
                raise UsageError(f"{filename}: every document needs a 'kind'")
            objs.append(item)
    return objs


def _kind(name: str) -> Kind[Any]:
    from svcnet.cli import UsageError

    try:
        return kind_named(name)
    except KeyError as err:
        raise UsageError(str(err.args[0])) from None


def _apply(args: argparse.Namespace) -> int:
    from svcnet.cli import UsageError

    objs = load_documents(args.filename)
    typed = [(_kind(obj["kind"]), obj) for obj in objs]
    for kind, obj in typed:  # validate everything before writing anything
        try:
            kind.convert(obj)
        except InvalidObject as err:
            raise UsageError(str(err)) from None

    async def run(store: Store) -> None:
        for kind, obj in typed:
            raw = await store.put(kind, obj)
            print(f"{kind.name.lower()}/{raw.key} applied (revision {raw.revision})")

    return _with_store(args, run)


def _get(args: argparse.Namespace) -> int:
    kind = _kind(args.kind)

    async def run(store: Store) -> None:
        listing = await store.list(kind)
        items = [
            raw for raw in listing.items
            if (args.all_namespaces or not kind.namespaced or raw.namespace == args.namespace)
            and (args.name is None or raw.name == args.name)
        ]
        if args.name is not None and not items:
            from svcnet.cli import UsageError

            raise UsageError(f"{kind.name} {args.namespace}/{args.name} not found")
        if args.output == "json":
            for raw in items:
                print(raw.data.decode())
            return
        for line in _table(kind, items):
            print(line)

    return _with_store(args, run)


def _delete(args: argparse.Namespace) -> int:
    kind = _kind(args.kind)

    async def run(store: Store) -> None:
        from svcnet.cli import UsageError

        try:
            await store.delete(kind, args.namespace if kind.namespaced else "", args.name)
        except NotFound as err:
            raise UsageError(str(err)) from None
        print(f"{kind.name.lower()}/{args.name} deleted")

    return _with_store(args, run)


def _watch(args: argparse.Namespace) -> int:
    from svcnet.watch import Callbacks, InformerFactory

    kinds = [_kind(args.kind)] if not args.demo else [kind_named(k) for k in
                                                      ("services", "endpointslices")]
    count = args.count or (10 if args.demo else 0)

    async def run(store: Store) -> None:
        factory = InformerFactory(store)
        seen = asyncio.Event()
        printed = 0

        def printer(kind: Kind[Any]) -> Callbacks[Any]:
            def on_change(old: Any, new: Any) -> None:
                nonlocal printed
                verb = "ADDED" if old is None else "DELETED" if new is None else "MODIFIED"
                obj = new if new is not None else old
                meta = obj.metadata
                try:
                    print(f"{verb:<9} {kind.name:<14} {meta.namespace}/{meta.name:<20} "
                          f"rv={meta.resource_version} {_summary(obj)}", flush=True)
                except BrokenPipeError:  # `svcnet watch | head`: nobody reads any more
                    seen.set()
                    return
                printed += 1
                if count and printed >= count:
                    seen.set()
            return Callbacks(on_change)

        for kind in kinds:
            factory.informer(kind).add_handler(printer(kind))
        factory.start()
        writer = asyncio.create_task(_demo_writer(store)) if args.demo else None
        try:
            await seen.wait()
        finally:
            if writer is not None:
                writer.cancel()
            await factory.stop()

    return _with_store(args, run, demo=args.demo)


async def _demo_writer(store: Store) -> None:
    """A scripted sequence of service/endpoint changes for the embedded demo."""
    from svcnet.model import ENDPOINT_SLICE, SERVICE

    await store.put(SERVICE, _demo_service("web", "10.96.0.20"))
    for replicas in (1, 2, 3):
        await store.put(ENDPOINT_SLICE, _demo_slice("web", replicas))
        await asyncio.sleep(0.2)
    await store.put(SERVICE, _demo_service("api", "10.96.0.21"))
    await store.put(ENDPOINT_SLICE, _demo_slice("api", 2))
    await store.put(ENDPOINT_SLICE, _demo_slice("web", 1))
    await store.delete(ENDPOINT_SLICE, "default", "api-abcde")
    await store.delete(SERVICE, "default", "api")
    await asyncio.sleep(0.2)
    await store.put(SERVICE, _demo_service("web", "10.96.0.20", node_port=30080))
    while True:
        await asyncio.sleep(3600)


def _demo_service(name: str, ip: str, node_port: int = 0) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": 8080}
    if node_port:
        port["nodePort"] = node_port
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": ip,
                     "selector": {"app": name}, "ports": [port]}}


def _demo_slice(service: str, replicas: int) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{service}-abcde", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "endpoints": [{"addresses": [f"10.244.{i}.{10 + i}"], "conditions": {"ready": True},
                           "nodeName": f"node-{i}"} for i in range(replicas)],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def _summary(obj: Any) -> str:
    from svcnet.model import EndpointSlice, Service

    if isinstance(obj, Service):
        ports = ",".join(f"{p.port}/{p.protocol}" for p in obj.spec.ports)
        return f"{obj.spec.type} {','.join(obj.cluster_ips) or '-'} {ports}"
    if isinstance(obj, EndpointSlice):
        ready = [ep.addresses[0] for ep in obj.endpoints if ep.ready and ep.addresses]
        return f"service={obj.service_name} ready={','.join(ready) or '-'}"
    return ""


def _table(kind: Kind[Any], items: list[RawObject]) -> Iterator[str]:
    yield f"{'NAMESPACE':<16} {'NAME':<32} {'REVISION':>10}  SUMMARY"
    for raw in items:
        try:
            summary = _summary(kind.decode(raw.data))
        except InvalidObject as err:
            summary = f"INVALID: {err.problem}"
        yield f"{raw.namespace or '-':<16} {raw.name:<32} {raw.revision:>10}  {summary}"


def _with_store(args: argparse.Namespace, run: Any, demo: bool = False) -> int:
    from svcnet.cli import UsageError

    async def main() -> None:
        store = store_from_args(args)
        try:
            await run(store)
        finally:
            await store.close()

    try:
        asyncio.run(main())
    except BrokenPipeError:  # `svcnet get ... | head`: the reader has all it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except StoreError as err:
        raise UsageError(f"store error: {err}") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"bad JSON: {err}") from None
    return 0
