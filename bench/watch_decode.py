"""Decode throughput of EndpointSlices: the record decoder versus the alternatives we rejected.

Prints a table and, as the last line, JSON with ``endpoints`` and ``decode_s`` (the decoder
svcnet uses, best of --repeat runs).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from svcnet.model import ENDPOINT_SLICE


def make_slices(endpoints: int, per_slice: int = 100) -> list[bytes]:
    slices = []
    for i in range(endpoints // per_slice):
        slices.append(json.dumps({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc{i}-x1", "namespace": "default", "resourceVersion": str(i),
                         "labels": {"kubernetes.io/service-name": f"svc{i}",
                                    "endpointslice.kubernetes.io/managed-by": "c"},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                                         "2026-11-23T19:00:00Z"}},
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": [f"10.{i // 256 % 256}.{i % 256}.{j}"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node-{j % 20}", "zone": "zone-a",
                "targetRef": {"kind": "Pod", "namespace": "default", "name": f"p{i}-{j}",
                              "uid": "0b5e1c2e-1111-2222-3333-444455556666"}}
                for j in range(per_slice)],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }).encode())
    return slices


@dataclass(frozen=True, slots=True)
class _DCEndpoint:
    addresses: tuple[str, ...]
    ready: bool | None
    serving: bool | None
    terminating: bool | None
    node_name: str | None
    zone: str | None


@dataclass(frozen=True, slots=True)
class _DCSlice:
    name: str
    namespace: str
    endpoints: tuple[_DCEndpoint, ...]


def _dataclass_decoder(loads: Callable[[bytes], Any]) -> Callable[[bytes], object]:
    def decode(data: bytes) -> object:
        obj = loads(data)
        meta = obj["metadata"]
        eps = []
        for ep in obj.get("endpoints") or ():
            cond = ep.get("conditions") or {}
            eps.append(_DCEndpoint(tuple(ep["addresses"]), cond.get("ready"), cond.get("serving"),
                                   cond.get("terminating"), ep.get("nodeName"), ep.get("zone")))
        return _DCSlice(meta["name"], meta.get("namespace", ""), tuple(eps))
    return decode


def best_of(repeat: int, fn: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--endpoints", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    blobs = make_slices(args.endpoints)
    decoders: dict[str, Callable[[bytes], object]] = {
        "msgspec -> records (svcnet)": ENDPOINT_SLICE.decode,
        "json.loads -> dataclasses": _dataclass_decoder(json.loads),
    }
    try:
        import orjson

        decoders["orjson.loads -> dataclasses"] = _dataclass_decoder(orjson.loads)
    except ImportError:
        pass
    decoders["json.loads only (no records)"] = json.loads
    results = {name: best_of(args.repeat, lambda d=dec: [d(b) for b in blobs])  # type: ignore[misc]
               for name, dec in decoders.items()}
    ours = results["msgspec -> records (svcnet)"]
    print(f"{'decoder':<32} {'seconds':>8} {'endpoints/s':>12} {'vs svcnet':>9}")
    for name, secs in results.items():
        print(f"{name:<32} {secs:8.3f} {args.endpoints / secs:12,.0f} {secs / ours:8.1f}x")
    print(json.dumps({"endpoints": args.endpoints, "decode_s": round(ours, 4)}))


if __name__ == "__main__":
    main()
