"""Helpers shared by the watch-client tests: a recording handler and object builders."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from svcnet.model import Kind, Service


def service(name: str, ip: str = "10.0.0.1", ns: str = "default", port: int = 80
            ) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": [{"port": port}]}}


class Recorder:
    """Replays handler calls into its own view of the world and keeps the call log."""

    def __init__(self) -> None:
        self.view: dict[str, str] = {}
        self.log: list[tuple[str, str, str]] = []

    def on_add(self, obj: Service) -> None:
        key = f"{obj.metadata.namespace}/{obj.metadata.name}"
        assert key not in self.view, f"add for {key} already present"
        self.view[key] = obj.metadata.resource_version
        self.log.append(("add", key, obj.metadata.resource_version))

    def on_update(self, old: Service, new: Service) -> None:
        key = f"{new.metadata.namespace}/{new.metadata.name}"
        assert self.view.get(key) == old.metadata.resource_version, f"stale old for {key}"
        self.view[key] = new.metadata.resource_version
        self.log.append(("update", key, new.metadata.resource_version))

    def on_delete(self, obj: Service) -> None:
        key = f"{obj.metadata.namespace}/{obj.metadata.name}"
        assert key in self.view, f"delete for unknown {key}"
        del self.view[key]
        self.log.append(("delete", key, obj.metadata.resource_version))


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class _Unchecked(Kind[Any]):
    def convert(self, obj: dict[str, Any]) -> Any:
        return None


def unchecked(kind: Kind[Any]) -> Kind[Any]:
    """``kind`` for ``MemoryStore.put`` without the store's validation: writes an object as
    any client with access to etcd could, which the informers must then survive."""
    return _Unchecked(kind.name, kind.api_version, kind.plural, kind.namespaced, kind.record)
