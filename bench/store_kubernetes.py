"""What the ``kubernetes`` store costs: LIST of 100k EndpointSlice endpoints, a burst of watch
events, the client-side parse alone, and the module's import time.

Runs against the fake kube-apiserver from tests/kubeapi.py over real TLS on loopback. That
server is Python and serialises with ``json``, so end-to-end numbers include its cost; the
``*_parse_s`` / ``watch_decode_per_s`` figures are the client's own work on the same bytes.

Prints a table and, as the last line, JSON with ``endpoints``, ``slices``, ``list_s``,
``list_parse_s``, ``watch_events``, ``watch_s``, ``watch_decode_per_s``, ``import_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kubeapi import FakeKubeAPI, make_certs

from svcnet.model import ENDPOINT_SLICE
from svcnet.store import kubernetes as kube
from svcnet.store.kubeconfig import ClusterConfig


def make_slice(i: int, per_slice: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"svc{i}-x1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": f"svc{i}"}},
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [f"10.{i // 256 % 256}.{i % 256}.{j}"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": f"node-{j % 20}", "zone": "zone-a",
            "targetRef": {"kind": "Pod", "namespace": "default", "name": f"p{i}-{j}"}}
            for j in range(per_slice)],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def import_ms() -> float:
    def run(code: str) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            best = min(best, time.perf_counter() - started)
        return best

    return (run("import svcnet.store.kubernetes") - run("import svcnet.store.base")) * 1000


async def main(slices: int, per_slice: int, events: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="svcnet-bench-kube-") as tmp:
        api = FakeKubeAPI(make_certs(Path(tmp)))
        await api.start()
        store = kube.KubernetesStore(ClusterConfig(
            server=api.url, ca_pem=api.certs.ca_crt.read_text(), token="good-token"))
        try:
            for i in range(slices):
                api.create("endpointslices", make_slice(i, per_slice))
            list_s = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                listing = await store.list(ENDPOINT_SLICE)
                list_s = min(list_s, time.perf_counter() - started)
            assert len(listing.items) == slices

            pages = [api._list(r, api.resources["endpointslices"], "")
                     for r in api.requests[-(slices + 499) // 500:]]
            bodies = [json.dumps(p, separators=(",", ":")).encode() for p in pages]
            type_meta = b'{"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1",'
            started = time.perf_counter()
            for body in bodies:
                page = kube._LIST.decode(body)
                [kube._list_item(raw, type_meta) for raw in page.items or ()]
            list_parse_s = time.perf_counter() - started

            it = store.watch(ENDPOINT_SLICE, revision=listing.revision).__aiter__()
            first = asyncio.ensure_future(anext(it))
            await asyncio.sleep(0.05)
            small = make_slice(0, 3)
            started = time.perf_counter()
            for n in range(events):
                small["metadata"]["labels"]["n"] = str(n)
                api.update("endpointslices", json.loads(json.dumps(small)))
            await first
            for _ in range(events - 1):
                await anext(it)
            watch_s = time.perf_counter() - started
            await it.aclose()  # type: ignore[attr-defined]

            line = json.dumps({"type": "MODIFIED", "object": make_slice(1, 3)}).encode()
            started = time.perf_counter()
            for _ in range(100_000):
                kube._watch_event(line, ENDPOINT_SLICE)
            watch_decode_per_s = 100_000 / (time.perf_counter() - started)
        finally:
            await store.close()
            await api.stop()
    return {"endpoints": slices * per_slice, "slices": slices, "list_s": round(list_s, 3),
            "list_parse_s": round(list_parse_s, 3), "watch_events": events,
            "watch_s": round(watch_s, 3), "watch_decode_per_s": round(watch_decode_per_s),
            "import_ms": round(import_ms(), 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--per-slice", type=int, default=100)
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    result = asyncio.run(main(args.slices, args.per_slice, args.events))
    rows = [
        ("LIST (paged 500, TLS, fake server)", f"{result['list_s']:.3f} s",
         f"{result['endpoints']} endpoints in {result['slices']} slices"),
        ("  client parse of the same pages", f"{result['list_parse_s']:.3f} s",
         "envelope, identity and kind splice per item"),
        ("WATCH burst end to end", f"{result['watch_s']:.3f} s",
         f"{result['watch_events']} events"),
        ("  client decode per watch line", f"{result['watch_decode_per_s']:,} /s",
         "3-endpoint EndpointSlice events"),
        ("import svcnet.store.kubernetes", f"{result['import_ms']:.1f} ms",
         "beyond svcnet.store.base"),
    ]
    for name, value, note in rows:
        print(f"{name:<38} {value:>14}   {note}")
    print(json.dumps(result))
