"""Property: a stream mixing valid objects with invalid ones never stops an informer, and
every valid object reaches every handler (also one that raises for some objects).

Invalid objects (bad names, bad ports, wrong types, nulls where none may be) are written
past the store's validation, as any etcd client could; valid ones include nulls where
kube-apiserver sends them. The expected view is computed independently: the last valid
version of each key, a key whose only versions are invalid never appears, and a delete
removes the last valid version. A valid version that an invalid one overwrote may have been
missed (a lagging watch plus a compaction skips it, as with any watch): such a key is at that
version or absent, never anything else. Watch drops, compactions (relists) and restarts are
mixed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from watchkit import Recorder, eventually, unchecked

from svcnet.model import ENDPOINT_SLICE, SERVICE, Kind
from svcnet.store.base import NotFound
from svcnet.store.memory import MemoryStore
from svcnet.watch import Backoff, Informer

NAMES = ["a", "b", "web-1", "x"]
# kube-apiserver's name rules, written out here independently of svcnet.model.validation
VALID_NAME = {"svc": re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"),
              "eps": re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                                r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")}


def valid_service(name: str, n: int, nulls: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"clusterIP": f"10.0.{n // 250}.{n % 250 + 1}",
                            "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}
    if nulls:
        spec |= {"clusterIPs": None, "externalIPs": None, "ipFamilies": None}
        if n % 2:
            spec["ports"] = None
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def valid_slice(name: str, n: int, nulls: bool) -> dict[str, Any]:
    endpoints = [{"addresses": [f"10.1.0.{i + 1}"], "hostname": f"h{i}"} for i in range(n % 3)]
    return {"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": endpoints or (None if nulls else []),
            "ports": [{"name": "http", "port": 8080}] if endpoints else (None if nulls else [])}


# How each mutation breaks an otherwise valid object; all are refused by kube-apiserver.
SERVICE_BREAKS = {
    "unicode port name": lambda o: o["spec"].update(ports=[{"name": "pört", "port": 80}]),
    "long port name": lambda o: o["spec"].update(ports=[{"name": "p" * 64, "port": 80}]),
    "long target port": lambda o: o["spec"].update(
        ports=[{"name": "h", "port": 80, "targetPort": "a" * 16}]),
    "duplicate port": lambda o: o["spec"].update(
        ports=[{"name": "h", "port": 80}, {"name": "h", "port": 81}]),
    "port as string": lambda o: o["spec"].update(ports=[{"port": "80"}]),
    "ports not a list": lambda o: o["spec"].update(ports="80"),
    "null port": lambda o: o["spec"].update(ports=[None]),
    "null clusterIP": lambda o: o["spec"].update(clusterIP=None),
    "number clusterIP": lambda o: o["spec"].update(clusterIP=5),
    "bad clusterIP": lambda o: o["spec"].update(clusterIP="10.0.0.300"),
    "spec a list": lambda o: o.update(spec=[]),
    "labels null": lambda o: o["metadata"].update(labels=None),
}
SLICE_BREAKS = {
    "unicode hostname": lambda o: o.update(endpoints=[{"addresses": ["10.1.0.1"],
                                                       "hostname": "hé"}]),
    "null addresses": lambda o: o.update(endpoints=[{"addresses": None}]),
    "wrong family": lambda o: o.update(endpoints=[{"addresses": ["fd00::1"]}]),
    "null endpoint": lambda o: o.update(endpoints=[None]),
    "bad address type": lambda o: o.update(addressType="IPX"),
    "endpoints a map": lambda o: o.update(endpoints={}),
    "port name unicode": lambda o: o.update(ports=[{"name": "ü", "port": 1}]),
}
BAD_NAMES = ["wéb", "Web", "1web", "-a", "a" * 64, "a_b", "", "web."]

operation = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(["svc", "eps"]), st.sampled_from(NAMES),
              st.integers(0, 2000), st.booleans()),
    st.tuples(st.just("break"), st.sampled_from(["svc", "eps"]), st.sampled_from(NAMES),
              st.integers(0, len(SERVICE_BREAKS) - 1)),
    st.tuples(st.just("bad-name"), st.sampled_from(["svc", "eps"]),
              st.sampled_from(BAD_NAMES) | st.text(max_size=8)),
    st.tuples(st.just("bad-namespace"), st.sampled_from(["svc", "eps"]),
              st.sampled_from(["Default", "dé", "-x", "a.b"])),
    st.tuples(st.just("delete"), st.sampled_from(["svc", "eps"]), st.sampled_from(NAMES)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("restart")),
)


class Attempts:
    """Records every call before raising for the objects it cannot handle: every valid
    object must still reach it, and its failures must cost nobody else anything."""

    def __init__(self) -> None:
        self.view: dict[str, str] = {}

    def _key(self, obj: Any) -> str:
        return f"{obj.metadata.namespace}/{obj.metadata.name}"

    def on_add(self, obj: Any) -> None:
        self.view[self._key(obj)] = obj.metadata.resource_version
        if obj.metadata.name == "x":
            raise RuntimeError("handler bug")

    def on_update(self, old: Any, new: Any) -> None:
        self.on_add(new)

    async def on_delete(self, obj: Any) -> None:
        self.view.pop(self._key(obj), None)
        if obj.metadata.name == "x":
            raise RuntimeError("async handler bug")


async def run_stream(ops: list[tuple[Any, ...]]) -> None:
    store = MemoryStore(history=8)
    kinds: dict[str, Kind[Any]] = {"svc": SERVICE, "eps": ENDPOINT_SLICE}
    build = {"svc": valid_service, "eps": valid_slice}
    breaks = {"svc": list(SERVICE_BREAKS.values()), "eps": list(SLICE_BREAKS.values())}
    informers = {k: Informer(store, kind, backoff=Backoff(base=0.01, cap=0.05))
                 for k, kind in kinds.items()}
    handlers = {k: (Recorder(), Attempts(), Recorder()) for k in kinds}
    for k, inf in informers.items():
        for h in handlers[k]:
            inf.add_handler(h)  # type: ignore[arg-type]
        inf.start()
    expected: dict[str, dict[str, str]] = {k: {} for k in kinds}
    # A valid version overwritten by an invalid one may never have been seen (the watch can
    # lag and a compaction can drop it): then the key is either at that version or absent.
    seen_or_absent: dict[str, dict[str, str]] = {k: {} for k in kinds}
    try:
        for inf in informers.values():
            await inf.wait_synced(10)
        for op in ops:
            if op[0] == "put":
                _, k, name, n, nulls = op
                raw = await store.put(kinds[k], build[k](name, n, nulls))
                expected[k][raw.key] = raw.revision
                seen_or_absent[k].pop(raw.key, None)
            elif op[0] == "break":
                _, k, name, which = op
                obj = build[k](name, 1, False)
                breaks[k][which % len(breaks[k])](obj)
                if f"default/{name}" in expected[k]:
                    seen_or_absent[k][f"default/{name}"] = expected[k].pop(f"default/{name}")
                await store.put(unchecked(kinds[k]), obj)
            elif op[0] == "bad-name":
                _, k, name = op
                if VALID_NAME[k].fullmatch(name):
                    continue  # the oracle says it is valid; covered by "put"
                with contextlib.suppress(Exception):  # "" has no name: the store refuses
                    await store.put(unchecked(kinds[k]), build[k](name, 1, False))
            elif op[0] == "bad-namespace":
                _, k, namespace = op
                obj = build[k]("a", 1, False)
                obj["metadata"]["namespace"] = namespace
                await store.put(unchecked(kinds[k]), obj)
            elif op[0] == "delete":
                _, k, name = op
                with contextlib.suppress(NotFound):
                    await store.delete(kinds[k], "default", name)
                expected[k].pop(f"default/{name}", None)
                seen_or_absent[k].pop(f"default/{name}", None)
            elif op[0] == "expire":
                await store.compact()
            else:
                await store.restart()

        def converged() -> bool:
            return all(
                {key: rv for key, rv in h.view.items() if key not in seen_or_absent[k]}
                == expected[k]
                and all(h.view.get(key) in (rv, None) for key, rv in seen_or_absent[k].items())
                for k in kinds for h in handlers[k])

        await eventually(converged, timeout=30)
        for inf in informers.values():
            assert not inf.failed and inf._task is not None and not inf._task.done()
    finally:
        for inf in informers.values():
            await inf.stop()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operation, max_size=40))
def test_invalid_objects_never_stop_an_informer_and_valid_ones_reach_every_handler(
    ops: list[tuple[Any, ...]],
) -> None:
    asyncio.run(run_stream(ops))
