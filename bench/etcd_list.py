"""How long listing 100k EndpointSlice endpoints from a real etcd takes, and where it goes.

Starts a throwaway etcd on loopback, stores the endpoints as EndpointSlices through
``EtcdStore.put``, then times ``EtcdStore.list`` (paginated range + resourceVersion splice)
for several page sizes, and separately: the raw range, the splice (fast path versus the
decode/patch/encode round trip it avoids) and decoding into records.

Prints a table and, as the last line, JSON with ``endpoints``, ``slices``, ``list_s`` (default
page size, best of --repeat), ``range_s``, ``splice_fast_s``, ``splice_roundtrip_s``, ``decode_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec

from svcnet.model import ENDPOINT_SLICE
from svcnet.store.etcd import EtcdStore, with_resource_version


def make_slice(i: int, per_slice: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"svc{i}-x1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": f"svc{i}",
                                "endpointslice.kubernetes.io/managed-by": "c"}},
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [f"10.{i // 256 % 256}.{i % 256}.{j}"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": f"node-{j % 20}", "zone": "zone-a",
            "targetRef": {"kind": "Pod", "namespace": "default", "name": f"p{i}-{j}",
                          "uid": "0b5e1c2e-1111-2222-3333-444455556666"}}
            for j in range(per_slice)],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def etcd_server() -> Iterator[str]:
    if shutil.which("etcd") is None:
        raise SystemExit("needs the etcd binary (apt install etcd-server)")
    data = tempfile.mkdtemp(prefix="svcnet-bench-etcd-")
    client, peer = _free_port(), _free_port()
    proc = subprocess.Popen(
        ["etcd", "--data-dir", data, "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}",
         "--quota-backend-bytes", str(4 << 30)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "amd64"})
    try:
        yield f"127.0.0.1:{client}"
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)


async def best_of(repeat: int, fn: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_of_sync(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def roundtrip(data: bytes, revision: int) -> bytes:
    """What the splice avoids: decode, set the field, encode."""
    obj = msgspec.json.decode(data)
    obj["metadata"]["resourceVersion"] = str(revision)
    return msgspec.json.encode(obj)


async def run(endpoints: int, per_slice: int, repeat: int, page: int) -> dict[str, Any]:
    slices = endpoints // per_slice
    with etcd_server() as endpoint:
        store = EtcdStore([endpoint], page_size=page)
        try:
            for _ in range(100):
                try:
                    await store.client.revision()
                    break
                except Exception:
                    await asyncio.sleep(0.1)
            start = time.perf_counter()
            sem = asyncio.Semaphore(32)

            async def put(i: int) -> None:
                async with sem:
                    await store.put(ENDPOINT_SLICE, make_slice(i, per_slice))

            await asyncio.gather(*(put(i) for i in range(slices)))
            load_s = time.perf_counter() - start

            base = b"/registry/endpointslices/"
            range_s = await best_of(repeat, lambda: store.client.get_prefix(base, page=page))
            kvs, _ = await store.client.get_prefix(base, page=page)
            fast_s = best_of_sync(repeat, lambda: [with_resource_version(v, m) for _, v, m in kvs])
            slow_s = best_of_sync(repeat, lambda: [roundtrip(v, m) for _, v, m in kvs])
            listing = await store.list(ENDPOINT_SLICE)
            decode_s = best_of_sync(
                repeat, lambda: [ENDPOINT_SLICE.decode(o.data) for o in listing.items])
            assert sum(len(ENDPOINT_SLICE.decode(o.data).endpoints)
                       for o in listing.items) == slices * per_slice
            by_page = {}
            for size in sorted({100, page, 5000}):
                store.page_size = size
                by_page[size] = await best_of(repeat, lambda: store.list(ENDPOINT_SLICE))
            store.page_size = page
            total_bytes = sum(len(v) for _, v, _ in kvs)
        finally:
            await store.close()

    print(f"{slices} EndpointSlices x {per_slice} endpoints = {slices * per_slice} endpoints, "
          f"{total_bytes / 1e6:.1f} MB of JSON in etcd (stored in {load_s:.2f} s)")
    print(f"{'step':48} {'seconds':>8}")
    print(f"{'range (gRPC, protobuf decode), page ' + str(page):48} {range_s:8.3f}")
    print(f"{'resourceVersion splice (svcnet fast path)':48} {fast_s:8.3f}")
    print(f"{'resourceVersion via msgspec decode+encode':48} {slow_s:8.3f}")
    print(f"{'decode into EndpointSlice records':48} {decode_s:8.3f}")
    for size, secs in by_page.items():
        print(f"{'EtcdStore.list, page ' + str(size):48} {secs:8.3f}")
    return {"endpoints": slices * per_slice, "slices": slices, "list_s": round(by_page[page], 4),
            "range_s": round(range_s, 4), "splice_fast_s": round(fast_s, 4),
            "splice_roundtrip_s": round(slow_s, 4), "decode_s": round(decode_s, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=100_000)
    parser.add_argument("--per-slice", type=int, default=100)
    parser.add_argument("--page", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.endpoints, args.per_slice, args.repeat, args.page))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
